"""What every distillation entry point does around its loop: the run folder, the evaluation
cadence, checkpoints, the metrics log on resume, and stopping on a signal.

Shared by distill/pad.py (trajectory matching) and distill/condense.py (DC/DSA and DM), so a run
folder, a checkpoint's identity check and a resume behave the same in every family
(docs/formats.md#run-folder-layout).

    run_dir = run_folder(cfg, tag="depth")       # <out_dir>/<dataset>/<ipc>/<model>/<name>
    checkpoint = read_checkpoint(run_dir, identity, version=1, script="distill/pad.py")
    with StopOnSignal() as stop:
        for it in ...:
            ...
            if stop.signum is not None:
                break
"""

from __future__ import annotations

import json
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import torch
from tqdm import tqdm

from utils.io import UserError, atomic_write, load_pt, run_main
from utils.tracking import MetricsLog


def run_folder(cfg: SimpleNamespace, tag: str) -> Path:
    """`<out_dir>/<dataset>/<ipc>/<model>/<run name>` (docs/formats.md#run-folder-layout), the
    name's default RANDOM becoming `<dataset>-IPC<ipc>-<tag>-s<seed>`; never from wandb."""
    name = cfg.name if cfg.name != "RANDOM" else f"{cfg.dataset}-IPC{cfg.ipc}-{tag}-s{cfg.seed}"
    return Path(cfg.out_dir) / cfg.dataset / str(cfg.ipc) / cfg.model / name


def refuse_existing_run(run_dir: Path) -> None:
    """A run folder is never silently reused (docs/differences.md#unique-run-folders)."""
    if (run_dir / "checkpoint.pt").exists():
        raise UserError(
            f"{run_dir} already holds a run: continue it with --resume true, or give this run "
            "another --name"
        )
    if (run_dir / "metrics.jsonl").exists():
        raise UserError(
            f"{run_dir} holds a run that stopped before its first checkpoint: start it again "
            "from iteration 0 with --resume true, or give this run another --name"
        )


def evaluation_iterations(cfg: SimpleNamespace) -> list[int]:
    """The iterations evaluated before their update: every eval_it-th, from 0 or eval_it."""
    first_eval = cfg.eval_it if cfg.skip_first_eva else 0
    return list(range(first_eval, cfg.Iteration + 1, cfg.eval_it))


def read_checkpoint(
    run_dir: Path, identity: dict, *, version: int, script: str, defaults: dict | None = None
) -> dict | None:
    """The checkpoint to continue from, refused when of another version or made with settings
    (`identity`) that change what its tensors mean; None (start from iteration 0, saying so)
    when the run stopped before its first checkpoint or never started. A key the checkpoint
    lacks (added later) counts as its value in `defaults`."""
    path = run_dir / "checkpoint.pt"
    if not path.exists():
        print(f"--resume true: no checkpoint at {path} yet; starting from iteration 0")
        return None
    checkpoint = load_pt(path, what="checkpoint")
    if not isinstance(checkpoint, dict) or checkpoint.get("version") != version:
        raise UserError(f"{path} is not a checkpoint of this version of {script}")
    saved, defaults = checkpoint["identity"], defaults or {}
    changed = [
        f"{key}={identity[key]!r} (checkpoint: {saved.get(key)!r})"
        for key in identity
        if saved.get(key, defaults.get(key)) != identity[key]
    ]
    if changed:
        raise UserError(f"cannot resume {path} with other settings: {', '.join(changed)}")
    return checkpoint


def drop_metrics_from(path: Path, next_iteration: int) -> None:
    """On resume, forget what was logged after the checkpoint (those iterations run again)."""
    kept = [r for r in MetricsLog(path).read() if r.get("step", 0) < next_iteration]
    with atomic_write(path) as tmp:
        tmp.write_text("".join(json.dumps(record) + "\n" for record in kept))


def rerun_advice(run_dir: Path, cfg: SimpleNamespace, *keys: str) -> str:
    """Advice the program accepts after a divergence: lower the named rates and rerun with
    --resume true, which continues from the last checkpoint (whose rates the command line
    replaces) or, without one, starts again from iteration 0
    (docs/algorithms.md#divergence-guard)."""
    lower = " or ".join(f"--{key} (now {getattr(cfg, key):g})" for key in keys)
    checkpoint = run_dir / "checkpoint.pt"
    start = f"from {checkpoint}" if checkpoint.exists() else "from iteration 0: no checkpoint yet"
    return f"nothing of it was saved; rerun with --resume true ({start}) and a lower {lower}"


def restore_optimizer(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """The optimizer's saved state, but this command line's learning rate (a resume with a lower
    rate after a divergence is the advice the guard gives)."""
    lr = optimizer.param_groups[0]["lr"]
    optimizer.load_state_dict(state)
    optimizer.param_groups[0]["lr"] = lr


def run_entry(main: Callable[[str, list[str]], dict], choice: str) -> None:
    """A distillation script's entry point: `main(choice, argv)` under run_main (a UserError is
    one line and exit 2), then exit 128 + signal if a signal stopped the run."""

    def main_with_status(argv: list[str]) -> None:
        summary = main(choice, argv)
        if summary["stopped_by"] is not None:
            sys.exit(128 + summary["stopped_by"])

    run_main(main_with_status, lambda: sys.argv[1:])


def stopped_message(signum: int, last_iteration: int, run_dir: Path) -> str:
    return (
        f"stopped by {signal.Signals(signum).name} after iteration {last_iteration}; "
        f"checkpoint {run_dir / 'checkpoint.pt'}; continue with the same command and "
        "--resume true"
    )


class StopOnSignal:
    """Turns the first SIGINT/SIGTERM into a request to stop after the current iteration.

    The old handlers come back after the first signal, so a second one acts at once.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: int | None = None
        self.previous: dict[int, object] = {}

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():  # signal() works only there
            self.previous = {sig: signal.signal(sig, self.handle) for sig in self.SIGNALS}
        return self

    def handle(self, signum: int, frame: object) -> None:
        self.signum = signum
        self.restore()
        name = signal.Signals(signum).name
        tqdm.write(f"{name}: stopping after this iteration (again to stop at once)", sys.stderr)

    def agreed(self, world, device) -> bool:
        """Whether a signal arrived on some rank of `world` (utils/distributed.World; a plain
        run: on this process)."""
        if world.any(self.signum is not None, device):
            self.signum = self.signum or signal.SIGTERM
            return True
        return False

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}

    def __exit__(self, *exc: object) -> None:
        self.restore()
