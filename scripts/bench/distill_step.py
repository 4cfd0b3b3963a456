"""Seconds and peak memory of one distillation iteration in each memory mode and fast path:
graph float32 eager (the authors' algorithm, the yardstick), recompute, auto, and the fast paths
(docs/algorithms.md#memory-modes-graph-recompute-hybrid-and-auto,
docs/algorithms.md#the-unrolls-fast-path).

For each model:ipc setting and syn_steps, one iteration is the unroll and the matching-loss
gradient of `utils.matching.match_trajectory` on CIFAR-shaped random data (10 classes, 3x32x32,
batch_syn = all, DSA on). A mode is `memory[+bf16][+cl][+compile][+budget<GB>]`: the memory key
(auto resolved by `utils.unroll_memory.choose_memory`, its choice and estimate printed), amp
bf16, channels_last, compile, memory_budget_gb. Every (setting, steps, mode) runs in its own
fresh subprocess, so peak memory is not polluted by another configuration: on CPU it is the
child's peak RSS (`ru_maxrss`), reported whole and minus the child's RSS after imports and
set-up; on CUDA it is `torch.cuda.max_memory_allocated`. Graph-mode configurations whose
estimated memory exceeds --max-graph-gb are skipped and listed as such. Then every mode's time
against the yardstick's and the targets of issue 11 (auto <= 1.05x where it chose graph, a
small-budget auto <= 1.2x recompute's peak, the fastest <= 0.5x).

Time is the median over --rounds fresh processes x --repeats iterations (the rounds interleave
the modes), as wall seconds and as the child's CPU seconds. With one torch thread (the default)
CPU seconds depend less on what else the machine runs, so the ratios use them; wall seconds are
what a user waits. "1st s" is the first iteration (with compile: including compiling).

    python scripts/bench/distill_step.py --settings ConvNetW32:1 --steps 20 --rounds 1
    python scripts/bench/distill_step.py            # the issue's grid (an hour or more on 2 cores)
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
from utils.matching import (  # noqa: E402
    InnerSteps,
    Student,
    make_step_options,
    match_trajectory,
    plan_inner_steps,
)
from utils.networks import get_network  # noqa: E402
from utils.runtime import resolve_device, seed_everything  # noqa: E402
from utils.unroll_memory import MEMORY_KEYS, choose_memory  # noqa: E402

NUM_CLASSES, CHANNELS, IM_SIZE = 10, 3, (32, 32)
# Graph-mode memory grows with steps x images x width: ~32 KB per (step, image, channel of the
# width), fitted to the issue's yardsticks (ConvNetW32 / IPC 10 / 80 steps 8.2 GB; ConvNet / IPC 1
# / 80 steps 3.4 GB, both whole-process RSS).
GRAPH_BYTES_PER_STEP_IMAGE_CHANNEL = 32e3
TARGET_AUTO_TIME = 1.05  # auto's seconds / graph's, where auto chose graph
TARGET_AUTO_MEMORY = 1.2  # auto's peak / recompute's, where graph does not fit the budget
TARGET_FASTEST_TIME = 0.5  # the fastest mode's seconds / graph's
MODES = ["graph", "recompute", "auto", "auto+budget0.3", "graph+bf16", "recompute+bf16+compile"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--settings", nargs="+", default=["ConvNetW32:10", "ConvNet:1"],
                        help="model:ipc pairs")  # fmt: skip
    parser.add_argument("--steps", nargs="+", type=int, default=[20, 80])
    parser.add_argument(
        "--modes", nargs="+", default=MODES,
        help="memory mode (graph, recompute, hybrid, auto) plus +bf16 (amp), +cl (channels "
        "last), +compile, +budget<GB> (memory_budget_gb); graph is the yardstick",
    )  # fmt: skip
    parser.add_argument("--repeats", type=int, default=1, help="timed iterations per round")
    parser.add_argument(
        "--rounds", type=int, default=3, help="fresh processes per mode, interleaved (median)"
    )
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


def parse_mode(text: str) -> dict:
    """`memory[+bf16][+cl][+compile][+budget<GB>]`, e.g. auto+budget0.5, recompute+bf16+compile."""
    memory, *extras = text.split("+")
    spec = {"memory": memory, "amp": "off", "channels_last": False, "compile": False,
            "budget_gb": None}  # fmt: skip
    for extra in extras:
        if extra == "bf16":
            spec["amp"] = "bf16"
        elif extra == "cl":
            spec["channels_last"] = True
        elif extra == "compile":
            spec["compile"] = True
        elif extra.startswith("budget"):
            spec["budget_gb"] = float(extra[len("budget") :])
        else:
            raise UserError(f"mode {text!r}: unknown {extra!r} (bf16, cl, compile, budget<GB>)")
    if memory not in MEMORY_KEYS:
        raise UserError(f"mode {text!r}: {memory!r} is not one of {', '.join(MEMORY_KEYS)}")
    return spec


def measure(run: dict) -> dict:
    """Child process: time `repeats` iterations of one configuration and report peak memory."""
    if run["threads"] > 0:
        torch.set_num_threads(run["threads"])
    device = resolve_device(run["device"])
    seed_everything(0)
    spec = parse_mode(run["mode"])
    options = make_step_options(spec["amp"], spec["channels_last"], spec["compile"], device)
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
    match_trajectory(student, one_image, one_label, syn_lr, w_start, target, plan, memory="graph")
    choice = choose_memory(
        spec["memory"], spec["budget_gb"], student, InnerSteps(run["steps"]), num_syn,
        NUM_CLASSES, (CHANNELS, *IM_SIZE), device, options,
    )  # fmt: skip
    baseline_gb = _rss_gb()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds, cpu_seconds, first_seconds = [], [], None
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
            student, image_syn, label_syn, syn_lr, w_start, target, plan,
            memory=choice.mode, kept_steps=choice.kept_steps, options=options,
        )  # fmt: skip
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if it == 0:
            first_seconds = time.perf_counter() - start  # with compile: includes compiling
        if it >= run["warmup"]:
            seconds.append(time.perf_counter() - start)
            cpu_seconds.append(time.process_time() - cpu_start)
    result = {
        "seconds": statistics.median(seconds),
        "cpu_seconds": statistics.median(cpu_seconds),
        "seconds_all": seconds,
        "cpu_seconds_all": cpu_seconds,
        "first_seconds": first_seconds,
        "chose": choice.mode + (f" K={choice.kept_steps}" if choice.mode == "hybrid" else ""),
        "estimate_gb": choice.estimate_gb,
        "budget_gb": choice.budget_gb,
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
        f"{'model':<11} {'ipc':>4} {'steps':>5} {'mode':<24} {'chose':<13} {'s/it':>7} "
        f"{'cpu s/it':>8} {'1st s':>6} {'est GB':>6} {'peak GB':>7} {'extra GB':>8}  note"
    )
    for r in rows:
        print(
            f"{r['model']:<11} {r['ipc']:>4} {r['steps']:>5} {r['mode']:<24} "
            f"{r.get('chose', '-'):<13} {_cell(r.get('seconds'), '.2f'):>7} "
            f"{_cell(r.get('cpu_seconds'), '.2f'):>8} {_cell(r.get('first_seconds'), '.1f'):>6} "
            f"{_cell(r.get('estimate_gb'), '.2f'):>6} {_cell(r.get('peak_gb'), '.3f'):>7} "
            f"{_cell(r.get('extra_gb'), '.3f'):>8}  {'' if r['status'] == 'ok' else r['status']}"
        )


def print_ratios(rows: list[dict]) -> None:
    """Every mode against the yardstick (graph, float32, eager), and the issue's targets."""
    print(
        f"\nratios to the yardstick `graph` (float32 eager), CPU seconds; targets: auto <= "
        f"{TARGET_AUTO_TIME}x where it chose graph, a small-budget auto <= {TARGET_AUTO_MEMORY}x "
        f"recompute's peak memory, the fastest mode <= {TARGET_FASTEST_TIME}x"
    )
    found = {(r["model"], r["ipc"], r["steps"], r["mode"]): r for r in rows if r["status"] == "ok"}
    settings = dict.fromkeys((r["model"], r["ipc"], r["steps"]) for r in rows)
    for model, ipc, steps in settings:
        here = {mode: r for (m, i, s, mode), r in found.items() if (m, i, s) == (model, ipc, steps)}
        yard, rec = here.get("graph"), here.get("recompute")
        if yard is None:
            print(f"{model} ipc {ipc} steps {steps}: no yardstick (graph) run")
            continue
        parts = []
        for mode, r in here.items():
            if mode == "graph":
                continue
            text = f"{mode} {r['cpu_seconds'] / yard['cpu_seconds']:.2f}x"
            if rec is not None and mode.startswith("auto") and r["chose"] != "graph":
                text += f" (peak {_ratio(r, rec)}x recompute's)"
            parts.append(text)
        fastest = min(here.values(), key=lambda r: r["cpu_seconds"])
        print(f"{model} ipc {ipc} steps {steps}: " + "; ".join(parts))
        print(
            f"    fastest: {fastest['mode']} {fastest['cpu_seconds'] / yard['cpu_seconds']:.2f}x "
            f"({fastest['cpu_seconds']:.2f} vs {yard['cpu_seconds']:.2f} cpu s/it; wall "
            f"{fastest['seconds'] / yard['seconds']:.2f}x)"
        )


def _ratio(a: dict, b: dict) -> str:
    text = f"{a['peak_gb'] / b['peak_gb']:.2f}"
    if a.get("extra_gb") is not None:
        text += f" [{a['extra_gb'] / max(b['extra_gb'], 1e-9):.2f}]"
    return text


def combine(results: list[dict]) -> dict:
    """One row from the rounds of a mode: median times over all timed iterations, the largest
    peak, the first round's first iteration."""
    done = [r for r in results if r["status"] == "ok"]
    if len(done) < len(results):
        return next(r for r in results if r["status"] != "ok")
    seconds = [s for r in done for s in r["seconds_all"]]
    cpu = [s for r in done for s in r["cpu_seconds_all"]]
    combined = {**done[0], "seconds": statistics.median(seconds), "seconds_all": seconds,
                "cpu_seconds": statistics.median(cpu), "cpu_seconds_all": cpu,
                "peak_gb": max(r["peak_gb"] for r in done)}  # fmt: skip
    if done[0]["extra_gb"] is not None:
        combined["extra_gb"] = max(r["extra_gb"] for r in done)
    return combined


def parse_settings(texts: list[str]) -> list[tuple[str, int]]:
    settings = []
    for text in texts:
        model, _, ipc = text.partition(":")
        if not ipc.isdigit():
            raise UserError(f"--settings {text!r}: expected model:ipc, e.g. ConvNetW32:10")
        get_network(model, CHANNELS, NUM_CLASSES, IM_SIZE)  # an unknown name fails here, early
        settings.append((model, int(ipc)))
    return settings


def main(args: argparse.Namespace) -> None:
    if args.child is not None:
        print(json.dumps(measure(json.loads(args.child))))
        return
    if args.repeats < 1 or args.rounds < 1 or args.warmup < 0:
        raise UserError(
            f"--repeats {args.repeats} / --rounds {args.rounds} / --warmup {args.warmup}: "
            "need >= 1, >= 1 and >= 0"
        )
    settings = parse_settings(args.settings)
    for mode in args.modes:
        parse_mode(mode)
    print(
        f"torch {torch.__version__}, device {args.device}, torch threads "
        f"{args.threads or torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    # Rounds interleave the modes (round 1: every mode once, round 2: ...), so a change of the
    # machine's load during the run hits every mode alike; each round is a fresh process.
    rows = []
    for model, ipc in settings:
        for steps in args.steps:
            runs = {}
            for mode in args.modes:
                runs[mode] = {"model": model, "ipc": ipc, "steps": steps, "mode": mode,
                              "repeats": args.repeats, "warmup": args.warmup,
                              "threads": args.threads, "device": args.device}  # fmt: skip
            results: dict[str, list[dict]] = {mode: [] for mode in args.modes}
            for _ in range(args.rounds):
                for mode, run in runs.items():
                    estimate = estimated_graph_gb(model, ipc, steps)
                    if mode.startswith("graph") and estimate > args.max_graph_gb:
                        result = {
                            "status": f"skipped: graph mode needs ~{estimate:.0f} GB "
                            f"(> --max-graph-gb {args.max_graph_gb:g})"
                        }
                    else:
                        result = run_child(run)
                    results[mode].append(result)
                    print(
                        f"  {model} ipc {ipc} steps {steps} {mode}: {result['status']} "
                        f"{result.get('cpu_seconds', 0):.2f} cpu s "
                        f"{result.get('peak_gb', 0):.3f} GB",
                        file=sys.stderr,
                        flush=True,
                    )
            rows += [{**runs[mode], **combine(results[mode])} for mode in args.modes]
    print_table(rows)
    print_ratios(rows)
    print(f"load average at the end {os.getloadavg()[0]:.1f}")
    if args.json:
        save_json(rows, args.json)


if __name__ == "__main__":
    run_main(main, parse_args)
