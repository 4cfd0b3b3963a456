"""distill/DC.py and distill/DM.py (distill/condense.py) end to end on a tiny generated data set."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_color_image_folder

from distill import condense
from utils.config import DC_KEYS, DM_KEYS, load_config
from utils.data import get_dataset
from utils.io import UserError, load_pt, save_pt

ROOT = Path(__file__).resolve().parents[1]
MODEL, SIZE, CLASSES, PER_CLASS = "ConvNetW32", 16, 3, 8


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A 3-class 16x16 ImageFolder (8 train, 4 test images per class)."""
    root = tmp_path_factory.mktemp("world")
    make_color_image_folder(root / "data", CLASSES, SIZE, {"train": PER_CLASS, "test": 4})
    return root


@pytest.fixture(autouse=True)
def cache_dir(world, monkeypatch, one_thread):
    monkeypatch.setenv("PAD_CACHE_DIR", str(world / "cache"))


def argv(world, tmp, method, **overrides):
    settings = {
        "dataset": "ImageFolder", "data_path": world / "data", "model": MODEL,
        "out_dir": tmp / "out", "device": "cpu", "ipc": 2, "Iteration": 4, "eval_it": 2,
        "epoch_eval_train": 2, "num_eval": 1, "batch_real": 4, "batch_train": 4,
        "checkpoint_it": 2,
    }  # fmt: skip
    if method == "DC":
        settings.update(outer_loop=2, inner_loop=1)
    settings.update(overrides)
    return [token for key, value in settings.items() for token in (f"--{key}", str(value))]


def index_file(world, tmp):
    """A hand-made index file: each class's train indices in descending order ("easy" first)."""
    data = get_dataset("ImageFolder", str(world / "data"))
    order = torch.stack([members.flip(0) for members in data.indices_class()])
    path = tmp / "ImageFolder_hand.pt"
    save_pt(order, path)
    return path, order


@pytest.mark.parametrize("method, keys", [("DC", DC_KEYS), ("DM", DM_KEYS)])
def test_run_writes_the_run_folder(world, tmp_path, method, keys):
    summary = condense.main(method, argv(world, tmp_path, method, depth_ratio=0.5))
    run_dir = summary["run_dir"]
    name = f"ImageFolder-IPC2-{method}-s42"
    assert run_dir == tmp_path / "out" / "ImageFolder" / "2" / MODEL / name
    normal = run_dir / "Normal"
    for tag in ("0", "4", "best"):
        images, labels = load_pt(normal / f"images_{tag}.pt"), load_pt(normal / f"labels_{tag}.pt")
        assert images.shape == (CLASSES * 2, 3, SIZE, SIZE) and images.dtype == torch.float32
        assert labels.dtype == torch.int64 and labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert not torch.equal(load_pt(normal / "images_0.pt"), load_pt(normal / "images_4.pt"))
    for png in ("images_0.png", "images_clipped_4.png", "loss.png"):
        assert (run_dir / png).exists()
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [0, 1, 2, 3, 4]
    assert [r["step"] for r in records if f"accuracy/{MODEL}" in r] == [0, 2, 4]
    saved = load_config(str(run_dir / "config.yaml"), keys=keys)  # a valid --cfg file
    assert saved.depth_ratio == 0.5 and saved.Iteration == 4
    assert summary["next_iteration"] == 5


def test_dc_with_dsa_names_the_run_dsa(world, tmp_path):
    summary = condense.main("DC", argv(world, tmp_path, "DC", Iteration=1, dsa=True))
    assert summary["run_dir"].name == "ImageFolder-IPC2-DSA-s42"


@pytest.mark.parametrize("method, step", [("DC", "gm_step"), ("DM", "dm_iteration")])
def test_resume_after_sigterm_equals_an_uninterrupted_run(world, tmp_path, monkeypatch, method,
                                                          step):  # fmt: skip
    common = {"Iteration": 5, "eval_it": 3, "checkpoint_it": 100, "dsa": True}
    whole = condense.main(method, argv(world, tmp_path, method, **common, name="whole"))
    real_step, calls = getattr(condense, step), []

    def step_then_signal(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # during iteration 2: the run must stop after it
            os.kill(os.getpid(), signal.SIGTERM)
        return real_step(*args, **kwargs)

    monkeypatch.setattr(condense, step, step_then_signal)
    cut = condense.main(method, argv(world, tmp_path, method, **common, name="cut"))
    monkeypatch.setattr(condense, step, real_step)
    assert cut["stopped_by"] == signal.SIGTERM and cut["next_iteration"] == 3
    resumed = condense.main(method, argv(world, tmp_path, method, **common, name="cut",
                                         resume=True))  # fmt: skip
    assert resumed["next_iteration"] == 6
    for name in ("checkpoint.pt", "Normal/images_3.pt", "Normal/images_best.pt"):
        a, b = load_pt(whole["run_dir"] / name), load_pt(resumed["run_dir"] / name)
        a, b = (a["image_syn"], b["image_syn"]) if name == "checkpoint.pt" else (a, b)
        assert torch.equal(a, b), name
    steps = [
        json.loads(line)["step"]
        for line in (resumed["run_dir"] / "metrics.jsonl").read_text().splitlines()
        if '"loss"' in line
    ]
    assert steps == list(range(6))  # no iteration logged twice  # fmt: skip


@pytest.mark.parametrize("method", ["DC", "DM"])
def test_filter_ratio_0_is_the_plain_run_bit_for_bit(world, tmp_path, method):
    path, _ = index_file(world, tmp_path)
    common = {"Iteration": 3, "eval_it": 10, "init": "real"}
    plain = condense.main(method, argv(world, tmp_path, method, **common, name="plain"))
    zero = condense.main(method, argv(world, tmp_path, method, **common, name="zero",
                                      sort_method=path, remove_hard=0.0))  # fmt: skip
    hard = condense.main(method, argv(world, tmp_path, method, **common, name="hard",
                                      sort_method=path, remove_hard=0.5))  # fmt: skip
    final = {r: load_pt(s["run_dir"] / "checkpoint.pt")["image_syn"]
             for r, s in (("plain", plain), ("zero", zero), ("hard", hard))}  # fmt: skip
    assert torch.equal(final["plain"], final["zero"])
    assert not torch.equal(final["plain"], final["hard"])


def test_filter_1_draws_only_the_kept_images(world, tmp_path, monkeypatch):
    """remove_hard 0.5 of rows listed in descending order keeps each class's 4 largest indices:
    the real initial images come from them."""
    path, order = index_file(world, tmp_path)
    seen = []
    real = condense.real_image_indices

    def spy(pool, ipc, generator):
        seen.append([p.tolist() for p in pool])
        return real(pool, ipc, generator)

    monkeypatch.setattr(condense, "real_image_indices", spy)
    condense.main("DM", argv(world, tmp_path, "DM", Iteration=0, sort_method=path,
                             remove_hard=0.5, ipc=4))  # fmt: skip
    assert seen == [[sorted(row[:4].tolist()) for row in order]]


@pytest.mark.parametrize(
    "method, extra, message",
    [
        ("DM", {"remove_hard": 1.0, "sort_method": "x.pt"}, r"remove_hard=1.0 is outside \[0, 1\)"),
        ("DC", {"remove_hard": 0.1, "remove_easy": 0.1, "sort_method": "x.pt"}, "not both"),
        ("DM", {"remove_easy": 0.2}, "need a difficulty index file: set sort_method"),
        ("DC", {"depth_ratio": -0.1}, r"depth_ratio=-0.1 is outside \[0, 1\)"),
        ("DC", {"dis_metric": "l1"}, "dis_metric='l1' is unknown"),
        ("DM", {"remove_hard": 0.1, "sort_method": "missing"}, "difficulty file .* not found"),
        ("DM", {"init": "zeros"}, "init"),
        ("DC", {"ipc": 3, "outer_loop": "null"}, "ipc=3 has no default"),
    ],
)
def test_bad_settings_are_user_errors(world, tmp_path, method, extra, message):
    with pytest.raises(UserError, match=message):
        condense.main(method, argv(world, tmp_path, method, **extra))


def test_index_file_of_another_data_set_and_too_large_ipc(world, tmp_path):
    other = tmp_path / "other.pt"
    save_pt(torch.arange(30).view(3, 10), other)
    with pytest.raises(UserError, match=r"shape \[3, 10\] .*another data set"):
        condense.main("DM", argv(world, tmp_path, "DM", sort_method=other, remove_hard=0.1))
    path, _ = index_file(world, tmp_path)
    with pytest.raises(UserError, match="ipc=5 but class 0 keeps only 4 train images"):
        condense.main("DM", argv(world, tmp_path, "DM", sort_method=path, remove_hard=0.5, ipc=5))


@pytest.mark.parametrize("script", ["DC.py", "DM.py"])
def test_script_reports_bad_input_in_one_line_with_exit_2(world, tmp_path, script):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PAD_CACHE_DIR": str(world / "cache")}
    method = script[:2]
    command = [
        sys.executable,
        str(ROOT / "distill" / script),
        *argv(world, tmp_path, method, remove_hard=0.1, remove_easy=0.1, sort_method="a"),
    ]
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "not both" in done.stderr


@pytest.mark.parametrize("method", ["DC", "DM"])
def test_paper_configs_hold_the_original_values(method):
    keys = DC_KEYS if method == "DC" else DM_KEYS
    for ipc in (1, 10, 50, 500):
        cfg = load_config(str(ROOT / "configs" / "CIFAR-10" / method / f"IPC{ipc}.yaml"), keys=keys)
        assert (cfg.dataset, cfg.model, cfg.ipc, cfg.batch_real) == ("CIFAR10", "ConvNet", ipc, 256)
        if method == "DC":
            assert (cfg.Iteration, cfg.lr_img, cfg.init, cfg.dsa) == (1000, 0.1, "noise", False)
        else:
            lr = 10.0 if ipc >= 100 else 1.0
            assert (cfg.Iteration, cfg.lr_img, cfg.init, cfg.dsa) == (20000, lr, "real", True)
    for name in ("DC", "DSA", "DM"):
        path = ROOT / "configs" / "cpu" / "gm_dm" / f"FashionMNIST_IPC1_{name}.yaml"
        cfg = load_config(str(path), keys=DM_KEYS if name == "DM" else DC_KEYS)
        assert cfg.dataset == "FashionMNIST" and cfg.model == "ConvNetW32"


def test_copy_weights_gives_a_compiled_network_the_fresh_weights():
    from utils.condense import copy_weights, fresh_network

    g = torch.Generator().manual_seed(0)
    fresh = fresh_network(MODEL, 3, CLASSES, (SIZE, SIZE), generator=g)
    other = fresh_network(MODEL, 3, CLASSES, (SIZE, SIZE), generator=g)
    x = torch.randn(2, 3, SIZE, SIZE, generator=g)
    assert not torch.equal(fresh(x), other(x))
    copy_weights(fresh, other)
    assert torch.equal(fresh(x), other(x))
