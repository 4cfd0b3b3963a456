"""Trajectory matching: the student unroll, PAD's masked matching loss and its exact gradient.

One distillation iteration (docs/algorithms.md#one-iteration steps 4-6) in two calls, after three
made once per run (where the settings are checked):

    student = Student(get_network(model, channel, num_classes, im_size))
    inner_steps = InnerSteps(syn_steps, batch_syn, augment=True)
    mask = make_mask("depth", 0.5)

    plan = inner_steps.plan(len(image_syn), im_size, generator)
    result = match_trajectory(student, image_syn, label_syn, syn_lr, w_start, target, plan,
                              mask=mask, threshold=1.0)

`match_trajectory` accumulates dL/d(image_syn, label_syn, syn_lr) into their `.grad`, like
`L.backward()`. It has two memory modes that give the same gradient
(docs/algorithms.md#memory-modes-graph-and-recompute):

- "graph" keeps every inner step's graph and back-propagates once, like the reference; memory
  grows linearly with syn_steps.
- "recompute" runs the unroll without graphs, storing only w_0..w_{N-1}, then walks back from
  step N-1 to 0, rebuilding one step's graph at a time and pushing the adjoint a_i = dL/dw_i
  through it. Memory is one step's graph plus N flat parameter vectors.

The plan (batch indices and DSA parameters of every step) is drawn before the unroll, so both
modes, and both passes of "recompute", see the same batches and augmentations.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.func import functional_call

from utils.augment import DSA_STRATEGY, DSAParams, apply_dsa, sample_dsa_params
from utils.io import UserError

MEMORY_MODES = ("graph", "recompute")


def soft_cross_entropy(logits: Tensor, target_logits: Tensor) -> Tensor:
    """-(1/B) sum_b sum_c softmax(target_b)_c log_softmax(logits_b)_c
    (docs/algorithms.md#soft-cross-entropy)."""
    return -(F.softmax(target_logits, dim=1) * F.log_softmax(logits, dim=1)).sum(1).mean()


class Student:
    """A network evaluated on a flat parameter vector
    (docs/algorithms.md#the-flattened-parameter-vector).

    The vector is split into the module's parameters in registration order (shallow to deep),
    each piece a view of the vector, so gradients reach it. Buffers (BatchNorm running statistics)
    are the module's own and are updated in place in train mode, as in the reference.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        named = list(model.named_parameters())  # a shared parameter appears once
        self.names = [name for name, _ in named]
        self.shapes: list[torch.Size] = [p.shape for _, p in named]
        self.numels = [p.numel() for _, p in named]
        self.num_params: int = sum(self.numels)

    def __call__(self, x: Tensor, flat_params: Tensor) -> Tensor:
        if flat_params.shape != (self.num_params,):
            raise ValueError(
                f"flat parameters of shape {tuple(flat_params.shape)}, "
                f"expected ({self.num_params},)"
            )
        pieces = flat_params.split(self.numels)
        params = {n: t.view(s) for n, t, s in zip(self.names, pieces, self.shapes, strict=True)}
        return functional_call(self.model, params, (x,))


# ---- PAD's parameter masks (docs/algorithms.md#one-iteration step 5) -----------------------------
# A mask maps the per-coordinate losses [P] of the flat parameter vector (the student's layout:
# shallow to deep) and the number of coordinates to drop, 0 < dropped < P, to the kept ones K.

Kept = Tensor | slice  # int64 indices or a slice of the flat vector


def keep_all(per_coordinate_loss: Tensor, dropped: int) -> Kept:
    return slice(None)


def drop_shallowest(per_coordinate_loss: Tensor, dropped: int) -> Kept:
    """PAD_depth: the first `dropped` coordinates are the shallowest parameters."""
    return slice(dropped, None)


def drop_smallest_losses(per_coordinate_loss: Tensor, dropped: int) -> Kept:
    """PAD_loss: drop the smallest per-coordinate losses, ties broken by position."""
    # The ranking is a constant of the iteration: no gradient flows through the selection.
    return torch.sort(per_coordinate_loss.detach(), stable=True).indices[dropped:]


MASKS: dict[str, Callable[[Tensor, int], Kept]] = {
    "none": keep_all,
    "depth": drop_shallowest,
    "loss": drop_smallest_losses,
}


@dataclass(frozen=True)
class Mask:
    """A mask of MASKS bound to its ratio: `mask(per_coordinate_loss)` -> the kept coordinates K.

    It drops int(ratio * P) coordinates; ratio 0 keeps everything for every mask.
    """

    name: str
    ratio: float
    select: Callable[[Tensor, int], Kept]

    def __call__(self, per_coordinate_loss: Tensor) -> Kept:
        dropped = int(self.ratio * per_coordinate_loss.numel())
        return slice(None) if dropped == 0 else self.select(per_coordinate_loss, dropped)


def make_mask(name: str, ratio: float = 0.0, *, key: str = "ratio") -> Mask:
    """The mask `name` of MASKS with its ratio, checked here once; `key` names the ratio in
    errors (e.g. the config key `depth_ratio`)."""
    if name not in MASKS:
        raise UserError(f"matching mask {name!r} is unknown; use one of {list(MASKS)}")
    if not 0.0 <= ratio < 1.0:
        raise UserError(
            f"{key}={ratio} is outside [0, 1): it is the fraction of parameters dropped from the "
            "matching loss (0 keeps all, 0.5 drops half)"
        )
    return Mask(name, ratio, MASKS[name])


NO_MASK = make_mask("none")


def matching_loss(w_end: Tensor, w_start: Tensor, target: Tensor, mask: Mask = NO_MASK) -> Tensor:
    """sum_K (w_end - target)^2 / sum_K (w_start - target)^2 over the kept coordinates K."""
    student_error = (w_end - target) ** 2
    expert_error = (w_start - target) ** 2
    kept = mask(student_error)
    # The reference divides both sums by P; the factor cancels
    # (docs/algorithms.md#matching-loss-and-pads-masks).
    return student_error[kept].sum() / expert_error[kept].sum()


# ---- the unroll's batches and augmentations (docs/algorithms.md#one-iteration step 4) ------------


@dataclass
class InnerPlan:
    """What every inner step uses: synthetic indices [b_i] (CPU int64) and DSA parameters."""

    batches: list[Tensor]
    aug: list[DSAParams | None]
    # A rank's shard of every step's batch (docs/algorithms.md#distributed-distillation): the
    # fraction of the step's batch these rows are, which scales the step's loss. None: 1.
    weights: list[float] | None = None

    def step_weights(self) -> list[float | None]:
        return [None] * len(self.batches) if self.weights is None else list(self.weights)


@dataclass(frozen=True)
class InnerSteps:
    """How every unroll runs: syn_steps steps on batches of batch_syn synthetic images (None:
    the whole set), DSA-augmented with `strategy` when `augment`. Checked once, when made."""

    syn_steps: int
    batch_syn: int | None = None
    augment: bool = True
    strategy: str = DSA_STRATEGY

    def __post_init__(self) -> None:
        if self.syn_steps < 1:
            raise UserError(f"syn_steps={self.syn_steps}: expected at least 1")
        if self.batch_syn is not None and self.batch_syn < 1:
            raise UserError(
                f"batch_syn={self.batch_syn}: use a positive batch size or null for all"
            )

    def plan(
        self, num_syn: int, im_size: tuple[int, int], generator: torch.Generator | None = None
    ) -> InnerPlan:
        """Draw the batches and augmentations of one unroll of a set of num_syn images.

        A random permutation of the synthetic set is split into chunks of batch_syn; the last
        chunk is used first (the reference pops from the end) and a new permutation is drawn when
        the chunks run out. batch_syn None or >= num_syn: the whole set, re-permuted every step.
        """
        chunk = num_syn if self.batch_syn is None else min(self.batch_syn, num_syn)
        batches: list[Tensor] = []
        aug: list[DSAParams | None] = []
        chunks: list[Tensor] = []
        for _ in range(self.syn_steps):
            if not chunks:
                chunks = list(torch.randperm(num_syn, generator=generator).split(chunk))
            batch = chunks.pop()
            batches.append(batch)
            aug.append(
                sample_dsa_params(len(batch), im_size, self.strategy, generator=generator)
                if self.augment
                else None
            )
        return InnerPlan(batches, aug)


def plan_inner_steps(
    num_syn: int,
    syn_steps: int,
    batch_syn: int | None,
    im_size: tuple[int, int],
    *,
    augment: bool,
    strategy: str = DSA_STRATEGY,
    generator: torch.Generator | None = None,
) -> InnerPlan:
    """One plan in one call (tests, benchmarks); a loop makes its InnerSteps once instead."""
    return InnerSteps(syn_steps, batch_syn, augment, strategy).plan(num_syn, im_size, generator)


@dataclass
class MatchResult:
    loss: float
    skipped: bool


def match_trajectory(
    student: Student,
    image_syn: Tensor,
    label_syn: Tensor,
    syn_lr: Tensor,
    w_start: Tensor,
    target: Tensor,
    plan: InnerPlan,
    *,
    mask: Mask = NO_MASK,
    memory: str = "recompute",
    threshold: float | None = None,
) -> MatchResult:
    """Unroll the student from w_start along `plan`, match `target`, accumulate gradients.

    dL/d(image_syn, label_syn, syn_lr) are added to the `.grad` of those that require grad. When
    `threshold` is given and L > threshold or L is not finite, no gradient is computed and the
    result says skipped (the reference back-propagates but does not step: same outcome).
    """
    if memory not in MEMORY_MODES:
        raise UserError(f"memory mode {memory!r} is unknown; use one of {list(MEMORY_MODES)}")
    if not plan.batches:
        raise ValueError("the plan has no inner steps")
    w_start, target = w_start.detach(), target.detach()
    unroll = _match_graph if memory == "graph" else _match_recompute
    with torch.enable_grad():  # also correct when called under torch.no_grad()
        return unroll(student, image_syn, label_syn, syn_lr, w_start, target, plan, mask, threshold)


def _step_loss(
    student: Student,
    w: Tensor,
    images: Tensor,
    labels: Tensor,
    aug: DSAParams | None,
    weight: float | None = None,
) -> Tensor:
    """Soft cross-entropy of one inner step on its (augmented) batch, times `weight` if given."""
    x = images if aug is None else apply_dsa(images, aug)
    loss = soft_cross_entropy(student(x, w), labels)
    return loss if weight is None else loss * weight


def _skip(loss: Tensor, threshold: float | None) -> bool:
    # `not (L <= threshold)` is also true for NaN (docs/algorithms.md#the-threshold-rule).
    return threshold is not None and not bool(loss <= threshold)


def _match_graph(
    student, image_syn, label_syn, syn_lr, w_start, target, plan, mask, threshold
) -> MatchResult:
    # docs/algorithms.md#one-iteration step 4: every step's graph is kept (create_graph)
    # for one backward pass.
    w = w_start.clone().requires_grad_(True)
    for idx, aug, weight in zip(plan.batches, plan.aug, plan.step_weights(), strict=True):
        loss_i = _step_loss(student, w, image_syn[idx], label_syn[idx], aug, weight)
        (g,) = torch.autograd.grad(loss_i, w, create_graph=True)
        w = w - syn_lr * g
    loss = matching_loss(w, w_start, target, mask)
    if _skip(loss, threshold):
        return MatchResult(loss.item(), skipped=True)
    inputs = [t for t in (image_syn, label_syn, syn_lr) if t.requires_grad]
    if inputs:
        torch.autograd.backward(loss, inputs=inputs)
    return MatchResult(loss.item(), skipped=False)


def _match_recompute(
    student, image_syn, label_syn, syn_lr, w_start, target, plan, mask, threshold
) -> MatchResult:
    """docs/algorithms.md#memory-modes-graph-and-recompute: unroll without graphs, then
    back-propagate one rebuilt step at a time."""
    steps = len(plan.batches)
    images, labels, lr = image_syn.detach(), label_syn.detach(), syn_lr.detach()
    # w_0..w_{N-1} in one block; w_N is only needed for L and dL/dw_N.
    ws = torch.empty((steps, w_start.numel()), dtype=w_start.dtype, device=w_start.device)
    ws[0] = w_start
    grad_image = torch.zeros_like(images) if image_syn.requires_grad else None
    grad_label = torch.zeros_like(labels) if label_syn.requires_grad else None
    grad_lr = torch.zeros_like(lr) if syn_lr.requires_grad else None
    weights = plan.step_weights()

    def step_graph(i: int, create_graph: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        idx, aug = plan.batches[i], plan.aug[i]
        w = ws[i].detach().requires_grad_(True)
        x = images[idx].requires_grad_(create_graph and grad_image is not None)
        y = labels[idx].requires_grad_(create_graph and grad_label is not None)
        loss_i = _step_loss(student, w, x, y, aug, weights[i])
        (g,) = torch.autograd.grad(loss_i, w, create_graph=create_graph)
        return g, w, x, y

    # The last step's graph is built with create_graph during the unroll and kept: the walk
    # back starts with it instead of rebuilding it (one step fewer to recompute).
    for i in range(steps):
        g, w, x, y = step_graph(i, create_graph=i == steps - 1)
        with torch.no_grad():
            w_next = ws[i] - lr * g  # the same expression as graph mode, so the same rounding
            if i + 1 < steps:
                ws[i + 1] = w_next
    w_end = w_next.requires_grad_(True)
    loss = matching_loss(w_end, w_start, target, mask)
    if _skip(loss, threshold):
        return MatchResult(loss.item(), skipped=True)
    (adjoint,) = torch.autograd.grad(loss, w_end)  # a_N = dL/dw_N
    del w_end, w_next

    for i in reversed(range(steps)):
        if i < steps - 1:
            g, w, x, y = step_graph(i, create_graph=True)
        idx = plan.batches[i]
        # w_{i+1} = w_i - lr * g(w_i, x, y): the vector-Jacobian product with a_{i+1} gives
        # d/dlr = -g.a and d/d(w_i, x, y) = (a_{i+1}, 0, 0) + d(g . (-lr a_{i+1}))/d(w_i, x, y).
        if grad_lr is not None:
            grad_lr -= (g.detach() * adjoint).sum()
        wrt = [t for t in (w, x, y) if t.requires_grad]
        vjp = iter(torch.autograd.grad(g, wrt, grad_outputs=-lr * adjoint, materialize_grads=True))
        adjoint = adjoint + next(vjp)
        device_idx = idx.to(images.device)
        if grad_image is not None:
            grad_image.index_add_(0, device_idx, next(vjp))
        if grad_label is not None:
            grad_label.index_add_(0, device_idx, next(vjp))
    for tensor, grad in ((image_syn, grad_image), (label_syn, grad_label), (syn_lr, grad_lr)):
        if grad is not None:
            _accumulate(tensor, grad)
    return MatchResult(loss.item(), skipped=False)


def _accumulate(tensor: Tensor, grad: Tensor) -> None:
    """Add to tensor.grad the way backward() does."""
    if tensor.grad is None:
        tensor.grad = grad.reshape(tensor.shape)
    else:
        tensor.grad += grad.reshape(tensor.shape)
