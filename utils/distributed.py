"""Distillation across processes: every inner step's synthetic batch split across the ranks
(docs/algorithms.md#distributed-distillation).

Every rank holds the same synthetic set, draws the same plan of batches and DSA parameters from
the run's generators, and computes the step's loss on its shard of the step's batch only, scaled
by the shard's share of the batch. Two autograd functions make the sum over ranks exact at every
order of differentiation:

- `replicate(w)` feeds the (replicated) flat parameters into a rank's shard; its backward sums
  the gradient over ranks. So dL_i/dw = sum over ranks of the shards' gradients: the full batch's
  mean gradient, one all-reduce per inner step.
- that all-reduce is itself `sum_over_ranks`, whose backward is the identity (its incoming
  gradient is the same on every rank), so a second derivative (graph mode, the walk back of
  recompute) goes through the shard's graph once and through `replicate`'s all-reduce again.

What stays partial on a rank is the gradient w.r.t. the rows of image_syn and label_syn that
rank's shards used: `World.sum_gradients` adds them up once per iteration. syn_lr's gradient
needs no reduction: it is made of replicated quantities only.

    world = start_world(device, forced=False)       # torchrun's ranks, or a world of one
    student = world.student(Student(model))
    plan = world.shard(inner_steps.plan(num_syn, im_size, generator))
    result = match_trajectory(student, image_syn, label_syn, syn_lr, w_start, target, plan)
    world.sum_gradients(result, image_syn, label_syn)
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from utils.io import UserError
from utils.matching import InnerPlan, MatchResult, Student
from utils.runtime import rank_and_world

# Rank 0 alone writes files; the others wait in the next collective. A long evaluation is split
# across ranks, so this only has to outlast a checkpoint write or an image grid.
TIMEOUT = timedelta(hours=2)


class SumOverRanks(torch.autograd.Function):
    """Forward: the sum of `t` over ranks. Backward: the identity, which is exact when the
    incoming gradient is the same on every rank (it is made of replicated quantities)."""

    @staticmethod
    def forward(ctx: Any, t: Tensor) -> Tensor:
        total = t.clone()
        dist.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        return grad


class Replicate(torch.autograd.Function):
    """Forward: the identity on a tensor every rank holds. Backward: the gradient summed over
    ranks, differentiably (so that higher derivatives sum too)."""

    @staticmethod
    def forward(ctx: Any, w: Tensor) -> Tensor:
        return w.clone()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        return SumOverRanks.apply(grad)


class ReplicatedStudent:
    """A Student whose flat parameters are the same on every rank: gradients w.r.t. them are
    summed over ranks."""

    def __init__(self, student: Student) -> None:
        self.student = student
        self.model = student.model
        self.num_params = student.num_params

    def __call__(self, x: Tensor, flat_params: Tensor) -> Tensor:
        return self.student(x, Replicate.apply(flat_params))


def shard_rows(n: int, rank: int, size: int) -> slice:
    """The rows of a batch of n that `rank` computes: contiguous, sizes differing by at most one
    (the first n % size ranks have one more)."""
    base, extra = divmod(n, size)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (rank < extra))


@dataclass(frozen=True)
class World:
    """The processes of the run. `active`: the inner steps are split (distributed=true or
    WORLD_SIZE > 1); otherwise every method is the single-process identity."""

    rank: int = 0
    size: int = 1
    active: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def student(self, student: Student) -> Student | ReplicatedStudent:
        if not self.active:
            return student
        refuse_batch_statistics(student.model)
        return ReplicatedStudent(student)

    def shard(self, plan: InnerPlan) -> InnerPlan:
        """This rank's rows of every step's batch, their DSA parameters and their share."""
        if not self.active:
            return plan
        batches, aug, weights = [], [], []
        for batch, params in zip(plan.batches, plan.aug, strict=True):
            if len(batch) < self.size:
                raise UserError(
                    f"an inner step's batch has {len(batch)} synthetic images, fewer than the "
                    f"{self.size} processes: raise batch_syn (or ipc), or start fewer processes"
                )
            rows = shard_rows(len(batch), self.rank, self.size)
            batches.append(batch[rows])
            aug.append(None if params is None else params.select(torch.arange(len(batch))[rows]))
            weights.append((rows.stop - rows.start) / len(batch))
        return InnerPlan(batches, aug, weights)

    def sum_gradients(self, result: MatchResult, *tensors: Tensor) -> None:
        """Add up over ranks the gradients each rank's shards gave `tensors` (image_syn and
        label_syn), in one all-reduce; their .grad must hold this iteration's only."""
        if not self.active or result.skipped:
            return
        grads = [t.grad for t in tensors if t.grad is not None]
        if grads:
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat)
            for g, total in zip(grads, flat.split([g.numel() for g in grads]), strict=True):
                g.copy_(total.view_as(g))

    def any(self, flag: bool, device: torch.device) -> bool:
        """True on every rank if `flag` is true on some rank (e.g. a stop signal)."""
        if not self.active:
            return flag
        value = torch.tensor([int(flag)], device=device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())

    def broadcast(self, tensors: list[Tensor]) -> None:
        """Rank 0's values in `tensors`, in place, on every rank."""
        if self.active:
            with torch.no_grad():
                for t in tensors:
                    dist.broadcast(t, src=0)

    def check_same(self, facts: dict[str, Any]) -> None:
        """Stop every rank with one line when the ranks' `facts` (the config, the expert folder
        listing) are not all rank 0's (docs/algorithms.md#distributed-distillation)."""
        if not self.active or self.size == 1:
            return
        digests = {}  # a dict's entries one by one, so that the message can name them
        for key, value in facts.items():
            entries = value.items() if isinstance(value, dict) else [(None, value)]
            digests.update({" ".join(filter(None, (key, k))): digest(v) for k, v in entries})
        shares: list[Any] = [None] * self.size
        dist.all_gather_object(shares, digests)
        differing = [
            f"rank {r}'s {key}"
            for r, share in enumerate(shares)
            for key in digests
            if share[key] != shares[0][key]
        ]
        if differing:
            shown = ", ".join(differing[:5]) + (", ..." if len(differing) > 5 else "")
            raise UserError(
                f"the {self.size} processes disagree: {shown} "
                f"{'differs' if len(differing) == 1 else 'differ'} from rank 0's; start every "
                "rank with the same config, expert folder and run folder"
            )

    def close(self) -> None:
        if self.active and dist.is_initialized():
            dist.destroy_process_group()


def digest(value: Any) -> str:
    """A short hash of a JSON-able value (paths and other objects as their text)."""
    text = json.dumps(value, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def folder_listing(files: list[Path]) -> list[tuple[str, int]]:
    """The expert files as (name, size in bytes): what every rank must see alike."""
    return [(path.name, path.stat().st_size) for path in files]


def start_world(device: torch.device, *, forced: bool) -> World:
    """Join torchrun's process group (nccl on CUDA, gloo on CPU) when WORLD_SIZE > 1; with
    `forced` (distributed=true) a plain run makes a world of one, which runs the split code."""
    rank, size = rank_and_world()
    if size == 1 and not forced:
        return World()
    if dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size(), active=True)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if size == 1:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    else:
        dist.init_process_group(backend, timeout=TIMEOUT)
    return World(rank, size, active=True)


def refuse_batch_statistics(model: torch.nn.Module) -> None:
    """A shard's batch statistics are not the batch's: BatchNorm would change the result."""
    batch_norms = (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d)
    if any(isinstance(m, batch_norms) for m in model.modules()):
        raise UserError(
            "the model has BatchNorm layers, whose statistics would differ between a shard and "
            "the whole inner batch: distill it in one process, or use an instance-norm model"
        )
