"""Benchmark: sequential versus batched (vmap) evaluation of num_eval networks, and bf16.

    python scripts/bench/eval_batched.py                      # the full grid (hours on a CPU)
    python scripts/bench/eval_batched.py --models ConvNetW32 --ipcs 1,10 --epochs 30 --threads 1

Speed: for each model and IPC, a random CIFAR-shaped set (10 classes, soft labels) trains
--num_eval networks by the protocol of utils.evaluate (batch_train 128, the PAD configs' value;
DSA on) and tests them on --test_size random images, in each of --modes. A row gives, per mode,
the seconds of the whole evaluation (init + train + test; the fastest of --repeats runs, the modes
interleaved), then each mode's speed relative to the first. With --epochs other than 300 a second
line extrapolates to 300 epochs from the time per training pass.
Accuracy of bf16: when the CIFAR-10 copy is at --cifar10, the Random baseline (--real_ipc random
real images per class, hard labels, ZCA, lr 0.01) is evaluated in each of --real_modes with the
same seeds, on --real_test_size test images.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from flops import large_batch_train_gflops, train_gflop_per_image  # noqa: E402

from utils.data import Data, get_dataset  # noqa: E402
from utils.evaluate import EvalResult, data_generators, init_networks, random_real_set  # noqa: E402
from utils.io import UserError, run_main, save_json  # noqa: E402
from utils.networks import get_network  # noqa: E402
from utils.runtime import resolve_device  # noqa: E402
from utils.train_nets import TrainConfig, networks_accuracy, train_networks  # noqa: E402

MODES = {  # name: (batched, amp)
    "sequential": (False, "off"),
    "batched": (True, "off"),
    "batched-bf16": (True, "bf16"),
    "sequential-bf16": (False, "bf16"),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="ConvNet,ConvNetW32")
    p.add_argument("--ipcs", default="1,10,50")
    p.add_argument("--epochs", type=int, default=300)
    p.add_argument("--num_eval", type=int, default=5)
    p.add_argument("--batch_train", type=int, default=128)
    p.add_argument("--test_size", type=int, default=1000, help="random test images (speed part)")
    p.add_argument("--repeats", type=int, default=1, help="runs per mode; the fastest counts")
    p.add_argument("--modes", default="sequential,batched,batched-bf16,sequential-bf16",
                   help=f"comma-separated, from {', '.join(MODES)}")  # fmt: skip
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--cifar10", default="~/.cache/pad-data/cifar10", help="'' skips this part")
    p.add_argument("--real_model", default="ConvNet")
    p.add_argument("--real_ipc", type=int, default=10)
    p.add_argument("--real_epochs", type=int, default=300)
    p.add_argument("--real_test_size", type=int, default=2000, help="0: the whole test set")
    p.add_argument("--real_modes", default="sequential,sequential-bf16,batched-bf16")
    p.add_argument("--out", help="also write the rows to this JSON file")
    return p.parse_args(argv)


def split_list(text: str, cast=str) -> list:
    return [cast(x.strip()) for x in text.split(",") if x.strip()]


def random_data(test_size: int) -> Data:
    g = torch.Generator().manual_seed(0)
    return Data(
        name="random", channel=3, im_size=(32, 32), num_classes=10, class_names=list("0123456789"),
        mean=[0.0] * 3, std=[1.0] * 3, images_train=torch.randn(10, 3, 32, 32, generator=g),
        labels_train=torch.arange(10), images_test=torch.randn(test_size, 3, 32, 32, generator=g),
        labels_test=torch.randint(0, 10, (test_size,), generator=g),
    )  # fmt: skip


def timed(model, images, labels, lr, data, mode, args, device, epochs) -> tuple[EvalResult, float]:
    """`evaluate_synset`'s steps, timed: (result, seconds of the training alone)."""
    batched, amp = MODES[mode]
    batched = batched and args.num_eval > 1  # as evaluate_synset: one network is not batched
    config = TrainConfig(epochs=epochs, batch_train=args.batch_train, amp=amp)
    indices = list(range(args.num_eval))
    start = time.perf_counter()
    nets = init_networks(model, data, 0, indices)
    train_networks(nets, images, labels, lr, data_generators(0, indices), config, device=device,
                   batched=batched)  # fmt: skip
    train_seconds = time.perf_counter() - start
    accs = networks_accuracy(nets, data.images_test, data.labels_test, device=device, amp=amp,
                             batched=batched)  # fmt: skip
    result = EvalResult(
        model=model, accs=accs, mean=statistics.fmean(accs), std=statistics.pstdev(accs),
        seconds=time.perf_counter() - start, mode="batched" if batched else "sequential",
        epochs=epochs, lr=lr, batch=args.batch_train,
    )  # fmt: skip
    return result, train_seconds


def speed_rows(args: argparse.Namespace, modes: list[str], device: torch.device) -> list[dict]:
    data = random_data(args.test_size)
    rows = []
    print(f"{'model':<11} {'ipc':>4} {'epochs':>6} " + " ".join(f"{m:>15}" for m in modes)
          + "   speed relative to " + modes[0], flush=True)  # fmt: skip
    for model in split_list(args.models):
        for ipc in split_list(args.ipcs, int):
            g = torch.Generator().manual_seed(ipc)
            images = torch.randn(10 * ipc, 3, 32, 32, generator=g)
            labels = torch.randn(10 * ipc, 10, generator=g)
            seconds = {m: math.inf for m in modes}
            train = dict(seconds)
            for _ in range(args.repeats):
                for mode in modes:
                    result, train_seconds = timed(model, images, labels, 0.01, data, mode, args,
                                                  device, args.epochs)  # fmt: skip
                    seconds[mode] = min(seconds[mode], result.seconds)
                    train[mode] = min(train[mode], train_seconds)
            print_row(model, ipc, args.epochs, modes, seconds)
            if args.epochs != 300:  # the test pass + 301 training passes at the measured pace
                print_row(model, ipc, "~300", modes, {
                    m: seconds[m] - train[m] + train[m] * 301 / (args.epochs + 1) for m in modes
                })  # fmt: skip
            rates = arithmetic_rates(model, ipc, args, modes, train)
            rows.append({"model": model, "ipc": ipc, "epochs": args.epochs, "seconds": seconds,
                         "train_seconds": train, **rates})  # fmt: skip
    return rows


def arithmetic_rates(model: str, ipc: int, args, modes: list[str], train: dict) -> dict:
    """Each mode's training arithmetic rate next to the rate of large training batches.

    Training does a fixed amount of arithmetic, (epochs + 1) passes over 10 * ipc images for
    num_eval networks, however the networks are grouped; batching can only make it run at a higher
    rate. The rate this machine reaches on plain batches of 256 images of the same model (float32,
    no augmentation) estimates what any batching can reach, so large-batch / sequential estimates
    the most a batched float32 mode could gain.
    """
    net = get_network(model, 3, 10)
    per_image = train_gflop_per_image(net, (3, 32, 32))
    work = (args.epochs + 1) * 10 * ipc * args.num_eval * per_image
    achieved = {m: work / train[m] for m in modes}
    large_batch = large_batch_train_gflops(net, (3, 32, 32))
    cells = ", ".join(f"{m} {achieved[m]:.1f}" for m in modes)
    print(f"    training GFLOP/s: {cells}; batch-256 training {large_batch:.1f}; "
          f"batch-256 / {modes[0]} = {large_batch / achieved[modes[0]]:.2f}x",
          flush=True)  # fmt: skip
    return {"train_gflops": achieved, "batch256_gflops": large_batch}


def print_row(model: str, ipc: int, epochs, modes: list[str], seconds: dict) -> None:
    cells = " ".join(f"{seconds[m]:>13.1f} s" for m in modes)
    ratios = " ".join(f"{m}: {seconds[modes[0]] / seconds[m]:.2f}x" for m in modes[1:])
    print(f"{model:<11} {ipc:>4} {epochs:>6} {cells}   {ratios}", flush=True)


def accuracy_rows(args: argparse.Namespace, device: torch.device) -> list[dict]:
    path = Path(args.cifar10).expanduser()
    if not args.cifar10 or not path.is_dir():
        where = f"no CIFAR-10 copy at {path}" if args.cifar10 else "--cifar10 ''"
        print(f"({where}: bf16 accuracy part skipped)", flush=True)
        return []
    data = get_dataset("CIFAR10", str(path), zca=True, download=False)
    if args.real_test_size:
        keep = torch.randperm(len(data.labels_test), generator=torch.Generator().manual_seed(0))
        keep = keep[: args.real_test_size]
        data = dataclasses.replace(data, images_test=data.images_test[keep],
                                   labels_test=data.labels_test[keep])  # fmt: skip
    images, labels = random_real_set(data, args.real_ipc, seed=0)
    print(f"\nRandom baseline, CIFAR-10 (ZCA), {args.real_model}, IPC {args.real_ipc}, "
          f"{args.real_epochs} epochs, {len(data.labels_test)} test images, "
          f"{args.num_eval} networks:", flush=True)  # fmt: skip
    rows = []
    for mode in split_list(args.real_modes):
        result, _ = timed(args.real_model, images, labels, 0.01, data, mode, args, device,
                          args.real_epochs)  # fmt: skip
        accs = ", ".join(f"{a:.2f}" for a in result.accs)
        print(f"  {mode:<15} {result.mean:6.2f} +- {result.std:.2f}  ({accs}; "
              f"{result.seconds:.0f} s)", flush=True)  # fmt: skip
        rows.append({**dataclasses.asdict(result), "setting": mode})
    for row in rows[1:]:
        gap = row["mean"] - rows[0]["mean"]
        print(f"  {row['setting']} - {rows[0]['setting']}: {gap:+.2f} points",
              flush=True)  # fmt: skip
    return rows


def main(args: argparse.Namespace) -> None:
    modes = split_list(args.modes)
    unknown = [m for m in modes + split_list(args.real_modes) if m not in MODES]
    if unknown:
        raise UserError(f"unknown mode(s) {unknown}: use {', '.join(MODES)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), device {device}, "
          f"num_eval {args.num_eval}, batch_train {args.batch_train}", flush=True)  # fmt: skip
    start = time.perf_counter()
    record = {"args": vars(args), "threads": torch.get_num_threads()}
    record["speed"] = speed_rows(args, modes, device) if args.epochs > 0 else []
    record["accuracy"] = accuracy_rows(args, device) if args.real_epochs > 0 else []
    print(f"total {time.perf_counter() - start:.0f} s", flush=True)
    if args.out:
        save_json(record, args.out)


if __name__ == "__main__":
    run_main(main, parse_args)
