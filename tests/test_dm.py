"""Distribution matching (utils/dm.py): feature sizes, filter 2, the loss against independent
computations, the BatchNorm joint forward, and ratio 0 of filter 1 reproducing the plain run."""

import pytest
import torch
import torch.nn.functional as F

from utils.condense import apply_siamese, fresh_network, siamese_draw
from utils.dm import (
    block_outputs,
    class_dm_loss,
    dm_features,
    dm_step,
    embedding,
    joint_dm_loss,
)
from utils.filters import class_pool
from utils.io import UserError
from utils.networks import MLP, ConvNet, get_network

C, IM = 3, (8, 8)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize(
    "name, channel, size, blocks",
    [
        ("ConvNet", 3, (32, 32), [32768, 8192, 2048]),
        # 28x28 single-channel: the first convolution pads by 3, so the maps are 32x32 again
        ("ConvNet", 1, (28, 28), [32768, 8192, 2048]),
        ("ConvNetW32", 3, (32, 32), [8192, 2048, 512]),
        ("ConvNetD4", 3, (32, 32), [32768, 8192, 2048, 512]),
    ],
)
def test_documented_feature_sizes(name, channel, size, blocks):
    net = get_network(name, channel, 10, size)
    x = torch.randn(2, channel, *size)
    with torch.no_grad():
        assert [b.shape for b in block_outputs(net, x)] == [(2, n) for n in blocks]
        assert embedding(net, x).shape == (2, blocks[-1])
        assert dm_features(net, x, 0.0).shape == (2, blocks[-1])
        total = sum(blocks)
        assert dm_features(net, x, 0.25).shape == (2, total - int(0.25 * total))


def test_embedding_is_the_classifier_input():
    torch.manual_seed(0)
    net = ConvNet(3, C, IM, width=4, depth=2)
    x = torch.randn(4, 3, *IM)
    torch.testing.assert_close(net.classifier(embedding(net, x)), net(x))
    mlp = MLP(3, C, res=8)
    hidden = F.relu(mlp.fc2(F.relu(mlp.fc1(x.flatten(1)))))
    torch.testing.assert_close(embedding(mlp, x), hidden)
    with pytest.raises(UserError, match="depth_ratio needs the per-block features"):
        dm_features(mlp, x, 0.5)


def hooked_blocks(net, x):
    """Independent block outputs: forward hooks on every block's last module."""
    last = {}
    for name, module in net.features.named_children():
        last[name[-1]] = module
    captured = []
    hooks = [
        m.register_forward_hook(lambda m, i, o: captured.append(o.flatten(1)))
        for m in last.values()
    ]
    net(x)
    for h in hooks:
        h.remove()
    return captured


@pytest.mark.parametrize("ratio", [0.1, 0.5, 0.8, 0.95])
def test_multilayer_features_drop_the_first_int_ratio_f(ratio):
    torch.manual_seed(1)
    net = ConvNet(3, C, IM, width=4, depth=3)  # blocks of 64 + 16 + 4 values
    x = torch.randn(3, 3, *IM)
    full = torch.cat(hooked_blocks(net, x), dim=1)
    assert full.shape[1] == 84
    torch.testing.assert_close(dm_features(net, x, ratio), full[:, int(ratio * 84) :])


def toy_data(n_per_class=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(C).repeat(n_per_class)
    images = torch.randn(len(labels), 3, *IM, generator=g) + labels.view(-1, 1, 1, 1)
    return images, labels


def plain_dm_loss(net, reals, syns, draws):
    """DM as written: per class, |mean embed(real) - mean embed(syn)|^2, last block only."""
    loss = 0
    for real, syn, draw in zip(reals, syns, draws, strict=True):
        e_real = net.features(apply_siamese(real, draw)).flatten(1).detach()
        e_syn = net.features(apply_siamese(syn, draw)).flatten(1)
        loss = loss + torch.sum((e_real.mean(0) - e_syn.mean(0)) ** 2)
    return loss


def draw_batches(pool, images, image_syn, batch_real, seed, dsa=True):
    g = torch.Generator().manual_seed(seed)
    reals, syns, draws = [], [], []
    ipc = len(image_syn) // len(pool)
    for c, members in enumerate(pool):
        reals.append(images[members[torch.randperm(len(members), generator=g)[:batch_real]]])
        syns.append(image_syn[c * ipc : (c + 1) * ipc])
        draws.append(
            siamese_draw(IM, "color_crop_cutout_flip_scale_rotate", generator=g) if dsa else None
        )
    return reals, syns, draws


def test_ratio_zero_step_is_plain_dm_loss_and_gradient():
    images, labels = toy_data()
    pool = class_pool(labels, C)
    net = fresh_network("ConvNetD2", 3, C, IM, generator=torch.Generator().manual_seed(0))
    image_syn = torch.randn(C * 2, 3, *IM).requires_grad_(True)
    loss = dm_step(
        net, image_syn, pool, images, batch_real=5, generator=torch.Generator().manual_seed(7)
    )
    assert not any(p.requires_grad for p in net.parameters()) and net.training
    reals, syns, draws = draw_batches(pool, images, image_syn, 5, seed=7)
    expected = plain_dm_loss(net, reals, syns, draws)
    (grad,) = torch.autograd.grad(expected, image_syn)
    torch.testing.assert_close(loss, expected.detach())
    torch.testing.assert_close(image_syn.grad, grad)


def test_class_losses_sum_to_the_joint_loss_without_batchnorm():
    images, labels = toy_data()
    torch.manual_seed(2)
    net = ConvNet(3, C, IM, width=4, depth=2)
    image_syn = torch.randn(C * 3, 3, *IM)
    reals, syns, draws = draw_batches(class_pool(labels, C), images, image_syn, 5, seed=1)
    for ratio in (0.0, 0.4):
        per_class = sum(
            class_dm_loss(net, r, s, ratio=ratio, draw=d)
            for r, s, d in zip(reals, syns, draws, strict=True)
        )
        joint = joint_dm_loss(net, reals, syns, ratio=ratio, draws=draws)
        torch.testing.assert_close(per_class, joint)


def test_batchnorm_networks_take_all_classes_in_one_forward():
    images, labels = toy_data()
    pool = class_pool(labels, C)
    g = torch.Generator().manual_seed(3)
    net = ConvNet(3, C, IM, width=4, depth=2, norm="batchnorm")
    image_syn = torch.randn(C * 2, 3, *IM, generator=g).requires_grad_(True)
    loss = dm_step(
        net, image_syn, pool, images, batch_real=4, generator=torch.Generator().manual_seed(8)
    )
    reals, syns, draws = draw_batches(pool, images, image_syn, 4, seed=8)
    x_real = torch.cat([apply_siamese(r, d) for r, d in zip(reals, draws, strict=True)])
    x_syn = torch.cat([apply_siamese(s, d) for s, d in zip(syns, draws, strict=True)])
    e_real = net.features(x_real).flatten(1).detach().view(C, 4, -1).mean(1)
    e_syn = net.features(x_syn).flatten(1).view(C, 2, -1).mean(1)
    expected = ((e_real - e_syn) ** 2).sum()
    torch.testing.assert_close(loss, expected.detach())
    torch.testing.assert_close(image_syn.grad, torch.autograd.grad(expected, image_syn)[0])
    # per-class forwards would see other batch statistics: a different loss
    separate = sum(
        class_dm_loss(net, r, s, draw=d) for r, s, d in zip(reals, syns, draws, strict=True)
    )
    assert abs(separate.item() - loss.item()) > 1e-4


def test_joint_loss_handles_classes_with_fewer_images_than_batch_real():
    images, labels = toy_data(n_per_class=6)
    order = torch.stack([torch.nonzero(labels == c).flatten() for c in range(C)])
    pool = class_pool(labels, C, order, remove_hard=0.5)  # 3 images per class
    net = ConvNet(3, C, IM, width=4, depth=2, norm="batchnorm")
    image_syn = torch.randn(C, 3, *IM).requires_grad_(True)
    loss = dm_step(
        net, image_syn, pool, images, batch_real=256, generator=torch.Generator().manual_seed(0)
    )
    assert torch.isfinite(loss) and image_syn.grad is not None


def run_dm(pool, images, ratio=0.0, iterations=3):
    g = torch.Generator().manual_seed(0)
    image_syn = torch.randn(C * 2, 3, *IM, generator=g).requires_grad_(True)
    opt = torch.optim.SGD([image_syn], lr=1.0, momentum=0.5)
    for _ in range(iterations):
        net = fresh_network("ConvNetD2", 3, C, IM, generator=g)
        opt.zero_grad()
        dm_step(net, image_syn, pool, images, batch_real=6, depth_ratio=ratio, generator=g)
        opt.step()
    return image_syn.detach()


def test_filter_ratio_zero_is_bit_identical_and_filters_change_the_result():
    images, labels = toy_data()
    order = torch.stack([torch.nonzero(labels == c).flatten().flip(0) for c in range(C)])
    plain = run_dm(class_pool(labels, C), images)
    assert torch.equal(plain, run_dm(class_pool(labels, C, order, remove_easy=0.0), images))
    assert not torch.equal(plain, run_dm(class_pool(labels, C, order, remove_easy=0.5), images))
    assert not torch.equal(plain, run_dm(class_pool(labels, C), images, ratio=0.5))


def test_bad_settings():
    images, labels = toy_data()
    net = ConvNet(3, C, IM, width=4, depth=2)
    image_syn = torch.randn(C, 3, *IM, requires_grad=True)
    g = torch.Generator()
    with pytest.raises(UserError, match="depth_ratio=1.5 is outside"):
        dm_step(net, image_syn, class_pool(labels, C), images, depth_ratio=1.5, generator=g)
    with pytest.raises(UserError, match="batch_real=0"):
        dm_step(net, image_syn, class_pool(labels, C), images, batch_real=0, generator=g)
