import pytest

from utils.config import DEFAULTS, load_config, parse_config_args, save_config, str2bool
from utils.io import UserError, load_yaml


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_defaults_follow_the_spec_table():
    # a few values of ALGORITHMS 9, checked by hand
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
    with pytest.raises(UserError, match=r"duplicate key 'zca'.*lines 1 and 3"):
        load_config(str(write(tmp_path, "zca: false\nipc: 1\nzca: true\n")))


@pytest.mark.parametrize(
    "text, key",
    [("ipc: 1.5\n", "ipc"), ("zca: maybe\n", "zca"), ("lr_img: fast\n", "lr_img"),
     ("name: [1, 2]\n", "name"), ("max_files: two\n", "max_files")],
)
def test_wrong_type_names_the_key(tmp_path, text, key):
    with pytest.raises(UserError, match=f"'{key}'|--{key}"):
        load_config(str(write(tmp_path, text)))


def test_command_line_overrides_keep_types(tmp_path):
    path = write(tmp_path, "ipc: 10\n")
    cfg = parse_config_args(
        ["--cfg", str(path), "--ipc", "50", "--lr_img=20", "--zca", "False", "--max_files", "2",
         "--device", "cpu", "--name", "123", "--dsa", "0", "--no_aug"]
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
        True, True, True, False, False, False]
    with pytest.raises(Exception):
        str2bool("perhaps")


def test_save_config_round_trip(tmp_path):
    cfg = load_config(None, ["--ipc", "3"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(str(tmp_path / "config.yaml"))
    assert vars(again) == vars(cfg)
    assert load_yaml(tmp_path / "config.yaml")["ipc"] == 3
