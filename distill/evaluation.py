"""Evaluate a distilled set, or the Random baseline, by the protocol of
docs/algorithms.md#evaluation-protocol.

Trains `--num_eval` fresh networks per model of the pool on the set, tests them on the real test
set, prints one line per model and writes `eval_<name>.json`. The README's command works as is,
from distill/ or the repository root:

    cd distill
    python evaluation.py --lr_dir=../logged_files/CIFAR10/10/ConvNet/RUN/Normal/lr_best.pt \\
        --data_dir=../logged_files/CIFAR10/10/ConvNet/RUN/Normal/images_best.pt \\
        --label_dir=../logged_files/CIFAR10/10/ConvNet/RUN/Normal/labels_best.pt --zca

    # Random baseline: 10 random real images per class, hard labels, lr 0.01
    python distill/evaluation.py --random_ipc 10 --zca --data_path ~/.cache/pad-data/cifar10

Labels may be soft (float [N, classes] logits: soft cross-entropy) or hard (int [N]: cross-
entropy); sets saved by the authors' code (labels with requires_grad, lr a 0-d tensor) load as
they are. With --zca the images are taken to be in ZCA space already, as distillation saves them.
The JSON goes next to the images file (`eval_best.json` for `images_best.pt`), or to the working
directory for --random_ipc, unless --out names a file or a folder. Under torchrun the ranks split
the (model, network) pairs and rank 0 prints and writes the results.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils.augment import DSA_STRATEGY  # noqa: E402
from utils.config import HelpFormatter, add_bool_flag, str2bool  # noqa: E402
from utils.data import get_dataset  # noqa: E402
from utils.evaluate import EVAL_MODES, eval_pool, evaluate_models, random_real_set  # noqa: E402
from utils.io import (  # noqa: E402
    UserError,
    load_pt,
    load_yaml,
    prepare_output_file,
    run_main,
    save_json,
)
from utils.networks import check_model_names  # noqa: E402
from utils.provenance import check_provenance  # noqa: E402
from utils.runtime import AMP_MODES, rank_and_world, rank_device  # noqa: E402

RANDOM_LR = 0.01  # --lr_net default for the Random baseline


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    # the reference's flags (docs/hyperparameters.md#evaluation-flags)
    p.add_argument("--dataset", default="CIFAR10", help="data set of the distilled images")
    p.add_argument("--subset", default="imagenette", help="ImageNet subset")
    p.add_argument("--model", default="ConvNet", help="the distillation model (eval_mode S, C)")
    p.add_argument("--eval_mode", default="S", help=f"model pool: {', '.join(EVAL_MODES)}")
    p.add_argument("--epoch_eval_train", type=int, default=1000,
                   help="training epochs of each network")  # fmt: skip
    p.add_argument("--batch_real", type=int, default=256, help="unused, kept for compatibility")
    add_bool_flag(p, "--dsa", True, "DSA augmentation (false: DC augmentation)")
    p.add_argument("--dsa_strategy", default=DSA_STRATEGY, help="'none' turns augmentation off")
    p.add_argument("--data_path", default="data", help="folder of the data set")
    add_bool_flag(p, "--zca", False, "ZCA-whiten the real data")
    p.add_argument("--lr_teacher", type=float, default=0.01, help="unused, kept for compatibility")
    add_bool_flag(p, "--no_aug", False,
                  "unused, kept for compatibility (use --dsa_strategy none)")  # fmt: skip
    p.add_argument("--batch_train", type=int, default=128, help="training batch size")
    add_bool_flag(p, "--parall_eva", False, "unused, kept for compatibility (see --batched)")
    p.add_argument("--data_dir", help="synthetic images .pt [N, C, H, W]")
    p.add_argument("--label_dir", help="labels .pt: float [N, classes] logits or int [N]")
    p.add_argument("--lr_dir", help="learning rate .pt (a 0-d tensor)")
    # ours
    p.add_argument("--models", help="comma-separated model names; replaces --eval_mode")
    p.add_argument("--num_eval", type=int, default=5, help="networks per model")
    p.add_argument("--seed", type=int, default=0, help="seed of the networks (and of --random_ipc)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--out", help="JSON file, or a folder for eval_<name>.json")
    p.add_argument("--lr_net", type=float, help="learning rate instead of --lr_dir")
    p.add_argument("--random_ipc", type=int, help="evaluate K random real images per class")
    p.add_argument("--max_per_class", type=int, help="use the first N train images of each class")
    p.add_argument("--amp", default="off", choices=AMP_MODES, help="bf16: bfloat16 autocast")
    p.add_argument("--batched", type=lambda v: None if v == "auto" else str2bool(v), nargs="?",
                   const=True, default="auto", metavar="BOOL|auto",
                   help="train the networks of a model as one vmapped ensemble: true, false, or "
                   "auto (batched on GPUs, sequential on the CPU, where it is faster)")  # fmt: skip
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def check_sources(args: argparse.Namespace) -> None:
    """Exactly one source: a distilled set with one lr, or --random_ipc."""
    if args.random_ipc is not None:
        given = [f for f in ("data_dir", "label_dir", "lr_dir") if getattr(args, f)]
        if given:
            raise UserError(
                f"--random_ipc evaluates real images; drop --{', --'.join(given)} "
                "(set the learning rate with --lr_net)"
            )
        return
    missing = [f"--{f}" for f in ("data_dir", "label_dir") if not getattr(args, f)]
    if missing:
        raise UserError(
            f"{' and '.join(missing)} missing: give the distilled images and labels files, "
            "or --random_ipc K for the Random baseline"
        )
    if (args.lr_dir is None) == (args.lr_net is None):
        raise UserError(
            "give the learning rate with exactly one of --lr_dir FILE or --lr_net VALUE"
        )


def load_tensor(path: str, what: str) -> Tensor:
    value = load_pt(path, what=what)
    if not isinstance(value, Tensor):
        raise UserError(f"{what} {path} holds a {type(value).__name__}: expected one tensor")
    return value.detach()  # the authors save labels with requires_grad


def check_set_provenance(args: argparse.Namespace) -> None:
    """A set distilled here lies in `<run>/Normal/`, beside the run's config.yaml: it must be
    evaluated on the data set and ZCA it was distilled with (docs/formats.md#provenance-checks)."""
    images = Path(args.data_dir)
    config = images.absolute().parent.parent / "config.yaml"
    recorded = load_yaml(config, what="run config") if config.is_file() else None
    wanted = {"dataset": args.dataset, "zca": args.zca}
    if args.dataset == "ImageNet":
        wanted["subset"] = args.subset
    fix = "evaluate with the run's --dataset and --zca"
    recorded = recorded if isinstance(recorded, dict) else None
    check_provenance(images, "distilled set", config, recorded, wanted, fix)


def load_lr(args: argparse.Namespace) -> float | Tensor:
    if args.lr_dir is None:
        return RANDOM_LR if args.lr_net is None else args.lr_net
    value = load_pt(args.lr_dir, what="learning rate file (--lr_dir)")
    return value.detach() if isinstance(value, Tensor) else value


def model_names(args: argparse.Namespace, im_size: tuple[int, int]) -> list[str]:
    if args.models:
        names = list(dict.fromkeys(m.strip() for m in args.models.split(",") if m.strip()))
        if not names:
            raise UserError(f"--models {args.models!r} names no model: e.g. ConvNet,ResNet18")
        check_model_names(names)
        return names
    return eval_pool(args.eval_mode, args.model, im_size)


def output_path(args: argparse.Namespace) -> Path:
    if args.random_ipc is not None:
        name, folder = f"random_ipc{args.random_ipc}_{args.dataset}", Path.cwd()
    else:
        images = Path(args.data_dir)
        name, folder = images.stem.removeprefix("images_"), images.parent
    filename = f"eval_{name}.json"
    if args.out is None:
        return folder / filename
    out = Path(args.out)
    if out.is_dir() or args.out.endswith(("/", os.sep)):
        return out / filename
    return out


def main(args: argparse.Namespace) -> dict:
    check_sources(args)
    model_names(args, (32, 32))  # an unknown model or eval_mode fails before the data set loads
    rank, world = rank_and_world()
    device = rank_device(args.device, world)
    out = output_path(args)
    if rank == 0:  # before the (long) training, not after it
        prepare_output_file(out, "--out")
    if args.random_ipc is None:  # read the small files before the (slow) data set
        images = load_tensor(args.data_dir, "images file (--data_dir)")
        labels = load_tensor(args.label_dir, "labels file (--label_dir)")
    lr = load_lr(args)
    if args.random_ipc is None:
        check_set_provenance(args)
    data = get_dataset(args.dataset, args.data_path, subset=args.subset, zca=args.zca,
                       max_per_class=args.max_per_class)  # fmt: skip
    if args.random_ipc is not None:
        images, labels = random_real_set(data, args.random_ipc, args.seed)
    names = model_names(args, data.im_size)
    results = evaluate_models(
        names, images, labels, lr, data, epochs=args.epoch_eval_train,
        batch_train=args.batch_train, dsa=args.dsa, dsa_strategy=args.dsa_strategy,
        num_eval=args.num_eval, device=device, seed=args.seed, amp=args.amp, batched=args.batched,
    )  # fmt: skip
    record = {
        "dataset": args.dataset,
        "subset": args.subset,
        "zca": args.zca,
        "images": None if args.random_ipc else str(Path(args.data_dir).absolute()),
        "labels": None if args.random_ipc else str(Path(args.label_dir).absolute()),
        "lr_file": str(Path(args.lr_dir).absolute()) if args.lr_dir else None,
        "random_ipc": args.random_ipc,
        "num_images": len(images),
        "label_type": "soft" if labels.is_floating_point() else "hard",
        "eval_mode": None if args.models else args.eval_mode,
        "num_eval": args.num_eval,
        "dsa": args.dsa,
        "dsa_strategy": args.dsa_strategy,
        "amp": args.amp,
        "world_size": world,
        "torch": torch.__version__,
        "models": {
            r.model: {
                "accs": r.accs,
                "mean": r.mean,
                "std": r.std,
                "epochs": r.epochs,
                "lr": r.lr,
                "batch": r.batch,
                "seed": args.seed,
                "device": str(device),
                "seconds": r.seconds,
                "mode": r.mode,
            }  # fmt: skip
            for r in results
        },
    }
    if rank == 0:
        for r in results:
            print(f"{r.model}: {r.mean:.2f} +- {r.std:.2f} over {len(r.accs)} networks "
                  f"({r.mode}, {r.seconds:.0f} s)")  # fmt: skip
        save_json(record, out)
        print(f"wrote {out}")
    return record


if __name__ == "__main__":
    run_main(main, parse_args)
