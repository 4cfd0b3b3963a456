"""Progress of long loops: a tqdm bar on a terminal, plain lines with rate and ETA in a log.

`progress_bar(iterable, total=..., desc=...)` is a drop-in for `tqdm(..., disable=None)`. When the
stream (stderr) is a terminal it is tqdm's bar. Otherwise, e.g. under `nohup python ... > log
2>&1 &`, tqdm would print nothing; instead one line is written every `every` updates (default: a
twentieth of the total) or every `seconds` seconds, whichever comes first, and one at the end
(docs/formats.md#progress-lines):

    distill: 250/5001 (5.0%) 0.84 it/s, elapsed 0:04:58, ETA 1:34:21, loss=0.8123 start=12

The rate counts the updates of this process only (a resumed run starts with `initial` done).
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TextIO

from tqdm import tqdm

SECONDS = 60.0  # a line at least this often in a log, however slow the loop
LINES = 20  # about this many lines over the whole loop when updates are fast


def progress_bar(
    iterable: Iterable | None = None, *, total: int | None = None, desc: str = "",
    initial: int = 0, leave: bool = True, every: int | None = None,
    seconds: float = SECONDS, file: TextIO | None = None,
) -> Any:  # fmt: skip
    """tqdm's bar on a terminal, else a `LineProgress` (same iteration/update/set_postfix/close)."""
    stream = sys.stderr if file is None else file
    if total is None and iterable is not None and hasattr(iterable, "__len__"):
        total = len(iterable) + initial if initial else len(iterable)
    if _is_terminal(stream):
        return tqdm(iterable, total=total, desc=desc, initial=initial, leave=leave, file=stream)
    return LineProgress(iterable, total=total, desc=desc, initial=initial, every=every,
                        seconds=seconds, file=stream)  # fmt: skip


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # closed or replaced streams
        return False


def format_duration(seconds: float) -> str:
    """H:MM:SS, as tqdm prints elapsed time."""
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class LineProgress:
    """Plain progress lines for a log file: count, percent, rate, elapsed time, ETA, postfix."""

    def __init__(
        self, iterable: Iterable | None = None, *, total: int | None = None, desc: str = "",
        initial: int = 0, every: int | None = None, seconds: float = SECONDS,
        file: TextIO | None = None, clock=time.monotonic,
    ) -> None:  # fmt: skip
        if every is not None and every < 1:
            raise ValueError(f"every={every}: expected a positive number of updates")
        self.iterable, self.total, self.desc = iterable, total, desc
        self.n = self.initial = initial
        self.every = every or (max(1, math.ceil((total - initial) / LINES)) if total else 1)
        self.seconds, self.file, self.clock = seconds, file or sys.stderr, clock
        self.start = self.last_time = clock()
        self.last_n = initial
        self.postfix = ""
        self.closed = False

    def __iter__(self) -> Iterator:
        for item in self.iterable:
            yield item
            self.update()
        self.close()

    def __len__(self) -> int:
        return self.total or 0

    def set_postfix(self, **values: Any) -> None:
        self.postfix = " ".join(f"{k}={v}" for k, v in values.items())

    def update(self, n: int = 1) -> None:
        self.n += n
        now = self.clock()
        if self.n - self.last_n >= self.every or now - self.last_time >= self.seconds:
            self._write(now)

    def close(self) -> None:
        if not self.closed and self.n != self.last_n:
            self._write(self.clock())
        self.closed = True

    def line(self, now: float) -> str:
        elapsed = now - self.start
        done = self.n - self.initial
        rate = done / elapsed if elapsed > 0 else math.inf
        count = (
            f"{self.n}/{self.total} ({100 * self.n / self.total:.1f}%)"
            if self.total
            else str(self.n)
        )
        text = f"{self.desc}: {count} {_rate(rate)}, elapsed {format_duration(elapsed)}"
        if self.total:
            eta = (self.total - self.n) / rate if rate > 0 else math.inf
            text += f", ETA {format_duration(eta)}"
        return f"{text}, {self.postfix}" if self.postfix else text

    def _write(self, now: float) -> None:
        print(self.line(now), file=self.file, flush=True)
        self.last_n, self.last_time = self.n, now


def _rate(per_second: float) -> str:
    if not math.isfinite(per_second):
        return "? it/s"
    if per_second >= 1 or per_second == 0:
        return f"{per_second:.2f} it/s"
    return f"{1 / per_second:.2f} s/it"
