"""The cache of decoded data: one tensor file (a dict of tensors) per data set, source and part.

A part ("train", "test", "zca0.1", ...) is built once, written atomically with a JSON sidecar
that says what it holds, and read back on later loads. Files are keyed by data set name, absolute
source path and part only, so delete the cache folder after changing the source files.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

from torch import Tensor

from utils.io import load_pt, save_json, save_pt

CACHE_VERSION = 1  # part of every cache key: bump when decoding changes


def cache_root(cache_dir: str | None) -> Path:
    """The cache folder: `cache_dir`, else $PAD_CACHE_DIR, else ~/.cache/pad."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    return Path(os.environ.get("PAD_CACHE_DIR") or Path.home() / ".cache" / "pad").expanduser()


def cache_path(cache: Path, cache_name: str, origin: Path, part: str) -> Path:
    key = f"v{CACHE_VERSION}|{cache_name}|{origin}|{part}"
    digest = hashlib.sha1(key.encode()).hexdigest()[:16]
    return cache / f"{cache_name}-{part}-{digest}.pt"


def cached(
    cache: Path, cache_name: str, origin: Path, part: str, build: Callable[[], dict]
) -> dict:
    """Load the cached dict of (name, origin, part), or build it and write it atomically."""
    path = cache_path(cache, cache_name, origin, part)
    if path.exists():
        return load_pt(path, what=f"{cache_name} {part} cache (delete it to rebuild)")
    content = build()
    save_pt(content, path)
    shapes = {k: list(v.shape) for k, v in content.items() if isinstance(v, Tensor)}
    save_json({"data set": cache_name, "source": origin, "part": part, "shapes": shapes},
              path.with_suffix(".json"))  # fmt: skip
    return content
