"""GSAM, the sharpness-aware optimizer of PAD's experts (docs/algorithms.md#gsam).

One `GSAM.step(compute_loss)` is: gradient g at w; ascend to w + e; gradient g' there; restore w
exactly; step the base optimizer (SGD) along g' - alpha * (the part of g orthogonal to g').
The norms, the inner product and the decomposition work on one flat vector per gradient, so a
step costs two forward/backward passes plus a few vector kernels, whatever the number of
parameter tensors. With rho == 0 the step is exactly the base optimizer's (one pass).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn as nn
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm

from utils.io import UserError
from utils.trajectory import flatten_params, unflatten_params

EPS = 1e-12  # the reference's perturb_eps, in every division


class GSAM:
    """Surrogate-gap guided SAM (Zhuang et al., 2022) around a base optimizer.

    `rho` (the ascent radius) and `alpha` (the weight of the surrogate-gap term) are plain
    attributes and may be changed between steps. `adaptive=True` scales the ascent by w^2 and
    measures it with |w| * g (ASAM), as the reference does by default.
    """

    def __init__(
        self,
        model: nn.Module,
        base_optimizer: torch.optim.Optimizer,
        *,
        rho: float,
        alpha: float,
        adaptive: bool = True,
    ) -> None:
        if not (math.isfinite(rho) and rho >= 0):
            raise UserError(f"GSAM rho={rho}: expected a finite value >= 0 (0 means plain SGD)")
        if not math.isfinite(alpha):
            raise UserError(f"GSAM alpha={alpha}: expected a finite number (e.g. 0.3)")
        self.model = model
        self.base_optimizer = base_optimizer
        self.rho = float(rho)
        self.alpha = float(alpha)
        self.adaptive = bool(adaptive)
        self._params = [p for group in base_optimizer.param_groups for p in group["params"]]
        # running_mean, running_var and num_batches_tracked of every BatchNorm layer
        self._bn_buffers = [
            buffer
            for module in model.modules()
            if isinstance(module, _BatchNorm) and module.track_running_stats
            for buffer in (module.running_mean, module.running_var, module.num_batches_tracked)
            if buffer is not None
        ]

    def zero_grad(self) -> None:
        self.base_optimizer.zero_grad(set_to_none=True)

    def step(self, compute_loss: Callable[[], tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
        """Both passes and the base step; returns the first pass's (loss, logits), detached.

        `compute_loss()` must run the forward pass on the model's current parameters (the same
        batch both times) and return (loss, logits); GSAM calls backward itself.
        """
        self.zero_grad()
        loss, logits = compute_loss()
        loss.backward()
        params = [p for p in self._params if p.grad is not None]
        if self.rho == 0 or not params:
            # e = 0 makes g' = g and the orthogonal part 0: the update is g, i.e. plain SGD
            self.base_optimizer.step()
            return loss.detach(), logits.detach()

        shapes = [p.shape for p in params]
        with torch.no_grad():
            weights = flatten_params(params)  # a copy: restores w bit-exactly after the ascent
            grad = flatten_params([p.grad for p in params])
            ascent = self._ascent(weights, grad)  # docs/algorithms.md#gsam: e
            torch._foreach_add_(params, unflatten_params(ascent, shapes))

        self.zero_grad()
        bn_saved = [buffer.clone() for buffer in self._bn_buffers]
        compute_loss()[0].backward()
        with torch.no_grad():
            if bn_saved:
                torch._foreach_copy_(self._bn_buffers, bn_saved)  # no trace of the 2nd pass in BN
            missing = [i for i, p in enumerate(params) if p.grad is None]
            if missing:
                raise RuntimeError(f"GSAM: parameters {missing} got no gradient in the 2nd pass")
            direction = self._direction(grad, flatten_params([p.grad for p in params]))
            torch._foreach_copy_(params, unflatten_params(weights, shapes))
            torch._foreach_copy_([p.grad for p in params], unflatten_params(direction, shapes))
        self.base_optimizer.step()
        return loss.detach(), logits.detach()

    def _ascent(self, weights: Tensor, grad: Tensor) -> Tensor:
        """e = rho * g / |g|, or with `adaptive` e = rho * w^2 * g / | |w| * g |."""
        if self.adaptive:
            magnitude = weights.abs()
            scaled = magnitude * grad
            scale = self.rho / (scaled.norm() + EPS)
            return scaled.mul_(magnitude).mul_(scale)  # |w| * |w| * g = w^2 * g
        return grad * (self.rho / (grad.norm() + EPS))

    def _direction(self, grad: Tensor, grad_perturbed: Tensor) -> Tensor:
        """g' - alpha * g_vertical, with g_vertical the part of g orthogonal to g' (plain norms)."""
        norm, norm_perturbed = grad.norm(), grad_perturbed.norm()
        cosine = torch.dot(grad, grad_perturbed) / (norm * norm_perturbed + EPS)
        vertical = grad - (cosine * norm / (norm_perturbed + EPS)) * grad_perturbed
        return grad_perturbed - self.alpha * vertical
