"""utils/train_nets.py: the schedule of docs/algorithms.md#evaluation-protocol, stacked SGD, batched
== sequential, bf16."""

import copy

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import CLASSES, make_data, separable_prototypes, synset
from utils.augment import augment
from utils.evaluate import data_generators, init_networks
from utils.matching import soft_cross_entropy
from utils.train_nets import (
    TrainConfig,
    _StackedSGD,
    network_logits,
    networks_accuracy,
    train_networks,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def state_close(a: torch.nn.Module, b: torch.nn.Module, rtol=1e-4):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        x, y = sa[name].double(), sb[name].double()
        scale = y.abs().max().clamp_min(1e-6)
        assert (x - y).abs().max() <= rtol * scale, name


# ---- the optimizer and the schedule --------------------------------------------------------


def test_stacked_sgd_matches_torch_sgd_including_reset():
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(3, 4, 5, generator=g), torch.randn(3, 7, generator=g)]  # M = 3
    grads = [[torch.randn_like(p) for p in params] for _ in range(5)]
    stacked = [p.clone() for p in params]
    per_net = [[p[k].clone().requires_grad_() for p in params] for k in range(3)]
    optimizer = _StackedSGD(stacked, 0.1)
    torch_opts = [torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=5e-4) for ps in per_net]
    for step, grad in enumerate(grads):
        if step == 3:  # re-created with a smaller lr: momentum starts again from zero
            optimizer = _StackedSGD(stacked, 0.01)
            torch_opts = [
                torch.optim.SGD(ps, lr=0.01, momentum=0.9, weight_decay=5e-4) for ps in per_net
            ]
        optimizer.step(grad)
        for k, (ps, opt) in enumerate(zip(per_net, torch_opts, strict=True)):
            for p, gr in zip(ps, grad, strict=True):
                p.grad = gr[k].clone()
            opt.step()
    for k in range(3):
        for p, s in zip(per_net[k], stacked, strict=True):
            torch.testing.assert_close(s[k], p.detach(), rtol=1e-6, atol=1e-7)
    assert not torch.allclose(stacked[0], params[0])


def reference_training(net, images, labels, lr, generator, epochs, batch):
    """docs/algorithms.md#evaluation-protocol written out with torch.optim.SGD, augmentation
    off (strategy none)."""
    optimizer = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    for ep in range(epochs + 1):  # E + 1 passes
        for index in torch.randperm(len(images), generator=generator).split(batch):
            x = augment(images[index], dsa=True, strategy="none", generator=generator)
            loss = soft_cross_entropy(net(x), labels[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        if ep == epochs // 2 + 1:
            lr *= 0.1
            optimizer = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    return net


@pytest.mark.parametrize("batched", [False, True])
def test_lr_drops_after_pass_epochs_half_plus_one(batched):
    data = make_data()
    images, labels = synset(7)
    epochs, lr = 5, 0.05
    config = TrainConfig(epochs=epochs, batch_train=3, dsa_strategy="none")
    nets = init_networks("ConvNetW32", data, 0, [0])
    start = copy.deepcopy(nets[0])
    history = train_networks(nets, images, labels, lr, data_generators(0, [0]), config,
                             batched=batched)  # fmt: skip
    # passes 0..5; the drop follows pass 5 // 2 + 1 = 3, so passes 4 and 5 use lr / 10
    assert history.lr == pytest.approx([0.05, 0.05, 0.05, 0.05, 0.005, 0.005])
    assert history.loss.shape == (epochs + 1, 1)
    expected = reference_training(start, images, labels, lr, data_generators(0, [0])[0], epochs, 3)
    state_close(nets[0], expected, rtol=1e-5)


# ---- batched == sequential -----------------------------------------------------------------


@pytest.mark.parametrize(
    "model, soft, dsa", [("ConvNetW32", True, True), ("ConvNetBN", True, True),
                         ("ConvNetW32", False, False)],
)  # fmt: skip
def test_batched_ensemble_equals_sequential_trainings(model, soft, dsa):
    data = make_data()
    images, labels = synset(7, soft=soft)
    indices = [0, 1, 2]
    config = TrainConfig(epochs=3, batch_train=3, dsa=dsa)
    sequential = init_networks(model, data, 4, indices)
    batched = copy.deepcopy(sequential)
    initial = copy.deepcopy(sequential)
    hist_s = train_networks(sequential, images, labels, 0.05, data_generators(4, indices), config,
                            batched=False)  # fmt: skip
    hist_b = train_networks(batched, images, labels, 0.05, data_generators(4, indices), config,
                            batched=True)  # fmt: skip
    for s, b, init in zip(sequential, batched, initial, strict=True):
        state_close(b, s)
        moved = max(
            (p - q).abs().max() for p, q in zip(s.parameters(), init.parameters(), strict=True)
        )
        assert moved > 1e-3  # training happened, so equality is not trivial
    torch.testing.assert_close(hist_b.loss, hist_s.loss, rtol=1e-4, atol=1e-5)
    assert hist_b.lr == hist_s.lr
    logits_s = network_logits(sequential, data.images_test, batched=False)
    logits_b = network_logits(batched, data.images_test, batched=True)
    assert logits_s.shape == (3, len(data.images_test), CLASSES)
    torch.testing.assert_close(logits_b, logits_s, rtol=1e-4, atol=1e-4)
    chunked = network_logits(batched, data.images_test, batched=True, batch=7)  # 2 at a time
    torch.testing.assert_close(chunked, logits_b, rtol=1e-5, atol=1e-5)
    # the networks differ from each other: own initialisation, order and augmentation
    assert not torch.allclose(logits_s[0], logits_s[1])


def test_network_does_not_depend_on_its_ensemble():
    data = make_data()
    images, labels = synset(6)
    config = TrainConfig(epochs=2, batch_train=4)
    trio = init_networks("ConvNetW32", data, 9, [0, 1, 2])
    alone = init_networks("ConvNetW32", data, 9, [1])
    state_close(alone[0], trio[1], rtol=0)  # same initialisation
    train_networks(trio, images, labels, 0.05, data_generators(9, [0, 1, 2]), config)
    train_networks(alone, images, labels, 0.05, data_generators(9, [1]), config)
    state_close(alone[0], trio[1])


def test_bf16_runs_in_both_modes_and_stays_close_to_float32():
    data = make_data()
    nets = init_networks("ConvNetW32", data, 0, [0, 1])
    fp32 = network_logits(nets, data.images_test, batched=False)
    seq = network_logits(nets, data.images_test, amp="bf16", batched=False)
    bat = network_logits(nets, data.images_test, amp="bf16", batched=True)
    for logits in (seq, bat):
        assert not torch.equal(logits, fp32)  # bfloat16 was really used
        torch.testing.assert_close(logits, fp32, rtol=0.05, atol=0.05)


@pytest.mark.parametrize("soft", [True, False])
def test_soft_and_hard_labels_both_train(soft):
    data = make_data(prototypes=separable_prototypes(), noise=0.3)
    images, labels = data.images_train, data.labels_train
    targets = 4.0 * F.one_hot(labels, CLASSES).float() if soft else labels  # soft: logits
    config = TrainConfig(epochs=10, batch_train=6, dsa_strategy="none")
    nets = init_networks("ConvNetW32", data, 0, [0, 1])
    history = train_networks(nets, images, targets, 0.1, data_generators(0, [0, 1]), config)
    first, last = history.loss[0], history.loss[-1]
    assert (last < first - 0.1).all(), (first, last)  # about 1.13 -> 0.92
    assert networks_accuracy(nets, images, labels) == [100.0, 100.0]
