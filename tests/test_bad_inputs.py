"""The failures of docs/algorithms.md#divergence-guard and docs/formats.md#provenance-checks,
each on tiny generated data: divergence, experts of other settings, unwritable outputs, load
errors, resuming before the first checkpoint, two runs on the same outputs, smaller checks."""

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_color_image_folder

from distill import pad
from utils.io import UserError, load_pt
from utils.networks import get_network
from utils.trajectory import expert_dir, list_expert_files, save_expert_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "buffer"))
sys.path.insert(0, str(ROOT / "distill"))

import buffer_CL  # noqa: E402

MODEL, SIZE, CLASSES = "ConvNetW32", 16, 3
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A 3-class 16x16 ImageFolder (8 train, 4 test images per class)."""
    root = tmp_path_factory.mktemp("bad_inputs")
    make_color_image_folder(root / "data", CLASSES, SIZE, {"train": 8, "test": 4})
    return root


@pytest.fixture(autouse=True)
def cache(world, monkeypatch):
    monkeypatch.setenv("PAD_CACHE_DIR", str(world / "cache"))


def subprocess_env(world) -> dict:
    return {
        **os.environ, "PAD_CACHE_DIR": str(world / "cache"), "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
    }  # fmt: skip


def random_walk_experts(num_experts=2, snapshots=4, seed=0):
    torch.manual_seed(seed)
    experts = []
    for _ in range(num_experts):
        model = get_network(MODEL, 3, CLASSES, (SIZE, SIZE))
        expert = [[p.detach().clone() for p in model.parameters()]]
        for _ in range(snapshots - 1):
            expert.append([t + 0.05 * torch.randn_like(t) for t in expert[-1]])
        experts.append(expert)
    return experts


def write_experts(buffer, experts=None, zca=False, meta=None):
    folder = expert_dir(buffer, "ImageFolder", MODEL, zca)
    save_expert_file(folder / "replay_buffer_0.pt", experts or random_walk_experts(), meta or {})
    return folder


def pad_argv(world, tmp, **overrides):
    settings = {
        "dataset": "ImageFolder", "data_path": world / "data", "model": MODEL,
        "buffer_path": tmp / "buffer", "out_dir": tmp / "out", "device": "cpu",
        "ipc": 2, "syn_steps": 3, "expert_epochs": 2, "max_start_epoch": 2,
        "Sequential_Generation": False, "Iteration": 4, "eval_it": 100, "epoch_eval_train": 2,
        "num_eval": 1, "batch_syn": 4, "batch_train": 4, "pix_init": "real", "zca": False,
        "lr_img": 10, "lr_y": 2, "depth_ratio": 0.5, "threshold": 10.0,
    }  # fmt: skip
    settings.update(overrides)
    return [token for key, value in settings.items() for token in (f"--{key}", str(value))]


def run_dir_of(tmp):
    return tmp / "out" / "ImageFolder" / "2" / MODEL / "ImageFolder-IPC2-depth-s42"


def buffer_argv(world, buffer, *extra):
    return [
        "--dataset", "ImageFolder", "--data_path", str(world / "data"), "--model", MODEL,
        "--buffer_path", str(buffer), "--train_epochs", "2", "--num_experts", "2",
        "--save_interval", "2", "--batch_train", "8", "--rho_max", "0.01", "--rho_min", "0.01",
        "--device", "cpu", "--test_every", "0", *extra,
    ]  # fmt: skip


# ---- 1. divergence -----------------------------------------------------------------------------


def test_diverging_experts_are_never_written(world, tmp_path):
    buffer = tmp_path / "buffer"
    args = buffer_CL.parse_args(buffer_argv(world, buffer, "--lr_teacher", "1e8"))
    with pytest.raises(UserError, match=r"expert training diverged at expert 0, epoch \d+: .*"
                       r"lower --lr_teacher \(now 1e\+08\)"):  # fmt: skip
        buffer_CL.main(args)
    folder = expert_dir(buffer, "ImageFolder", MODEL, False)
    assert not list(folder.glob("*.pt")) and not list(folder.glob(".*.pt"))
    # the advice is accepted: the same folder with a lower rate trains and writes the file
    buffer_CL.main(buffer_CL.parse_args(buffer_argv(world, buffer, "--lr_teacher", "0.01")))
    assert len(list_expert_files(folder)) == 1


def test_exploding_images_stop_the_distillation(world, tmp_path):
    write_experts(tmp_path / "buffer")
    expected = (
        r"distillation diverged at iteration 0: the synthetic images reach .* beyond the sane "
        r"bound 10000; .*--lr_img \(now 1e\+12\)"
    )
    with pytest.raises(UserError, match=expected):
        pad.main("depth", pad_argv(world, tmp_path, lr_img=1e12))
    normal = run_dir_of(tmp_path) / "Normal"
    saved = list(normal.glob("*.pt"))  # only the initial set of iteration 0's evaluation
    assert saved and all(load_pt(path).abs().max() < 1e4 for path in saved)
    with pytest.raises(UserError, match=r"soft labels reach .*--lr_y \(now 1e\+12\)"):
        pad.main("depth", pad_argv(world, tmp_path, lr_y=1e12, resume="true"))


def test_a_run_of_skipped_iterations_stops(world, tmp_path):
    write_experts(tmp_path / "buffer")
    with pytest.raises(UserError, match=r"diverged at iteration 2: 3 consecutive iterations "
                       r"skipped their update.*threshold"):  # fmt: skip
        pad.main("depth", pad_argv(world, tmp_path, threshold=1e-9, max_skipped=3))


def test_divergence_advice_is_accepted(world, tmp_path):
    write_experts(tmp_path / "buffer")
    with pytest.raises(UserError) as info:
        pad.main("depth", pad_argv(world, tmp_path, lr_teacher=1e6))
    message = str(info.value)
    assert "iteration 0" in message and "--lr_teacher (now 1e+06)" in message
    assert "--resume true" in message and "lr_img" not in message
    summary = pad.main("depth", pad_argv(world, tmp_path, lr_teacher=0.01, resume="true"))
    assert summary["next_iteration"] == 5
    with pytest.raises(UserError, match=r"lr_teacher=0.0: expected a learning rate > 0"):
        pad.main("depth", pad_argv(world, tmp_path / "b", lr_teacher=0))


def rank_difficulty_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "rank_difficulty", ROOT / "buffer" / "rank_difficulty.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


rank_difficulty = rank_difficulty_module()


def rank_argv(world, out, *extra):
    return [
        "--dataset", "ImageFolder", "--data_path", str(world / "data"), "--model", MODEL,
        "--epochs", "2", "--repeat", "1", "--batch", "8", "--lr", "0.01", "--device", "cpu",
        "--out", str(out), "--name", "tiny", *extra,
    ]  # fmt: skip


def test_diverging_difficulty_scores_stop_at_the_epoch(world, tmp_path):
    args = rank_difficulty.parse_args(rank_argv(world, tmp_path, "--lr", "1e12"))
    with pytest.raises(UserError, match=r"difficulty scoring diverged at repeat 0, epoch \d: .*"
                       r"--lr \(now 1e\+12\)"):  # fmt: skip
        rank_difficulty.main(args)
    assert not list(tmp_path.glob("tiny*"))


# ---- 2. provenance -----------------------------------------------------------------------------

EXPERT_SETTINGS = {"format": "pad-replay-buffer/1", "settings": {
    "dataset": "ImageFolder", "subset": "imagenette", "res": 32, "model": MODEL, "zca": False,
    "max_per_class": None,
}}  # fmt: skip


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"zca": True}, r"made with zca=False \(its sidecar replay_buffer_0.json\), this run has "
         r"zca=True"),
        ({"max_per_class": 6}, r"made with max_per_class=None .* this run has max_per_class=6"),
    ],
)  # fmt: skip
def test_experts_of_other_settings_are_refused(world, tmp_path, overrides, message):
    write_experts(tmp_path / "buffer", meta=EXPERT_SETTINGS)
    write_experts(tmp_path / "buffer", meta=EXPERT_SETTINGS, zca=True)  # same folder here
    with pytest.raises(UserError, match=message):
        pad.main("depth", pad_argv(world, tmp_path, **overrides))


def test_experts_without_sidecar_are_accepted_with_a_warning(world, tmp_path):
    folder = write_experts(tmp_path / "buffer")
    (folder / "replay_buffer_0.json").unlink()  # like the authors' files
    with pytest.warns(UserWarning, match="has no sidecar replay_buffer_0.json.*accepted unchecked"):
        pad.main("depth", pad_argv(world, tmp_path, Iteration=0))


def test_index_file_of_other_settings_is_refused(world, tmp_path):
    indices = tmp_path / "indices"
    rank_difficulty.main(rank_difficulty.parse_args(rank_argv(world, indices, "--epochs", "0")))
    argv = buffer_argv(world, tmp_path / "buffer", "--sort_method", str(indices / "tiny.pt"))
    with pytest.raises(UserError, match=r"tiny.pt was made with max_per_class=None \(its sidecar "
                       r"tiny.json\), this run has max_per_class=6"):  # fmt: skip
        buffer_CL.main(buffer_CL.parse_args(argv + ["--max_per_class", "6"]))
    # scores of ZCA-free inputs still rank the same images: a warning, not a refusal
    with pytest.warns(UserWarning, match="made with zca=False"):
        buffer_CL.main(buffer_CL.parse_args(argv + ["--zca", "true", "--num_experts", "1"]))


def test_evaluation_of_a_set_from_other_settings_is_refused(world, tmp_path):
    import evaluation

    write_experts(tmp_path / "buffer", meta=EXPERT_SETTINGS)
    run_dir = pad.main("depth", pad_argv(world, tmp_path, Iteration=0))["run_dir"]
    normal = run_dir / "Normal"
    argv = [
        "--dataset", "ImageFolder", "--data_path", str(world / "data"), "--model", MODEL,
        "--data_dir", str(normal / "images_0.pt"), "--label_dir", str(normal / "labels_0.pt"),
        "--lr_dir", str(normal / "lr_0.pt"), "--num_eval", "1", "--epoch_eval_train", "1",
        "--device", "cpu", "--zca", "true",
    ]  # fmt: skip
    with pytest.raises(UserError, match=r"made with zca=False \(its sidecar config.yaml\)"):
        evaluation.main(evaluation.parse_args(argv))


# ---- 3. unwritable outputs, ranges -------------------------------------------------------------


def test_output_paths_that_are_files_are_refused_before_any_compute(world, tmp_path, monkeypatch):
    import evaluation

    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    write_experts(tmp_path / "buffer", meta=EXPERT_SETTINGS)

    def no_data(*args, **kwargs):
        raise AssertionError("the data set was loaded before the output path was checked")

    for module in (pad, buffer_CL, rank_difficulty, evaluation):
        monkeypatch.setattr(module, "get_dataset", no_data)
    with pytest.raises(UserError, match=r"--out_dir .*a_file.*a_file is a file"):
        pad.main("depth", pad_argv(world, tmp_path, out_dir=blocker))
    with pytest.raises(UserError, match=r"--buffer_path .*a_file is a file"):
        buffer_CL.main(buffer_CL.parse_args(buffer_argv(world, blocker)))
    with pytest.raises(UserError, match=r"--out .*a_file is a file"):
        rank_difficulty.main(rank_difficulty.parse_args(rank_argv(world, blocker / "sub")))
    images = tmp_path / "images.pt"
    torch.save(torch.zeros(6, 3, SIZE, SIZE), images)
    torch.save(torch.arange(6) % 3, tmp_path / "labels.pt")
    argv = [
        "--dataset", "ImageFolder", "--data_path", str(world / "data"), "--model", MODEL,
        "--data_dir", str(images), "--label_dir", str(tmp_path / "labels.pt"), "--lr_net", "0.01",
        "--num_eval", "1", "--epoch_eval_train", "1", "--device", "cpu",
    ]  # fmt: skip
    with pytest.raises(UserError, match=r"--out .*a_file is a file"):
        evaluation.main(evaluation.parse_args([*argv, "--out", str(blocker / "eval.json")]))


def test_an_oserror_at_write_time_is_one_line_naming_the_path(tmp_path, monkeypatch):
    from utils import io

    def disk_full(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(io.os, "replace", disk_full)
    with pytest.raises(UserError, match=r"cannot write .*x.pt: No space left on device"):
        io.save_pt(torch.zeros(2), tmp_path / "x.pt")
    assert not list(tmp_path.iterdir())  # and no temporary file stays


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"lr_img": -1}, r"lr_img=-1.0: expected a learning rate >= 0"),
        ({"lr_lr": -1e-5}, r"lr_lr=-1e-05: expected a learning rate >= 0"),
        ({"lr_y": -2}, r"lr_y=-2.0: expected"),
        ({"Momentum_y": 5}, r"Momentum_y=5.0: expected a momentum in \[0, 1\)"),
        ({"threshold": -1}, r"threshold=-1.0: expected a matching loss >= 0"),
        ({"max_skipped": 0}, r"max_skipped=0: expected at least 1"),
    ],
)
def test_rates_and_momenta_are_range_checked(world, tmp_path, overrides, message):
    with pytest.raises(UserError, match=message):
        pad.main("depth", pad_argv(world, tmp_path, **overrides))


def test_partial_files_of_foreign_content_name_the_file(world, tmp_path):
    out = tmp_path / "indices"
    args = rank_difficulty.parse_args(rank_argv(world, out, "--epochs", "0"))
    data = rank_difficulty.get_dataset("ImageFolder", str(world / "data"))
    config = rank_difficulty.scoring_config(args, data)
    saved = rank_difficulty.partial_file(out / ".tiny.partial", 0, config)
    saved.parent.mkdir(parents=True)
    torch.save(torch.zeros(3), saved)
    with pytest.raises(UserError, match=r"repeat_0-.*\.pt is not a partial score file.*delete it"):
        rank_difficulty.main(args)
    folder = expert_dir(tmp_path / "buffer", "ImageFolder", MODEL, False)
    folder.mkdir(parents=True)
    torch.save(torch.zeros(3), folder / ".replay_buffer_0.partial_0.pt")
    with pytest.raises(UserError, match=r"partial_0.pt is not a partial expert.*delete it"):
        buffer_CL.main(buffer_CL.parse_args(buffer_argv(world, tmp_path / "buffer")))


# ---- 4. load errors ----------------------------------------------------------------------------


class Malicious:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_load_errors_name_the_file_and_the_real_cause(tmp_path):
    import pickle

    from utils.io import load_pt

    torch.save({"a": torch.zeros(100)}, tmp_path / "good.pt")
    whole = (tmp_path / "good.pt").read_bytes()
    marker = tmp_path / "ran"
    files = {
        "empty.pt": (b"", r"is empty \(0 bytes\)"),
        "truncated.pt": (whole[: len(whole) // 2], r"is truncated or damaged"),
        "random.pt": (
            bytes(range(7, 255)),
            r"is not a file written by torch.save \(it starts with",
        ),
        "text.pt": (b"hello world", r"is not a file written by torch.save"),
        "pickle.pt": (pickle.dumps(Malicious(marker)), r"holds objects other than tensors"),
    }
    for name, (content, _) in files.items():
        (tmp_path / name).write_bytes(content)
    torch.save(Malicious(marker), tmp_path / "malicious.pt")
    files["malicious.pt"] = (None, r"holds objects other than tensors \(posix.system\)")
    for name, (_, cause) in files.items():
        with pytest.raises(UserError) as info:
            load_pt(tmp_path / name, what="expert file")
        message = str(info.value)
        assert message.startswith(f"cannot read expert file {tmp_path / name}: "), message
        assert re.search(cause, message), message
        assert "weights_only" not in message and "\n" not in message, message
    assert not marker.exists()  # nothing in a file ever runs


# ---- 5. an interruption before the first checkpoint ------------------------------------------


def run_tensors(run_dir):
    normal = run_dir / "Normal"
    files = {p.name: load_pt(p) for p in sorted(normal.glob("*.pt"))}
    checkpoint = load_pt(run_dir / "checkpoint.pt")
    return files, [checkpoint[k] for k in ("image_syn", "label_syn", "syn_lr")]


def test_kill_before_the_first_checkpoint_then_resume_equals_an_uninterrupted_run(world, tmp_path):
    write_experts(tmp_path / "buffer", meta=EXPERT_SETTINGS)
    settings = {"Iteration": 20, "eval_it": 10, "checkpoint_it": 1000}
    command = [sys.executable, str(ROOT / "distill" / "PAD_depth.py"),
               *pad_argv(world, tmp_path, **settings)]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                               text=True, env=subprocess_env(world), cwd=ROOT)  # fmt: skip
    for line in process.stdout:
        if line.startswith("[it 0]"):
            break
    process.send_signal(signal.SIGKILL)
    process.wait()
    run_dir = run_dir_of(tmp_path)
    assert not (run_dir / "checkpoint.pt").exists(), "killed too late: the run got to its end"
    assert (run_dir / "metrics.jsonl").exists()
    with pytest.raises(UserError, match="start it again from iteration 0 with --resume true"):
        pad.main("depth", pad_argv(world, tmp_path, **settings))  # a plain rerun says how
    summary = pad.main("depth", pad_argv(world, tmp_path, **settings, resume="true"))
    assert summary["next_iteration"] == 21
    other = tmp_path / "uninterrupted"
    pad.main("depth", pad_argv(world, other, **settings, buffer_path=tmp_path / "buffer"))
    files, final = run_tensors(run_dir)
    files_other, final_other = run_tensors(run_dir_of(other))
    assert sorted(files) == sorted(files_other)
    for name in files:
        assert torch.equal(files[name], files_other[name]), name
    for a, b in zip(final, final_other, strict=True):
        assert torch.equal(a, b)
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").open()]
    steps_other = [
        json.loads(line)["step"] for line in (run_dir_of(other) / "metrics.jsonl").open()
    ]
    assert steps == steps_other  # the killed run's lines are gone, none twice


# ---- 6. two processes on the same outputs ------------------------------------------------------

HOLD = """
import sys, time
sys.path.insert(0, sys.argv[1])
from utils.locks import hold_lock
with hold_lock(sys.argv[2], "test"):
    print("held", flush=True)
    time.sleep(120)
"""


def hold_in_another_process(lock):
    lock.parent.mkdir(parents=True, exist_ok=True)
    process = subprocess.Popen([sys.executable, "-c", HOLD, str(ROOT), str(lock)],
                               stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert process.stdout.readline().strip() == "held"
    return process


def test_a_second_process_on_the_same_outputs_stops_naming_the_holder(world, tmp_path):
    write_experts(tmp_path / "buffer", meta=EXPERT_SETTINGS)
    run_dir = run_dir_of(tmp_path)
    locks = {
        "pad": run_dir / ".lock",
        "buffer": expert_dir(tmp_path / "buffer2", "ImageFolder", MODEL, False) / ".lock",
        "rank": tmp_path / "indices" / ".tiny.lock",
    }
    holders = {name: hold_in_another_process(lock) for name, lock in locks.items()}
    try:
        for name, call in (
            ("pad", lambda: pad.main("depth", pad_argv(world, tmp_path, Iteration=0))),
            ("buffer", lambda: buffer_CL.main(buffer_CL.parse_args(
                buffer_argv(world, tmp_path / "buffer2")))),
            ("rank", lambda: rank_difficulty.main(rank_difficulty.parse_args(
                rank_argv(world, tmp_path / "indices")))),
        ):  # fmt: skip
            pid = holders[name].pid
            with pytest.raises(UserError, match=rf"in use by process {pid} on .*\.lock"):
                call()
    finally:
        for process in holders.values():
            process.kill()
            process.wait()
    assert not (run_dir / "metrics.jsonl").exists()  # stopped before writing anything
    # the holders died by SIGKILL: their lock files stay, and are taken over with a warning
    assert locks["pad"].exists()
    pid = holders["pad"].pid
    with pytest.warns(UserWarning, match=rf"stale lock .* of process {pid} on .*no longer running"):
        pad.main("depth", pad_argv(world, tmp_path, Iteration=0))
    assert not locks["pad"].exists()  # a clean exit removes it


# ---- 7. smaller items --------------------------------------------------------------------------


def test_unknown_data_set_is_named_before_looking_for_experts(world, tmp_path):
    with pytest.raises(
        UserError, match=r"unknown data set 'ImageFolderr' \(did you mean ImageFolder"
    ):
        pad.main("depth", pad_argv(world, tmp_path, dataset="ImageFolderr"))


def test_nan_experts_name_the_file(world, tmp_path):
    experts = random_walk_experts()
    for expert in experts:
        for snapshot in expert:
            snapshot[0].fill_(float("nan"))
    folder = write_experts(tmp_path / "buffer", experts, meta=EXPERT_SETTINGS)
    with pytest.raises(UserError, match=rf"expert file {folder / 'replay_buffer_0.pt'} holds "
                       "non-finite parameters"):  # fmt: skip
        pad.main("depth", pad_argv(world, tmp_path))


def test_buffer_metrics_hold_each_epoch_once_after_an_interrupted_expert(
    world, tmp_path, monkeypatch
):
    buffer = tmp_path / "buffer"
    argv = buffer_argv(world, buffer, "--num_experts", "2", "--save_interval", "1")
    real_epoch, calls = buffer_CL.train_epoch, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:  # expert 1, epoch 1: its epoch 0 is logged already
            raise KeyboardInterrupt
        return real_epoch(*args, **kwargs)

    monkeypatch.setattr(buffer_CL, "train_epoch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        buffer_CL.main(buffer_CL.parse_args(argv))
    monkeypatch.setattr(buffer_CL, "train_epoch", real_epoch)
    buffer_CL.main(buffer_CL.parse_args(argv))
    folder = expert_dir(buffer, "ImageFolder", MODEL, False)
    records = [json.loads(line) for line in (folder / "metrics.jsonl").open()]
    assert [(r["expert"], r["epoch"]) for r in records] == [(0, 0), (0, 1), (1, 0), (1, 1)]


def test_no_empty_partial_folder_stays(world, tmp_path):
    out = tmp_path / "indices"
    stale = out / ".tiny.partial" / ".repeat_0-0123456789ab.pt.k1ll3d.tmp"  # a write cut by a kill
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"PK")
    with pytest.raises(UserError, match="diverged"):
        rank_difficulty.main(rank_difficulty.parse_args(rank_argv(world, out, "--lr", "1e12")))
    assert list(out.iterdir()) == []
