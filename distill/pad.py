"""PAD distillation: DATM's trajectory matching with PAD's parameter mask
(docs/algorithms.md#distillation).

Run through the two entry points of the paper's README, from distill/ or the repository root:

    cd distill
    python PAD_depth.py --cfg ../configs/CIFAR-10/ConvIN/IPC10.yaml    # drop shallow parameters
    python PAD_loss.py --cfg ../configs/CIFAR-10/ConvIN/IPC10.yaml     # drop smallest-loss ones

Any config key can follow as `--key value` (docs/hyperparameters.md#distillation-config-keys), e.g.
`--Iteration 2000 --device cpu`.

Outputs, in `<out_dir>/<dataset>/<ipc>/<model>/<run name>/` (out_dir `logged_files`, relative to
the working directory like the reference):
    Normal/images_<it>.pt, labels_<it>.pt, lr_<it>.pt     the reference's files
                                                          (docs/formats.md#distilled-sets)
    Normal/images_best.pt, labels_best.pt, lr_best.pt   when the evaluated accuracy improved
    Normal/images_zca_<it>.pt                           viewable (inverse-ZCA) images, with zca
    images_<it>.png, images_clipped_<it>.png            image grids (ipc < 50 or force_save)
    loss.png, metrics.jsonl, config.yaml, checkpoint.pt
Numbered files are written at an evaluation that improved the accuracy, at every 1000th
iteration (the reference's rule) and at the last evaluation (ours). The run name is `name`; its
default RANDOM becomes `<dataset>-IPC<ipc>-<mask>-s<seed>`, e.g. `CIFAR10-IPC10-depth-s42`.
A folder that already holds a run is only continued with `--resume true`, never overwritten.

Resume: `checkpoint.pt` is written every `checkpoint_it` iterations, at the end, and after the
iteration during which SIGINT or SIGTERM arrived (a second signal stops at once). `--resume true`
continues from it; on CPU the result equals that of an uninterrupted run. Learning rates given on
the resumed command line (e.g. a lower `--lr_img` after a divergence) replace the saved ones.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import Tensor
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils import runs  # noqa: E402
from utils.config import DEFAULTS, parse_config_args, save_config  # noqa: E402
from utils.data import Data, get_dataset  # noqa: E402
from utils.evaluate import eval_pool, evaluate_synset  # noqa: E402
from utils.io import UserError, run_main, save_pt  # noqa: E402
from utils.matching import (  # noqa: E402
    MEMORY_MODES,
    InnerSteps,
    Mask,
    MatchResult,
    Student,
    make_mask,
    match_trajectory,
)
from utils.networks import get_network  # noqa: E402
from utils.runs import (  # noqa: E402
    StopOnSignal,
    drop_metrics_from,
    evaluation_iterations,
    refuse_existing_run,
    run_folder,
    stopped_message,
)
from utils.runtime import get_rng_state, resolve_device, seed_everything, set_rng_state  # noqa: E402
from utils.synset import (  # noqa: E402
    PIX_INITS,
    StartEpochSchedule,
    check_choice,
    check_ipc,
    check_trajectory_length,
    correctly_predicted_indices,
    expert_logits,
    hard_labels,
    initial_soft_labels,
    label_snapshots,
    noise_images,
    real_image_indices,
)
from utils.tracking import Tracker, plot_curves, save_image_grid  # noqa: E402
from utils.trajectory import (  # noqa: E402
    ExpertSampler,
    check_expert_shapes,
    expert_dir,
    flatten_params,
    list_expert_files,
    load_expert_file,
)

RATIO_KEYS = {"depth": "depth_ratio", "loss": "loss_ratio"}
# Settings a checkpoint cannot be continued under (they change what the tensors mean).
IDENTITY_KEYS = ("dataset", "subset", "model", "ipc", "zca", "res", "max_per_class")
CHECKPOINT_VERSION = 1


def main(mask_name: str, argv: list[str] | None = None) -> dict:
    """Distill with PAD's mask `mask_name` ("depth" or "loss"); returns a summary of the run."""
    # ---- arguments ---------------------------------------------------------------------------
    cfg = parse_config_args(
        argv, description=f"PAD distillation, {mask_name} mask (docs/algorithms.md#distillation)"
    )
    ratio_key = RATIO_KEYS[mask_name]
    mask = make_mask(mask_name, getattr(cfg, ratio_key), key=ratio_key)
    check_settings(cfg)
    inner_steps = InnerSteps(
        cfg.syn_steps, cfg.batch_syn, augment=cfg.dsa and not cfg.no_aug, strategy=cfg.dsa_strategy
    )
    schedule = StartEpochSchedule.from_config(cfg)
    schedule.validate(cfg.Iteration)
    run_dir = run_folder(cfg, tag=mask.name)
    checkpoint = read_checkpoint(run_dir, cfg, mask.name) if cfg.resume else None
    if checkpoint is None:
        refuse_existing_run(run_dir)
    folder = expert_dir(cfg.buffer_path, cfg.dataset, cfg.model, cfg.zca, cfg.subset, cfg.res)
    files = list_expert_files(folder)
    if not files:
        raise UserError(no_experts_message(cfg, folder))
    device = resolve_device(cfg.device)

    # ---- set-up ------------------------------------------------------------------------------
    seed_everything(cfg.seed)
    generators = purpose_generators(cfg.seed)
    data, indices_class = load_data(cfg)
    student, sampler = open_experts(cfg, files, data, device)
    matcher = Matcher(student, sampler, schedule, inner_steps, mask, generators)
    eval_its = evaluation_iterations(cfg)
    print(
        f"PAD ({mask.name} mask, {ratio_key} {mask.ratio}): {cfg.dataset} IPC {cfg.ipc}, "
        f"{cfg.model} ({student.num_params} parameters) on {device}; {len(files)} expert "
        f"file(s) in {folder}"
    )
    syn = synthetic_set(cfg, checkpoint, data, indices_class, files, student, device, generators)
    optimizers = synset_optimizers(cfg, syn)
    progress = Progress()
    if checkpoint is not None:
        restore(checkpoint, optimizers, generators, sampler, progress)
    run = open_run(cfg, run_dir, checkpoint, data, device, progress)

    # ---- the loop: it = 0 .. Iteration (docs/algorithms.md#one-iteration) ------------------------
    iterations = range(progress.next_iteration, cfg.Iteration + 1)
    bar = tqdm(iterations, initial=iterations.start, total=cfg.Iteration + 1, disable=None)
    with StopOnSignal() as stop:
        for it in bar:
            # docs/algorithms.md#evaluation-and-saving-cadence: before this iteration's update
            if it in eval_its:
                improved = evaluate(run, it, syn)
                numbered = improved or it % 1000 == 0 or it == eval_its[-1]
                write_outputs(run, it, syn, best=improved, numbered=numbered)
            result, start_epoch = distill_step(run, matcher, it, syn, optimizers)  # steps 1-6
            log_step(run, it, result, start_epoch, syn)  # step 7
            if it % 10 == 0:
                bar.set_postfix(loss=f"{result.loss:.4f}", start=start_epoch)
            due = (it + 1) % cfg.checkpoint_it == 0 or it == cfg.Iteration
            if due or stop.signum is not None:
                state = checkpoint_state(run, mask.name, syn, optimizers, generators, sampler)
                save_pt(state, run_dir / "checkpoint.pt")
            if stop.signum is not None:
                break
    bar.close()
    run.tracker.finish()

    # ---- outputs -----------------------------------------------------------------------------
    plot_loss(run)
    report(run, stop.signum)
    return {
        "run_dir": run_dir,
        "best": progress.best,
        "stopped_by": stop.signum,
        "next_iteration": progress.next_iteration,
    }


# ---- state of a run ----------------------------------------------------------------------------


@dataclass
class SynSet:
    """The learnable tensors: image_syn [N, C, H, W] (class-major), label_syn [N, classes] soft
    logits, syn_lr [] the students' learning rate."""

    image_syn: Tensor
    label_syn: Tensor
    syn_lr: Tensor

    @classmethod
    def leaves(cls, images: Tensor, labels: Tensor, lr: Tensor, device: torch.device) -> SynSet:
        def leaf(t: Tensor) -> Tensor:
            return t.detach().to(device, torch.float32).clone().requires_grad_(True)

        return cls(leaf(images), leaf(labels), leaf(lr))

    def cpu(self) -> dict[str, Tensor]:
        """Detached CPU copies, keyed by the reference's file prefixes."""
        return {
            "images": self.image_syn.detach().cpu().clone(),
            "labels": self.label_syn.detach().cpu().clone(),
            "lr": self.syn_lr.detach().cpu().clone(),
        }


@dataclass
class Progress:
    """Everything about the run so far that a checkpoint keeps besides tensors and RNGs."""

    next_iteration: int = 0
    skipped: int = 0
    best: dict[str, dict] = field(default_factory=dict)  # model -> {mean, std, iteration}
    history: dict[str, list] = field(
        default_factory=lambda: {"iteration": [], "loss": [], "start_epoch": [], "skipped": []}
    )

    def record(self, it: int, loss: float, start_epoch: int, skipped: bool) -> None:
        values = (it, loss, start_epoch, int(skipped))
        for key, value in zip(self.history, values, strict=True):
            self.history[key].append(value)
        self.skipped += int(skipped)
        self.next_iteration = it + 1


@dataclass
class Run:
    """What evaluation, outputs and the divergence guard need to know about the run."""

    cfg: SimpleNamespace
    data: Data
    device: torch.device
    dir: Path
    tracker: Tracker
    progress: Progress
    eval_models: list[str]


@dataclass
class Matcher:
    """What every iteration draws from (experts, start epochs, inner steps) and matches with."""

    student: Student  # only the network's architecture: parameters come as flat vectors
    sampler: ExpertSampler
    schedule: StartEpochSchedule
    inner_steps: InnerSteps
    mask: Mask
    generators: dict[str, torch.Generator]


# ---- arguments ---------------------------------------------------------------------------------


def check_settings(cfg: SimpleNamespace) -> None:
    """One-line UserErrors for settings the loop cannot run with
    (docs/hyperparameters.md#distillation-config-keys); the mask ratio, syn_steps and batch_syn are
    checked by make_mask and InnerSteps."""
    check_choice("memory", cfg.memory, MEMORY_MODES)
    check_choice("pix_init", cfg.pix_init, PIX_INITS)
    minimums = {
        "expert_epochs": 1,
        "Iteration": 0,
        "eval_it": 1,
        "checkpoint_it": 1,
        "num_eval": 1,
        "epoch_eval_train": 0,
        "batch_train": 1,
    }
    for key, minimum in minimums.items():
        if getattr(cfg, key) < minimum:
            raise UserError(f"{key}={getattr(cfg, key)}: expected at least {minimum}")
    if cfg.texture:
        raise UserError("texture=True: texture distillation is not part of PAD; set it to False")


def no_experts_message(cfg: SimpleNamespace, folder: Path) -> str:
    zca = " --zca" if cfg.zca else ""
    train_epochs = max(cfg.max_start_epoch + cfg.expert_epochs - 1, 1)
    return (
        f"no expert files (replay_buffer_0.pt, ...) in {folder.absolute()}: make them with "
        f"`cd buffer && python buffer_CL.py --dataset={cfg.dataset} --model={cfg.model}{zca} "
        f"--train_epochs={train_epochs} --buffer_path={cfg.buffer_path} "
        f"--data_path={cfg.data_path}` (README), or point --buffer_path at them"
    )


# ---- set-up ------------------------------------------------------------------------------------


def purpose_generators(seed: int) -> dict[str, torch.Generator]:
    """One generator per purpose, so e.g. the evaluation schedule never shifts the start epochs."""
    return {
        name: torch.Generator().manual_seed(seed + k)
        for k, name in enumerate(("init", "start_epoch", "inner_steps"))
    }


def load_data(cfg: SimpleNamespace) -> tuple[Data, list[Tensor]]:
    """The real data set and its train indices per class, checked against ipc."""
    data = get_dataset(
        cfg.dataset, cfg.data_path, subset=cfg.subset, zca=cfg.zca, max_per_class=cfg.max_per_class
    )
    indices_class = data.indices_class()
    check_ipc(cfg.ipc, indices_class, data.class_names)
    return data, indices_class


def open_experts(
    cfg: SimpleNamespace, files: list[Path], data: Data, device: torch.device
) -> tuple[Student, ExpertSampler]:
    """The student network and the expert sampler, once every expert the sampler can draw is
    known to fit the network and to reach the latest target epoch."""
    model = get_network(cfg.model, data.channel, data.num_classes, data.im_size)
    check_expert_shapes(load_expert_file(files[0], mmap=True)[0], model, files[0])
    student = Student(model.to(device))
    sampler = ExpertSampler(
        files,
        load_all=cfg.load_all,
        max_files=cfg.max_files,
        max_experts=cfg.max_experts,
        seed=cfg.seed,
        mmap=True,
    )
    for path in sampler.files:  # memory-mapped: only the lists of snapshots are read
        experts = load_expert_file(path, mmap=True)[: cfg.max_experts]
        shortest = min(len(expert) for expert in experts)
        check_trajectory_length(cfg.max_start_epoch, cfg.expert_epochs, shortest, path)
    return student, sampler


def open_run(
    cfg: SimpleNamespace,
    run_dir: Path,
    checkpoint: dict | None,
    data: Data,
    device: torch.device,
    progress: Progress,
) -> Run:
    """The run folder with this run's config, its metrics log and the evaluation models."""
    (run_dir / "Normal").mkdir(parents=True, exist_ok=True)
    save_config({key: getattr(cfg, key) for key in DEFAULTS}, run_dir / "config.yaml")
    if checkpoint is not None:
        drop_metrics_from(run_dir / "metrics.jsonl", progress.next_iteration)
    tracker = Tracker(
        run_dir, wandb_mode=cfg.wandb, project=cfg.project, name=run_dir.name, config=vars(cfg)
    )
    eval_models = eval_pool(cfg.eval_mode, cfg.model, data.im_size)
    resumed = f" (resumed at iteration {progress.next_iteration})" if checkpoint else ""
    print(f"outputs: {run_dir}{resumed}")
    return Run(cfg, data, device, run_dir, tracker, progress, eval_models)


# ---- the synthetic set (docs/algorithms.md#the-synthetic-set) ------------------------------------


def synthetic_set(
    cfg: SimpleNamespace,
    checkpoint: dict | None,
    data: Data,
    indices_class: list[Tensor],
    files: list[Path],
    student: Student,
    device: torch.device,
    generators: dict[str, torch.Generator],
) -> SynSet:
    """The learnable tensors: initialised (images, soft labels, lr_teacher) or resumed."""
    if checkpoint is not None:
        return SynSet.leaves(
            checkpoint["image_syn"], checkpoint["label_syn"], checkpoint["syn_lr"], device
        )
    images, labels = initial_synset(
        cfg, data, indices_class, files, student, device, generators["init"]
    )
    return SynSet.leaves(images, labels, torch.tensor(cfg.lr_teacher), device)


def synset_optimizers(cfg: SimpleNamespace, syn: SynSet) -> dict[str, torch.optim.Optimizer]:
    return {
        "images": torch.optim.SGD([syn.image_syn], lr=cfg.lr_img, momentum=0.5),
        "lr": torch.optim.SGD([syn.syn_lr], lr=cfg.lr_lr, momentum=0.5),
        "labels": torch.optim.SGD([syn.label_syn], lr=cfg.lr_y, momentum=cfg.Momentum_y),
    }


def initial_synset(
    cfg: SimpleNamespace,
    data: Data,
    indices_class: list[Tensor],
    files: list[Path],
    student: Student,
    device: torch.device,
    generator: torch.Generator,
) -> tuple[Tensor, Tensor]:
    """Initial images (docs/algorithms.md#initial-images) and soft labels
    (docs/algorithms.md#soft-labels), on the CPU."""
    labels = hard_labels(data.num_classes, cfg.ipc)
    label_student = student
    if cfg.Initialize_Label_With_Another_Model:
        name = cfg.Initialize_Label_Model
        other = get_network(name, data.channel, data.num_classes, data.im_size)
        label_student = Student(other.to(device))
    if cfg.pix_init == "samples_predicted_correctly":
        snapshots = label_snapshots(
            files[: cfg.max_files], cfg.Label_Model_Timestamp, label_student.model
        )

        def predict(k: int, images: Tensor) -> Tensor:
            return expert_logits(label_student, images, snapshots[k], device).argmax(1)

        chosen = correctly_predicted_indices(
            data.images_train, indices_class, cfg.ipc, predict, len(snapshots), generator,
            data.class_names,
        )  # fmt: skip
        image_syn = data.images_train[chosen].clone()
        label_syn = initial_soft_labels(label_student, image_syn, labels, snapshots, device)
    else:
        if cfg.pix_init == "real":
            image_syn = data.images_train[real_image_indices(indices_class, cfg.ipc, generator)]
        else:
            image_syn = noise_images(len(labels), data.channel, data.im_size, generator)
        # docs/algorithms.md#soft-labels: the logits of the first expert's last
        # snapshot, no averaging
        first = label_snapshots(files[:1], -1, label_student.model)[0]
        label_syn = expert_logits(label_student, image_syn, first, device)
    accuracy = (label_syn.argmax(1) == labels).float().mean().item() * 100
    print(f"initial images: {cfg.pix_init}; soft labels agree with the classes on {accuracy:.1f}%")
    return image_syn, label_syn


# ---- one iteration -----------------------------------------------------------------------------


def distill_step(
    run: Run,
    matcher: Matcher,
    it: int,
    syn: SynSet,
    optimizers: dict[str, torch.optim.Optimizer],
) -> tuple[MatchResult, int]:
    """Steps 1-6: an expert segment, the student's unroll, the masked matching loss and, unless
    the loss exceeds the threshold, one update of the three tensors. Returns the result and the
    start epoch."""
    cfg, generators = run.cfg, matcher.generators
    trajectory = matcher.sampler.next()  # step 1
    start_epoch = matcher.schedule.sample(it, generators["start_epoch"])  # step 2
    w_start = flatten_params(trajectory[start_epoch]).to(run.device)  # step 3
    target = flatten_params(trajectory[start_epoch + cfg.expert_epochs]).to(run.device)
    plan = matcher.inner_steps.plan(len(syn.image_syn), run.data.im_size, generators["inner_steps"])
    for optimizer in optimizers.values():
        optimizer.zero_grad(set_to_none=True)
    # steps 4-6: unroll, masked matching loss, gradients into the three tensors
    result = match_trajectory(
        matcher.student, syn.image_syn, syn.label_syn, syn.syn_lr, w_start, target, plan,
        mask=matcher.mask, memory=cfg.memory, threshold=cfg.threshold,
    )  # fmt: skip
    if not math.isfinite(result.loss):
        raise diverged(run, it, f"the matching loss is {result.loss}")
    if not result.skipped:  # step 6: update only when loss <= threshold
        for optimizer in optimizers.values():
            optimizer.step()
        check_finite(run, it, syn)
    return result, start_epoch


def log_step(run: Run, it: int, result: MatchResult, start_epoch: int, syn: SynSet) -> None:
    """Step 7: the iteration's loss, start epoch and learning rate, in memory and in the log."""
    run.progress.record(it, result.loss, start_epoch, result.skipped)
    record = {"loss": result.loss, "start_epoch": start_epoch, "syn_lr": syn.syn_lr.item()}
    run.tracker.log(it, {**record, "skipped": int(result.skipped)})


# ---- evaluation and outputs --------------------------------------------------------------------


def evaluate(run: Run, it: int, syn: SynSet) -> bool:
    """Train num_eval networks per pool model on the current set
    (docs/algorithms.md#evaluation-protocol).

    Returns True when some model's mean accuracy beat its best so far.
    """
    cfg, lr = run.cfg, syn.syn_lr.item()
    if not lr > 0:
        raise UserError(
            f"the learned syn_lr is {lr:.3g} at iteration {it}; evaluation needs a positive "
            f"learning rate: lower lr_lr (now {cfg.lr_lr:g})"
        )
    improved = False
    tensors = syn.cpu()
    for name in run.eval_models:
        result = evaluate_synset(
            name, tensors["images"], tensors["labels"], lr, run.data,
            epochs=cfg.epoch_eval_train, batch_train=cfg.batch_train, dsa=cfg.dsa,
            dsa_strategy=cfg.dsa_strategy, num_eval=cfg.num_eval, device=run.device,
            seed=cfg.eval_seed + it, amp=cfg.amp,
        )  # fmt: skip
        best = run.progress.best.get(name)
        if best is None or result.mean > best["mean"]:
            best = {"mean": result.mean, "std": result.std, "iteration": it}
            run.progress.best[name] = best
            improved = True
        run.tracker.log(
            it,
            {
                f"accuracy/{name}": result.mean,
                f"accuracy_std/{name}": result.std,
                f"best_accuracy/{name}": best["mean"],
                "eval_seconds": result.seconds,
            },
        )
        tqdm.write(
            f"[it {it}] {name}: {result.mean:.2f}% +- {result.std:.2f} ({cfg.num_eval} net(s), "
            f"best {best['mean']:.2f}% at it {best['iteration']}); syn_lr {lr:.5f}; "
            f"{result.seconds:.1f} s",
            file=sys.stdout,
        )
    return improved


def write_outputs(run: Run, it: int, syn: SynSet, *, best: bool, numbered: bool) -> None:
    """The reference's files (docs/formats.md#distilled-sets), image grids and the loss curve."""
    cfg, normal = run.cfg, run.dir / "Normal"
    tensors = syn.cpu()
    tags = ([str(it)] if numbered else []) + (["best"] if best else [])
    for tag in tags:
        for prefix, tensor in tensors.items():
            save_pt(tensor, normal / f"{prefix}_{tag}.pt")
    small = cfg.ipc < 50 or cfg.force_save  # the reference's rule for viewable copies
    viewable = run.data.to_viewable(tensors["images"])
    if numbered and cfg.zca and small:
        save_pt(viewable, normal / f"images_zca_{it}.pt")
    if small:
        for suffix, clip_std in (("", None), ("_clipped", 2.5)):
            path = run.dir / f"images{suffix}_{it}.png"
            save_image_grid(viewable, path, nrow=10, clip_std=clip_std)
            run.tracker.image(f"synthetic_images{suffix}", path, step=it)
    plot_loss(run)


def report(run: Run, signum: int | None) -> None:
    """The last line: how the run ended, its best accuracies, where to find it."""
    progress = run.progress
    if signum is not None:
        print(stopped_message(signum, progress.next_iteration - 1, run.dir))
    else:
        best = ", ".join(
            f"{name} {b['mean']:.2f}% (it {b['iteration']})" for name, b in progress.best.items()
        )
        print(f"done: {progress.skipped} skipped iteration(s); best {best or '-'}; {run.dir}")


def plot_loss(run: Run) -> None:
    history = run.progress.history
    if history["iteration"]:
        series = {"matching loss": history["loss"], "start epoch": history["start_epoch"]}
        plot_curves(run.dir / "loss.png", history["iteration"], series, title=run.dir.name)


# ---- divergence guard --------------------------------------------------------------------------


def diverged(run: Run, it: int, what: str) -> UserError:
    return runs.diverged(run.dir, it, what, run.cfg.lr_img)


def check_finite(run: Run, it: int, syn: SynSet) -> None:
    for name, tensor in (
        ("images", syn.image_syn),
        ("labels", syn.label_syn),
        ("learning rate", syn.syn_lr),
    ):
        if not torch.isfinite(tensor).all():
            raise diverged(run, it, f"the synthetic {name} are not finite after the update")


# ---- checkpoints and signals -------------------------------------------------------------------


def checkpoint_state(
    run: Run,
    mask: str,
    syn: SynSet,
    optimizers: dict[str, torch.optim.Optimizer],
    generators: dict[str, torch.Generator],
    sampler: ExpertSampler,
) -> dict:
    """Everything needed to continue exactly after the last finished iteration."""
    tensors = syn.cpu()
    progress = run.progress
    return {
        "version": CHECKPOINT_VERSION,
        "identity": identity(run.cfg, mask),
        "image_syn": tensors["images"],
        "label_syn": tensors["labels"],
        "syn_lr": tensors["lr"],
        "optimizers": {name: opt.state_dict() for name, opt in optimizers.items()},
        "rng": {
            "global": get_rng_state(),
            "generators": {name: g.get_state() for name, g in generators.items()},
        },
        "expert_sampler": sampler.state_dict(),
        "progress": {
            "next_iteration": progress.next_iteration,
            "skipped": progress.skipped,
            "best": progress.best,
            "history": progress.history,
        },
    }


def identity(cfg: SimpleNamespace, mask: str) -> dict:
    return {"mask": mask, **{key: getattr(cfg, key) for key in IDENTITY_KEYS}}


def read_checkpoint(run_dir: Path, cfg: SimpleNamespace, mask: str) -> dict:
    identity_now = identity(cfg, mask)
    return runs.read_checkpoint(
        run_dir, identity_now, version=CHECKPOINT_VERSION, script="distill/pad.py"
    )


def restore(
    checkpoint: dict,
    optimizers: dict[str, torch.optim.Optimizer],
    generators: dict[str, torch.Generator],
    sampler: ExpertSampler,
    progress: Progress,
) -> None:
    for name, optimizer in optimizers.items():
        lr = optimizer.param_groups[0]["lr"]  # this command line's rate wins over the saved one
        optimizer.load_state_dict(checkpoint["optimizers"][name])
        optimizer.param_groups[0]["lr"] = lr
    set_rng_state(checkpoint["rng"]["global"])
    for name, generator in generators.items():
        generator.set_state(checkpoint["rng"]["generators"][name])
    sampler.load_state_dict(checkpoint["expert_sampler"])
    for key, value in checkpoint["progress"].items():
        setattr(progress, key, value)


def run(mask_name: str) -> None:
    """Entry point of PAD_depth.py / PAD_loss.py: exit 2 on a UserError, 128 + signal if stopped."""

    def main_with_status(argv: list[str]) -> None:
        summary = main(mask_name, argv)
        if summary["stopped_by"] is not None:
            sys.exit(128 + summary["stopped_by"])

    run_main(main_with_status, lambda: sys.argv[1:])
