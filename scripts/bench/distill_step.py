"""Seconds and peak memory of one distillation iteration, `graph` vs `recompute`
(docs/algorithms.md#memory-modes-graph-and-recompute).

For each model, IPC and syn_steps, one iteration is the unroll and the matching-loss gradient of
`utils.matching.match_trajectory` on CIFAR-shaped random data (10 classes, 3x32x32, batch_syn =
all, DSA on). Every (model, ipc, steps, mode) runs in its own fresh subprocess, one at a time, so
peak memory is not polluted by another configuration: on CPU it is the child's peak RSS
(`ru_maxrss`), reported whole and minus the child's RSS after imports and set-up; on CUDA it is
`torch.cuda.max_memory_allocated`. Graph-mode configurations whose estimated memory exceeds
--max-graph-gb are skipped and listed as such. Then the ratios against the targets of issue 4.

Time is the median over --repeats iterations, as wall seconds and as the child's CPU seconds.
With one torch thread (the default) CPU seconds barely depend on what else the machine runs, so
the time ratios use them on a shared machine; wall seconds are what a user waits.

    python scripts/bench/distill_step.py --models ConvNetW32 --ipcs 1 --steps 20 40 --repeats 2
    python scripts/bench/distill_step.py            # the full grid (hours on 2 CPU cores)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from utils.io import UserError, run_main, save_json  # noqa: E402
from utils.matching import MEMORY_MODES, Student, match_trajectory, plan_inner_steps  # noqa: E402
from utils.networks import get_network  # noqa: E402
from utils.runtime import resolve_device, seed_everything  # noqa: E402

NUM_CLASSES, CHANNELS, IM_SIZE = 10, 3, (32, 32)
# Graph-mode memory grows with steps x images x width: ~32 KB per (step, image, channel of the
# width), fitted to the issue's yardsticks (ConvNetW32 / IPC 10 / 80 steps 8.2 GB; ConvNet / IPC 1
# / 80 steps 3.4 GB, both whole-process RSS).
GRAPH_BYTES_PER_STEP_IMAGE_CHANNEL = 32e3
TARGET_PEAK_80_VS_20 = 1.2  # recompute's peak at 80 steps / at 20 steps
TARGET_PEAK_VS_GRAPH = 0.25  # recompute's peak / graph's, 80 steps
TARGET_TIME_VS_GRAPH = 1.4  # recompute's seconds / graph's


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["ConvNetW32", "ConvNet"])
    parser.add_argument("--ipcs", nargs="+", type=int, default=[1, 10])
    parser.add_argument("--steps", nargs="+", type=int, default=[20, 40, 80])
    parser.add_argument("--modes", nargs="+", default=list(MEMORY_MODES), choices=MEMORY_MODES)
    parser.add_argument("--repeats", type=int, default=3, help="timed iterations (median)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed iterations first")
    parser.add_argument(
        "--max-graph-gb",
        type=float,
        default=10.0,
        help="skip graph-mode runs estimated above this many GB",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (0: torch's default); 1 makes CPU time comparable",
    )
    parser.add_argument("--device", default="cpu", help="auto|cpu|cuda|cuda:N")
    parser.add_argument("--json", default=None, help="also write the measurements to this file")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)  # one run, JSON out
    return parser.parse_args(argv)


def estimated_graph_gb(model: str, ipc: int, steps: int) -> float:
    channels = get_network(model, CHANNELS, NUM_CLASSES, IM_SIZE).features.conv0.out_channels
    return steps * ipc * NUM_CLASSES * channels * GRAPH_BYTES_PER_STEP_IMAGE_CHANNEL / 1e9


def _rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # KB on Linux


def measure(run: dict) -> dict:
    """Child process: time `repeats` iterations of one configuration and report peak memory."""
    if run["threads"] > 0:
        torch.set_num_threads(run["threads"])
    device = resolve_device(run["device"])
    seed_everything(0)
    student = Student(get_network(run["model"], CHANNELS, NUM_CLASSES, IM_SIZE).to(device))
    w_start = torch.cat([p.detach().reshape(-1) for p in student.model.parameters()])
    target = w_start + 0.01 * torch.randn_like(w_start)
    num_syn = run["ipc"] * NUM_CLASSES
    image_syn = torch.randn(num_syn, CHANNELS, *IM_SIZE, device=device, requires_grad=True)
    label_syn = torch.randn(num_syn, NUM_CLASSES, device=device, requires_grad=True)
    syn_lr = torch.tensor(0.01, device=device, requires_grad=True)
    generator = torch.Generator().manual_seed(0)
    # The first double backward imports sympy (~80 MB): do it on one image before the baseline.
    plan = plan_inner_steps(1, 1, None, IM_SIZE, augment=True, generator=generator)
    one_image, one_label = (t[:1].detach().requires_grad_(True) for t in (image_syn, label_syn))
    match_trajectory(
        student, one_image, one_label, syn_lr, w_start, target, plan, memory=run["mode"]
    )
    baseline_gb = _rss_gb()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds, cpu_seconds = [], []
    for it in range(run["warmup"] + run["repeats"]):
        plan = plan_inner_steps(
            num_syn, run["steps"], None, IM_SIZE, augment=True, generator=generator
        )
        for t in (image_syn, label_syn, syn_lr):
            t.grad = None
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start, cpu_start = time.perf_counter(), time.process_time()
        match_trajectory(
            student, image_syn, label_syn, syn_lr, w_start, target, plan, memory=run["mode"]
        )
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if it >= run["warmup"]:
            seconds.append(time.perf_counter() - start)
            cpu_seconds.append(time.process_time() - cpu_start)
    result = {
        "seconds": statistics.median(seconds),
        "cpu_seconds": statistics.median(cpu_seconds),
        "seconds_all": seconds,
    }
    if device.type == "cuda":
        result.update(peak_gb=torch.cuda.max_memory_allocated(device) / 1e9, extra_gb=None)
    else:
        result.update(peak_gb=_rss_gb(), extra_gb=_rss_gb() - baseline_gb)
    return result


def run_child(run: dict) -> dict:
    """Measure one configuration in a fresh interpreter; failures are reported, not raised."""
    proc = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(run)],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        return {"status": f"failed (exit {proc.returncode}): {tail[:120]}"}
    return {"status": "ok", **json.loads(proc.stdout.strip().splitlines()[-1])}


def _cell(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def print_table(rows: list[dict]) -> None:
    print(
        f"{'model':<11} {'ipc':>4} {'steps':>5} {'mode':<9} {'s/it':>8} {'cpu s/it':>8} "
        f"{'cpu ms/step':>11} {'peak GB':>8} {'extra GB':>8}  note"
    )
    for r in rows:
        cpu = r.get("cpu_seconds")
        print(
            f"{r['model']:<11} {r['ipc']:>4} {r['steps']:>5} {r['mode']:<9} "
            f"{_cell(r.get('seconds'), '.2f'):>8} {_cell(cpu, '.2f'):>8} "
            f"{_cell(cpu and 1000 * cpu / r['steps'], '.0f'):>11} "
            f"{_cell(r.get('peak_gb'), '.3f'):>8} {_cell(r.get('extra_gb'), '.3f'):>8}  "
            f"{'' if r['status'] == 'ok' else r['status']}"
        )


def print_ratios(rows: list[dict]) -> None:
    """Recompute vs its own 20-step peak and vs graph mode, against the issue's targets."""
    found = {(r["model"], r["ipc"], r["steps"], r["mode"]): r for r in rows if r["status"] == "ok"}
    print(
        f"\nratios (targets: recompute peak 80/20 <= {TARGET_PEAK_80_VS_20}, "
        f"recompute/graph peak at 80 <= {TARGET_PEAK_VS_GRAPH}, "
        f"recompute/graph time <= {TARGET_TIME_VS_GRAPH}); peaks: whole RSS [extra over "
        "baseline]"
    )
    for model, ipc in dict.fromkeys((r["model"], r["ipc"]) for r in rows):
        for steps in sorted({r["steps"] for r in rows}):
            rec = found.get((model, ipc, steps, "recompute"))
            graph = found.get((model, ipc, steps, "graph"))
            if rec and graph:
                print(
                    f"{model} ipc {ipc} steps {steps}: time recompute/graph "
                    f"{rec['seconds'] / graph['seconds']:.2f} wall, "
                    f"{rec['cpu_seconds'] / graph['cpu_seconds']:.2f} cpu; "
                    f"peak recompute/graph {_ratio(rec, graph)}"
                )
        rec80, rec20 = (found.get((model, ipc, s, "recompute")) for s in (80, 20))
        if rec80 and rec20:
            print(f"{model} ipc {ipc}: recompute peak 80 vs 20 steps {_ratio(rec80, rec20)}")


def _ratio(a: dict, b: dict) -> str:
    text = f"{a['peak_gb'] / b['peak_gb']:.2f}"
    if a.get("extra_gb") is not None:
        text += f" [{a['extra_gb'] / max(b['extra_gb'], 1e-9):.2f}]"
    return text


def main(args: argparse.Namespace) -> None:
    if args.child is not None:
        print(json.dumps(measure(json.loads(args.child))))
        return
    if args.repeats < 1 or args.warmup < 0:
        raise UserError(f"--repeats {args.repeats} / --warmup {args.warmup}: need >= 1 and >= 0")
    for model in args.models:
        get_network(model, CHANNELS, NUM_CLASSES, IM_SIZE)  # an unknown name fails here, early
    print(
        f"device {args.device}, torch threads {args.threads or torch.get_num_threads()}, "
        f"load average {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    rows = []
    for model in args.models:
        for ipc in args.ipcs:
            for steps in args.steps:
                for mode in args.modes:
                    run = {
                        "model": model,
                        "ipc": ipc,
                        "steps": steps,
                        "mode": mode,
                        "repeats": args.repeats,
                        "warmup": args.warmup,
                        "threads": args.threads,
                        "device": args.device,
                    }
                    estimate = estimated_graph_gb(model, ipc, steps)
                    if mode == "graph" and estimate > args.max_graph_gb:
                        result = {
                            "status": f"skipped: graph mode needs ~{estimate:.0f} GB "
                            f"(> --max-graph-gb {args.max_graph_gb:g})"
                        }
                    else:
                        result = run_child(run)
                    rows.append({**run, **result})
                    print(
                        f"  {model} ipc {ipc} steps {steps} {mode}: "
                        f"{result['status']} {result.get('seconds', 0):.2f} s "
                        f"{result.get('peak_gb', 0):.3f} GB",
                        file=sys.stderr,
                        flush=True,
                    )
    print_table(rows)
    print_ratios(rows)
    print(f"load average at the end {os.getloadavg()[0]:.1f}")
    if args.json:
        save_json(rows, args.json)


if __name__ == "__main__":
    run_main(main, parse_args)
