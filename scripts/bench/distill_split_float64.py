"""Is a split-vs-one-process gradient difference float rounding or a split error? One iteration of
scripts/bench/distill_scaling.py (its last one, `--iterations N`) in float32 and float64, in one
process and in 2 processes x 1 thread (gloo), each compared with one process in float64
(docs/algorithms.md#distributed-distillation).

    python scripts/bench/distill_split_float64.py --iterations 2
"""

from __future__ import annotations

import os
import socket
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import distill_scaling as bench  # noqa: E402
import torch  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from utils.distributed import World, start_world  # noqa: E402
from utils.io import load_pt, save_pt  # noqa: E402
from utils.matching import match_trajectory  # noqa: E402

DTYPES = (torch.float64, torch.float32)


def gradients(args, world: World, dtype: torch.dtype) -> dict:
    student, w_start, images, labels, iterations = bench.problem(args)
    student.model.to(dtype)
    target, plan = iterations[-1]
    image_syn = images.to(dtype).requires_grad_(True)
    label_syn = labels.to(dtype).requires_grad_(True)
    syn_lr = torch.tensor(0.01, dtype=dtype, requires_grad=True)
    result = match_trajectory(
        world.student(student), image_syn, label_syn, syn_lr, w_start.to(dtype),
        target.to(dtype), world.shard(plan), memory=args.memory,
    )  # fmt: skip
    world.sum_gradients(result, image_syn, label_syn)
    return {"loss": result.loss, "images": image_syn.grad, "labels": label_syn.grad,
            "lr": syn_lr.grad}  # fmt: skip


def rank_job(rank: int, args, port: int, out: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2"
    )
    torch.set_num_threads(1)
    world = start_world(torch.device("cpu"), forced=True)
    results = {str(dtype): gradients(args, world, dtype) for dtype in DTYPES}
    world.close()
    if rank == 0:
        save_pt(results, out)


def main() -> None:
    args = bench.parse_args(sys.argv[1:])
    torch.set_num_threads(1)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "split.pt")
        mp.start_processes(rank_job, args=(args, port, out), nprocs=2, start_method="fork")
        split = load_pt(out)
    reference = gradients(args, World(), torch.float64)
    single32 = gradients(args, World(), torch.float32)

    def err(a, b):
        return ((a.double() - b.double()).norm() / b.double().norm()).item()

    keys = ("images", "labels", "lr")
    for name, result in (("single f32", single32), ("split f32", split["torch.float32"]),
                         ("split f64", split["torch.float64"])):  # fmt: skip
        errors = {k: f"{err(result[k], reference[k]):.1e}" for k in keys}
        print(f"{name} vs single f64: {errors} loss {result['loss']} {reference['loss']}")
    errors = {k: f"{err(split['torch.float32'][k], single32[k]):.1e}" for k in keys}
    print(f"split f32 vs single f32: {errors}")


if __name__ == "__main__":
    main()
