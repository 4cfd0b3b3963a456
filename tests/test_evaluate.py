"""utils/evaluate.py: pools, input checks, the ALGORITHMS 8 schedule, batched == sequential."""

import copy
import statistics

import pytest
import torch
import torch.nn.functional as F

from utils.augment import augment
from utils.data import Data
from utils.evaluate import (
    EvalResult,
    TrainConfig,
    _StackedSGD,
    assign_networks,
    check_synset,
    data_generators,
    eval_pool,
    evaluate_synset,
    init_networks,
    network_logits,
    networks_accuracy,
    random_real_set,
    train_networks,
)
from utils.io import UserError
from utils.matching import soft_cross_entropy

CLASSES, SIZE = 3, 8


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny tensors: on a busy 2-core machine a second thread mostly waits for the first.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_data(per_class_train=4, per_class_test=4, seed=0, prototypes=None, noise=1.0):
    """A fake 3-class 3x8x8 data set: class prototype + Gaussian noise (prototypes random)."""
    g = torch.Generator().manual_seed(seed)
    if prototypes is None:
        prototypes = torch.randn(CLASSES, 3, SIZE, SIZE, generator=g)

    def split(per_class):
        labels = torch.arange(CLASSES).repeat_interleave(per_class)
        images = prototypes[labels] + noise * torch.randn(len(labels), 3, SIZE, SIZE, generator=g)
        return images, labels

    train, test = split(per_class_train), split(per_class_test)
    return Data(
        name="Fake", channel=3, im_size=(SIZE, SIZE), num_classes=CLASSES,
        class_names=["a", "b", "c"], mean=[0.0] * 3, std=[1.0] * 3,
        images_train=train[0], labels_train=train[1], images_test=test[0], labels_test=test[1],
    )  # fmt: skip


def separable_prototypes():
    return 2.0 * torch.randn(CLASSES, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3))


def synset(n=7, soft=True, seed=1):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, SIZE, SIZE, generator=g)
    labels = torch.randn(n, CLASSES, generator=g) if soft else torch.arange(n) % CLASSES
    return images, labels


def state_close(a: torch.nn.Module, b: torch.nn.Module, rtol=1e-4):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        x, y = sa[name].double(), sb[name].double()
        scale = y.abs().max().clamp_min(1e-6)
        assert (x - y).abs().max() <= rtol * scale, name


# ---- pools ---------------------------------------------------------------------------------


def test_every_eval_mode_expands_to_its_documented_list():
    # written out again from REFERENCE_NOTES 7.3 / ALGORITHMS 3, not copied from the module
    fixed = {
        "M": ["ConvNet", "AlexNet", "VGG11", "ResNet18"],
        "W": ["ConvNetW32", "ConvNetW64", "ConvNetW128", "ConvNetW256"],
        "D": ["ConvNetD1", "ConvNetD2", "ConvNetD3", "ConvNetD4"],
        "A": ["ConvNetAS", "ConvNetAR", "ConvNetAL"],
        "P": ["ConvNetNP", "ConvNetMP", "ConvNetAP"],
        "N": ["ConvNetNN", "ConvNetBN", "ConvNetLN", "ConvNetIN", "ConvNetGN"],
        "BN": ["ConvNet", "ConvNetBN", "ResNet18", "ResNet18BN", "AlexNet", "VGG11", "ResNet18_AP"],
        "X": ["ConvNet", "ConvNetBN", "ResNet18", "ResNet18BN", "VGG11", "AlexNet", "LeNet", "MLP"],
    }
    for mode, expected in fixed.items():
        assert eval_pool(mode, "ConvNetD4") == expected, mode
    assert eval_pool("X", "ConvNetD4", (64, 64)) == [
        "ConvNetD4", "ConvNetD4BN", "ResNet18_Tiny", "ResNet18BN_Tiny", "VGG11_Tiny",
        "AlexNet_Tiny", "LeNet_Tiny", "MLP_Tiny",
    ]  # fmt: skip
    assert eval_pool("S", "ConvNet") == ["ConvNet"]
    assert eval_pool("S", "ConvNetD4BN") == ["ConvNetD4"]
    assert eval_pool("S", "ConvNetBN") == ["ConvNet"]
    assert eval_pool("C", "ConvNetD4") == ["ConvNetD4", "ConvNet"]
    assert eval_pool("C", "ConvNet") == ["ConvNet"]
    with pytest.raises(UserError, match="eval_mode 'Q'"):
        eval_pool("Q", "ConvNet")
    with pytest.raises(UserError, match="ConvNetW33"):
        eval_pool("S", "ConvNetW33")


# ---- input checks --------------------------------------------------------------------------


def test_check_synset_accepts_good_input_and_rejects_each_mismatch():
    data = make_data()
    images, soft = synset(6)
    assert check_synset(images, soft, torch.tensor(0.02), data) == pytest.approx(0.02)
    assert check_synset(images, soft.requires_grad_(), 0.5, data) == 0.5
    assert check_synset(images, torch.arange(6) % 3, 0.5, data) == 0.5
    bad = [
        (images[:, :1], soft, 0.1, "channels"),
        (torch.randn(6, 3, 9, 8), soft, 0.1, "3x8x8"),
        (images[:, :, :, :, None], soft, 0.1, "expected a float tensor"),
        (images, soft[:5], 0.1, r"expected \[6, 3\]"),
        (images, torch.randn(6, 4), 0.1, r"expected \[6, 3\]"),
        (images, torch.arange(5) % 3, 0.1, "5 hard labels for 6 images"),
        (images, torch.arange(6), 0.1, r"\[0, 2\]"),
        (images, torch.ones(6, 3, dtype=torch.bool), 0.1, "expected int"),
        (images, soft, 0.0, "positive finite"),
        (images, soft, -0.01, "positive finite"),
        (images, soft, float("nan"), "positive finite"),
        (images, soft, torch.tensor(float("inf")), "positive finite"),
        (images, soft, torch.ones(2), "one value"),
        (images * float("nan"), soft, 0.1, "NaN"),
    ]
    for imgs, labels, lr, message in bad:
        with pytest.raises(UserError, match=message):
            check_synset(imgs, labels, lr, data)
    with pytest.raises(UserError, match="amp"):
        evaluate_synset("ConvNetW32", images, soft, 0.1, data, epochs=1, amp="fp8")
    with pytest.raises(UserError, match="zoom"):
        evaluate_synset("ConvNetW32", images, soft, 0.1, data, epochs=1, dsa_strategy="flip_zoom")
    with pytest.raises(UserError, match="num_eval=0"):
        evaluate_synset("ConvNetW32", images, soft, 0.1, data, epochs=1, num_eval=0)


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
        for k, (ps, opt) in enumerate(zip(per_net, torch_opts)):
            for p, gr in zip(ps, grad):
                p.grad = gr[k].clone()
            opt.step()
    for k in range(3):
        for p, s in zip(per_net[k], stacked):
            torch.testing.assert_close(s[k], p.detach(), rtol=1e-6, atol=1e-7)
    assert not torch.allclose(stacked[0], params[0])


def reference_training(net, images, labels, lr, generator, epochs, batch):
    """ALGORITHMS 8 written out with torch.optim.SGD, augmentation off (strategy none)."""
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
    for s, b, init in zip(sequential, batched, initial):
        state_close(b, s)
        moved = max((p - q).abs().max() for p, q in zip(s.parameters(), init.parameters()))
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


# ---- the protocol --------------------------------------------------------------------------


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


def test_separable_set_reaches_full_accuracy_and_result_fields():
    data = make_data(per_class_train=4, per_class_test=5, prototypes=separable_prototypes(),
                     noise=0.2)  # fmt: skip
    images, labels = data.images_train, data.labels_train
    before = torch.get_rng_state()
    result = evaluate_synset("ConvNetW32", images, labels, 0.02, data, epochs=12, batch_train=12,
                             dsa_strategy="none", num_eval=2, seed=5, batched=True)  # fmt: skip
    assert torch.equal(torch.get_rng_state(), before)  # the global RNG is left alone
    assert isinstance(result, EvalResult)
    assert result.accs == [100.0, 100.0]  # test images come from the same prototypes
    assert (result.mean, result.std) == (100.0, 0.0)
    assert (result.model, result.mode, result.epochs, result.lr, result.batch) == (
        "ConvNetW32", "batched", 12, 0.02, 12)  # fmt: skip
    assert result.seconds > 0
    nets = init_networks("ConvNetW32", data, 5, [0, 1])
    train_networks(nets, images, labels, 0.02, data_generators(5, [0, 1]),
                   TrainConfig(epochs=12, batch_train=12, dsa_strategy="none"))  # fmt: skip
    assert networks_accuracy(nets, images, labels) == [100.0, 100.0]


def test_accuracy_statistics_use_population_std():
    data = make_data()
    images, labels = synset(6)
    result = evaluate_synset("ConvNetW32", images, labels, 0.05, data, epochs=1, batch_train=4,
                             num_eval=3, seed=2, batched=False)  # fmt: skip
    assert result.mode == "sequential" and len(result.accs) == 3
    for acc in result.accs:  # 12 test images: multiples of 100 / 12
        assert acc * 12 / 100 == pytest.approx(round(acc * 12 / 100))
    assert result.mean == pytest.approx(statistics.fmean(result.accs))
    assert result.std == pytest.approx(statistics.pstdev(result.accs))
    single = evaluate_synset("ConvNetW32", images, labels, 0.05, data, epochs=0, num_eval=1)
    assert single.mode == "sequential" and single.std == 0.0  # an ensemble of one is not batched
    default = evaluate_synset("ConvNetW32", images, labels, 0.05, data, epochs=0, num_eval=2)
    assert default.mode == "sequential"  # batched=None: sequential on the CPU (measured faster)


# ---- Random baseline and ranks -------------------------------------------------------------


def test_random_real_set_picks_k_images_per_class():
    data = make_data(per_class_train=5)
    images, labels = random_real_set(data, 2, seed=0)
    assert labels.tolist() == [0, 0, 1, 1, 2, 2]
    for image, label in zip(images, labels):
        matches = (data.images_train == image).flatten(1).all(1).nonzero().flatten()
        assert len(matches) == 1 and data.labels_train[matches[0]] == label
    again, _ = random_real_set(data, 2, seed=0)
    other, _ = random_real_set(data, 2, seed=1)
    assert torch.equal(images, again) and not torch.equal(images, other)
    with pytest.raises(UserError, match="random_ipc=6"):
        random_real_set(data, 6, seed=0)


def test_ranks_split_the_pairs_once_each():
    models = ["ConvNet", "ResNet18"]
    shares = [assign_networks(models, 5, rank, 3) for rank in range(3)]
    assert shares[0] == {"ConvNet": [0, 3], "ResNet18": [1, 4]}
    pairs = sorted((m, k) for share in shares for m, ks in share.items() for k in ks)
    assert pairs == sorted((m, k) for m in models for k in range(5))
    assert assign_networks(models, 2, 0, 1) == {"ConvNet": [0, 1], "ResNet18": [0, 1]}
