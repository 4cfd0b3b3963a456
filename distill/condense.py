"""Gradient matching (DC, DSA) and distribution matching (DM) with PAD's two filters
(docs/gm_dm.md).

Run through the two entry points, from distill/ or the repository root:

    python distill/DC.py --cfg configs/CIFAR-10/DC/IPC10.yaml               # DC
    python distill/DC.py --cfg configs/CIFAR-10/DC/IPC10.yaml --dsa true    # DSA
    python distill/DM.py --cfg configs/CIFAR-10/DM/IPC10.yaml --depth_ratio 0.25

Any key of docs/config.md#distilldcpy (DC) or docs/config.md#distilldmpy (DM) can follow as
`--key value`. PAD's filter 1 is `sort_method` with `remove_hard` or `remove_easy`; filter 2 is
`depth_ratio` (docs/gm_dm.md#pads-filters).

Outputs, in `<out_dir>/<dataset>/<ipc>/<model>/<run name>/` (the run name's default RANDOM
becomes `<dataset>-IPC<ipc>-<DC|DSA|DM>-s<seed>`), as PAD's (docs/formats.md#run-folder-layout):
    Normal/images_<it>.pt, labels_<it>.pt     float32 images, int64 hard labels (class-major)
    Normal/images_best.pt, labels_best.pt     when the evaluated accuracy improved
    images_<it>.png, images_clipped_<it>.png  image grids (ipc < 50 or force_save)
    loss.png, metrics.jsonl, config.yaml, checkpoint.pt
There is no learnable learning rate: a set is evaluated with `lr_net`.

Resume: `checkpoint.pt` is written every `checkpoint_it` iterations, at the end and after the
iteration during which SIGINT or SIGTERM arrived; `--resume true` continues from it, and on the
CPU the result equals that of an uninterrupted run (every draw comes from one generator).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import Tensor
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils import runs  # noqa: E402
from utils.augment import sample_dsa_params  # noqa: E402
from utils.condense import copy_weights, fresh_network  # noqa: E402
from utils.config import DC_KEYS, DM_KEYS, parse_config_args, save_config  # noqa: E402
from utils.data import Data, get_dataset  # noqa: E402
from utils.difficulty import load_index_file  # noqa: E402
from utils.dm import dm_step  # noqa: E402
from utils.evaluate import eval_pool, evaluate_synset  # noqa: E402
from utils.filters import check_filter, check_ipc_fits, check_ratio, class_pool  # noqa: E402
from utils.gm import GMSettings, check_dis_metric, get_loops, gm_iteration  # noqa: E402
from utils.guard import check_finite  # noqa: E402
from utils.io import UserError, save_pt  # noqa: E402
from utils.runs import StopOnSignal, evaluation_iterations, refuse_existing_run  # noqa: E402
from utils.runtime import get_rng_state, resolve_device, seed_everything, set_rng_state  # noqa: E402
from utils.synset import check_choice, hard_labels, noise_images, real_image_indices  # noqa: E402
from utils.tracking import Tracker, plot_curves, save_image_grid  # noqa: E402

KEYS_BY_METHOD = {"DC": DC_KEYS, "DM": DM_KEYS}
INITS = ("noise", "real")
EMBED_AMP = ("off", "bf16")
# Settings a checkpoint cannot be continued under (they change what the tensors mean).
IDENTITY_KEYS = ("dataset", "subset", "model", "ipc", "zca", "max_per_class", "dsa")
CHECKPOINT_VERSION = 1


def main(method: str, argv: list[str] | None = None) -> dict:
    """Distill with `method` ("DC": gradient matching, DSA with dsa true; "DM"); returns a
    summary of the run."""
    # ---- arguments ---------------------------------------------------------------------------
    cfg = parse_config_args(
        argv, description=f"{method} distillation (docs/gm_dm.md)", keys=KEYS_BY_METHOD[method]
    )
    check_settings(cfg, method)
    tag = "DSA" if method == "DC" and cfg.dsa else method
    run_dir = runs.run_folder(cfg, tag=tag)
    checkpoint = read_checkpoint(run_dir, cfg, method) if cfg.resume else None
    if not cfg.resume:
        refuse_existing_run(run_dir)
    device = resolve_device(cfg.device)

    # ---- set-up ------------------------------------------------------------------------------
    seed_everything(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)  # every draw of the run
    data, pool = load_data(cfg)
    images_train = data.images_train.to(device)
    if method == "DM" and cfg.channels_last:
        images_train = images_train.contiguous(memory_format=torch.channels_last)
    image_syn = initial_images(cfg, checkpoint, data, pool, generator).to(device)
    image_syn.requires_grad_(True)
    label_syn = hard_labels(data.num_classes, cfg.ipc).to(device)
    optimizer = torch.optim.SGD([image_syn], lr=cfg.lr_img, momentum=0.5)
    progress = Progress()
    if checkpoint is not None:
        restore(checkpoint, optimizer, generator, progress)
    run = open_run(cfg, method, tag, run_dir, checkpoint, data, device, progress)
    if method == "DM" and cfg.compile:
        run.compiled = compiled_network(cfg, data, device)
    step = gm_step if method == "DC" else dm_iteration
    eval_its = evaluation_iterations(cfg)
    print(
        f"{tag}: {cfg.dataset} IPC {cfg.ipc}, {cfg.model} on {device}; real images per class "
        f"{min(map(len, pool))}-{max(map(len, pool))}; depth_ratio {cfg.depth_ratio}"
    )

    # ---- the loop: it = 0 .. Iteration --------------------------------------------------------
    iterations = range(progress.next_iteration, cfg.Iteration + 1)
    bar = tqdm(iterations, initial=iterations.start, total=cfg.Iteration + 1, disable=None)
    with StopOnSignal() as stop:
        for it in bar:
            if it in eval_its:  # before this iteration's update, as in pad.py
                improved = evaluate(run, it, image_syn, label_syn)
                numbered = improved or it % 1000 == 0 or it == eval_its[-1]
                write_outputs(run, it, image_syn, label_syn, best=improved, numbered=numbered)
            net = fresh_network(
                cfg.model, data.channel, data.num_classes, data.im_size,
                generator=generator, device=device,
            )  # fmt: skip
            loss = step(run, net, image_syn, label_syn, optimizer, pool, images_train, generator)
            _check_finite(run, it, loss, image_syn)
            progress.record(it, loss)
            run.tracker.log(it, {"loss": loss})
            if it % 10 == 0:
                bar.set_postfix(loss=f"{loss:.4f}")
            if (it + 1) % cfg.checkpoint_it == 0 or it == cfg.Iteration or stop.signum:
                save_pt(checkpoint_state(run, method, image_syn, optimizer, generator),
                        run_dir / "checkpoint.pt")  # fmt: skip
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
class Progress:
    """Everything about the run so far that a checkpoint keeps besides tensors and RNGs."""

    next_iteration: int = 0
    best: dict[str, dict] = field(default_factory=dict)  # model -> {mean, std, iteration}
    history: dict[str, list] = field(default_factory=lambda: {"iteration": [], "loss": []})

    def record(self, it: int, loss: float) -> None:
        self.history["iteration"].append(it)
        self.history["loss"].append(loss)
        self.next_iteration = it + 1


@dataclass
class Run:
    cfg: SimpleNamespace
    method: str
    data: Data
    device: torch.device
    dir: Path
    tracker: Tracker
    progress: Progress
    eval_models: list[str]
    compiled: torch.nn.Module | None = None  # DM with compile: the one compiled network


# ---- arguments ---------------------------------------------------------------------------------


def check_settings(cfg: SimpleNamespace, method: str) -> None:
    """One-line UserErrors for settings the loop cannot run with (before any data is read)."""
    check_choice("init", cfg.init, INITS)
    check_filter(cfg.remove_easy, cfg.remove_hard, cfg.sort_method)
    check_ratio("depth_ratio", cfg.depth_ratio)
    minimums = {"Iteration": 0, "eval_it": 1, "checkpoint_it": 1, "num_eval": 1,
                "batch_real": 1, "batch_train": 1, "ipc": 1}  # fmt: skip
    for key, minimum in minimums.items():
        if getattr(cfg, key) < minimum:
            raise UserError(f"{key}={getattr(cfg, key)}: expected at least {minimum}")
    if cfg.epoch_eval_train is not None and cfg.epoch_eval_train < 0:
        raise UserError(f"epoch_eval_train={cfg.epoch_eval_train}: expected at least 0")
    if not (cfg.lr_img > 0 and cfg.lr_net > 0):
        raise UserError(f"lr_img={cfg.lr_img}, lr_net={cfg.lr_net}: expected both > 0")
    if cfg.dsa:
        sample_dsa_params(1, (8, 8), cfg.dsa_strategy, generator=torch.Generator())
    if method == "DC":
        check_dis_metric(cfg.dis_metric)
        get_loops(cfg.ipc, cfg.outer_loop, cfg.inner_loop)
    else:
        check_choice("embed_amp", cfg.embed_amp, EMBED_AMP)


def index_file(cfg: SimpleNamespace) -> Path:
    """`sort_method NAME` -> `<indices_path>/NAME.pt`; a value ending in .pt is a path (as in
    buffer/buffer_CL.py)."""
    name = cfg.sort_method
    path = Path(name) if name.endswith(".pt") else Path(cfg.indices_path) / f"{name}.pt"
    if not path.expanduser().is_file():
        raise UserError(
            f"difficulty file for sort_method={name!r} not found: looked for "
            f"{path.expanduser().absolute()}; make it with python buffer/rank_difficulty.py "
            f"--dataset {cfg.dataset} (same data_path, zca and max_per_class), or set indices_path"
        )
    return path.expanduser()


# ---- set-up ------------------------------------------------------------------------------------


def load_data(cfg: SimpleNamespace) -> tuple[Data, list[Tensor]]:
    """The real data and, per class, the train indices the matching may draw (PAD's filter 1,
    docs/gm_dm.md#filter-1-the-real-data)."""
    data = get_dataset(
        cfg.dataset, cfg.data_path, subset=cfg.subset, zca=cfg.zca, max_per_class=cfg.max_per_class
    )
    order = None
    if cfg.remove_easy or cfg.remove_hard:
        subset = cfg.subset if cfg.dataset == "ImageNet" else None
        order = load_index_file(index_file(cfg), data.labels_train, dataset=cfg.dataset,
                                subset=subset)  # fmt: skip
    pool = class_pool(data.labels_train, data.num_classes, order,
                      remove_easy=cfg.remove_easy, remove_hard=cfg.remove_hard)  # fmt: skip
    check_ipc_fits(cfg.ipc, pool, remove_easy=cfg.remove_easy, remove_hard=cfg.remove_hard)
    return data, pool


def initial_images(
    cfg: SimpleNamespace,
    checkpoint: dict | None,
    data: Data,
    pool: list[Tensor],
    generator: torch.Generator,
) -> Tensor:
    """[C * ipc, channel, H, W], class-major: N(0, 1) noise or random kept real images (CPU)."""
    if checkpoint is not None:
        return checkpoint["image_syn"].clone()
    if cfg.init == "real":
        return data.images_train[real_image_indices(pool, cfg.ipc, generator)].clone()
    return noise_images(data.num_classes * cfg.ipc, data.channel, data.im_size, generator)


def open_run(
    cfg: SimpleNamespace,
    method: str,
    tag: str,
    run_dir: Path,
    checkpoint: dict | None,
    data: Data,
    device: torch.device,
    progress: Progress,
) -> Run:
    """The run folder with this run's config, its metrics log and the evaluation models."""
    (run_dir / "Normal").mkdir(parents=True, exist_ok=True)
    save_config({key: getattr(cfg, key) for key in KEYS_BY_METHOD[method]}, run_dir / "config.yaml")
    if checkpoint is not None:
        runs.drop_metrics_from(run_dir / "metrics.jsonl", progress.next_iteration)
    tracker = Tracker(
        run_dir, wandb_mode=cfg.wandb, project=cfg.project, name=run_dir.name, config=vars(cfg)
    )
    eval_models = eval_pool(cfg.eval_mode, cfg.model, data.im_size)
    resumed = f" (resumed at iteration {progress.next_iteration})" if checkpoint else ""
    print(f"outputs: {run_dir}{resumed}")
    return Run(cfg, tag, data, device, run_dir, tracker, progress, eval_models)


# ---- one iteration -----------------------------------------------------------------------------


def gm_step(run, net, image_syn, label_syn, optimizer, pool, images_train, generator) -> float:
    """One DC/DSA iteration (docs/gm_dm.md#gradient-matching): outer_loop image updates."""
    cfg = run.cfg
    outer, inner = get_loops(cfg.ipc, cfg.outer_loop, cfg.inner_loop)
    settings = GMSettings(
        outer, inner, batch_real=cfg.batch_real, batch_train=cfg.batch_train, lr_net=cfg.lr_net,
        dis_metric=cfg.dis_metric, depth_ratio=cfg.depth_ratio, dsa=cfg.dsa,
        dsa_strategy=cfg.dsa_strategy,
    )  # fmt: skip
    return gm_iteration(
        net, image_syn, label_syn, optimizer, pool, images_train, settings, generator=generator
    )


def dm_iteration(run, net, image_syn, label_syn, optimizer, pool, images_train, generator) -> float:
    """One DM iteration (docs/gm_dm.md#distribution-matching): one image update. Returns the
    loss per class (the DM code's log value)."""
    cfg = run.cfg
    if run.compiled is not None:  # the fresh network's weights in the compiled one
        copy_weights(net, run.compiled)
        net = run.compiled
    if cfg.channels_last:
        net = net.to(memory_format=torch.channels_last)
    optimizer.zero_grad()
    bf16 = cfg.embed_amp == "bf16"
    with torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=bf16):
        loss = dm_step(
            net, image_syn, pool, images_train, batch_real=cfg.batch_real,
            depth_ratio=cfg.depth_ratio, dsa=cfg.dsa, strategy=cfg.dsa_strategy,
            generator=generator,
        )  # fmt: skip
    optimizer.step()
    return loss.item() / len(pool)


def compiled_network(cfg: SimpleNamespace, data: Data, device: torch.device) -> torch.nn.Module:
    """One network whose embedding is torch.compile'd; every iteration copies the fresh
    network's weights into it, so the same compiled code serves the whole run."""
    net = fresh_network(cfg.model, data.channel, data.num_classes, data.im_size,
                        generator=torch.Generator().manual_seed(0), device=device)  # fmt: skip
    net.features = torch.compile(net.features)
    return net


def _check_finite(run: Run, it: int, loss: float, image_syn: Tensor) -> None:
    """The divergence guard (docs/algorithms.md#divergence-guard): the loss and the updated
    images finite, else one line and nothing of the iteration saved."""
    advice = runs.rerun_advice(run.dir, run.cfg, "lr_img")
    check_finite("distillation", f"iteration {it}", advice, matching_loss=loss,
                 synthetic_images=image_syn)  # fmt: skip


# ---- evaluation and outputs --------------------------------------------------------------------


def eval_epochs(cfg: SimpleNamespace) -> int:
    """DC: 300 epochs, 1000 with DSA, unless given (docs/gm_dm.md#defaults)."""
    if cfg.epoch_eval_train is not None:
        return cfg.epoch_eval_train
    return 1000 if cfg.dsa else 300


def evaluate(run: Run, it: int, image_syn: Tensor, label_syn: Tensor) -> bool:
    """Train num_eval networks per pool model on the set with lr_net; True when some model's
    mean accuracy beat its best so far. Without DSA the networks train without augmentation,
    as the DC code's evaluation on these data sets."""
    cfg, improved = run.cfg, False
    images, labels = image_syn.detach().cpu().clone(), label_syn.cpu()
    strategy = cfg.dsa_strategy if cfg.dsa else "none"
    for name in run.eval_models:
        result = evaluate_synset(
            name, images, labels, cfg.lr_net, run.data, epochs=eval_epochs(cfg),
            batch_train=cfg.batch_train, dsa=True, dsa_strategy=strategy,
            num_eval=cfg.num_eval, device=run.device, seed=cfg.eval_seed + it, amp=cfg.amp,
        )  # fmt: skip
        best = run.progress.best.get(name)
        if best is None or result.mean > best["mean"]:
            best = {"mean": result.mean, "std": result.std, "iteration": it}
            run.progress.best[name] = best
            improved = True
        run.tracker.log(it, {f"accuracy/{name}": result.mean, f"accuracy_std/{name}": result.std,
                             f"best_accuracy/{name}": best["mean"],
                             "eval_seconds": result.seconds})  # fmt: skip
        tqdm.write(
            f"[it {it}] {name}: {result.mean:.2f}% +- {result.std:.2f} ({cfg.num_eval} net(s), "
            f"best {best['mean']:.2f}% at it {best['iteration']}); {result.seconds:.1f} s",
            file=sys.stdout,
        )
    return improved


def write_outputs(
    run: Run, it: int, image_syn: Tensor, label_syn: Tensor, *, best: bool, numbered: bool
) -> None:
    """images_<it>.pt / labels_<it>.pt (and _best), image grids and the loss curve."""
    cfg, normal = run.cfg, run.dir / "Normal"
    images, labels = image_syn.detach().cpu().clone(), label_syn.cpu().clone()
    tags = ([str(it)] if numbered else []) + (["best"] if best else [])
    for tag in tags:
        save_pt(images, normal / f"images_{tag}.pt")
        save_pt(labels, normal / f"labels_{tag}.pt")
    if cfg.ipc < 50 or cfg.force_save:
        viewable = run.data.to_viewable(images)
        for suffix, clip_std in (("", None), ("_clipped", 2.5)):
            path = run.dir / f"images{suffix}_{it}.png"
            save_image_grid(viewable, path, nrow=10, clip_std=clip_std)
            run.tracker.image(f"synthetic_images{suffix}", path, step=it)
    plot_loss(run)


def plot_loss(run: Run) -> None:
    history = run.progress.history
    if history["iteration"]:
        series = {"matching loss": history["loss"]}
        plot_curves(run.dir / "loss.png", history["iteration"], series, title=run.dir.name)


def report(run: Run, signum: int | None) -> None:
    progress = run.progress
    if signum is not None:
        print(runs.stopped_message(signum, progress.next_iteration - 1, run.dir))
        return
    best = ", ".join(
        f"{name} {b['mean']:.2f}% (it {b['iteration']})" for name, b in progress.best.items()
    )
    print(f"done: best {best or '-'}; {run.dir}")


# ---- checkpoints -------------------------------------------------------------------------------


def identity(cfg: SimpleNamespace, method: str) -> dict:
    return {"method": method, **{key: getattr(cfg, key) for key in IDENTITY_KEYS}}


def read_checkpoint(run_dir: Path, cfg: SimpleNamespace, method: str) -> dict | None:
    return runs.read_checkpoint(run_dir, identity(cfg, method), version=CHECKPOINT_VERSION,
                                script="distill/condense.py")  # fmt: skip


def checkpoint_state(
    run: Run,
    method: str,
    image_syn: Tensor,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
) -> dict:
    """Everything needed to continue exactly after the last finished iteration."""
    progress = run.progress
    return {
        "version": CHECKPOINT_VERSION,
        "identity": identity(run.cfg, method),
        "image_syn": image_syn.detach().cpu().clone(),
        "optimizer": optimizer.state_dict(),
        "rng": {"global": get_rng_state(), "generator": generator.get_state()},
        "progress": {
            "next_iteration": progress.next_iteration,
            "best": progress.best,
            "history": progress.history,
        },
    }


def restore(
    checkpoint: dict,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    progress: Progress,
) -> None:
    runs.restore_optimizer(optimizer, checkpoint["optimizer"])
    set_rng_state(checkpoint["rng"]["global"])
    generator.set_state(checkpoint["rng"]["generator"])
    for key, value in checkpoint["progress"].items():
        setattr(progress, key, value)


def run(method: str) -> None:
    """Entry point of DC.py / DM.py: exit 2 on a UserError, 128 + signal if stopped."""
    runs.run_entry(main, method)
