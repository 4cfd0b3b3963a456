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

Several processes: `torchrun --nproc_per_node=K PAD_depth.py --cfg ...` (or `--nnodes` across
hosts) splits every inner step's synthetic batch across the K ranks, with the result of one
process up to float rounding; rank 0 alone writes (docs/algorithms.md#distributed-distillation).

Resume: `checkpoint.pt` is written every `checkpoint_it` iterations, at the end, and after the
iteration during which SIGINT or SIGTERM arrived (a second signal stops at once). `--resume true`
continues from it; on CPU the result equals that of an uninterrupted run. Learning rates given on
the resumed command line (e.g. a lower `--lr_img` after a divergence) replace the saved ones.
"""

from __future__ import annotations

import contextlib
import io
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
from utils.compiled import resolve_compile  # noqa: E402
from utils.config import DEFAULTS, parse_config_args, save_config  # noqa: E402
from utils.data import Data, check_dataset_name, get_dataset  # noqa: E402
from utils.distributed import World, folder_listing, start_world  # noqa: E402
from utils.evaluate import eval_pool, evaluate_models, resolve_amp  # noqa: E402
from utils.guard import SkipCounter, check_bound, check_finite, trailing_skips  # noqa: E402
from utils.io import (  # noqa: E402
    UserError,
    prepare_output_dir,
    save_json,
    save_pt,
)
from utils.locks import hold_lock, lock_path  # noqa: E402
from utils.matching import (  # noqa: E402
    InnerSteps,
    Mask,
    MatchResult,
    StepOptions,
    Student,
    make_mask,
    make_step_options,
    match_trajectory,
)
from utils.networks import check_model_names, get_network  # noqa: E402
from utils.progress import progress_bar  # noqa: E402
from utils.provenance import check_provenance  # noqa: E402
from utils.runs import (  # noqa: E402
    StopOnSignal,
    drop_metrics_from,
    evaluation_iterations,
    refuse_existing_run,
    run_folder,
    stopped_message,
)
from utils.runtime import (  # noqa: E402
    get_rng_state,
    rank_and_world,
    rank_device,
    seed_everything,
    set_rng_state,
)
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
from utils.tracking import (  # noqa: E402
    MetricsLog,
    SilentTracker,
    Tracker,
    plot_curves,
    save_image_grid,
)
from utils.trajectory import (  # noqa: E402
    ExpertSampler,
    check_expert_shapes,
    expert_dir,
    flatten_params,
    list_expert_files,
    load_expert_file,
    load_sidecar,
    sidecar_path,
)
from utils.unroll_memory import MemoryChoice, check_memory_settings, choose_memory  # noqa: E402
from utils.validation import check_experts_disjoint, selections, update_best  # noqa: E402

RATIO_KEYS = {"depth": "depth_ratio", "loss": "loss_ratio"}
# Settings a checkpoint cannot be continued under (they change what the tensors mean).
IDENTITY_KEYS = ("dataset", "subset", "model", "ipc", "zca", "res", "max_per_class",
                 "val_per_class")  # fmt: skip
CHECKPOINT_VERSION = 1


def main(mask_name: str, argv: list[str] | None = None) -> dict:
    """Distill with PAD's mask `mask_name` ("depth" or "loss"); returns a summary of the run."""
    with contextlib.ExitStack() as held:  # the run folder's lock, released however it ends
        return distill(mask_name, argv, held)


def distill(mask_name: str, argv: list[str] | None, held: contextlib.ExitStack) -> dict:
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
    run_dir = run_folder(cfg, mask.name)
    folder = expert_dir(cfg.buffer_path, cfg.dataset, cfg.model, cfg.zca, cfg.subset, cfg.res)
    files = list_expert_files(folder)
    if not files:
        raise UserError(no_experts_message(cfg, folder))
    checkpoint = claim_run_folder(cfg, run_dir, mask.name, held)
    device = rank_device(cfg.device, rank_and_world()[1])
    step_options = make_step_options(cfg.amp, cfg.channels_last, cfg.compile, device)
    eval_speed = evaluation_speed(cfg, device)  # checked once, before the set-up
    world = join_world(cfg, device, files, checkpoint)

    # ---- set-up ------------------------------------------------------------------------------
    seed_everything(cfg.seed)
    generators = purpose_generators(cfg.seed)
    data, indices_class = load_data(cfg)
    student, sampler = open_experts(cfg, files, data, device)
    memory = run_memory(cfg, student, inner_steps, data, device, step_options)
    matcher = Matcher(world.student(student), sampler, schedule, inner_steps, mask, generators,
                      memory, step_options)  # fmt: skip
    eval_its = evaluation_iterations(cfg)
    if world.is_main:
        print(memory.describe(cfg.memory, cfg.syn_steps))
        print(header(cfg, mask, student, device, world, files, folder, eval_speed))
    syn = synthetic_set(cfg, checkpoint, data, indices_class, files, student, device, generators)
    world.broadcast([syn.image_syn, syn.label_syn, syn.syn_lr])  # one start on every rank
    optimizers = synset_optimizers(cfg, syn)
    progress = Progress()
    if checkpoint is not None:
        restore(checkpoint, optimizers, generators, sampler, progress)
    run = open_run(cfg, run_dir, checkpoint, data, device, progress, world)

    # ---- the loop: it = 0 .. Iteration (docs/algorithms.md#one-iteration) ------------------------
    # Under torchrun every rank runs this loop; rank 0 alone writes (#distributed-distillation).
    iterations = range(progress.next_iteration, cfg.Iteration + 1)
    bar = progress_bar(
        iterations, initial=iterations.start, total=cfg.Iteration + 1, desc="distill",
        file=None if world.is_main else io.StringIO(),  # one rank reports
    )  # fmt: skip
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
            stopping = stop.agreed(world, device)  # all ranks stop after the same iteration
            if (due or stopping) and world.is_main:
                state = checkpoint_state(run, mask.name, syn, optimizers, generators, sampler)
                save_pt(state, run_dir / "checkpoint.pt")
            if stopping:
                break
    bar.close()
    run.tracker.finish()

    # ---- outputs -----------------------------------------------------------------------------
    plot_loss(run)
    report(run, stop.signum)
    world.close()
    return {"run_dir": run_dir, "best": progress.best, "stopped_by": stop.signum,
            "next_iteration": progress.next_iteration}  # fmt: skip


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
    skips: SkipCounter
    world: World = field(default_factory=World)


@dataclass
class Matcher:
    """What every iteration draws from (experts, start epochs, inner steps) and matches with."""

    student: Student  # only the network's architecture: parameters come as flat vectors
    sampler: ExpertSampler
    schedule: StartEpochSchedule
    inner_steps: InnerSteps
    mask: Mask
    generators: dict[str, torch.Generator]
    memory: MemoryChoice  # memory auto resolved once per run
    step_options: StepOptions


# ---- arguments ---------------------------------------------------------------------------------


def check_settings(cfg: SimpleNamespace) -> None:
    """One-line UserErrors for settings the loop cannot run with
    (docs/hyperparameters.md#distillation-config-keys); the mask ratio, syn_steps and batch_syn are
    checked by make_mask and InnerSteps."""
    check_memory_settings(cfg.memory, cfg.memory_budget_gb, cfg.hybrid_kept_steps)
    check_dataset_name(cfg.dataset)  # before the expert folder, which is named after them
    check_model_names([cfg.model], what="model")
    check_choice("pix_init", cfg.pix_init, PIX_INITS)
    minimums = {
        "expert_epochs": 1,
        "Iteration": 0,
        "eval_it": 1,
        "checkpoint_it": 1,
        "num_eval": 1,
        "epoch_eval_train": 0,
        "batch_train": 1,
        "val_per_class": 0,
    }
    for key, minimum in minimums.items():
        if getattr(cfg, key) < minimum:
            raise UserError(f"{key}={getattr(cfg, key)}: expected at least {minimum}")
    ranges = [
        (cfg.lr_teacher > 0, f"lr_teacher={cfg.lr_teacher}: expected a learning rate > 0"),
        *[
            (getattr(cfg, key) >= 0, f"{key}={getattr(cfg, key)}: expected a learning rate >= 0")
            for key in ("lr_img", "lr_lr", "lr_y")
        ],
        (0 <= cfg.Momentum_y < 1, f"Momentum_y={cfg.Momentum_y}: expected a momentum in [0, 1)"),
        (cfg.threshold >= 0, f"threshold={cfg.threshold}: expected a matching loss >= 0"),
        (
            cfg.max_skipped is None or cfg.max_skipped >= 1,
            f"max_skipped={cfg.max_skipped}: expected at least 1 (or null for no limit)",
        ),
    ]
    for ok, message in ranges:
        if not ok:  # NaN fails every comparison, so it is refused too
            raise UserError(message)
    if cfg.texture:
        raise UserError("texture=True: texture distillation is not part of PAD; set it to False")


def evaluation_speed(cfg: SimpleNamespace, device: torch.device) -> dict:
    """The evaluation's precision and compilation (docs/algorithms.md#evaluation-speed): eval_amp
    auto follows amp: bf16, else picks bf16 where the device has it natively."""
    amp = cfg.amp if cfg.eval_amp == "auto" and cfg.amp == "bf16" else cfg.eval_amp
    return {
        "amp": resolve_amp(amp, device, "eval_amp"),
        "compile": resolve_compile(cfg.eval_compile, device, "eval_compile"),
    }


def claim_run_folder(
    cfg: SimpleNamespace, run_dir: Path, mask: str, held: contextlib.ExitStack
) -> dict | None:
    """The run folder checked, created and locked before any compute; its checkpoint with
    --resume true (None: start from iteration 0), else a refusal if it holds another run."""
    prepare_output_dir(run_dir, "--out_dir")
    # docs/formats.md#locks: one process per run folder, before its files are read or written
    held.enter_context(hold_lock(lock_path(run_dir, rank_and_world()[0]), f"run folder {run_dir}"))
    if cfg.resume:
        return read_checkpoint(run_dir, cfg, mask)
    refuse_existing_run(run_dir)
    return None


def run_memory(
    cfg: SimpleNamespace, student: Student, inner_steps: InnerSteps, data: Data,
    device: torch.device, step_options: StepOptions,
) -> MemoryChoice:  # fmt: skip
    """memory auto resolved once for the run
    (docs/algorithms.md#memory-modes-graph-recompute-hybrid-and-auto)."""
    return choose_memory(
        cfg.memory, cfg.memory_budget_gb, student, inner_steps, cfg.ipc * data.num_classes,
        data.num_classes, (data.channel, *data.im_size), device, step_options,
        cfg.hybrid_kept_steps,
    )  # fmt: skip


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
        cfg.dataset, cfg.data_path, subset=cfg.subset, zca=cfg.zca, max_per_class=cfg.max_per_class,
        val_per_class=cfg.val_per_class,
    )  # fmt: skip
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
        check_expert_provenance(cfg, path)
        experts = load_expert_file(path, mmap=True)[: cfg.max_experts]
        shortest = min(len(expert) for expert in experts)
        check_trajectory_length(cfg.max_start_epoch, cfg.expert_epochs, shortest, path)
    if data.split is not None:  # docs/evaluation.md#validation-split
        check_experts_disjoint([(path, load_sidecar(path)) for path in sampler.files], data.split)
    return student, sampler


def check_expert_provenance(cfg: SimpleNamespace, path: Path) -> None:
    """Experts made for another data set, ZCA or max_per_class are refused
    (docs/formats.md#provenance-checks); the authors' files (no sidecar) only warn."""
    meta = load_sidecar(path)
    recorded = meta.get("settings") if isinstance(meta, dict) else None
    wanted = {key: getattr(cfg, key) for key in ("dataset", "model", "zca", "max_per_class")}
    if getattr(cfg, "val_per_class", 0):  # experts then train on fewer images per class, which
        del wanted["max_per_class"]  # check_experts_disjoint compares with the held-out ones
    if cfg.dataset == "ImageNet":
        wanted.update(subset=cfg.subset, res=cfg.res)
    fix = (
        "use experts trained with this run's settings (buffer/buffer_CL.py with the same "
        f"--{' --'.join(wanted)}), or distill with theirs"
    )
    check_provenance(path, "expert file", sidecar_path(path), recorded, wanted, fix)


def open_run(
    cfg: SimpleNamespace,
    run_dir: Path,
    checkpoint: dict | None,
    data: Data,
    device: torch.device,
    progress: Progress,
    world: World,
) -> Run:
    """The run folder with this run's config, its metrics log and the evaluation models (rank 0
    alone writes; the other ranks' tracker is silent)."""
    eval_models = eval_pool(cfg.eval_mode, cfg.model, data.im_size)
    if not world.is_main:
        skips = skip_counter(cfg, progress)
        return Run(cfg, data, device, run_dir, SilentTracker(), progress, eval_models, skips, world)
    (run_dir / "Normal").mkdir(parents=True, exist_ok=True)
    values = {key: getattr(cfg, key) for key in DEFAULTS}
    save_config({**values, "world_size": world.size}, run_dir / "config.yaml")
    if cfg.resume and (run_dir / "metrics.jsonl").exists():  # next_iteration 0: forget all
        drop_metrics_from(run_dir / "metrics.jsonl", progress.next_iteration)
    tracker = Tracker(
        run_dir, wandb_mode=cfg.wandb, project=cfg.project, name=run_dir.name, config=vars(cfg)
    )
    resumed = f" (resumed at iteration {progress.next_iteration})" if checkpoint else ""
    print(f"outputs: {run_dir}{resumed}")
    if data.split is not None:
        print(f"validation: the last {cfg.val_per_class} train images of each class "
              f"({len(data.labels_val)} in all) choose images_best")  # fmt: skip
    skips = skip_counter(cfg, progress)
    return Run(cfg, data, device, run_dir, tracker, progress, eval_models, skips, world)


def join_world(
    cfg: SimpleNamespace, device: torch.device, files: list[Path], checkpoint: dict | None
) -> World:
    """torchrun's ranks (docs/algorithms.md#distributed-distillation), once every rank is known
    to have the same config, expert files and checkpoint; a world of one otherwise."""
    world = start_world(device, forced=cfg.distributed)
    resumed_at = None if checkpoint is None else checkpoint["progress"]["next_iteration"]
    facts = {
        "config": {key: getattr(cfg, key) for key in DEFAULTS},
        "expert folder listing": folder_listing(files),
        "checkpoint iteration": resumed_at,
    }
    try:
        world.check_same(facts)
    except UserError:
        world.close()
        raise
    return world


def header(
    cfg: SimpleNamespace,
    mask: Mask,
    student: Student,
    device: torch.device,
    world: World,
    files: list[Path],
    folder: Path,
    eval_speed: dict,
) -> str:
    """The run's first line: what is distilled, where, from which experts, how it is evaluated."""
    split = f" x {world.size} processes, inner batches split" if world.active else ""
    compiled = ", compiled" if eval_speed["compile"] else ""
    return (
        f"PAD ({mask.name} mask, {RATIO_KEYS[mask.name]} {mask.ratio}): {cfg.dataset} IPC "
        f"{cfg.ipc}, {cfg.model} ({student.num_params} parameters) on {device}{split}; "
        f"{len(files)} expert file(s) in {folder}; evaluation {eval_speed['amp']}{compiled}"
    )


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
    check_expert_segment(matcher.sampler, start_epoch, w_start, target)
    plan = matcher.inner_steps.plan(len(syn.image_syn), run.data.im_size, generators["inner_steps"])
    plan = run.world.shard(plan)  # this rank's rows (docs/algorithms.md#distributed-distillation)
    for optimizer in optimizers.values():
        optimizer.zero_grad(set_to_none=True)
    # steps 4-6: unroll, masked matching loss, gradients into the three tensors
    result = match_trajectory(
        matcher.student, syn.image_syn, syn.label_syn, syn.syn_lr, w_start, target, plan,
        mask=matcher.mask, memory=matcher.memory.mode, kept_steps=matcher.memory.kept_steps,
        threshold=cfg.threshold, options=matcher.step_options,
    )  # fmt: skip
    run.world.sum_gradients(result, syn.image_syn, syn.label_syn)
    guard_loss(run, it, result.loss)
    if not result.skipped:  # step 6: update only when loss <= threshold
        for optimizer in optimizers.values():
            optimizer.step()
        guard_synset(run, it, syn)
    run.skips.update(result.skipped, f"iteration {it}")
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
    ranks = (run.world.rank, run.world.size)  # the networks split across ranks, if several
    for name in run.eval_models:
        (result,) = evaluate_models(
            [name], tensors["images"], tensors["labels"], lr, run.data,
            epochs=cfg.epoch_eval_train, batch_train=cfg.batch_train, dsa=cfg.dsa,
            dsa_strategy=cfg.dsa_strategy, num_eval=cfg.num_eval, device=run.device,
            seed=cfg.eval_seed + it, **evaluation_speed(cfg, run.device), ranks=ranks,
        )  # fmt: skip
        # docs/evaluation.md#validation-split: by validation accuracy when the split is on
        best, better = update_best(
            run.progress.best.get(name), it, result.mean, result.std, result.val_mean
        )
        run.progress.best[name] = best
        improved = improved or better
        record = {
            f"accuracy/{name}": result.mean,
            f"accuracy_std/{name}": result.std,
            f"best_accuracy/{name}": best["mean"],
            "eval_seconds": result.seconds,
        }
        validation = ""
        if result.val_mean is not None:
            record[f"val_accuracy/{name}"] = result.val_mean
            validation = f", validation {result.val_mean:.2f}%"
        run.tracker.log(it, record)
        chosen = "best by validation" if result.val_mean is not None else "best"
        if not run.world.is_main:
            continue
        tqdm.write(
            f"[it {it}] {name}: {result.mean:.2f}% +- {result.std:.2f}{validation} "
            f"({cfg.num_eval} net(s), {chosen} {best['mean']:.2f}% at it {best['iteration']}); "
            f"syn_lr {lr:.5f}; {result.seconds:.1f} s",
            file=sys.stdout,
        )
    return improved


def write_outputs(run: Run, it: int, syn: SynSet, *, best: bool, numbered: bool) -> None:
    """The reference's files (docs/formats.md#distilled-sets), image grids and the loss curve
    (rank 0 only)."""
    if not run.world.is_main:
        return
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
    """The last line: how the run ended, its best accuracies, where to find it (rank 0)."""
    progress = run.progress
    if not run.world.is_main:
        return
    if signum is not None:
        print(stopped_message(signum, progress.next_iteration - 1, run.dir))
    else:
        best = ", ".join(
            f"{name} {b['mean']:.2f}% (it {b['iteration']})" for name, b in progress.best.items()
        )
        chosen = "best by validation, test accuracy" if run.cfg.val_per_class else "best"
        print(f"done: {progress.skipped} skipped iteration(s); {chosen} {best or '-'}; {run.dir}")
        if run.cfg.val_per_class:
            report_selections(run)


def report_selections(run: Run) -> None:
    """Test accuracy of the set validation chose beside the one the test set would have chosen,
    from metrics.jsonl, also into selection.json (docs/evaluation.md#validation-split)."""
    records = MetricsLog(run.dir / "metrics.jsonl").read()
    summary = {}
    for name in run.eval_models:
        evaluations = [
            (r["step"], r[f"accuracy/{name}"], r[f"val_accuracy/{name}"])
            for r in records
            if f"val_accuracy/{name}" in r
        ]
        if not evaluations:
            continue
        chosen = selections(evaluations)
        summary[name] = chosen
        by_val, by_test = chosen["by_validation"], chosen["by_test"]
        print(
            f"{name}: selected by validation: it {by_val['iteration']}, test {by_val['mean']:.2f}% "
            f"(validation {by_val['val_mean']:.2f}%); selected by test: it "
            f"{by_test['iteration']}, test {by_test['mean']:.2f}%"
        )
    save_json(summary, run.dir / "selection.json")


def plot_loss(run: Run) -> None:
    history = run.progress.history
    if history["iteration"] and run.world.is_main:
        series = {"matching loss": history["loss"], "start epoch": history["start_epoch"]}
        plot_curves(run.dir / "loss.png", history["iteration"], series, title=run.dir.name)


# ---- divergence guard (docs/algorithms.md#divergence-guard) ------------------------------------

STAGE = "distillation"
BOUND = 1e4  # |x| beyond this after normalisation is a blow-up, not an image or a logit
SETTING_OF = {"synthetic images": "lr_img", "soft labels": "lr_y", "learned syn_lr": "lr_lr"}


def fix(run: Run, *keys: str) -> str:
    """Advice the program accepts: lower the named rates and rerun with --resume true."""
    return runs.rerun_advice(run.dir, run.cfg, *keys)


def guard_loss(run: Run, it: int, loss: float) -> None:
    """A non-finite matching loss before any update comes from the students' learning rate
    (lr_teacher); after updates, from one of the three rates."""
    if math.isfinite(loss):
        return
    advice = fix(run, "lr_img", "lr_y", "lr_lr")
    if run.progress.skipped == run.progress.next_iteration:  # no update yet: the initial set
        advice = fix(run, "lr_teacher")
        if (run.dir / "checkpoint.pt").exists():  # its syn_lr is saved: lr_teacher acts no more
            advice = (
                f"nothing was saved; start again with another --name and a lower --lr_teacher "
                f"(now {run.cfg.lr_teacher:g})"
            )
    check_finite(STAGE, f"iteration {it}", advice, matching_loss=loss)


def guard_synset(run: Run, it: int, syn: SynSet) -> None:
    """After an update: finite and within BOUND, else stop naming the rate of that tensor."""
    for name, tensor in (
        ("synthetic images", syn.image_syn),
        ("soft labels", syn.label_syn),
        ("learned syn_lr", syn.syn_lr),
    ):

        def advice(name: str = name) -> str:  # formatted only if the check fails
            return fix(run, SETTING_OF[name])

        checked = {name.replace(" ", "_"): tensor}
        check_finite(STAGE, f"iteration {it}", advice, **checked)
        if name != "learned syn_lr":
            check_bound(STAGE, f"iteration {it}", advice, BOUND, **checked)


def check_expert_segment(sampler: ExpertSampler, start: int, w_start: Tensor, target: Tensor):
    """A NaN in the experts is the expert file's fault, not the run's: name the file."""
    if not (torch.isfinite(w_start).all() and torch.isfinite(target).all()):
        where = sampler.current_file or "the expert files (load_all)"
        raise UserError(
            f"expert file {where} holds non-finite parameters (snapshots {start} and later): "
            "train those experts again (buffer/buffer_CL.py with a lower --lr_teacher)"
        )


def skip_counter(cfg: SimpleNamespace, progress: Progress) -> SkipCounter:
    advice = (
        f"every update was refused by threshold={cfg.threshold:g}: raise threshold, or lower "
        f"--lr_img (now {cfg.lr_img:g}) and rerun with --resume true (max_skipped="
        f"{cfg.max_skipped} sets the limit)"
    )
    consecutive = trailing_skips(progress.history["skipped"])
    return SkipCounter(STAGE, cfg.max_skipped, advice, consecutive)


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


def read_checkpoint(run_dir: Path, cfg: SimpleNamespace, mask: str) -> dict | None:
    return runs.read_checkpoint(
        run_dir, identity(cfg, mask), version=CHECKPOINT_VERSION, script="distill/pad.py",
        defaults=DEFAULTS,
    )  # fmt: skip


def restore(
    checkpoint: dict,
    optimizers: dict[str, torch.optim.Optimizer],
    generators: dict[str, torch.Generator],
    sampler: ExpertSampler,
    progress: Progress,
) -> None:
    for name, optimizer in optimizers.items():
        runs.restore_optimizer(optimizer, checkpoint["optimizers"][name])
    set_rng_state(checkpoint["rng"]["global"])
    for name, generator in generators.items():
        generator.set_state(checkpoint["rng"]["generators"][name])
    sampler.load_state_dict(checkpoint["expert_sampler"])
    for key, value in checkpoint["progress"].items():
        setattr(progress, key, value)


def run(mask_name: str) -> None:
    """Entry point of PAD_depth.py / PAD_loss.py: exit 2 on a UserError, 128 + signal if stopped."""
    runs.run_entry(main, mask_name)
