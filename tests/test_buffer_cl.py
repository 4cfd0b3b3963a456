"""buffer/buffer_CL.py end to end on a tiny generated ImageFolder (3 classes x 8 train images).

One in-process run (3 experts, 3 epochs, 2 experts per file, a curriculum) is shared by the
format, curriculum, resume and growth tests; a few subprocess runs cover SIGKILL + rerun,
torchrun with two ranks and the entry point's one-line errors.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "buffer"))

import buffer_CL  # noqa: E402

from utils.data import get_dataset  # noqa: E402
from utils.io import run_main  # noqa: E402
from utils.networks import get_network  # noqa: E402
from utils.runtime import derived_seeds, seed_everything  # noqa: E402
from utils.trajectory import expert_dir, list_expert_files, load_expert_file, load_sidecar  # noqa: E402

CLASSES, PER_CLASS, EPOCHS, EXPERTS, INTERVAL = 3, 8, 3, 3, 2
# epoch 0: easiest int(0.5 * 8) = 4 per class; epoch 1: all 8 (ramp ends at add_end_epoch 1);
# epoch 2 (> rm_epoch_first 1): all but the easiest int(0.25 * 8) = 2
CURRICULUM = ["--init_ratio", "0.5", "--add_end_epoch", "1", "--rm_epoch_first", "1",
              "--rm_epoch_second", "5", "--rm_easy_ratio_first", "0.25"]  # fmt: skip
SLICES = [(0, 4), (0, 8), (2, 8)]  # per epoch: columns of each class's easy-to-hard row


def make_image_folder(root: Path) -> None:
    rng = np.random.default_rng(0)
    for split, n in (("train", PER_CLASS), ("test", 4)):
        for c in range(CLASSES):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(n):
                pixels = (rng.random((32, 32, 3)) * 60 + 80 * c).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i:02d}.png")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The test machine's cores are shared: oversubscribed threads crawl (and one thread here
    matches the subprocesses' OMP_NUM_THREADS=1, so their float results agree closely)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Data, an index file (a random easy-to-hard order per class) and the cache folder."""
    root = tmp_path_factory.mktemp("buffer_cl")
    make_image_folder(root / "data")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PAD_CACHE_DIR", str(root / "cache"))
        data = get_dataset("ImageFolder", str(root / "data"))
        generator = torch.Generator().manual_seed(1)
        order = torch.stack([
            members[torch.randperm(len(members), generator=generator)]
            for members in data.indices_class()
        ])  # fmt: skip
        (root / "indices").mkdir()
        torch.save(order, root / "indices" / "TINY_Random.pt")  # the authors' bare format
        yield {"root": root, "data": data, "order": order}


def argv(env, buffer: Path, *extra: str) -> list[str]:
    return [
        "--dataset", "ImageFolder", "--data_path", str(env["root"] / "data"),
        "--buffer_path", str(buffer), "--model", "ConvNetD1", "--train_epochs", str(EPOCHS),
        "--num_experts", str(EXPERTS), "--save_interval", str(INTERVAL), "--batch_train", "5",
        "--rho_max", "0.01", "--rho_min", "0.01", "--alpha", "0.3", "--device", "cpu",
        "--indices_path", str(env["root"] / "indices"), "--sort_method", "TINY_Random",
        *CURRICULUM, *extra,
    ]  # fmt: skip


def folder_of(buffer: Path) -> Path:
    return expert_dir(buffer, "ImageFolder", "ConvNetD1", zca=False)


def max_difference(experts_a: list, experts_b: list) -> float:
    """Largest absolute difference between two lists of experts of the same structure."""
    assert len(experts_a) == len(experts_b)
    return max(
        (x - y).abs().max().item()
        for a, b in zip(experts_a, experts_b, strict=True)
        for sa, sb in zip(a, b, strict=True)
        for x, y in zip(sa, sb, strict=True)
    )


def metrics(buffer: Path) -> list[dict]:
    lines = (folder_of(buffer) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def run_recording_batches(env, args: list[str]) -> list[torch.Tensor]:
    """Run buffer_CL in process; return the real images each training batch drew (before DSA)."""
    batches = []
    real_augment = buffer_CL.augment

    def spy(x, **kwargs):
        batches.append(x.clone())
        return real_augment(x, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PAD_CACHE_DIR", str(env["root"] / "cache"))
        mp.setattr(buffer_CL, "augment", spy)
        buffer_CL.main(buffer_CL.parse_args(args))
    return batches


@pytest.fixture(scope="module")
def first_run(env):
    """One in-process run shared by the format, curriculum, resume and growth tests."""
    buffer = env["root"] / "first"
    return {"buffer": buffer, "batches": run_recording_batches(env, argv(env, buffer))}


def test_expert_files_hold_the_reference_format(env, first_run):
    files = list_expert_files(folder_of(first_run["buffer"]))
    assert [f.name for f in files] == ["replay_buffer_0.pt", "replay_buffer_1.pt"]
    data = env["data"]
    model = get_network("ConvNetD1", data.channel, data.num_classes, data.im_size)
    shapes = [p.shape for p in model.parameters()]
    experts = []
    for number, path in enumerate(files):
        raw = torch.load(path, weights_only=True)
        assert type(raw) is list and len(raw) == [2, 1][number]
        assert load_sidecar(path)["experts"] == [[0, 1], [2]][number]
        experts += raw
    for k, expert in enumerate(experts):
        assert type(expert) is list and len(expert) == EPOCHS + 1
        for snapshot in expert:
            assert type(snapshot) is list and [t.shape for t in snapshot] == shapes
            assert all(t.dtype == torch.float32 and t.device.type == "cpu" for t in snapshot)
        assert not torch.equal(expert[0][0], expert[-1][0])  # trained, and no aliasing
        # snapshot 0 is the initialisation drawn from expert k's own seed (seed + k)
        seed_everything(derived_seeds(0 + k)[0])
        init = get_network("ConvNetD1", data.channel, data.num_classes, data.im_size)
        assert all(torch.equal(a, b) for a, b in zip(expert[0], init.parameters(), strict=True))
    assert not torch.equal(experts[0][0][0], experts[1][0][0])  # different seeds
    leftovers = [p.name for p in folder_of(first_run["buffer"]).iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_each_epoch_trains_on_the_curriculum_slice(env, first_run):
    data, order = env["data"], env["order"]
    index_of = {x.numpy().tobytes(): i for i, x in enumerate(data.images_train)}
    drawn = [index_of[x.numpy().tobytes()] for batch in first_run["batches"] for x in batch]
    records = metrics(first_run["buffer"])
    assert [(r["expert"], r["epoch"]) for r in records] == [
        (k, e) for k in range(EXPERTS) for e in range(EPOCHS)
    ]
    for record in records:
        start, stop = SLICES[record["epoch"]]
        expected = sorted(order[:, start:stop].reshape(-1).tolist())  # hand-computed slices
        used, drawn = drawn[: len(expected)], drawn[len(expected) :]
        assert sorted(used) == expected  # every selected image exactly once, nothing else
        assert record["images_per_class"] == [stop - start] * CLASSES
        assert record["images"] == len(expected)
        assert record["keep_upto"] == [0.5, 1.0, 1.0][record["epoch"]]
        assert record["drop_easy"] == [0.0, 0.0, 0.25][record["epoch"]]
        assert record["test_acc"] is not None  # --test_every 1 (default)
    assert drawn == []


def test_rerun_after_deleting_a_file_trains_only_its_experts(env, first_run, tmp_path):
    buffer = tmp_path / "buffer"
    shutil.copytree(first_run["buffer"], buffer)
    folder = folder_of(buffer)
    before = load_expert_file(folder / "replay_buffer_0.pt")
    kept_mtime = (folder / "replay_buffer_1.pt").stat().st_mtime_ns
    (folder / "replay_buffer_0.pt").unlink()
    lines_before = len(metrics(buffer))
    buffer_CL.main(buffer_CL.parse_args(argv(env, buffer)))
    # the retrained experts' lines replace their old ones (each epoch once), at the end
    assert len(metrics(buffer)) == lines_before
    new = metrics(buffer)[lines_before - 2 * EPOCHS :]
    assert sorted({r["expert"] for r in new}) == [0, 1]
    expected = [(k, e) for k in (0, 1) for e in range(EPOCHS)]
    assert [(r["expert"], r["epoch"]) for r in new] == expected
    assert (folder / "replay_buffer_1.pt").stat().st_mtime_ns == kept_mtime  # not rewritten
    after = load_expert_file(folder / "replay_buffer_0.pt")
    # seeds per expert: the retrained experts are the same trajectories
    assert max_difference(before, after) == 0
    # a complete buffer: nothing to do, nothing rewritten
    mtimes = {p.name: p.stat().st_mtime_ns for p in folder.glob("*.pt")}
    buffer_CL.main(buffer_CL.parse_args(argv(env, buffer)))
    assert len(metrics(buffer)) == lines_before
    assert {p.name: p.stat().st_mtime_ns for p in folder.glob("*.pt")} == mtimes


def test_more_experts_grow_the_last_smaller_file(env, first_run, tmp_path):
    buffer = tmp_path / "buffer"
    shutil.copytree(first_run["buffer"], buffer)
    folder = folder_of(buffer)
    old_last = load_expert_file(folder / "replay_buffer_1.pt")
    buffer_CL.main(buffer_CL.parse_args(argv(env, buffer) + ["--num_experts", "5"]))
    assert [f.name for f in list_expert_files(folder)] == [
        f"replay_buffer_{n}.pt" for n in range(3)
    ]
    grown = load_expert_file(folder / "replay_buffer_1.pt")
    assert len(grown) == 2 and load_sidecar(folder / "replay_buffer_1.pt")["experts"] == [2, 3]
    assert max_difference(grown[:1], old_last) == 0  # kept as it was
    assert len(load_expert_file(folder / "replay_buffer_2.pt")) == 1
    assert sorted({r["expert"] for r in metrics(buffer)[EXPERTS * EPOCHS :]}) == [3, 4]


def test_bf16_plain_experts_without_curriculum(env, tmp_path):
    args = argv(env, tmp_path, "--amp", "bf16", "--test_every", "0", "--num_experts", "1",
                "--train_epochs", "1", "--sort_method", "")  # fmt: skip
    buffer_CL.main(buffer_CL.parse_args(args))
    (expert,) = load_expert_file(folder_of(tmp_path) / "replay_buffer_0.pt")
    assert len(expert) == 2 and all(t.dtype == torch.float32 for t in expert[1])
    (record,) = metrics(tmp_path)
    assert record["images"] == CLASSES * PER_CLASS and record["test_acc"] is None


def test_compiled_experts_equal_eager_ones_to_float_rounding(env, first_run, tmp_path):
    # Same seeds, data order and DSA draws; torch.compile only fuses and reorders float operations.
    compiled_calls = []
    real_compile = torch.compile

    def counting_compile(model, **kwargs):
        compiled = real_compile(model, **kwargs)

        def forward(x):
            compiled_calls.append(len(x))
            return compiled(x)

        return forward

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch, "compile", counting_compile)
        buffer_CL.main(buffer_CL.parse_args(argv(env, tmp_path, "--compile", "true")))
    # every training forward went through the compiled model: 2 GSAM passes per batch
    assert sum(compiled_calls) == 2 * sum(r["images"] for r in metrics(tmp_path))
    for name in ("replay_buffer_0.pt", "replay_buffer_1.pt"):
        compiled = load_expert_file(folder_of(tmp_path) / name)
        eager = load_expert_file(folder_of(first_run["buffer"]) / name)
        assert max_difference(compiled, eager) < 1e-4
        moved = max_difference([expert[-1:] for expert in eager], [expert[:1] for expert in eager])
        assert moved > 1e-2  # the tolerance is far below what training changes


def test_compile_without_a_cpp_compiler_is_one_line(env, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("CXX", "no-such-compiler-xyz")
    message = one_line_error(capsys, argv(env, tmp_path, "--compile", "true"))
    assert "no-such-compiler-xyz" in message and "--compile false" in message
    assert not list(tmp_path.rglob("*.pt"))


@pytest.mark.parametrize(
    ("flag", "columns"), [("--remove_easy", (2, 8)), ("--remove_hard", (0, 6))]
)
def test_ablation_trains_every_epoch_on_one_pruned_subset(env, tmp_path, flag, columns):
    # int(0.25 * 8) = 2 images per class dropped at the easy (row start) or hard (row end) side
    args = argv(env, tmp_path, flag, "0.25", "--test_every", "0", "--num_experts", "1")
    batches = run_recording_batches(env, args)
    data, order = env["data"], env["order"]
    index_of = {x.numpy().tobytes(): i for i, x in enumerate(data.images_train)}
    drawn = [index_of[x.numpy().tobytes()] for batch in batches for x in batch]
    expected = sorted(order[:, columns[0] : columns[1]].reshape(-1).tolist())
    per_epoch = len(expected)
    assert len(drawn) == EPOCHS * per_epoch
    for epoch in range(EPOCHS):
        assert sorted(drawn[epoch * per_epoch : (epoch + 1) * per_epoch]) == expected


# ---------------------------------------------------------------------------------------------
# Errors: one line "error: ..." on stderr, exit status 2


def one_line_error(capsys, args: list[str]) -> str:
    with pytest.raises(SystemExit) as info:
        run_main(buffer_CL.main, lambda: buffer_CL.parse_args(args))
    assert info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    return lines[0]


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        (["--num_experts", "0"], "--num_experts 0"),
        (["--init_ratio", "0"], "--init_ratio=0"),
        (["--init_ratio", "1.5"], "--init_ratio=1.5"),
        (["--rm_epoch_first", "7", "--rm_epoch_second", "6"], "--rm_epoch_first=7"),
        (["--rho_min", "0.02"], "--rho_min 0.02"),
        (["--model", "ConvNetX"], "unknown model"),
        (["--remove_easy", "1.0"], "--remove_easy 1.0"),
        (["--remove_easy", "0.1", "--sort_method", ""], "need a difficulty order"),
        (["--dataset", "CIFAR11"], "unknown data set"),
        (
            ["--sort_method", "TINY_GraNd"],
            "rank_difficulty.py --dataset=ImageFolder --method=GraNd",
        ),
    ],
)
def test_bad_input_is_one_line(env, tmp_path, capsys, extra, words):
    assert words in one_line_error(capsys, argv(env, tmp_path) + extra)


def test_index_file_of_another_data_set_and_foreign_buffers_are_refused(env, first_run, capsys):
    other = env["root"] / "indices" / "OTHER.pt"
    torch.save(torch.arange(20).view(2, 10), other)
    message = one_line_error(capsys, argv(env, env["root"] / "x", "--sort_method", str(other)))
    assert "OTHER.pt" in message and "another data set" in message
    message = one_line_error(capsys, argv(env, first_run["buffer"], "--lr_teacher", "0.02"))
    assert "other settings" in message and "lr_teacher 0.01 (this run 0.02)" in message


# ---------------------------------------------------------------------------------------------
# Subprocesses: the entry point, SIGKILL + rerun, torchrun


def subprocess_env(env) -> dict:
    return {**os.environ, "PAD_CACHE_DIR": str(env["root"] / "cache"), "OMP_NUM_THREADS": "1"}


def test_script_entry_point_prints_one_line(env, tmp_path):
    script = ROOT / "buffer" / "buffer_CL.py"
    result = subprocess.run(
        [sys.executable, str(script), *argv(env, tmp_path, "--init_ratio", "1.5")],
        capture_output=True, text=True, env=subprocess_env(env), cwd=ROOT / "buffer",
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert result.stderr.startswith("error: --init_ratio=1.5")


def test_sigkill_mid_run_then_rerun_completes_without_losing_experts(env, tmp_path):
    command = [sys.executable, str(ROOT / "buffer" / "buffer_CL.py"), *argv(env, tmp_path)]
    folder = folder_of(tmp_path)
    process = subprocess.Popen(command, env=subprocess_env(env), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 120
    while not list(folder.glob(".replay_buffer_0.partial_*.pt")) and process.poll() is None:
        assert time.monotonic() < deadline, "no partial expert appeared"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    rerun = subprocess.run(command, env=subprocess_env(env), capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    experts = [e for f in list_expert_files(folder) for e in load_expert_file(f)]
    assert len(experts) == EXPERTS and all(len(e) == EPOCHS + 1 for e in experts)
    assert sorted(p.name for p in folder.iterdir() if p.name.startswith(".")) == []
    # expert 0 was kept from its partial checkpoint, never trained again
    assert sum(r["expert"] == 0 for r in metrics(tmp_path)) == EPOCHS


def test_torchrun_two_ranks_split_the_files(env, first_run, tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(ROOT / "buffer" / "buffer_CL.py"), *argv(env, tmp_path)]  # fmt: skip
    result = subprocess.run(command, env=subprocess_env(env), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    single = list_expert_files(folder_of(first_run["buffer"]))
    ranked = list_expert_files(folder_of(tmp_path))
    assert [f.name for f in ranked] == [f.name for f in single]
    for number, path in enumerate(ranked):
        meta = load_sidecar(path)
        assert (meta["rank"], meta["world_size"]) == (number % 2, 2)
        one, two = load_expert_file(single[number]), load_expert_file(path)
        assert len(one) == len(two)
        # expert k is seeded with seed + k whichever process trains it
        assert max_difference(one, two) < 1e-4
    assert {(r["expert"], r["rank"]) for r in metrics(tmp_path)} == {(0, 0), (1, 0), (2, 1)}
