"""scripts/cpu/discussion.sh and scripts/reproduce/discussion.sh end to end at a tiny scale."""

import os
import subprocess
from pathlib import Path

import pytest
from conftest import make_color_image_folder

ROOT = Path(__file__).resolve().parents[1]
TINY = ("--Iteration 1 --eval_it 1 --num_eval 1 --epoch_eval_train 1 --batch_real 4 "
        "--batch_train 4 --max_per_class 12 --model ConvNetW32")  # fmt: skip


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("discussion")
    make_color_image_folder(root / "data", 3, 16, {"train": 12, "test": 4})
    return root / "data"


def run(script, tmp_path, env, *args):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PAD_CACHE_DIR": str(tmp_path / "cache"),
           "DATASET": "ImageFolder", "OUT": str(tmp_path / "out"), "SEEDS": "0",
           "EXTRA": TINY, **env}  # fmt: skip
    done = subprocess.run(["bash", str(ROOT / script), *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return done.stdout


def test_cpu_discussion_writes_the_table_and_the_figure(data, tmp_path):
    env = {"DATA": str(data), "MAX_PER_CLASS": "12", "F1_RATIOS": "0 0.5", "F2_IPCS": "2",
           "F2_RATIOS": "0 0.5"}  # fmt: skip
    out = run("scripts/cpu/discussion.sh", tmp_path, env)
    table = (tmp_path / "out" / "discussion.md").read_text()
    for setting in (
        "GM IPC 1, filter 1, remove hard",
        "DM IPC 1, filter 1, remove hard",
        "GM IPC 2, filter 2, shallow ratio",
        "DM IPC 2, filter 2, shallow ratio",
    ):
        assert table.count(f"| {setting} |") == 2, (setting, table)  # ratios 0 and 0.5
    assert (tmp_path / "out" / "discussion.png").stat().st_size > 0
    assert "figure:" in out
    again = run("scripts/cpu/discussion.sh", tmp_path, env)  # every run is reused
    assert "== f1-" not in again


def test_reproduce_discussion_runs_at_a_tiny_scale(data, tmp_path):
    env = {"MODEL": "ConvNetW32", "GM_CFG": "configs/cpu/gm_dm/FashionMNIST_IPC1_DC.yaml",
           "DM_CFG": "configs/cpu/gm_dm/FashionMNIST_IPC1_DM.yaml",
           "F1_SETTINGS": "1:remove_easy", "F1_RATIOS": "0.5", "F2_IPCS": "",
           "SCORE_ARGS": "--model ConvNetW32 --epochs 1 --repeat 1 --max_per_class 12"}  # fmt: skip
    run("scripts/reproduce/discussion.sh", tmp_path, env, "--data_path", str(data),
        "--device", "cpu")  # fmt: skip
    table = (tmp_path / "out" / "discussion.md").read_text()
    assert "| GM IPC 1, filter 1, remove easy | 0.5 |" in table
    assert "| DM IPC 1, filter 1, remove easy | 0.5 |" in table
