"""Gradient matching (DC; DSA when augmentation is on) with PAD's depth filter on the distance.

The synthetic set is class-major (class 0's ipc images, then class 1's, ...). One iteration, on a
freshly initialised network, is `outer_loop` outer steps: per class, the distance between the
cross-entropy gradients (w.r.t. the network's parameters) of a real batch and of the class's
synthetic images, one SGD step on the images with the sum over classes, then `inner_loop` epochs
of training the network on the synthetic set (not after the last outer step).

    settings = GMSettings(*get_loops(ipc), dis_metric="ours", depth_ratio=0.0, dsa=True)
    net = fresh_network(cfg.model, channel, num_classes, im_size, generator=g, device=device)
    loss = gm_iteration(net, image_syn, label_syn, optimizer_img, pool, images_train, settings,
                        generator=g)   # the images are updated outer_loop times

`pool` is utils.filters.class_pool's per-class list of train indices (PAD's filter 1); filter 2
is `settings.depth_ratio`, applied by `depth_mask` inside `match_distance`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from utils import augment
from utils.augment import DSA_STRATEGY, DSAParams
from utils.condense import apply_siamese, class_ipc, has_batchnorm, siamese_draw
from utils.filters import check_ratio, sample_class
from utils.io import UserError

DIS_METRICS = ("ours", "mse", "cos")
EPS = 1e-6  # the DC code's guard in every cosine denominator
BN_IMAGES_PER_CLASS = 16  # real images per class that set BatchNorm's statistics each outer step

# (outer_loop, inner_loop) of the DC code by IPC; above the table the last row is reused.
LOOPS_BY_IPC: dict[int, tuple[int, int]] = {
    1: (1, 1),
    10: (10, 50),
    20: (20, 25),
    30: (30, 20),
    40: (40, 15),
    50: (50, 10),
}


def check_dis_metric(metric: str) -> None:
    if metric not in DIS_METRICS:
        raise UserError(f"dis_metric={metric!r} is unknown; use one of {', '.join(DIS_METRICS)}")


def get_loops(
    ipc: int, outer_loop: int | None = None, inner_loop: int | None = None
) -> tuple[int, int]:
    """(outer_loop, inner_loop): explicit values win over the table, which covers IPC 1, 10,
    20, 30, 40, 50 and anything above 50 (as 50). Any other IPC needs both explicit values: the
    DC code stops there, and interpolating the table would invent a setting nobody tuned."""
    if ipc < 1:
        raise UserError(f"ipc={ipc}: expected at least 1 image per class")
    table = LOOPS_BY_IPC[50] if ipc > 50 else LOOPS_BY_IPC.get(ipc)
    if table is None and (outer_loop is None or inner_loop is None):
        raise UserError(
            f"ipc={ipc} has no default (outer_loop, inner_loop) (defaults exist for IPC "
            f"{', '.join(map(str, LOOPS_BY_IPC))} and above 50): set both outer_loop and "
            "inner_loop"
        )
    outer = outer_loop if outer_loop is not None else table[0]
    inner = inner_loop if inner_loop is not None else table[1]
    if outer < 1 or inner < 0:
        raise UserError(
            f"outer_loop={outer}, inner_loop={inner}: expected outer_loop >= 1, inner_loop >= 0"
        )
    return outer, inner


# ---------------------------------------------------------------------------------------------
# The distance and PAD's depth filter


@dataclass(frozen=True)
class DepthMask:
    """Filter 2 for GM: the first `dropped` = int(ratio * P) coordinates of the flat parameter
    vector (parameters in registration order, shallow to deep) are not matched.

    `first_rows[i]` is the first row of parameter tensor i that "ours" still uses, rows being
    the tensor viewed as [shape[0], -1] (one coordinate per row for 1-D tensors). The layer-wise
    distance is a sum of per-row cosines, and a row cannot lose part of its coordinates without
    changing what its cosine means, so a row with any coordinate below `dropped` is dropped
    whole: the cut moves up to the next row boundary. `mse` and `cos` work on the flat vector
    and drop exactly the first `dropped` coordinates, as PAD_depth does.
    """

    dropped: int
    first_rows: tuple[int, ...]


def _rows(shape: torch.Size) -> tuple[int, int]:
    """(rows, row length) of a parameter tensor as the layer-wise distance sees it."""
    numel = shape.numel()
    if len(shape) < 2:
        return numel, 1
    return shape[0], numel // shape[0]


def depth_mask(shapes: Sequence[torch.Size], ratio: float) -> DepthMask | None:
    """The mask for parameter tensors of `shapes` (model.parameters() order); None for ratio 0."""
    check_ratio("depth_ratio", ratio)
    total = sum(s.numel() for s in shapes)
    dropped = int(ratio * total)
    if dropped == 0:
        return None
    first_rows, offset = [], 0
    for shape in shapes:
        rows, length = _rows(shape)
        # first row whose start offset + r * length is >= dropped: ceil((dropped - offset) / length)
        first_rows.append(min(rows, max(0, -(-(dropped - offset) // length))))
        offset += shape.numel()
    return DepthMask(dropped, tuple(first_rows))


def match_distance(
    g_real: Sequence[Tensor],
    g_syn: Sequence[Tensor],
    metric: str = "ours",
    mask: DepthMask | None = None,
) -> Tensor:
    """The distance between two lists of per-parameter gradients (same shapes, same order).

    "ours": sum over tensors of sum over rows of 1 - <g_r, s_r> / (|g_r| |s_r| + eps), a tensor
    viewed as [shape[0], -1] (conv [out, in*h*w], linear as is); 1-D tensors contribute 0.
    "mse": |g - s|^2 and "cos": 1 - <g, s> / (|g| |s| + eps) on the concatenated flat vectors.
    """
    check_dis_metric(metric)
    if len(g_real) != len(g_syn):
        raise ValueError(f"{len(g_real)} real gradients but {len(g_syn)} synthetic ones")
    if metric != "ours":
        start = 0 if mask is None else mask.dropped
        real = torch.cat([g.reshape(-1) for g in g_real])[start:]
        syn = torch.cat([g.reshape(-1) for g in g_syn])[start:]
        if metric == "mse":
            return (syn - real).square().sum()
        return 1 - (real * syn).sum() / (real.norm() * syn.norm() + EPS)
    total = g_syn[0].new_zeros(())
    for i, (gr, gs) in enumerate(zip(g_real, g_syn, strict=True)):
        if gr.dim() < 2:
            continue  # biases and norm weights: the DC code gives them distance 0
        first = 0 if mask is None else mask.first_rows[i]
        gr, gs = gr.reshape(gr.shape[0], -1)[first:], gs.reshape(gs.shape[0], -1)[first:]
        cosine = (gr * gs).sum(1) / (gr.norm(dim=1) * gs.norm(dim=1) + EPS)
        total = total + (1 - cosine).sum()
    return total


# ---------------------------------------------------------------------------------------------
# One outer step


def _ce_gradients(
    model: nn.Module, params: list[Tensor], x: Tensor, label: int, *, create_graph: bool
) -> tuple[Tensor, ...]:
    y = torch.full((len(x),), label, dtype=torch.int64, device=x.device)
    loss = F.cross_entropy(model(x), y)
    return torch.autograd.grad(loss, params, create_graph=create_graph)


def class_gm_loss(
    model: nn.Module,
    real: Tensor,
    syn: Tensor,
    label: int,
    *,
    metric: str = "ours",
    mask: DepthMask | None = None,
    draw: DSAParams | None = None,
) -> Tensor:
    """The matching loss of one class: distance between the CE gradients on `real` (constant)
    and on `syn` (differentiable in syn, through a second-order graph). `draw` is the class's
    shared DSA transformation (utils.condense.siamese_draw), None without augmentation."""
    params = list(model.parameters())
    g_real = _ce_gradients(model, params, apply_siamese(real, draw), label, create_graph=False)
    g_real = [g.detach() for g in g_real]
    g_syn = _ce_gradients(model, params, apply_siamese(syn, draw), label, create_graph=True)
    return match_distance(g_real, g_syn, metric, mask)


def freeze_batchnorm(
    model: nn.Module,
    images_train: Tensor,
    pool: Sequence[Tensor],
    *,
    generator: torch.Generator,
    per_class: int = BN_IMAGES_PER_CLASS,
) -> None:
    """BatchNorm models only: one train-mode forward of `per_class` real images of every class
    sets the running statistics, then every BatchNorm layer is put in eval mode, because a
    class's few synthetic images give unusable batch statistics. No-op without BatchNorm."""
    if not has_batchnorm(model):
        return
    idx = torch.cat([sample_class(members, per_class, generator=generator) for members in pool])
    model.train()
    with torch.no_grad():
        model(images_train[idx.to(images_train.device)])
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()


def gm_outer_step(
    model: nn.Module,
    image_syn: Tensor,
    pool: Sequence[Tensor],
    images_train: Tensor,
    *,
    batch_real: int = 256,
    metric: str = "ours",
    mask: DepthMask | None = None,
    dsa: bool = False,
    strategy: str = DSA_STRATEGY,
    generator: torch.Generator,
) -> Tensor:
    """Add d(sum over classes of the matching loss)/d image_syn to image_syn.grad; returns the
    summed loss (a detached scalar). Each class's graph is freed before the next one is built:
    a class's images appear only in its own term, so the gradient is that of the sum."""
    freeze_batchnorm(model, images_train, pool, generator=generator)
    ipc = class_ipc(image_syn, len(pool))
    total = image_syn.new_zeros(())
    for c, members in enumerate(pool):
        idx = sample_class(members, batch_real, generator=generator)
        real = images_train[idx.to(images_train.device)]
        draw = siamese_draw(image_syn.shape[-2:], strategy, generator=generator) if dsa else None
        syn = image_syn[c * ipc : (c + 1) * ipc]
        loss = class_gm_loss(model, real, syn, c, metric=metric, mask=mask, draw=draw)
        loss.backward(inputs=[image_syn])  # leaves the network's .grad alone
        total += loss.detach()
    return total


# ---------------------------------------------------------------------------------------------
# The inner training and the whole iteration


def train_on_synthetic(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    images: Tensor,
    labels: Tensor,
    *,
    epochs: int,
    batch: int = 256,
    dsa: bool = False,
    strategy: str = DSA_STRATEGY,
    generator: torch.Generator,
) -> None:
    """`epochs` passes of cross-entropy training on (images, labels), each in a fresh random
    order, in train mode (BatchNorm updates its statistics, as the DC code's epoch loop does);
    DSA with per-image parameters when `dsa` is on, no augmentation otherwise."""
    images, labels = images.detach(), labels.detach()
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(images), generator=generator).split(batch):
            idx = idx.to(images.device)
            x = images[idx]
            if dsa:
                x = augment.dsa(x, strategy, generator=generator)
            loss = F.cross_entropy(model(x), labels[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()


@dataclass(frozen=True)
class GMSettings:
    """What one DC/DSA iteration needs besides its tensors (defaults: the DC code's)."""

    outer_loop: int
    inner_loop: int
    batch_real: int = 256
    batch_train: int = 256
    lr_net: float = 0.01
    dis_metric: str = "ours"
    depth_ratio: float = 0.0
    dsa: bool = False
    dsa_strategy: str = DSA_STRATEGY

    def validate(self) -> None:
        check_dis_metric(self.dis_metric)
        check_ratio("depth_ratio", self.depth_ratio)
        for key in ("outer_loop", "batch_real", "batch_train"):
            if getattr(self, key) < 1:
                raise UserError(f"{key}={getattr(self, key)}: expected at least 1")
        if self.inner_loop < 0 or self.lr_net <= 0:
            raise UserError(
                f"inner_loop={self.inner_loop}, lr_net={self.lr_net}: expected inner_loop >= 0 "
                "and lr_net > 0"
            )


def gm_iteration(
    model: nn.Module,
    image_syn: Tensor,
    label_syn: Tensor,
    optimizer_img: torch.optim.Optimizer,
    pool: Sequence[Tensor],
    images_train: Tensor,
    settings: GMSettings,
    *,
    generator: torch.Generator,
) -> float:
    """One DC/DSA iteration on the fresh network `model`: outer_loop image updates with network
    training in between. Returns the loss per class and outer step (the DC code's log value)."""
    settings.validate()
    mask = depth_mask([p.shape for p in model.parameters()], settings.depth_ratio)
    optimizer_net = torch.optim.SGD(model.parameters(), lr=settings.lr_net)
    total = image_syn.new_zeros(()).detach()
    for outer in range(settings.outer_loop):
        optimizer_img.zero_grad()
        total += gm_outer_step(
            model,
            image_syn,
            pool,
            images_train,
            batch_real=settings.batch_real,
            metric=settings.dis_metric,
            mask=mask,
            dsa=settings.dsa,
            strategy=settings.dsa_strategy,
            generator=generator,
        )
        optimizer_img.step()
        if outer < settings.outer_loop - 1:
            train_on_synthetic(
                model,
                optimizer_net,
                image_syn,
                label_syn,
                epochs=settings.inner_loop,
                batch=settings.batch_train,
                dsa=settings.dsa,
                strategy=settings.dsa_strategy,
                generator=generator,
            )
    return total.item() / (len(pool) * settings.outer_loop)
