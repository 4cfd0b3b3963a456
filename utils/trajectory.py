"""Expert trajectory files: where they live; writing, reading, sampling them
(docs/formats.md#expert-files, docs/algorithms.md#expert-sampling).

A file `replay_buffer_<n>.pt` holds exactly the reference format, so files move between this code
and the authors' in both directions:

    experts: list[expert]        expert = list[snapshot], train_epochs + 1 of them (0 = init)
    snapshot = list[Tensor]      CPU float32, in model.parameters() order and shapes

Anything else about a file (settings, seeds, shapes) goes to the sidecar `replay_buffer_<n>.json`.
Readers take files 0, 1, 2, ... up to the first missing number. `ExpertSampler` hands out one
trajectory per distillation iteration (docs/algorithms.md#expert-sampling) and can be checkpointed
and resumed. `plan_files` and `finish_expert` keep the files of a run that trains experts resumable.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from utils.io import UserError, load_json, load_pt, remove_temporaries, save_json, save_pt

Snapshot = list[Tensor]
Expert = list[Snapshot]

FILE_PREFIX = "replay_buffer_"


def expert_dir(
    buffer_path: str | os.PathLike,
    dataset: str,
    model: str,
    zca: bool,
    subset: str = "imagenette",
    res: int = 32,
) -> Path:
    """The reference's expert folder (docs/formats.md#expert-folder):
    `<buffer_path>/<dataset>[_NO_ZCA]/<model>`.

    `_NO_ZCA` only for CIFAR10/CIFAR100 without ZCA; ImageNet subsets use
    `<buffer_path>/ImageNet/<subset>/<res>/<model>`. Other data sets do not encode ZCA in the path
    (as in the reference); the sidecar records it.
    """
    folder = Path(buffer_path) / dataset
    if dataset in ("CIFAR10", "CIFAR100") and not zca:
        folder = Path(buffer_path) / f"{dataset}_NO_ZCA"
    if dataset == "ImageNet":
        folder = folder / subset / str(res)
    return folder / model


def expert_file(folder: str | os.PathLike, number: int) -> Path:
    return Path(folder) / f"{FILE_PREFIX}{number}.pt"


def sidecar_path(path: str | os.PathLike) -> Path:
    """`replay_buffer_<n>.json` beside `replay_buffer_<n>.pt`."""
    return Path(path).with_suffix(".json")


def list_expert_files(folder: str | os.PathLike) -> list[Path]:
    """`replay_buffer_0.pt`, `_1.pt`, ... up to the first missing number (the reference's rule)."""
    files = []
    while expert_file(folder, len(files)).is_file():
        files.append(expert_file(folder, len(files)))
    return files


def snapshot_params(model: nn.Module) -> Snapshot:
    """A CPU float32 copy of every parameter. On CPU `.detach().cpu()` would return the live
    tensor itself, and every snapshot would alias the final weights
    (docs/differences.md#expert-snapshots-are-copies)."""
    return [p.detach().to("cpu", torch.float32, copy=True) for p in model.parameters()]


def _check_structure(experts: Any, path: Path) -> None:
    """UserError unless `experts` is list[list[list[Tensor]]] with one snapshot layout."""
    if not isinstance(experts, list) or not experts:
        raise UserError(
            f"expert file {path} is not a non-empty list of experts "
            f"(found {type(experts).__name__})"
        )
    shapes = None
    for k, expert in enumerate(experts):
        if not isinstance(expert, list) or not expert:
            raise UserError(f"expert file {path}: expert {k} is not a non-empty list of snapshots")
        for s, snapshot in enumerate(expert):
            if not isinstance(snapshot, list) or not all(isinstance(t, Tensor) for t in snapshot):
                raise UserError(
                    f"expert file {path}: expert {k} snapshot {s} is not a list of tensors"
                )
            found = [tuple(t.shape) for t in snapshot]
            if shapes is None:
                shapes = found
            elif found != shapes:
                raise UserError(
                    f"expert file {path}: expert {k} snapshot {s} has parameter shapes that differ "
                    "from expert 0 snapshot 0 (the file mixes models)"
                )


def save_expert_file(path: str | os.PathLike, experts: list[Expert], meta: dict) -> None:
    """Write `experts` in the reference format, atomically; `meta` goes to the JSON sidecar.

    The sidecar is written first, so a `.pt` never exists without its sidecar (a kill between the
    two leaves only a sidecar, which a restart overwrites).
    """
    path = Path(path)
    _check_structure(experts, path)
    storages = set()
    for expert in experts:
        for snapshot in expert:
            for t in snapshot:
                if t.device.type != "cpu" or t.dtype != torch.float32:
                    raise ValueError(
                        f"snapshot tensors must be CPU float32, got {t.dtype} {t.device}"
                    )
                ptr = t.untyped_storage().data_ptr()
                if ptr in storages:  # a bug: snapshots that alias each other or live parameters
                    raise ValueError("snapshot tensors share memory; copy them (snapshot_params)")
                storages.add(ptr)
    save_json(meta, sidecar_path(path))
    save_pt(experts, path)


def load_expert_file(path: str | os.PathLike, *, mmap: bool = False) -> list[Expert]:
    """Read one expert file (ours or the authors'); a corrupt or foreign file is a UserError.

    mmap=True maps the tensors from disk instead of reading them (files of ~1 GB load at once).
    """
    path = Path(path)
    experts = load_pt(path, what="expert file", mmap=mmap)
    _check_structure(experts, path)
    return experts


def load_sidecar(path: str | os.PathLike) -> dict | None:
    """The JSON sidecar of an expert file, or None when there is none (e.g. the authors' files)."""
    side = sidecar_path(path)
    return load_json(side, what="expert sidecar") if side.exists() else None


def flatten_params(tensors: Sequence[Tensor]) -> Tensor:
    """Concatenate tensors reshaped to 1-D, in list order
    (docs/algorithms.md#the-flattened-parameter-vector) -> [P]."""
    return torch.cat([t.reshape(-1) for t in tensors])


def unflatten_params(flat: Tensor, shapes: Sequence[torch.Size]) -> list[Tensor]:
    """Inverse of flatten_params: views of `flat` with the given shapes."""
    sizes = [int(np.prod(shape)) for shape in shapes]
    if sum(sizes) != flat.numel():
        raise ValueError(f"flat vector has {flat.numel()} entries, shapes need {sum(sizes)}")
    return [part.view(shape) for part, shape in zip(flat.split(sizes), shapes, strict=True)]


def check_expert_shapes(expert: Expert, model: nn.Module, path: str | os.PathLike) -> None:
    """UserError when the expert's snapshots differ from `model.parameters()` in number or shape."""
    expected = [tuple(p.shape) for p in model.parameters()]
    for s, snapshot in enumerate(expert):
        found = [tuple(t.shape) for t in snapshot]
        if found == expected:
            continue
        where = f"{len(found)} tensors, model has {len(expected)}"
        for i, (want, got) in enumerate(zip(expected, found, strict=True)):
            if want != got:
                where = f"tensor {i} has shape {list(got)}, model expects {list(want)}"
                break
        raise UserError(
            f"expert file {path} holds parameters of another model or data set: snapshot {s}: "
            f"{where} (model total {sum(int(np.prod(x)) for x in expected)} parameters, file "
            f"{sum(int(np.prod(x)) for x in found)}); use the experts of this model and data set"
        )


class ExpertSampler:
    """One expert trajectory per call (docs/algorithms.md#expert-sampling), resumable.

    load_all: every expert of every file in memory, each call picks one uniformly at random.
    Otherwise: files in a shuffled order, one in memory at a time (its first max_experts), its
    experts in a shuffled order sized from that file; the next file when it is used up; a new
    file order after a full pass. max_files keeps the first max_files files. All randomness comes
    from the sampler's own NumPy generator, so `state_dict()` fully describes its position.
    """

    def __init__(
        self,
        files: list[Path],
        *,
        load_all: bool = False,
        max_files: int | None = None,
        max_experts: int | None = None,
        seed: int = 0,
        mmap: bool = False,
    ) -> None:
        if max_files is not None and max_files < 1:
            raise UserError(f"max_files={max_files}: expected at least 1 (or null for all)")
        if max_experts is not None and max_experts < 1:
            raise UserError(f"max_experts={max_experts}: expected at least 1 (or null for all)")
        self.files = [Path(f) for f in files][:max_files]
        if not self.files:
            raise UserError(
                "no expert files to sample from: train experts with buffer/buffer_CL.py"
            )
        self.load_all = load_all
        self.max_experts = max_experts
        self.mmap = mmap
        self.rng = np.random.default_rng(seed)
        if load_all:
            self.experts = [e for f in self.files for e in self._load(f)]
            return
        self.file_order = self.rng.permutation(len(self.files)).tolist()
        self.file_pos = 0
        self.loaded_file: int | None = None  # opened by the first next(), or by load_state_dict
        self.expert_order: list[int] = []
        self.expert_pos = 0

    def _load(self, path: Path) -> list[Expert]:
        return load_expert_file(path, mmap=self.mmap)[: self.max_experts]

    def _open_current_file(self) -> None:
        self.loaded_file = self.file_order[self.file_pos]
        self.experts = self._load(self.files[self.loaded_file])
        self.expert_order = self.rng.permutation(len(self.experts)).tolist()
        self.expert_pos = 0

    @property
    def current_file(self) -> Path | None:
        """The file in memory (None with load_all or before the first call)."""
        if self.load_all or self.loaded_file is None:
            return None
        return self.files[self.loaded_file]

    def next(self) -> Expert:
        if self.load_all:
            return self.experts[int(self.rng.integers(len(self.experts)))]
        if self.loaded_file is None:
            self._open_current_file()
        elif self.expert_pos == len(self.expert_order):
            self._next_file()
        expert = self.experts[self.expert_order[self.expert_pos]]
        self.expert_pos += 1
        return expert

    def _next_file(self) -> None:
        self.file_pos += 1
        if self.file_pos == len(self.file_order):
            self.file_order = self.rng.permutation(len(self.files)).tolist()
            self.file_pos = 0
        if self.file_order[self.file_pos] == self.loaded_file:  # e.g. max_files 1: keep it
            self.expert_order = self.rng.permutation(len(self.experts)).tolist()
            self.expert_pos = 0
        else:
            self._open_current_file()

    def state_dict(self) -> dict[str, Any]:
        """Plain data (torch.save- and JSON-safe): files, generator state and position."""
        state: dict[str, Any] = {
            "load_all": self.load_all,
            "files": [str(f) for f in self.files],
            "max_experts": self.max_experts,
            # the 128-bit PCG64 state as JSON text: plain ints of any size, safe for weights_only
            "rng": json.dumps(self.rng.bit_generator.state),
        }
        if not self.load_all:
            state.update(
                file_order=list(self.file_order),
                file_pos=self.file_pos,
                loaded_file=-1 if self.loaded_file is None else self.loaded_file,
                expert_order=list(self.expert_order),
                expert_pos=self.expert_pos,
            )
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly where `state` was taken; reloads the file that was in memory."""
        if state["load_all"] != self.load_all or len(state["files"]) != len(self.files):
            raise UserError(
                f"expert sampler checkpoint was taken with load_all={state['load_all']} and "
                f"{len(state['files'])} files, this run has load_all={self.load_all} and "
                f"{len(self.files)}: resume with the same expert settings"
            )
        self.rng.bit_generator.state = json.loads(state["rng"])
        if self.load_all:
            return
        self.file_order = [int(i) for i in state["file_order"]]
        self.file_pos = int(state["file_pos"])
        self.expert_order = [int(i) for i in state["expert_order"]]
        self.expert_pos = int(state["expert_pos"])
        loaded = int(state["loaded_file"])
        if loaded < 0:  # taken before the first next()
            self.loaded_file = None
            return
        if loaded != self.loaded_file:
            self.loaded_file = loaded
            self.experts = self._load(self.files[loaded])
        if len(self.expert_order) != len(self.experts):
            raise UserError(
                f"expert file {self.files[self.loaded_file]} now holds {len(self.experts)} "
                f"experts, the checkpoint expected {len(self.expert_order)}: the files changed"
            )


# ---------------------------------------------------------------------------------------------
# Resuming a buffer: which experts exist, which are missing, keeping finished ones
#
# Expert k of a run belongs to file k // save_interval. A file is written once all its experts
# are done; until then each finished expert waits in `.replay_buffer_<n>.partial_<k>.pt`. The
# sidecar's `settings` say what made a file, so a rerun never mixes experts of other settings.

FORMAT = "pad-replay-buffer/1"  # sidecar format tag; bump when the meaning of a field changes


def partial_path(folder: Path, number: int, k: int | str) -> Path:
    """Where finished expert k of the unfinished file `number` waits (k "*": a glob pattern)."""
    return folder / f".{FILE_PREFIX}{number}.partial_{k}.pt"


@dataclass
class FileJob:
    """File `number` must hold the experts `experts`; `done` holds those already finished."""

    number: int
    experts: list[int]
    done: dict[int, Expert] = field(default_factory=dict)

    @property
    def missing(self) -> list[int]:
        return [k for k in self.experts if k not in self.done]


def settings_mismatch(found: dict, wanted: dict) -> str:
    """The keys on which two settings dicts differ, as `key found (this run wanted)`."""
    keys = sorted(set(found) | set(wanted))
    return ", ".join(
        f"{k} {found.get(k)!r} (this run {wanted.get(k)!r})"
        for k in keys
        if found.get(k) != wanted.get(k)
    )


def check_trajectory(expert: Expert, shapes: list[list[int]], train_epochs: int, where: Path):
    """UserError unless `expert` has train_epochs + 1 snapshots of the parameter `shapes`."""
    found = [list(t.shape) for t in expert[0]]
    if len(expert) != train_epochs + 1 or found != shapes:
        raise UserError(
            f"{where} holds experts of {len(expert) - 1} epochs with parameter shapes "
            f"{found[:3]}..., this run makes {train_epochs} epochs of {shapes[:3]}...: use "
            "another --buffer_path"
        )


def existing_experts(path: Path, settings: dict, shapes: list, train_epochs: int) -> dict:
    """The experts already in file `path` ({global index: trajectory}), checked against this run."""
    if not path.exists():
        return {}
    meta = load_sidecar(path)
    if meta is None or meta.get("format") != FORMAT:
        raise UserError(
            f"{path} exists without a {FORMAT} sidecar {path.with_suffix('.json').name}: it was "
            "not made by this script, so its settings are unknown; use another --buffer_path"
        )
    if meta["settings"] != settings:
        raise UserError(
            f"{path} was made with other settings: "
            f"{settings_mismatch(meta['settings'], settings)}; use the same settings or another "
            "--buffer_path"
        )
    # Memory-mapped: only the list structure is read now. When a file is grown (a larger
    # --num_experts than the run that wrote its last, smaller group) the sidecar may be newer than
    # the .pt, so the .pt's length says which of the listed experts it holds.
    experts = load_expert_file(path, mmap=True)
    check_trajectory(experts[0], shapes, train_epochs, path)
    return dict(zip(meta["experts"][: len(experts)], experts, strict=True))


def load_partials(
    folder: Path, job: FileJob, settings: dict, shapes: list, train_epochs: int
) -> None:
    """Add to `job.done` the missing experts that wait in partial files."""
    for k in job.missing:
        path = partial_path(folder, job.number, k)
        if not path.exists():
            continue
        state = load_pt(path, what="partial expert")
        if not isinstance(state, dict) or not {"settings", "expert", "trajectory"} <= set(state):
            raise UserError(
                f"{path} is not a partial expert of buffer_CL.py (expected a dict with settings, "
                "expert and trajectory): delete it, and that expert is trained again"
            )
        if state["settings"] != settings or state["expert"] != k:
            raise UserError(
                f"{path} was made with other settings "
                f"({settings_mismatch(state['settings'], settings)}): delete it or rerun with them"
            )
        check_trajectory(state["trajectory"], shapes, train_epochs, path)
        job.done[k] = state["trajectory"]


def remove_stale_temporaries(folder: Path, number: int) -> None:
    """Temporary files of atomic writes a killed run of file `number` left behind."""
    path = expert_file(folder, number)
    for name in (path.name, sidecar_path(path).name, partial_path(folder, number, "*").name):
        remove_temporaries(folder, name)


def plan_files(
    folder: Path, num_experts: int, settings: dict, shapes: list, rank: int = 0, world: int = 1
) -> list[FileJob]:
    """The files of rank `rank` (n % world == rank) that still lack experts, with what is
    already done loaded; `settings` give save_interval and train_epochs."""
    save_interval, train_epochs = settings["save_interval"], settings["train_epochs"]
    jobs = []
    num_files = -(-num_experts // save_interval)
    for number in range(rank, num_files, world):
        first = number * save_interval
        job = FileJob(number, list(range(first, min(first + save_interval, num_experts))))
        remove_stale_temporaries(folder, number)
        path = expert_file(folder, number)
        job.done.update(existing_experts(path, settings, shapes, train_epochs))
        if not job.missing:  # complete; a kill after its write may have left partials
            for k in job.experts:
                partial_path(folder, number, k).unlink(missing_ok=True)
            continue
        load_partials(folder, job, settings, shapes, train_epochs)
        jobs.append(job)
    return jobs


def finish_expert(
    folder: Path, job: FileJob, k: int, trajectory: Expert, meta: dict
) -> Path | None:
    """Keep a finished expert: the whole file once complete (returns its path), else a partial
    checkpoint (returns None)."""
    job.done[k] = trajectory
    if job.missing:
        save_pt({"expert": k, "settings": meta["settings"], "trajectory": trajectory},
                partial_path(folder, job.number, k))  # fmt: skip
        return None
    path = expert_file(folder, job.number)
    meta = {**meta, "file": job.number, "experts": job.experts,
            "seeds": [meta["settings"]["seed"] + i for i in job.experts]}  # fmt: skip
    save_expert_file(path, [job.done[i] for i in job.experts], meta)
    for i in job.experts:
        partial_path(folder, job.number, i).unlink(missing_ok=True)
    return path
