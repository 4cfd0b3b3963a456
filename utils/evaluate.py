"""Evaluation of a synthetic set: train fresh networks on it, test them on the real test set.

`evaluate_synset` is ALGORITHMS 8 / REFERENCE_NOTES 7.1: E = `epochs`, passes ep = 0..E (E + 1 of
them), SGD(lr, momentum 0.9, weight decay 5e-4) on shuffled batches of `batch_train` (last partial
batch kept), every batch augmented (DSA, or DC when dsa=False), soft cross-entropy for float
[N, C] logit labels and cross-entropy for int [N] labels; after the pass ep == E // 2 + 1 the lr is
multiplied by 0.1 and the optimizer re-created (momentum buffers start from zero). Then the
networks are tested on `data.images_test` (batches of 256, eval mode, no augmentation); accuracies
are in percent, with the mean and population std over the `num_eval` networks.

Batched ensembles (the default on GPUs; `batched=None` picks them there and the sequential mode
on the CPU, where it measured faster): the networks of one model train together as one ensemble with
torch.func (stacked parameters and buffers, `functional_call` under `vmap`), and SGD with momentum
and weight decay is applied to the stacked tensors with the arithmetic of `torch.optim.SGD`.
BatchNorm running statistics are stacked buffers updated in place inside the vmapped call, so
BatchNorm models train batched too, each network with its own statistics. `batched=False` trains
the same networks one after the other with `torch.optim.SGD` and the plain modules, and so does
an evaluation of a single network (an ensemble of one only adds vmap's overhead). Batching is meant
for GPUs, where per-operation overhead dominates (not measured here); on the 2-core CPU of our
benchmark (scripts/bench/eval_batched.py) one thread per process and batched=False were fastest.

amp="bf16": torch.autocast(bfloat16) around the forward passes in the sequential mode; in the
batched mode the inputs of convolutions and matrix products are cast to bfloat16 instead, because
torch.autocast does not reach through vmap. Losses are computed in float32.

Randomness: network k of an evaluation with seed s draws from two streams derived from (s, k)
(`network_seeds`): one seeds its initialisation, the other a CPU `torch.Generator` that draws,
per pass, the permutation of the set and then, per batch, the DSA parameters. Both modes use each
network's stream in that same order, so they see the same initial weights, data order and
augmentations, and a network's randomness does not depend on how many networks train beside it
(or on which rank, under torchrun). The global RNGs are left untouched.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import math
import os
import statistics
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.func import functional_call, stack_module_state, vmap
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map
from tqdm import tqdm

from utils.augment import DSA_STRATEGY, augment, sample_dsa_params
from utils.data import Data
from utils.io import UserError
from utils.matching import soft_cross_entropy
from utils.networks import MODEL_NAMES, get_network

MOMENTUM = 0.9  # ALGORITHMS 8
WEIGHT_DECAY = 5e-4
LR_DECAY = 0.1
TEST_BATCH = 256
AMP_MODES = ("off", "bf16")
CPU = torch.device("cpu")  # default device (a module-level constant, not a call in a default)

# ---------------------------------------------------------------------------------------------
# Evaluation pools (ALGORITHMS 3, REFERENCE_NOTES 7.3)

EVAL_POOLS: dict[str, tuple[str, ...]] = {
    "M": ("ConvNet", "AlexNet", "VGG11", "ResNet18"),
    "W": ("ConvNetW32", "ConvNetW64", "ConvNetW128", "ConvNetW256"),
    "D": ("ConvNetD1", "ConvNetD2", "ConvNetD3", "ConvNetD4"),
    "A": ("ConvNetAS", "ConvNetAR", "ConvNetAL"),
    "P": ("ConvNetNP", "ConvNetMP", "ConvNetAP"),
    "N": ("ConvNetNN", "ConvNetBN", "ConvNetLN", "ConvNetIN", "ConvNetGN"),
    "BN": ("ConvNet", "ConvNetBN", "ResNet18", "ResNet18BN", "AlexNet", "VGG11", "ResNet18_AP"),
    # ours (REFERENCE_NOTES A7): the paper's Table 2; the 64x64 version is X_TINY_POOL
    "X": ("ConvNet", "ConvNetBN", "ResNet18", "ResNet18BN", "VGG11", "AlexNet", "LeNet", "MLP"),
}
X_TINY_POOL = (
    "ConvNetD4", "ConvNetD4BN", "ResNet18_Tiny", "ResNet18BN_Tiny", "VGG11_Tiny", "AlexNet_Tiny",
    "LeNet_Tiny", "MLP_Tiny",
)  # fmt: skip
EVAL_MODES = ("S", "C", *EVAL_POOLS)


def check_model_names(names: Sequence[str]) -> None:
    """UserError naming the first unknown model, with close matches."""
    for name in names:
        if name not in MODEL_NAMES:
            close = difflib.get_close_matches(name, MODEL_NAMES, n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise UserError(
                f"unknown model {name!r}{hint}: valid names are {', '.join(MODEL_NAMES)}"
            )


def eval_pool(eval_mode: str, model: str, im_size: tuple[int, int] = (32, 32)) -> list[str]:
    """The models an evaluation trains for `eval_mode` (REFERENCE_NOTES 7.3).

    S: `model` with a trailing BN part dropped; C: `model` and ConvNet (once if they are equal);
    X: the paper's Table 2 models (their _Tiny versions for 64x64 data); the other letters are
    the fixed pools of EVAL_POOLS. An unknown letter or model is a UserError.
    """
    check_model_names([model])
    if eval_mode == "S":
        pool = [model[: model.index("BN")] if "BN" in model else model]
    elif eval_mode == "C":
        pool = list(dict.fromkeys([model, "ConvNet"]))
    elif eval_mode == "X" and tuple(im_size) == (64, 64):
        pool = list(X_TINY_POOL)
    elif eval_mode in EVAL_POOLS:
        pool = list(EVAL_POOLS[eval_mode])
    else:
        raise UserError(f"unknown eval_mode {eval_mode!r}: expected one of {', '.join(EVAL_MODES)}")
    check_model_names(pool)
    return pool


# ---------------------------------------------------------------------------------------------
# Input checks


def check_synset(images: Tensor, labels: Tensor, lr: float | Tensor, data: Data) -> float:
    """Check a synthetic set against the data set; returns lr as a float.

    images: float [N, C, H, W] matching data (channels, size); labels: int [N] class indices or
    float [N, num_classes] logits; lr: a finite positive number (or one-element tensor).
    """
    expected = (data.channel, *data.im_size)
    if not isinstance(images, Tensor) or images.dim() != 4 or not images.is_floating_point():
        got = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise UserError(
            f"images are {got}: expected a float tensor [N, {', '.join(map(str, expected))}]"
        )
    if tuple(images.shape[1:]) != expected:
        raise UserError(
            f"images have shape {list(images.shape)} but {data.name} images are "
            f"{'x'.join(map(str, expected))} (channels x height x width): evaluate them on the "
            "data set they were distilled from (--dataset, --subset)"
        )
    if len(images) == 0 or not torch.isfinite(images).all():
        raise UserError(f"images {list(images.shape)} are empty or contain NaN/inf values")
    _check_labels(labels, len(images), data.num_classes)
    return _check_lr(lr)


def _check_labels(labels: Tensor, count: int, num_classes: int) -> None:
    if not isinstance(labels, Tensor):
        raise UserError(f"labels are a {type(labels).__name__}: expected a tensor")
    shape = list(labels.shape)
    if labels.is_floating_point() and labels.dim() == 2:
        if shape != [count, num_classes]:
            raise UserError(
                f"soft labels have shape {shape}: expected [{count}, {num_classes}] "
                f"({count} images, {num_classes} classes)"
            )
        if not torch.isfinite(labels).all():
            raise UserError("soft labels contain NaN/inf values")
    elif labels.dtype in (torch.int64, torch.int32, torch.int16, torch.uint8) and labels.dim() == 1:
        if len(labels) != count:
            raise UserError(f"{len(labels)} hard labels for {count} images: expected one per image")
        if labels.min() < 0 or labels.max() >= num_classes:
            raise UserError(
                f"hard labels range over [{int(labels.min())}, {int(labels.max())}]: "
                f"expected class indices in [0, {num_classes - 1}]"
            )
    else:
        raise UserError(
            f"labels are {labels.dtype} {shape}: expected int [N] class indices or float "
            "[N, num_classes] logits"
        )


def _check_lr(lr: float | Tensor) -> float:
    if isinstance(lr, Tensor):
        if lr.numel() != 1:
            raise UserError(
                f"the learning rate tensor has shape {list(lr.shape)}: expected one value"
            )
        lr = lr.item()
    try:
        lr = float(lr)
    except (TypeError, ValueError) as exc:
        raise UserError(f"learning rate {lr!r} is not a number") from exc
    if not math.isfinite(lr) or lr <= 0:
        raise UserError(f"learning rate {lr} is not a positive finite number: pass one > 0")
    return lr


def _check_options(
    epochs: int, batch_train: int, num_eval: int, amp: str, seed: int, dsa: bool, strategy: str
) -> None:
    if dsa:  # an unknown op is a UserError here rather than after the networks are built
        sample_dsa_params(1, (8, 8), strategy, generator=torch.Generator())
    if epochs < 0 or batch_train < 1 or num_eval < 1:
        raise UserError(
            f"epochs={epochs}, batch_train={batch_train}, num_eval={num_eval}: expected "
            "epochs >= 0, batch_train >= 1 and num_eval >= 1"
        )
    if amp not in AMP_MODES:
        raise UserError(f"amp {amp!r} is unknown: expected one of {', '.join(AMP_MODES)}")
    if seed < 0:
        raise UserError(f"seed {seed} is negative: expected a seed >= 0")


def random_real_set(data: Data, ipc: int, seed: int) -> tuple[Tensor, Tensor]:
    """The paper's Random baseline: `ipc` random train images of every class (a generator seeded
    with `seed`), class by class, with their int64 labels."""
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for c, members in enumerate(data.indices_class()):
        if not 1 <= ipc <= len(members):
            raise UserError(
                f"random_ipc={ipc} but class {c} ({data.class_names[c]}) has {len(members)} "
                f"train images: expected 1 <= random_ipc <= {len(members)}"
            )
        chosen.append(members[torch.randperm(len(members), generator=generator)[:ipc]])
    index = torch.cat(chosen)
    return data.images_train[index].clone(), data.labels_train[index].clone()


# ---------------------------------------------------------------------------------------------
# Seeds and networks


def network_seeds(seed: int, index: int) -> tuple[int, int]:
    """(initialisation seed, data-stream seed) of evaluation network `index` under `seed`."""
    init_seed, data_seed = np.random.SeedSequence([seed, index]).generate_state(2)
    return int(init_seed), int(data_seed)


def init_networks(
    model_name: str, data: Data, seed: int, indices: Sequence[int]
) -> list[nn.Module]:
    """Networks `indices` of an evaluation, each initialised from its own seed (CPU, train mode);
    the global torch RNG is restored afterwards."""
    nets = []
    with torch.random.fork_rng(devices=[]):
        for k in indices:
            torch.manual_seed(network_seeds(seed, k)[0])
            nets.append(get_network(model_name, data.channel, data.num_classes, data.im_size))
    return nets


def data_generators(seed: int, indices: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per network for its permutations and augmentation parameters."""
    return [torch.Generator().manual_seed(network_seeds(seed, k)[1]) for k in indices]


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
    """Train `nets` in place on (images, labels) by the schedule of ALGORITHMS 8, network k
    drawing its batches and augmentations from generators[k]; `nets` end up on `device`."""
    for net in nets:
        net.to(device).train()
    images, labels = images.detach().to(device, torch.float32), labels.detach().to(device)
    if not labels.is_floating_point():
        labels = labels.long()
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
    for ep in tqdm(range(config.epochs + 1), desc=desc, disable=None, leave=False):
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
        if ep == config.epochs // 2 + 1:  # ALGORITHMS 8: decay, optimizer re-created
            optimizer = _StackedSGD(params, optimizer.lr * LR_DECAY)
    ensemble.write_back(nets)
    history.loss = torch.stack(epoch_losses).cpu()
    return history


def _train_sequential(nets, images, labels, lr, generators, config, device, desc) -> TrainHistory:
    history = TrainHistory()
    losses = torch.zeros(config.epochs + 1, len(nets))
    progress = tqdm(total=len(nets) * (config.epochs + 1), desc=desc, disable=None, leave=False)
    for k, (net, g) in enumerate(zip(nets, generators, strict=True)):
        net_lr = lr
        optimizer = _sgd(net, net_lr)
        for ep in range(config.epochs + 1):
            batch_losses = []
            for index in _epoch_batches(len(images), config.batch_train, g):
                x = _augment(images[index], g, config)
                with _autocast(device, config.amp, batched=False):
                    logits = net(x)
                loss = _criterion(logits, labels[index])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                batch_losses.append(loss.detach())
            losses[ep, k] = torch.stack(batch_losses).mean().cpu()
            if k == 0:
                history.lr.append(net_lr)
            if ep == config.epochs // 2 + 1:  # ALGORITHMS 8: decay, optimizer re-created
                net_lr *= LR_DECAY
                optimizer = _sgd(net, net_lr)
            progress.update()
    progress.close()
    history.loss = losses
    return history


# ---------------------------------------------------------------------------------------------
# Testing


def _logit_batches(
    nets: Sequence[nn.Module], images: Tensor, device: torch.device, amp: str, batched: bool,
    batch: int,
) -> Iterator[tuple[int, Tensor]]:  # fmt: skip
    """(start, logits [M, b, classes]) per test batch; eval mode, no augmentation.

    The batched pass takes batch // M images at a time, so that its tensors are the size of one
    network's batch (measured faster on CPU); in eval mode the batch size does not change logits.
    """
    for net in nets:
        net.to(device).eval()
    ensemble = _Ensemble(nets) if batched else None
    if ensemble is not None:
        ensemble.train(False)
        batch = max(1, batch // len(nets))
    with torch.no_grad():
        for start in range(0, len(images), batch):
            x = images[start : start + batch].to(device, torch.float32)
            with _autocast(device, amp, batched=batched):
                if ensemble is not None:
                    logits = ensemble(x, shared_input=True)
                else:
                    logits = torch.stack([net(x) for net in nets])
            yield start, logits.float()
    for net in nets:
        net.train()


def network_logits(
    nets: Sequence[nn.Module], images: Tensor, *, device: torch.device = CPU,
    amp: str = "off", batched: bool = True, batch: int = TEST_BATCH,
) -> Tensor:  # fmt: skip
    """Logits [M, N, classes] of every network on `images` (eval mode, no augmentation)."""
    batches = _logit_batches(nets, images, device, amp, batched, batch)
    return torch.cat([logits.cpu() for _, logits in batches], 1)


def networks_accuracy(
    nets: Sequence[nn.Module], images: Tensor, labels: Tensor, *,
    device: torch.device = CPU, amp: str = "off", batched: bool = True,
    batch: int = TEST_BATCH,
) -> list[float]:  # fmt: skip
    """Accuracy in percent of every network on (images, int labels [N])."""
    correct = torch.zeros(len(nets), dtype=torch.int64)
    for start, logits in _logit_batches(nets, images, device, amp, batched, batch):
        target = labels[start : start + logits.shape[1]].to(logits.device)
        correct += (logits.argmax(-1) == target).sum(1).cpu()
    return (correct.double() * 100 / len(labels)).tolist()


# ---------------------------------------------------------------------------------------------
# The protocol


@dataclass
class EvalResult:
    model: str
    accs: list[float]  # percent, one per network
    mean: float
    std: float  # population std (ddof 0), REFERENCE_NOTES 7.2
    seconds: float
    mode: str  # "batched" | "sequential" ("batched+sequential": torchrun ranks differed)
    epochs: int
    lr: float
    batch: int


def _evaluate_networks(
    model_name: str, images: Tensor, labels: Tensor, lr: float, data: Data, indices: list[int],
    config: TrainConfig, device: torch.device, seed: int, batched: bool | None,
) -> tuple[list[float], float, str]:  # fmt: skip
    """Train and test networks `indices` of one model; returns (accuracies, seconds, mode)."""
    start = time.perf_counter()
    if batched is None:  # measured (scripts/bench/eval_batched.py): batching loses on the CPU
        batched = device.type != "cpu"
    batched = batched and len(indices) > 1  # an ensemble of one only adds vmap's overhead
    nets = init_networks(model_name, data, seed, indices)
    train_networks(nets, images, labels, lr, data_generators(seed, indices), config,
                   device=device, batched=batched, desc=f"eval {model_name}")  # fmt: skip
    accs = networks_accuracy(
        nets, data.images_test, data.labels_test, device=device, amp=config.amp, batched=batched
    )
    return accs, time.perf_counter() - start, "batched" if batched else "sequential"


def _result(model_name: str, accs: list[float], seconds: float, lr: float, mode: str,
            config: TrainConfig) -> EvalResult:  # fmt: skip
    return EvalResult(
        model=model_name, accs=accs, mean=statistics.fmean(accs), std=statistics.pstdev(accs),
        seconds=seconds, mode=mode, epochs=config.epochs, lr=lr, batch=config.batch_train,
    )  # fmt: skip


def _checked_setup(
    images: Tensor, labels: Tensor, lr: float, data: Data, model_names: Sequence[str],
    epochs: int, batch_train: int, num_eval: int, amp: str, seed: int, dsa: bool,
    dsa_strategy: str,
) -> tuple[float, TrainConfig]:  # fmt: skip
    """Validate an evaluation's inputs (UserError on a mistake); its lr and training config."""
    lr = check_synset(images, labels, lr, data)
    _check_options(epochs, batch_train, num_eval, amp, seed, dsa, dsa_strategy)
    check_model_names(model_names)
    return lr, TrainConfig(epochs, batch_train, dsa, dsa_strategy, amp)


def evaluate_synset(
    model_name: str,
    images: Tensor,
    labels: Tensor,
    lr: float,
    data: Data,
    *,
    epochs: int = 1000,
    batch_train: int = 256,
    dsa: bool = True,
    dsa_strategy: str = DSA_STRATEGY,
    num_eval: int = 1,
    device: torch.device = CPU,
    seed: int = 0,
    amp: str = "off",
    batched: bool | None = None,
) -> EvalResult:
    """Train `num_eval` fresh `model_name` networks on (images, labels) with `lr` and test them
    (ALGORITHMS 8). labels: float [N, C] logits (soft CE) or int [N] classes (CE)."""
    lr, config = _checked_setup(images, labels, lr, data, [model_name], epochs, batch_train,
                                num_eval, amp, seed, dsa, dsa_strategy)  # fmt: skip
    accs, seconds, mode = _evaluate_networks(
        model_name, images, labels, lr, data, list(range(num_eval)), config, device, seed, batched
    )
    return _result(model_name, accs, seconds, lr, mode, config)


# ---------------------------------------------------------------------------------------------
# Several processes (torchrun)


def rank_and_world() -> tuple[int, int]:
    """(RANK, WORLD_SIZE) set by torchrun; (0, 1) otherwise."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def assign_networks(
    model_names: Sequence[str], num_eval: int, rank: int, world: int
) -> dict[str, list[int]]:
    """The (model, network) pairs of `rank`: round robin over the pairs in model order."""
    pairs = [(m, k) for m in model_names for k in range(num_eval)]
    mine: dict[str, list[int]] = {}
    for m, k in pairs[rank::world]:
        mine.setdefault(m, []).append(k)
    return mine


def evaluate_models(
    model_names: Sequence[str],
    images: Tensor,
    labels: Tensor,
    lr: float,
    data: Data,
    *,
    epochs: int = 1000,
    batch_train: int = 256,
    dsa: bool = True,
    dsa_strategy: str = DSA_STRATEGY,
    num_eval: int = 1,
    device: torch.device = CPU,
    seed: int = 0,
    amp: str = "off",
    batched: bool | None = None,
) -> list[EvalResult]:
    """`evaluate_synset` for every model. Under torchrun the (model, network) pairs are split
    across ranks (each rank trains its share of a model as one ensemble) and gathered over gloo;
    every rank returns the full results. `seconds` is then the slowest rank's time on the model.
    A network's accuracy does not depend on the number of ranks (see the module docstring)."""
    lr, config = _checked_setup(images, labels, lr, data, model_names, epochs, batch_train,
                                num_eval, amp, seed, dsa, dsa_strategy)  # fmt: skip
    rank, world = rank_and_world()
    mine = assign_networks(model_names, num_eval, rank, world)
    local = {}
    for name, indices in mine.items():
        accs, seconds, mode = _evaluate_networks(
            name, images, labels, lr, data, indices, config, device, seed, batched
        )
        local[name] = (dict(zip(indices, accs, strict=True)), seconds, mode)
    shares = _gather(local, world)
    results = []
    for name in model_names:
        owners = [share[name] for share in shares if name in share]
        accs_by_index = {k: acc for by_index, _, _ in owners for k, acc in by_index.items()}
        seconds = max(seconds for _, seconds, _ in owners)
        mode = "+".join(sorted({mode for _, _, mode in owners}))
        accs = [accs_by_index[k] for k in range(num_eval)]
        results.append(_result(name, accs, seconds, lr, mode, config))
    return results


def _gather(local: dict, world: int) -> list[dict]:
    if world == 1:
        return [local]
    import torch.distributed as dist

    owned = not dist.is_initialized()
    if owned:
        dist.init_process_group("gloo")
    shares: list = [None] * world
    dist.all_gather_object(shares, local)
    if owned:
        dist.destroy_process_group()
    return shares
