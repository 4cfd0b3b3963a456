"""One process per output (docs/formats.md#locks): a lock file per run folder, expert folder and
index file, so two runs with the same outputs never write into each other's files.

    with hold_lock(run_dir / ".lock", "run folder " + str(run_dir)):
        ...  # the stage's compute and writes

The lock is an exclusive `flock` on the file, which the system releases when the holder exits or
is killed (even by SIGKILL), and the file holds the holder's PID and host. A second process stops
at once with a UserError naming that PID. A file whose holder is gone is taken over with a
warning naming the dead PID; a clean exit removes the file.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import warnings
from collections.abc import Iterator
from pathlib import Path

from utils.io import UserError


def _holder(fd: int) -> str:
    """'PID on HOST' from the lock file, or '' when it is empty."""
    os.lseek(fd, 0, os.SEEK_SET)
    fields = os.read(fd, 200).decode(errors="replace").split()
    return " on ".join(fields[:2])


def lock_path(folder: str | os.PathLike, rank: int = 0) -> Path:
    """`<folder>/.lock`; under torchrun rank r > 0 holds `.lock.rank<r>` (the ranks share the
    folder by design, a second launch still meets rank 0's lock)."""
    return Path(folder) / (".lock" if rank == 0 else f".lock.rank{rank}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


def acquire_lock(path: str | os.PathLike, what: str) -> int:
    """Take the lock file `path` for `what` (named in the messages); returns its descriptor."""
    path = Path(path)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd) or "an unknown process"
            os.close(fd)
            raise UserError(
                f"{what} is in use by process {holder} (lock {path}): wait for it to finish or "
                "stop it, or give this run other outputs"
            ) from None
        # A holder that released the lock may have unlinked the file meanwhile: lock the file
        # that is at `path` now, or two processes would hold different inodes.
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    previous = _holder(fd)
    if previous:
        pid = previous.split()[0]
        state = "no longer running" if pid.isdigit() and not _pid_alive(int(pid)) else "gone"
        warnings.warn(
            f"taking over the stale lock {path} of process {previous} ({state}): it stopped "
            f"without releasing {what}",
            stacklevel=2,
        )
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
    os.fsync(fd)
    return fd


def release_lock(path: str | os.PathLike, fd: int) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)  # before the unlock: a waiting process then re-checks the inode
    os.close(fd)


@contextlib.contextmanager
def hold_lock(path: str | os.PathLike, what: str) -> Iterator[Path]:
    """Hold the lock file `path` for the duration of the block."""
    fd = acquire_lock(path, what)
    try:
        yield Path(path)
    finally:
        release_lock(path, fd)
