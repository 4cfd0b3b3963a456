"""Distillation split across 2 processes (gloo, CPU) against one process
(docs/algorithms.md#distributed-distillation).

The processes are started by the test with torch.multiprocessing; each writes what it computed to
a file the test reads back.
"""

import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from conftest import make_color_image_folder
from test_pad import CLASSES, SIZE, argv, final_tensors, random_walk_experts, write_experts

from distill import pad
from utils.distributed import World, shard_rows, start_world
from utils.io import UserError, load_pt, run_main, save_pt
from utils.matching import Student, match_trajectory, plan_inner_steps
from utils.networks import ConvNet

pytestmark = pytest.mark.usefixtures("one_thread")

WORLD = 2
NUM_CLASSES, IM_SIZE, NUM_SYN = 3, (8, 8), 9
# batch_syn 5 of 9 images: batches of 5 and 4, so one shard split is 3 + 2
BATCH_SYN, STEPS = 5, 4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, job, port, out, args):
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
        WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank), OMP_NUM_THREADS="1",
    )  # fmt: skip
    torch.set_num_threads(1)
    save_pt(job(rank, *args), out / f"rank{rank}.pt")


def run_ranks(job, tmp_path, *args):
    """job(rank, *args) in WORLD processes under one gloo group; the ranks' return values."""
    # fork: the children start without importing torch again (spawn costs ~10 s on a busy machine)
    mp.start_processes(
        _worker, args=(job, free_port(), tmp_path, args), nprocs=WORLD, start_method="fork"
    )
    return [load_pt(tmp_path / f"rank{rank}.pt") for rank in range(WORLD)]


# ---- one iteration's gradients -------------------------------------------------------------------


def problem():
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    net = ConvNet(3, NUM_CLASSES, IM_SIZE, width=8, depth=2)
    w_start = torch.cat([p.detach().reshape(-1) for p in net.parameters()])
    target = w_start + 0.05 * torch.randn(w_start.shape, generator=g)
    images = torch.randn(NUM_SYN, 3, *IM_SIZE, generator=g)
    labels = 3 * torch.randn(NUM_SYN, NUM_CLASSES, generator=g)
    plan = plan_inner_steps(
        NUM_SYN, STEPS, BATCH_SYN, IM_SIZE, augment=True, generator=torch.Generator().manual_seed(1)
    )
    return Student(net), w_start, target, images, labels, plan


def gradients(world: World, mode: str) -> dict:
    student, w_start, target, images, labels, plan = problem()
    image_syn = images.clone().requires_grad_(True)
    label_syn = labels.clone().requires_grad_(True)
    syn_lr = torch.tensor(0.05, requires_grad=True)
    result = match_trajectory(
        world.student(student), image_syn, label_syn, syn_lr, w_start, target, world.shard(plan),
        memory=mode,
    )  # fmt: skip
    world.sum_gradients(result, image_syn, label_syn)
    return {
        "loss": result.loss,
        "images": image_syn.grad,
        "labels": label_syn.grad,
        "lr": syn_lr.grad,
    }


def _gradients_job(rank):
    world = start_world(torch.device("cpu"), forced=False)
    assert world.active and world.size == WORLD
    shares = {mode: gradients(world, mode) for mode in ("graph", "recompute")}
    world.close()
    return shares


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_shard_rows_cover_the_batch_once():
    for n in (2, 5, 8, 9):
        rows = [shard_rows(n, r, 3 if n >= 3 else 2) for r in range(3 if n >= 3 else 2)]
        covered = [i for s in rows for i in range(n)[s]]
        assert covered == list(range(n))
        sizes = [s.stop - s.start for s in rows]
        assert max(sizes) - min(sizes) <= 1
    assert shard_rows(5, 0, 2) == slice(0, 3) and shard_rows(5, 1, 2) == slice(3, 5)


def test_two_processes_give_one_process_gradients(tmp_path):
    problem_plan = problem()[-1]
    assert [len(b) for b in problem_plan.batches] == [4, 5, 4, 5]  # 5 and 4 split 3+2, 2+2
    assert all(a is not None for a in problem_plan.aug)  # DSA on
    single = {mode: gradients(World(), mode) for mode in ("graph", "recompute")}
    ranks = run_ranks(_gradients_job, tmp_path)
    for mode in ("graph", "recompute"):
        for share in ranks:
            assert share[mode]["loss"] == pytest.approx(single[mode]["loss"], rel=1e-6)
            for key in ("images", "labels", "lr"):
                assert rel_err(share[mode][key], single[mode][key]) < 1e-5, (mode, key)
        # every rank applies the same update: the summed gradients are equal bit for bit
        for key in ("images", "labels", "lr"):
            assert torch.equal(ranks[0][mode][key], ranks[1][mode][key])
    # the gradients are not trivially equal: every image was used by a shard of each rank
    assert (single["graph"]["images"].flatten(1).abs().sum(1) > 0).all()


def test_a_world_of_one_gives_the_same_gradients(tmp_path):
    """distributed=true in a plain run: the split code with one shard per step."""
    single = gradients(World(), "recompute")
    world = start_world(torch.device("cpu"), forced=True)
    try:
        assert world.active and world.size == 1
        split = gradients(world, "recompute")
    finally:
        world.close()
    for key in ("images", "labels", "lr"):
        assert rel_err(split[key], single[key]) < 1e-6


# ---- the distillation script under 2 processes ------------------------------------------------


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """test_pad's 3-class 16x16 ImageFolder, and its cache folder for every process."""
    root = tmp_path_factory.mktemp("folder")
    make_color_image_folder(root / "data", CLASSES, SIZE, {"train": 8, "test": 4})
    os.environ["PAD_CACHE_DIR"] = str(root / "cache")
    yield root
    del os.environ["PAD_CACHE_DIR"]


def _pad_job(rank, settings):
    return pad.main("depth", settings)["next_iteration"]


def pad_settings(root, tmp, **overrides):
    # ipc 3 of 3 classes: 9 images, batch_syn 5 (batches of 5 and 4)
    base = {"ipc": 3, "batch_syn": 5, "syn_steps": 4, "Iteration": 2, "eval_it": 2}
    return argv(root, tmp, **{**base, **overrides})


def test_three_iterations_and_a_resume_under_two_processes(folder, tmp_path):
    write_experts(tmp_path / "buffer", random_walk_experts())
    one = pad.main("depth", pad_settings(folder, tmp_path, name="one", Iteration=4))
    # 3 iterations (0, 1, 2) in 2 processes, then continued to iteration 4 in 2 processes
    assert run_ranks(_pad_job, tmp_path, pad_settings(folder, tmp_path, name="two")) == [3, 3]
    two_dir = one["run_dir"].parent / "two"
    three_its = final_tensors(two_dir)
    short = pad.main("depth", pad_settings(folder, tmp_path, name="short"))
    for a, b in zip(three_its, final_tensors(short["run_dir"]), strict=True):
        assert rel_err(a, b) < 1e-5
    assert not torch.equal(three_its[0], load_pt(two_dir / "Normal" / "images_0.pt"))
    resumed = run_ranks(_pad_job, tmp_path, pad_settings(folder, tmp_path, name="two",
                                                          Iteration=4, resume=True))  # fmt: skip
    assert resumed == [5, 5]
    for a, b in zip(final_tensors(two_dir), final_tensors(one["run_dir"]), strict=True):
        assert rel_err(a, b) < 1e-5
    config = (two_dir / "config.yaml").read_text()
    assert "world_size: 2" in config


def _mismatch_job(rank, settings):
    # rank 1 is started with another seed: every rank must stop with exit 2
    extra = ["--seed", "7"] if rank == 1 else []
    try:
        run_main(lambda a: pad.main("depth", a), lambda: settings + extra)
    except SystemExit as exc:
        return exc.code
    return 0


def test_mismatched_configs_stop_every_rank_with_exit_2(folder, tmp_path, capfd):
    write_experts(tmp_path / "buffer", random_walk_experts())
    codes = run_ranks(_mismatch_job, tmp_path, pad_settings(folder, tmp_path, name="bad"))
    assert codes == [2, 2]
    err = capfd.readouterr().err
    assert err.count("the 2 processes disagree: rank 1's config seed differs from rank 0's") == 2
    assert "Traceback" not in err


# ---- difficulty scores: the repeats split across ranks -------------------------------------------


def _rank_difficulty_job(rank, argv):
    from test_rank_difficulty import rank_difficulty

    return str(rank_difficulty.main(rank_difficulty.parse_args(argv)))


def test_rank_difficulty_splits_its_repeats_with_the_one_process_result(folder, tmp_path):
    from test_rank_difficulty import rank_difficulty

    def argv(out):
        return [
            "--dataset", "ImageFolder", "--data_path", str(folder / "data"), "--model",
            "ConvNetW32", "--epochs", "1", "--repeat", "3", "--batch", "8", "--lr", "0.01",
            "--device", "cpu", "--out", str(out), "--name", "tiny",
        ]  # fmt: skip

    one = rank_difficulty.main(rank_difficulty.parse_args(argv(tmp_path / "one")))
    targets = run_ranks(_rank_difficulty_job, tmp_path, argv(tmp_path / "two"))
    assert targets == [str(tmp_path / "two" / "tiny.pt")] * 2
    assert torch.equal(load_pt(targets[0]), load_pt(one))
    for key in ("scores", "per_repeat"):  # 3 repeats: ranks 0 and 1 ran 2 and 1
        a = load_pt(tmp_path / "two" / "tiny.scores.pt")[key]
        assert torch.equal(a, load_pt(tmp_path / "one" / "tiny.scores.pt")[key])
    meta = json.loads((tmp_path / "two" / "tiny.json").read_text())
    assert meta["world_size"] == 2 and [run["repeat"] for run in meta["runs"]] == [0, 1, 2]
    assert not (tmp_path / "two" / ".tiny.partial").exists()


def _listing_job(rank):
    world = start_world(torch.device("cpu"), forced=False)
    listing = [("replay_buffer_0.pt", 100), ("replay_buffer_1.pt", 100 + rank)]
    try:
        world.check_same({"config": {"ipc": 10}, "expert folder listing": listing})
    except UserError as exc:
        return str(exc)
    finally:
        world.close()
    return "no error"


def test_different_expert_folders_are_named_on_every_rank(tmp_path):
    messages = run_ranks(_listing_job, tmp_path)
    expected = (
        "the 2 processes disagree: rank 1's expert folder listing differs from rank 0's; start "
        "every rank with the same config, expert folder and run folder"
    )
    assert messages == [expected] * 2
