"""The divergence guard of every stage that trains (docs/algorithms.md#divergence-guard).

A stage that diverges must stop with one line that names the stage, where it happened and the
setting to lower, and must never write what it diverged to. Three checks, each raising
`utils.io.UserError` (one line and exit 2 through `run_main`):

    check_finite(stage, where, advice, **values)         NaN or inf in a loss or a tensor
    check_bound(stage, where, advice, bound, **tensors)  a tensor beyond |x| <= bound (slow blow-up)
    SkipCounter(stage, limit, advice).update(skipped, where)
                                                         `limit` consecutive skipped updates

`values` are named tensors or floats; the name appears in the message (underscores become
spaces). `where` says where in the stage ("iteration 12", "expert 3, epoch 5"); `advice` is the
fix, phrased as a command the program then accepts ("lower --lr_teacher (now 1e+08)").
Example, after an optimizer step:

    check_finite("expert training", f"expert {k}, epoch {e}", "lower --lr_teacher (now 0.1)",
                 train_loss=loss, parameters=snapshot)

The checks read every element (`torch.isfinite(...).all()`), so call them once per update or per
epoch, not inside an inner loop.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import Tensor

from utils.io import UserError

Checked = float | int | Tensor | Iterable[Tensor]


def _tensors(value: Checked) -> list[Tensor]:
    if isinstance(value, Tensor):
        return [value.detach()]
    if isinstance(value, (float, int)):
        return [torch.tensor(float(value))]
    return [t.detach() for t in value]  # a list of tensors, e.g. a parameter snapshot


def _describe(label: str, value: Checked) -> str:
    if isinstance(value, (float, int)):
        return f"the {label} is {value}"
    tensors = _tensors(value)
    bad = sum(int((~torch.isfinite(t)).sum()) for t in tensors)
    total = sum(t.numel() for t in tensors)
    return f"{bad} of {total} values of the {label} are NaN or inf"


Advice = str | Callable[[], str]  # a callable is asked only when the check fails


def diverged(stage: str, where: str, what: str, advice: Advice) -> UserError:
    """The one-line error of a divergence: `<stage> diverged at <where>: <what>; <advice>`."""
    text = advice() if callable(advice) else advice
    return UserError(f"{stage} diverged at {where}: {what}; {text}")


def check_finite(stage: str, where: str, advice: Advice, **values: Checked) -> None:
    """UserError naming the first of `values` (floats, tensors or lists of tensors) that holds
    NaN or inf."""
    for name, value in values.items():
        if isinstance(value, (float, int)):
            finite = math.isfinite(value)
        else:
            finite = all(bool(torch.isfinite(t).all()) for t in _tensors(value))
        if not finite:
            label = name.replace("_", " ")
            raise diverged(stage, where, _describe(label, value), advice)


def check_bound(stage: str, where: str, advice: Advice, bound: float, **values: Checked) -> None:
    """UserError naming the first of `values` with an entry of magnitude above `bound` (NaN and
    inf count as above it)."""
    for name, value in values.items():
        largest = max(
            (float(t.abs().max()) if t.numel() else 0.0 for t in _tensors(value)), default=0.0
        )
        if not largest <= bound:  # also catches NaN
            label = name.replace("_", " ")
            what = f"the {label} reach |x| = {largest:.3g}, beyond the sane bound {bound:g}"
            raise diverged(stage, where, what, advice)


class SkipCounter:
    """Counts consecutive skipped updates; `limit` of them in a row is a divergence too (a run
    whose every update is refused learns nothing and would end with exit 0). limit None: never."""

    def __init__(self, stage: str, limit: int | None, advice: str, consecutive: int = 0) -> None:
        if limit is not None and limit < 1:
            raise UserError(f"max_skipped={limit}: expected at least 1 (or null for no limit)")
        self.stage, self.limit, self.advice = stage, limit, advice
        self.consecutive = consecutive

    def update(self, skipped: bool, where: str) -> None:
        self.consecutive = self.consecutive + 1 if skipped else 0
        if self.limit is not None and self.consecutive >= self.limit:
            what = f"{self.consecutive} consecutive iterations skipped their update"
            raise diverged(self.stage, where, what, self.advice)


def trailing_skips(skipped: Iterable[int | bool]) -> int:
    """How many of the last entries of a 0/1 history are skips (to resume a SkipCounter)."""
    count = 0
    for flag in reversed(list(skipped)):
        if not flag:
            break
        count += 1
    return count
