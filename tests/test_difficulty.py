"""utils/difficulty.py: the curriculum (docs/algorithms.md#the-curriculum), index files and scores
(docs/algorithms.md#difficulty-scores-and-index-files)."""

import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from utils.difficulty import (
    curriculum_fraction,
    curriculum_indices,
    el2n_scores,
    grand_scores,
    load_index_file,
    rank_by_class,
    uncertainty_scores,
)
from utils.io import UserError
from utils.networks import get_network

README = dict(  # the README's buffer_CL command
    init_ratio=0.75,
    add_end_epoch=20,
    rm_epoch_first=40,
    rm_epoch_second=60,
    rm_easy_ratio_first=0.1,
    rm_easy_ratio_second=0.2,
)
EPOCHS = [0, 10, 20, 21, 40, 41, 60, 61, 99]
# images per class, by hand: 0.75 n; (0.75 + 0.25 * 10/20) n = 0.875 n; n (x4); n - 0.1 n (x2);
# n - 0.2 n (x2). For n = 500, 0.875 * 500 = 437.5 truncates to 437.
KEPT_5000 = [3750, 4375, 5000, 5000, 5000, 4500, 4500, 4000, 4000]
KEPT_500 = [375, 437, 500, 500, 500, 450, 450, 400, 400]
DROPPED_EASY = [0, 0, 0, 0, 0, 0.1, 0.1, 0.2, 0.2]


@pytest.mark.parametrize("n, kept", [(5000, KEPT_5000), (500, KEPT_500)])
def test_readme_schedule_images_per_class(n, kept):
    order = torch.arange(3 * n).view(3, n)
    for epoch, count, drop in zip(EPOCHS, kept, DROPPED_EASY, strict=True):
        chosen = curriculum_indices(order, epoch, **README)
        assert len(chosen) == 3 * count, epoch
        assert curriculum_fraction(epoch, **README)[0] == drop


def test_ramp_fractions_and_float64_truncation():
    assert curriculum_fraction(0, **README) == (0.0, 0.75)
    assert curriculum_fraction(10, **README) == (0.0, 0.875)
    # docs/algorithms.md#the-curriculum: epoch 1 keeps int(0.7625 * 5000) = int(3812.5) = 3812
    assert len(curriculum_indices(torch.zeros(1, 5000, dtype=torch.int64), 1, **README)) == 3812
    assert len(curriculum_indices(torch.zeros(1, 5000, dtype=torch.int64), 19, **README)) == 4937
    # 0.29 * 100 is 28.999999999999996 in float64: int() drops 28 images, not 29
    schedule = {**README, "rm_easy_ratio_first": 0.29}
    assert len(curriculum_indices(torch.zeros(1, 100, dtype=torch.int64), 41, **schedule)) == 72
    # the reference computes a + (1 - a) * e / b in that order: 450, where a + (1 - a) * (e / b)
    # would give int(449.99999999999994) = 449
    ramp = {**README, "init_ratio": 0.7, "add_end_epoch": 3}
    assert len(curriculum_indices(torch.zeros(1, 500, dtype=torch.int64), 2, **ramp)) == 450


def test_indices_are_the_slices_of_every_row():
    n = 40
    g = torch.Generator().manual_seed(0)
    order = torch.stack([torch.randperm(n, generator=g) + c * n for c in range(4)])
    expected_slices = {0: (0, 30), 10: (0, 35), 30: (0, 40), 50: (4, 40), 70: (8, 40)}
    for epoch, (start, stop) in expected_slices.items():
        chosen = curriculum_indices(order, epoch, **README)
        assert torch.equal(chosen, torch.cat([order[c, start:stop] for c in range(4)]))


def test_schedule_edge_cases():
    # add_end_epoch 0: the ramp is over at epoch 0
    assert curriculum_fraction(0, **{**README, "add_end_epoch": 0}) == (0.0, 1.0)
    # the reference's defaults (add_end 100 > rm_first 40): still ramping at epoch 50
    defaults = {**README, "init_ratio": 1.0, "add_end_epoch": 100, "rm_easy_ratio_second": 0.1}
    assert curriculum_fraction(50, **defaults) == (0.0, 1.0)
    assert curriculum_fraction(99, **{**defaults, "init_ratio": 0.5})[1] == 0.5 + 0.5 * 99 / 100
    with pytest.raises(UserError, match="keeps no image"):
        curriculum_indices(torch.zeros(2, 3, dtype=torch.int64), 0, **{**README, "init_ratio": 0.2})


@pytest.mark.parametrize(
    "change, flag",
    [
        ({"init_ratio": 0.0}, "init_ratio"),
        ({"init_ratio": 1.5}, "init_ratio"),
        ({"rm_epoch_first": 70}, "rm_epoch_first"),
        ({"rm_easy_ratio_first": 1.0}, "rm_easy_ratio_first"),
        ({"rm_easy_ratio_second": -0.1}, "rm_easy_ratio_second"),
        ({"add_end_epoch": -1}, "add_end_epoch"),
    ],
)
def test_bad_schedule_is_a_user_error(change, flag):
    with pytest.raises(UserError, match=flag):
        curriculum_fraction(0, **{**README, **change})


# ---------------------------------------------------------------------------------------------
# Index files

# 3 classes x 4 images, interleaved like torchvision's CIFAR order
LABELS = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2])


def good_order():
    scores = torch.tensor([5.0, 1, 3, 2, 2, 0, 9, 7, 1, 2, 0, 4])
    return rank_by_class(scores, LABELS)


def test_rank_by_class_is_ascending_and_breaks_ties_by_index():
    # class 0 = indices 0, 3, 6, 9 with scores 5, 2, 9, 2: ties (3 and 9) keep index order
    expected = torch.tensor([[3, 9, 0, 6], [10, 1, 4, 7], [5, 8, 2, 11]])
    assert torch.equal(good_order(), expected)
    assert good_order().dtype == torch.int64
    with pytest.raises(UserError, match="max_per_class=2"):
        rank_by_class(torch.zeros(5), torch.tensor([0, 0, 0, 1, 1]))


def test_load_accepts_bare_tensor_and_dict(tmp_path):
    order = good_order()
    torch.save(order, tmp_path / "bare.pt")
    torch.save({"indices": order, "method": "GraNd"}, tmp_path / "ours.pt")
    torch.save(order.to(torch.int32), tmp_path / "int32.pt")
    for name in ("bare.pt", "ours.pt", "int32.pt"):
        loaded = load_index_file(tmp_path / name, LABELS)
        assert torch.equal(loaded, order) and loaded.dtype == torch.int64


def swapped(order, a, b):
    order = order.clone()
    order[a], order[b] = order[b].clone(), order[a].clone()
    return order


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda o: o[:, :3], r"shape \[3, 3\].*12 images"),
        (lambda o: o[:2], r"shape \[2, 4\].*3 classes"),
        (lambda o: o.reshape(-1), "flat ordering"),
        (lambda o: o.float(), "float32"),
        (lambda o: torch.where(o == 11, 12, o), "index 12, outside.*0..11"),
        (lambda o: torch.where(o == 9, 3, o), "index 3 2 times"),
        (lambda o: swapped(o, (0, 0), (1, 0)), "row 0 holds images of class 0 .1 of 4"),
        (lambda o: torch.stack([o[1], o[0], o[2]]), "row 0 holds images of class 1"),
        (lambda o: {"scores": o}, "holds a dict"),
    ],
)
def test_load_refuses_mismatched_files(tmp_path, make, message):
    torch.save(make(good_order()), tmp_path / "bad.pt")
    with pytest.raises(UserError, match=message):
        load_index_file(tmp_path / "bad.pt", LABELS)


def test_load_refuses_other_image_order_and_missing_file(tmp_path):
    torch.save(good_order(), tmp_path / "idx.pt")
    class_sorted = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2])  # another image order
    with pytest.raises(UserError, match="another image order; make one with"):
        load_index_file(tmp_path / "idx.pt", class_sorted)
    with pytest.raises(UserError, match="not found"):
        load_index_file(tmp_path / "missing.pt", LABELS)


def test_load_checks_the_sidecar_when_given_a_data_set(tmp_path):
    torch.save(good_order(), tmp_path / "idx.pt")
    (tmp_path / "idx.json").write_text(json.dumps({"dataset": "ImageNet", "subset": "imagewoof"}))
    assert torch.equal(load_index_file(tmp_path / "idx.pt", LABELS), good_order())
    load_index_file(tmp_path / "idx.pt", LABELS, dataset="ImageNet", subset="imagewoof")
    with pytest.raises(UserError, match="subset imagewoof, not imagenette"):
        load_index_file(tmp_path / "idx.pt", LABELS, dataset="ImageNet", subset="imagenette")
    with pytest.raises(UserError, match="made for data set ImageNet, not CIFAR10"):
        load_index_file(tmp_path / "idx.pt", LABELS, dataset="CIFAR10")


# ---------------------------------------------------------------------------------------------
# Scores


def tiny_net_and_data(norm_bn=False):
    torch.manual_seed(0)
    name = "ConvNetBN" if norm_bn else "ConvNetW32"
    model = get_network(name, 3, 4, (8, 8))
    images = torch.randn(10, 3, 8, 8)
    labels = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3, 0, 1])
    return model, images, labels


@pytest.mark.parametrize("norm_bn", [False, True])
def test_grand_closed_form_equals_autograd_last_layer_gradient(norm_bn):
    model, images, labels = tiny_net_and_data(norm_bn)
    if norm_bn:  # non-trivial running statistics, and the model left in train mode
        with torch.no_grad():
            model(images * 2 + 1)
    scores = grand_scores(model, images, labels, batch=3)
    assert model.training  # mode restored
    model.eval()
    layer = model.classifier
    expected = []
    for x, y in zip(images, labels, strict=True):
        loss = F.cross_entropy(model(x.unsqueeze(0)), y.unsqueeze(0))
        gw, gb = torch.autograd.grad(loss, [layer.weight, layer.bias])
        expected.append(torch.sqrt(gw.square().sum() + gb.square().sum()))
    torch.testing.assert_close(scores, torch.stack(expected), rtol=1e-4, atol=1e-6)


def test_el2n_and_uncertainty_by_hand_and_batch_invariance():
    model, images, labels = tiny_net_and_data()
    with torch.no_grad():
        p = model.eval()(images).softmax(dim=1)
    model.train()
    onehot = F.one_hot(labels, 4).float()
    torch.testing.assert_close(el2n_scores(model, images, labels, 4), (p - onehot).norm(dim=1))
    least_confidence = 1 - p.max(dim=1).values
    torch.testing.assert_close(uncertainty_scores(model, images, labels, 4), least_confidence)
    # no batch-size factor: the final, smaller batch is scored like the others
    torch.testing.assert_close(grand_scores(model, images, labels, 3),
                               grand_scores(model, images, labels, 10))  # fmt: skip


def test_scores_need_a_last_linear():
    class NoClassifier(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, x):
            return self.fc(x)

    with pytest.raises(TypeError, match="classifier"):
        grand_scores(NoClassifier(), torch.randn(4, 3), torch.zeros(4, dtype=torch.int64))
