"""Seconds per distillation iteration: 1 process x T threads against K processes x T/K threads,
each inner step's batch split across the processes (docs/algorithms.md#distributed-distillation).

One iteration is `match_trajectory` (the unroll and the matching-loss gradient) on CIFAR-shaped
random data (10 classes, 3x32x32, DSA on, batch_syn = all), as in scripts/bench/distill_step.py.
Both configurations run in one invocation, one after the other, each in fresh processes (gloo on
the CPU). The communication share is the time rank 0 spends inside all-reduce calls, which
includes waiting for the slower rank, over its iteration time. CPU s/it is the CPU time of all
the configuration's processes together (on a shared machine it varies less than wall time).
The gradients of the last iteration are compared between the two configurations (they must
agree to float rounding).

On a CPU-only machine, K processes x 1 thread stand in for K GPUs with one process each: the
question is whether splitting the inner batch costs more in communication than it gains.

    python scripts/bench/distill_scaling.py                  # ConvNetW32, IPC 10, syn_steps 20
    python scripts/bench/distill_scaling.py --iterations 5 --processes 2 --threads 2
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

import utils.distributed as distributed  # noqa: E402
from utils.distributed import World, start_world  # noqa: E402
from utils.io import load_pt, run_main, save_pt  # noqa: E402
from utils.matching import Student, match_trajectory, plan_inner_steps  # noqa: E402
from utils.networks import get_network  # noqa: E402

NUM_CLASSES, CHANNELS, IM_SIZE = 10, 3, (32, 32)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="ConvNetW32")
    parser.add_argument("--ipc", type=int, default=10)
    parser.add_argument("--syn-steps", type=int, default=20)
    parser.add_argument("--memory", default="recompute", choices=("graph", "recompute"))
    parser.add_argument("--threads", type=int, default=2, help="threads of the one process")
    parser.add_argument("--processes", type=int, default=2, help="processes, T/K threads each")
    parser.add_argument("--iterations", type=int, default=3, help="timed iterations (median)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed iterations first")
    return parser.parse_args(argv)


def problem(args: argparse.Namespace, seed: int = 0):
    """The student, the synthetic set and one (w_start, target, plan) per iteration."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = get_network(args.model, CHANNELS, NUM_CLASSES, IM_SIZE)
    w_start = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    num_syn = NUM_CLASSES * args.ipc
    images = torch.randn(num_syn, CHANNELS, *IM_SIZE, generator=generator)
    labels = torch.randn(num_syn, NUM_CLASSES, generator=generator)
    iterations = []
    for _ in range(args.warmup + args.iterations):
        target = w_start + 0.01 * torch.randn(w_start.shape, generator=generator)
        plan = plan_inner_steps(
            num_syn, args.syn_steps, None, IM_SIZE, augment=True, generator=generator
        )
        iterations.append((target, plan))
    return Student(model), w_start, images, labels, iterations


def timed_iterations(args: argparse.Namespace, world: World, comm: list[float]) -> dict:
    """Seconds of each timed iteration, the all-reduce seconds within them, the last gradients."""
    student, w_start, images, labels, iterations = problem(args)
    student = world.student(student)
    seconds, cpu_seconds, comm_seconds = [], [], []
    for k, (target, plan) in enumerate(iterations):
        image_syn = images.clone().requires_grad_(True)
        label_syn = labels.clone().requires_grad_(True)
        syn_lr = torch.tensor(0.01, requires_grad=True)
        if world.active:
            torch.distributed.barrier()
        comm.clear()
        start, cpu_start = time.perf_counter(), time.process_time()
        result = match_trajectory(
            student, image_syn, label_syn, syn_lr, w_start, target, world.shard(plan),
            memory=args.memory,
        )  # fmt: skip
        world.sum_gradients(result, image_syn, label_syn)
        if k >= args.warmup:
            seconds.append(time.perf_counter() - start)
            cpu_seconds.append(time.process_time() - cpu_start)
            comm_seconds.append(sum(comm))
    grads = {"images": image_syn.grad, "labels": label_syn.grad, "lr": syn_lr.grad}
    return {"seconds": seconds, "cpu": cpu_seconds, "comm": comm_seconds, "grads": grads}


def one_process(rank: int, args: argparse.Namespace, out: Path) -> None:
    torch.set_num_threads(args.threads)
    save_pt(timed_iterations(args, World(), []), out / "single.pt")


def rank_process(rank: int, args: argparse.Namespace, port: int, out: Path) -> None:
    threads = max(args.threads // args.processes, 1)
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
        WORLD_SIZE=str(args.processes), OMP_NUM_THREADS=str(threads),
    )  # fmt: skip
    torch.set_num_threads(threads)
    world = start_world(torch.device("cpu"), forced=True)
    comm: list[float] = []
    all_reduce = distributed.dist.all_reduce

    def timed_all_reduce(*a, **k):
        start = time.perf_counter()
        try:
            return all_reduce(*a, **k)
        finally:
            comm.append(time.perf_counter() - start)

    distributed.dist.all_reduce = timed_all_reduce  # the module's all-reduces, timed
    result = timed_iterations(args, world, comm)
    world.close()
    save_pt(result, out / f"split{rank}.pt")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def main(args: argparse.Namespace) -> None:
    threads = max(args.threads // args.processes, 1)
    print(
        f"{args.model}, IPC {args.ipc} ({NUM_CLASSES * args.ipc} images, batch = all), "
        f"syn_steps {args.syn_steps}, memory {args.memory}, DSA on; {args.iterations} timed "
        f"iteration(s) after {args.warmup}; {os.cpu_count()} CPU(s) visible"
    )
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        mp.start_processes(one_process, args=(args, out), nprocs=1, start_method="spawn")
        single = load_pt(out / "single.pt")
        mp.start_processes(
            rank_process, args=(args, free_port(), out), nprocs=args.processes,
            start_method="spawn",
        )  # fmt: skip
        split = load_pt(out / "split0.pt")
        split["cpu"] = [  # CPU seconds of all the processes together
            sum(seconds)
            for seconds in zip(
                *(load_pt(out / f"split{r}.pt")["cpu"] for r in range(args.processes)),
                strict=True,
            )
        ]
    one = statistics.median(single["seconds"])
    many = statistics.median(split["seconds"])
    share = sum(split["comm"]) / sum(split["seconds"])
    print(
        f"{'configuration':<28} {'s/it (median)':>14} {'all s/it':>24} {'CPU s/it':>9} "
        f"{'comm share':>11}"
    )
    for name, result, comm in (
        (f"1 process x {args.threads} threads", single, "-"),
        (f"{args.processes} processes x {threads} thread(s)", split, f"{100 * share:.1f}%"),
    ):
        runs = " ".join(f"{s:.2f}" for s in result["seconds"])
        median, cpu = statistics.median(result["seconds"]), statistics.median(result["cpu"])
        print(f"{name:<28} {median:>14.3f} {runs:>24} {cpu:>9.2f} {comm:>11}")
    print(f"ratio (split / one process): {many / one:.2f} (target: <= 1.00)")
    errors = {k: rel_err(split["grads"][k], single["grads"][k]) for k in single["grads"]}
    print("gradient rel. error, split vs one process: " + ", ".join(
        f"{k} {v:.1e}" for k, v in errors.items()
    ))  # fmt: skip


if __name__ == "__main__":
    run_main(main, parse_args)
