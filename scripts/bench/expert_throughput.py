"""Expert-training throughput: plain SGD vs GSAM, float32 vs bf16 autocast, ConvNet vs ConvNetW32.

Part 1 times buffer_CL.py's own training loop (`train_epoch`: shuffle, DSA, forward, backward,
optimizer step) on random 32x32x3 data: `--warmup` batches, then `--batches` timed batches of
`--batch` images (the four cases of a model take turns batch by batch), and prints images/s
(batch / median batch time) with the ratios bf16/float32 and GSAM/SGD. "SGD" is GSAM with
rho 0, which takes the plain SGD step (one pass); GSAM uses the README's rho 0.01, alpha 0.3.
For float32 the achieved GFLOP/s is computed from an analytic count of the convolution and
linear layers (forward = 2 x multiply-adds, training ~ 3 x forward, GSAM ~ 2 x training).

Part 2 (unless --skip_accuracy) trains one expert in float32 and one with --amp bf16 on the same
short setting with buffer_CL.main (README flags, CIFAR-10 copy, --max_per_class, --epochs) and
reports both test accuracies.

Example (a few minutes on this 2-core CPU; numbers are noisy when the CPU is shared):
    python scripts/bench/expert_throughput.py --data_path ~/.cache/pad-data/cifar10
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "buffer"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import buffer_CL  # noqa: E402
import torch  # noqa: E402
from flops import train_gflop_per_image  # noqa: E402

from utils.gsam import GSAM  # noqa: E402
from utils.io import run_main  # noqa: E402
from utils.networks import get_network  # noqa: E402
from utils.trajectory import expert_dir  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["ConvNet", "ConvNetW32"])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--batches", type=int, default=10, help="timed batches per case")
    p.add_argument("--warmup", type=int, default=2, help="untimed batches per case")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--data_path", default=str(Path.home() / ".cache" / "pad-data" / "cifar10"))
    p.add_argument("--max_per_class", type=int, default=500)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--accuracy_model", default="ConvNetW32")
    p.add_argument("--accuracy_experts", type=int, default=1, help="experts per precision")
    p.add_argument("--skip_accuracy", action="store_true")
    p.add_argument("--compile", choices=("off", "on", "both"), default="off",
                   help="time buffer_CL's --compile (torch.compile) models; both: eager and "
                        "compiled tables; the accuracy check compiles unless off")  # fmt: skip
    return p.parse_args(argv)


def loop_args(batch: int, amp: str) -> argparse.Namespace:
    return argparse.Namespace(
        batch_train=batch, dsa=True, dsa_strategy=buffer_CL.DSA_STRATEGY, amp=amp
    )


CASES = (("SGD", 0.0, "off"), ("SGD", 0.0, "bf16"), ("GSAM", 0.01, "off"), ("GSAM", 0.01, "bf16"))


def model_speeds(
    name: str, args: argparse.Namespace, compiled: bool
) -> dict[tuple[str, str], float]:
    """Images/s of the four (optimizer, amp) cases of one model: batch size / median batch time.

    The cases take turns batch by batch, so a burst of load from other processes on a shared
    CPU slows all four alike instead of skewing the ratios.
    """
    images, labels = torch.randn(args.batch, 3, 32, 32), torch.randint(10, (args.batch,))
    batch = torch.arange(args.batch)
    runs = []
    for _, rho, amp in CASES:
        torch.manual_seed(0)
        model = get_network(name, 3, 10)
        base = torch.optim.SGD(model.parameters(), lr=0.01)
        optimizer = GSAM(model, base, rho=rho, alpha=0.3 if rho else 0.0, adaptive=True)
        forward = torch.compile(model) if compiled else model  # compiled in the warm-up
        runs.append((forward, optimizer, loop_args(args.batch, amp), torch.Generator()))
    seconds = [[] for _ in CASES]
    for step in range(args.warmup + args.batches):
        for (model, optimizer, loop, generator), times in zip(runs, seconds, strict=True):
            start = time.perf_counter()
            buffer_CL.train_epoch(model, optimizer, images, labels, batch, loop, generator)
            if step >= args.warmup:
                times.append(time.perf_counter() - start)
    return {
        (optimizer, amp): args.batch / statistics.median(times)
        for (optimizer, _, amp), times in zip(CASES, seconds, strict=True)
    }


def throughput_table(args: argparse.Namespace) -> None:
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), batch {args.batch}, "
          f"median of {args.batches} timed batches after {args.warmup} warm-up")  # fmt: skip
    for compiled in {"off": [False], "on": [True], "both": [False, True]}[args.compile]:
        print("\ncompiled (--compile true)" if compiled else "\neager (the default)")
        speed_table(args, compiled)


def speed_table(args: argparse.Namespace, compiled: bool) -> None:
    header = f"{'model':<11} {'optimizer':<9} {'float32 img/s':>13} {'bf16 img/s':>11}"
    print(header + f" {'bf16/fp32':>9} {'GSAM/SGD fp32':>13} {'GSAM/SGD bf16':>13}")
    for name in args.models:
        speed = model_speeds(name, args, compiled)
        for optimizer in ("SGD", "GSAM"):
            ratio = speed[optimizer, "bf16"] / speed[optimizer, "off"]
            line = f"{name:<11} {optimizer:<9} {speed[optimizer, 'off']:>13.0f} "
            line += f"{speed[optimizer, 'bf16']:>11.0f} {ratio:>8.2f}x"
            if optimizer == "GSAM":
                line += f" {speed['GSAM', 'off'] / speed['SGD', 'off']:>12.2f}x"
                line += f" {speed['GSAM', 'bf16'] / speed['SGD', 'bf16']:>12.2f}x"
            print(line, flush=True)
        if name == "ConvNet":
            model = get_network(name, 3, 10)
            train_flops = train_gflop_per_image(model, (3, 32, 32)) * 1e9  # forward + backward
            for optimizer, factor in (("SGD", 1), ("GSAM", 2)):
                gflops = speed[optimizer, "off"] * train_flops * factor / 1e9
                print(f"  ConvNet float32 {optimizer}: {train_flops / 3 / 1e6:.1f} MFLOP forward "
                      f"per image, {train_flops * factor / 1e6:.0f} MFLOP per trained image, "
                      f"{gflops:.1f} GFLOP/s achieved")  # fmt: skip


def accuracy_check(args: argparse.Namespace) -> None:
    """Experts in float32 and in bf16 on the same short setting (README flags, same seeds)."""
    print(f"\naccuracy: {args.accuracy_model}, CIFAR-10 copy at {args.data_path}, --zca, "
          f"{args.max_per_class} images per class, {args.epochs} epochs, "
          f"{args.accuracy_experts} expert(s) each, README GSAM flags, "
          f"--compile {args.compile != 'off'}")  # fmt: skip
    results = {}
    for amp in ("off", "bf16"):
        with tempfile.TemporaryDirectory() as buffer:
            flags = [
                "--dataset=CIFAR10", f"--model={args.accuracy_model}", "--zca",
                f"--data_path={args.data_path}", f"--buffer_path={buffer}",
                f"--num_experts={args.accuracy_experts}", f"--train_epochs={args.epochs}",
                f"--max_per_class={args.max_per_class}", "--rho_max=0.01", "--rho_min=0.01",
                "--alpha=0.3", "--lr_teacher=0.01", "--mom=0.", "--batch_train=256",
                f"--test_every={args.epochs}", f"--amp={amp}", f"--compile={args.compile != 'off'}",
            ]  # fmt: skip
            start = time.perf_counter()
            buffer_CL.main(buffer_CL.parse_args(flags))
            seconds = time.perf_counter() - start
            folder = expert_dir(buffer, "CIFAR10", args.accuracy_model, zca=True)
            records = [json.loads(line) for line in (folder / "metrics.jsonl").open()]
            accs = [r["test_acc"] for r in records if r["epoch"] == args.epochs - 1]
            results[amp] = (accs, seconds)
    for amp, (accs, seconds) in results.items():
        listed = ", ".join(f"{acc:.2f}" for acc in accs)
        print(f"  {'float32' if amp == 'off' else 'bf16':<8} test accuracy {listed} %, mean "
              f"{statistics.mean(accs):.2f}%  ({seconds:.0f} s with data loading)")  # fmt: skip
    difference = statistics.mean(results["bf16"][0]) - statistics.mean(results["off"][0])
    print(f"  difference bf16 - float32: {difference:+.2f} points")


def main(args: argparse.Namespace) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    throughput_table(args)
    if not args.skip_accuracy:
        accuracy_check(args)


if __name__ == "__main__":
    run_main(main, parse_args)
