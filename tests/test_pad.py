"""distill/pad.py end to end on a tiny generated ImageFolder data set and hand-made experts."""

import json
import os
import re
import runpy
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_color_image_folder  # noqa: E402

from distill import pad
from utils.config import load_config
from utils.io import UserError, load_pt
from utils.matching import MatchResult, Student
from utils.networks import get_network
from utils.synset import StartEpochSchedule
from utils.trajectory import expert_dir, flatten_params, save_expert_file

ROOT = Path(__file__).resolve().parents[1]
MODEL, SIZE, CLASSES = "ConvNetW32", 16, 3


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A 3-class 16x16 ImageFolder (8 train, 4 test images per class) and a cache folder."""
    root = tmp_path_factory.mktemp("world")
    make_color_image_folder(root / "data", CLASSES, SIZE, {"train": 8, "test": 4})
    return root


@pytest.fixture(autouse=True)
def cache_dir(world, monkeypatch, one_thread):
    monkeypatch.setenv("PAD_CACHE_DIR", str(world / "cache"))


def random_walk_experts(num_experts=2, snapshots=4, seed=0):
    torch.manual_seed(seed)
    experts = []
    for _ in range(num_experts):
        model = get_network(MODEL, 3, CLASSES, (SIZE, SIZE))
        snapshot = [p.detach().clone() for p in model.parameters()]
        expert = [snapshot]
        for _ in range(snapshots - 1):
            expert.append([t + 0.05 * torch.randn_like(t) for t in expert[-1]])
        experts.append(expert)
    return experts


def write_experts(buffer, experts, zca=True):
    folder = expert_dir(buffer, "ImageFolder", MODEL, zca)
    save_expert_file(folder / "replay_buffer_0.pt", experts, {"note": "hand-made"})
    return folder


def argv(world, tmp, **overrides):
    settings = {
        "dataset": "ImageFolder", "data_path": world / "data", "model": MODEL,
        "buffer_path": tmp / "buffer", "out_dir": tmp / "out", "device": "cpu",
        "ipc": 2, "syn_steps": 3, "expert_epochs": 2, "max_start_epoch": 2,
        "Sequential_Generation": False, "Iteration": 4, "eval_it": 2, "epoch_eval_train": 2,
        "num_eval": 1, "batch_syn": 4, "batch_train": 4, "pix_init": "real", "zca": True,
        "lr_img": 10, "lr_y": 2, "depth_ratio": 0.5, "loss_ratio": 0.5, "threshold": 10.0,
        "eval_compile": "false",  # compiling would take minutes here (tests/test_compiled.py)
    }  # fmt: skip
    settings.update(overrides)
    return [token for key, value in settings.items() for token in (f"--{key}", str(value))]


def final_tensors(run_dir):
    checkpoint = load_pt(run_dir / "checkpoint.pt")
    return checkpoint["image_syn"], checkpoint["label_syn"], checkpoint["syn_lr"]


def test_run_writes_the_reference_files(world, tmp_path):
    write_experts(tmp_path / "buffer", random_walk_experts())
    # start window [0, 1) widening to [0, 2) from iteration 2 (1 + int(1 * it / 2))
    summary = pad.main(
        "depth",
        argv(
            world,
            tmp_path,
            Sequential_Generation=True,
            current_max_start_epoch=1,
            expansion_end_epoch=2,
        ),
    )
    run_dir = summary["run_dir"]
    assert run_dir == tmp_path / "out" / "ImageFolder" / "2" / MODEL / "ImageFolder-IPC2-depth-s42"
    normal = run_dir / "Normal"
    for it in (0, 4):  # it 0 (first best) and the last evaluation
        images, labels, lr = (load_pt(normal / f"{k}_{it}.pt") for k in ("images", "labels", "lr"))
        assert images.shape == (CLASSES * 2, 3, SIZE, SIZE) and images.dtype == torch.float32
        assert labels.shape == (CLASSES * 2, CLASSES) and labels.dtype == torch.float32
        assert not labels.requires_grad and lr.shape == () and lr.dtype == torch.float32
        assert load_pt(normal / f"images_zca_{it}.pt").shape == images.shape
        assert (run_dir / f"images_{it}.png").exists()
        assert (run_dir / f"images_clipped_{it}.png").exists()
    for kind in ("images", "labels", "lr"):
        assert (normal / f"{kind}_best.pt").exists()
    assert torch.equal(load_pt(normal / "lr_0.pt"), torch.tensor(0.01))  # lr_teacher at it 0
    assert (run_dir / "loss.png").exists()
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    starts = {r["step"]: r["start_epoch"] for r in records if "start_epoch" in r}
    assert sorted(starts) == [0, 1, 2, 3, 4]
    schedule = StartEpochSchedule(
        0, 2, sequential=True, current_max_start_epoch=1, expansion_end_epoch=2
    )
    assert all(0 <= s < schedule.upper(it) for it, s in starts.items())
    assert starts[0] == starts[1] == 0  # the window is [0, 1) at iterations 0 and 1
    accuracies = [r["step"] for r in records if f"accuracy/{MODEL}" in r]
    assert accuracies == [0, 2, 4]
    saved = load_config(str(run_dir / "config.yaml"))  # the snapshot is a valid config file
    assert saved.Iteration == 4 and saved.model == MODEL
    assert summary["next_iteration"] == 5


def test_resume_after_sigterm_equals_an_uninterrupted_run(world, tmp_path, monkeypatch):
    write_experts(tmp_path / "buffer", random_walk_experts())
    common = {"Iteration": 6, "eval_it": 3}
    whole = pad.main("loss", argv(world, tmp_path, **common, name="whole"))

    calls = []
    real_match = pad.match_trajectory

    def match_then_signal(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # during iteration 2: the run must stop after it
            os.kill(os.getpid(), signal.SIGTERM)
        return real_match(*args, **kwargs)

    monkeypatch.setattr(pad, "match_trajectory", match_then_signal)
    stopped = pad.main("loss", argv(world, tmp_path, **common, name="cut"))
    monkeypatch.setattr(pad, "match_trajectory", real_match)
    assert stopped["stopped_by"] == signal.SIGTERM and stopped["next_iteration"] == 3
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored
    resumed = pad.main("loss", argv(world, tmp_path, **common, name="cut", resume=True))
    assert resumed["next_iteration"] == 7
    for a, b in zip(
        final_tensors(whole["run_dir"]), final_tensors(resumed["run_dir"]), strict=True
    ):
        assert torch.equal(a, b)
    for name in ("images_6.pt", "labels_6.pt", "lr_6.pt"):
        assert torch.equal(
            load_pt(whole["run_dir"] / "Normal" / name),
            load_pt(resumed["run_dir"] / "Normal" / name),
        )
    steps = [
        json.loads(line)["step"]
        for line in (resumed["run_dir"] / "metrics.jsonl").read_text().splitlines()
        if "start_epoch" in line
    ]
    assert steps == list(range(7))  # no iteration logged twice


def test_shorter_run_extended_by_resume_equals_the_longer_run(world, tmp_path):
    write_experts(tmp_path / "buffer", random_walk_experts())
    longer = pad.main(
        "depth", argv(world, tmp_path, Iteration=5, eval_it=10, name="long", memory="graph")
    )
    pad.main("depth", argv(world, tmp_path, Iteration=2, eval_it=10, name="short", memory="graph"))
    extended = pad.main(
        "depth",
        argv(world, tmp_path, Iteration=5, eval_it=10, name="short", memory="graph", resume=True),
    )
    for a, b in zip(
        final_tensors(longer["run_dir"]), final_tensors(extended["run_dir"]), strict=True
    ):
        assert torch.equal(a, b)


def test_samples_predicted_correctly_and_soft_labels_from_hand_made_experts(world, tmp_path):
    # Expert c's last snapshot has zero weights and classifier bias `bias[c]`: it predicts class
    # c for every image. So class c's images come from expert c and their soft labels are exactly
    # bias[c] (the only expert that is right on them).
    model = get_network(MODEL, 3, CLASSES, (SIZE, SIZE))
    bias = [[5.0, 1.0, 0.0], [0.0, 3.0, 1.0], [1.0, 0.0, 2.0]]
    experts = random_walk_experts(num_experts=3)
    for c, expert in enumerate(experts):
        expert[-1] = [torch.zeros_like(p) for p in model.parameters()]
        expert[-1][-1] = torch.tensor(bias[c])
    write_experts(tmp_path / "buffer", experts)
    summary = pad.main(
        "depth",
        argv(
            world, tmp_path, pix_init="samples_predicted_correctly", Iteration=0, max_start_epoch=1
        ),
    )
    labels = load_pt(summary["run_dir"] / "Normal" / "labels_0.pt")
    assert torch.equal(labels, torch.tensor(bias).repeat_interleave(2, dim=0))
    from utils.data import get_dataset

    data = get_dataset("ImageFolder", str(world / "data"), zca=True)
    images = load_pt(summary["run_dir"] / "Normal" / "images_0.pt")
    for i, image in enumerate(images):  # every initial image is a train image of its class
        matches = (data.images_train == image).flatten(1).all(1).nonzero().flatten()
        assert len(matches) == 1 and data.labels_train[matches[0]] == i // 2


def test_noise_images_take_the_first_experts_last_logits_as_labels(world, tmp_path):
    experts = random_walk_experts()
    write_experts(tmp_path / "buffer", experts)
    summary = pad.main("depth", argv(world, tmp_path, pix_init="noise", Iteration=0))
    images = load_pt(summary["run_dir"] / "Normal" / "images_0.pt")
    labels = load_pt(summary["run_dir"] / "Normal" / "labels_0.pt")
    assert abs(images.mean()) < 0.2 and abs(images.std() - 1) < 0.1  # standard normal pixels
    model = get_network(MODEL, 3, CLASSES, (SIZE, SIZE))
    expected = Student(model)(images, flatten_params(experts[0][-1]))
    assert torch.allclose(labels, expected, atol=1e-5)


def test_divergence_stops_with_the_last_good_checkpoint(world, tmp_path, monkeypatch):
    write_experts(tmp_path / "buffer", random_walk_experts())
    real_match = pad.match_trajectory
    calls = []

    def nan_at_iteration_2(*args, **kwargs):
        calls.append(1)
        result = real_match(*args, **kwargs)
        return MatchResult(float("nan"), True) if len(calls) == 3 else result

    monkeypatch.setattr(pad, "match_trajectory", nan_at_iteration_2)
    with pytest.raises(UserError, match=r"diverged at iteration 2.*lower --lr_img \(now 10\)"):
        pad.main("depth", argv(world, tmp_path, checkpoint_it=1, eval_it=100))
    run_dir = tmp_path / "out" / "ImageFolder" / "2" / MODEL / "ImageFolder-IPC2-depth-s42"
    checkpoint = load_pt(run_dir / "checkpoint.pt")
    assert checkpoint["progress"]["next_iteration"] == 2
    assert torch.isfinite(checkpoint["image_syn"]).all()


def test_bad_settings_found_in_process(world, tmp_path):
    write_experts(tmp_path / "buffer", random_walk_experts())
    cases = [
        ({"ipc": 9}, r"ipc=9 but class 0 \(class0\) has only 8"),
        ({"max_start_epoch": 3}, r"max_start_epoch=3 \+ expert_epochs=2.*trained for 3 epochs"),
        ({"memory": "cheap"}, r"memory='cheap' is not one of auto, graph, recompute, hybrid"),
        ({"memory_budget_gb": 0}, r"memory_budget_gb=0.0: expected a positive number of GB"),
        ({"amp": "fp16"}, r"amp='fp16' is unknown: use one of off, bf16"),
        ({"buffer_path": tmp_path / "other"}, "another model or data set"),
    ]
    other = get_network(MODEL, 3, CLASSES + 1, (SIZE, SIZE))  # experts of a 4-class data set
    snapshots = [[p.detach().clone() for p in other.parameters()] for _ in range(4)]
    write_experts(tmp_path / "other", [snapshots])
    for overrides, message in cases:
        with pytest.raises(UserError, match=message):
            pad.main("depth", argv(world, tmp_path, **overrides))
    pad.main("depth", argv(world, tmp_path, Iteration=0, eval_it=5))
    with pytest.raises(UserError, match="already holds a run.*--resume true"):
        pad.main("depth", argv(world, tmp_path, Iteration=0))


def test_script_from_distill_reports_bad_input_in_one_line_with_exit_2(world, tmp_path):
    # the README's way: cd distill && python PAD_depth.py --cfg ...
    command = [sys.executable, "PAD_depth.py", *argv(world, tmp_path), "--cfg", "missing.yaml"]
    env = {**os.environ, "PAD_CACHE_DIR": str(world / "cache"), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=ROOT / "distill", env=env, capture_output=True, text=True)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip() == "error: config file not found: missing.yaml"


def test_script_from_the_root_reports_bad_input_with_exit_2(world, tmp_path, monkeypatch, capsys):
    # python distill/PAD_loss.py from the repository root, run in this process to save a start-up
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "argv", ["distill/PAD_loss.py", *argv(world, tmp_path),
                                      "--loss_ratio", "1.0"])  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path("distill/PAD_loss.py", run_name="__main__")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.match(r"error: loss_ratio=1.0 is outside \[0, 1\)", err[0])


def test_compile_without_a_compiler_is_one_line_and_exit_2(world, tmp_path, monkeypatch, capsys):
    write_experts(tmp_path / "buffer", random_walk_experts())
    monkeypatch.setattr("shutil.which", lambda name: None)  # no g++ on PATH
    monkeypatch.setattr(sys, "argv", ["distill/PAD_depth.py", *argv(world, tmp_path),
                                      "--compile", "true"])  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(ROOT / "distill/PAD_depth.py"), run_name="__main__")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "compile=true on CPU needs a C++ compiler" in err[0], err


def test_auto_prints_its_choice_once(world, tmp_path, capsys):
    write_experts(tmp_path / "buffer", random_walk_experts())
    pad.main("depth", argv(world, tmp_path, Iteration=1, eval_it=5, memory_budget_gb=1e-9))
    out = capsys.readouterr().out
    assert out.count("memory auto: recompute, estimated") == 1


@pytest.mark.parametrize(
    "extra, message",
    [
        (
            [],
            r"no expert files \(replay_buffer_0.pt, ...\) in .*buffer/ImageFolder/ConvNetW32: "
            r"make them with `cd buffer && python buffer_CL.py --dataset=ImageFolder",
        ),
    ],
)
def test_entry_point_errors_exit_2(world, tmp_path, monkeypatch, capsys, extra, message):
    monkeypatch.setattr(sys, "argv", ["PAD_depth.py", *argv(world, tmp_path), *extra])
    with pytest.raises(SystemExit) as exit_info:
        pad.run("depth")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.match(f"error: {message}", err[0]), err


# ---- configs -----------------------------------------------------------------------------------

# docs/paper.md#per-setting-configs: syn_steps, expert_epochs, lr_img, lr_lr, lr_y, batch_syn,
# min/cur/max start, Sequential_Generation, threshold, depth_ratio, eval_it, skip_first_eva
PAPER = {
    "CIFAR-10/ConvIN/IPC1": (80, 2, 100, 1e-7, 5, 1000, 0, None, 4, False, 1.1, 0.0, 500, True),
    "CIFAR-10/ConvIN/IPC10": (80, 2, 100, 1e-5, 2, 500, 0, 10, 20, True, 1.0, 0.5, 500, True),
    "CIFAR-10/ConvIN/IPC50": (80, 3, 1000, 1e-5, 2, 1000, 0, 20, 40, True, 1.0, 0.25, 500, False),
    "CIFAR-10/ConvIN/IPC500": (40, 2, 50, 1e-5, 10, 1000, 40, 60, 70, True, 1.0, 0.5, 1000, False),
    "CIFAR-10/ConvIN/IPC1000": (
        100,
        2,
        50,
        1e-5,
        10,
        1000,
        40,
        None,
        60,
        False,
        1.0,
        0.5,
        1000,
        False,
    ),
    "CIFAR-100/ConvIN/IPC1": (40, 3, 1000, 1e-5, 10, 1000, 0, 20, 30, True, 1.0, 0.5, 500, False),
    "CIFAR-100/ConvIN/IPC10": (80, 2, 1000, 1e-5, 10, 1000, 0, 30, 50, True, 1.0, 0.5, 500, True),
    "CIFAR-100/ConvIN/IPC50": (
        80,
        2,
        1000,
        1e-5,
        10,
        1000,
        20,
        None,
        70,
        False,
        1.0,
        0.0,
        500,
        False,
    ),
    "CIFAR-100/ConvIN/IPC100": (
        80,
        2,
        50,
        1e-5,
        10,
        1000,
        30,
        None,
        70,
        False,
        1.0,
        0.5,
        500,
        True,
    ),
    "TinyImageNet/ConvIN/IPC1": (
        40,
        2,
        10000,
        1e-4,
        10,
        1000,
        0,
        15,
        20,
        True,
        1.0,
        0.5,
        500,
        True,
    ),
    "TinyImageNet/ConvIN/IPC10": (
        40,
        2,
        100,
        1e-4,
        10,
        500,
        10,
        None,
        50,
        False,
        1.0,
        0.5,
        500,
        False,
    ),
    "TinyImageNet/ConvIN/IPC50": (
        20,
        2,
        100,
        1e-4,
        10,
        1000,
        40,
        None,
        70,
        False,
        1.0,
        0.5,
        500,
        True,
    ),
}
KEYS = (
    "syn_steps",
    "expert_epochs",
    "lr_img",
    "lr_lr",
    "lr_y",
    "batch_syn",
    "min_start_epoch",
    "current_max_start_epoch",
    "max_start_epoch",
    "Sequential_Generation",
    "threshold",
    "depth_ratio",
    "eval_it",
    "skip_first_eva",
)


@pytest.mark.parametrize("setting", sorted(PAPER))
def test_paper_configs_match_the_table(setting):
    cfg = load_config(str(ROOT / "configs" / f"{setting}.yaml"))
    for key, value in zip(KEYS, PAPER[setting], strict=True):
        if value is not None:
            assert getattr(cfg, key) == value, key
    assert cfg.loss_ratio == cfg.depth_ratio
    assert (cfg.Iteration, cfg.batch_train, cfg.num_eval, cfg.zca) == (10000, 128, 1, True)
    assert (cfg.lr_teacher, cfg.Momentum_y) == (0.01, 0.9)
    tiny = setting.startswith("Tiny")
    assert cfg.model == ("ConvNetD4" if tiny else "ConvNet") and cfg.res == (64 if tiny else 32)
    expected_init = "real" if setting == "CIFAR-100/ConvIN/IPC50" else "samples_predicted_correctly"
    assert cfg.pix_init == expected_init
    StartEpochSchedule.from_config(cfg).validate(cfg.Iteration)


def test_paper_start_windows():
    # docs/paper.md#per-setting-configs: CIFAR-10 IPC500 [40, 59] -> [40, 69] by iteration 2000
    cfg = load_config(str(ROOT / "configs" / "CIFAR-10/ConvIN/IPC500.yaml"))
    schedule = StartEpochSchedule.from_config(cfg)
    assert (schedule.upper(0), schedule.upper(1000), schedule.upper(2000)) == (60, 65, 70)


def test_cpu_configs_load():
    files = sorted((ROOT / "configs" / "cpu").glob("*.yaml"))
    assert len(files) >= 3
    for path in files:
        cfg = load_config(str(path))
        StartEpochSchedule.from_config(cfg).validate(cfg.Iteration)
        if path.stem.endswith("ConvNetW32"):  # the documented CPU runs pin the device
            assert cfg.device == "cpu" and cfg.model == "ConvNetW32"
