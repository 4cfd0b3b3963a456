"""Files in and out, and the one error type for user mistakes.

Every write is atomic (a temporary file in the same folder, flushed, fsynced, then renamed over the
target), so an interrupted run never leaves a truncated file behind. Every `.pt` read goes through
`torch.load(..., weights_only=True)`, and a missing or unreadable file becomes a `UserError` that
names the path instead of a traceback.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import yaml


class UserError(Exception):
    """A mistake the user can fix (bad flag, missing file, mismatched data); one line, exit 2."""


def _temporary_affixes(name: str) -> tuple[str, str]:
    """Prefix and suffix of atomic_write's temporary files for a target called `name`:
    `.<name>.<random>.tmp`, hidden, in the target's folder."""
    return f".{name}.", ".tmp"


def remove_temporaries(folder: str | os.PathLike, name: str) -> list[Path]:
    """Delete the temporary files that interrupted atomic writes of `folder/<name>` left behind.

    `name` may be a glob pattern (e.g. `replay_buffer_3.*`); returns the files removed.
    """
    prefix, suffix = _temporary_affixes(name)
    stale = sorted(Path(folder).glob(f"{prefix}*{suffix}"))
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; rename it over `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix, suffix = _temporary_affixes(path.name)
    fd, tmp_name = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual permissions
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(folder: Path) -> None:
    # Makes the rename itself durable; not every file system allows opening a folder.
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def save_pt(obj: Any, path: str | os.PathLike) -> None:
    with atomic_write(path) as tmp, open(tmp, "wb") as f:
        # Through a file object the archive inside is always named "archive"; given a path, torch
        # names it after the (random) temporary file, and equal tensors would give unequal files.
        torch.save(obj, f)


def save_json(obj: Any, path: str | os.PathLike, indent: int = 2) -> None:
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=indent, default=_json_default) + "\n")


def save_yaml(obj: Any, path: str | os.PathLike) -> None:
    with atomic_write(path) as tmp:
        tmp.write_text(yaml.safe_dump(obj, sort_keys=False, default_flow_style=None))


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    raise TypeError(f"cannot write {type(value).__name__} as JSON")


def _require_file(path: Path, what: str) -> None:
    if not path.exists():
        raise UserError(f"{what} not found: {path}")
    if not path.is_file():
        raise UserError(f"{what} is not a file: {path}")


def load_pt(
    path: str | os.PathLike,
    *,
    what: str = "file",
    map_location: str | torch.device = "cpu",
    mmap: bool = False,
) -> Any:
    """`torch.load` with weights_only=True; a missing or corrupt file is a UserError naming it."""
    path = Path(path)
    _require_file(path, what)
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as exc:  # torch raises many types for truncated or foreign files
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"cannot read {what} {path}: {reason[:200]} (is it complete?)") from exc


def _load_text(path: str | os.PathLike, what: str, parse: Callable[[str], Any], kind: str) -> Any:
    path = Path(path)
    _require_file(path, what)
    try:
        return parse(path.read_text())
    except (ValueError, yaml.YAMLError) as exc:  # JSONDecodeError and UnicodeDecodeError too
        reason = " ".join(str(exc).split())
        raise UserError(f"cannot read {what} {path}: not valid {kind} ({reason})") from exc


def load_json(path: str | os.PathLike, what: str = "file") -> Any:
    return _load_text(path, what, json.loads, "JSON")


def load_yaml(path: str | os.PathLike, what: str = "file") -> Any:
    return _load_text(path, what, yaml.safe_load, "YAML")


def run_main(main: Callable[[Any], Any], parse_args: Callable[[], Any]) -> None:
    """Entry point of every script: a UserError becomes one line on stderr and exit status 2."""
    try:
        main(parse_args())
    except UserError as exc:
        message = " ".join(str(exc).split())
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
