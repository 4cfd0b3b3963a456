"""buffer/rank_difficulty.py end to end on a tiny generated ImageFolder
(docs/algorithms.md#difficulty-scores-and-index-files)."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from utils.data import get_dataset
from utils.difficulty import load_index_file
from utils.io import UserError, load_json

SCRIPT = Path(__file__).resolve().parents[1] / "buffer" / "rank_difficulty.py"
spec = importlib.util.spec_from_file_location("rank_difficulty", SCRIPT)
rank_difficulty = importlib.util.module_from_spec(spec)
spec.loader.exec_module(rank_difficulty)

CLASSES, TRAIN_PER_CLASS, TEST_PER_CLASS = ["cat", "dog", "fox"], 8, 2


@pytest.fixture()
def image_folder(tmp_path, monkeypatch):
    """3 classes x 8 train (+2 test) 8x8 PNGs: a class colour plus noise."""
    rng = np.random.default_rng(0)
    for split, count in (("train", TRAIN_PER_CLASS), ("test", TEST_PER_CLASS)):
        for c, name in enumerate(CLASSES):
            folder = tmp_path / "data" / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 120, (8, 8, 3)) + np.eye(3, dtype=int)[c] * 120
                Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{i:02d}.png")
    monkeypatch.setenv("PAD_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path


def args_for(root, *extra):
    return rank_difficulty.parse_args([
        "--dataset", "ImageFolder", "--data_path", str(root / "data"), "--model", "ConvNetW32",
        "--epochs", "1", "--repeat", "2", "--batch", "8", "--lr", "0.01", "--device", "cpu",
        "--out", str(root / "out"), "--name", "tiny", *extra,
    ])  # fmt: skip


def test_smoke_run_writes_a_checked_index_file(image_folder):
    target = rank_difficulty.main(args_for(image_folder, "--max_per_class", "7"))
    out = image_folder / "out"
    assert target == out / "tiny.pt"
    assert not (out / ".tiny.partial").exists()
    labels = get_dataset("ImageFolder", str(image_folder / "data"), max_per_class=7).labels_train

    order = torch.load(target, weights_only=True)  # the authors' format: a bare tensor
    assert order.dtype == torch.int64 and order.shape == (3, 7)
    for c in range(3):  # each row: a permutation of class c's indices
        assert torch.equal(order[c].sort().values, torch.nonzero(labels == c).flatten())
    assert torch.equal(load_index_file(target, labels, dataset="ImageFolder"), order)

    saved = torch.load(out / "tiny.scores.pt", weights_only=True)
    scores, per_repeat = saved["scores"], saved["per_repeat"]
    assert per_repeat.shape == (2, 21) and not torch.equal(per_repeat[0], per_repeat[1])
    torch.testing.assert_close(scores, per_repeat.double().mean(dim=0))
    for c in range(3):  # rows sorted by mean score, easy (low) first
        assert (scores[order[c]].diff() >= 0).all()

    meta = load_json(out / "tiny.json")
    expected = {
        "dataset": "ImageFolder", "subset": None, "zca": False, "max_per_class": 7,
        "model": "ConvNetW32", "epochs": 1, "repeats": 2, "lr": 0.01, "batch": 8, "seed": 0,
        "method": "GraNd", "n_per_class": 7, "num_classes": 3, "num_train": 21,
        "seeds": [0, 5], "scores_file": "tiny.scores.pt", "momentum": 0.9, "nesterov": True,
    }  # fmt: skip
    assert {k: meta[k] for k in expected} == expected
    assert [run["repeat"] for run in meta["runs"]] == [0, 1]
    assert all(run["train_seconds"] >= 0 and run["reused"] is False for run in meta["runs"])

    with pytest.raises(UserError, match="exists: pass --overwrite"):
        rank_difficulty.main(args_for(image_folder, "--max_per_class", "7"))


def test_rerun_reuses_finished_repeats_of_the_same_configuration(image_folder, monkeypatch):
    real_train, calls = rank_difficulty.train, []

    def crash_on(call_number):
        def train(*args, **kwargs):
            calls.append(1)
            if len(calls) == call_number:
                raise RuntimeError("simulated crash")
            return real_train(*args, **kwargs)

        return train

    monkeypatch.setattr(rank_difficulty, "train", crash_on(2))
    with pytest.raises(RuntimeError, match="simulated crash"):  # dies in repeat 1
        rank_difficulty.main(args_for(image_folder))
    partial = image_folder / "out" / ".tiny.partial"
    (kept,) = partial.glob("repeat_0-*.pt")
    assert not (image_folder / "out" / "tiny.pt").exists()
    kept_scores = torch.load(kept, weights_only=True)["scores"]
    kept_mtime = kept.stat().st_mtime_ns

    calls.clear()  # another configuration (--lr) must not reuse it: it trains repeat 0 again
    monkeypatch.setattr(rank_difficulty, "train", crash_on(1))
    with pytest.raises(RuntimeError, match="simulated crash"):
        rank_difficulty.main(args_for(image_folder, "--lr", "0.02"))
    assert kept.stat().st_mtime_ns == kept_mtime

    calls.clear()  # the same command again: repeat 0 reused, only repeat 1 trained
    monkeypatch.setattr(rank_difficulty, "train", crash_on(0))
    rank_difficulty.main(args_for(image_folder))
    assert len(calls) == 1
    meta = load_json(image_folder / "out" / "tiny.json")
    assert [run["reused"] for run in meta["runs"]] == [True, False]
    saved = torch.load(image_folder / "out" / "tiny.scores.pt", weights_only=True)
    assert torch.equal(saved["per_repeat"][0], kept_scores)
    assert not partial.exists()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--method", "Forgetting"], "unknown --method 'Forgetting'"),
        (["--model", "ConvNetW33"], "unknown --model 'ConvNetW33'.*ConvNetW32"),
        (["--repeat", "0"], "--repeat=0"),
        (["--epochs", "-1"], "--epochs=-1"),
        (["--amp", "fp16"], "--amp='fp16'"),
        (["--momentum", "1.0"], "--momentum=1.0"),
        (["--name", "a/b"], "--name='a/b'"),
        (["--dataset", "CIFAR11"], "unknown data set 'CIFAR11'"),
    ],
)
def test_bad_input_is_a_user_error(image_folder, extra, message):
    with pytest.raises(UserError, match=message):
        rank_difficulty.main(args_for(image_folder, *extra))


def test_bad_input_exits_2_with_one_line(image_folder):
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--method", "Forgetting", "--out", str(image_folder)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: unknown --method 'Forgetting': expected one of GraNd, EL2N, Uncertainty"
    ]
