"""utils/evaluate.py: pools, input checks, the protocol's results, the Random baseline, ranks."""

import statistics

import pytest
import torch

from tests.conftest import make_data, separable_prototypes, synset
from utils.evaluate import (
    EvalResult,
    assign_networks,
    check_synset,
    data_generators,
    eval_pool,
    evaluate_synset,
    init_networks,
    random_real_set,
)
from utils.io import UserError
from utils.train_nets import TrainConfig, networks_accuracy, train_networks

pytestmark = pytest.mark.usefixtures("one_thread")


# ---- pools ---------------------------------------------------------------------------------


def test_every_eval_mode_expands_to_its_documented_list():
    # written out again from docs/algorithms.md#model-pools, not copied from the module
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


# ---- the protocol --------------------------------------------------------------------------


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
    for image, label in zip(images, labels, strict=True):
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
