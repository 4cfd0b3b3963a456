"""Expert trajectories with a curriculum and GSAM (docs/algorithms.md#curriculum-experts-with-gsam)
-> `replay_buffer_<n>.pt` files.

Every expert is a freshly initialised network trained `--train_epochs` epochs with GSAM on SGD;
its parameters are recorded before training and after every epoch. With `--sort_method NAME` each
epoch trains on a class-balanced slice of the difficulty ordering `<indices_path>/NAME.pt` (easy
data first, hard data added, then the easiest removed); without it every epoch uses all data
(plain MTT/FTD experts).

Expert k (0-based) is seeded with `--seed` + k and belongs to file k // save_interval, so a file's
content does not depend on which process trains it. A file is written (atomically) once all its
experts are done; finished experts of an unfinished file wait in
`.replay_buffer_<n>.partial_<k>.pt`. A rerun keeps the complete files and the partial experts and
trains only what is missing.
Under torchrun, rank r trains the files n with n % world_size == r.

Example (the README's command, run from buffer/):
    python buffer_CL.py --dataset=CIFAR10 --model=ConvNet --train_epochs=100 --num_experts=100 \
      --zca --buffer_path=../buffer_storage/ --data_path=../dataset/ --sort_method="CIFAR10_GraNd" \
      --rho_max=0.01 --rho_min=0.01 --alpha=0.3 --lr_teacher=0.01 --mom=0. --batch_train=256 \
      --init_ratio=0.75 --add_end_epoch=20 --rm_epoch_first=40 --rm_epoch_second=60 \
      --rm_easy_ratio_first=0.1 --rm_easy_ratio_second=0.2
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402
import contextlib  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import Tensor, nn  # noqa: E402
from tqdm import tqdm  # noqa: E402

from utils.augment import DSA_STRATEGY, augment  # noqa: E402
from utils.compiled import compiler_candidates, cxx_compiler  # noqa: E402
from utils.config import HelpFormatter, add_bool_flag  # noqa: E402
from utils.data import Data, check_dataset_name, get_dataset  # noqa: E402
from utils.difficulty import (  # noqa: E402
    curriculum_fraction,
    curriculum_indices,
    load_index_file,
    validate_curriculum,
)
from utils.gsam import GSAM  # noqa: E402
from utils.guard import check_finite  # noqa: E402
from utils.io import (  # noqa: E402
    UserError,
    atomic_write,
    load_json,
    prepare_output_dir,
    run_main,
    save_yaml,
)
from utils.locks import hold_lock, lock_path  # noqa: E402
from utils.networks import check_model_names, get_network  # noqa: E402
from utils.progress import progress_bar  # noqa: E402
from utils.provenance import check_provenance  # noqa: E402
from utils.runtime import (  # noqa: E402
    AMP_MODES,
    derived_seeds,
    rank_and_world,
    rank_device,
    repo_root,
    seed_everything,
)
from utils.tracking import MetricsLog  # noqa: E402
from utils.train_nets import networks_accuracy  # noqa: E402
from utils.trajectory import (  # noqa: E402
    FORMAT,
    Expert,
    expert_dir,
    expert_file,
    finish_expert,
    plan_files,
    snapshot_params,
)

CURRICULUM_KEYS = (
    "init_ratio", "add_end_epoch", "rm_epoch_first", "rm_epoch_second",
    "rm_easy_ratio_first", "rm_easy_ratio_second",
)  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    # docs/hyperparameters.md#expert-training-flags: the reference's flags and defaults
    p.add_argument("--dataset", default="CIFAR10", help="data set name (as in the distillation)")
    p.add_argument("--subset", default="imagenette", help="ImageNet subset")
    p.add_argument("--model", default="ConvNet", help="expert architecture")
    p.add_argument("--num_experts", type=int, default=100, help="experts to train")
    p.add_argument("--lr_teacher", type=float, default=0.01, help="experts' SGD learning rate")
    p.add_argument("--batch_train", type=int, default=256, help="experts' mini-batch size")
    p.add_argument("--batch_real", type=int, default=256, help="unused (reference flag)")
    add_bool_flag(p, "--dsa", True, "DSA augmentation (false: DC augmentation)")
    p.add_argument("--dsa_strategy", default=DSA_STRATEGY,
                   help="the DSA operations, joined by '_'")  # fmt: skip
    p.add_argument("--data_path", default="data", help="folder of the data set")
    p.add_argument("--buffer_path", default="./buffers",
                   help="root folder of the expert files (distillation: buffer_path)")  # fmt: skip
    p.add_argument("--train_epochs", type=int, default=50,
                   help="epochs per expert (train_epochs + 1 snapshots)")  # fmt: skip
    add_bool_flag(p, "--zca", False, "ZCA-whiten the real data")
    add_bool_flag(p, "--decay", False, "unused (reference flag)")
    p.add_argument("--mom", type=float, default=0.0, help="SGD momentum")
    p.add_argument("--l2", type=float, default=0.0, help="SGD weight decay")
    p.add_argument("--save_interval", type=int, default=10, help="experts per file")
    p.add_argument("--sort_method", default="",
                   help="difficulty file NAME under --indices_path (or a .pt path); empty: no "
                   "curriculum, every epoch on all data")  # fmt: skip
    p.add_argument("--init_ratio", type=float, default=1.0,
                   help="curriculum: easiest fraction of each class at epoch 0")  # fmt: skip
    p.add_argument("--add_end_epoch", type=int, default=100,
                   help="curriculum: epoch at which that fraction reaches 1")  # fmt: skip
    p.add_argument("--rm_epoch_first", type=int, default=40,
                   help="curriculum: last epoch on all of the data")  # fmt: skip
    p.add_argument("--rm_epoch_second", type=int, default=60,
                   help="curriculum: last epoch of the first removal phase")  # fmt: skip
    p.add_argument("--rm_easy_ratio_first", type=float, default=0.1,
                   help="curriculum: easiest fraction removed after rm_epoch_first")  # fmt: skip
    p.add_argument("--rm_easy_ratio_second", type=float, default=0.1,
                   help="curriculum: easiest fraction removed after rm_epoch_second")  # fmt: skip
    p.add_argument("--rho_max", type=float, default=2.0, help="GSAM radius (constant)")
    p.add_argument("--rho_min", type=float, default=2.0, help="must equal --rho_max")
    p.add_argument("--alpha", type=float, default=0.4, help="GSAM surrogate-gap coefficient")
    add_bool_flag(p, "--adaptive", True, "adaptive GSAM perturbation")
    add_bool_flag(p, "--add_hard", True, "unused (reference flag)")
    add_bool_flag(p, "--rm_easy", False, "unused (reference flag)")
    p.add_argument("--max_ratio", type=float, default=0.2, help="unused (reference flag)")
    # ours
    p.add_argument("--indices_path", default=str(repo_root() / "data_indices"),
                   help="folder of the difficulty files named by --sort_method")  # fmt: skip
    p.add_argument("--test_every", type=int, default=1,
                   help="test accuracy every K epochs (0: never)")  # fmt: skip
    p.add_argument("--amp", choices=AMP_MODES, default="off",
                   help="bf16: bfloat16 autocast (off: the paper's float32)")  # fmt: skip
    add_bool_flag(p, "--compile", False,
                  "torch.compile the training forward and backward (faster, float rounding "
                  "differs slightly; on CPU needs a C++ compiler)")  # fmt: skip
    p.add_argument("--max_per_class", type=int, default=None,
                   help="use the first N train images of each class (none: all)")  # fmt: skip
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--seed", type=int, default=0, help="expert k is seeded with seed + k")
    p.add_argument(
        "--res", type=int, default=32, help="ImageNet folder level (docs/formats.md#expert-folder)"
    )
    p.add_argument("--remove_easy", type=float, default=0.0,
                   help="ablation (buffer_RM): train every epoch without the easiest fraction "
                   "of each class, instead of the curriculum")  # fmt: skip
    p.add_argument("--remove_hard", type=float, default=0.0,
                   help="ablation (buffer_RM): train every epoch without the hardest "
                        "fraction")  # fmt: skip
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    """Refuse values the reference would silently mistrain with (or crash on later)."""
    for name in ("num_experts", "save_interval", "train_epochs", "batch_train"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} {getattr(args, name)}: expected at least 1")
    validate_curriculum(**{key: getattr(args, key) for key in CURRICULUM_KEYS})
    if args.rho_min != args.rho_max:  # docs/algorithms.md#gsam: rho is the constant rho_max
        raise UserError(
            f"--rho_min {args.rho_min} differs from --rho_max {args.rho_max}: with a constant "
            "learning rate GSAM's rho is constant; pass the same value to both"
        )
    if args.lr_teacher <= 0 or args.test_every < 0 or args.seed < 0:
        raise UserError(
            f"--lr_teacher {args.lr_teacher}, --test_every {args.test_every}, --seed {args.seed}: "
            "expected lr > 0, K >= 0 (0 turns tests off) and seed >= 0"
        )
    if not 0 <= args.mom < 1 or args.l2 < 0:
        raise UserError(f"--mom {args.mom}, --l2 {args.l2}: expected momentum in [0, 1), l2 >= 0")
    for name in ("remove_easy", "remove_hard"):
        if not 0 <= getattr(args, name) < 1:
            raise UserError(f"--{name} {getattr(args, name)}: expected a fraction in [0, 1)")
    if (args.remove_easy or args.remove_hard) and not args.sort_method:
        raise UserError("--remove_easy/--remove_hard need a difficulty order: add --sort_method")
    if args.remove_easy and args.remove_hard:
        raise UserError("give --remove_easy or --remove_hard, not both")
    check_model_names([args.model])
    check_dataset_name(args.dataset)


def index_file_path(args: argparse.Namespace) -> Path:
    """`--sort_method NAME` -> `<indices_path>/NAME.pt`; a value ending in .pt is a path."""
    name = args.sort_method
    if name.endswith(".pt"):
        path = Path(name).expanduser()
    else:
        path = Path(args.indices_path).expanduser() / f"{name}.pt"
    if not path.is_file():
        stem = Path(name).stem
        method = stem.rpartition("_")[2] if "_" in stem else "GraNd"
        make = f"--dataset={args.dataset} --method={method}"
        if args.dataset == "ImageNet":
            make += f" --subset={args.subset}"
        make += f" --name={stem} --out={path.parent}"
        raise UserError(
            f"difficulty file for --sort_method={name!r} not found: looked for {path.absolute()}; "
            f"make it with `python buffer/rank_difficulty.py {make}` (with this run's --data_path, "
            "--zca and --max_per_class) or point --indices_path at the folder that holds it"
        )
    return path


def check_index_provenance(args: argparse.Namespace, path: Path) -> None:
    """The index file must rank the images this run trains on: same data set and max_per_class;
    scores computed with other ZCA settings rank the same images, so that only warns
    (docs/formats.md#provenance-checks)."""
    sidecar = path.with_suffix(".json")
    recorded = load_json(sidecar, what="index file sidecar") if sidecar.exists() else None
    wanted = {"dataset": args.dataset, "zca": args.zca, "max_per_class": args.max_per_class}
    if args.dataset == "ImageNet":
        wanted["subset"] = args.subset
    fix = "make an index file with these settings (buffer/rank_difficulty.py), or use theirs"
    check_provenance(path, "difficulty index file", sidecar, recorded, wanted, fix, ("zca",))


def run_settings(args: argparse.Namespace, data: Data, order: Tensor | None) -> dict:
    """Everything that shapes a trajectory. Files and partial experts made with other settings
    are never mixed into this run's buffer. JSON-plain, so it compares equal after a round trip."""
    settings = {
        "format": FORMAT,
        "dataset": args.dataset, "subset": args.subset, "res": args.res, "model": args.model,
        "zca": args.zca, "max_per_class": args.max_per_class,
        "train_images": len(data.labels_train),
        "train_epochs": args.train_epochs, "lr_teacher": args.lr_teacher, "mom": args.mom,
        "l2": args.l2, "batch_train": args.batch_train, "dsa": args.dsa,
        "dsa_strategy": args.dsa_strategy, "rho": args.rho_max, "alpha": args.alpha,
        "adaptive": args.adaptive, "amp": args.amp, "seed": args.seed,
        "save_interval": args.save_interval, "sort_method": args.sort_method or None,
    }  # fmt: skip
    if order is not None:
        settings["indices_sha1"] = hashlib.sha1(order.numpy().tobytes()).hexdigest()
        settings.update({key: getattr(args, key) for key in CURRICULUM_KEYS})
        if args.remove_easy or args.remove_hard:
            settings.update(remove_easy=args.remove_easy, remove_hard=args.remove_hard)
    return json.loads(json.dumps(settings))


# ---------------------------------------------------------------------------------------------
# Training one expert (docs/algorithms.md#training-one-expert)


def epoch_indices(order: Tensor | None, epoch: int, args: argparse.Namespace, n_train: int):
    """The train indices of this epoch and the curriculum's (drop_easy, keep_upto) fractions."""
    if order is None:  # plain MTT/FTD experts: every image, every epoch
        return torch.arange(n_train), (0.0, 1.0)
    n = order.shape[1]
    if args.remove_easy:  # a fixed pruned subset, as the reference's buffer_RM.py ablation
        return order[:, int(args.remove_easy * n) :].reshape(-1), (args.remove_easy, 1.0)
    if args.remove_hard:
        keep = n - int(args.remove_hard * n)
        return order[:, :keep].reshape(-1), (0.0, keep / n)
    schedule = {key: getattr(args, key) for key in CURRICULUM_KEYS}
    return curriculum_indices(order, epoch, **schedule), curriculum_fraction(epoch, **schedule)


def loss_fn(model: nn.Module, x: Tensor, y: Tensor, amp: bool) -> Callable[[], tuple]:
    """The closure GSAM evaluates twice: forward on the current weights, hard-label CE."""

    def compute_loss() -> tuple[Tensor, Tensor]:
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(x)
        return F.cross_entropy(logits.float(), y), logits

    return compute_loss


def train_epoch(
    model: nn.Module,
    optimizer: GSAM,
    images: Tensor,
    labels: Tensor,
    indices: Tensor,
    args: argparse.Namespace,
    generator: torch.Generator,
) -> tuple[float, float]:
    """One pass over `indices` in a fresh shuffled order; returns (mean loss, accuracy %)."""
    shuffled = indices[torch.randperm(len(indices), generator=generator)]
    total_loss = torch.zeros((), device=images.device)
    correct = torch.zeros((), device=images.device, dtype=torch.int64)
    for start in range(0, len(shuffled), args.batch_train):
        batch = shuffled[start : start + args.batch_train].to(images.device)
        x = augment(images[batch], dsa=args.dsa, strategy=args.dsa_strategy, generator=generator)
        y = labels[batch]
        loss, logits = optimizer.step(loss_fn(model, x, y, args.amp == "bf16"))
        total_loss += loss * len(batch)
        correct += (logits.argmax(1) == y).sum()
    return total_loss.item() / len(shuffled), 100.0 * correct.item() / len(shuffled)


@dataclass
class Tensors:
    """The data on the training device."""

    images_train: Tensor
    labels_train: Tensor
    images_test: Tensor
    labels_test: Tensor


def train_expert(
    k: int,
    data: Data,
    tensors: Tensors,
    order: Tensor | None,
    args: argparse.Namespace,
    metrics: MetricsLog,
    extra: dict,
    advice: str = "lower --lr_teacher",
) -> tuple[Expert, list[dict]]:
    """Train expert k (seed args.seed + k); returns its train_epochs + 1 snapshots and the
    per-epoch records (also appended to `metrics` with the fields of `extra`)."""
    init_seed, data_seed = derived_seeds(args.seed + k)
    seed_everything(init_seed)
    device = tensors.images_train.device
    model = get_network(args.model, data.channel, data.num_classes, data.im_size).to(device)
    base = torch.optim.SGD(
        model.parameters(), lr=args.lr_teacher, momentum=args.mom, weight_decay=args.l2
    )
    optimizer = GSAM(model, base, rho=args.rho_max, alpha=args.alpha, adaptive=args.adaptive)
    generator = torch.Generator().manual_seed(data_seed)  # CPU: same draws on every device
    # Dynamo compiles on the first expert; later ones reuse its code (parameters are inputs).
    forward = torch.compile(model) if args.compile else model
    trajectory, records = [snapshot_params(model)], []
    epochs = progress_bar(range(args.train_epochs), desc=f"expert {k}", leave=False)
    for epoch in epochs:
        start = time.perf_counter()
        indices, (drop_easy, keep_upto) = epoch_indices(order, epoch, args, len(data.labels_train))
        loss, acc = train_epoch(
            forward, optimizer, tensors.images_train, tensors.labels_train, indices, args, generator
        )
        trajectory.append(snapshot_params(model))
        # docs/algorithms.md#divergence-guard: a NaN expert is never kept, not even as a partial
        check_finite("expert training", f"expert {k}, epoch {epoch}", advice,
                     train_loss=loss, parameters=trajectory[-1])  # fmt: skip
        test_acc = None
        if args.test_every and (
            (epoch + 1) % args.test_every == 0 or epoch + 1 == args.train_epochs
        ):
            test_acc = networks_accuracy(
                [model], tensors.images_test, tensors.labels_test, device=device, amp=args.amp,
                batched=False,
            )[0]  # fmt: skip
        epochs.set_postfix(loss=f"{loss:.3f}", acc=f"{acc:.1f}")
        per_class = torch.bincount(data.labels_train[indices], minlength=data.num_classes)
        records.append({
            "expert": k, "epoch": epoch, "train_loss": loss, "train_acc": acc,
            "test_acc": test_acc, "drop_easy": drop_easy, "keep_upto": keep_upto,
            "images": len(indices), "images_per_class": per_class.tolist(),
            "seconds": time.perf_counter() - start, **extra,
        })  # fmt: skip
        metrics.log(records[-1])
    return trajectory, records


# ---------------------------------------------------------------------------------------------


def sidecar_meta(
    settings: dict, shapes: list, rank: int, world: int, device: torch.device, index_path
) -> dict:
    """What the JSON sidecar of every file this process writes records besides its experts."""
    return {
        "format": FORMAT, "settings": settings, "param_shapes": shapes,
        "num_params": int(sum(np.prod(s) for s in shapes)), "rank": rank, "world_size": world,
        "device": str(device), "torch": torch.__version__,
        "index_file": str(index_path.resolve()) if index_path else None,
    }  # fmt: skip


def forget_epochs_of(metrics: MetricsLog, experts: set[int]) -> None:
    """Drop the lines of experts about to be trained (again): an expert interrupted mid-way
    starts over, and its epochs would otherwise appear twice."""
    records = metrics.read()
    kept = [r for r in records if r.get("expert") not in experts]
    if len(kept) < len(records):
        with atomic_write(metrics.path) as tmp:
            tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))


def divergence_advice(args: argparse.Namespace, folder: Path) -> str:
    """The fix for a diverged expert, one this script then accepts: the folder's files and
    partial experts of the diverged rate stay, so a lower rate needs a folder of its own."""
    advice = f"lower --lr_teacher (now {args.lr_teacher:g}), e.g. --lr_teacher 0.01"
    if any(folder.glob("*.pt")) or any(folder.glob(".*.partial_*.pt")):
        advice += f", with another --buffer_path ({folder} holds experts of this rate)"
    return advice


def check_compiler(device: torch.device) -> None:
    """--compile on CPU builds C++ kernels: say so before training instead of failing mid-run."""
    if device.type == "cpu" and cxx_compiler() is None:
        raise UserError(
            f"--compile true on CPU needs a C++ compiler ({' or '.join(compiler_candidates())} "
            "not found): install one (e.g. apt-get install g++) or use --compile false"
        )


def main(args: argparse.Namespace) -> None:
    with contextlib.ExitStack() as held:  # the expert folder's lock, released however it ends
        train_buffer(args, held)


def train_buffer(args: argparse.Namespace, held: contextlib.ExitStack) -> None:
    # ---- arguments ---------------------------------------------------------------------------
    check_args(args)
    rank, world = rank_and_world()
    device = rank_device(args.device, world)
    if args.compile:
        check_compiler(device)
    index_path = index_file_path(args) if args.sort_method else None
    folder = expert_dir(args.buffer_path, args.dataset, args.model, args.zca, args.subset, args.res)
    prepare_output_dir(folder, "--buffer_path")
    # docs/formats.md#locks: one process (per rank) per expert folder
    held.enter_context(hold_lock(lock_path(folder, rank), f"expert folder {folder}"))

    # ---- set-up: data, curriculum order, and the experts already on disk ---------------------
    data = get_dataset(
        args.dataset, args.data_path, subset=args.subset, zca=args.zca,
        max_per_class=args.max_per_class,
    )  # fmt: skip
    order = None
    if index_path:
        check_index_provenance(args, index_path)
        order = load_index_file(
            index_path, data.labels_train, dataset=args.dataset, subset=args.subset
        )
    shapes = [
        list(p.shape)
        for p in get_network(args.model, data.channel, data.num_classes, data.im_size).parameters()
    ]
    settings = run_settings(args, data, order)
    jobs = plan_files(folder, args.num_experts, settings, shapes, rank, world)
    if rank == 0:
        save_yaml(vars(args), folder / "config.yaml")
    todo = [(job, k) for job in jobs for k in job.missing]
    print(
        f"{folder}: rank {rank}/{world} trains {len(todo)} expert(s) on {device}"
        + (f" with curriculum {index_path}" if index_path else " on all data"),
        flush=True,
    )
    tensors = Tensors(
        data.images_train.to(device), data.labels_train.to(device),
        data.images_test.to(device), data.labels_test.to(device),
    )  # fmt: skip
    metrics = MetricsLog(folder / "metrics.jsonl")
    if world == 1:  # with more ranks the others append meanwhile: their lines are left alone
        forget_epochs_of(metrics, {k for _, k in todo})
    meta = sidecar_meta(settings, shapes, rank, world, device, index_path)

    # ---- the loop: one expert at a time, kept as soon as it is finished ----------------------
    for job, k in progress_bar(todo, desc="experts"):
        start = time.perf_counter()
        extra = {"file": job.number, "rank": rank}
        advice = divergence_advice(args, folder)
        trajectory, records = train_expert(k, data, tensors, order, args, metrics, extra, advice)
        written = finish_expert(folder, job, k, trajectory, meta)
        if written is not None:
            tqdm.write(f"wrote {written} ({len(job.experts)} experts)")
        tests = [r["test_acc"] for r in records if r["test_acc"] is not None]
        tqdm.write(
            f"expert {k}: train acc {records[-1]['train_acc']:.1f}%"
            + (f", test acc {tests[-1]:.1f}%" if tests else "")
            + f" ({time.perf_counter() - start:.1f} s)"
        )

    # ---- outputs -----------------------------------------------------------------------------
    mine = [expert_file(folder, job.number) for job in jobs]
    print(f"rank {rank}: done; files written: {', '.join(p.name for p in mine) or 'none needed'}")


if __name__ == "__main__":
    run_main(main, parse_args)
