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
directory for --random_ipc, unless --out names a file or a folder. By default the networks run
in bf16 where the device has native bf16 and compiled where torch can compile (--amp auto
--compile auto, docs/algorithms.md#evaluation-speed); --amp off --compile false is float32 eager.
Under torchrun the ranks split the (model, network) pairs and rank 0 prints and writes the results.

Evaluation a reviewer trusts (docs/evaluation.md):

    # LRS and ARS: the set and a same-size Random subset, own/hard labels, with/without augmentation
    python distill/evaluation.py --data_dir=.../images_best.pt --label_dir=.../labels_best.pt \
        --lr_dir=.../lr_best.pt --zca --scores --full_accuracy 84.8

A pool (--eval_mode M, W, D, A, P, N, BN, X) also trains the Random baseline of the same size and
prints the paper's Table 2 shape (accuracy per architecture, gain over Random), written as
Markdown beside the JSON (`eval_best.md`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils.augment import DSA_STRATEGY  # noqa: E402
from utils.compiled import COMPILE_MODES, resolve_compile  # noqa: E402
from utils.config import HelpFormatter, add_bool_flag, str2bool  # noqa: E402
from utils.data import Data, get_dataset  # noqa: E402
from utils.evaluate import (  # noqa: E402
    EVAL_AMP_MODES,
    EVAL_MODES,
    EVAL_POOLS,
    EvalResult,
    eval_pool,
    evaluate_models,
    random_real_set,
    resolve_amp,
)
from utils.io import (  # noqa: E402
    UserError,
    atomic_write,
    load_json,
    load_pt,
    load_yaml,
    prepare_output_file,
    run_main,
    save_json,
)
from utils.networks import check_model_names  # noqa: E402
from utils.provenance import check_provenance  # noqa: E402
from utils.runtime import rank_and_world, rank_device  # noqa: E402
from utils.scores import SCORE_ROWS, check_full_accuracy, robust_scores  # noqa: E402
from utils.tables import markdown_table, mean_std, text_table  # noqa: E402
from utils.tensor_cache import cache_root  # noqa: E402

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
    p.add_argument("--val_per_class", type=int, default=0,
                   help="hold out the last N train images per class and report their accuracy "
                   "too (docs/evaluation.md#validation-split)")  # fmt: skip
    p.add_argument("--amp", default="auto", choices=EVAL_AMP_MODES,
                   help="bf16: bfloat16 autocast; auto: bf16 where the device has native bf16 "
                   "(docs/algorithms.md#evaluation-speed)")  # fmt: skip
    p.add_argument(
        "--compile",
        default="auto",
        choices=COMPILE_MODES,
        help="torch.compile the networks: auto (where torch can), true, false",
    )
    p.add_argument("--batched", type=lambda v: None if v == "auto" else str2bool(v), nargs="?",
                   const=True, default="auto", metavar="BOOL|auto",
                   help="train the networks of a model as one vmapped ensemble: true, false, or "
                   "auto (batched on GPUs, sequential on the CPU, where it is faster)")  # fmt: skip
    # docs/evaluation.md#robust-scores
    add_bool_flag(p, "--scores", False,
                  "also evaluate hard labels, no augmentation and the same-size Random subset, "
                  "then print LRS and ARS")  # fmt: skip
    p.add_argument("--full_accuracy", type=float,
                   help="full-data test accuracy in percent for --scores (none: train one "
                   "network on the whole training set once and cache the result)")  # fmt: skip
    p.add_argument(
        "--full_epochs",
        type=int,
        help="epochs of that full-data training (none: --epoch_eval_train)",
    )
    p.add_argument(
        "--random_lr",
        type=float,
        default=RANDOM_LR,
        help="learning rate of the Random baseline and the full-data training",
    )
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def check_sources(args: argparse.Namespace) -> None:
    """Exactly one source: a distilled set with one lr, or --random_ipc."""
    if args.full_accuracy is not None:
        check_full_accuracy(args.full_accuracy)
    if args.random_ipc is not None:
        if args.scores:
            raise UserError("--scores compares a distilled set with Random: drop --random_ipc")
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


def evaluate_set(
    args: argparse.Namespace, names: list[str], images: Tensor, labels: Tensor,
    lr: float | Tensor, data: Data, device: torch.device, **overrides: object,
) -> dict[str, EvalResult]:  # fmt: skip
    """The protocol of the command line on one set, per model; `overrides` replace options."""
    options = dict(
        epochs=args.epoch_eval_train, batch_train=args.batch_train, dsa=args.dsa,
        dsa_strategy=args.dsa_strategy, num_eval=args.num_eval, device=device, seed=args.seed,
        amp=args.amp, compile=args.compile, batched=args.batched,
    )  # fmt: skip
    options.update(overrides)
    return {r.model: r for r in evaluate_models(names, images, labels, lr, data, **options)}


def same_size_random(args: argparse.Namespace, images: Tensor, data) -> tuple[Tensor, Tensor]:
    """The Random baseline of the distilled set's size: len(images) / classes per class."""
    if len(images) % data.num_classes:
        raise UserError(
            f"the set has {len(images)} images, not a multiple of {data.num_classes} classes: "
            "the Random baseline needs the same number of images per class"
        )
    return random_real_set(data, len(images) // data.num_classes, args.seed)


def score_rows(args, names, images, labels, lr, data, device) -> dict[str, dict[str, EvalResult]]:
    """The accuracies of docs/evaluation.md#robust-scores: row -> model -> result, each row
    printed when done (they take long). The Random subset's own labels are its real hard labels,
    so its two label rows are one evaluation."""
    random_images, random_labels = same_size_random(args, images, data)
    no_aug = {"dsa": True, "dsa_strategy": "none"}
    hard = labels.argmax(1) if labels.is_floating_point() else None  # argmax, plain CE
    plan = {
        "syn": (images, labels, lr, {}),
        "syn_hard": None if hard is None else (images, hard, lr, {}),
        "random": (random_images, random_labels, args.random_lr, {}),
        "random_hard": None,
        "syn_naug": (images, labels, lr, no_aug),
        "random_naug": (random_images, random_labels, args.random_lr, no_aug),
    }
    same = {"syn_hard": "syn", "random_hard": "random"}
    rows = {}
    for row, setting in plan.items():
        if setting is None:
            rows[row] = rows[same[row]]
            continue
        row_images, row_labels, row_lr, overrides = setting
        rows[row] = evaluate_set(args, names, row_images, row_labels, row_lr, data, device,
                                 **overrides)  # fmt: skip
        if rank_and_world()[0] == 0:
            done = ", ".join(f"{r.model} {mean_std(r.mean, r.std)}" for r in rows[row].values())
            print(f"scores: {row}: {done}", flush=True)
    return rows


def full_accuracy(args: argparse.Namespace, name: str, data, device) -> tuple[float, str]:
    """(full-data accuracy in percent, where it came from): --full_accuracy, else one network
    trained on the whole training set, cached in the data cache folder by its settings."""
    if args.full_accuracy is not None:
        return args.full_accuracy, "given"
    epochs = args.epoch_eval_train if args.full_epochs is None else args.full_epochs
    key = {
        "dataset": args.dataset, "subset": args.subset,
        "data_path": str(Path(args.data_path).expanduser().absolute()), "zca": args.zca,
        "max_per_class": args.max_per_class, "val_per_class": args.val_per_class, "model": name,
        "epochs": epochs, "lr": args.random_lr, "batch_train": args.batch_train, "dsa": args.dsa,
        "dsa_strategy": args.dsa_strategy, "seed": args.seed, "amp": args.amp,
    }  # fmt: skip
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = cache_root(None) / f"full_accuracy-{args.dataset}-{name}-{digest}.json"
    if path.exists():
        return load_json(path, what="full-data accuracy cache")["accuracy"], f"cached {path}"
    result = evaluate_set(args, [name], data.images_train, data.labels_train, args.random_lr,
                          data, device, epochs=epochs, num_eval=1)[name]  # fmt: skip
    if rank_and_world()[0] == 0:
        save_json({**key, "accuracy": result.mean, "seconds": result.seconds}, path)
    return result.mean, f"trained ({epochs} epochs, {result.seconds:.0f} s), cached {path}"


def model_record(r: EvalResult, args: argparse.Namespace, device) -> dict:
    record = {
        "accs": r.accs, "mean": r.mean, "std": r.std, "epochs": r.epochs, "lr": r.lr,
        "batch": r.batch, "seed": args.seed, "device": str(device), "seconds": r.seconds,
        "mode": r.mode,
    }  # fmt: skip
    if r.val_accs is not None:
        record.update(val_accs=r.val_accs, val_mean=r.val_mean, val_std=r.val_std)
    return record


def scores_record(rows, name: str, full: tuple[float, str]) -> dict:
    """JSON of one model's scores: the accuracies (percent) and, beside them, HLR, IOR, LRS, ARS
    (fractions, per network and mean/std)."""
    accs = {row: rows[row][name].accs for row in SCORE_ROWS}
    return {
        "accuracies": {
            row: {"accs": a, "mean": rows[row][name].mean, "std": rows[row][name].std}
            for row, a in accs.items()
        },  # fmt: skip
        "full_accuracy": full[0],
        "full_accuracy_source": full[1],
        **robust_scores(accs, full[0]),
    }


def scores_table(name: str, record: dict, num_eval: int) -> str:
    a = {row: mean_std(v["mean"], v["std"]) for row, v in record["accuracies"].items()}
    rows = [
        ["own labels, augmentation", a["syn"], a["random"]],
        ["hard labels, augmentation", a["syn_hard"], a["random_hard"]],
        ["own labels, no augmentation", a["syn_naug"], a["random_naug"]],
    ]
    table = text_table([f"{name} ({num_eval} networks, %)", "distilled", "Random"], rows)
    scores = ", ".join(
        f"{key.upper()} {record[key]['mean']:.3f} ± {record[key]['std']:.3f}"
        for key in ("hlr", "ior", "lrs", "ars")
    )
    full = f"full data {record['full_accuracy']:.2f}% ({record['full_accuracy_source']})"
    return f"{table}\n{full}\n{scores} (fractions; LRS and ARS in [0, 1])"


def table2(names: list[str], method: str, results: dict, random: dict | None) -> tuple[str, str]:
    """The paper's Table 2 shape: accuracy per architecture and the mean, with Random and the
    gain over it (docs/evaluation.md#table-2-output). Returns (text, markdown)."""
    header = ["method", *names, "mean"]

    def row(label: str, by_model: dict) -> list[str]:
        means = [by_model[n].mean for n in names]
        cells = [mean_std(by_model[n].mean, by_model[n].std) for n in names]
        return [label, *cells, f"{sum(means) / len(means):.2f}"]

    rows = [row(method, results)]
    if random is not None:
        gains = [results[n].mean - random[n].mean for n in names]
        rows = [row("Random", random), *rows,
                ["gain over Random", *(f"{g:+.2f}" for g in gains),
                 f"{sum(gains) / len(gains):+.2f}"]]  # fmt: skip
    return text_table(header, rows), markdown_table(header, rows)


def main(args: argparse.Namespace) -> dict:
    check_sources(args)
    model_names(args, (32, 32))  # an unknown model or eval_mode fails before the data set loads
    rank, world = rank_and_world()
    device = rank_device(args.device, world)
    # resolved once: every evaluation of this run (set, Random, scores) uses the same speed options
    args.amp = amp = resolve_amp(args.amp, device, "--amp")
    args.compile = compiled = resolve_compile(args.compile, device)
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
                       max_per_class=args.max_per_class,
                       val_per_class=args.val_per_class)  # fmt: skip
    if args.random_ipc is not None:
        images, labels = random_real_set(data, args.random_ipc, args.seed)
    names = model_names(args, data.im_size)
    pool = not args.models and args.eval_mode in EVAL_POOLS and args.random_ipc is None
    rows, random = None, None
    if args.scores:
        rows = score_rows(args, names, images, labels, lr, data, device)
        results, random = rows["syn"], rows["random"]
    else:
        results = evaluate_set(args, names, images, labels, lr, data, device)
        if pool:  # the Random baseline of Table 2
            random_images, random_labels = same_size_random(args, images, data)
            random = evaluate_set(args, names, random_images, random_labels, args.random_lr,
                                  data, device)  # fmt: skip
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
        "val_per_class": args.val_per_class,
        "dsa": args.dsa,
        "dsa_strategy": args.dsa_strategy,
        "amp": amp,
        "compile": compiled,
        "world_size": world,
        "torch": torch.__version__,
        "models": {name: model_record(r, args, device) for name, r in results.items()},
    }
    if random is not None:
        record["random"] = {name: model_record(r, args, device) for name, r in random.items()}
    if rows is not None:
        fulls = {name: full_accuracy(args, name, data, device) for name in names}
        record["scores"] = {name: scores_record(rows, name, fulls[name]) for name in names}
    if rank == 0:
        report(args, record, names, results, random, world)
    return record


def report(args, record: dict, names: list[str], results: dict, random: dict | None,
           world: int) -> None:  # fmt: skip
    """Rank 0: one line per model, the score tables, Table 2 for a pool, and the files."""
    for r in results.values():
        val = "" if r.val_mean is None else f", validation {r.val_mean:.2f} +- {r.val_std:.2f}"
        print(f"{r.model}: {r.mean:.2f} +- {r.std:.2f}{val} over {len(r.accs)} networks "
              f"({r.mode}, {r.seconds:.0f} s)")  # fmt: skip
    for name, scores in record.get("scores", {}).items():
        print(scores_table(name, scores, args.num_eval))
    out = output_path(args)
    save_json(record, out)
    print(f"wrote {out}")
    if not args.models and args.eval_mode in EVAL_POOLS:
        method = "Random" if args.random_ipc is not None else Path(args.data_dir).name
        text, markdown = table2(names, method, results, random)
        print(text)
        with atomic_write(out.with_suffix(".md")) as tmp:
            tmp.write_text(f"Test accuracy (%) on {args.dataset}, eval_mode {args.eval_mode}, "
                           f"{args.num_eval} networks per model:\n\n{markdown}")  # fmt: skip
        print(f"wrote {out.with_suffix('.md')}")


if __name__ == "__main__":
    run_main(main, parse_args)
