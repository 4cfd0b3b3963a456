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
import pickle
import re
import sys
import tempfile
import warnings
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


def _file_in_the_way(path: Path) -> Path | None:
    """The first existing ancestor of `path` (or `path` itself) that is not a folder."""
    for candidate in (path, *path.parents):
        if candidate.exists():
            return None if candidate.is_dir() else candidate
    return None


def prepare_output_dir(path: str | os.PathLike, flag: str) -> Path:
    """Create the output folder `path` now, before any compute, and check that it takes files;
    a UserError naming `flag` and the path otherwise (a file in the way, no permission, a
    read-only file system)."""
    path = Path(path).expanduser()
    blocker = _file_in_the_way(path)
    if blocker is not None:
        raise UserError(
            f"cannot write to {flag} {path}: {blocker} is a file, expected a folder; choose "
            f"another {flag}"
        )
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise UserError(
            f"cannot write to {flag} {path}: {exc.strerror or exc}; choose another {flag}"
        ) from exc
    return path


def prepare_output_file(path: str | os.PathLike, flag: str) -> Path:
    """`prepare_output_dir` for the folder of the output file `path`, which must not be a folder."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise UserError(f"{flag} {path} is a folder, expected a file name; choose another {flag}")
    prepare_output_dir(path.parent, flag)
    return path


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; rename it over `path` only if the block succeeds.

    An OSError (disk full, permissions, a file where a folder should be) becomes a UserError
    naming `path`, and no temporary file stays."""
    path = Path(path)
    tmp: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        prefix, suffix = _temporary_affixes(path.name)
        fd, tmp_name = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=path.parent)
        os.close(fd)
        tmp = Path(tmp_name)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual permissions
        yield tmp
        with open(tmp, "rb+") as f:
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        reason = exc.strerror or str(exc) or type(exc).__name__
        raise UserError(f"cannot write {path}: {reason}") from exc
    finally:
        if tmp is not None and tmp.exists():
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
        try:
            torch.save(obj, f)
        except RuntimeError as exc:  # torch's zip writer reports a full disk this way
            if "PytorchStreamWriter" not in str(exc) and "inline_container" not in str(exc):
                raise
            raise UserError(f"cannot write {path}: {str(exc).splitlines()[0]}") from exc


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
    """`torch.load` with weights_only=True: tensors, lists, dicts and numbers, never code. A
    missing, empty, truncated, foreign or unsafe file is a UserError naming it and the cause."""
    path = Path(path)
    _require_file(path, what)
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as exc:  # torch raises many types for truncated or foreign files
        raise UserError(f"cannot read {what} {path}: {_load_failure(path, exc)}") from exc


def _load_failure(path: Path, exc: Exception) -> str:
    """The real reason a .pt file did not load, in words (torch's own text invites the unsafe
    weights_only=False and is cut off)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(4)
    if size == 0:
        return "the file is empty (0 bytes): it was never written completely; make it again"
    text = str(exc)
    pickled = head[:2] == b"PK" or head[:1] == b"\x80"  # a zip archive, or a bare pickle
    if pickled and ("Weights only load failed" in text or isinstance(exc, pickle.UnpicklingError)):
        found = sorted(set(re.findall(r"GLOBAL ([\w.]+)", text)))
        detail = f" ({', '.join(found)})" if found else ""
        return (
            f"it holds objects other than tensors{detail}; only tensors, lists, dicts and "
            "numbers are loaded, so no code in a file ever runs: save plain tensors instead"
        )
    if head[:2] == b"PK":  # torch.save's zip archive
        return f"the file is truncated or damaged ({size} bytes, an incomplete zip archive)"
    return (
        f"it is not a file written by torch.save (it starts with bytes {head.hex(' ')}, a "
        "torch.save file with PK)"
    )


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


def _one_line_warning(message: Warning | str, category: type, *args: Any, **kwargs: Any) -> str:
    return f"warning: {' '.join(str(message).split())}\n"


def run_main(main: Callable[[Any], Any], parse_args: Callable[[], Any]) -> None:
    """Entry point of every script: a UserError becomes one line on stderr and exit status 2;
    a warning is one line `warning: ...`."""
    warnings.formatwarning = _one_line_warning
    try:
        main(parse_args())
    except UserError as exc:
        message = " ".join(str(exc).split())
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
