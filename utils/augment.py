"""Image augmentation: DSA (differentiable Siamese augmentation) and the older DC augmentation.

DSA (docs/algorithms.md#dsa-augmentation) is split into two steps so that a call can be replayed:
`sample_dsa_params` draws the random parameters of one call into a `DSAParams`, and `apply_dsa`
applies them deterministically and differentiably (gradients reach the pixels through every op).
The low-memory distillation keeps each inner step's `DSAParams` to rebuild that step exactly; the
batched evaluation samples one `DSAParams` per network; "Siamese" use applies one `DSAParams` to
two batches of the same size.

    params = sample_dsa_params(len(x), x.shape[-2:], generator=g)   # small CPU tensors
    x_aug = apply_dsa(x, params)                                     # == dsa(x, generator=g)

The DC augmentation (`dc_augment`, used only when dsa=False) is not differentiable.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from utils.io import UserError

DSA_STRATEGY = "color_crop_cutout_flip_scale_rotate"
DSA_TOKENS = ("color", "crop", "cutout", "flip", "scale", "rotate")
DC_TOKENS = ("crop", "scale", "rotate", "noise")


@dataclass(frozen=True)
class ParamDiffAug:
    """DSA hyper-parameters (docs/algorithms.md#dsa-parameters); no config changes them."""

    aug_mode: str = "S"  # 'S': one op of the strategy per call; 'M': all of them in order
    prob_flip: float = 0.5
    ratio_scale: float = 1.2
    ratio_rotate: float = 15.0  # degrees
    ratio_crop_pad: float = 0.125
    ratio_cutout: float = 0.5
    brightness: float = 1.0
    saturation: float = 2.0
    contrast: float = 0.5


DEFAULT_DSA_PARAM = ParamDiffAug()


@dataclass
class DSAParams:
    """The sampled parameters of one DSA call: `ops` = [(token, {name: tensor [B]}), ...].

    Tokens are the strategy's op names, applied in list order; every tensor has one entry per
    image (int64 / bool / float32, on the CPU after sampling):
      color:  brightness (added), saturation (factor), contrast (factor), applied in that order
      crop:   tx, ty -- out[b, :, i, j] = x[b, :, i + tx, j + ty], zero where that is outside
      cutout: top, bottom, left, right -- rows [top, bottom) x columns [left, right) set to zero
      flip:   flip -- flip along the width where True
      scale:  sx, sy -- affine matrix [[sx, 0, 0], [0, sy, 0]] (sx acts on the width)
      rotate: angle (radians) -- affine matrix [[cos, -sin, 0], [sin, cos, 0]]
    An empty list is the identity.
    """

    ops: list[tuple[str, dict[str, Tensor]]] = field(default_factory=list)

    def to(self, device: torch.device | str) -> DSAParams:
        return DSAParams([(op, {k: v.to(device) for k, v in p.items()}) for op, p in self.ops])

    def select(self, index: Tensor) -> DSAParams:
        """Parameters of the rows `index` (int64 indices or a bool mask over the batch)."""
        return DSAParams(
            [(op, {k: v[index.to(v.device)] for k, v in p.items()}) for op, p in self.ops]
        )


def _strategy_tokens(strategy: str, valid: tuple[str, ...]) -> list[str]:
    if strategy.lower() in ("", "none"):
        return []
    tokens = strategy.split("_")
    unknown = [t for t in tokens if t not in valid]
    if unknown:
        raise UserError(
            f"augmentation strategy {strategy!r} has unknown op(s) {unknown}; "
            f"use '_'-joined names from {list(valid)}, or 'none'"
        )
    return tokens


# ---- DSA sampling (docs/algorithms.md#dsa-operations): one function per token,
# draws in a fixed order


def _sample_color(b: int, h: int, w: int, g: torch.Generator | None, p: ParamDiffAug) -> dict:
    return {
        "brightness": (torch.rand(b, generator=g) - 0.5) * p.brightness,
        "saturation": torch.rand(b, generator=g) * p.saturation,
        "contrast": torch.rand(b, generator=g) + p.contrast,
    }


def _sample_crop(b: int, h: int, w: int, g: torch.Generator | None, p: ParamDiffAug) -> dict:
    shift_h, shift_w = int(h * p.ratio_crop_pad + 0.5), int(w * p.ratio_crop_pad + 0.5)
    return {
        "tx": torch.randint(-shift_h, shift_h + 1, (b,), generator=g),
        "ty": torch.randint(-shift_w, shift_w + 1, (b,), generator=g),
    }


def _sample_cutout(b: int, h: int, w: int, g: torch.Generator | None, p: ParamDiffAug) -> dict:
    size_h, size_w = int(h * p.ratio_cutout + 0.5), int(w * p.ratio_cutout + 0.5)
    # The centre range [0, size + 1 - side % 2) includes `size` itself for an even side, as in
    # the reference; the square then always overlaps the image and is truncated at the border.
    centre_h = torch.randint(0, h + 1 - size_h % 2, (b,), generator=g)
    centre_w = torch.randint(0, w + 1 - size_w % 2, (b,), generator=g)
    top, left = centre_h - size_h // 2, centre_w - size_w // 2
    return {"top": top, "bottom": top + size_h, "left": left, "right": left + size_w}


def _sample_flip(b: int, h: int, w: int, g: torch.Generator | None, p: ParamDiffAug) -> dict:
    return {"flip": torch.rand(b, generator=g) < p.prob_flip}


def _sample_scale(b: int, h: int, w: int, g: torch.Generator | None, p: ParamDiffAug) -> dict:
    low = 1.0 / p.ratio_scale
    return {
        "sx": torch.rand(b, generator=g) * (p.ratio_scale - low) + low,
        "sy": torch.rand(b, generator=g) * (p.ratio_scale - low) + low,
    }


def _sample_rotate(b: int, h: int, w: int, g: torch.Generator | None, p: ParamDiffAug) -> dict:
    return {"angle": (torch.rand(b, generator=g) - 0.5) * 2 * p.ratio_rotate / 180 * math.pi}


_SAMPLERS: dict[str, Callable[..., dict[str, Tensor]]] = {
    "color": _sample_color,
    "crop": _sample_crop,
    "cutout": _sample_cutout,
    "flip": _sample_flip,
    "scale": _sample_scale,
    "rotate": _sample_rotate,
}


def sample_dsa_params(
    batch_size: int,
    im_size: Sequence[int],
    strategy: str = DSA_STRATEGY,
    *,
    generator: torch.Generator | None = None,
    param: ParamDiffAug = DEFAULT_DSA_PARAM,
) -> DSAParams:
    """Draw one DSA call's parameters for `batch_size` images of size `im_size` (H, W).

    Mode 'S' draws one token uniformly, then per-image parameters for it; mode 'M' draws every
    token's parameters in strategy order. `generator` is a CPU generator (None = global RNG).
    """
    if param.aug_mode not in ("S", "M"):
        raise UserError(f"DSA aug_mode {param.aug_mode!r} is unknown; use 'S' or 'M'")
    tokens = _strategy_tokens(strategy, DSA_TOKENS)
    if tokens and param.aug_mode == "S":
        tokens = [tokens[int(torch.randint(len(tokens), (1,), generator=generator))]]
    h, w = int(im_size[0]), int(im_size[1])
    return DSAParams([(t, _SAMPLERS[t](batch_size, h, w, generator, param)) for t in tokens])


# ---- DSA application: deterministic, vectorised over the batch, differentiable in x ----


def _per_image(v: Tensor) -> Tensor:
    return v.view(-1, 1, 1, 1)


def _gather_pixels(x: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """out[b, :, i, j] = x[b, :, rows[b, i], cols[b, j]], and zero where an index is outside x."""
    b, c, h, w = x.shape
    inside = ((rows >= 0) & (rows < h))[:, :, None] & ((cols >= 0) & (cols < w))[:, None, :]
    flat_index = rows.clamp(0, h - 1)[:, :, None] * w + cols.clamp(0, w - 1)[:, None, :]
    out = x.flatten(2).gather(2, flat_index.flatten(1)[:, None, :].expand(b, c, -1))
    return out.view(b, c, rows.shape[1], cols.shape[1]) * inside[:, None].to(x.dtype)


def _affine(x: Tensor, a: Tensor, b: Tensor, c: Tensor, d: Tensor) -> Tensor:
    """Resample x with the per-image matrices [[a, b, 0], [c, d, 0]]
    (docs/algorithms.md#dsa-operations)."""
    zero = torch.zeros_like(a)
    theta = torch.stack([torch.stack([a, b, zero], 1), torch.stack([c, d, zero], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=True)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=True)


def _apply_color(x: Tensor, p: dict[str, Tensor]) -> Tensor:
    # brightness x + b, then saturation (x - m_pixel) * s + m_pixel, then contrast
    # (x - m_image) * k + m_image (docs/algorithms.md#dsa-operations), collapsed into one pass over
    # x: the channel mean of x + b is m + b, and saturation leaves the image mean at mu + b, so
    # out = k*s*x + k*(1 - s)*m + (1 - k)*mu + b, with m the channel mean of x, mu its image mean.
    b, s, k = _per_image(p["brightness"]), _per_image(p["saturation"]), _per_image(p["contrast"])
    pixel_mean = x.mean(dim=1, keepdim=True)
    image_mean = pixel_mean.mean(dim=(2, 3), keepdim=True)
    return (k * s) * x + ((k * (1 - s)) * pixel_mean + ((1 - k) * image_mean + b))


def _apply_crop(x: Tensor, p: dict[str, Tensor]) -> Tensor:
    rows = torch.arange(x.shape[2], device=x.device) + p["tx"][:, None]
    cols = torch.arange(x.shape[3], device=x.device) + p["ty"][:, None]
    return _gather_pixels(x, rows, cols)


def _apply_cutout(x: Tensor, p: dict[str, Tensor]) -> Tensor:
    i = torch.arange(x.shape[2], device=x.device)
    j = torch.arange(x.shape[3], device=x.device)
    in_rows = (i >= p["top"][:, None]) & (i < p["bottom"][:, None])  # [B, H]
    in_cols = (j >= p["left"][:, None]) & (j < p["right"][:, None])  # [B, W]
    keep = ~(in_rows[:, :, None] & in_cols[:, None, :])
    return x * keep[:, None].to(x.dtype)


def _apply_flip(x: Tensor, p: dict[str, Tensor]) -> Tensor:
    return torch.where(_per_image(p["flip"]), x.flip(3), x)


def _apply_scale(x: Tensor, p: dict[str, Tensor]) -> Tensor:
    zero = torch.zeros_like(p["sx"])
    return _affine(x, p["sx"], zero, zero, p["sy"])


def _apply_rotate(x: Tensor, p: dict[str, Tensor]) -> Tensor:
    cos, sin = torch.cos(p["angle"]), torch.sin(p["angle"])
    return _affine(x, cos, -sin, sin, cos)


_APPLIERS: dict[str, Callable[[Tensor, dict[str, Tensor]], Tensor]] = {
    "color": _apply_color,
    "crop": _apply_crop,
    "cutout": _apply_cutout,
    "flip": _apply_flip,
    "scale": _apply_scale,
    "rotate": _apply_rotate,
}


def apply_dsa(x: Tensor, params: DSAParams) -> Tensor:
    """Apply sampled DSA parameters to images x [B, C, H, W] (same B as sampled)."""
    for token, p in params.ops:
        moved = {}
        for name, v in p.items():
            if v.shape[0] != x.shape[0]:
                raise ValueError(f"DSA {token}.{name}: {v.shape[0]} rows for {x.shape[0]} images")
            dtype = x.dtype if v.is_floating_point() else v.dtype
            moved[name] = v.to(device=x.device, dtype=dtype)
        x = _APPLIERS[token](x, moved)
    return x


def dsa(
    x: Tensor,
    strategy: str = DSA_STRATEGY,
    *,
    generator: torch.Generator | None = None,
    param: ParamDiffAug = DEFAULT_DSA_PARAM,
) -> Tensor:
    """Sample and apply one DSA call (docs/algorithms.md#dsa-call-semantics with seed = -1)."""
    return apply_dsa(
        x, sample_dsa_params(len(x), x.shape[-2:], strategy, generator=generator, param=param)
    )


# ---- DC augmentation (dsa=False): the DC codebase's per-image crop / scale / rotate / noise ----


@dataclass(frozen=True)
class ParamDCAug:
    """The DC codebase's augmentation parameters (its `get_daparam` values for ConvNet)."""

    strategy: str = "crop_scale_rotate"  # one op per image, chosen uniformly; 'noise' optional
    crop: int = 4  # pixels of padding for a random crop
    scale: float = 0.2  # each side resized by a factor in [1 - scale, 1 + scale)
    rotate: int = 45  # integer degrees in [-rotate, rotate)
    noise: float = 0.001  # std of additive Gaussian noise


DEFAULT_DC_PARAM = ParamDCAug()


def _dc_crop(x: Tensor, fill: Tensor, g: torch.Generator | None, p: ParamDCAug) -> Tensor:
    # A crop of the image padded by `crop` pixels of the channel means: a shift in [-crop, crop).
    b, _, h, w = x.shape
    shift_h = torch.randint(0, 2 * p.crop, (b, 1), generator=g).to(x.device) - p.crop
    shift_w = torch.randint(0, 2 * p.crop, (b, 1), generator=g).to(x.device) - p.crop
    rows = torch.arange(h, device=x.device) + shift_h
    cols = torch.arange(w, device=x.device) + shift_w
    fill = fill.view(1, -1, 1, 1)
    return _gather_pixels(x - fill, rows, cols) + fill


def _dc_resized_index(size: int, new_size: Tensor, canvas: Tensor) -> Tensor:
    """Source index per output position [B, size] of: nearest-resize to new_size, centre on a
    zero canvas, centre-crop `size` (the DC scale op); -1 where the output is canvas."""
    offset = (canvas - size) // 2 - (canvas - new_size) // 2
    pos = torch.arange(size, device=new_size.device) + offset  # position in the resized image
    source = torch.floor(pos * (size / new_size)).long().clamp(max=size - 1)  # as F.interpolate
    return torch.where((pos >= 0) & (pos < new_size), source, -1)


def _dc_scale(x: Tensor, fill: Tensor, g: torch.Generator | None, p: ParamDCAug) -> Tensor:
    b, _, h, w = x.shape
    new_h = ((torch.rand(b, 1, generator=g) * 2 - 1) * p.scale + 1).mul(h).long().to(x.device)
    new_w = ((torch.rand(b, 1, generator=g) * 2 - 1) * p.scale + 1).mul(w).long().to(x.device)
    canvas = torch.stack([new_h, new_w, torch.full_like(new_h, max(h, w))]).amax(0)
    rows = _dc_resized_index(h, new_h, canvas)
    cols = _dc_resized_index(w, new_w, canvas)
    return _gather_pixels(x, rows, cols)


def _dc_rotate(x: Tensor, fill: Tensor, g: torch.Generator | None, p: ParamDCAug) -> Tensor:
    # DC rotates with scipy (cubic spline, filled with the mean of the channel means); bilinear
    # resampling about the centre is close enough for a non-differentiable baseline.
    degrees = torch.randint(-p.rotate, p.rotate, (len(x),), generator=g)
    angle = (degrees * (math.pi / 180)).to(device=x.device, dtype=x.dtype)
    cos, sin = torch.cos(angle), torch.sin(angle)
    fill = fill.mean()
    return _affine(x - fill, cos, -sin, sin, cos) + fill


def _dc_noise(x: Tensor, fill: Tensor, g: torch.Generator | None, p: ParamDCAug) -> Tensor:
    return x + p.noise * torch.randn(x.shape, generator=g).to(device=x.device, dtype=x.dtype)


_DC_OPS: dict[str, Callable[..., Tensor]] = {
    "crop": _dc_crop,
    "scale": _dc_scale,
    "rotate": _dc_rotate,
    "noise": _dc_noise,
}


def dc_augment(
    x: Tensor, *, generator: torch.Generator | None = None, param: ParamDCAug = DEFAULT_DC_PARAM
) -> Tensor:
    """DC augmentation of x [B, C, H, W]: each image gets one op of `param.strategy`, chosen
    uniformly. Not differentiable: returns a new tensor without a graph."""
    tokens = _strategy_tokens(param.strategy, DC_TOKENS)
    with torch.no_grad():
        out = x.detach().clone()
        if not tokens:
            return out
        choice = torch.randint(len(tokens), (len(x),), generator=generator)
        channel_mean = x.mean(dim=(0, 2, 3))  # DC fills with the batch's channel means
        for k, token in enumerate(tokens):
            rows = (choice == k).nonzero().squeeze(1).to(x.device)
            if len(rows):
                out[rows] = _DC_OPS[token](x[rows], channel_mean, generator, param)
    return out


def augment(
    x: Tensor,
    *,
    dsa: bool,
    strategy: str = DSA_STRATEGY,
    generator: torch.Generator | None = None,
) -> Tensor:
    """DSA with `strategy` when dsa is True, else the DC augmentation
    (docs/algorithms.md#dsa-augmentation)."""
    if dsa:
        params = sample_dsa_params(len(x), x.shape[-2:], strategy, generator=generator)
        return apply_dsa(x, params)
    return dc_augment(x, generator=generator)
