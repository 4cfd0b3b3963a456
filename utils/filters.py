"""PAD's first filter for gradient and distribution matching: which real images the matching sees.

A difficulty index file (utils/difficulty.py) lists each class's train indices easy to hard.
`remove_hard: r` keeps the first n - int(r * n) of every row, `remove_easy: r` drops the first
int(r * n); the rounding is buffer/buffer_CL.py's (`int` truncation of the float product), so
the same ratio removes the same images from an expert's data and from the matching's. The choice
is made once, per class, for the whole run (no schedule).

The kept images of every class are returned in ascending index order, whatever the filter: the
difficulty order decides only which images are kept, and with ratio 0 the pool is exactly the
unfiltered per-class list, so every random draw, hence the whole run, is the plain method's.

    pool = class_pool(labels_train, num_classes, order, remove_hard=0.1)   # list of [n_c] int64
    check_ipc_fits(ipc, pool, remove_easy=0.0, remove_hard=0.1)
    idx = sample_class(pool[c], batch_real, generator=g)                   # train indices
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from utils.io import UserError


def check_ratio(key: str, value: float) -> None:
    """UserError unless value is a fraction in [0, 1)."""
    if not 0.0 <= value < 1.0:
        raise UserError(f"{key}={value} is outside [0, 1): expected a fraction like 0.1 (0: off)")


def _check_ratios(remove_easy: float, remove_hard: float) -> None:
    check_ratio("remove_easy", remove_easy)
    check_ratio("remove_hard", remove_hard)
    if remove_easy and remove_hard:
        raise UserError(
            f"remove_easy={remove_easy} and remove_hard={remove_hard}: give one of them, not both"
        )


def check_filter(remove_easy: float, remove_hard: float, sort_method: str | None) -> None:
    """UserError for a filter-1 setting that cannot run (checked before any data is read)."""
    _check_ratios(remove_easy, remove_hard)
    if (remove_easy or remove_hard) and not sort_method:
        raise UserError(
            "remove_easy/remove_hard need a difficulty index file: set sort_method (a name in "
            "data_indices/ or a .pt path, made by buffer/rank_difficulty.py)"
        )


def kept_rows(order: Tensor, *, remove_easy: float = 0.0, remove_hard: float = 0.0) -> Tensor:
    """order [C, n] (easy to hard) -> the kept columns [C, n_kept], still easy to hard."""
    _check_ratios(remove_easy, remove_hard)
    n = order.shape[1]
    if remove_easy:
        return order[:, int(remove_easy * n) :]
    if remove_hard:
        return order[:, : n - int(remove_hard * n)]
    return order


def class_pool(
    labels_train: Tensor,
    num_classes: int,
    order: Tensor | None = None,
    *,
    remove_easy: float = 0.0,
    remove_hard: float = 0.0,
) -> list[Tensor]:
    """Per class, the ascending int64 train indices the matching may draw from (CPU).

    `order` is the index file as `load_index_file` returns it (checked against the train set);
    None is allowed only without a filter."""
    if order is None:
        check_filter(remove_easy, remove_hard, sort_method=None)
    else:
        _check_ratios(remove_easy, remove_hard)
    labels = labels_train.to("cpu", torch.int64)
    if order is None or not (remove_easy or remove_hard):
        return [torch.nonzero(labels == c).flatten() for c in range(num_classes)]
    if order.shape[0] != num_classes:
        raise UserError(
            f"the index file has {order.shape[0]} rows but the data set has {num_classes} classes"
        )
    kept = kept_rows(order.to(torch.int64), remove_easy=remove_easy, remove_hard=remove_hard)
    return [torch.sort(row).values for row in kept]


def check_ipc_fits(
    ipc: int, pool: Sequence[Tensor], *, remove_easy: float = 0.0, remove_hard: float = 0.0
) -> None:
    """UserError unless every class keeps at least ipc images (the real initialisation needs
    ipc distinct ones)."""
    if ipc < 1:
        raise UserError(f"ipc={ipc}: expected at least 1 image per class")
    smallest = min(range(len(pool)), key=lambda c: len(pool[c]))
    kept = len(pool[smallest])
    if kept < ipc:
        filtered = (
            f" after remove_easy={remove_easy} / remove_hard={remove_hard}"
            if remove_easy or remove_hard
            else ""
        )
        raise UserError(
            f"ipc={ipc} but class {smallest} keeps only {kept} train images{filtered}: use "
            f"ipc <= {kept} or a smaller ratio"
        )


def sample_class(members: Tensor, n: int, *, generator: torch.Generator) -> Tensor:
    """min(n, len(members)) distinct members in random order: a larger batch takes the class."""
    return members[torch.randperm(len(members), generator=generator)[:n]]
