"""The failures of docs/algorithms.md#divergence-guard and docs/formats.md#provenance-checks,
each on tiny generated data: divergence, experts of other settings, unwritable outputs, load
errors, resuming before the first checkpoint, two runs on the same outputs, smaller checks."""

import os
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_color_image_folder

from distill import pad
from utils.io import UserError, load_pt
from utils.networks import get_network
from utils.trajectory import expert_dir, list_expert_files, save_expert_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "buffer"))

import buffer_CL  # noqa: E402

MODEL, SIZE, CLASSES = "ConvNetW32", 16, 3
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A 3-class 16x16 ImageFolder (8 train, 4 test images per class)."""
    root = tmp_path_factory.mktemp("bad_inputs")
    make_color_image_folder(root / "data", CLASSES, SIZE, {"train": 8, "test": 4})
    return root


@pytest.fixture(autouse=True)
def cache(world, monkeypatch):
    monkeypatch.setenv("PAD_CACHE_DIR", str(world / "cache"))


def subprocess_env(world) -> dict:
    return {
        **os.environ, "PAD_CACHE_DIR": str(world / "cache"), "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
    }  # fmt: skip


def random_walk_experts(num_experts=2, snapshots=4, seed=0):
    torch.manual_seed(seed)
    experts = []
    for _ in range(num_experts):
        model = get_network(MODEL, 3, CLASSES, (SIZE, SIZE))
        expert = [[p.detach().clone() for p in model.parameters()]]
        for _ in range(snapshots - 1):
            expert.append([t + 0.05 * torch.randn_like(t) for t in expert[-1]])
        experts.append(expert)
    return experts


def write_experts(buffer, experts=None, zca=False, meta=None):
    folder = expert_dir(buffer, "ImageFolder", MODEL, zca)
    save_expert_file(folder / "replay_buffer_0.pt", experts or random_walk_experts(), meta or {})
    return folder


def pad_argv(world, tmp, **overrides):
    settings = {
        "dataset": "ImageFolder", "data_path": world / "data", "model": MODEL,
        "buffer_path": tmp / "buffer", "out_dir": tmp / "out", "device": "cpu",
        "ipc": 2, "syn_steps": 3, "expert_epochs": 2, "max_start_epoch": 2,
        "Sequential_Generation": False, "Iteration": 4, "eval_it": 100, "epoch_eval_train": 2,
        "num_eval": 1, "batch_syn": 4, "batch_train": 4, "pix_init": "real", "zca": False,
        "lr_img": 10, "lr_y": 2, "depth_ratio": 0.5, "threshold": 10.0,
    }  # fmt: skip
    settings.update(overrides)
    return [token for key, value in settings.items() for token in (f"--{key}", str(value))]


def run_dir_of(tmp):
    return tmp / "out" / "ImageFolder" / "2" / MODEL / "ImageFolder-IPC2-depth-s42"


def buffer_argv(world, buffer, *extra):
    return [
        "--dataset", "ImageFolder", "--data_path", str(world / "data"), "--model", MODEL,
        "--buffer_path", str(buffer), "--train_epochs", "2", "--num_experts", "2",
        "--save_interval", "2", "--batch_train", "8", "--rho_max", "0.01", "--rho_min", "0.01",
        "--device", "cpu", "--test_every", "0", *extra,
    ]  # fmt: skip


# ---- 1. divergence -----------------------------------------------------------------------------


def test_diverging_experts_are_never_written(world, tmp_path):
    buffer = tmp_path / "buffer"
    args = buffer_CL.parse_args(buffer_argv(world, buffer, "--lr_teacher", "1e8"))
    with pytest.raises(UserError, match=r"expert training diverged at expert 0, epoch \d+: .*"
                       r"lower --lr_teacher \(now 1e\+08\)"):  # fmt: skip
        buffer_CL.main(args)
    folder = expert_dir(buffer, "ImageFolder", MODEL, False)
    assert not list(folder.glob("*.pt")) and not list(folder.glob(".*.pt"))
    # the advice is accepted: the same folder with a lower rate trains and writes the file
    buffer_CL.main(buffer_CL.parse_args(buffer_argv(world, buffer, "--lr_teacher", "0.01")))
    assert len(list_expert_files(folder)) == 1


def test_exploding_images_stop_the_distillation(world, tmp_path):
    write_experts(tmp_path / "buffer")
    expected = (
        r"distillation diverged at iteration 0: the synthetic images reach .* beyond the sane "
        r"bound 10000; .*--lr_img \(now 1e\+12\)"
    )
    with pytest.raises(UserError, match=expected):
        pad.main("depth", pad_argv(world, tmp_path, lr_img=1e12))
    normal = run_dir_of(tmp_path) / "Normal"
    saved = list(normal.glob("*.pt"))  # only the initial set of iteration 0's evaluation
    assert saved and all(load_pt(path).abs().max() < 1e4 for path in saved)
    with pytest.raises(UserError, match=r"soft labels reach .*--lr_y \(now 1e\+12\)"):
        pad.main("depth", pad_argv(world, tmp_path, lr_y=1e12, resume="true"))


def test_a_run_of_skipped_iterations_stops(world, tmp_path):
    write_experts(tmp_path / "buffer")
    with pytest.raises(UserError, match=r"diverged at iteration 2: 3 consecutive iterations "
                       r"skipped their update.*threshold"):  # fmt: skip
        pad.main("depth", pad_argv(world, tmp_path, threshold=1e-9, max_skipped=3))


def test_divergence_advice_is_accepted(world, tmp_path):
    write_experts(tmp_path / "buffer")
    with pytest.raises(UserError) as info:
        pad.main("depth", pad_argv(world, tmp_path, lr_teacher=1e6))
    message = str(info.value)
    assert "iteration 0" in message and "--lr_teacher (now 1e+06)" in message
    assert "--resume true" in message and "lr_img" not in message
    summary = pad.main("depth", pad_argv(world, tmp_path, lr_teacher=0.01, resume="true"))
    assert summary["next_iteration"] == 5
    with pytest.raises(UserError, match=r"lr_teacher=0.0: expected a learning rate > 0"):
        pad.main("depth", pad_argv(world, tmp_path / "b", lr_teacher=0))


def rank_difficulty_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "rank_difficulty", ROOT / "buffer" / "rank_difficulty.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


rank_difficulty = rank_difficulty_module()


def rank_argv(world, out, *extra):
    return [
        "--dataset", "ImageFolder", "--data_path", str(world / "data"), "--model", MODEL,
        "--epochs", "2", "--repeat", "1", "--batch", "8", "--lr", "0.01", "--device", "cpu",
        "--out", str(out), "--name", "tiny", *extra,
    ]  # fmt: skip


def test_diverging_difficulty_scores_stop_at_the_epoch(world, tmp_path):
    args = rank_difficulty.parse_args(rank_argv(world, tmp_path, "--lr", "1e12"))
    with pytest.raises(UserError, match=r"difficulty scoring diverged at repeat 0, epoch \d: .*"
                       r"--lr \(now 1e\+12\)"):  # fmt: skip
        rank_difficulty.main(args)
    assert not list(tmp_path.glob("tiny*"))
