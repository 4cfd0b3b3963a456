"""The synthetic set apart from matching: start epochs, initial images, soft labels, checks.

- `StartEpochSchedule`: the start-epoch window of docs/algorithms.md#one-iteration step 2 (DATM's
  sequential generation), sampled from a caller-owned generator so a resumed run
  draws the same epochs.
- Initial images (docs/algorithms.md#initial-images): `real_image_indices`, `noise_images` and
  `correctly_predicted_indices` (`pix_init: samples_predicted_correctly`).
- Soft labels (docs/algorithms.md#soft-labels): `label_snapshots` reads one snapshot of every
  expert, `expert_logits` evaluates a snapshot, `average_correct_logits` averages over the experts
  that are right on each image.
- One-line `UserError` checks of the settings the loop cannot run with.

The synthetic set is class-major: class 0's `ipc` images, then class 1's, ... (`hard_labels`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import Tensor, nn

from utils.io import UserError
from utils.matching import Student
from utils.trajectory import check_expert_shapes, flatten_params, load_expert_file

PIX_INITS = ("real", "noise", "samples_predicted_correctly")
LOGIT_CHUNK = 256  # images per forward pass when scoring real or synthetic images


# ---------------------------------------------------------------------------------------------
# Start epochs (docs/algorithms.md#one-iteration step 2, docs/algorithms.md#start-epoch-schedule)


@dataclass(frozen=True)
class StartEpochSchedule:
    """start ~ uniform integer in [min_start_epoch, upper(it)), upper exclusive (numpy randint).

    Without sequential generation upper = max_start_epoch. With it the window starts at
    current_max_start_epoch and widens linearly to max_start_epoch over the first
    expansion_end_epoch iterations (the name says epoch; it counts iterations).
    """

    min_start_epoch: int
    max_start_epoch: int
    sequential: bool = False
    current_max_start_epoch: int = 20
    expansion_end_epoch: int = 3000

    @classmethod
    def from_config(cls, cfg: SimpleNamespace) -> StartEpochSchedule:
        return cls(
            min_start_epoch=cfg.min_start_epoch,
            max_start_epoch=cfg.max_start_epoch,
            sequential=cfg.Sequential_Generation,
            current_max_start_epoch=cfg.current_max_start_epoch,
            expansion_end_epoch=cfg.expansion_end_epoch,
        )

    def upper(self, it: int) -> int:
        """The exclusive upper bound of the start epoch at iteration `it`."""
        if not self.sequential:
            return self.max_start_epoch
        current = self.current_max_start_epoch
        widened = current + int((self.max_start_epoch - current) * it / self.expansion_end_epoch)
        return min(self.max_start_epoch, widened)

    def sample(self, it: int, generator: torch.Generator) -> int:
        return int(torch.randint(self.min_start_epoch, self.upper(it), (1,), generator=generator))

    def validate(self, iterations: int) -> None:
        """UserError unless the window [min, upper) is non-empty for every it in 0..iterations."""
        if self.min_start_epoch < 0:
            raise UserError(f"min_start_epoch={self.min_start_epoch}: expected 0 or more")
        if self.sequential and self.expansion_end_epoch < 1:
            raise UserError(
                f"expansion_end_epoch={self.expansion_end_epoch} with Sequential_Generation: "
                "expected at least 1 iteration"
            )
        # upper(it) is monotonic in it, so its smallest value is at one of the two ends.
        for it in (0, iterations):
            if self.upper(it) <= self.min_start_epoch:
                raise UserError(
                    f"start-epoch window is empty at iteration {it}: min_start_epoch="
                    f"{self.min_start_epoch} but the exclusive upper bound is {self.upper(it)} "
                    f"(max_start_epoch={self.max_start_epoch}, current_max_start_epoch="
                    f"{self.current_max_start_epoch}, Sequential_Generation={self.sequential}); "
                    "raise max_start_epoch or lower min_start_epoch"
                )


def check_trajectory_length(
    max_start_epoch: int, expert_epochs: int, num_snapshots: int, path: str | Path
) -> None:
    """The latest target epoch, max_start_epoch - 1 + expert_epochs, must be a snapshot."""
    if max_start_epoch + expert_epochs > num_snapshots:
        train_epochs = num_snapshots - 1
        raise UserError(
            f"max_start_epoch={max_start_epoch} + expert_epochs={expert_epochs} reaches epoch "
            f"{max_start_epoch - 1 + expert_epochs}, but the experts in {path} were trained for "
            f"{train_epochs} epochs: use max_start_epoch <= {train_epochs + 1 - expert_epochs} "
            "or experts trained for longer"
        )


# ---------------------------------------------------------------------------------------------
# Checks of settings


def check_choice(key: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise UserError(f"{key}={value!r} is not one of {', '.join(choices)}")


def check_ipc(ipc: int, indices_class: Sequence[Tensor], class_names: Sequence[str]) -> None:
    if ipc < 1:
        raise UserError(f"ipc={ipc}: expected at least 1 image per class")
    for c, members in enumerate(indices_class):
        if len(members) < ipc:
            raise UserError(
                f"ipc={ipc} but class {c} ({class_names[c]}) has only {len(members)} train images "
                f"(after max_per_class): use ipc <= {len(members)}"
            )


def snapshot_index(timestamp: int, num_snapshots: int, path: str | Path) -> int:
    """Label_Model_Timestamp as a valid index (negative counts from the end, -1 = last epoch)."""
    if not -num_snapshots <= timestamp < num_snapshots:
        raise UserError(
            f"Label_Model_Timestamp={timestamp} but the experts in {path} have {num_snapshots} "
            f"snapshots: use a value in [{-num_snapshots}, {num_snapshots - 1}] (-1 = last)"
        )
    return timestamp % num_snapshots


# ---------------------------------------------------------------------------------------------
# Initial images (docs/algorithms.md#initial-images)


def hard_labels(num_classes: int, ipc: int) -> Tensor:
    """[0]*ipc + [1]*ipc + ... : the class of every synthetic image, int64 [num_classes * ipc]."""
    return torch.arange(num_classes).repeat_interleave(ipc)


def real_image_indices(
    indices_class: Sequence[Tensor], ipc: int, generator: torch.Generator
) -> Tensor:
    """`ipc` distinct random train indices of every class, class-major, int64 [C * ipc]."""
    chosen = []
    for members in indices_class:
        chosen.append(members[torch.randperm(len(members), generator=generator)[:ipc]])
    return torch.cat(chosen)


def noise_images(
    num_images: int, channel: int, im_size: tuple[int, int], generator: torch.Generator
) -> Tensor:
    """Standard normal pixels in the preprocessed (normalised or whitened) space."""
    return torch.randn((num_images, channel, *im_size), generator=generator)


def correctly_predicted_indices(
    images_train: Tensor,
    indices_class: Sequence[Tensor],
    ipc: int,
    predict: Callable[[int, Tensor], Tensor],
    num_experts: int,
    generator: torch.Generator,
    class_names: Sequence[str] | None = None,
    chunk: int = LOGIT_CHUNK,
) -> Tensor:
    """`pix_init: samples_predicted_correctly`: per class, ipc images an expert classifies right.

    For class c: walk its images in a random order, in chunks, keeping those that expert 0
    (predict(0, images) -> predicted classes) assigns to c, until ipc are kept; if a full pass
    keeps fewer, continue with expert 1 over the images not yet kept, and so on. Experts are
    numbered over all files in order; running out of them is a UserError (the reference loops
    forever). Returns train indices, class-major, each class in walking order. Unlike the
    reference, every class starts again at expert 0, so each class sees every expert.
    """
    chosen_all = []
    for c, members in enumerate(indices_class):
        order = members[torch.randperm(len(members), generator=generator)]
        chosen = torch.zeros(len(order), dtype=torch.bool)
        for k in range(num_experts):
            for start in range(0, len(order), chunk):
                positions = torch.arange(start, min(start + chunk, len(order)))
                positions = positions[~chosen[positions]]
                if len(positions) == 0:
                    continue
                predicted = predict(k, images_train[order[positions]]).cpu()
                hits = positions[predicted == c]
                chosen[hits[: ipc - int(chosen.sum())]] = True
                if int(chosen.sum()) == ipc:
                    break
            if int(chosen.sum()) == ipc:
                break
        else:
            name = f" ({class_names[c]})" if class_names else ""
            raise UserError(
                f"pix_init=samples_predicted_correctly: only {int(chosen.sum())} of the "
                f"{len(order)} images of class {c}{name} are classified correctly by any of the "
                f"{num_experts} experts, need ipc={ipc}: use pix_init real, a smaller ipc or "
                "better-trained experts (Label_Model_Timestamp)"
            )
        chosen_all.append(order[chosen])
    return torch.cat(chosen_all)


# ---------------------------------------------------------------------------------------------
# Soft labels (docs/algorithms.md#soft-labels)


def label_snapshots(files: Sequence[Path], timestamp: int, model: nn.Module) -> list[Tensor]:
    """The flat snapshot `timestamp` of every expert of every file, in file and expert order.

    Files are memory-mapped and only the wanted snapshot is copied out, so a 1 GB file never
    sits in memory whole (docs/differences.md#lazy-expert-loading). Shapes are
    checked against `model`.
    """
    snapshots = []
    for path in files:
        experts = load_expert_file(path, mmap=True)
        check_expert_shapes(experts[0], model, path)
        for k, expert in enumerate(experts):
            index = snapshot_index(timestamp, len(expert), path)
            snapshots.append(flatten_params(expert[index]).clone())
            if not torch.isfinite(snapshots[-1]).all():
                raise UserError(
                    f"expert file {path} holds non-finite parameters (expert {k}, snapshot "
                    f"{index}): train those experts again (buffer/buffer_CL.py with a lower "
                    "--lr_teacher)"
                )
        del experts
    return snapshots


@torch.no_grad()
def expert_logits(
    student: Student,
    images: Tensor,
    flat_params: Tensor,
    device: torch.device,
    chunk: int = LOGIT_CHUNK,
) -> Tensor:
    """Logits [N, classes] (on the CPU) of `images` under one expert snapshot, chunk by chunk."""
    params = flat_params.to(device)
    out = [
        student(images[i : i + chunk].to(device), params).cpu()
        for i in range(0, len(images), chunk)
    ]
    return torch.cat(out)


def average_correct_logits(
    logits_per_expert: Iterable[Tensor], labels: Tensor
) -> tuple[Tensor, int]:
    """Mean logits over the experts whose argmax equals `labels`, per image
    (docs/algorithms.md#soft-labels).

    An image no expert classifies correctly gets the mean over all experts (the reference divides
    by zero); returns (soft labels [N, classes], number of such images).
    """
    total_correct = total_all = count = None
    num_experts = 0
    for logits in logits_per_expert:
        logits = logits.double()
        correct = (logits.argmax(1) == labels).double()
        if total_correct is None:
            total_correct, total_all = torch.zeros_like(logits), torch.zeros_like(logits)
            count = torch.zeros(len(logits), dtype=torch.float64)
        total_correct += correct[:, None] * logits
        total_all += logits
        count += correct
        num_experts += 1
    if num_experts == 0:
        raise ValueError("no expert logits to average")
    none_correct = count == 0
    averaged = total_correct / count.clamp_min(1)[:, None]
    averaged[none_correct] = total_all[none_correct] / num_experts
    return averaged.float(), int(none_correct.sum())


def initial_soft_labels(
    student: Student,
    image_syn: Tensor,
    labels: Tensor,
    snapshots: Sequence[Tensor],
    device: torch.device,
) -> Tensor:
    """Soft labels [N, classes] averaged over the snapshots that classify each image right."""
    logits = (expert_logits(student, image_syn, theta, device) for theta in snapshots)
    soft, fallback = average_correct_logits(logits, labels)
    if fallback:
        warnings.warn(
            f"{fallback} synthetic image(s) are classified correctly by none of the "
            f"{len(snapshots)} experts; their soft labels are the mean over all experts",
            stacklevel=2,
        )
    return soft
