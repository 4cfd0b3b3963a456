"""Training fresh networks by the evaluation schedule, and testing them: two engines.

`train_networks` runs the schedule of docs/algorithms.md#evaluation-protocol on M networks of one
architecture: E + 1 passes ep = 0..E, SGD(lr, momentum 0.9, weight decay 5e-4) on shuffled batches
of `batch_train` (last partial batch kept), every batch augmented (DSA, or DC when dsa=False), soft
cross-entropy for float [N, C] logit labels and cross-entropy for int [N] labels; after the pass
ep == E // 2 + 1 the lr is multiplied by 0.1 and the optimizer re-created (momentum buffers start
from zero). `network_logits` and `networks_accuracy` test them (batches of 256, eval mode, no
augmentation).

Batched ensembles (`batched=True`): the networks train together as one ensemble with torch.func
(stacked parameters and buffers, `functional_call` under `vmap`), and SGD with momentum and weight
decay is applied to the stacked tensors with the arithmetic of `torch.optim.SGD`. BatchNorm
running statistics are stacked buffers updated in place inside the vmapped call, so BatchNorm
models train batched too, each network with its own statistics. `batched=False` trains the same
networks one after the other with `torch.optim.SGD` and the plain modules. Batching is meant for
GPUs, where per-operation overhead dominates (not measured here); on the 2-core CPU of our
benchmark (scripts/bench/eval_batched.py) one thread per process and batched=False were fastest.

amp="bf16": torch.autocast(bfloat16) around the forward passes in the sequential mode; in the
batched mode the inputs of convolutions and matrix products are cast to bfloat16 instead, because
torch.autocast does not reach through vmap. Losses are computed in float32.

compile=True (sequential engine only): each network's forward runs through the cached compiled
`functional_call` of its architecture (utils/compiled.py, docs/algorithms.md#evaluation-speed),
with its own parameters and buffers as inputs; the test pass pads its last batch to a full one.

Randomness: network k draws, per pass, the permutation of the set and then, per batch, the DSA
parameters from its own CPU generator generators[k]. Both modes use each generator in that same
order, so they see the same data order and augmentations, and a network's randomness does not
depend on how many networks train beside it.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.func import functional_call, stack_module_state, vmap
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map

from utils.augment import DSA_STRATEGY, augment
from utils.compiled import compiled_forward
from utils.io import UserError
from utils.matching import soft_cross_entropy
from utils.progress import progress_bar

MOMENTUM = 0.9  # docs/algorithms.md#evaluation-protocol
WEIGHT_DECAY = 5e-4
LR_DECAY = 0.1
TEST_BATCH = 256
CPU = torch.device("cpu")  # default device (a module-level constant, not a call in a default)

# ---------------------------------------------------------------------------------------------
# bfloat16


class _Bf16MatmulMode(TorchFunctionMode):
    """torch.autocast's bfloat16 rule for convolutions and matrix products, applied at the Python
    level. torch.autocast does not reach through torch.func.vmap (its vmapped outputs stay float32
    and it gave no speed-up here), so the batched ensemble casts the inputs of these ops itself;
    other ops run in the dtype they receive, as under autocast."""

    CAST = {F.conv1d, F.conv2d, F.conv3d, F.linear, torch.matmul, torch.mm, torch.bmm, torch.addmm}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.CAST:
            args, kwargs = tree_map(_to_bf16, (args, kwargs))
        return func(*args, **kwargs)


def _to_bf16(value):
    if isinstance(value, Tensor) and value.is_floating_point():
        return value.to(torch.bfloat16)
    return value


def _autocast(
    device: torch.device, amp: str, *, batched: bool
) -> contextlib.AbstractContextManager:
    if amp == "off":
        return contextlib.nullcontext()
    if batched:
        return _Bf16MatmulMode()
    return torch.autocast(device.type, dtype=torch.bfloat16)


# ---------------------------------------------------------------------------------------------
# Training


@dataclass
class TrainConfig:
    epochs: int = 1000
    batch_train: int = 256
    dsa: bool = True
    dsa_strategy: str = DSA_STRATEGY
    amp: str = "off"
    compile: bool = False  # torch.compile the forward passes (sequential engine only)


@dataclass
class TrainHistory:
    """Per pass ep = 0..E: the lr it used and each network's mean batch loss [E + 1, M]."""

    lr: list[float] = field(default_factory=list)
    loss: Tensor | None = None


def _criterion(logits: Tensor, targets: Tensor) -> Tensor:
    """Soft cross-entropy for logit targets [B, C], cross-entropy for class indices [B]."""
    logits = logits.float()
    if targets.is_floating_point():
        return soft_cross_entropy(logits, targets)
    return F.cross_entropy(logits, targets)


def _sgd(net: nn.Module, lr: float) -> torch.optim.SGD:
    return torch.optim.SGD(net.parameters(), lr=lr, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)


class _StackedSGD:
    """torch.optim.SGD(momentum 0.9, weight decay 5e-4, no dampening, no Nesterov) on stacked
    parameters: the same element-wise arithmetic, so each network's slice follows its own SGD."""

    def __init__(self, params: list[Tensor], lr: float) -> None:
        self.params, self.lr = params, lr
        self.momentum_buffers: list[Tensor] | None = None

    @torch.no_grad()
    def step(self, grads: Sequence[Tensor]) -> None:
        grads = torch._foreach_add(grads, self.params, alpha=WEIGHT_DECAY)
        if self.momentum_buffers is None:  # torch: the first buffer is a copy of the gradient
            self.momentum_buffers = [g.clone() for g in grads]
        else:
            torch._foreach_mul_(self.momentum_buffers, MOMENTUM)
            torch._foreach_add_(self.momentum_buffers, grads)
        torch._foreach_add_(self.params, self.momentum_buffers, alpha=-self.lr)


class _Ensemble:
    """M networks of one architecture as stacked parameters/buffers and one vmapped forward."""

    def __init__(self, nets: Sequence[nn.Module]) -> None:
        params, buffers = stack_module_state(list(nets))
        self.params = {k: v.detach().requires_grad_() for k, v in params.items()}
        self.buffers = buffers
        self.base = copy.deepcopy(nets[0]).to("meta")

    def param_list(self) -> list[Tensor]:
        return list(self.params.values())

    def __call__(self, x: Tensor, *, shared_input: bool = False) -> Tensor:
        """x [M, B, C, H, W] (or [B, C, H, W] for every network) -> logits [M, B, classes]."""

        def forward(params: dict, buffers: dict, images: Tensor) -> Tensor:
            return functional_call(self.base, (params, buffers), (images,))

        in_dims = (0, 0, None if shared_input else 0)
        return vmap(forward, in_dims=in_dims)(self.params, self.buffers, x)

    def train(self, mode: bool = True) -> None:
        self.base.train(mode)

    @torch.no_grad()
    def write_back(self, nets: Sequence[nn.Module]) -> None:
        for k, net in enumerate(nets):
            for name, p in net.named_parameters():
                p.copy_(self.params[name][k])
            for name, b in net.named_buffers():
                b.copy_(self.buffers[name][k])


def _epoch_batches(n: int, batch: int, generator: torch.Generator) -> list[Tensor]:
    return list(torch.randperm(n, generator=generator).split(batch))


def train_networks(
    nets: Sequence[nn.Module],
    images: Tensor,
    labels: Tensor,
    lr: float,
    generators: Sequence[torch.Generator],
    config: TrainConfig,
    *,
    device: torch.device = CPU,
    batched: bool = True,
    desc: str = "eval",
) -> TrainHistory:
    """Train `nets` in place on (images, labels) by the schedule of
    docs/algorithms.md#evaluation-protocol, network k drawing its batches and augmentations from
    generators[k]; `nets` end up on `device`."""
    for net in nets:
        net.to(device).train()
    images, labels = images.detach().to(device, torch.float32), labels.detach().to(device)
    if not labels.is_floating_point():
        labels = labels.long()
    if batched and config.compile:
        raise UserError("compile and batched=True cannot be combined: the vmapped ensemble is "
                        "not compiled; use batched=False (or auto) with compile")  # fmt: skip
    run = _train_batched if batched else _train_sequential
    return run(list(nets), images, labels, lr, list(generators), config, device, desc)


def _augment(x: Tensor, g: torch.Generator, config: TrainConfig) -> Tensor:
    return augment(x, dsa=config.dsa, strategy=config.dsa_strategy, generator=g)


def _train_batched(nets, images, labels, lr, generators, config, device, desc) -> TrainHistory:
    ensemble = _Ensemble(nets)
    params = ensemble.param_list()
    optimizer = _StackedSGD(params, lr)
    history = TrainHistory()
    epoch_losses = []
    for ep in progress_bar(range(config.epochs + 1), desc=desc, leave=False):
        # each network draws its permutation before its batches' DSA parameters, as sequentially
        orders = [_epoch_batches(len(images), config.batch_train, g) for g in generators]
        batch_losses = []
        for step in range(len(orders[0])):
            x = torch.stack(
                [
                    _augment(images[o[step]], g, config)
                    for o, g in zip(orders, generators, strict=True)
                ]
            )  # [M, B, C, H, W]
            with _autocast(device, config.amp, batched=True):
                logits = ensemble(x)
            losses = torch.stack(
                [_criterion(logits[k], labels[o[step]]) for k, o in enumerate(orders)]
            )
            grads = torch.autograd.grad(losses.sum(), params)
            optimizer.step(grads)
            batch_losses.append(losses.detach())
        epoch_losses.append(torch.stack(batch_losses).mean(0))
        history.lr.append(optimizer.lr)
        # docs/algorithms.md#evaluation-protocol: decay, optimizer re-created
        if ep == config.epochs // 2 + 1:
            optimizer = _StackedSGD(params, optimizer.lr * LR_DECAY)
    ensemble.write_back(nets)
    history.loss = torch.stack(epoch_losses).cpu()
    return history


def _train_sequential(nets, images, labels, lr, generators, config, device, desc) -> TrainHistory:
    history = TrainHistory()
    losses = torch.zeros(config.epochs + 1, len(nets))
    bar = progress_bar(total=len(nets) * (config.epochs + 1), desc=desc, leave=False)
    for k, (net, g) in enumerate(zip(nets, generators, strict=True)):
        net_lr = lr
        optimizer = _sgd(net, net_lr)
        forward = _forward(net, config.amp, device, config.compile)
        for ep in range(config.epochs + 1):
            batch_losses = []
            for index in _epoch_batches(len(images), config.batch_train, g):
                x = _augment(images[index], g, config)
                logits = forward(x)
                loss = _criterion(logits, labels[index])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                batch_losses.append(loss.detach())
            losses[ep, k] = torch.stack(batch_losses).mean().cpu()
            if k == 0:
                history.lr.append(net_lr)
            # docs/algorithms.md#evaluation-protocol: decay, optimizer re-created
            if ep == config.epochs // 2 + 1:
                net_lr *= LR_DECAY
                optimizer = _sgd(net, net_lr)
            bar.update()
    bar.close()
    history.loss = losses
    return history


def _forward(net: nn.Module, amp: str, device: torch.device, compile: bool) -> Callable:
    """x -> net(x) in `amp` precision: eager, or the cached compiled forward of net's
    architecture and mode (utils/compiled.py) called with net's own parameters and buffers."""
    if not compile:

        def eager(x: Tensor) -> Tensor:
            with _autocast(device, amp, batched=False):
                return net(x)

        return eager
    compiled = compiled_forward(net, amp, device)
    params, buffers = dict(net.named_parameters()), dict(net.named_buffers())
    return lambda x: compiled(params, buffers, x)


# ---------------------------------------------------------------------------------------------
# Testing


def _logit_batches(
    nets: Sequence[nn.Module], images: Tensor, device: torch.device, amp: str, batched: bool,
    batch: int, compile: bool = False,
) -> Iterator[tuple[int, Tensor]]:  # fmt: skip
    """(start, logits [M, b, classes]) per test batch; eval mode, no augmentation.

    The batched pass takes batch // M images at a time, so that its tensors are the size of one
    network's batch (measured faster on CPU); in eval mode the batch size does not change logits.
    Compiled, the last partial batch is padded to `batch` images, so that the test pass has one
    shape and compiles once (eval mode: each image's logits depend on that image alone).
    """
    for net in nets:
        net.to(device).eval()
    ensemble = _Ensemble(nets) if batched else None
    if ensemble is not None:
        ensemble.train(False)
        batch = max(1, batch // len(nets))
    forwards = [] if batched else [_forward(net, amp, device, compile) for net in nets]
    with torch.no_grad():
        for start in range(0, len(images), batch):
            x = images[start : start + batch].to(device, torch.float32)
            if ensemble is not None:
                with _autocast(device, amp, batched=True):
                    logits = ensemble(x, shared_input=True)
            else:
                size = len(x)
                if compile and size < batch:
                    x = torch.cat([x, x.new_zeros(batch - size, *x.shape[1:])])
                logits = torch.stack([forward(x)[:size] for forward in forwards])
            yield start, logits.float()
    for net in nets:
        net.train()


def network_logits(
    nets: Sequence[nn.Module], images: Tensor, *, device: torch.device = CPU,
    amp: str = "off", batched: bool = True, batch: int = TEST_BATCH, compile: bool = False,
) -> Tensor:  # fmt: skip
    """Logits [M, N, classes] of every network on `images` (eval mode, no augmentation)."""
    batches = _logit_batches(nets, images, device, amp, batched, batch, compile)
    return torch.cat([logits.cpu() for _, logits in batches], 1)


def networks_accuracy(
    nets: Sequence[nn.Module], images: Tensor, labels: Tensor, *,
    device: torch.device = CPU, amp: str = "off", batched: bool = True,
    batch: int = TEST_BATCH, compile: bool = False,
) -> list[float]:  # fmt: skip
    """Accuracy in percent of every network on (images, int labels [N])."""
    correct = torch.zeros(len(nets), dtype=torch.int64)
    for start, logits in _logit_batches(nets, images, device, amp, batched, batch, compile):
        target = labels[start : start + logits.shape[1]].to(logits.device)
        correct += (logits.argmax(-1) == target).sum(1).cpu()
    return (correct.double() * 100 / len(labels)).tolist()
