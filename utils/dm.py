"""Distribution matching (DM) with PAD's depth filter on the matched features.

Every iteration a freshly initialised network (no gradients to its weights, train mode) embeds,
per class, a real batch and the class's synthetic images under one shared DSA transformation;
the loss is the sum over classes of |mean feature(real) - mean feature(syn)|^2.

    net = fresh_network(cfg.model, channel, num_classes, im_size, generator=g, device=device)
    optimizer_img.zero_grad()
    loss = dm_step(net, image_syn, pool, images_train, batch_real=256, depth_ratio=0.0,
                   dsa=True, generator=g)
    optimizer_img.step()

The features (PAD's filter 2 for DM, `depth_ratio` r):
- r = 0: DM's embedding, the flattened output of the last block (the classifier's input);
- r > 0: every block's output (conv-norm-act-pool) flattened and concatenated shallow to deep,
  F values in all, of which the first int(r * F) are dropped. Plain DM is the r = 0 point, so
  the multi-layer features appear only with r > 0. ConvNet-128 on 32x32 (and on 1-channel 28x28,
  whose first convolution pads by 3 and makes 32x32 maps) gives 32768 + 8192 + 2048 values.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
from torch import Tensor

from utils.augment import DSA_STRATEGY, DSAParams
from utils.condense import apply_siamese, class_ipc, has_batchnorm, siamese_draw
from utils.filters import check_ratio, sample_class
from utils.io import UserError
from utils.networks import ConvNet, last_linear


def embedding(model: nn.Module, x: Tensor) -> Tensor:
    """[B, D]: the flattened input of the model's classifier (ConvNet: its last block)."""
    if isinstance(model, ConvNet):
        return model.features(x).flatten(1)
    captured: list[Tensor] = []
    handle = last_linear(model).register_forward_pre_hook(
        lambda module, inputs: captured.append(inputs[0])
    )
    try:
        model(x)
    finally:
        handle.remove()
    return captured[0].flatten(1)


def block_outputs(model: nn.Module, x: Tensor) -> list[Tensor]:
    """Each block's output [B, f_d], flattened, shallow to deep (ConvNet family only)."""
    if not isinstance(model, ConvNet):
        raise UserError(
            f"DM's depth_ratio needs the per-block features of a ConvNet-family model, not "
            f"{type(model).__name__}: use a ConvNet model or depth_ratio 0"
        )
    outputs, h, block = [], x, None
    for name, module in model.features.named_children():
        # modules are named conv{d}, norm{d}, act{d}, pool{d}: a new d starts a block
        d = name[len(name.rstrip("0123456789")) :]
        if block is not None and d != block:
            outputs.append(h.flatten(1))
        block = d
        h = module(h)
    outputs.append(h.flatten(1))
    return outputs


def dm_features(model: nn.Module, x: Tensor, ratio: float = 0.0) -> Tensor:
    """The matched features of x: the embedding for ratio 0, else the concatenated block
    outputs without their first int(ratio * F) values."""
    if ratio == 0:
        return embedding(model, x)
    blocks = block_outputs(model, x)
    dropped = int(ratio * sum(b.shape[1] for b in blocks))
    kept, offset = [], 0
    for b in blocks:  # slice each block instead of copying the dropped part into a concat
        start = max(0, dropped - offset)
        if start < b.shape[1]:
            kept.append(b[:, start:])
        offset += b.shape[1]
    return torch.cat(kept, dim=1)


def class_dm_loss(
    model: nn.Module,
    real: Tensor,
    syn: Tensor,
    *,
    ratio: float = 0.0,
    draw: DSAParams | None = None,
) -> Tensor:
    """|mean features(real) - mean features(syn)|^2 of one class, differentiable in syn."""
    with torch.no_grad():  # real images and frozen weights: nothing to differentiate
        mean_real = dm_features(model, apply_siamese(real, draw), ratio).mean(0)
    mean_syn = dm_features(model, apply_siamese(syn, draw), ratio).mean(0)
    return (mean_real - mean_syn).square().sum()


def joint_dm_loss(
    model: nn.Module,
    reals: Sequence[Tensor],
    syns: Sequence[Tensor],
    *,
    ratio: float = 0.0,
    draws: Sequence[DSAParams | None] | None = None,
) -> Tensor:
    """The DM loss with all classes in one forward pass per side, as DM does for BatchNorm
    networks (train mode: the batch statistics are those of all classes together)."""
    draws = [None] * len(reals) if draws is None else draws
    x_real = torch.cat([apply_siamese(x, d) for x, d in zip(reals, draws, strict=True)])
    x_syn = torch.cat([apply_siamese(x, d) for x, d in zip(syns, draws, strict=True)])
    with torch.no_grad():
        f_real = dm_features(model, x_real, ratio).split([len(x) for x in reals])
    f_syn = dm_features(model, x_syn, ratio).split([len(x) for x in syns])
    mean_real = torch.stack([f.mean(0) for f in f_real])
    mean_syn = torch.stack([f.mean(0) for f in f_syn])
    return (mean_real - mean_syn).square().sum()


def dm_step(
    model: nn.Module,
    image_syn: Tensor,
    pool: Sequence[Tensor],
    images_train: Tensor,
    *,
    batch_real: int = 256,
    depth_ratio: float = 0.0,
    dsa: bool = True,
    strategy: str = DSA_STRATEGY,
    generator: torch.Generator,
) -> Tensor:
    """Add d(DM loss)/d image_syn to image_syn.grad; returns the loss summed over classes
    (detached). `model` is put in train mode with its weights frozen. Without BatchNorm every
    class has its own forward and backward (its graph is freed before the next class)."""
    check_ratio("depth_ratio", depth_ratio)
    if batch_real < 1:
        raise UserError(f"batch_real={batch_real}: expected at least 1")
    model.train()
    for p in model.parameters():
        p.requires_grad_(False)
    ipc = class_ipc(image_syn, len(pool))
    reals, syns, draws = [], [], []
    for c, members in enumerate(pool):
        idx = sample_class(members, batch_real, generator=generator)
        reals.append(images_train[idx.to(images_train.device)])
        syns.append(image_syn[c * ipc : (c + 1) * ipc])
        draws.append(
            siamese_draw(image_syn.shape[-2:], strategy, generator=generator) if dsa else None
        )
    if has_batchnorm(model):
        loss = joint_dm_loss(model, reals, syns, ratio=depth_ratio, draws=draws)
        loss.backward(inputs=[image_syn])
        return loss.detach()
    total = image_syn.new_zeros(())
    for real, syn, draw in zip(reals, syns, draws, strict=True):
        loss = class_dm_loss(model, real, syn, ratio=depth_ratio, draw=draw)
        loss.backward(inputs=[image_syn])
        total += loss.detach()
    return total
