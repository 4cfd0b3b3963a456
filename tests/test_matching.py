import pytest
import torch
import torch.nn.functional as F

from utils.io import UserError
from utils.matching import (
    Student,
    make_mask,
    match_trajectory,
    matching_loss,
    plan_inner_steps,
    soft_cross_entropy,
)
from utils.networks import ConvNet

NUM_CLASSES, IPC, IM_SIZE = 4, 2, (8, 8)
NUM_SYN = NUM_CLASSES * IPC


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_problem(dtype=torch.float32, seed=0):
    """A width-8 depth-2 ConvNet, 4 classes x 2 synthetic 8x8 images, a target near w0."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = ConvNet(3, NUM_CLASSES, IM_SIZE, width=8, depth=2).to(dtype)
    student = Student(net)
    w_start = torch.cat([p.detach().reshape(-1) for p in net.parameters()])
    target = w_start + 0.05 * torch.randn(w_start.shape, generator=g, dtype=dtype)
    images = torch.randn(NUM_SYN, 3, *IM_SIZE, generator=g, dtype=dtype)
    labels = 3 * torch.randn(NUM_SYN, NUM_CLASSES, generator=g, dtype=dtype)
    return student, w_start, target, images, labels


def learnables(images, labels, lr=0.05):
    image_syn = images.clone().requires_grad_(True)
    label_syn = labels.clone().requires_grad_(True)
    syn_lr = torch.tensor(lr, dtype=images.dtype, requires_grad=True)
    return image_syn, label_syn, syn_lr


def make_plan(steps, batch_syn, augment=True, seed=1):
    return plan_inner_steps(
        NUM_SYN,
        steps,
        batch_syn,
        IM_SIZE,
        augment=augment,
        generator=torch.Generator().manual_seed(seed),
    )


def run(mode, problem, plan, *, mask="none", ratio=0.0, lr=0.05, threshold=None):
    student, w_start, target, images, labels = problem
    image_syn, label_syn, syn_lr = learnables(images, labels, lr)
    result = match_trajectory(
        student,
        image_syn,
        label_syn,
        syn_lr,
        w_start,
        target,
        plan,
        mask=make_mask(mask, ratio),
        memory=mode,
        threshold=threshold,
    )
    return result, image_syn.grad, label_syn.grad, syn_lr.grad


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("batch_syn", [None, 3])
@pytest.mark.parametrize("mask", ["none", "depth", "loss"])
@pytest.mark.parametrize("steps", [1, 2, 5])  # 1: the step kept from the unroll is also the first
def test_recompute_gives_the_graph_gradient(mask, batch_syn, steps):
    problem = tiny_problem()
    plan = make_plan(steps, batch_syn)  # batch_syn 3 of 8 images: chunks of 2, 3, 3, then 2
    assert all(aug is not None and aug.ops for aug in plan.aug)  # DSA is on
    graph = run("graph", problem, plan, mask=mask, ratio=0.5)
    recompute = run("recompute", problem, plan, mask=mask, ratio=0.5)
    assert recompute[0].loss == pytest.approx(graph[0].loss, rel=1e-5)
    assert not graph[0].skipped and not recompute[0].skipped
    for g, r in zip(graph[1:], recompute[1:], strict=True):
        assert g.norm() > 0
        assert rel_err(r, g) < 1e-4


def test_gradient_matches_finite_differences_in_graph_mode():
    problem = tiny_problem(torch.float64)
    student, w_start, target, images, labels = problem
    plan = make_plan(3, 3)  # DSA on: the plan fixes its parameters, so the loss is a function
    _, grad_image, grad_label, grad_lr = run("graph", problem, plan, mask="depth", ratio=0.25)

    def loss_at(images_, labels_, lr_):
        moved = (student, w_start, target, images_, labels_)
        return run("graph", moved, plan, mask="depth", ratio=0.25, lr=lr_)[0].loss

    eps = 1e-6
    for coordinate in [(0, 0, 3, 4), (5, 2, 7, 0), (7, 1, 2, 6)]:
        bump = torch.zeros_like(images)
        bump[coordinate] = eps
        numeric = loss_at(images + bump, labels, 0.05) - loss_at(images - bump, labels, 0.05)
        assert numeric / (2 * eps) == pytest.approx(grad_image[coordinate].item(), rel=1e-5)
    bump = torch.zeros_like(labels)
    bump[2, 1] = eps
    numeric = loss_at(images, labels + bump, 0.05) - loss_at(images, labels - bump, 0.05)
    assert numeric / (2 * eps) == pytest.approx(grad_label[2, 1].item(), rel=1e-5)
    numeric = loss_at(images, labels, 0.05 + eps) - loss_at(images, labels, 0.05 - eps)
    assert numeric / (2 * eps) == pytest.approx(grad_lr.item(), rel=1e-5)


def test_depth_mask_drops_exactly_the_first_coordinates():
    g = torch.Generator().manual_seed(0)
    w_end, w_start, target = torch.randn(3, 1003, generator=g, dtype=torch.float64)
    k = int(0.37 * 1003)  # 371
    expected = ((w_end[k:] - target[k:]) ** 2).sum() / ((w_start[k:] - target[k:]) ** 2).sum()
    loss = matching_loss(w_end, w_start, target, make_mask("depth", 0.37))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-12)
    # one coordinate more or less would change the value
    off_by_one = ((w_end[k + 1 :] - target[k + 1 :]) ** 2).sum() / (
        (w_start[k + 1 :] - target[k + 1 :]) ** 2
    ).sum()
    assert loss.item() != pytest.approx(off_by_one.item(), rel=1e-12)
    assert make_mask("depth", 0.37)(torch.zeros(1003)) == slice(371, None)


def test_loss_mask_keeps_the_largest_errors():
    g = torch.Generator().manual_seed(1)
    w_start, target = torch.randn(2, 500, generator=g, dtype=torch.float64)
    w_end = torch.randn(500, generator=g, dtype=torch.float64, requires_grad=True)
    errors = (w_end.detach() - target) ** 2
    kept = torch.sort(errors).indices[int(0.6 * 500) :]
    expected = errors[kept].sum() / ((w_start[kept] - target[kept]) ** 2).sum()
    loss = matching_loss(w_end, w_start, target, make_mask("loss", 0.6))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-12)
    dropped = torch.ones(500, dtype=torch.bool)
    dropped[kept] = False
    assert errors[kept].min() >= errors[dropped].max()
    # gradient flows through the kept terms only; the selection itself is constant
    loss.backward()
    expected_grad = torch.zeros(500, dtype=torch.float64)
    denominator = ((w_start[kept] - target[kept]) ** 2).sum()
    expected_grad[kept] = 2 * (w_end.detach()[kept] - target[kept]) / denominator
    torch.testing.assert_close(w_end.grad, expected_grad)


@pytest.mark.parametrize("mask", ["none", "depth", "loss"])
def test_ratio_zero_is_the_unmasked_loss(mask):
    w_end, w_start, target = torch.randn(3, 200, generator=torch.Generator().manual_seed(2))
    plain = ((w_end - target) ** 2).sum() / ((w_start - target) ** 2).sum()
    assert matching_loss(w_end, w_start, target, make_mask(mask, 0.0)).item() == pytest.approx(
        plain.item(), rel=1e-6
    )


@pytest.mark.parametrize("mode", ["graph", "recompute"])
@pytest.mark.parametrize("mask", ["none", "depth", "loss"])
def test_loss_is_one_when_the_student_does_not_move(mode, mask):
    problem = tiny_problem()
    result, *_ = run(mode, problem, make_plan(3, None), mask=mask, ratio=0.5, lr=0.0)
    assert result.loss == pytest.approx(1.0, abs=1e-6)


def test_plan_chunks_pop_the_last_chunk_first_and_cover_each_permutation():
    plan = plan_inner_steps(
        10, 5, 4, IM_SIZE, augment=False, generator=torch.Generator().manual_seed(3)
    )
    assert [len(b) for b in plan.batches] == [2, 4, 4, 2, 4]
    assert plan.aug == [None] * 5
    first = torch.cat(plan.batches[:3])
    assert sorted(first.tolist()) == list(range(10))
    # an independent replay: permutation split into chunks of 4, consumed from the end
    g = torch.Generator().manual_seed(3)
    perm1, perm2 = torch.randperm(10, generator=g), torch.randperm(10, generator=g)
    expected = [perm1[8:], perm1[4:8], perm1[:4], perm2[8:], perm2[4:8]]
    for got, want in zip(plan.batches, expected, strict=True):
        assert torch.equal(got, want)


def test_plan_with_batch_at_least_the_set_uses_all_images_each_step_with_dsa():
    for batch_syn in (None, NUM_SYN, 1000):
        plan = make_plan(4, batch_syn, augment=True)
        for batch, aug in zip(plan.batches, plan.aug, strict=True):
            assert sorted(batch.tolist()) == list(range(NUM_SYN))
            assert all(len(v) == NUM_SYN for _, params in aug.ops for v in params.values())
        assert len({tuple(b.tolist()) for b in plan.batches}) > 1  # re-permuted


def test_soft_cross_entropy_with_confident_targets_is_hard_cross_entropy():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(6, 5, generator=g)
    hard = torch.tensor([0, 4, 2, 2, 1, 3])
    targets = 1e4 * F.one_hot(hard, 5).float()
    assert soft_cross_entropy(logits, targets).item() == pytest.approx(
        F.cross_entropy(logits, hard).item(), rel=1e-6
    )


@pytest.mark.parametrize("mode", ["graph", "recompute"])
def test_threshold_skip_leaves_grads_untouched(mode):
    problem = tiny_problem()
    plan = make_plan(3, None)
    result, grad_image, grad_label, grad_lr = run(mode, problem, plan, threshold=0.5)
    assert result.skipped and result.loss > 0.5
    assert grad_image is None and grad_label is None and grad_lr is None
    result, grad_image, *_ = run(mode, problem, plan, threshold=result.loss + 1e-3)
    assert not result.skipped and grad_image is not None
    # a diverged unroll (NaN loss) is skipped whatever the threshold
    student, w_start, target, images, labels = problem
    nan_problem = (student, w_start, target, images.clone().fill_(float("nan")), labels)
    result, grad_image, *_ = run(mode, nan_problem, plan, threshold=1e30)
    assert result.skipped and result.loss != result.loss and grad_image is None


@pytest.mark.parametrize("mode", ["graph", "recompute"])
def test_gradients_accumulate_into_existing_grad(mode):
    student, w_start, target, images, labels = problem = tiny_problem()
    plan = make_plan(2, 3)
    _, fresh_image, fresh_label, fresh_lr = run(mode, problem, plan)
    image_syn, label_syn, syn_lr = learnables(images, labels)
    image_syn.grad = torch.ones_like(images)
    label_syn.grad = torch.ones_like(labels)
    syn_lr.grad = torch.tensor(1.0)
    match_trajectory(student, image_syn, label_syn, syn_lr, w_start, target, plan, memory=mode)
    torch.testing.assert_close(image_syn.grad, fresh_image + 1)
    torch.testing.assert_close(label_syn.grad, fresh_label + 1)
    torch.testing.assert_close(syn_lr.grad, fresh_lr + 1)


def test_student_on_the_models_own_parameters_is_the_model():
    net = ConvNet(3, NUM_CLASSES, IM_SIZE, width=8, depth=2)
    student = Student(net)
    flat = torch.cat([p.detach().reshape(-1) for p in net.parameters()])
    assert student.num_params == flat.numel() == sum(p.numel() for p in net.parameters())
    assert student.shapes == [p.shape for p in net.parameters()]
    x = torch.randn(5, 3, *IM_SIZE)
    torch.testing.assert_close(student(x, flat), net(x))
    # a different vector gives a different function, and gradients reach the vector
    flat2 = (flat + 0.1).requires_grad_(True)
    out = student(x, flat2)
    assert not torch.allclose(out, net(x))
    out.sum().backward()
    assert flat2.grad is not None and flat2.grad.abs().sum() > 0


def test_bad_mask_ratio_and_mode_are_user_errors():
    w = torch.zeros(10)
    for ratio in (1.0, -0.1, 1.5):
        with pytest.raises(UserError, match="outside"):
            matching_loss(w + 1, w, w + 2, make_mask("depth", ratio))
    with pytest.raises(UserError, match="mask"):
        make_mask("deep", 0.5)
    student, w_start, target, images, labels = tiny_problem()
    with pytest.raises(UserError, match="memory"):
        match_trajectory(
            student,
            *learnables(images, labels),
            w_start,
            target,
            make_plan(1, None),
            memory="lowmem",
        )
    with pytest.raises(UserError, match="batch_syn"):
        plan_inner_steps(8, 2, 0, IM_SIZE, augment=False)


@pytest.mark.parametrize("value", [-0.1, 1.0, 1.5])
def test_ratio_outside_unit_interval_is_refused(value):
    with pytest.raises(UserError, match="depth_ratio"):
        make_mask("depth", value, key="depth_ratio")


def test_ratio_inside_is_accepted():
    make_mask("loss", 0.0, key="loss_ratio")
    make_mask("loss", 0.75, key="loss_ratio")


def test_tensors_without_requires_grad_get_no_grad_and_the_others_still_match():
    student, w_start, target, images, labels = tiny_problem()
    plan = make_plan(3, 3)
    grads = {}
    for mode in ("graph", "recompute"):
        image_syn, label_syn, syn_lr = learnables(images, labels)
        label_syn.requires_grad_(False)  # e.g. hard-label ablations keep the labels fixed
        match_trajectory(student, image_syn, label_syn, syn_lr, w_start, target, plan, memory=mode)
        assert label_syn.grad is None
        grads[mode] = (image_syn.grad, syn_lr.grad)
    for g, r in zip(grads["graph"], grads["recompute"], strict=True):
        assert rel_err(r, g) < 1e-4
