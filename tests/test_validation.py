"""The validation split (utils/validation.py) and selection by validation in distill/pad.py."""

import json
import re
import sys

import pytest
import torch
import yaml
from conftest import make_color_image_folder  # noqa: E402

from distill import pad
from utils.data import get_dataset
from utils.io import UserError, load_pt
from utils.networks import get_network
from utils.trajectory import expert_dir, save_expert_file
from utils.validation import (
    Split,
    check_experts_disjoint,
    selections,
    split_train_val,
    update_best,
)

MODEL, SIZE, CLASSES, PER_CLASS = "ConvNetW32", 16, 3, 8
NAMES = ["a", "b", "c"]


def interleaved_labels():
    """Classes 0, 1, 2 interleaved with 5, 6 and 7 images (loader order)."""
    labels = [0, 1, 2] * 5 + [1, 2, 2]
    return torch.tensor(labels)


def test_the_last_images_of_every_class_are_held_out():
    labels = interleaved_labels()
    train, val = split_train_val(labels, 3, 2, None, NAMES)
    for c in range(3):
        members = torch.nonzero(labels == c).flatten().tolist()
        assert val[labels[val] == c].tolist() == members[-2:]
        assert train[labels[train] == c].tolist() == members[:-2]
    assert not set(train.tolist()) & set(val.tolist())
    # max_per_class cuts the rest to its first images; the held-out images do not move
    train3, val3 = split_train_val(labels, 3, 2, 3, NAMES)
    assert torch.equal(val3, val)
    assert [int((labels[train3] == c).sum()) for c in range(3)] == [3, 3, 3]
    assert all(p in train.tolist() for p in train3.tolist())


def test_val_per_class_zero_is_the_first_per_class_rule():
    labels = interleaved_labels()
    train, val = split_train_val(labels, 3, 0, 4, NAMES)
    assert len(val) == 0
    expected = sorted(
        p for c in range(3) for p in torch.nonzero(labels == c).flatten()[:4].tolist()
    )
    assert train.tolist() == expected


@pytest.mark.parametrize(
    "val, max_per_class, message",
    [
        (
            5,
            None,
            r"val_per_class=5 but class 0 \(a\) has only 5 train images: use val_per_class < 5",
        ),
        (2, 4, r"max_per_class=4 but class 0 \(a\) has only 3 train images after val_per_class=2"),
        (-1, None, r"val_per_class=-1: expected 0 \(off\)"),
    ],
)
def test_split_errors(val, max_per_class, message):
    with pytest.raises(UserError, match=message):
        split_train_val(interleaved_labels(), 3, val, max_per_class, NAMES)


def experts_training_positions(labels, max_per_class):
    """An independent account of buffer_CL.py --max_per_class K: the first K of each class."""
    seen, positions = {}, set()
    for position, label in enumerate(labels.tolist()):
        seen[label] = seen.get(label, 0) + 1
        if max_per_class is None or seen[label] <= max_per_class:
            positions.add(position)
    return positions


def test_the_split_never_overlaps_experts_that_pass_the_check():
    labels = interleaved_labels()
    for val_per_class in (1, 2, 3):
        train, val = split_train_val(labels, 3, val_per_class, None, NAMES)
        split = Split(val_per_class, labels, train, val)
        for k in (None, 1, 2, 3, 4, 5, 6, 7):
            sidecar = ("replay_buffer_0.pt", {"settings": {"max_per_class": k}})
            overlaps = bool(experts_training_positions(labels, k) & set(val.tolist()))
            if overlaps:
                with pytest.raises(UserError, match="overlaps the experts' training data"):
                    check_experts_disjoint([sidecar], split)
            else:
                check_experts_disjoint([sidecar], split)
            # class 0 has 5 images: K <= 5 - val_per_class is the documented rule
            assert overlaps == (k is None or k > 5 - val_per_class)


def test_experts_without_a_sidecar_are_refused():
    labels = interleaved_labels()
    train, val = split_train_val(labels, 3, 1, None, NAMES)
    with pytest.raises(UserError, match="has no sidecar recording its training images"):
        check_experts_disjoint([("authors.pt", None)], Split(1, labels, train, val))


def test_selection_by_validation_is_not_selection_by_test():
    # made-up evaluations (iteration, test %, validation %): the test set would pick it 20,
    # validation picks it 30; a later tie in validation keeps the earlier set
    evaluations = [(0, 20.0, 25.0), (10, 28.0, 27.0), (20, 35.0, 26.0), (30, 31.0, 33.0),
                   (40, 30.0, 33.0)]  # fmt: skip
    best, improved_at = None, []
    for it, test, val in evaluations:
        best, improved = update_best(best, it, test, 1.0, val)
        if improved:
            improved_at.append(it)
    assert improved_at == [0, 10, 30]
    assert best == {"mean": 31.0, "std": 1.0, "iteration": 30, "val_mean": 33.0}
    chosen = selections(evaluations)
    assert chosen["by_validation"]["iteration"] == 30 and chosen["by_validation"]["mean"] == 31.0
    assert chosen["by_test"]["iteration"] == 20 and chosen["by_test"]["mean"] == 35.0
    # without a validation accuracy: the paper's rule, by test
    best = None
    for it, test, _ in evaluations:
        best, _ = update_best(best, it, test, 0.0, None)
    assert best["iteration"] == 20 and "val_mean" not in best


# ---- distill/pad.py end to end ----------------------------------------------------------------


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    make_color_image_folder(root / "data", CLASSES, SIZE, {"train": PER_CLASS, "test": 4})
    return root


@pytest.fixture(autouse=True)
def cache_dir(world, monkeypatch, one_thread):
    monkeypatch.setenv("PAD_CACHE_DIR", str(world / "cache"))


def write_experts(buffer, max_per_class):
    torch.manual_seed(0)
    experts = []
    for _ in range(2):
        model = get_network(MODEL, 3, CLASSES, (SIZE, SIZE))
        expert = [[p.detach().clone() for p in model.parameters()]]
        for _ in range(3):
            expert.append([t + 0.05 * torch.randn_like(t) for t in expert[-1]])
        experts.append(expert)
    folder = expert_dir(buffer, "ImageFolder", MODEL, True)
    save_expert_file(folder / "replay_buffer_0.pt", experts,
                     {"settings": {"max_per_class": max_per_class}})  # fmt: skip


def argv(world, tmp, **overrides):
    settings = {
        "dataset": "ImageFolder", "data_path": world / "data", "model": MODEL,
        "buffer_path": tmp / "buffer", "out_dir": tmp / "out", "device": "cpu",
        "ipc": 2, "syn_steps": 2, "expert_epochs": 2, "max_start_epoch": 1,
        "Sequential_Generation": False, "Iteration": 2, "eval_it": 1, "epoch_eval_train": 2,
        "num_eval": 1, "batch_syn": 4, "batch_train": 4, "pix_init": "real", "zca": True,
        "lr_img": 10, "lr_y": 2, "depth_ratio": 0.5, "threshold": 10.0, "val_per_class": 2,
    }  # fmt: skip
    settings.update(overrides)
    return [token for key, value in settings.items() for token in (f"--{key}", str(value))]


def test_distillation_selects_by_validation_and_keeps_the_split_out(world, tmp_path, capsys):
    write_experts(tmp_path / "buffer", max_per_class=6)  # 8 per class - 2 held out
    summary = pad.main("depth", argv(world, tmp_path))
    run_dir = summary["run_dir"]
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["val_per_class"] == 2
    data = get_dataset("ImageFolder", str(world / "data"), zca=True, val_per_class=2)
    everything = get_dataset("ImageFolder", str(world / "data"), zca=True)
    assert len(data.labels_val) == 6 and len(data.labels_train) == 18
    initial = load_pt(run_dir / "Normal" / "images_0.pt")  # saved before the first update
    for image in initial:  # every initial image is a train image, none a held-out one
        assert (data.images_train == image).flatten(1).all(1).sum() == 1
        assert not (data.images_val == image).flatten(1).all(1).any()
    # the held-out images are the last 2 of each class of the whole set
    for c in range(CLASSES):
        members = torch.nonzero(everything.labels_train == c).flatten()[-2:]
        assert torch.equal(data.images_val[data.labels_val == c], everything.images_train[members])
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evaluations = [(r["step"], r[f"accuracy/{MODEL}"], r[f"val_accuracy/{MODEL}"])
                   for r in records if f"val_accuracy/{MODEL}" in r]  # fmt: skip
    assert [it for it, _, _ in evaluations] == [0, 1, 2]
    expected = selections(evaluations)["by_validation"]
    assert summary["best"][MODEL]["iteration"] == expected["iteration"]
    assert summary["best"][MODEL]["mean"] == expected["mean"]
    chosen = json.loads((run_dir / "selection.json").read_text())[MODEL]
    assert chosen["by_validation"]["iteration"] == expected["iteration"]
    out = capsys.readouterr().out
    assert "selected by validation: it" in out and "selected by test: it" in out
    # images_best is the set of the chosen iteration
    best_it = expected["iteration"]
    assert torch.equal(load_pt(run_dir / "Normal" / "images_best.pt"),
                       load_pt(run_dir / "Normal" / f"images_{best_it}.pt"))  # fmt: skip


@pytest.mark.parametrize(
    "max_per_class, overrides, message",
    [
        (
            7,
            {},
            r"error: val_per_class=2 overlaps the experts' training data: .*replay_buffer_0"
            r".pt trained on max_per_class=7, which includes 3 of the held-out images",
        ),
        (None, {}, r"error: val_per_class=2 overlaps .* trained on all training images"),
        (
            6,
            {"val_per_class": 8},
            r"error: val_per_class=8 but class 0 \(class0\) has only 8 train images",
        ),
    ],
)
def test_bad_validation_settings_exit_2(world, tmp_path, monkeypatch, capsys, max_per_class,
                                        overrides, message):  # fmt: skip
    write_experts(tmp_path / "buffer", max_per_class=max_per_class)
    monkeypatch.setattr(sys, "argv", ["PAD_depth.py", *argv(world, tmp_path, **overrides)])
    with pytest.raises(SystemExit) as exit_info:
        pad.run("depth")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert re.match(message, err[0]), err
