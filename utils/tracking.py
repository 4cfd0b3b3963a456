"""What a run leaves for people: metrics.jsonl, PNG image grids and curves, optional wandb.

wandb is off unless asked for (`off`, `offline`, `online`); a run never fails because wandb is
missing, offline or broken: the logger then warns once and keeps writing the local files.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F


class MetricsLog:
    """Appends one JSON object per line; each line is flushed so a killed run keeps its history."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def log(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, default=_plain)
        with open(self.path, "a") as f:
            f.write(line + "\n")
            f.flush()

    def read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        lines = [line for line in self.path.read_text().splitlines() if line.strip()]
        records = []
        for number, line in enumerate(lines):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                if number == len(lines) - 1:  # the line a kill cut short: those steps run again
                    break
                raise
        return records


def _plain(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def grid_images(
    images: torch.Tensor, upsample: int = 4, clip_std: float | None = None
) -> torch.Tensor:
    """The reference's image-grid preparation: optional clipping, 4x upsampling, per-image [0, 1].

    clip_std=2.5 clips each image to its mean +- 2.5 std first (the "clipped" grids of 7.6).
    """
    x = images.detach().float().cpu()
    if clip_std is not None:
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        std = x.std(dim=(1, 2, 3), keepdim=True)
        x = torch.maximum(torch.minimum(x, mean + clip_std * std), mean - clip_std * std)
    if upsample > 1:
        x = F.interpolate(x, scale_factor=upsample, mode="nearest")
    low = x.amin(dim=(1, 2, 3), keepdim=True)
    high = x.amax(dim=(1, 2, 3), keepdim=True)
    return (x - low) / (high - low).clamp_min(1e-12)


def save_image_grid(
    images: torch.Tensor,
    path: str | os.PathLike,
    nrow: int = 10,
    upsample: int = 4,
    clip_std: float | None = None,
) -> None:
    """Write images [N, C, H, W] as one PNG grid (`nrow` per row), atomically."""
    from torchvision.utils import save_image

    from utils.io import atomic_write

    with atomic_write(path) as tmp:
        save_image(grid_images(images, upsample, clip_std), tmp, nrow=nrow, padding=2, format="png")


def plot_curves(
    path: str | os.PathLike,
    x: list,
    series: dict[str, list],
    xlabel: str = "iteration",
    title: str = "",
) -> None:
    """One PNG with one panel per series (they usually have different scales)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from utils.io import atomic_write

    fig, axes = plt.subplots(len(series), 1, figsize=(7, 2.6 * len(series)), squeeze=False)
    for ax, (name, values) in zip(axes[:, 0], series.items(), strict=True):
        ax.plot(x[: len(values)], values, linewidth=1)
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel(xlabel)
    if title:
        axes[0, 0].set_title(title)
    fig.tight_layout()
    with atomic_write(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


class Tracker:
    """metrics.jsonl in the run folder, mirrored to wandb when `wandb_mode` is offline/online."""

    def __init__(
        self,
        run_dir: str | os.PathLike,
        *,
        wandb_mode: str = "off",
        project: str = "TEST",
        name: str | None = None,
        config: dict[str, Any] | None = None,
    ):
        if wandb_mode not in ("off", "offline", "online"):
            from utils.io import UserError

            raise UserError(f"unknown wandb mode {wandb_mode!r}: expected off, offline or online")
        self.run_dir = Path(run_dir)
        self.metrics = MetricsLog(self.run_dir / "metrics.jsonl")
        self.wandb_run = None
        if wandb_mode != "off":
            self.wandb_run = _start_wandb(wandb_mode, project, name, config, self.run_dir)

    def log(self, step: int, record: dict[str, Any]) -> None:
        self.metrics.log({"step": step, **record})
        if self.wandb_run is not None:
            try:
                self.wandb_run.log({k: v for k, v in record.items() if _is_number(v)}, step=step)
            except Exception as exc:  # never let tracking kill a run
                warnings.warn(f"wandb logging failed, continuing without it: {exc}", stacklevel=2)
                self.wandb_run = None

    def image(self, key: str, path: str | os.PathLike, step: int | None = None) -> None:
        if self.wandb_run is not None:
            try:
                import wandb

                self.wandb_run.log({key: wandb.Image(str(path))}, step=step)
            except Exception as exc:
                warnings.warn(
                    f"wandb image logging failed, continuing without it: {exc}", stacklevel=2
                )
                self.wandb_run = None

    def finish(self) -> None:
        if self.wandb_run is not None:
            try:
                self.wandb_run.finish()
            except Exception as exc:
                warnings.warn(f"wandb finish failed: {exc}", stacklevel=2)
            self.wandb_run = None


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not (isinstance(value, float) and math.isnan(value))


def _start_wandb(mode: str, project: str, name: str | None, config: Any, run_dir: Path):
    try:
        import wandb

        return wandb.init(
            project=project,
            name=name,
            config=config,
            mode=mode,
            dir=str(run_dir),
            reinit=True,
        )
    except Exception as exc:
        warnings.warn(f"wandb could not start ({exc}); writing local files only", stacklevel=2)
        return None


class SilentTracker(Tracker):
    """The tracker of the ranks other than 0 under torchrun: rank 0 alone logs
    (docs/algorithms.md#distributed-distillation)."""

    def __init__(self) -> None:
        self.wandb_run = None

    def log(self, step: int, record: dict[str, Any]) -> None:
        pass

    def image(self, key: str, path: str | os.PathLike, step: int | None = None) -> None:
        pass

    def finish(self) -> None:
        pass
