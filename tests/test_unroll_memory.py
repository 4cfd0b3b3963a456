"""memory auto: the measured step graph, the estimate table, the choice, the checks."""

import pytest
import torch

from utils import unroll_memory
from utils.io import UserError
from utils.matching import InnerSteps, StepOptions, Student
from utils.networks import ConvNet
from utils.unroll_memory import (
    check_memory_settings,
    choose_memory,
    estimate_gb,
    step_graph_bytes,
)

CPU = torch.device("cpu")
SHAPE, CLASSES = (3, 8, 8), 4


@pytest.fixture(scope="module")
def student():
    torch.manual_seed(0)
    return Student(ConvNet(3, CLASSES, SHAPE[1:], width=8, depth=2))


def choose(student, memory="auto", budget=None, steps=10, batch=None, **kw):
    return choose_memory(memory, budget, student, InnerSteps(steps, batch), 8, CLASSES, SHAPE,
                         CPU, **kw)  # fmt: skip


def test_step_graph_grows_with_the_batch_and_shrinks_in_bf16(student):
    args = (CLASSES, SHAPE, True, "color_crop_cutout_flip_scale_rotate", CPU)
    four, eight = (step_graph_bytes(student, b, *args) for b in (4, 8))
    # the activations (conv, norm, ReLU, pooling outputs) scale with the batch, w does not
    per_image = 8 * 8 * 8 * 4  # one float32 feature map of the first layer
    assert eight - four > 4 * per_image
    assert eight < 2 * four + 4 * student.num_params
    bf16 = step_graph_bytes(student, 8, *args, options=StepOptions("bf16"))
    assert bf16 != eight


def test_estimates_follow_the_table():
    s, v = 0.3, 0.01
    assert estimate_gb("graph", 0, 10, s, v) == pytest.approx(11 * s)
    assert estimate_gb("recompute", 0, 10, s, v) == pytest.approx(2 * s + 9 * v)
    assert estimate_gb("hybrid", 4, 10, s, v) == pytest.approx(5 * s + 6 * v)


def test_auto_picks_graph_under_a_large_budget_and_recompute_under_a_tiny_one(student):
    big = choose(student, budget=1e3)
    assert (big.mode, big.kept_steps, big.budget_gb) == ("graph", 10, 1e3)
    tiny = choose(student, budget=1e-9)
    assert (tiny.mode, tiny.kept_steps) == ("recompute", 1)


def test_auto_keeps_as_many_graphs_as_fit(student):
    s = choose(student, memory="graph").step_graph_gb
    v = 4 * student.num_params / 1e9
    # room for exactly 6 kept graphs: 6 S + 4 V + S, halfway to 7
    budget = estimate_gb("hybrid", 6, 10, s, v) + 0.5 * (s - v)
    chosen = choose(student, budget=budget)
    assert (chosen.mode, chosen.kept_steps) == ("hybrid", 6)
    assert chosen.estimate_gb <= budget < estimate_gb("hybrid", 7, 10, s, v)


def test_given_modes_are_kept_and_the_default_budget_is_half_the_free_memory(student, monkeypatch):
    assert choose(student, memory="recompute").mode == "recompute"
    assert choose(student, memory="hybrid").kept_steps == 5  # half of syn_steps
    assert choose(student, memory="hybrid", kept_steps=3).kept_steps == 3
    monkeypatch.setattr(unroll_memory, "available_gb", lambda device: (1e-8, "MemAvailable"))
    chosen = choose(student)
    assert chosen.budget_gb == pytest.approx(0.5e-8) and chosen.mode == "recompute"
    text = chosen.describe("auto", 10)
    assert text.startswith("memory auto: recompute, estimated") and "budget" in text


def test_mem_available_is_read_on_this_machine():
    gb, what = unroll_memory.available_gb(CPU)
    assert gb > 0 and what == "MemAvailable"


@pytest.mark.parametrize(
    "memory, budget, kept, message",
    [
        ("lowmem", None, None, r"memory='lowmem' is not one of auto, graph, recompute, hybrid"),
        ("auto", 0.0, None, r"memory_budget_gb=0.0: expected a positive number of GB"),
        ("auto", -2.0, None, r"memory_budget_gb=-2.0: expected a positive"),
        ("hybrid", None, -1, r"hybrid_kept_steps=-1"),
    ],
)
def test_bad_memory_settings_are_user_errors(memory, budget, kept, message):
    with pytest.raises(UserError, match=message):
        check_memory_settings(memory, budget, kept)
