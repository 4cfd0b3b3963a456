"""utils/trajectory.py: expert folders, the reference file format, shape checks, ExpertSampler,
resuming a buffer."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils.io import UserError  # noqa: E402
from utils.networks import get_network  # noqa: E402
from utils.trajectory import (  # noqa: E402
    ExpertSampler,
    check_expert_shapes,
    expert_dir,
    expert_file,
    flatten_params,
    list_expert_files,
    load_expert_file,
    load_sidecar,
    plan_files,
    save_expert_file,
    snapshot_params,
    unflatten_params,
)


def test_expert_dir_follows_the_reference_layout():
    root = Path("buf")
    assert expert_dir(root, "CIFAR10", "ConvNet", zca=True) == root / "CIFAR10" / "ConvNet"
    assert expert_dir(root, "CIFAR10", "ConvNet", zca=False) == root / "CIFAR10_NO_ZCA" / "ConvNet"
    assert expert_dir(root, "CIFAR100", "ConvNet", False) == root / "CIFAR100_NO_ZCA" / "ConvNet"
    # Tiny and other data sets do not encode ZCA (reference); ImageNet adds subset and res
    assert expert_dir(root, "Tiny", "ConvNetD4", zca=False) == root / "Tiny" / "ConvNetD4"
    assert expert_dir(root, "ImageNet", "ConvNetD5", False, subset="imagewoof", res=128) == (
        root / "ImageNet" / "imagewoof" / "128" / "ConvNetD5"
    )


def test_list_expert_files_stops_at_the_first_gap(tmp_path):
    assert list_expert_files(tmp_path) == []
    for n in (0, 1, 3):
        expert_file(tmp_path, n).write_bytes(b"x")
    assert list_expert_files(tmp_path) == [tmp_path / "replay_buffer_0.pt",
                                           tmp_path / "replay_buffer_1.pt"]  # fmt: skip


def small_model(num_classes: int = 3) -> torch.nn.Module:
    torch.manual_seed(0)
    return get_network("ConvNetD1", 3, num_classes, (8, 8))


def trained_expert(model: torch.nn.Module, epochs: int = 2) -> list[list[torch.Tensor]]:
    """Snapshots around a few SGD steps, as buffer_CL records them."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    trajectory = [snapshot_params(model)]
    for _ in range(epochs):
        optimizer.zero_grad()
        model(torch.randn(4, 3, 8, 8)).square().mean().backward()
        optimizer.step()
        trajectory.append(snapshot_params(model))
    return trajectory


def test_snapshots_are_copies_not_the_live_parameters():
    model = small_model()
    snapshot = snapshot_params(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    for saved, live in zip(snapshot, model.parameters(), strict=True):
        assert saved.dtype == torch.float32 and saved.device.type == "cpu"
        assert torch.allclose(saved + 1.0, live)


def test_save_and_load_keep_the_reference_format(tmp_path):
    model = small_model()
    experts = [trained_expert(model), trained_expert(model)]
    path = tmp_path / "replay_buffer_0.pt"
    save_expert_file(path, experts, {"experts": [0, 1], "model": "ConvNetD1"})

    raw = torch.load(path, weights_only=True)  # what the authors' code reads
    assert type(raw) is list and len(raw) == 2
    assert all(type(e) is list and len(e) == 3 for e in raw)
    assert all(type(s) is list for e in raw for s in e)
    shapes = [p.shape for p in model.parameters()]
    for saved, original in zip(raw, experts, strict=True):
        for snap_saved, snap_original in zip(saved, original, strict=True):
            assert [t.shape for t in snap_saved] == shapes
            assert all(torch.equal(a, b) for a, b in zip(snap_saved, snap_original, strict=True))
    assert not torch.equal(raw[0][0][0], raw[0][-1][0])  # the weights moved: no aliasing
    assert load_sidecar(path) == {"experts": [0, 1], "model": "ConvNetD1"}
    assert json.loads((tmp_path / "replay_buffer_0.json").read_text())["experts"] == [0, 1]
    loaded = load_expert_file(path, mmap=True)
    assert torch.equal(loaded[1][2][0], experts[1][2][0])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["replay_buffer_0.json",
                                                         "replay_buffer_0.pt"]  # fmt: skip


def test_save_refuses_aliased_or_non_float32_snapshots(tmp_path):
    model = small_model()
    live = [p.detach() for p in model.parameters()]  # what the reference stores on CPU
    with pytest.raises(ValueError, match="share memory"):
        save_expert_file(tmp_path / "a.pt", [[live, live]], {})
    half = [[[t.half() for t in snapshot_params(model)]]]
    with pytest.raises(ValueError, match="float32"):
        save_expert_file(tmp_path / "b.pt", half, {})
    assert list(tmp_path.iterdir()) == []


def test_load_refuses_corrupt_or_foreign_files(tmp_path):
    garbage = tmp_path / "replay_buffer_0.pt"
    garbage.write_bytes(b"not a torch file")
    with pytest.raises(UserError, match="replay_buffer_0.pt"):
        load_expert_file(garbage)
    foreign = tmp_path / "replay_buffer_1.pt"
    torch.save({"state_dict": torch.zeros(2)}, foreign)
    with pytest.raises(UserError, match="not a non-empty list of experts"):
        load_expert_file(foreign)
    mixed = tmp_path / "replay_buffer_2.pt"
    torch.save([[[torch.zeros(2)], [torch.zeros(3)]]], mixed)
    with pytest.raises(UserError, match="mixes models"):
        load_expert_file(mixed)


def test_flatten_and_unflatten_are_inverse_and_unflatten_gives_views():
    tensors = [torch.arange(6.0).view(2, 3), torch.tensor([7.0]), torch.arange(4.0).view(2, 1, 2)]
    flat = flatten_params(tensors)
    assert flat.tolist() == [0, 1, 2, 3, 4, 5, 7, 0, 1, 2, 3]
    back = unflatten_params(flat, [t.shape for t in tensors])
    assert all(torch.equal(a, b) for a, b in zip(back, tensors, strict=True))
    flat[6] = 99.0
    assert back[1].item() == 99.0
    with pytest.raises(ValueError):
        unflatten_params(flat, [torch.Size([2, 3])])


def test_check_expert_shapes_names_the_file_and_shapes():
    model = small_model(num_classes=3)
    check_expert_shapes(trained_expert(model, 1), model, "replay_buffer_0.pt")
    other = trained_expert(small_model(num_classes=5), 1)
    with pytest.raises(UserError) as info:
        check_expert_shapes(other, model, "replay_buffer_7.pt")
    message = str(info.value)
    assert "replay_buffer_7.pt" in message and "another model or data set" in message
    assert "[5, 2048]" in message and "[3, 2048]" in message  # found and expected shapes


# ---------------------------------------------------------------------------------------------
# ExpertSampler: each expert is tagged by a value so visits can be read back


SIZES = (3, 2, 4)  # experts per file: different, so a permutation sized wrongly would show


def tagged_files(folder: Path) -> list[Path]:
    """File f holds experts tagged 10 * f + j (j = position in the file), 2 snapshots each."""
    files = []
    for f, size in enumerate(SIZES):
        experts = [
            [[torch.full((2,), 10.0 * f + j)], [torch.full((2,), -1.0)]] for j in range(size)
        ]
        save_expert_file(expert_file(folder, f), experts, {})
        files.append(expert_file(folder, f))
    return files


def tag(expert) -> int:
    return int(expert[0][0][0])


def reference_file_mode(seed: int, sizes, max_experts=None, passes: int = 2) -> list[int]:
    """Independent restatement of docs/algorithms.md#expert-sampling with the same
    NumPy generator calls."""
    rng = np.random.default_rng(seed)
    tags = []
    for _ in range(passes):
        for f in rng.permutation(len(sizes)):
            size = min(sizes[f], max_experts or sizes[f])
            tags += [10 * int(f) + int(j) for j in rng.permutation(size)]
    return tags


def test_file_mode_visits_each_expert_once_per_pass_file_by_file(tmp_path):
    sampler = ExpertSampler(tagged_files(tmp_path), seed=3)
    tags = [tag(sampler.next()) for _ in range(2 * sum(SIZES))]
    assert tags == reference_file_mode(3, SIZES)
    everyone = sorted(10 * f + j for f, size in enumerate(SIZES) for j in range(size))
    for half in (tags[: sum(SIZES)], tags[sum(SIZES) :]):
        assert sorted(half) == everyone  # without replacement within a pass
        files_in_order = [t // 10 for t in half]
        assert files_in_order == sorted(files_in_order, key=files_in_order.index)  # contiguous


def test_max_files_and_max_experts_limit_what_is_sampled(tmp_path):
    files = tagged_files(tmp_path)
    sampler = ExpertSampler(files, max_experts=2, seed=1)
    tags = [tag(sampler.next()) for _ in range(12)]
    assert tags == reference_file_mode(1, SIZES, max_experts=2)
    assert {t % 10 for t in tags} == {0, 1}
    sampler = ExpertSampler(files, max_files=2, seed=1)
    tags = [tag(sampler.next()) for _ in range(10)]
    assert tags == reference_file_mode(1, SIZES[:2])
    one = ExpertSampler(files, max_files=1, seed=5)
    assert {tag(one.next()) for _ in range(7)} == {0, 1, 2}
    assert one.current_file == files[0]


def test_load_all_draws_uniformly_among_all_experts(tmp_path):
    sampler = ExpertSampler(tagged_files(tmp_path), load_all=True, seed=2)
    tags = [tag(sampler.next()) for _ in range(900)]
    everyone = [10 * f + j for f, size in enumerate(SIZES) for j in range(size)]
    expected = [everyone[i] for i in np.random.default_rng(2).integers(len(everyone), size=900)]
    assert tags == expected
    counts = np.bincount([everyone.index(t) for t in tags], minlength=len(everyone))
    assert counts.min() > 60 and counts.max() < 140  # 100 expected each


@pytest.mark.parametrize("load_all", [False, True])
@pytest.mark.parametrize("taken_after", [0, 4, 9])
def test_state_dict_round_trip_continues_the_same_sequence(tmp_path, load_all, taken_after):
    files = tagged_files(tmp_path)
    first = ExpertSampler(files, load_all=load_all, seed=11)
    for _ in range(taken_after):
        first.next()
    state_path = tmp_path / "state.pt"
    torch.save(first.state_dict(), state_path)  # as a distillation checkpoint stores it
    resumed = ExpertSampler(files, load_all=load_all, seed=999)
    resumed.load_state_dict(torch.load(state_path, weights_only=True))
    assert [tag(resumed.next()) for _ in range(20)] == [tag(first.next()) for _ in range(20)]


def test_sampler_refuses_empty_or_changed_inputs(tmp_path):
    with pytest.raises(UserError, match="no expert files"):
        ExpertSampler([])
    files = tagged_files(tmp_path)
    with pytest.raises(UserError, match="max_files"):
        ExpertSampler(files, max_files=0)
    state = ExpertSampler(files, seed=0).state_dict()
    with pytest.raises(UserError, match="same expert settings"):
        ExpertSampler(files[:2]).load_state_dict(state)


def test_plan_files_removes_only_its_own_stale_temporaries(tmp_path):
    mine = [".replay_buffer_0.pt.a1.tmp", ".replay_buffer_0.json.b2.tmp",
            "..replay_buffer_0.partial_1.pt.c3.tmp"]  # fmt: skip
    other_rank = ".replay_buffer_1.pt.d4.tmp"
    for name in [*mine, other_rank]:
        (tmp_path / name).write_bytes(b"")
    settings = {"save_interval": 2, "train_epochs": 1}
    jobs = plan_files(tmp_path, 4, settings, shapes=[], rank=0, world=2)
    assert [(job.number, job.missing) for job in jobs] == [(0, [0, 1])]
    assert [p.name for p in tmp_path.iterdir()] == [other_rank]
