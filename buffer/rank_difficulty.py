"""Rank every training image from easy to hard: the difficulty-index file of
docs/formats.md#index-files.

Trains `--repeat` independently initialised networks for `--epochs` epochs on the train set
(DeepCore's protocol: SGD with Nesterov momentum, constant learning rate, no augmentation),
scores every image with each network in eval mode (GraNd by default, or EL2N, Uncertainty),
averages the scores over the repeats and writes, per class, the train indices by ascending mean
score:

    <out>/<NAME>.pt          int64 [num_classes, n_per_class]: row c = class c's train indices,
                             easiest first (the authors' format; read by buffer_CL.py)
    <out>/<NAME>.json        how it was made: data set, model, flags, per-repeat timings
    <out>/<NAME>.scores.pt   {"scores": float64 [N] mean score per train image,
                              "per_repeat": float32 [repeat, N]}

NAME is <DATASET>_<METHOD> (ImageNet: ImageNet_<subset>_<METHOD>) unless --name is given; --out
defaults to the repository's data_indices/ folder, where buffer_CL.py --sort_method NAME looks.
Each finished repeat is kept in <out>/.<NAME>.partial/ so that rerunning an interrupted command
continues with the missing repeats; the folder is removed once the index file is written.
Under `torchrun --nproc_per_node=K` repeat k runs on rank k mod K (seeded as in one process, so
the same scores); rank 0 gathers them and writes the files.

Example (CPU-sized: 2 min on a busy 2-core CPU, 40 s of CPU time; the first run on a data set
also decodes and caches the images and fits ZCA, about 2 min more):
    python buffer/rank_difficulty.py --dataset CIFAR10 --data_path ~/.cache/pad-data/cifar10 \
        --zca --max_per_class 100 --model ConvNetW32 --epochs 5 --repeat 2
DeepCore's setting (the defaults: ResNet18, 10 repeats x 40 epochs; a GPU job):
    python buffer/rank_difficulty.py --dataset CIFAR10 --data_path ../dataset/ --zca
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import shutil
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from tqdm import tqdm  # noqa: E402

from utils.config import HelpFormatter, add_bool_flag  # noqa: E402
from utils.data import Data, get_dataset  # noqa: E402
from utils.difficulty import METHODS, SCORE_FUNCTIONS, rank_by_class  # noqa: E402
from utils.guard import check_finite  # noqa: E402
from utils.io import (  # noqa: E402
    UserError,
    load_pt,
    prepare_output_file,
    remove_temporaries,
    run_main,
    save_json,
    save_pt,
)
from utils.locks import hold_lock  # noqa: E402
from utils.networks import check_model_names, get_network  # noqa: E402
from utils.progress import progress_bar  # noqa: E402
from utils.runtime import (  # noqa: E402
    AMP_MODES,
    gather_objects,
    rank_and_world,
    rank_device,
    repo_root,
    seed_everything,
)

SCORE_DEFINITIONS = {
    "GraNd": "|softmax - onehot| * sqrt(1 + |h|^2), h = input of the last Linear (closed-form "
    "norm of the per-image cross-entropy gradient w.r.t. its weight and bias)",
    "EL2N": "|softmax - onehot| (L2 norm)",
    "Uncertainty": "least confidence: 1 - max softmax",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter
    )
    parser.add_argument("--dataset", default="CIFAR10", help="data set name")
    parser.add_argument("--subset", default="imagenette", help="ImageNet subset")
    parser.add_argument("--data_path", default="../dataset/", help="folder of the data set")
    parser.add_argument("--method", default="GraNd", help="GraNd, EL2N or Uncertainty")
    parser.add_argument("--model", default="ResNet18", help="scoring network")
    parser.add_argument("--epochs", type=int, default=40, help="training epochs per repeat")
    parser.add_argument("--repeat", type=int, default=10, help="independently initialised runs")
    parser.add_argument("--lr", type=float, default=0.1, help="SGD learning rate (constant)")
    parser.add_argument("--momentum", type=float, default=0.9, help="momentum, Nesterov when > 0")
    parser.add_argument("--weight_decay", type=float, default=5e-4, help="SGD weight decay")
    parser.add_argument("--batch", type=int, default=128, help="training and scoring batch")
    add_bool_flag(parser, "--zca", False, "ZCA-whiten the images")
    parser.add_argument("--max_per_class", type=int, default=None,
                        help="first N per class (none: all)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0, help="repeat k uses seed + 5k")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument(
        "--out",
        default=str(repo_root() / "data_indices"),
        help="folder for the index files (buffer_CL.py: --indices_path)",
    )
    parser.add_argument("--name", default=None, help="output name (none: <DATASET>_<METHOD>)")
    parser.add_argument("--amp", default="off", help="off, or bf16 autocast in training")
    add_bool_flag(parser, "--overwrite", False, "replace an existing file")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def main(args: argparse.Namespace) -> Path:
    with contextlib.ExitStack() as held:  # the index file's lock, released however it ends
        return rank_images(args, held)


def rank_images(args: argparse.Namespace, held: contextlib.ExitStack) -> Path:
    args.method = check_args(args)
    rank, world = rank_and_world()  # torchrun: the repeats are split across the ranks
    device = rank_device(args.device, world)
    name = args.name or default_name(args)
    target = Path(args.out).expanduser() / f"{name}.pt"
    prepare_output_file(target, "--out")
    # docs/formats.md#locks: one process per index file (and its partial scores)
    lock = target.parent / (f".{name}.lock" if rank == 0 else f".{name}.lock.rank{rank}")
    held.enter_context(hold_lock(lock, f"index file {target}"))
    if target.exists() and not args.overwrite:
        raise UserError(f"{target} exists: pass --overwrite to replace it, or --name to add one")
    data = get_dataset(
        args.dataset, args.data_path, subset=args.subset, zca=args.zca,
        max_per_class=args.max_per_class,
    )  # fmt: skip
    check_class_counts(data)

    config = scoring_config(args, data)
    partial = target.parent / f".{name}.partial"
    my_repeats = range(rank, args.repeat, world)  # repeat k runs on rank k % world
    for k in my_repeats:  # writes a kill cut short; another rank's files are its own business
        remove_temporaries(partial, f"repeat_{k}-*")
    if rank == 0:  # the others may still be writing when a rank > 0 ends
        held.callback(remove_if_unused, partial)
    start = time.perf_counter()
    mine = {}  # a repeat's scores do not depend on the rank
    for k in progress_bar(my_repeats, desc="repeats"):
        saved = partial_file(partial, k, config)
        mine[k] = scored_repeat(args, data, k, device, saved, config)
    repeats = {k: result for share in gather_objects(mine, world) for k, result in share.items()}
    if rank != 0:
        return target  # rank 0 writes
    per_repeat = torch.stack([repeats[k][0] for k in range(args.repeat)])  # [repeat, N]
    runs = [repeats[k][1] for k in range(args.repeat)]
    mean_scores = per_repeat.double().mean(dim=0)
    # docs/formats.md#index-files
    order = rank_by_class(mean_scores, data.labels_train, data.num_classes)

    scores_path = target.with_name(f"{name}.scores.pt")
    save_pt({"scores": mean_scores, "per_repeat": per_repeat}, scores_path)
    meta = {
        "format": "int64 [num_classes, n_per_class]; row c: the train indices of class c, "
        "easiest first (ascending mean score)",
        **config,
        "n_per_class": order.shape[1],
        "repeats": args.repeat,
        "seeds": [args.seed + 5 * k for k in range(args.repeat)],
        "score": SCORE_DEFINITIONS[args.method],
        "scores_file": scores_path.name,
        "device": str(device),
        "world_size": world,
        "runs": runs,
        "seconds": round(time.perf_counter() - start, 2),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "torch": torch.__version__,
    }
    save_json(meta, target.with_suffix(".json"))
    save_pt(order, target)
    shutil.rmtree(partial, ignore_errors=True)
    print(f"wrote {target}: {order.shape[0]} classes x {order.shape[1]} images, easy to hard")
    return target


def check_args(args: argparse.Namespace) -> str:
    """UserError for bad flags before any data is read; returns the canonical method name."""
    methods = {m.lower(): m for m in METHODS}
    if args.method.lower() not in methods:
        raise UserError(f"unknown --method {args.method!r}: expected one of {', '.join(METHODS)}")
    check_model_names([args.model], what="--model")
    checks = [
        (args.repeat >= 1, f"--repeat={args.repeat}: expected at least 1 run"),
        (args.epochs >= 0, f"--epochs={args.epochs}: expected >= 0"),
        (args.batch >= 1, f"--batch={args.batch}: expected at least 1"),
        (args.lr > 0 or args.epochs == 0, f"--lr={args.lr}: expected a learning rate > 0"),
        (0 <= args.momentum < 1, f"--momentum={args.momentum}: expected a value in [0, 1)"),
        (args.weight_decay >= 0, f"--weight_decay={args.weight_decay}: expected >= 0"),
        (args.amp in AMP_MODES, f"--amp={args.amp!r}: expected one of {', '.join(AMP_MODES)}"),
        (
            args.max_per_class is None or args.max_per_class >= 1,
            f"--max_per_class={args.max_per_class}: expected at least 1 image per class",
        ),
        (
            args.name is None or (args.name and "/" not in args.name and "\\" not in args.name),
            f"--name={args.name!r}: expected a file name without folders (use --out for those)",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise UserError(message)
    if args.name is not None and args.name.endswith(".pt"):
        args.name = args.name[: -len(".pt")]
    return methods[args.method.lower()]


STAGE = "difficulty scoring"


def advice(args: argparse.Namespace) -> str:
    return f"nothing was written; rerun with a lower --lr (now {args.lr:g}), e.g. --lr 0.01"


def default_name(args: argparse.Namespace) -> str:
    if args.dataset == "ImageNet":
        return f"ImageNet_{args.subset}_{args.method}"
    return f"{args.dataset}_{args.method}"


def check_class_counts(data: Data) -> None:
    """The [C, n] format needs equal counts per class: say so now, not after hours of training."""
    counts = torch.bincount(data.labels_train, minlength=data.num_classes)
    if (counts != counts[0]).any():
        raise UserError(
            f"{data.name} has unequal train images per class (from {int(counts.min())} to "
            f"{int(counts.max())}): an index file needs equal counts; pass "
            f"--max_per_class {int(counts.min())}"
        )


def scoring_config(args: argparse.Namespace, data: Data) -> dict:
    """Everything the scores depend on: the sidecar's core and the key of the partial files."""
    labels_digest = hashlib.sha1(data.labels_train.numpy().tobytes()).hexdigest()[:16]
    return {
        "dataset": args.dataset,
        "subset": args.subset if args.dataset == "ImageNet" else None,
        "data_path": str(Path(args.data_path).expanduser().absolute()),
        "zca": args.zca,
        "max_per_class": args.max_per_class,
        "num_classes": data.num_classes,
        "num_train": len(data.labels_train),
        "labels_sha1": labels_digest,
        "method": args.method,
        "model": args.model,
        "epochs": args.epochs,
        "lr": args.lr,
        "momentum": args.momentum,
        "nesterov": args.momentum > 0,
        "weight_decay": args.weight_decay,
        "batch": args.batch,
        "seed": args.seed,
        "amp": args.amp,
    }


def remove_if_unused(partial: Path) -> None:
    """However the run ends, no partial folder without a finished repeat stays behind."""
    if partial.is_dir() and not any(partial.glob("repeat_*.pt")):
        shutil.rmtree(partial, ignore_errors=True)


def partial_file(partial: Path, k: int, config: dict) -> Path:
    """Where repeat k's scores wait; the name carries a digest of the configuration, so a rerun
    with other settings never reuses them."""
    key = hashlib.sha1(json.dumps(config, sort_keys=True).encode()).hexdigest()[:12]
    return partial / f"repeat_{k}-{key}.pt"


def read_partial(saved: Path, k: int, n: int) -> dict:
    """A finished repeat: {"scores": float [n], "run": dict}; anything else names the file."""
    content = load_pt(saved, what=f"partial scores of repeat {k}")
    scores = content.get("scores") if isinstance(content, dict) else None
    if not (isinstance(scores, torch.Tensor) and scores.shape == (n,)) or not isinstance(
        content.get("run"), dict
    ):
        raise UserError(
            f"{saved} is not a partial score file of this script (expected {{'scores': [{n}], "
            "'run': ...}}): delete it, and the repeat is computed again"
        )
    return content


def scored_repeat(
    args: argparse.Namespace, data: Data, k: int, device: torch.device, saved: Path, config: dict
) -> tuple[torch.Tensor, dict]:
    """Scores [N] of repeat k: reused from its partial file, or trained, scored and saved."""
    if saved.exists():
        content = read_partial(saved, k, len(data.labels_train))
        tqdm.write(f"repeat {k}: reused the scores in {saved}")
        return content["scores"], {**content["run"], "reused": True}
    seed = args.seed + 5 * k  # DeepCore: run k uses seed + 5k
    seed_everything(seed)
    model = get_network(args.model, data.channel, data.num_classes, data.im_size).to(device)
    images, labels = data.images_train.to(device), data.labels_train.to(device)
    start = time.perf_counter()
    loss, acc = train(model, images, labels, args, desc=f"repeat {k}")
    trained = time.perf_counter()
    scores = SCORE_FUNCTIONS[args.method](model, images, labels, args.batch)
    check_finite(STAGE, f"repeat {k}", advice(args), **{f"{args.method}_scores": scores})
    run = {
        "repeat": k,
        "seed": seed,
        "train_seconds": round(trained - start, 2),
        "score_seconds": round(time.perf_counter() - trained, 2),
        "train_loss": loss,
        "train_acc": acc,
    }
    save_pt({"scores": scores, "run": run, "config": config}, saved)
    return scores, {**run, "reused": False}


def train(
    model: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    args: argparse.Namespace,
    desc: str,
) -> tuple[float | None, float | None]:
    """`args.epochs` epochs of shuffled mini-batch SGD; the last epoch's mean loss and accuracy."""
    optimizer = torch.optim.SGD(
        model.parameters(), lr=args.lr, momentum=args.momentum,
        weight_decay=args.weight_decay, nesterov=args.momentum > 0,
    )  # fmt: skip
    autocast = (
        torch.autocast(images.device.type, dtype=torch.bfloat16)
        if args.amp == "bf16"
        else contextlib.nullcontext()
    )
    model.train()
    loss, acc = None, None
    epochs = progress_bar(range(args.epochs), desc=desc, leave=False)
    for epoch in epochs:
        permutation = torch.randperm(len(images)).to(images.device)
        loss_sum = torch.zeros((), device=images.device)
        correct = torch.zeros((), dtype=torch.int64, device=images.device)
        for start in range(0, len(images), args.batch):
            batch = permutation[start : start + args.batch]
            x, y = images[batch], labels[batch]
            with autocast:
                logits = model(x)
                batch_loss = F.cross_entropy(logits, y)
            optimizer.zero_grad(set_to_none=True)
            batch_loss.backward()
            optimizer.step()
            loss_sum += batch_loss.detach().float() * len(y)
            correct += (logits.argmax(dim=1) == y).sum()
        loss, acc = loss_sum.item() / len(images), correct.item() / len(images)
        # docs/algorithms.md#divergence-guard: stop at the epoch it happens, not after all of them
        where = f"{desc}, epoch {epoch}"
        check_finite(STAGE, where, advice(args), train_loss=loss, parameters=model.parameters())
        epochs.set_postfix(loss=f"{loss:.3f}", acc=f"{acc:.3f}")
    return loss, acc


if __name__ == "__main__":
    run_main(main, parse_args)
