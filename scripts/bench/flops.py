"""FLOP counting and large-batch training throughput, shared by the benchmarks."""

from __future__ import annotations

import time

import torch
from torch import nn


def forward_macs(model: nn.Module, x: torch.Tensor) -> int:
    """Multiply-adds of the Conv2d and Linear layers for one forward pass of x (per batch)."""
    total = 0

    def count(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        nonlocal total
        if isinstance(module, nn.Conv2d):
            kh, kw = module.kernel_size
            total += output.numel() * (module.in_channels // module.groups) * kh * kw
        elif isinstance(module, nn.Linear):
            total += output.numel() * module.in_features

    handles = [m.register_forward_hook(count) for m in model.modules()]
    with torch.no_grad():
        model(x)
    for handle in handles:
        handle.remove()
    return total


def train_gflop_per_image(model: nn.Module, image_shape: tuple[int, ...]) -> float:
    """GFLOP of one trained image: forward (2 x multiply-adds) plus backward (~2 x forward)."""
    return 3 * 2 * forward_macs(model, torch.zeros(1, *image_shape)) / 1e9


def large_batch_train_gflops(model: nn.Module, image_shape: tuple[int, ...], batch: int = 256,
                      steps: int = 4) -> float:  # fmt: skip
    """GFLOP/s of plain large-batch training steps of `model` (float32, no augmentation): the
    rate this CPU and this PyTorch reach when every operation gets a big batch."""
    x = torch.randn(batch, *image_shape)
    y = torch.randint(0, 10, (batch,))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return batch * train_gflop_per_image(model, image_shape) / min(times[1:])
