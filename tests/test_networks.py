import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, stack_module_state, vmap

from utils.io import UserError
from utils.networks import (
    MODEL_NAMES,
    check_model_names,
    count_parameters,
    get_network,
    last_linear,
)

# docs/algorithms.md#model-names (+ _Tiny variants), written out by hand so a missing name fails
EXPECTED_NAMES = {
    "MLP", "MLP_Tiny", "ConvNet", "LeNet", "LeNet_Tiny", "AlexNet", "AlexNet_Tiny",
    "VGG11", "VGG11_Tiny", "VGG11BN", "ResNet18", "ResNet18BN", "ResNet18_Tiny",
    "ResNet18BN_Tiny", "ResNet18_AP", "ResNet18BN_AP", "ConvNetD4BN", "ConvNetKIP",
    "ConvNetAS", "ConvNetAR", "ConvNetAL", "ConvNetNN", "ConvNetBN", "ConvNetLN", "ConvNetIN",
    "ConvNetGN", "ConvNetNP", "ConvNetMP", "ConvNetAP",
    *(f"ConvNetD{d}" for d in range(1, 9)),
    *(f"ConvNetW{w}" for w in (32, 64, 128, 256, 512, 1024)),
}  # fmt: skip

# the smallest square input each deep ConvNet can halve `depth` times
DEEP_CONVNET_SIZE = {"ConvNetD6": 64, "ConvNetD7": 128, "ConvNetD8": 256}


# the big models run ~4x slower when two torch threads compete with other jobs for 2 cores
pytestmark = pytest.mark.usefixtures("one_thread")


def intended_size(name):
    if name.endswith("_Tiny"):
        return 64
    return DEEP_CONVNET_SIZE.get(name, 32)


def flat(model):
    return torch.cat([p.reshape(-1) for p in model.parameters()])


def test_registry_holds_exactly_the_reference_names():
    assert set(MODEL_NAMES) == EXPECTED_NAMES
    assert len(MODEL_NAMES) == len(EXPECTED_NAMES)


@pytest.mark.parametrize(
    "name, expected",
    [
        ("ConvNet", 320_010),
        ("ResNet18", 11_173_962),
        ("ResNet18BN", 11_173_962),
        ("VGG11", 9_231_114),
        ("AlexNet", 1_872_202),
        ("LeNet", 62_006),
        ("MLP", 411_146),
    ],
)
def test_published_parameter_counts(name, expected):
    model = get_network(name, 3, 10, (32, 32))
    assert count_parameters(model) == expected
    assert count_parameters(model) == flat(model).numel()


def test_convnet_default_is_width128_depth3_instancenorm():
    model = get_network("ConvNet", 3, 10, (32, 32))
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    norms = [m for m in model.modules() if isinstance(m, nn.GroupNorm)]
    assert [c.out_channels for c in convs] == [128, 128, 128]
    assert [(n.num_groups, n.num_channels, n.affine) for n in norms] == [(128, 128, True)] * 3
    assert last_linear(model).in_features == 128 * 4 * 4


def test_convnet_flat_layout_matches_reference_offsets():
    # docs/algorithms.md#the-flattened-parameter-vector: CIFAR-10 ConvNet offsets; CIFAR-100 and
    # Tiny ConvNetD4 totals
    model = get_network("ConvNet", 3, 10, (32, 32))
    names = [n for n, _ in model.named_parameters()]
    expected = []
    for d in range(3):
        expected += [f"features.conv{d}.weight", f"features.conv{d}.bias"]
        expected += [f"features.norm{d}.weight", f"features.norm{d}.bias"]
    assert names == expected + ["classifier.weight", "classifier.bias"]
    ends = torch.tensor([p.numel() for p in model.parameters()]).cumsum(0).tolist()
    assert ends == [3456, 3584, 3712, 3840, 151296, 151424, 151552, 151680,
                    299136, 299264, 299392, 299520, 320000, 320010]  # fmt: skip
    assert count_parameters(get_network("ConvNet", 3, 100, (32, 32))) == 504_420
    assert count_parameters(get_network("ConvNetD4", 3, 200, (64, 64))) == 857_160


def test_flat_vector_starts_with_first_conv_and_ends_with_classifier_bias():
    model = get_network("ConvNet", 3, 10, (32, 32))
    with torch.no_grad():
        model.features.conv0.weight.copy_(torch.arange(3456.0).reshape(128, 3, 3, 3))
        model.classifier.bias.copy_(-torch.arange(1.0, 11.0))
    vector = flat(model)
    assert torch.equal(vector[:3456], torch.arange(3456.0))
    assert torch.equal(vector[-10:], -torch.arange(1.0, 11.0))


def test_mnist_quirk_gives_32x32_maps_after_first_conv():
    model = get_network("ConvNet", 1, 10, (28, 28))
    x = torch.randn(2, 1, 28, 28)
    assert model.features.conv0(x).shape == (2, 128, 32, 32)
    assert last_linear(model).in_features == 128 * 4 * 4
    assert model(x).shape == (2, 10)


@pytest.mark.parametrize(
    "name", ["MLP", "LeNet", "AlexNet", "VGG11", "ConvNet", "ResNet18_AP", "ResNet18"]
)
def test_one_channel_28x28_models_run(name):
    model = get_network(name, 1, 10, (28, 28))
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_resnet18_ap_classifier_sees_the_whole_last_map():
    assert last_linear(get_network("ResNet18_AP", 3, 10)).in_features == 512 * 4 * 4
    assert last_linear(get_network("ResNet18_AP", 1, 10, (28, 28))).in_features == 512 * 3 * 3


@pytest.mark.parametrize("name", sorted(EXPECTED_NAMES))
def test_every_name_builds_and_runs_forward_backward(name):
    size = intended_size(name)
    model = get_network(name, 3, 10, (size, size))
    assert model.training
    assert not any(getattr(m, "inplace", False) for m in model.modules())
    captured = []
    last_linear(model).register_forward_hook(lambda _m, _i, out: captured.append(out))
    out = model(torch.randn(2, 3, size, size))
    assert out.shape == (2, 10)
    assert torch.isfinite(out).all()
    assert len(captured) == 1 and captured[0] is out  # last_linear produces the output
    F.cross_entropy(out, torch.tensor([0, 1])).backward()
    assert all(p.grad is not None for p in model.parameters())


def test_convnet_variants_follow_im_size():
    # the reference builds most variants at 32x32 whatever the data; we pass im_size through
    model = get_network("ConvNetW32", 3, 10, (64, 64))
    assert last_linear(model).in_features == 32 * 8 * 8
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 10)
    assert last_linear(get_network("ConvNetD4BN", 3, 200, (64, 64))).in_features == 128 * 4 * 4


@pytest.mark.parametrize(
    "name, channel, size",
    [
        ("ConvNet", 1, 32),  # 1 channel must be 28x28
        ("ConvNet", 3, 28),  # 28x28 must be 1 channel
        ("ConvNetD6", 3, 32),  # too many halvings for 32x32
        ("ResNet18", 3, 64),  # 64x64 needs the _Tiny model
        ("LeNet_Tiny", 1, 28),  # _Tiny models take 3x64x64 only
    ],
)
def test_inconsistent_inputs_are_user_errors(name, channel, size):
    with pytest.raises(UserError, match=name):
        get_network(name, channel, 10, (size, size))


def test_unknown_name_suggests_close_matches():
    with pytest.raises(UserError, match="MODEL_NAMES") as info:
        get_network("resnet18bn", 3, 10)
    assert "did you mean ResNet18BN" in str(info.value)
    with pytest.raises(UserError, match="did you mean ConvNetD"):
        get_network("ConvNetD9", 3, 10)


def test_check_model_names_names_the_first_unknown_and_the_flag():
    check_model_names(["ConvNet", "ResNet18BN_Tiny"])  # known names pass
    with pytest.raises(UserError, match="unknown --model 'ConvNetW33': did you mean ConvNetW32"):
        check_model_names(["ConvNet", "ConvNetW33", "Nope"], what="--model")
    with pytest.raises(UserError, match="^unknown model 'Nope': valid names"):
        check_model_names(["Nope"])


def test_no_reseeding_inside_the_factory():
    torch.manual_seed(0)
    first = flat(get_network("ConvNet", 3, 10)).detach()
    after_first = torch.rand(3)
    torch.manual_seed(0)
    second = flat(get_network("ConvNet", 3, 10)).detach()
    after_second = torch.rand(3)
    torch.manual_seed(1)
    other = flat(get_network("ConvNet", 3, 10)).detach()
    assert torch.equal(first, second)
    assert torch.equal(after_first, after_second)
    assert not torch.equal(first, other)


def test_functional_call_with_a_flat_vector_matches_the_module():
    # the ReparamModule use: split a flat vector into the parameter shapes, gradients reach it
    model = get_network("ConvNet", 3, 10)
    x = torch.randn(2, 3, 32, 32)
    vector = flat(model).detach().requires_grad_(True)
    pieces = vector.split([p.numel() for p in model.parameters()])
    params = {
        n: piece.view_as(p) for (n, p), piece in zip(model.named_parameters(), pieces, strict=True)
    }
    out = functional_call(model, params, (x,))
    torch.testing.assert_close(out, model(x))
    # double backward through the network (gradient-of-gradient, as in unrolled matching)
    (grad,) = torch.autograd.grad(F.cross_entropy(out, torch.tensor([0, 1])), vector,
                                  create_graph=True)  # fmt: skip
    grad.pow(2).sum().backward()
    assert vector.grad is not None and vector.grad.abs().sum() > 0


@pytest.mark.parametrize("name", ["ConvNet", "ConvNetBN", "ConvNetLN", "LeNet", "ResNet18BN"])
def test_vmapped_ensemble_matches_separate_models(name):
    models = [get_network(name, 3, 10) for _ in range(2)]
    params, buffers = stack_module_state(models)
    x = torch.randn(2, 2, 3, 32, 32)

    def forward(p, b, xb):
        return functional_call(models[0], (p, b), (xb,))

    batched = vmap(forward)(params, buffers, x)
    for i, model in enumerate(models):
        torch.testing.assert_close(batched[i], model(x[i]), rtol=1e-4, atol=1e-5)
