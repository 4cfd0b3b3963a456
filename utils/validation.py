"""The validation split: held-out training images that choose `images_best` instead of the test
set (docs/evaluation.md#validation-split).

`val_per_class: N` holds out the LAST N training images of every class (in the loader's order);
the training set is what remains, cut to its first `max_per_class` images per class when that is
set. The experts of `buffer_CL.py --max_per_class K` trained on the first K images per class, so
they never saw the held-out images as long as K <= class size - N; `check_experts_disjoint` reads
each expert file's sidecar and refuses experts that may have. Selection then follows the
validation accuracy (`update_best`); the test accuracy of the selected set is what gets reported.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from utils.io import UserError


@dataclass
class Split:
    """Where the train and validation images of a `Data` came from: positions in the loader's
    order of the whole training set (`source_labels`, int64 [N_all])."""

    val_per_class: int
    source_labels: Tensor = field(repr=False)
    train_positions: Tensor = field(repr=False)  # int64, ascending
    val_positions: Tensor = field(repr=False)  # int64, ascending


def first_per_class(labels: Tensor, num_classes: int, count: int | None) -> Tensor:
    """Positions of the first `count` images of every class (all of them for None), ascending."""
    keep = torch.zeros(len(labels), dtype=torch.bool)
    for c in range(num_classes):
        members = torch.nonzero(labels == c).flatten()
        keep[members if count is None else members[:count]] = True
    return torch.nonzero(keep).flatten()


def split_train_val(
    labels: Tensor, num_classes: int, val_per_class: int, max_per_class: int | None,
    class_names: Sequence[str],
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """(train positions, validation positions) in `labels`' order: the last `val_per_class` of
    every class are validation, the first `max_per_class` (None: all) of the rest are training."""
    if val_per_class < 0:
        raise UserError(f"val_per_class={val_per_class}: expected 0 (off) or a positive count")
    train, val = (
        torch.zeros(len(labels), dtype=torch.bool),
        torch.zeros(len(labels), dtype=torch.bool),
    )
    for c in range(num_classes):
        members = torch.nonzero(labels == c).flatten()
        if val_per_class >= len(members):
            raise UserError(
                f"val_per_class={val_per_class} but class {c} ({class_names[c]}) has only "
                f"{len(members)} train images: use val_per_class < {len(members)}"
            )
        rest = members[: len(members) - val_per_class]
        if max_per_class is not None and len(rest) < max_per_class:
            held = f" after val_per_class={val_per_class} are held out" if val_per_class else ""
            raise UserError(
                f"max_per_class={max_per_class} but class {c} ({class_names[c]}) has only "
                f"{len(rest)} train images{held}: use max_per_class <= {len(rest)}"
            )
        train[rest if max_per_class is None else rest[:max_per_class]] = True
        val[members[len(members) - val_per_class :]] = True
    return torch.nonzero(train).flatten(), torch.nonzero(val).flatten()


def check_experts_disjoint(
    sidecars: Sequence[tuple[os.PathLike, dict | None]], split: Split
) -> None:
    """Refuse experts that may have trained on a validation image. Each sidecar's settings record
    `max_per_class` K (the experts trained on the first K images per class; null: all of them,
    curricula only reorder or drop images of that set)."""
    num_classes = int(split.source_labels.max()) + 1
    val = set(split.val_positions.tolist())
    for path, meta in sidecars:
        settings = (meta or {}).get("settings")
        if not isinstance(settings, dict) or "max_per_class" not in settings:
            raise UserError(
                f"val_per_class={split.val_per_class} but {path} has no sidecar recording its "
                "training images (max_per_class), so it may have trained on the validation "
                "images: train experts with buffer_CL.py --max_per_class K, K <= class size - "
                "val_per_class, or set val_per_class 0"
            )
        count = settings["max_per_class"]
        seen = first_per_class(split.source_labels, num_classes, count)
        overlap = len(val.intersection(seen.tolist()))
        if overlap:
            trained = "all training images" if count is None else f"max_per_class={count}"
            raise UserError(
                f"val_per_class={split.val_per_class} overlaps the experts' training data: "
                f"{path} trained on {trained}, which includes {overlap} of the held-out images; "
                "train experts with a smaller --max_per_class (at most class size - "
                "val_per_class) or lower val_per_class"
            )


def update_best(
    best: dict | None, it: int, test_mean: float, test_std: float, val_mean: float | None
) -> tuple[dict, bool]:
    """The best evaluation so far after one more: by validation accuracy when `val_mean` is given
    (the split is on), else by test accuracy (the paper's rule). Returns (best, improved); `best`
    keeps the TEST accuracy of the chosen set under "mean"/"std", the reported number."""
    key = "mean" if val_mean is None else "val_mean"
    score = test_mean if val_mean is None else val_mean
    if best is not None and not score > best[key]:
        return best, False
    chosen = {"mean": test_mean, "std": test_std, "iteration": it}
    if val_mean is not None:
        chosen["val_mean"] = val_mean
    return chosen, True


def selections(evaluations: Sequence[tuple[int, float, float]]) -> dict[str, dict]:
    """From (iteration, test accuracy, validation accuracy) evaluations: the set chosen by
    validation and the one chosen by test, each with its iteration and test accuracy."""
    by_val = by_test = None
    for it, test_mean, val_mean in evaluations:
        by_val, _ = update_best(by_val, it, test_mean, 0.0, val_mean)
        by_test, _ = update_best(by_test, it, test_mean, 0.0, None)
    return {"by_validation": by_val, "by_test": by_test}
