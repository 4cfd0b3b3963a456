"""utils/progress.py: plain progress lines (count, rate, ETA) when the stream is not a terminal."""

from __future__ import annotations

import io
import re

import pytest

from utils.progress import LineProgress, format_duration, progress_bar


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_lines_every_n_updates_with_rate_and_eta():
    out, clock = io.StringIO(), Clock()
    bar = LineProgress(total=10, desc="eval", every=4, seconds=1e9, file=out, clock=clock)
    for _ in range(10):
        clock.now += 0.5  # 2 updates per second
        bar.update()
    bar.close()
    lines = out.getvalue().splitlines()
    assert lines == [
        "eval: 4/10 (40.0%) 2.00 it/s, elapsed 0:00:02, ETA 0:00:03",
        "eval: 8/10 (80.0%) 2.00 it/s, elapsed 0:00:04, ETA 0:00:01",
        "eval: 10/10 (100.0%) 2.00 it/s, elapsed 0:00:05, ETA 0:00:00",
    ]


def test_slow_loop_prints_by_time_in_seconds_per_iteration_and_resume_counts_this_process():
    out, clock = io.StringIO(), Clock()
    bar = LineProgress(range(5, 8), total=10, initial=5, desc="distill", seconds=60, file=out,
                       clock=clock)  # fmt: skip
    for it in bar:
        clock.now += 90  # every update is more than a minute after the last line
        bar.set_postfix(loss=f"{it / 10:.2f}")
    lines = out.getvalue().splitlines()
    # the update after the body: iteration 5 done after 90 s -> 1 update in 90 s, 4 left
    assert lines[0] == "distill: 6/10 (60.0%) 90.00 s/it, elapsed 0:01:30, ETA 0:06:00, loss=0.50"
    assert len(lines) == 3 and lines[-1].startswith("distill: 8/10 (80.0%) 90.00 s/it")


def test_default_every_gives_about_twenty_lines():
    out = io.StringIO()
    bar = LineProgress(total=1000, desc="x", seconds=1e9, file=out, clock=Clock())
    for _ in range(1000):
        bar.update()
    bar.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 20 and lines[-1].startswith("x: 1000/1000 (100.0%)")


def test_progress_bar_is_plain_when_not_a_terminal_and_tqdm_on_one():
    plain = progress_bar(range(3), desc="d", file=io.StringIO())
    assert isinstance(plain, LineProgress) and plain.total == 3

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    bar = progress_bar(range(3), desc="d", file=Tty())
    assert not isinstance(bar, LineProgress)
    assert list(bar) == [0, 1, 2]


def test_format_duration_and_bad_every():
    assert format_duration(3725.4) == "1:02:05"
    assert format_duration(float("inf")) == "?"
    with pytest.raises(ValueError, match="every=0"):
        LineProgress(total=3, every=0)


def test_unknown_total_prints_count_only():
    out, clock = io.StringIO(), Clock()
    bar = LineProgress(desc="n", every=2, file=out, clock=clock)
    clock.now += 1
    bar.update(2)
    assert re.fullmatch(r"n: 2 2\.00 it/s, elapsed 0:00:01\n", out.getvalue())
