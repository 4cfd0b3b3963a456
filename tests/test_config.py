import argparse
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from utils.config import (
    DEFAULTS,
    GROUP_TITLES,
    KEYS,
    KINDS,
    OURS,
    UNUSED_KEYS,
    coerce,
    config_markdown,
    format_default,
    load_config,
    parse_config_args,
    save_config,
    str2bool,
)
from utils.io import UserError, load_yaml

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_defaults_follow_the_spec_table():
    # a few values of the authors' table, checked by hand
    assert DEFAULTS["syn_steps"] == 80 and DEFAULTS["expert_epochs"] == 2
    assert DEFAULTS["lr_img"] == 1000 and DEFAULTS["lr_lr"] == 1e-05
    assert DEFAULTS["threshold"] == 1.0 and DEFAULTS["Label_Model_Timestamp"] == -1
    assert DEFAULTS["Sequential_Generation"] is True and DEFAULTS["zca"] is True
    assert DEFAULTS["max_files"] is None and DEFAULTS["device"] == [0]


def test_yaml_overrides_defaults_and_promotes_int_to_float(tmp_path):
    cfg = load_config(str(write(tmp_path, "ipc: 10\nlr_img: 100\nlr_lr: 1e-7\nzca: false\n")))
    assert cfg.ipc == 10
    assert cfg.lr_img == 100.0 and isinstance(cfg.lr_img, float)
    assert cfg.lr_lr == 1e-7  # YAML 1.1 reads 1e-7 as a string; we accept it for a float key
    assert cfg.zca is False
    assert cfg.syn_steps == 80


def test_unknown_key_names_it_and_suggests(tmp_path):
    with pytest.raises(UserError, match=r"'syn_step'.*did you mean 'syn_steps'"):
        load_config(str(write(tmp_path, "syn_step: 3\n")))


def test_duplicate_key_is_refused(tmp_path):
    path = write(tmp_path, "zca: false\nipc: 1\nzca: true\n")
    with pytest.raises(UserError, match=r"duplicate key 'zca' in .*c\.yaml \(lines 1 and 3\)"):
        load_config(str(path))


@pytest.mark.parametrize(
    "text, key",
    [
        ("ipc: 1.5\n", "ipc"),
        ("zca: maybe\n", "zca"),
        ("lr_img: fast\n", "lr_img"),
        ("name: [1, 2]\n", "name"),
        ("max_files: two\n", "max_files"),
    ],
)
def test_wrong_type_names_the_key(tmp_path, text, key):
    with pytest.raises(UserError, match=f"'{key}'|--{key}"):
        load_config(str(write(tmp_path, text)))


def test_command_line_overrides_keep_types(tmp_path):
    path = write(tmp_path, "ipc: 10\n")
    cfg = parse_config_args(
        [
            "--cfg",
            str(path),
            "--ipc",
            "50",
            "--lr_img=20",
            "--zca",
            "False",
            "--max_files",
            "2",
            "--device",
            "cpu",
            "--name",
            "123",
            "--dsa",
            "0",
            "--no_aug",
        ]
    )
    assert cfg.ipc == 50
    assert cfg.lr_img == 20.0 and isinstance(cfg.lr_img, float)
    assert cfg.zca is False and cfg.dsa is False and cfg.no_aug is True
    assert cfg.max_files == 2 and cfg.device == "cpu" and cfg.name == "123"
    assert cfg.cfg == str(path)
    assert parse_config_args(["--device", "[0, 1]"]).device == [0, 1]
    with pytest.raises(UserError, match="--ipc"):
        parse_config_args(["--ipc", "many"])
    with pytest.raises(UserError, match="did you mean 'ipc'"):
        parse_config_args(["--ipcs", "1"])


def test_missing_config_file(tmp_path):
    with pytest.raises(UserError, match="config file not found"):
        load_config(str(tmp_path / "none.yaml"))


def test_str2bool():
    assert [str2bool(v) for v in ["true", "True", "1", "false", "False", "0"]] == [
        True,
        True,
        True,
        False,
        False,
        False,
    ]
    with pytest.raises(argparse.ArgumentTypeError, match="perhaps"):
        str2bool("perhaps")


def test_save_config_round_trip(tmp_path):
    cfg = load_config(None, ["--ipc", "3"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(str(tmp_path / "config.yaml"))
    assert vars(again) == vars(cfg)
    assert load_yaml(tmp_path / "config.yaml")["ipc"] == 3


# ---- the table ---------------------------------------------------------------------------------

# The authors' keys in the order of their config table, then ours (written out by hand).
AUTHORS_ORDER = """dataset subset model ipc eval_mode num_eval eval_it epoch_eval_train Iteration
lr_img lr_teacher lr_init batch_real batch_syn batch_train pix_init dsa dsa_strategy data_path
buffer_path expert_epochs syn_steps max_start_epoch min_start_epoch zca load_all no_aug texture
canvas_size canvas_samples max_files max_experts force_save ema_decay lr_y Momentum_y project name
threshold loss_ratio depth_ratio record_loss Sequential_Generation expansion_end_epoch
current_max_start_epoch init_frozen skip_first_eva parall_eva lr_lr res device
Initialize_Label_With_Another_Model Initialize_Label_Model Initialize_Label_Model_Dir
Label_Model_Timestamp""".split()
OURS_ORDER = """seed memory memory_budget_gb hybrid_kept_steps checkpoint_it resume max_skipped
wandb amp channels_last compile eval_amp eval_compile max_per_class val_per_class eval_seed
out_dir distributed world_size""".split()
UNUSED = """lr_init batch_real canvas_size canvas_samples ema_decay record_loss init_frozen
parall_eva Initialize_Label_Model_Dir""".split()


def test_table_order_groups_and_help():
    assert list(KEYS) == AUTHORS_ORDER + OURS_ORDER == list(DEFAULTS)
    assert [k for k in KEYS if KEYS[k].group == OURS] == OURS_ORDER
    assert sorted(UNUSED_KEYS) == sorted(UNUSED)
    for name, key in KEYS.items():
        assert key.name == name and key.kind in KINDS and key.help.strip(), name
        assert "|" not in key.help, name  # it goes into a markdown table
        # every default passes its own validation unchanged
        assert coerce(name, key.default, "test") == key.default, name


def test_docs_config_md_is_the_generated_text():
    text = (ROOT / "docs" / "config.md").read_text()
    assert text == config_markdown(), "run: python -m utils.config --markdown > docs/config.md"
    for name, key in KEYS.items():
        assert f"| `{name}` | {KINDS[key.kind][0]} | `{format_default(key.default)}` |" in text


def test_distillation_help_lists_every_key_with_default_and_help(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")  # no wrapped sentences
    with pytest.raises(SystemExit) as stop:
        parse_config_args(["--help"], description="PAD test")
    assert stop.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for title in GROUP_TITLES.values():
        assert f"{title}:" in text
    for name, key in KEYS.items():
        metavar = "[BOOL]" if key.kind == "bool" else KINDS[key.kind][1]
        assert f"--{name} {metavar} {key.help} (default: {format_default(key.default)})" in text
    assert (
        "--max_files INT|null use only the first max_files expert files (null: all) "
        "(default: null)" in text
    )
    assert "--zca [BOOL] ZCA-whiten the real data (the experts must match) (default: true)" in text
    assert (
        "--device DEVICE GPU id list (the first is used), or auto, cpu, cuda, cuda:N "
        "(default: [0])" in text
    )
    # the groups come in order: the paper's keys, ours, the compatibility ones
    positions = [text.index(f"--{name} ") for name in ("Label_Model_Timestamp", "seed", "lr_init")]
    assert positions == sorted(positions)


def test_distillation_help_from_the_script():
    done = subprocess.run(
        [sys.executable, str(ROOT / "distill" / "PAD_depth.py"), "--help"],
        capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "--Label_Model_Timestamp INT" in done.stdout and "(default: -1)" in done.stdout


@pytest.mark.parametrize(
    "words, value",
    [([], True), (["true"], True), (["false"], False), (["True"], True), (["False"], False),
     (["1"], True), (["0"], False), (["yes"], True), (["no"], False)],
)  # fmt: skip
def test_distillation_booleans(words, value):
    assert parse_config_args(["--zca", *words, "--ipc", "2"]).zca is value
    assert (
        parse_config_args(["--ipc", "2", "--Sequential_Generation", *words]).Sequential_Generation
        is value
    )


# ---- keys without effect -----------------------------------------------------------------------


def loaded_warnings(path, overrides=()):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cfg = load_config(str(path) if path else None, list(overrides))
    return cfg, [str(w.message) for w in caught]


def test_one_unused_key_gives_one_warning_naming_it(tmp_path):
    authors = "dataset: CIFAR10\nipc: 10\nema_decay: 0.9995\nlr_img: 100\n"
    cfg, caught = loaded_warnings(write(tmp_path, authors))
    assert len(caught) == 1 and "ema_decay" in caught[0]
    assert not any(name in caught[0] for name in set(UNUSED) - {"ema_decay"})
    assert cfg.ipc == 10 and cfg.lr_img == 100.0  # the rest still loads


def test_unused_keys_of_file_and_command_line_share_one_warning(tmp_path):
    path = write(tmp_path, "ipc: 10\nlr_init: 0.01\nrecord_loss: false\n")
    _, caught = loaded_warnings(path, ["--parall_eva", "--ipc", "3"])
    assert len(caught) == 1
    assert all(name in caught[0] for name in ("lr_init", "record_loss", "parall_eva"))
    assert "ema_decay" not in caught[0] and "canvas_size" not in caught[0]


def test_no_unused_key_no_warning(tmp_path):
    assert loaded_warnings(write(tmp_path, "ipc: 10\nzca: false\n"))[1] == []
    assert loaded_warnings(None, ["--ipc", "3"])[1] == []  # the defaults never warn
    assert loaded_warnings(write(tmp_path, "texture: false\n"))[1] == []


def test_shipped_configs_load_without_warnings():
    # distill/DC.py's and DM.py's configs have their own tables (tests/test_condense.py)
    condense = {"DC", "DM", "gm_dm"}
    files = sorted(p for p in (ROOT / "configs").rglob("*.yaml") if p.parent.name not in condense)
    assert len(files) >= 12
    for path in files:
        assert loaded_warnings(path)[1] == [], path


def test_snapshot_leaves_out_unused_keys_and_reloads_silently(tmp_path):
    cfg = load_config(None, ["--ipc", "3"])
    save_config({key: getattr(cfg, key) for key in DEFAULTS}, tmp_path / "config.yaml")
    saved = load_yaml(tmp_path / "config.yaml")
    assert set(saved) == set(DEFAULTS) - set(UNUSED)
    again, caught = loaded_warnings(tmp_path / "config.yaml")
    assert caught == [] and vars(again) == vars(cfg)
