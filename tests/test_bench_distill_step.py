"""scripts/bench/distill_step.py: its mode syntax and one in-process measurement (tiny setting)."""

import importlib.util
from pathlib import Path

import pytest

from utils.io import UserError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    path = ROOT / "scripts/bench/distill_step.py"
    spec = importlib.util.spec_from_file_location("distill_step", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_modes_parse_and_bad_ones_are_refused(bench):
    spec = bench.parse_mode("auto+bf16+cl+budget0.5")
    assert spec == {"memory": "auto", "amp": "bf16", "channels_last": True, "compile": False,
                    "budget_gb": 0.5}  # fmt: skip
    with pytest.raises(UserError, match="unknown 'fp8'"):
        bench.parse_mode("graph+fp8")
    with pytest.raises(UserError, match="'cheap' is not one of auto"):
        bench.parse_mode("cheap")


def test_one_measurement_reports_auto_choice(bench):
    run = {"model": "ConvNetW32", "ipc": 1, "steps": 2, "mode": "auto+budget1e-6", "repeats": 1,
           "warmup": 0, "threads": 1, "device": "cpu"}  # fmt: skip
    result = bench.measure(run)
    assert result["chose"] == "recompute" and result["budget_gb"] == 1e-6
    assert result["cpu_seconds"] > 0 and result["peak_gb"] > 0
