"""PAD's filter 1 for DC/DM (utils/filters.py): kept indices of a hand-made index file, the
rounding shared with buffer_CL, ratio 0 = the unfiltered pool, and the one-line errors."""

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from utils.difficulty import load_index_file
from utils.filters import check_filter, check_ipc_fits, class_pool, kept_rows, sample_class
from utils.io import UserError, save_pt

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "buffer"))
import buffer_CL  # noqa: E402

# 2 classes x 10 images, interleaved labels; rows list each class's images easy to hard
LABELS = torch.tensor([0, 1] * 10)
ORDER = torch.tensor(
    [
        [8, 2, 14, 0, 18, 6, 10, 4, 16, 12],
        [5, 19, 1, 11, 7, 3, 15, 9, 17, 13],
    ]
)


def test_remove_hard_keeps_the_easiest_rows_in_ascending_order():
    # int(0.25 * 10) = 2 hardest dropped per class
    pool = class_pool(LABELS, 2, ORDER, remove_hard=0.25)
    assert pool[0].tolist() == [0, 2, 4, 6, 8, 10, 14, 18]
    assert pool[1].tolist() == [1, 3, 5, 7, 9, 11, 15, 19]


def test_remove_easy_drops_the_first_of_every_row():
    # int(0.3 * 10) = int(3.0000000000000004) = 3 easiest dropped
    pool = class_pool(LABELS, 2, ORDER, remove_easy=0.3)
    assert pool[0].tolist() == [0, 4, 6, 10, 12, 16, 18]  # 8, 2, 14 dropped
    assert pool[1].tolist() == [3, 7, 9, 11, 13, 15, 17]  # 5, 19, 1 dropped
    assert kept_rows(ORDER, remove_easy=0.3).tolist() == ORDER[:, 3:].tolist()


def test_ratio_zero_is_the_unfiltered_pool():
    plain = class_pool(LABELS, 2)
    for kwargs in ({}, {"remove_easy": 0.0}, {"remove_hard": 0.0}):
        filtered = class_pool(LABELS, 2, ORDER, **kwargs)
        for a, b in zip(plain, filtered, strict=True):
            assert torch.equal(a, b) and a.dtype == torch.int64
    assert plain[0].tolist() == list(range(0, 20, 2))


@pytest.mark.parametrize("ratio", [0.05, 0.1, 0.29, 0.3, 0.5, 0.7, 0.99])
@pytest.mark.parametrize("key", ["remove_easy", "remove_hard"])
def test_same_images_as_buffer_cl(ratio, key):
    n = 100  # int(0.29 * 100) = 28: truncation of the float product, in both places
    labels = torch.arange(3).repeat(n)
    order = torch.stack([torch.nonzero(labels == c).flatten().flip(0) for c in range(3)])
    args = SimpleNamespace(**{"remove_easy": 0.0, "remove_hard": 0.0, key: ratio})
    expected, _ = buffer_CL.epoch_indices(order, 0, args, len(labels))
    pool = class_pool(labels, 3, order, **{key: ratio})
    assert sorted(torch.cat(pool).tolist()) == sorted(expected.tolist())


def test_sample_class_draws_distinct_members_and_caps_at_the_class():
    members = torch.tensor([3, 5, 7, 9])
    g = torch.Generator().manual_seed(0)
    batch = sample_class(members, 3, generator=g)
    assert len(set(batch.tolist())) == 3 and set(batch.tolist()) <= {3, 5, 7, 9}
    whole = sample_class(members, 256, generator=g)
    assert sorted(whole.tolist()) == [3, 5, 7, 9]


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: check_filter(1.0, 0.0, "x"), "remove_easy=1.0 is outside [0, 1)"),
        (lambda: check_filter(0.0, -0.1, "x"), "remove_hard=-0.1 is outside [0, 1)"),
        (lambda: check_filter(0.1, 0.2, "x"), "not both"),
        (lambda: check_filter(0.1, 0.0, None), "need a difficulty index file"),
        (lambda: class_pool(LABELS, 2, None, remove_hard=0.1), "need a difficulty index file"),
        (lambda: class_pool(LABELS, 2, ORDER, remove_easy=0.1, remove_hard=0.1), "not both"),
        (
            lambda: check_ipc_fits(
                9, class_pool(LABELS, 2, ORDER, remove_hard=0.2), remove_hard=0.2
            ),
            "class 0 keeps only 8",
        ),  # fmt: skip
        (lambda: check_ipc_fits(0, class_pool(LABELS, 2)), "ipc=0"),
    ],
)
def test_bad_settings_are_one_line_user_errors(call, message):
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace(")", r"\)")) as err:
        call()
    assert "\n" not in str(err.value)


def test_ipc_that_fits_passes():
    check_ipc_fits(8, class_pool(LABELS, 2, ORDER, remove_hard=0.2), remove_hard=0.2)


def test_an_index_file_of_another_data_set_is_refused(tmp_path):
    path = tmp_path / "CIFAR10_GraNd.pt"
    save_pt(ORDER[:, :5], path)  # 10 images, but the train set has 20
    with pytest.raises(UserError, match="made for another data set") as err:
        load_index_file(path, LABELS, dataset="CIFAR10")
    assert "\n" not in str(err.value)
    save_pt(ORDER, path)
    assert torch.equal(load_index_file(path, LABELS, dataset="CIFAR10"), ORDER)
