"""distill/evaluation.py on a tiny generated ImageFolder data set (3 classes, 16x16)."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_color_image_folder  # noqa: E402

from distill import evaluation
from utils.io import UserError
from utils.scores import SCORE_ROWS, robust_scores

ROOT = Path(__file__).resolve().parents[1]
CLASSES, SIZE = 3, 16
MODEL_FIELDS = {"accs", "mean", "std", "epochs", "lr", "batch", "seed", "device", "seconds", "mode"}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The data set, and a distilled set saved the way the authors' code saves it."""
    root = tmp_path_factory.mktemp("eval_world")
    make_color_image_folder(root / "data", CLASSES, SIZE, {"train": 5, "test": 3})
    normal = root / "Normal"
    normal.mkdir()
    torch.save(torch.randn(6, 3, SIZE, SIZE, requires_grad=True), normal / "images_best.pt")
    torch.save(torch.randn(6, CLASSES, requires_grad=True), normal / "labels_best.pt")
    torch.save(torch.tensor(0.02, requires_grad=True), normal / "lr_best.pt")
    return root


@pytest.fixture(autouse=True)
def cache_dir(world, monkeypatch, one_thread):
    monkeypatch.setenv("PAD_CACHE_DIR", str(world / "cache"))


def base_args(world, *extra):
    return ["--dataset", "ImageFolder", f"--data_path={world / 'data'}", "--epoch_eval_train=2",
            "--num_eval=2", "--models=ConvNetW32", "--batch_train=4", *extra]  # fmt: skip


def set_args(world, *extra):
    normal = world / "Normal"
    return base_args(world, f"--data_dir={normal / 'images_best.pt'}",
                     f"--label_dir={normal / 'labels_best.pt'}", *extra)  # fmt: skip


def test_readme_command_from_distill_folder(world):
    """The README's flags, run from distill/, on files saved like the authors' (requires_grad,
    0-d lr); the JSON lands next to the images with the documented fields."""
    normal = world / "Normal"
    args = set_args(world, f"--lr_dir={normal / 'lr_best.pt'}", "--zca")
    env = {"PAD_CACHE_DIR": str(world / "cache"), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin"}
    done = subprocess.run([sys.executable, "evaluation.py", *args], cwd=ROOT / "distill",
                          env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert re.search(r"^ConvNetW32: \d+\.\d\d \+- \d+\.\d\d over 2 networks \(sequential, \d+ s\)$",
                     done.stdout, re.MULTILINE), done.stdout  # fmt: skip
    record = json.loads((normal / "eval_best.json").read_text())
    assert record["label_type"] == "soft" and record["zca"] is True
    assert record["num_images"] == 6 and record["num_eval"] == 2
    result = record["models"]["ConvNetW32"]
    assert set(result) == MODEL_FIELDS
    assert len(result["accs"]) == 2 and result["epochs"] == 2 and result["batch"] == 4
    assert result["lr"] == pytest.approx(0.02) and result["seed"] == 0
    assert result["device"] == "cpu" and result["mode"] == "sequential"
    for acc in result["accs"]:  # 9 test images
        assert acc * 9 / 100 == pytest.approx(round(acc * 9 / 100))


def test_bad_input_is_one_line_and_exit_2(world, tmp_path):
    broken = tmp_path / "lr_best.pt"
    broken.write_bytes(b"not a tensor file")
    script = str(ROOT / "distill" / "evaluation.py")
    done = subprocess.run(
        [sys.executable, script, *set_args(world, f"--lr_dir={broken}")],
        env={"PAD_CACHE_DIR": str(world / "cache"), "PATH": "/usr/bin"},
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot read learning rate file")
    assert str(broken) in lines[0]


def test_random_baseline_with_hard_labels_and_out_folder(world, tmp_path):
    out = tmp_path / "results"
    out.mkdir()
    args = evaluation.parse_args(base_args(world, "--random_ipc=2", f"--out={out}", "--seed=3",
                                           "--batched=false"))  # fmt: skip
    record = evaluation.main(args)
    written = json.loads((out / "eval_random_ipc2_ImageFolder.json").read_text())
    assert written == json.loads(json.dumps(record))
    assert written["label_type"] == "hard" and written["num_images"] == 2 * CLASSES
    result = written["models"]["ConvNetW32"]
    assert result["lr"] == 0.01 and result["mode"] == "sequential" and result["seed"] == 3


def test_lr_net_and_eval_mode_pool(world, tmp_path, monkeypatch):
    captured = {}

    def fake_evaluate_models(names, images, labels, lr, data, **kwargs):
        captured.update(names=names, lr=lr, labels=labels, kwargs=kwargs)
        return []

    monkeypatch.setattr(evaluation, "evaluate_models", fake_evaluate_models)
    hard = tmp_path / "hard.pt"
    torch.save(torch.tensor([0, 1, 2, 0, 1, 2]), hard)
    normal = world / "Normal"
    args = [
        "--dataset", "ImageFolder", f"--data_path={world / 'data'}", "--model=ConvNetD4BN",
        "--eval_mode=C", f"--data_dir={normal / 'images_best.pt'}", f"--label_dir={hard}",
        "--lr_net=0.3", "--amp=bf16", f"--out={tmp_path / 'x.json'}",
    ]  # fmt: skip
    evaluation.main(evaluation.parse_args(args))
    assert captured["names"] == ["ConvNetD4BN", "ConvNet"]
    assert captured["lr"] == 0.3 and captured["labels"].dtype == torch.int64
    assert captured["kwargs"]["amp"] == "bf16" and captured["kwargs"]["num_eval"] == 5
    assert captured["kwargs"]["epochs"] == 1000 and captured["kwargs"]["batch_train"] == 128
    assert (tmp_path / "x.json").exists()


def test_each_bad_input_is_a_user_error(world, tmp_path):
    normal = world / "Normal"
    images, labels = normal / "images_best.pt", normal / "labels_best.pt"

    def saved(name, value):
        torch.save(value, tmp_path / name)
        return tmp_path / name

    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"\x00" * 10)
    lr = f"--lr_dir={normal / 'lr_best.pt'}"
    cases = [
        ([f"--data_dir={tmp_path / 'missing.pt'}", f"--label_dir={labels}", lr], "not found"),
        ([f"--data_dir={corrupt}", f"--label_dir={labels}", lr], "cannot read images file"),
        ([f"--data_dir={images}", f"--label_dir={corrupt}", lr], "cannot read labels file"),
        ([f"--data_dir={images}", f"--label_dir={labels}", f"--lr_dir={tmp_path / 'no.pt'}"],
         "not found"),
        ([f"--data_dir={saved('i28.pt', torch.randn(6, 3, 28, 28))}", f"--label_dir={labels}", lr],
         "3x16x16"),
        ([f"--data_dir={images}", f"--label_dir={saved('l5.pt', torch.randn(5, CLASSES))}", lr],
         r"expected \[6, 3\]"),
        ([f"--data_dir={images}", f"--label_dir={saved('l4.pt', torch.randn(6, 4))}", lr],
         r"expected \[6, 3\]"),
        ([f"--data_dir={images}", f"--label_dir={labels}", "--lr_net=0"], "positive finite"),
        ([f"--data_dir={images}", f"--label_dir={labels}",
          f"--lr_dir={saved('nan.pt', torch.tensor(float('nan')))}"], "positive finite"),
        ([f"--data_dir={images}", f"--label_dir={labels}", lr, "--models=ConvNet,ResNet19"],
         "ResNet19"),
        ([f"--data_dir={images}", f"--label_dir={labels}", lr, "--eval_mode=Z"], "eval_mode 'Z'"),
        ([f"--data_dir={images}", f"--label_dir={labels}", lr, "--lr_net=0.1"], "exactly one"),
        ([f"--data_dir={images}", lr], "--label_dir missing"),
        (["--random_ipc=2", f"--data_dir={images}"], "drop --data_dir"),
        (["--random_ipc=9"], "random_ipc=9"),
    ]  # fmt: skip
    for extra, message in cases:
        args = ["--dataset", "ImageFolder", f"--data_path={world / 'data'}", "--epoch_eval_train=1",
                f"--out={tmp_path}", *extra]  # fmt: skip
        if "--models" not in " ".join(extra):
            args.append("--model=ConvNetW32")
        with pytest.raises(UserError, match=message):
            evaluation.main(evaluation.parse_args(args))
    assert not list(tmp_path.glob("eval_*.json"))  # nothing trained, nothing written


# ---- --scores and Table 2 (docs/evaluation.md) -------------------------------------------------


def test_scores_end_to_end_with_a_trained_then_cached_full_accuracy(world, tmp_path, capsys):
    args = set_args(world, "--lr_net=0.02", "--scores", f"--out={tmp_path / 's.json'}")
    record = evaluation.main(evaluation.parse_args(args))
    scores = record["scores"]["ConvNetW32"]
    accs = scores["accuracies"]
    assert set(accs) == set(SCORE_ROWS) and all(len(a["accs"]) == 2 for a in accs.values())
    assert accs["random"] == accs["random_hard"]  # real images: one evaluation with hard labels
    assert accs["syn"]["accs"] == record["models"]["ConvNetW32"]["accs"]
    assert record["random"]["ConvNetW32"]["accs"] == accs["random"]["accs"]
    assert scores["full_accuracy_source"].startswith("trained (2 epochs")
    # a second computation of the scores from the recorded accuracies
    expected = robust_scores({row: a["accs"] for row, a in accs.items()}, scores["full_accuracy"])
    for key in ("hlr", "ior", "lrs", "ars"):
        assert scores[key]["values"] == pytest.approx(expected[key]["values"])
        assert scores[key]["mean"] == pytest.approx(expected[key]["mean"])
        assert 0 <= scores["lrs"]["mean"] <= 1 and 0 <= scores["ars"]["mean"] <= 1
    written = json.loads((tmp_path / "s.json").read_text())
    assert written["scores"]["ConvNetW32"]["lrs"]["mean"] == pytest.approx(scores["lrs"]["mean"])
    out = capsys.readouterr().out
    assert "hard labels, augmentation" in out and "LRS" in out and "ARS" in out
    # the full-data accuracy is trained once: the second run reads it from the cache
    again = evaluation.main(evaluation.parse_args(args))["scores"]["ConvNetW32"]
    assert again["full_accuracy"] == scores["full_accuracy"]
    assert again["full_accuracy_source"].startswith("cached")
    given = set_args(world, "--lr_net=0.02", "--scores", "--full_accuracy=90",
                     f"--out={tmp_path / 'g.json'}")  # fmt: skip
    record = evaluation.main(evaluation.parse_args(given))["scores"]["ConvNetW32"]
    assert record["full_accuracy"] == 90 and record["full_accuracy_source"] == "given"
    syn_hard = record["accuracies"]["syn_hard"]["accs"]
    assert record["hlr"]["values"] == pytest.approx([0.9 - a / 100 for a in syn_hard])


def test_hard_label_row_trains_on_the_argmax_of_the_soft_labels(world, monkeypatch):
    calls = []

    def fake_evaluate_models(names, images, labels, lr, data, **kwargs):
        calls.append((labels.clone(), lr, kwargs["dsa_strategy"]))
        return []

    monkeypatch.setattr(evaluation, "evaluate_models", fake_evaluate_models)
    args = evaluation.parse_args(set_args(world, "--lr_net=0.02"))
    evaluation.score_rows(args, [], torch.zeros(6, 3, SIZE, SIZE), torch.eye(3).repeat(2, 1) * 4,
                          0.02, evaluation.get_dataset("ImageFolder", str(world / "data")),
                          torch.device("cpu"))  # fmt: skip
    (syn, syn_hard, random, syn_naug, random_naug) = calls
    assert syn[0].is_floating_point() and syn_hard[0].tolist() == [0, 1, 2, 0, 1, 2]
    assert random[1] == 0.01 and random[0].tolist() == [0, 0, 1, 1, 2, 2]
    assert syn_naug[2] == "none" and random_naug[2] == "none" and syn[2] != "none"


@pytest.mark.parametrize("value", ["0", "100.5", "-3"])
def test_full_accuracy_outside_0_100_is_one_line_and_exit_2(world, value):
    script = str(ROOT / "distill" / "evaluation.py")
    args = set_args(world, "--lr_net=0.02", "--scores", f"--full_accuracy={value}")
    env = {"PAD_CACHE_DIR": str(world / "cache"), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin"}
    done = subprocess.run([sys.executable, script, *args], env=env, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and re.match(
        r"error: --full_accuracy .* is outside \(0, 100\]", lines[0]
    )


def test_pool_prints_and_writes_table_2_with_the_gain_over_random(world, tmp_path, capsys):
    normal = world / "Normal"
    args = ["--dataset", "ImageFolder", f"--data_path={world / 'data'}", "--epoch_eval_train=1",
            "--num_eval=1", "--batch_train=4", "--eval_mode=W", "--lr_net=0.02",
            f"--data_dir={normal / 'images_best.pt'}", f"--label_dir={normal / 'labels_best.pt'}",
            f"--out={tmp_path}/"]  # fmt: skip
    record = evaluation.main(evaluation.parse_args(args))
    markdown = (tmp_path / "eval_best.md").read_text().splitlines()
    header = "| method | ConvNetW32 | ConvNetW64 | ConvNetW128 | ConvNetW256 | mean |"
    assert header in markdown
    gains = next(line for line in markdown if line.startswith("| gain over Random"))
    cells = [c.strip() for c in gains.strip("|").split("|")][1:]
    names = ["ConvNetW32", "ConvNetW64", "ConvNetW128", "ConvNetW256"]
    expected = [record["models"][n]["mean"] - record["random"][n]["mean"] for n in names]
    assert [float(c) for c in cells[:4]] == pytest.approx(expected, abs=0.006)
    assert float(cells[4]) == pytest.approx(sum(expected) / 4, abs=0.006)
    assert "gain over Random" in capsys.readouterr().out
