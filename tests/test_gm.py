"""Gradient matching (utils/gm.py) and the pieces it shares with DM (utils/condense.py)."""

import math

import pytest
import torch
import torch.nn.functional as F

from utils.augment import apply_dsa
from utils.condense import apply_siamese, fresh_network, has_batchnorm, siamese_draw
from utils.filters import class_pool
from utils.gm import (
    EPS,
    GMSettings,
    class_gm_loss,
    depth_mask,
    freeze_batchnorm,
    get_loops,
    gm_iteration,
    gm_outer_step,
    match_distance,
    train_on_synthetic,
)
from utils.io import UserError
from utils.networks import ConvNet

C, IM = 3, (8, 8)


pytestmark = pytest.mark.usefixtures("one_thread")


def d64(rows):
    return torch.tensor(rows, dtype=torch.float64)


# ---- match_distance ----------------------------------------------------------------------------


def known_cosines():
    """A conv gradient [2, 1, 1, 2] with row cosines 1 and 1/sqrt(2), a linear [1, 2] with
    cosine 0, a bias whose two sides disagree completely."""
    real = [d64([[1, 0], [0, 1]]).view(2, 1, 1, 2), d64([[3, 4]]), d64([5, -7])]
    syn = [d64([[2, 0], [1, 1]]).view(2, 1, 1, 2), d64([[-4, 3]]), d64([-1, 9])]
    return real, syn


def test_ours_by_hand():
    real, syn = known_cosines()
    expected = (1 - 2 / (2 + EPS)) + (1 - 1 / (math.sqrt(2) + EPS)) + (1 - 0 / (25 + EPS))
    assert match_distance(real, syn, "ours").item() == pytest.approx(expected, rel=1e-12)


def test_one_dimensional_tensors_contribute_zero():
    real, syn = known_cosines()
    assert match_distance(real[2:], syn[2:], "ours").item() == 0
    with_bias = match_distance(real, syn, "ours")
    without = match_distance(real[:2], syn[:2], "ours")
    assert with_bias.item() == without.item()


def test_three_dimensional_tensor_is_rows_of_its_first_axis():
    # a LayerNorm weight [C, h, w] is matched as [C, h*w], like a linear [C, h*w]
    g, s = torch.randn(2, 3, 4, dtype=torch.float64), torch.randn(2, 3, 4, dtype=torch.float64)
    flat = match_distance([g.view(2, 12)], [s.view(2, 12)], "ours")
    assert match_distance([g], [s], "ours").item() == pytest.approx(flat.item(), rel=1e-12)


def test_mse_and_cos_by_hand():
    real, syn = known_cosines()
    # flat real (1,0,0,1,3,4,5,-7), flat syn (2,0,1,1,-4,3,-1,9)
    mse = 1 + 0 + 1 + 0 + 49 + 1 + 36 + 256
    assert match_distance(real, syn, "mse").item() == pytest.approx(mse, rel=1e-12)
    dot = 2 + 0 + 0 + 1 - 12 + 12 - 5 - 63
    norms = math.sqrt(1 + 1 + 9 + 16 + 25 + 49) * math.sqrt(4 + 1 + 1 + 16 + 9 + 1 + 81)
    assert match_distance(real, syn, "cos").item() == pytest.approx(1 - dot / (norms + EPS))


def test_unknown_metric_is_a_user_error():
    real, syn = known_cosines()
    with pytest.raises(UserError, match="dis_metric='l1' is unknown"):
        match_distance(real, syn, "l1")


# ---- filter 2: the depth mask ------------------------------------------------------------------

SHAPES = [torch.Size(s) for s in ((4, 3, 1, 1), (4,), (2, 4), (2,))]  # P = 12 + 4 + 8 + 2 = 26


def test_depth_mask_by_hand():
    # k = int(0.3 * 26) = 7: conv rows start at 0, 3, 6, 9; row 2 (coordinates 6..8) is cut -> out
    mask = depth_mask(SHAPES, 0.3)
    assert mask.dropped == 7 and mask.first_rows == (3, 0, 0, 0)
    # k = int(0.7 * 26) = 18: conv and its bias gone, linear row 0 (16..19) cut -> out
    mask = depth_mask(SHAPES, 0.7)
    assert mask.dropped == 18 and mask.first_rows == (4, 4, 1, 0)
    assert depth_mask(SHAPES, 0.0) is None


@pytest.mark.parametrize("ratio", [0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.999])
def test_depth_mask_drops_exactly_the_rows_starting_below_k(ratio):
    shapes = [p.shape for p in ConvNet(3, 10, (8, 8), width=4, depth=2).parameters()]
    total = sum(s.numel() for s in shapes)
    k = math.floor(ratio * total)
    mask = depth_mask(shapes, ratio)
    assert mask.dropped == k
    offset = 0
    for shape, first in zip(shapes, mask.first_rows, strict=True):
        rows = shape[0] if len(shape) > 1 else shape.numel()
        length = shape.numel() // rows
        kept = [r for r in range(rows) if offset + r * length >= k]
        assert first == (kept[0] if kept else rows)
        offset += shape.numel()


def test_masked_distance_is_the_sum_over_kept_rows():
    g = torch.Generator().manual_seed(0)
    real = [torch.randn(s, generator=g, dtype=torch.float64) for s in SHAPES]
    syn = [torch.randn(s, generator=g, dtype=torch.float64) for s in SHAPES]
    mask = depth_mask(SHAPES, 0.3)  # conv rows 0-2 dropped, rows 3 and linear rows 0-1 kept
    rows = [(real[0].view(4, 3)[3], syn[0].view(4, 3)[3])]
    rows += [(real[2][r], syn[2][r]) for r in range(2)]
    expected = sum(1 - (a @ b) / (a.norm() * b.norm() + EPS) for a, b in rows)
    assert match_distance(real, syn, "ours", mask).item() == pytest.approx(expected.item())
    # mse and cos drop exactly the first k coordinates of the flat vector
    flat_r, flat_s = (
        torch.cat([t.reshape(-1) for t in real]),
        torch.cat([t.reshape(-1) for t in syn]),
    )
    mse = (flat_r[7:] - flat_s[7:]).square().sum()
    assert match_distance(real, syn, "mse", mask).item() == pytest.approx(mse.item())
    assert match_distance(real, syn, "mse", None).item() == pytest.approx(
        (flat_r - flat_s).square().sum().item()
    )


def test_depth_ratio_outside_unit_interval_is_a_user_error():
    with pytest.raises(UserError, match="depth_ratio=1.0 is outside"):
        depth_mask(SHAPES, 1.0)


# ---- the GM loss: gradient check and BatchNorm -------------------------------------------------


def tiny_net(norm="instancenorm", act="sigmoid", seed=0):
    # sigmoid: with ReLU the loss has jumps (its gradient holds ReLU's step) and finite
    # differences would be meaningless at them
    torch.manual_seed(seed)
    return ConvNet(3, C, IM, width=4, depth=2, act=act, norm=norm).double()


@pytest.mark.parametrize("metric", ["ours", "mse", "cos"])
@pytest.mark.parametrize("augmented, ratio", [(False, 0.0), (True, 0.3)])
def test_gm_loss_gradient_check(metric, augmented, ratio):
    g = torch.Generator().manual_seed(1)
    net = tiny_net()
    real = torch.randn(5, 3, *IM, generator=g, dtype=torch.float64)
    syn = torch.randn(2, 3, *IM, generator=g, dtype=torch.float64, requires_grad=True)
    draw = siamese_draw(IM, "color_scale_rotate", generator=g) if augmented else None
    mask = depth_mask([p.shape for p in net.parameters()], ratio)

    def loss(x):
        return class_gm_loss(net, real, x, 1, metric=metric, mask=mask, draw=draw)

    assert torch.autograd.gradcheck(loss, (syn,), eps=1e-6, atol=1e-6, rtol=1e-4, fast_mode=True)


def test_gm_loss_is_the_distance_of_the_two_gradients():
    g = torch.Generator().manual_seed(2)
    net = tiny_net(act="relu")
    real = torch.randn(6, 3, *IM, generator=g, dtype=torch.float64)
    syn = torch.randn(2, 3, *IM, generator=g, dtype=torch.float64)
    draw = siamese_draw(IM, "crop", generator=g)
    params = list(net.parameters())
    labels = torch.full((6,), 2)
    g_real = torch.autograd.grad(F.cross_entropy(net(apply_siamese(real, draw)), labels), params)
    g_syn = torch.autograd.grad(F.cross_entropy(net(apply_siamese(syn, draw)), labels[:2]), params)
    expected = match_distance(g_real, g_syn, "ours")
    assert class_gm_loss(net, real, syn, 2, draw=draw).item() == pytest.approx(expected.item())


def toy_data(n_per_class=20, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(C).repeat(n_per_class)
    images = torch.randn(len(labels), 3, *IM, generator=g, dtype=dtype) + labels.view(-1, 1, 1, 1)
    return images, labels


def test_freeze_batchnorm_sets_statistics_from_16_per_class_then_eval():
    images, labels = toy_data(dtype=torch.float64)
    pool = class_pool(labels, C)
    net = tiny_net(norm="batchnorm", act="relu")
    assert has_batchnorm(net) and not has_batchnorm(tiny_net())
    freeze_batchnorm(net, images, pool, generator=torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    idx = torch.cat([m[torch.randperm(len(m), generator=g)[:16]] for m in pool])
    conv0 = net.features.conv0(images[idx])
    expected = 0.1 * conv0.mean(dim=(0, 2, 3))  # momentum 0.1 from a zero running mean
    torch.testing.assert_close(net.features.norm0.running_mean, expected.detach())
    assert not net.features.norm0.training and not net.features.norm1.training
    assert net.features.conv0.training and net.training


def test_outer_step_matches_classes_with_batchnorm_frozen():
    images, labels = toy_data(dtype=torch.float64)
    pool = class_pool(labels, C)
    net, reference = tiny_net("batchnorm", "relu"), tiny_net("batchnorm", "relu")
    image_syn = torch.randn(C, 3, *IM, dtype=torch.float64, requires_grad=True)
    gm_outer_step(net, image_syn, pool, images, generator=torch.Generator().manual_seed(9))
    freeze_batchnorm(reference, images, pool, generator=torch.Generator().manual_seed(9))
    # the class forwards ran in eval mode: the statistics are still those of the 16 per class
    for name in ("norm0", "norm1"):
        a, b = getattr(net.features, name), getattr(reference.features, name)
        assert torch.equal(a.running_mean, b.running_mean) and not a.training
    assert image_syn.grad is not None and image_syn.grad.abs().sum() > 0


def test_outer_step_gradient_is_that_of_the_summed_loss():
    images, labels = toy_data(dtype=torch.float64)
    pool = class_pool(labels, C)
    net = tiny_net(act="relu")
    image_syn = torch.randn(C * 2, 3, *IM, dtype=torch.float64, requires_grad=True)
    total = gm_outer_step(
        net,
        image_syn,
        pool,
        images,
        batch_real=7,
        dsa=True,
        generator=torch.Generator().manual_seed(3),
    )
    # the same draws, in the same order, summed and back-propagated once
    g = torch.Generator().manual_seed(3)
    loss = 0
    for c, members in enumerate(pool):
        real = images[members[torch.randperm(len(members), generator=g)[:7]]]
        draw = siamese_draw(IM, "color_crop_cutout_flip_scale_rotate", generator=g)
        loss = loss + class_gm_loss(net, real, image_syn[2 * c : 2 * c + 2], c, draw=draw)
    (expected,) = torch.autograd.grad(loss, image_syn)
    assert total.item() == pytest.approx(loss.item())
    torch.testing.assert_close(image_syn.grad, expected)
    assert all(p.grad is None for p in net.parameters())


# ---- inner loop and loop table -----------------------------------------------------------------


def test_loop_table_and_overrides():
    table = {1: (1, 1), 10: (10, 50), 20: (20, 25), 30: (30, 20), 40: (40, 15), 50: (50, 10)}
    for ipc, loops in table.items():
        assert get_loops(ipc) == loops
    assert get_loops(100) == get_loops(500) == (50, 10)
    assert get_loops(10, outer_loop=3) == (3, 50)
    assert get_loops(10, inner_loop=0) == (10, 0)
    assert get_loops(7, outer_loop=5, inner_loop=20) == (5, 20)
    with pytest.raises(UserError, match="ipc=7 has no default"):
        get_loops(7, outer_loop=5)
    with pytest.raises(UserError, match="outer_loop=0"):
        get_loops(1, outer_loop=0)


def test_inner_training_epochs_batches_and_determinism():
    images, labels = toy_data(n_per_class=3)  # 9 images
    sizes = []

    def run(dsa, seed=0, epochs=2):
        net = tiny_net(act="relu").float()
        hook = net.register_forward_pre_hook(lambda m, inputs: sizes.append(len(inputs[0])))
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        g = torch.Generator().manual_seed(seed)
        train_on_synthetic(net, opt, images, labels, epochs=epochs, batch=4, dsa=dsa, generator=g)
        hook.remove()
        return torch.cat([p.detach().reshape(-1) for p in net.parameters()])

    w0 = run(False, epochs=0)
    assert sizes == []
    w = run(False)
    assert sizes == [4, 4, 1, 4, 4, 1]  # two epochs of ceil(9 / 4) batches
    assert torch.equal(w, run(False)) and not torch.equal(w, w0)
    assert not torch.equal(w, run(True))  # DSA changes what the network sees


def test_gm_iteration_is_reproducible_and_ratio_zero_filter_is_bit_identical():
    images, labels = toy_data()
    order = torch.stack([torch.nonzero(labels == c).flatten().flip(0) for c in range(C)])
    settings = GMSettings(outer_loop=2, inner_loop=2, batch_real=8, dsa=True)

    def run(pool, iterations=2, settings=settings):
        g = torch.Generator().manual_seed(0)
        image_syn = torch.randn(C * 2, 3, *IM, generator=g).requires_grad_(True)
        label_syn = torch.arange(C).repeat_interleave(2)
        opt = torch.optim.SGD([image_syn], lr=0.1, momentum=0.5)
        for _ in range(iterations):
            net = fresh_network("ConvNetD2", 3, C, IM, generator=g)
            loss = gm_iteration(net, image_syn, label_syn, opt, pool, images, settings, generator=g)
            assert math.isfinite(loss)
        return image_syn.detach()

    plain = run(class_pool(labels, C))
    assert torch.equal(plain, run(class_pool(labels, C, order, remove_hard=0.0)))
    assert not torch.equal(plain, run(class_pool(labels, C, order, remove_hard=0.5)))
    deep = GMSettings(outer_loop=2, inner_loop=2, batch_real=8, dsa=True, depth_ratio=0.5)
    assert not torch.equal(plain, run(class_pool(labels, C), settings=deep))


def test_settings_validation():
    with pytest.raises(UserError, match="dis_metric='euclid'"):
        GMSettings(1, 1, dis_metric="euclid").validate()
    with pytest.raises(UserError, match="depth_ratio=-0.5"):
        GMSettings(1, 1, depth_ratio=-0.5).validate()


# ---- shared helpers (utils/condense.py) --------------------------------------------------------


def test_fresh_network_depends_on_the_generator_only():
    state = torch.get_rng_state()
    a = fresh_network("ConvNetD2", 3, C, IM, generator=torch.Generator().manual_seed(4))
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is left alone
    torch.manual_seed(123)
    b = fresh_network("ConvNetD2", 3, C, IM, generator=torch.Generator().manual_seed(4))
    g = torch.Generator().manual_seed(4)
    fresh_network("ConvNetD2", 3, C, IM, generator=g)
    c = fresh_network("ConvNetD2", 3, C, IM, generator=g)
    for pa, pb, pc in zip(a.parameters(), b.parameters(), c.parameters(), strict=True):
        assert torch.equal(pa, pb)
        assert pa.dim() == 1 or not torch.equal(pa, pc)


@pytest.mark.parametrize("strategy", ["crop", "flip", "scale", "rotate", "cutout", "color"])
def test_siamese_draw_transforms_every_image_alike(strategy):
    g = torch.Generator().manual_seed(6)
    x = torch.randn(5, 3, *IM, generator=g)
    for _ in range(4):
        draw = siamese_draw(IM, strategy, generator=g)
        batch = apply_siamese(x, draw)
        for i in range(len(x)):  # the transformation of image i does not depend on the batch
            torch.testing.assert_close(batch[i : i + 1], apply_dsa(x[i : i + 1], draw))
    assert torch.equal(apply_siamese(x, None), x)
