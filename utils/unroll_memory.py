"""`memory: auto`: pick graph, hybrid or recompute for a run from a memory estimate and a budget
(docs/algorithms.md#memory-modes-graph-recompute-hybrid-and-auto).

The estimate is measured, not modelled: one inner step is run on a random batch of the run's
shape with create_graph, under the run's StepOptions, and every tensor autograd saves for it is
counted (saved_tensors_hooks, each storage once). With S those bytes and V = 4 P the bytes of one
flat parameter vector, the memory the unroll adds on top of the model and the synthetic set is

    graph            N S + S              (N graphs, plus one step's worth for the backward pass)
    hybrid, K kept   K S + (N - K) V + S
    recompute        S + N V + S

The budget is `memory_budget_gb`, or BUDGET_FRACTION of the free device memory (CUDA) or of
MemAvailable in /proc/meminfo (CPU). auto takes graph if it fits, else the hybrid that keeps the
most graphs that fit (at least 2: K = 1 is recompute's arithmetic), else recompute.

    choice = choose_memory("auto", student, inner_steps, num_syn, num_classes, (3, 32, 32), ...)
    match_trajectory(..., memory=choice.mode, kept_steps=choice.kept_steps)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from utils.augment import sample_dsa_params
from utils.io import UserError
from utils.matching import FP32_EAGER, MEMORY_KEYS, InnerSteps, StepOptions, Student, step_loss

BUDGET_FRACTION = 0.5  # of the free memory, so the evaluation and the rest of the machine fit
GB = 1e9


@dataclass(frozen=True)
class MemoryChoice:
    mode: str  # graph, hybrid or recompute
    kept_steps: int  # graphs kept (hybrid; N for graph, 1 for recompute)
    estimate_gb: float  # the chosen mode's estimated memory
    step_graph_gb: float  # S
    budget_gb: float | None  # None when the mode was given, not chosen

    def describe(self, requested: str, syn_steps: int) -> str:
        kept = f" keeping {self.kept_steps} of {syn_steps} step graphs" * (self.mode == "hybrid")
        budget = "" if self.budget_gb is None else f" of a {self.budget_gb:.2f} GB budget"
        return (
            f"memory {requested}: {self.mode}{kept}, estimated {self.estimate_gb:.2f} GB{budget} "
            f"(one step's graph {1000 * self.step_graph_gb:.0f} MB)"
        )


def available_gb(device: torch.device) -> tuple[float, str]:
    """Free memory in GB and what it is: CUDA's free device memory or the CPU's MemAvailable."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free / GB, f"free memory of {device}"
    meminfo = Path("/proc/meminfo")
    if meminfo.exists():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024 / GB, "MemAvailable"
    raise UserError(
        "memory auto: cannot read MemAvailable from /proc/meminfo; set memory_budget_gb "
        "(e.g. --memory_budget_gb 8) or choose --memory graph|recompute|hybrid"
    )


def check_memory_settings(
    memory: str, budget_gb: float | None, kept_steps: int | None = None
) -> None:
    """One-line UserErrors for the memory keys, where the config enters."""
    if kept_steps is not None and kept_steps < 0:
        raise UserError(
            f"hybrid_kept_steps={kept_steps}: expected 0..syn_steps graphs to keep, or null"
        )
    if memory not in MEMORY_KEYS:
        raise UserError(
            f"memory={memory!r} is not one of {', '.join(MEMORY_KEYS)}: auto (the default) picks "
            "graph, hybrid or recompute from memory_budget_gb"
        )
    if budget_gb is not None and not budget_gb > 0:
        raise UserError(
            f"memory_budget_gb={budget_gb}: expected a positive number of GB, or null for "
            f"{BUDGET_FRACTION} of the free memory"
        )


def step_graph_bytes(
    student: Student,
    batch: int,
    num_classes: int,
    image_shape: tuple[int, int, int],
    augment: bool,
    strategy: str,
    device: torch.device,
    options: StepOptions = FP32_EAGER,
) -> int:
    """Bytes autograd saves for one inner step kept with create_graph (random batch, same shape)."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch, *image_shape, generator=generator).to(device).requires_grad_(True)
    y = torch.randn(batch, num_classes, generator=generator).to(device).requires_grad_(True)
    w = torch.cat([p.detach().reshape(-1) for p in student.model.parameters()])
    w = w.requires_grad_(True)
    aug = sample_dsa_params(batch, image_shape[1:], strategy, generator=generator)
    aug = aug if augment else None
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = step_loss(student, w, x, y, aug, options)
        (g,) = torch.autograd.grad(loss, w, create_graph=True)
        w_next = w - 0.01 * g
    del w_next, g, loss
    # Inputs that live outside the step (the vector w, the batch) are counted: every kept step
    # holds its own w_i and its own gathered batch.
    return sum(storages.values())


def estimate_gb(mode: str, kept: int, syn_steps: int, step_gb: float, vector_gb: float) -> float:
    """The table of the module docstring."""
    if mode == "graph":
        kept = syn_steps
    elif mode == "recompute":
        kept = 1
    return kept * step_gb + (syn_steps - kept) * vector_gb + step_gb


def choose_memory(
    memory: str,
    budget_gb: float | None,
    student: Student,
    inner_steps: InnerSteps,
    num_syn: int,
    num_classes: int,
    image_shape: tuple[int, int, int],
    device: torch.device,
    options: StepOptions = FP32_EAGER,
    kept_steps: int | None = None,
) -> MemoryChoice:
    """The mode a run uses: `memory` itself unless it is auto, with the estimate to print;
    `kept_steps` is memory hybrid's (None: half of syn_steps)."""
    check_memory_settings(memory, budget_gb, kept_steps)
    steps = inner_steps.syn_steps
    batch = num_syn if inner_steps.batch_syn is None else min(inner_steps.batch_syn, num_syn)
    step_gb = (
        step_graph_bytes(student, batch, num_classes, image_shape, inner_steps.augment,
                         inner_steps.strategy, device, options) / GB
    )  # fmt: skip
    vector_gb = 4 * student.num_params / GB

    def made(mode: str, kept: int, budget: float | None) -> MemoryChoice:
        return MemoryChoice(mode, kept, estimate_gb(mode, kept, steps, step_gb, vector_gb),
                            step_gb, budget)  # fmt: skip

    if memory == "hybrid":
        return made("hybrid", min(steps // 2 if kept_steps is None else kept_steps, steps), None)
    if memory != "auto":
        return made(memory, steps if memory == "graph" else 1, None)
    if budget_gb is None:
        budget_gb = BUDGET_FRACTION * available_gb(device)[0]
    if estimate_gb("graph", steps, steps, step_gb, vector_gb) <= budget_gb:
        return made("graph", steps, budget_gb)
    # K S + (N - K) V + S <= budget  <=>  K <= (budget - S - N V) / (S - V)
    room = budget_gb - step_gb - steps * vector_gb
    kept = int(room // (step_gb - vector_gb)) if step_gb > vector_gb else 0
    if kept >= 2:
        return made("hybrid", min(kept, steps - 1), budget_gb)
    return made("recompute", 1, budget_gb)
