"""Difficulty scores, per-class easy-to-hard index files and the curriculum
(docs/algorithms.md#difficulty-scores-and-index-files, docs/algorithms.md#the-curriculum).

An index file is an int64 tensor [num_classes, n_per_class]: row c lists the train-set indices
(positions in the loader's order) of the images of class c, easiest first. `rank_by_class` makes
one from per-image scores, `load_index_file` checks one against the data set it is used with, and
`curriculum_indices` picks the images an expert trains on in a given epoch.

The scores (model in eval mode, no augmentation, per image, batched):
- GraNd: norm of the gradient of the image's cross-entropy w.r.t. the last Linear layer
  (weight and bias), in closed form |p - y| * sqrt(1 + |h|^2) with h the layer's input;
- EL2N: |p - y|, the L2 norm of the error of the softmax output;
- Uncertainty: least confidence, 1 - max_k p_k.
Low scores are easy: ascending order is easy to hard for all three.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from utils.io import UserError, load_json, load_pt
from utils.networks import last_linear

METHODS = ("GraNd", "EL2N", "Uncertainty")


# ---------------------------------------------------------------------------------------------
# Curriculum (docs/algorithms.md#the-curriculum)


def validate_curriculum(
    *,
    init_ratio: float,
    add_end_epoch: int,
    rm_epoch_first: int,
    rm_epoch_second: int,
    rm_easy_ratio_first: float,
    rm_easy_ratio_second: float,
) -> None:
    """UserError naming the flag when a schedule setting makes no sense."""
    if not 0 < init_ratio <= 1:
        raise UserError(
            f"--init_ratio={init_ratio}: expected a fraction in (0, 1], the share of the easiest "
            "images of each class used in epoch 0 (1 = all)"
        )
    if add_end_epoch < 0:
        raise UserError(f"--add_end_epoch={add_end_epoch}: expected an epoch >= 0")
    if rm_epoch_first > rm_epoch_second:
        raise UserError(
            f"--rm_epoch_first={rm_epoch_first} > --rm_epoch_second={rm_epoch_second}: the first "
            "removal phase must start no later than the second"
        )
    for flag, ratio in (
        ("rm_easy_ratio_first", rm_easy_ratio_first),
        ("rm_easy_ratio_second", rm_easy_ratio_second),
    ):
        if not 0 <= ratio < 1:
            raise UserError(
                f"--{flag}={ratio}: expected a fraction in [0, 1), the share of the easiest images "
                "of each class removed in that phase"
            )


def curriculum_fraction(epoch: int, **schedule: float) -> tuple[float, float]:
    """(drop_easy, keep_upto): epoch `epoch` (0-based) trains on the fractions
    [drop_easy, keep_upto) of every class's easy-to-hard row (docs/algorithms.md#the-curriculum).
    `schedule` holds the keywords of `validate_curriculum`."""
    validate_curriculum(**schedule)
    init_ratio, add_end_epoch = schedule["init_ratio"], schedule["add_end_epoch"]
    if epoch < 0:
        raise ValueError(f"epoch must be >= 0, got {epoch}")
    if epoch <= add_end_epoch:
        if add_end_epoch == 0:  # the ramp ends where it starts: everything from epoch 0
            return 0.0, 1.0
        # the reference's operation order, so int(p * n) truncates the same float64 value
        return 0.0, min(1.0, init_ratio + (1 - init_ratio) * epoch / add_end_epoch)
    if epoch <= schedule["rm_epoch_first"]:
        return 0.0, 1.0
    if epoch <= schedule["rm_epoch_second"]:
        return float(schedule["rm_easy_ratio_first"]), 1.0
    return float(schedule["rm_easy_ratio_second"]), 1.0


def curriculum_indices(order: Tensor, epoch: int, **schedule: float) -> Tensor:
    """The train indices of epoch `epoch`: order[:, int(drop * n) : int(keep * n)], flattened
    class by class, with n = order.shape[1] (the reference's fixed 5000 is a bug)."""
    drop, keep = curriculum_fraction(epoch, **schedule)
    n = order.shape[1]
    start, stop = int(drop * n), int(keep * n)
    if stop <= start:
        raise UserError(
            f"epoch {epoch} of the curriculum keeps no image: {n} images per class and the "
            f"fractions [{drop}, {keep}) select int({keep} * {n}) = {stop}; raise --init_ratio"
        )
    return order[:, start:stop].reshape(-1)


# ---------------------------------------------------------------------------------------------
# Index files (docs/formats.md#index-files)


def rank_by_class(scores: Tensor, labels: Tensor, num_classes: int | None = None) -> Tensor:
    """int64 [C, n]: per class, its train indices by ascending score (stable: ties by index)."""
    if not torch.isfinite(scores).all():
        raise ValueError("scores contain NaN or inf")
    labels = labels.cpu()
    num_classes = int(labels.max()) + 1 if num_classes is None else num_classes
    counts = torch.bincount(labels, minlength=num_classes)
    if (counts != counts[0]).any():
        c = int(torch.nonzero(counts != counts[0])[0])
        raise UserError(
            f"class {c} has {int(counts[c])} train images and class 0 has {int(counts[0])}: a "
            f"per-class index file needs equal counts; use max_per_class={int(counts.min())}"
        )
    scores = scores.cpu()
    rows = []
    for c in range(num_classes):
        # ascending members and a stable sort: ties keep index order
        members = torch.nonzero(labels == c).flatten()
        rows.append(members[torch.argsort(scores[members], stable=True)])
    return torch.stack(rows)


def load_index_file(
    path: str | os.PathLike,
    train_labels: Tensor,
    *,
    dataset: str | None = None,
    subset: str | None = None,
) -> Tensor:
    """Read an index file (ours or the authors': a bare int64 tensor [C, n], or a dict holding
    one under "indices") and check it against the train labels it will index
    (docs/formats.md#index-files).

    Given `dataset` (and `subset` for ImageNet), the file's .json sidecar, when there is one,
    must name the same data set.
    """
    path = Path(path)
    content = load_pt(path, what="difficulty index file")
    order = content.get("indices") if isinstance(content, dict) else content
    flags = f"--dataset {dataset or '<DATASET>'}"
    if dataset == "ImageNet" and subset:
        flags += f" --subset {subset}"
    make = f"make one with python buffer/rank_difficulty.py {flags}"
    if not isinstance(order, Tensor):
        raise UserError(
            f"{path} holds a {type(content).__name__}, not an index tensor [classes, images per "
            f"class]; {make}"
        )
    if order.dtype.is_floating_point or order.dtype.is_complex or order.dtype == torch.bool:
        raise UserError(f"{path} holds {order.dtype} values, expected integer indices; {make}")
    if order.dim() != 2:
        hint = " (a flat ordering like the authors' CIFAR10_ConvNet.pt)" if order.dim() == 1 else ""
        raise UserError(
            f"{path} has shape {list(order.shape)}{hint}, expected per-class rows "
            f"[classes, images per class]; {make}"
        )
    order = order.to(torch.int64)
    labels = train_labels.to("cpu", torch.int64)
    _check_indices(path, order, labels, make)
    if dataset is not None:
        _check_sidecar(path, dataset, subset, make)
    return order.contiguous()


def _check_indices(path: Path, order: Tensor, labels: Tensor, make: str) -> None:
    num_train = len(labels)
    num_classes = int(labels.max()) + 1 if num_train else 0
    rows, n = order.shape
    per_class = torch.bincount(labels, minlength=num_classes).tolist()
    counts = f"{per_class[0]} per class" if len(set(per_class)) == 1 else f"per class {per_class}"
    if rows != num_classes or rows * n != num_train:
        raise UserError(
            f"{path} has shape [{rows}, {n}] but the train set has {num_classes} classes and "
            f"{num_train} images ({counts}): the file was made for another data set or another "
            f"max_per_class; {make}"
        )
    low, high = int(order.min()), int(order.max())
    if low < 0 or high >= num_train:
        bad = low if low < 0 else high
        raise UserError(
            f"{path} holds index {bad}, outside the train set's range 0..{num_train - 1}: the "
            f"file was made for another data set; {make}"
        )
    seen = torch.bincount(order.reshape(-1), minlength=num_train)
    if (seen > 1).any():
        index = int(torch.nonzero(seen > 1)[0])
        raise UserError(
            f"{path} lists train index {index} {int(seen[index])} times (every image must appear "
            f"exactly once): the file is damaged; {make}"
        )
    row_labels = labels[order]  # [C, n]
    wrong = row_labels != torch.arange(rows).unsqueeze(1)
    if wrong.any():
        c = int(torch.nonzero(wrong.any(dim=1))[0])
        found = int(torch.mode(row_labels[c]).values)
        raise UserError(
            f"{path}: row {c} holds images of class {found} ({int(wrong[c].sum())} of {n} are "
            f"not class {c}): the index file was made for another data set or another image "
            f"order; {make}"
        )


def _check_sidecar(path: Path, dataset: str, subset: str | None, make: str) -> None:
    sidecar = path.with_suffix(".json")
    if not sidecar.exists():
        return  # the authors' files have none
    meta = load_json(sidecar, what="index file sidecar")
    made_for = meta.get("dataset")
    if made_for is not None and made_for != dataset:
        raise UserError(f"{path} was made for data set {made_for}, not {dataset}; {make}")
    made_subset = meta.get("subset")
    if dataset == "ImageNet" and made_subset is not None and subset and made_subset != subset:
        raise UserError(f"{path} was made for ImageNet subset {made_subset}, not {subset}; {make}")


# ---------------------------------------------------------------------------------------------
# Scores (docs/algorithms.md#grand-el2n-and-uncertainty)


def grand_scores(model: nn.Module, images: Tensor, labels: Tensor, batch: int = 256) -> Tensor:
    """GraNd: per image, the L2 norm of d CE / d (last Linear's weight and bias), closed form
    |p - y| * sqrt(1 + |h|^2); no batch-size factor (DeepCore's batch-mean artefact dropped)."""

    def score(logits: Tensor, y: Tensor, embedding: Tensor) -> Tensor:
        error = _softmax_error(logits, y).norm(dim=1)
        return error * torch.sqrt(1 + embedding.square().sum(dim=1))

    return _scores(model, images, labels, batch, score, with_embedding=True)


def el2n_scores(model: nn.Module, images: Tensor, labels: Tensor, batch: int = 256) -> Tensor:
    """EL2N: per image, |p - y|, the L2 norm of the softmax output's error."""
    return _scores(model, images, labels, batch, lambda z, y, _: _softmax_error(z, y).norm(dim=1))


def uncertainty_scores(
    model: nn.Module, images: Tensor, labels: Tensor, batch: int = 256
) -> Tensor:
    """Uncertainty as least confidence: per image, 1 - max_k p_k (labels unused)."""
    return _scores(model, images, labels, batch, lambda z, y, _: 1 - z.softmax(dim=1).amax(dim=1))


SCORE_FUNCTIONS: dict[str, Callable[[nn.Module, Tensor, Tensor, int], Tensor]] = {
    "GraNd": grand_scores,
    "EL2N": el2n_scores,
    "Uncertainty": uncertainty_scores,
}


def _softmax_error(logits: Tensor, labels: Tensor) -> Tensor:
    """p - y: the gradient of the cross-entropy w.r.t. the logits, per image."""
    return logits.softmax(dim=1) - F.one_hot(labels, logits.shape[1]).to(logits.dtype)


def _scores(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    batch: int,
    score: Callable[[Tensor, Tensor, Tensor | None], Tensor],
    *,
    with_embedding: bool = False,
) -> Tensor:
    """float32 [N] on the CPU: `score(logits, labels, embedding)` batch by batch, model in eval
    mode (BatchNorm on running statistics), no gradients; the model's mode is restored."""
    if batch < 1:
        raise UserError(f"batch={batch}: expected at least 1 image per batch")
    device = next(model.parameters()).device
    embeddings: list[Tensor] = []
    hook = None
    if with_embedding:
        hook = last_linear(model).register_forward_hook(
            lambda module, inputs, output: embeddings.append(inputs[0])
        )
    was_training = model.training
    model.eval()
    out = torch.empty(len(images), dtype=torch.float32)
    try:
        with torch.no_grad():
            for start in range(0, len(images), batch):
                x = images[start : start + batch].to(device)
                y = labels[start : start + batch].to(device)
                logits = model(x).float()
                embedding = embeddings.pop().flatten(1).float() if with_embedding else None
                out[start : start + len(x)] = score(logits, y, embedding).cpu()
    finally:
        if hook is not None:
            hook.remove()
        model.train(was_training)
    return out
