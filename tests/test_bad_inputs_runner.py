"""scripts/bench/bad_inputs.py: the verdict of a case from its exit status and output."""

import importlib.util
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench" / "bad_inputs.py"
spec = importlib.util.spec_from_file_location("bad_inputs", SCRIPT)
bad_inputs = importlib.util.module_from_spec(spec)
sys.modules["bad_inputs"] = bad_inputs  # its dataclass looks itself up there
spec.loader.exec_module(bad_inputs)


def done(code, stderr="", stdout=""):
    return subprocess.CompletedProcess([], code, stdout=stdout, stderr=stderr)


def test_verdicts():
    case = bad_inputs.Case("x", [], expect="lr_img")
    assert bad_inputs.verdict(case, done(2, "error: lr_img=-1.0: expected >= 0\n"))[:2] == (
        True, "clear",
    )  # fmt: skip
    warned = "warning: no sidecar\nerror: lr_img=-1.0: expected\n"
    assert bad_inputs.verdict(case, done(2, warned))[:2] == (True, "clear")
    assert bad_inputs.verdict(case, done(2, "error: other\n"))[:2] == (False, "wrong message")
    assert bad_inputs.verdict(case, done(0, ""))[:2] == (False, "silent")
    assert bad_inputs.verdict(case, done(1, "error: lr_img\n"))[:2] == (False, "exit 1")
    assert bad_inputs.verdict(case, done(2, "error: lr_img\nmore\n"))[:2] == (False, "exit 2")
    trace = "Traceback (most recent call last):\n  File x\nValueError: lr_img\n"
    assert bad_inputs.verdict(case, done(1, trace))[:2] == (False, "traceback")
    fix = bad_inputs.Case("fix", [], expect="starting from iteration 0", ok=True)
    assert bad_inputs.verdict(fix, done(0, stdout="x\nstarting from iteration 0\n"))[:2] == (
        True, "ok",
    )  # fmt: skip
    assert bad_inputs.verdict(fix, done(2, "error: no\n"))[:2] == (False, "exit 2")
