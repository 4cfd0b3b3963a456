"""Devices, torchrun ranks, seeds and random-number-generator state."""

from __future__ import annotations

import logging
import os
import random
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from utils.io import UserError

# torch.compile on the CPU with a CUDA build of torch logs "No CUDA runtime is found, using
# CUDA_HOME=..." once per process: it concerns CUDA extensions, which compiling for the CPU does not
# build, and it would be the only line on stderr of a run besides its errors and progress.
logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)

AMP_MODES = ("off", "bf16")  # --amp: float32, or bfloat16 autocast in the forward passes


def repo_root() -> Path:
    return Path(__file__).resolve().parents[1]


def resolve_device(spec: str | int | list | None = "auto") -> torch.device:
    """Map `auto|cpu|cuda|cuda:N` (or a config's GPU id list) to a device; CPU if CUDA is absent."""
    if spec is None or spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(spec, list):  # the reference's `device: [0, 1]`: GPU ids; we use the first
        if not spec:
            return resolve_device("auto")
        spec = spec[0]
    if isinstance(spec, int) or (isinstance(spec, str) and spec.isdigit()):
        spec = f"cuda:{int(spec)}"
    try:
        device = torch.device(spec)
    except (RuntimeError, TypeError) as exc:
        raise UserError(f"unknown device {spec!r}: expected auto, cpu, cuda or cuda:N") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        warnings.warn(
            f"device {spec!r} asked for but CUDA is not available; running on CPU", stacklevel=2
        )
        return torch.device("cpu")
    if device.type == "cuda" and device.index is not None:
        if device.index >= torch.cuda.device_count():
            raise UserError(
                f"device {spec!r} does not exist: this machine has "
                f"{torch.cuda.device_count()} GPU(s)"
            )
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"unsupported device {spec!r}: expected auto, cpu, cuda or cuda:N")
    return device


def rank_and_world() -> tuple[int, int]:
    """(RANK, WORLD_SIZE) from torchrun's environment; (0, 1) for a plain run."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if not 0 <= rank < world:
        raise UserError(f"RANK={rank} and WORLD_SIZE={world} are inconsistent")
    return rank, world


def rank_device(spec: str, world: int) -> torch.device:
    """`resolve_device(spec)`, except that under torchrun (world > 1) a device without an index
    becomes this process's GPU: LOCAL_RANK modulo the GPUs this machine has."""
    device = resolve_device(spec)
    if device.type == "cuda" and device.index is None and world > 1:
        device = torch.device(
            "cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count()
        )
    return device


def gather_objects(local: Any, world: int) -> list[Any]:
    """Every rank's `local`, in rank order, over gloo ([local] for a plain run). A process group
    is created for the call, and destroyed after it, when the caller has none."""
    if world == 1:
        return [local]
    import torch.distributed as dist

    owned = not dist.is_initialized()
    if owned:
        dist.init_process_group("gloo")
    shares: list[Any] = [None] * world
    dist.all_gather_object(shares, local)
    if owned:
        dist.destroy_process_group()
    return shares


def derived_seeds(*keys: int) -> tuple[int, int]:
    """Two independent seeds (network initialisation, data order and augmentation) from the
    integers `keys`, by NumPy's SeedSequence: keys (s,) give the seeds of SeedSequence(s)."""
    init_seed, data_seed = np.random.SeedSequence(list(keys)).generate_state(2)
    return int(init_seed), int(data_seed)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def get_rng_state() -> dict[str, Any]:
    """The global RNG states of Python, NumPy and torch, in a form `torch.save` can store."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {
            "name": np_state[0],
            "keys": torch.from_numpy(np_state[1].copy()),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    python_state = state["python"]
    # A round trip through torch.save turns the inner tuple into a list.
    random.setstate((python_state[0], tuple(python_state[1]), python_state[2]))
    np_state = state["numpy"]
    np.random.set_state(
        (
            np_state["name"],
            np_state["keys"].numpy().astype(np.uint32),
            np_state["pos"],
            np_state["has_gauss"],
            np_state["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
