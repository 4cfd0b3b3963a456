"""Evaluation of a synthetic set: train fresh networks on it, test them on the real test set.

`evaluate_synset` is docs/algorithms.md#evaluation-protocol: `num_eval` fresh networks trained on
the set by the schedule of `utils.train_nets.train_networks` (E = `epochs`, passes ep = 0..E, SGD
with momentum 0.9 and weight decay 5e-4, the lr times 0.1 after the pass E // 2 + 1), then tested on
`data.images_test` (batches of 256, eval mode, no augmentation); accuracies are in percent, with
the mean and population std over the `num_eval` networks. `evaluate_models` does this for every
model of a pool (`eval_pool`), split across torchrun ranks.

The networks of one model train as one batched ensemble on GPUs and one after the other on the
CPU, where that measured faster (`batched=None`); an evaluation of a single network is never
batched (an ensemble of one only adds vmap's overhead). See utils/train_nets.py for both engines.

Randomness: network k of an evaluation with seed s draws from two streams derived from (s, k)
(`utils.runtime.derived_seeds`): one seeds its initialisation, the other a CPU `torch.Generator`
that draws, per pass, the permutation of the set and then, per batch, the DSA parameters. So a
network's initial weights, data order and augmentations do not depend on the engine, on how many
networks train beside it or on which rank, under torchrun. The global RNGs are left untouched.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from utils.augment import DSA_STRATEGY, sample_dsa_params
from utils.data import Data
from utils.io import UserError
from utils.networks import check_model_names, get_network
from utils.runtime import AMP_MODES, derived_seeds, gather_objects, rank_and_world
from utils.train_nets import CPU, TrainConfig, networks_accuracy, train_networks

# ---------------------------------------------------------------------------------------------
# Evaluation pools (docs/algorithms.md#model-pools)

EVAL_POOLS: dict[str, tuple[str, ...]] = {
    "M": ("ConvNet", "AlexNet", "VGG11", "ResNet18"),
    "W": ("ConvNetW32", "ConvNetW64", "ConvNetW128", "ConvNetW256"),
    "D": ("ConvNetD1", "ConvNetD2", "ConvNetD3", "ConvNetD4"),
    "A": ("ConvNetAS", "ConvNetAR", "ConvNetAL"),
    "P": ("ConvNetNP", "ConvNetMP", "ConvNetAP"),
    "N": ("ConvNetNN", "ConvNetBN", "ConvNetLN", "ConvNetIN", "ConvNetGN"),
    "BN": ("ConvNet", "ConvNetBN", "ResNet18", "ResNet18BN", "AlexNet", "VGG11", "ResNet18_AP"),
    # ours (docs/algorithms.md#model-pools): the paper's Table 2; the 64x64 version is X_TINY_POOL
    "X": ("ConvNet", "ConvNetBN", "ResNet18", "ResNet18BN", "VGG11", "AlexNet", "LeNet", "MLP"),
}
X_TINY_POOL = (
    "ConvNetD4", "ConvNetD4BN", "ResNet18_Tiny", "ResNet18BN_Tiny", "VGG11_Tiny", "AlexNet_Tiny",
    "LeNet_Tiny", "MLP_Tiny",
)  # fmt: skip
EVAL_MODES = ("S", "C", *EVAL_POOLS)


def eval_pool(eval_mode: str, model: str, im_size: tuple[int, int] = (32, 32)) -> list[str]:
    """The models an evaluation trains for `eval_mode` (docs/algorithms.md#model-pools).

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
# Networks and their seeds


def init_networks(
    model_name: str, data: Data, seed: int, indices: Sequence[int]
) -> list[nn.Module]:
    """Networks `indices` of an evaluation, each initialised from its own seed (CPU, train mode);
    the global torch RNG is restored afterwards."""
    nets = []
    with torch.random.fork_rng(devices=[]):
        for k in indices:
            torch.manual_seed(derived_seeds(seed, k)[0])
            nets.append(get_network(model_name, data.channel, data.num_classes, data.im_size))
    return nets


def data_generators(seed: int, indices: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per network for its permutations and augmentation parameters."""
    return [torch.Generator().manual_seed(derived_seeds(seed, k)[1]) for k in indices]


# ---------------------------------------------------------------------------------------------
# The protocol


@dataclass
class EvalResult:
    model: str
    accs: list[float]  # percent, one per network
    mean: float
    std: float  # population std (ddof 0), docs/algorithms.md#statistics-and-seeds
    seconds: float
    mode: str  # "batched" | "sequential" ("batched+sequential": torchrun ranks differed)
    epochs: int
    lr: float
    batch: int
    # on data.images_val when the data set holds one (docs/evaluation.md#validation-split)
    val_accs: list[float] | None = None
    val_mean: float | None = None
    val_std: float | None = None


def _evaluate_networks(
    model_name: str, images: Tensor, labels: Tensor, lr: float, data: Data, indices: list[int],
    config: TrainConfig, device: torch.device, seed: int, batched: bool | None,
) -> tuple[list[float], list[float] | None, float, str]:  # fmt: skip
    """Train and test networks `indices` of one model; returns (test accuracies, validation
    accuracies or None, seconds, mode)."""
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
    val_accs = None
    if data.images_val is not None:
        val_accs = networks_accuracy(
            nets, data.images_val, data.labels_val, device=device, amp=config.amp, batched=batched
        )
    return accs, val_accs, time.perf_counter() - start, "batched" if batched else "sequential"


def _result(model_name: str, accs: list[float], seconds: float, lr: float, mode: str,
            config: TrainConfig, val_accs: list[float] | None = None) -> EvalResult:  # fmt: skip
    result = EvalResult(
        model=model_name, accs=accs, mean=statistics.fmean(accs), std=statistics.pstdev(accs),
        seconds=seconds, mode=mode, epochs=config.epochs, lr=lr, batch=config.batch_train,
    )  # fmt: skip
    if val_accs is not None:
        result.val_accs = val_accs
        result.val_mean, result.val_std = statistics.fmean(val_accs), statistics.pstdev(val_accs)
    return result


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
    model_name: str, images: Tensor, labels: Tensor, lr: float, data: Data, **options: Any
) -> EvalResult:
    """Train `num_eval` fresh `model_name` networks on (images, labels) with `lr` and test them
    (docs/algorithms.md#evaluation-protocol). labels: float [N, C] logits (soft CE) or int [N]
    classes (CE). `options`: the keywords of `evaluate_models`, with its defaults; this process
    trains every network, also under torchrun."""
    return evaluate_models([model_name], images, labels, lr, data, ranks=(0, 1), **options)[0]


# ---------------------------------------------------------------------------------------------
# Several processes (torchrun)


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
    ranks: tuple[int, int] | None = None,
) -> list[EvalResult]:
    """`evaluate_synset` for every model. The (model, network) pairs are split across the
    (rank, world size) `ranks` (default: torchrun's; each rank trains its share of a model as one
    ensemble) and gathered over gloo; every rank returns the full results. `seconds` is then the
    slowest rank's time on the model. A network's accuracy does not depend on the number of ranks
    (see the module docstring)."""
    lr, config = _checked_setup(images, labels, lr, data, model_names, epochs, batch_train,
                                num_eval, amp, seed, dsa, dsa_strategy)  # fmt: skip
    rank, world = rank_and_world() if ranks is None else ranks
    mine = assign_networks(model_names, num_eval, rank, world)
    local = {}
    for name, indices in mine.items():
        accs, val_accs, seconds, mode = _evaluate_networks(
            name, images, labels, lr, data, indices, config, device, seed, batched
        )
        val = {} if val_accs is None else dict(zip(indices, val_accs, strict=True))
        local[name] = (dict(zip(indices, accs, strict=True)), seconds, mode, val)
    shares = gather_objects(local, world)
    results = []
    for name in model_names:
        owners = [share[name] for share in shares if name in share]
        accs_by_index = {k: acc for by_index, _, _, _ in owners for k, acc in by_index.items()}
        val_by_index = {k: acc for *_, by_index in owners for k, acc in by_index.items()}
        seconds = max(seconds for _, seconds, _, _ in owners)
        mode = "+".join(sorted({mode for _, _, mode, _ in owners}))
        accs = [accs_by_index[k] for k in range(num_eval)]
        val_accs = [val_by_index[k] for k in range(num_eval)] if val_by_index else None
        results.append(_result(name, accs, seconds, lr, mode, config, val_accs))
    return results
