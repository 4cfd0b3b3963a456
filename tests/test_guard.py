"""utils/guard.py: the divergence checks every training stage uses."""

import pytest
import torch

from utils.guard import SkipCounter, check_bound, check_finite, trailing_skips
from utils.io import UserError


def test_check_finite_names_stage_place_value_and_advice():
    check_finite("s", "it 1", "lower x", loss=0.5, params=[torch.ones(3)])  # all finite: silent
    with pytest.raises(UserError) as info:
        parameters = [torch.ones(2), torch.tensor([1.0, float("nan")])]
        check_finite("expert training", "expert 2, epoch 0", "lower --lr_teacher (now 1e+08)",
                     train_loss=1.0, parameters=parameters)  # fmt: skip
    assert str(info.value) == (
        "expert training diverged at expert 2, epoch 0: 1 of 4 values of the parameters are NaN "
        "or inf; lower --lr_teacher (now 1e+08)"
    )
    with pytest.raises(UserError, match="the matching loss is inf; lower"):
        check_finite("d", "iteration 3", "lower", matching_loss=float("inf"))


def test_check_bound_catches_large_and_nan_entries():
    check_bound("d", "iteration 0", "lower", 1e4, images=torch.full((2,), 1e4))  # at the bound
    with pytest.raises(UserError, match=r"the images reach \|x\| = 2e\+09, beyond the sane bound"):
        check_bound("d", "iteration 0", "lower", 1e4, images=torch.tensor([1.0, -2e9]))
    with pytest.raises(UserError, match="labels reach"):
        check_bound("d", "iteration 0", "lower", 1e4, labels=torch.tensor([float("nan")]))


def test_skip_counter_stops_after_limit_consecutive_skips_only():
    counter = SkipCounter("distillation", 3, "raise threshold")
    for skipped in (True, True, False, True, True):  # never 3 in a row
        counter.update(skipped, "it")
    with pytest.raises(UserError, match="at iteration 5: 3 consecutive iterations skipped"):
        counter.update(True, "iteration 5")
    SkipCounter("d", None, "x", consecutive=10**6).update(True, "it")  # no limit
    with pytest.raises(UserError, match="max_skipped=0"):
        SkipCounter("d", 0, "x")
    assert (
        trailing_skips([1, 0, 1, 1]) == 2 and trailing_skips([]) == 0 and trailing_skips([0]) == 0
    )
