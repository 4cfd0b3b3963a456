"""Benchmark: time of evaluating one distilled set, float32 eager (the yardstick) vs the default
and the other fast modes of the evaluation (docs/algorithms.md#evaluation-speed).

    python scripts/bench/eval_speed.py          # ConvNetW32 and ConvNet, IPC 1, 10, 50
    python scripts/bench/eval_speed.py --models ConvNetW32 --ipcs 1 --epochs 2

For each model and IPC, a random CIFAR-shaped set (10 classes, soft labels) is evaluated by the
in-loop protocol (`utils.evaluate.evaluate_synset`: --num_eval networks, batch_train 128 as in the
PAD configs, DSA on, then a test pass over --test_size images) in each of --modes, one after the
other in this process:

    yardstick   --amp off  --compile false   (float32 eager: the authors' evaluation)
    bf16        --amp bf16 --compile false
    compiled    --amp off  --compile true
    default     --amp auto --compile auto    (here: bf16 and compiled)

Each mode evaluates the set twice with fresh networks: the first evaluation includes the one-off
compilations of the process (per architecture and shape), the second is what every later
evaluation of a distillation costs. The second is timed at --epochs training passes and
extrapolated to --protocol_epochs (default 300, the CPU configs' epoch_eval_train) from the time
per pass, and to --protocol_test test images from the time per test image; the first adds its
extra seconds (the compilations) to that. The ratios against the yardstick are printed for both.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from eval_batched import random_data, split_list  # noqa: E402

from utils.compiled import resolve_compile  # noqa: E402
from utils.evaluate import data_generators, init_networks, resolve_amp  # noqa: E402
from utils.io import run_main, save_json  # noqa: E402
from utils.train_nets import TrainConfig, networks_accuracy, train_networks  # noqa: E402

MODES = {  # name: (amp, compile) as given to distill/evaluation.py
    "yardstick": ("off", "false"),
    "bf16": ("bf16", "false"),
    "compiled": ("off", "true"),
    "default": ("auto", "auto"),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="ConvNetW32,ConvNet")
    p.add_argument("--ipcs", default="1,10,50")
    p.add_argument("--modes", default=",".join(MODES), help=f"from {', '.join(MODES)}")
    p.add_argument("--epochs", type=int, default=4, help="timed training passes - 1 per run")
    p.add_argument("--protocol_epochs", type=int, default=300, help="extrapolate to this E")
    p.add_argument("--num_eval", type=int, default=5)
    p.add_argument("--batch_train", type=int, default=128)
    p.add_argument("--test_size", type=int, default=10000, help="random test images (timed)")
    p.add_argument(
        "--protocol_test",
        type=int,
        default=10000,
        help="extrapolate the test pass to this many images (CIFAR-10's test set)",
    )
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", help="also write the rows to this JSON file")
    return p.parse_args(argv)


def one_evaluation(model, images, labels, data, config, num_eval, seed) -> tuple[float, float]:
    """evaluate_synset's steps, sequential engine: (seconds of training, seconds of testing)."""
    indices = list(range(num_eval))
    nets = init_networks(model, data, seed, indices)
    start = time.perf_counter()
    train_networks(nets, images, labels, 0.01, data_generators(seed, indices), config,
                   batched=False, desc=f"{model}")  # fmt: skip
    trained = time.perf_counter()
    networks_accuracy(nets, data.images_test, data.labels_test, amp=config.amp, batched=False,
                      compile=config.compile)  # fmt: skip
    return trained - start, time.perf_counter() - trained


def extrapolate(train: float, test: float, args: argparse.Namespace) -> float:
    """Seconds of the protocol's evaluation from the measured one, pass by pass, image by image."""
    passes = (args.protocol_epochs + 1) / (args.epochs + 1)
    return train * passes + test * args.protocol_test / args.test_size


def main(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    cpu = torch.device("cpu")
    modes = split_list(args.modes)
    resolved = {m: (resolve_amp(MODES[m][0], cpu), resolve_compile(MODES[m][1], cpu))
                for m in modes}  # fmt: skip
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), cpu, "
          f"num_eval {args.num_eval}, batch_train {args.batch_train}, {args.test_size} test "
          f"images; timed at {args.epochs} epochs, extrapolated to {args.protocol_epochs}",
          flush=True)  # fmt: skip
    for m in modes:
        print(f"  {m}: --amp {MODES[m][0]} --compile {MODES[m][1]} -> amp {resolved[m][0]}, "
              f"compiled {resolved[m][1]}")  # fmt: skip
    data = random_data(args.test_size)
    rows = []
    start_all = time.perf_counter()
    for model in split_list(args.models):
        for ipc in split_list(args.ipcs, int):
            g = torch.Generator().manual_seed(ipc)
            images = torch.randn(10 * ipc, 3, 32, 32, generator=g)
            labels = torch.randn(10 * ipc, 10, generator=g)
            row = {"model": model, "ipc": ipc}
            for m in modes:
                amp, compiled = resolved[m]
                config = TrainConfig(epochs=args.epochs, batch_train=args.batch_train, amp=amp,
                                     compile=compiled)  # fmt: skip
                first = one_evaluation(model, images, labels, data, config, args.num_eval, 0)
                later = one_evaluation(model, images, labels, data, config, args.num_eval, 1)
                later_seconds = extrapolate(*later, args)
                row[m] = {  # the first pays the one-off compilations on top of a later one
                    "first": later_seconds + max(0.0, sum(first) - sum(later)),
                    "later": later_seconds,
                    "measured": {"first": first, "later": later},
                }
                print(f"  {model} ipc {ipc} {m}: first {row[m]['first']:.1f} s, later "
                      f"{row[m]['later']:.1f} s (measured train+test {sum(first):.1f} / "
                      f"{sum(later):.1f} s)", flush=True)  # fmt: skip
            rows.append(row)
            print_row(row, modes)
    print(f"total {time.perf_counter() - start_all:.0f} s")
    if args.out:
        save_json({"args": vars(args), "rows": rows}, args.out)


def print_row(row: dict, modes: list[str]) -> None:
    base = row[modes[0]]
    parts = [f"{m} {row[m]['later']:.0f} s ({row[m]['later'] / base['later']:.2f}x; first "
             f"{row[m]['first'] / base['first']:.2f}x)" for m in modes[1:]]  # fmt: skip
    print(
        f"{row['model']:<11} ipc {row['ipc']:>3}: {modes[0]} {base['later']:.0f} s | "
        + " | ".join(parts),
        flush=True,
    )


if __name__ == "__main__":
    run_main(main, parse_args)
