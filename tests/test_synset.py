import pytest
import torch

from utils.io import UserError
from utils.matching import Student
from utils.networks import get_network
from utils.synset import (
    StartEpochSchedule,
    average_correct_logits,
    check_ipc,
    check_trajectory_length,
    correctly_predicted_indices,
    hard_labels,
    initial_soft_labels,
    label_snapshots,
    real_image_indices,
    snapshot_index,
)
from utils.trajectory import flatten_params, save_expert_file

# ---- start epochs (docs/algorithms.md#one-iteration step 2) --------------------------------------


def draws(schedule, it, n=400, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [schedule.sample(it, generator) for _ in range(n)]


def test_sequential_window_widens_from_current_to_max():
    # CIFAR-10 IPC10: window [0, 10) widening to [0, 20) over 1000 iterations
    s = StartEpochSchedule(
        0, 20, sequential=True, current_max_start_epoch=10, expansion_end_epoch=1000
    )
    # hand-computed: 10 + int(10 * it / 1000), capped at 20
    assert [s.upper(it) for it in (0, 1, 99, 100, 500, 999, 1000, 10000)] == [
        10,
        10,
        10,
        11,
        15,
        19,
        20,
        20,
    ]
    for it, upper in ((0, 10), (500, 15), (10000, 20)):
        values = draws(s, it)
        assert min(values) == 0 and max(values) == upper - 1  # upper bound is exclusive


def test_window_without_sequential_generation_is_fixed():
    # CIFAR-10 IPC1000: [40, 60) at every iteration, current_max_start_epoch unused
    s = StartEpochSchedule(40, 60, sequential=False, current_max_start_epoch=20)
    for it in (0, 5000, 10000):
        values = draws(s, it)
        assert min(values) == 40 and max(values) == 59


def test_sampling_is_reproducible_from_the_generator_state():
    s = StartEpochSchedule(
        0, 30, sequential=True, current_max_start_epoch=20, expansion_end_epoch=1000
    )
    generator = torch.Generator().manual_seed(3)
    [s.sample(it, generator) for it in range(5)]
    state = generator.get_state()
    first = [s.sample(it, generator) for it in range(5, 25)]
    generator.set_state(state)
    assert [s.sample(it, generator) for it in range(5, 25)] == first


def test_empty_window_is_a_user_error():
    with pytest.raises(UserError, match="window is empty at iteration 0"):
        StartEpochSchedule(5, 5).validate(100)
    # max below current: the widened bound shrinks below min by the last iteration
    shrinking = StartEpochSchedule(
        2, 4, sequential=True, current_max_start_epoch=20, expansion_end_epoch=10
    )
    with pytest.raises(UserError, match="iteration 100"):
        shrinking.validate(100)
    StartEpochSchedule(0, 4).validate(10000)  # CIFAR-10 IPC1 is fine


def test_trajectory_length_check():
    check_trajectory_length(5, 2, 7, "f.pt")  # latest target: epoch 4 + 2 = 6, the last snapshot
    with pytest.raises(
        UserError,
        match=r"max_start_epoch=6 \+ expert_epochs=2.*"
        r"trained for 6 epochs.*max_start_epoch <= 5",
    ):
        check_trajectory_length(6, 2, 7, "f.pt")


# ---- checks ------------------------------------------------------------------------------------


def test_ipc_larger_than_a_class():
    members = [torch.arange(5), torch.arange(5, 8)]
    check_ipc(3, members, ["a", "b"])
    with pytest.raises(UserError, match=r"class 1 \(b\) has only 3.*ipc <= 3"):
        check_ipc(4, members, ["a", "b"])


def test_snapshot_index():
    assert snapshot_index(-1, 7, "f") == 6 and snapshot_index(2, 7, "f") == 2
    with pytest.raises(UserError, match="Label_Model_Timestamp=7"):
        snapshot_index(7, 7, "f")


# ---- initial images (docs/algorithms.md#initial-images) ------------------------------------------


def test_hard_labels_are_class_major():
    assert hard_labels(3, 2).tolist() == [0, 0, 1, 1, 2, 2]


def test_real_images_are_distinct_members_of_their_class():
    members = [torch.arange(0, 10), torch.arange(10, 14)]
    chosen = real_image_indices(members, 3, torch.Generator().manual_seed(0))
    assert len(chosen) == 6
    assert all(0 <= i < 10 for i in chosen[:3].tolist()) and len(set(chosen[:3].tolist())) == 3
    assert all(10 <= i < 14 for i in chosen[3:].tolist()) and len(set(chosen[3:].tolist())) == 3


def test_correctly_predicted_moves_to_the_next_expert_when_a_class_runs_out():
    # 2 classes of 6 images; image "value" = its index. Expert 0 is right on even indices only,
    # expert 1 on every image. Class 0 = {0..5} has 3 even images, class 1 = {6..11} has 3.
    images = torch.arange(12.0).view(12, 1, 1, 1)
    labels = torch.tensor([0] * 6 + [1] * 6)
    members = [torch.arange(6), torch.arange(6, 12)]
    calls = []

    def predict(k, x):
        calls.append(k)
        idx = x.flatten().long()
        right = torch.ones_like(idx, dtype=torch.bool) if k == 1 else idx % 2 == 0
        return torch.where(right, labels[idx], 1 - labels[idx])

    generator = torch.Generator().manual_seed(0)
    chosen = correctly_predicted_indices(images, members, 3, predict, 2, generator, chunk=4)
    assert sorted(chosen[:3].tolist()) == [0, 2, 4] and sorted(chosen[3:].tolist()) == [6, 8, 10]
    assert set(calls) == {0}  # expert 0 sufficed
    chosen = correctly_predicted_indices(images, members, 4, predict, 2, generator, chunk=4)
    assert set(chosen[:3].tolist()) <= set(range(6)) and len(set(chosen[:4].tolist())) == 4
    assert {0, 2, 4} <= set(chosen[:4].tolist())  # expert 0's picks are kept
    assert {6, 8, 10} <= set(chosen[4:].tolist()) and set(chosen[4:].tolist()) <= set(range(6, 12))
    assert 1 in calls
    with pytest.raises(UserError, match=r"only 3 of the 6 images of class 0 \(a\).*1 experts"):
        correctly_predicted_indices(images, members, 4, predict, 1, generator, ["a", "b"], 4)


# ---- soft labels (docs/algorithms.md#soft-labels) ------------------------------------------------


def test_average_over_the_correct_experts_only():
    labels = torch.tensor([0, 1, 1])
    a = torch.tensor([[3.0, 1.0], [0.0, 2.0], [5.0, 1.0]])  # right, right, wrong
    b = torch.tensor([[1.0, 0.0], [4.0, 1.0], [0.0, 7.0]])  # right, wrong, right
    soft, fallback = average_correct_logits([a, b], labels)
    expected = torch.tensor([[2.0, 0.5], [0.0, 2.0], [0.0, 7.0]])
    assert torch.equal(soft, expected) and fallback == 0


def test_image_no_expert_gets_right_falls_back_to_the_mean_of_all():
    labels = torch.tensor([1])
    a, b = torch.tensor([[3.0, 1.0]]), torch.tensor([[5.0, 3.0]])
    soft, fallback = average_correct_logits([a, b], labels)
    assert torch.equal(soft, torch.tensor([[4.0, 2.0]])) and fallback == 1


def constant_expert(model, bias):
    """A ConvNetD1 snapshot whose logits are `bias` for every input: conv weights zero."""
    tensors = [torch.zeros_like(p) for p in model.parameters()]
    tensors[-1] = torch.tensor(bias)
    return tensors


def test_soft_labels_through_the_network_with_known_logits(tmp_path):
    model = get_network("ConvNetD1", 3, 3, (8, 8))
    biases = {0: [4.0, 1.0, 0.0], 1: [2.0, 0.0, 6.0]}  # expert 0 says class 0, expert 1 class 2
    experts = [
        [[torch.randn(p.shape) for p in model.parameters()], constant_expert(model, biases[k])]
        for k in (0, 1)
    ]
    save_expert_file(tmp_path / "replay_buffer_0.pt", experts, {})
    snapshots = label_snapshots([tmp_path / "replay_buffer_0.pt"], -1, model)
    assert torch.equal(snapshots[1], flatten_params(experts[1][1]))
    images = torch.randn(3, 3, 8, 8)
    labels = torch.tensor([0, 1, 2])
    with pytest.warns(UserWarning, match="1 synthetic image"):
        soft = initial_soft_labels(Student(model), images, labels, snapshots, torch.device("cpu"))
    assert torch.allclose(soft[0], torch.tensor(biases[0]))  # only expert 0 is right
    assert torch.allclose(soft[2], torch.tensor(biases[1]))  # only expert 1 is right
    assert torch.allclose(soft[1], torch.tensor([3.0, 0.5, 3.0]))  # nobody: mean of both


def test_label_snapshots_refuse_another_model(tmp_path):
    small = get_network("ConvNetD1", 3, 3, (8, 8))
    other = get_network("ConvNetD1", 3, 5, (8, 8))
    snapshot = [p.detach().clone() for p in other.parameters()]
    save_expert_file(tmp_path / "replay_buffer_0.pt", [[snapshot]], {})
    with pytest.raises(UserError, match="another model or data set"):
        label_snapshots([tmp_path / "replay_buffer_0.pt"], -1, small)
