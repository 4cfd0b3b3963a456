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
`L.backward()`. Its memory modes all give the same gradient
(docs/algorithms.md#memory-modes-graph-recompute-hybrid-and-auto):

- "graph" keeps every inner step's graph and back-propagates once, like the reference; memory
  grows linearly with syn_steps.
- "recompute" runs the unroll without graphs, storing only w_0..w_{N-1}, then walks back from
  step N-1 to 0, rebuilding one step's graph at a time and pushing the adjoint a_i = dL/dw_i
  through it. Memory is one step's graph plus N flat parameter vectors.
- "hybrid" with `kept_steps` K (0..N): the first N - K steps run without graphs (stored as
  flat vectors), the last K keep their graphs; one backward through those K gives the adjoint
  a_{N-K}, and the walk back of "recompute" does the rest. K = N is graph mode, K = 1 recompute's
  arithmetic. "auto" is resolved once per run into one of these (utils/unroll_memory.py).

The plan (batch indices and DSA parameters of every step) is drawn before the unroll, so both
modes, and both passes of "recompute", see the same batches and augmentations.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.func import functional_call

from utils.augment import DSA_STRATEGY, DSAParams, apply_dsa, sample_dsa_params
from utils.io import UserError
from utils.runtime import AMP_MODES

MEMORY_MODES = ("graph", "recompute", "hybrid")  # what match_trajectory runs
MEMORY_KEYS = ("auto", *MEMORY_MODES)  # the `memory` config key: auto picks one per run


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
        self.compiled: dict[StepOptions, _CompiledSteps] = {}  # one compilation per process

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


@dataclass(frozen=True)
class StepOptions:
    """How every inner step's forward and backward run (docs/algorithms.md#the-unrolls-fast-path).

    amp "bf16": the network's forward and its backward (and the rebuilt steps' double backward)
    under bfloat16 autocast; the parameter vectors, the adjoints, syn_lr's update and the matching
    loss stay float32. channels_last: the batch in channels-last memory format. compile: the
    graph-free steps of recompute and hybrid (the unroll pass and the rebuilt steps) as
    torch.compile'd torch.func functions; graph mode's kept graphs stay eager (torch.compile's
    graphs cannot be differentiated twice).
    """

    amp: str = "off"
    channels_last: bool = False
    compile: bool = False


FP32_EAGER = StepOptions()


def make_step_options(
    amp: str, channels_last: bool, compile: bool, device: torch.device
) -> StepOptions:
    """StepOptions checked once, where the config enters: an unknown amp mode, bf16 where the
    device has no bfloat16 kernels, compile where torch cannot build its CPU kernels."""
    if amp not in AMP_MODES:
        raise UserError(f"amp={amp!r} is unknown: use one of {', '.join(AMP_MODES)}")
    if amp == "bf16" and not bf16_supported(device):
        raise UserError(
            f"amp=bf16 but {device} has no bfloat16 support (torch reports none): use amp off or "
            "a device with bfloat16 (CUDA compute capability 8.0+, or a CPU with AVX512-BF16/AMX)"
        )
    if compile:
        check_compiler(device)
    return StepOptions(amp, channels_last, compile)


def bf16_supported(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return True  # other devices: let torch.autocast decide


def check_compiler(device: torch.device) -> None:
    """torch.compile on CPU builds C++ kernels with the compiler inductor searches for
    (torch._inductor.config.cpp.cxx: $CXX, else g++): say so at start, not in the first step."""
    if device.type != "cpu":
        return
    from torch._inductor import config as inductor_config  # imported only when compiling

    cxx = inductor_config.cpp.cxx
    candidates = [c for c in (cxx if isinstance(cxx, (list, tuple)) else (cxx,)) if c]
    if not any(shutil.which(c) for c in candidates):
        raise UserError(
            f"compile=true on CPU needs a C++ compiler ({' or '.join(candidates)} not found on "
            "PATH): install one (e.g. apt-get install g++), set CXX, or use --compile false"
        )


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
    kept_steps: int = 0,
    threshold: float | None = None,
    options: StepOptions = FP32_EAGER,
) -> MatchResult:
    """Unroll the student from w_start along `plan`, match `target`, accumulate gradients.

    dL/d(image_syn, label_syn, syn_lr) are added to the `.grad` of those that require grad. When
    `threshold` is given and L > threshold or L is not finite, no gradient is computed and the
    result says skipped (the reference back-propagates but does not step: same outcome).
    `kept_steps` is the number of final steps whose graphs "hybrid" keeps (clipped to syn_steps).
    """
    if memory not in MEMORY_MODES:
        raise UserError(f"memory mode {memory!r} is unknown; use one of {list(MEMORY_MODES)}")
    if not plan.batches:
        raise ValueError("the plan has no inner steps")
    w_start, target = w_start.detach(), target.detach()
    args = (student, image_syn, label_syn, syn_lr, w_start, target, plan, mask, threshold)
    with torch.enable_grad():  # also correct when called under torch.no_grad()
        if memory == "graph":
            return _match_graph(*args, options)
        if memory == "recompute" and options.compile:  # the compiled path is hybrid's code
            memory, kept_steps = "hybrid", 1
        if memory == "recompute":
            return _match_recompute(*args, options)
        kept = min(max(kept_steps, 0), len(plan.batches))
        return _match_hybrid(*args, options, kept)


def _autocast(device: torch.device, options: StepOptions):
    if options.amp == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def step_loss(
    student: Student,
    w: Tensor,
    images: Tensor,
    labels: Tensor,
    aug: DSAParams | None,
    options: StepOptions = FP32_EAGER,
    weight: float | None = None,
) -> Tensor:
    """Soft cross-entropy of one inner step on its (augmented) batch, times `weight` if given."""
    x = images if aug is None else apply_dsa(images, aug)
    if options.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with _autocast(x.device, options):
        logits = student(x, w)
    loss = soft_cross_entropy(logits.to(w.dtype), labels)  # the loss in the vector's dtype
    return loss if weight is None else loss * weight


def _skip(loss: Tensor, threshold: float | None) -> bool:
    # `not (L <= threshold)` is also true for NaN (docs/algorithms.md#the-threshold-rule).
    return threshold is not None and not bool(loss <= threshold)


def _match_graph(
    student, image_syn, label_syn, syn_lr, w_start, target, plan, mask, threshold, options
) -> MatchResult:
    # docs/algorithms.md#one-iteration step 4: every step's graph is kept (create_graph)
    # for one backward pass.
    w = w_start.clone().requires_grad_(True)
    steps = zip(plan.batches, plan.aug, plan.step_weights(), strict=True)
    w = _steps_with_graphs(student, w, image_syn, label_syn, syn_lr, steps, options)
    loss = matching_loss(w, w_start, target, mask)
    if _skip(loss, threshold):
        return MatchResult(loss.item(), skipped=True)
    inputs = [t for t in (image_syn, label_syn, syn_lr) if t.requires_grad]
    if inputs:
        torch.autograd.backward(loss, inputs=inputs)
    return MatchResult(loss.item(), skipped=False)


def _steps_with_graphs(student, w, image_syn, label_syn, syn_lr, steps, options) -> Tensor:
    """w after the inner steps `steps` ((batch, aug, weight) each), every step's graph kept
    (create_graph) for the backward through them."""
    for idx, aug, weight in steps:
        loss_i = step_loss(student, w, image_syn[idx], label_syn[idx], aug, options, weight)
        (g,) = torch.autograd.grad(loss_i, w, create_graph=True)
        w = w - syn_lr * g
    return w


def _match_recompute(
    student, image_syn, label_syn, syn_lr, w_start, target, plan, mask, threshold, options
) -> MatchResult:
    """docs/algorithms.md#memory-modes-graph-recompute-hybrid-and-auto: unroll without graphs,
    then back-propagate one rebuilt step at a time."""
    steps = len(plan.batches)
    images, labels, lr = image_syn.detach(), label_syn.detach(), syn_lr.detach()
    # w_0..w_{N-1} in one block; w_N is only needed for L and dL/dw_N.
    ws = torch.empty((steps, w_start.numel()), dtype=w_start.dtype, device=w_start.device)
    ws[0] = w_start
    grads = _Grads(image_syn, label_syn, syn_lr)
    weights = plan.step_weights()

    def step_graph(i: int, create_graph: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        idx, aug = plan.batches[i], plan.aug[i]
        w = ws[i].detach().requires_grad_(True)
        x = images[idx].requires_grad_(create_graph and grads.image is not None)
        y = labels[idx].requires_grad_(create_graph and grads.label is not None)
        loss_i = step_loss(student, w, x, y, aug, options, weights[i])
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
        adjoint = grads.step_back(plan.batches[i], g, (w, x, y), adjoint, lr)
    grads.accumulate()
    return MatchResult(loss.item(), skipped=False)


class _Grads:
    """The gradients the walk back sums for image_syn, label_syn and syn_lr (None: not needed)."""

    def __init__(self, image_syn: Tensor, label_syn: Tensor, syn_lr: Tensor) -> None:
        self.tensors = (image_syn, label_syn, syn_lr)
        self.image, self.label, self.lr = (
            torch.zeros_like(t.detach()) if t.requires_grad else None for t in self.tensors
        )

    def step_back(
        self, idx: Tensor, g: Tensor, leaves: tuple[Tensor, Tensor, Tensor], adjoint: Tensor, lr
    ) -> Tensor:
        """Push a_{i+1} back through w_{i+1} = w_i - lr * g(w_i, x, y); returns a_i.

        The vector-Jacobian product with a_{i+1} gives d/dlr = -g.a and
        d/d(w_i, x, y) = (a_{i+1}, 0, 0) + d(g . (-lr a_{i+1}))/d(w_i, x, y).
        """
        if self.lr is not None:
            self.lr -= (g.detach() * adjoint).sum()
        wrt = [t for t in leaves if t.requires_grad]
        vjp = iter(torch.autograd.grad(g, wrt, grad_outputs=-lr * adjoint, materialize_grads=True))
        adjoint = adjoint + next(vjp)
        self.add_batch(idx, next(vjp) if self.image is not None else None,
                       next(vjp) if self.label is not None else None)  # fmt: skip
        return adjoint

    def add_batch(self, idx: Tensor, grad_x: Tensor | None, grad_y: Tensor | None) -> None:
        device_idx = idx.to((self.image if self.image is not None else self.tensors[0]).device)
        if grad_x is not None and self.image is not None:
            self.image.index_add_(0, device_idx, grad_x)
        if grad_y is not None and self.label is not None:
            self.label.index_add_(0, device_idx, grad_y)

    def accumulate(self, kept: tuple[Tensor | None, ...] = (None, None, None)) -> None:
        """Add the sums (plus the kept graphs' gradients `kept`) to the tensors' .grad."""
        sums = (self.image, self.label, self.lr)
        for tensor, grad, extra in zip(self.tensors, sums, kept, strict=True):
            if grad is not None:
                _accumulate(tensor, grad if extra is None else grad + extra)


def _match_hybrid(
    student, image_syn, label_syn, syn_lr, w_start, target, plan, mask, threshold, options, kept
) -> MatchResult:
    """docs/algorithms.md#memory-modes-graph-recompute-hybrid-and-auto: steps 0..N-K-1 without
    graphs (w_i stored), steps N-K..N-1 with their graphs kept, one backward through those to
    a_{N-K}, then recompute's walk back over the first N - K steps."""
    steps = len(plan.batches)
    recomputed = steps - kept
    images, labels, lr = image_syn.detach(), label_syn.detach(), syn_lr.detach()
    ws = torch.empty((recomputed, w_start.numel()), dtype=w_start.dtype, device=w_start.device)
    grads = _Grads(image_syn, label_syn, syn_lr)
    compiled = _compiled_steps(student, options) if options.compile else None
    weights = plan.step_weights()
    if compiled is not None and any(weight is not None for weight in weights):
        raise ValueError("the compiled steps do not take the weights of a sharded plan")
    w = w_start
    for i in range(recomputed):
        ws[i] = w
        idx, aug = plan.batches[i], plan.aug[i]
        if compiled is not None:
            g = compiled.grad(ws[i], images[idx], labels[idx], aug)
        else:
            g, *_ = _step_grad(student, ws[i], images[idx], labels[idx], aug, options, False,
                               weight=weights[i])  # fmt: skip
        with torch.no_grad():
            w = ws[i] - lr * g
    w_kept = w.detach().clone().requires_grad_(True)  # w_{N-K}: where the kept graphs start
    last = zip(plan.batches[recomputed:], plan.aug[recomputed:], weights[recomputed:], strict=True)
    w = _steps_with_graphs(student, w_kept, image_syn, label_syn, syn_lr, last, options)
    loss = matching_loss(w, w_start, target, mask)
    if _skip(loss, threshold):
        return MatchResult(loss.item(), skipped=True)
    inputs = [w_kept] + [t for t in grads.tensors if t.requires_grad]
    adjoint, *kept_grads = torch.autograd.grad(loss, inputs, materialize_grads=True)
    kept_grads = iter(kept_grads)
    from_kept = tuple(next(kept_grads) if t.requires_grad else None for t in grads.tensors)
    del w, w_kept  # free the kept graphs before the walk back

    for i in reversed(range(recomputed)):
        idx, aug = plan.batches[i], plan.aug[i]
        if compiled is not None:
            adjoint = _compiled_step_back(compiled, grads, ws[i], images, labels, idx, aug,
                                          adjoint, lr)  # fmt: skip
            continue
        g, w, x, y = _step_grad(student, ws[i], images[idx], labels[idx], aug, options, True,
                                grads, weights[i])  # fmt: skip
        adjoint = grads.step_back(idx, g, (w, x, y), adjoint, lr)
    grads.accumulate(from_kept)
    return MatchResult(loss.item(), skipped=False)


def _step_grad(student, w_i, x, y, aug, options, create_graph, grads=None, weight=None):
    """g_i = dloss_i/dw_i at the stored w_i, with its graph when create_graph (leaves returned)."""
    w = w_i.detach().requires_grad_(True)
    x = x.requires_grad_(create_graph and grads is not None and grads.image is not None)
    y = y.requires_grad_(create_graph and grads is not None and grads.label is not None)
    loss_i = step_loss(student, w, x, y, aug, options, weight)
    (g,) = torch.autograd.grad(loss_i, w, create_graph=create_graph)
    return g, w, x, y


@dataclass
class _CompiledSteps:
    """The graph-free inner steps as torch.compile'd torch.func functions."""

    grad: Callable  # (w_i, x, y, aug) -> g_i
    grad_and_vjp: Callable  # (w_i, x, y, aug, v) -> (g_i, d<g_i, v>/dw_i, .../dx, .../dy)


def _compiled_steps(student: Student, options: StepOptions) -> _CompiledSteps:
    if options not in student.compiled:

        def loss_fn(w: Tensor, x: Tensor, y: Tensor, aug: DSAParams | None) -> Tensor:
            return step_loss(student, w, x, y, aug, options)

        grad_fn = torch.func.grad(loss_fn)

        def grad_and_vjp(w, x, y, aug, cotangent):
            g, vjp_fn = torch.func.vjp(lambda w_, x_, y_: grad_fn(w_, x_, y_, aug), w, x, y)
            return (g, *vjp_fn(cotangent))

        student.compiled[options] = _CompiledSteps(
            torch.compile(grad_fn, dynamic=False), torch.compile(grad_and_vjp, dynamic=False)
        )
    return student.compiled[options]


def _compiled_step_back(compiled, grads, w_i, images, labels, idx, aug, adjoint, lr) -> Tensor:
    """grads.step_back's arithmetic on a rebuilt step computed by the compiled vjp."""
    g, grad_w, grad_x, grad_y = compiled.grad_and_vjp(
        w_i, images[idx], labels[idx], aug, -lr * adjoint
    )
    if grads.lr is not None:
        grads.lr -= (g * adjoint).sum()
    grads.add_batch(idx, grad_x, grad_y)
    return adjoint + grad_w


def _accumulate(tensor: Tensor, grad: Tensor) -> None:
    """Add to tensor.grad the way backward() does."""
    if tensor.grad is None:
        tensor.grad = grad.reshape(tensor.shape)
    else:
        tensor.grad += grad.reshape(tensor.shape)
