"""Seconds per iteration of gradient matching (DC) and distribution matching (DM), DM's peak
memory, and DM against its floor (docs/gm_dm.md).

CIFAR-10 shapes with random tensors (10 classes, 3x32x32, 500 train images per class), ConvNetW32,
`batch_real` 256, the iteration exactly as distill/condense.py runs it (a fresh network, then
utils.gm.gm_iteration or utils.dm.dm_step plus the image step). Rows:
  DC IPC 1 and 10 (no DSA, the DC default), DM IPC 1, 10 and 50 (DSA, the DM default);
  DM IPC 10 variants: bf16 autocast of the forward (`embed_amp: bf16`), `channels_last`, and a
  torch.compile'd embedding (`compile: true`: one compiled network whose weights are overwritten
  by each fresh network's, so nothing recompiles);
  the floor of DM IPC 10: one forward of the real batch of every class (10 x 256 images, no
  augmentation, no gradient): no DM iteration can be faster.
Every row runs in its own fresh subprocess, one after the other: time is the median over
--repeats iterations (after --warmup), as the child's CPU seconds (with one thread nearly
independent of other jobs on a shared machine) and wall seconds; on CPU peak memory is the
child's peak RSS minus its RSS after set-up (on CUDA torch.cuda.max_memory_allocated).

    python scripts/bench/condense_step.py                    # every row (about 10 min idle)
    python scripts/bench/condense_step.py --rows DM1 DM10 floor10
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from utils.condense import copy_weights, fresh_network  # noqa: E402
from utils.dm import dm_step  # noqa: E402
from utils.filters import class_pool  # noqa: E402
from utils.gm import GMSettings, get_loops, gm_iteration  # noqa: E402
from utils.runtime import resolve_device  # noqa: E402
from utils.synset import hard_labels  # noqa: E402

MODEL, CLASSES, PER_CLASS, BATCH_REAL = "ConvNetW32", 10, 500, 256
# name -> (method, ipc, variant)
ROWS = {
    "DC1": ("DC", 1, "fp32"),
    "DC10": ("DC", 10, "fp32"),
    "DM1": ("DM", 1, "fp32"),
    "DM10": ("DM", 10, "fp32"),
    "DM50": ("DM", 50, "fp32"),
    "DM10-bf16": ("DM", 10, "bf16"),
    "DM10-channels_last": ("DM", 10, "channels_last"),
    "DM10-compile": ("DM", 10, "compile"),
    "floor10": ("floor", 10, "fp32"),
}


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def child(spec: dict) -> dict:
    """One row: set-up, warm-up, timed iterations; prints a JSON line."""
    torch.set_num_threads(spec["threads"])
    device = resolve_device(spec["device"])
    method, ipc, variant = ROWS[spec["row"]]
    g = torch.Generator().manual_seed(0)
    labels_train = torch.arange(CLASSES).repeat_interleave(PER_CLASS)
    images_train = torch.randn(len(labels_train), 3, 32, 32, generator=g).to(device)
    pool = class_pool(labels_train, CLASSES)
    image_syn = torch.randn(CLASSES * ipc, 3, 32, 32, generator=g).to(device).requires_grad_(True)
    label_syn = hard_labels(CLASSES, ipc).to(device)
    optimizer = torch.optim.SGD([image_syn], lr=1.0, momentum=0.5)
    if variant == "channels_last":
        images_train = images_train.contiguous(memory_format=torch.channels_last)
    compiled = None
    if variant == "compile":
        compiled = fresh_network(MODEL, 3, CLASSES, (32, 32), generator=g, device=device)
        compiled.features = torch.compile(compiled.features)

    def network():
        net = fresh_network(MODEL, 3, CLASSES, (32, 32), generator=g, device=device)
        if compiled is not None:  # the same weights in the one compiled network
            copy_weights(net, compiled)
            net = compiled
        if variant == "channels_last":
            net = net.to(memory_format=torch.channels_last)
        return net

    def iteration():
        net = network()
        if method == "DC":
            settings = GMSettings(*get_loops(ipc), batch_real=BATCH_REAL)
            gm_iteration(net, image_syn, label_syn, optimizer, pool, images_train, settings,
                         generator=g)  # fmt: skip
        elif method == "DM":
            optimizer.zero_grad()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=variant == "bf16"):
                dm_step(net, image_syn, pool, images_train, batch_real=BATCH_REAL, generator=g)
            optimizer.step()
        else:  # the floor: the real batches' forward alone
            with torch.no_grad():
                for members in pool:
                    net.features(images_train[members[:BATCH_REAL].to(device)])

    base = rss_mb()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(spec["warmup"]):
        iteration()
    cpu, wall = [], []
    for _ in range(spec["repeats"]):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        c0, w0 = time.process_time(), time.perf_counter()
        iteration()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        cpu.append(time.process_time() - c0)
        wall.append(time.perf_counter() - w0)
    peak = (torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda"
            else rss_mb() - base)  # fmt: skip
    return {"row": spec["row"], "cpu_s": statistics.median(cpu), "wall_s": statistics.median(wall),
            "peak_mb": peak}  # fmt: skip


def run_row(row: str, args: argparse.Namespace) -> dict:
    repeats = 1 if row == "DC10" else args.repeats  # DC IPC 10 is ~100x DM's iteration
    warmup = 0 if row == "DC10" else args.warmup
    if row == "DM10-compile":
        warmup = max(warmup, 2)  # the first calls compile
    spec = {"row": row, "threads": args.threads, "device": args.device, "repeats": repeats,
            "warmup": warmup}  # fmt: skip
    done = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)],
                          capture_output=True, text=True)  # fmt: skip
    if done.returncode != 0:
        return {"row": row, "error": done.stderr.strip().splitlines()[-1:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(args: argparse.Namespace) -> None:
    print(f"torch {torch.__version__}, {args.threads} thread(s), device {args.device}, "
          f"{MODEL}, CIFAR-10 shapes, batch_real {BATCH_REAL}; median of {args.repeats} "
          f"(DC IPC 10: 1) after {args.warmup} warm-up")  # fmt: skip
    results = {}
    print(f"{'row':20s} {'cpu s/it':>9s} {'wall s/it':>9s} {'it/s (cpu)':>10s} {'peak MB':>8s}")
    for row in args.rows:
        r = results[row] = run_row(row, args)
        if "error" in r:
            print(f"{row:20s} failed: {r['error']}")
            continue
        print(f"{row:20s} {r['cpu_s']:9.3f} {r['wall_s']:9.3f} {1 / r['cpu_s']:10.2f} "
              f"{r['peak_mb']:8.0f}", flush=True)  # fmt: skip
    ok = {k: v for k, v in results.items() if "error" not in v}
    if "DM10" in ok and "floor10" in ok:
        ratio = ok["DM10"]["cpu_s"] / ok["floor10"]["cpu_s"]
        print(f"DM IPC 10 / floor (10 forwards of 256 real images): {ratio:.2f}x")
        print(f"DM IPC 10: {1 / ok['DM10']['cpu_s']:.2f} it/s (target 5 it/s); the floor allows "
              f"{1 / ok['floor10']['cpu_s']:.2f} it/s on this device")  # fmt: skip
    for variant in ("bf16", "channels_last", "compile"):
        if f"DM10-{variant}" in ok and "DM10" in ok:
            speedup = ok["DM10"]["cpu_s"] / ok[f"DM10-{variant}"]["cpu_s"]
            print(f"DM IPC 10 {variant}: {speedup:.2f}x the float32 speed")
    if "DM50" in ok:
        print(f"DM IPC 50 peak memory (batch_real {BATCH_REAL}): {ok['DM50']['peak_mb']:.0f} MB "
              "above set-up")  # fmt: skip


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS),
                   help="rows to measure")  # fmt: skip
    p.add_argument("--repeats", type=int, default=3, help="timed iterations per row")
    p.add_argument("--warmup", type=int, default=1, help="untimed iterations first")
    p.add_argument("--threads", type=int, default=1, help="torch threads of each child")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--child", help=argparse.SUPPRESS)
    return p.parse_args()


if __name__ == "__main__":
    arguments = parse_args()
    if arguments.child:
        print(json.dumps(child(json.loads(arguments.child))))
    else:
        main(arguments)
