"""What gradient matching (utils/gm.py) and distribution matching (utils/dm.py) share.

Both methods draw a freshly initialised network every iteration and, per class, a real batch and
the class's synthetic images that go through one shared ("Siamese") DSA transformation. Every
random draw here comes from a caller-owned `torch.Generator`, so a run that checkpoints the
generator's state resumes exactly:

    net = fresh_network("ConvNet", channel, num_classes, im_size, generator=g, device=device)
    draw = siamese_draw(im_size, DSA_STRATEGY, generator=g)         # one draw for class c
    x_real, x_syn = apply_siamese(x_real, draw), apply_siamese(x_syn, draw)
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from utils.augment import DSAParams, apply_dsa, sample_dsa_params
from utils.networks import get_network

_SEED_BOUND = 2**62


def fresh_network(
    name: str,
    channel: int,
    num_classes: int,
    im_size: tuple[int, int],
    *,
    generator: torch.Generator,
    device: torch.device | str = "cpu",
) -> nn.Module:
    """A new network whose initial weights are a function of `generator`'s state alone.

    `get_network` initialises from the global CPU RNG; a seed drawn from `generator` is set on it
    inside `fork_rng`, so the global RNG is left as it was and a resumed run draws the same nets.
    """
    seed = int(torch.randint(_SEED_BOUND, (1,), generator=generator))
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)  # CPU only: CUDA's RNG is untouched
        model = get_network(name, channel, num_classes, im_size)
    return model.to(device)


def copy_weights(source: nn.Module, target: nn.Module) -> None:
    """target's parameters and buffers := source's, in place (same architecture): a compiled
    network keeps its compiled code while taking each fresh network's weights."""
    with torch.no_grad():
        for mine, theirs in zip(target.parameters(), source.parameters(), strict=True):
            mine.copy_(theirs)
        for mine, theirs in zip(target.buffers(), source.buffers(), strict=True):
            mine.copy_(theirs)


def class_ipc(image_syn: Tensor, num_classes: int) -> int:
    """Images per class of a class-major synthetic set."""
    if len(image_syn) % num_classes:
        raise ValueError(f"{len(image_syn)} synthetic images do not split into {num_classes}")
    return len(image_syn) // num_classes


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def siamese_draw(
    im_size: tuple[int, int], strategy: str, *, generator: torch.Generator
) -> DSAParams:
    """One DSA transformation (op and parameters) for a whole class: real and synthetic batch.

    The DC/DSA/DM code augments both batches with the same seed, and its seeded mode gives every
    image the parameters of image 0; so one image's parameters are drawn and broadcast.
    """
    return sample_dsa_params(1, im_size, strategy, generator=generator)


def apply_siamese(x: Tensor, draw: DSAParams | None) -> Tensor:
    """x [B, C, H, W] under the one transformation `draw` (None: unchanged)."""
    if draw is None:
        return x
    return apply_dsa(x, draw.select(torch.zeros(len(x), dtype=torch.int64)))
