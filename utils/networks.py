"""All network architectures and the name registry behind `get_network`
(docs/algorithms.md#networks-and-the-flattened-parameter-order).

`get_network(name, channel, num_classes, im_size)` looks the name up in `_REGISTRY`, a plain dict
from model name to a builder `(channel, num_classes, im_size) -> nn.Module`. Every model

- registers its parameters shallow to deep with the final `nn.Linear` (named `classifier`) last,
  so `torch.cat([p.reshape(-1) for p in model.parameters()])` is the flat layout of the trajectory
  files and the PAD depth mask (docs/algorithms.md#the-flattened-parameter-vector);
- uses PyTorch's default initialisation and never reseeds an RNG (the reference reseeds from the
  wall clock inside its factory; seeding is the calling script's job);
- has no in-place operation on activations, so it works with `torch.func.functional_call`, `vmap`
  and double backward.

Architectures follow docs/algorithms.md#convnet and docs/algorithms.md#cross-architecture-models.
"""

from __future__ import annotations

import difflib
from collections import OrderedDict
from collections.abc import Callable, Iterable
from functools import partial

import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from utils.io import UserError

# ---------------------------------------------------------------------------------------------
# ConvNet family (docs/algorithms.md#convnet)

_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,  # not in place (the reference's in-place ReLU breaks vmap)
    "sigmoid": nn.Sigmoid,
    "leakyrelu": partial(nn.LeakyReLU, negative_slope=0.01),
}
_POOLINGS: dict[str, Callable[[], nn.Module]] = {
    "avgpooling": partial(nn.AvgPool2d, kernel_size=2, stride=2),
    "maxpooling": partial(nn.MaxPool2d, kernel_size=2, stride=2),
}


def _convnet_norm(norm: str, width: int, h: int, w: int) -> nn.Module:
    """The ConvNet normalisation layer for a [width, h, w] feature map (before pooling)."""
    if norm == "instancenorm":  # instance norm with per-channel affine, no running statistics
        return nn.GroupNorm(width, width, affine=True)
    if norm == "batchnorm":
        return nn.BatchNorm2d(width)
    if norm == "layernorm":
        return nn.LayerNorm([width, h, w], elementwise_affine=True)
    if norm == "groupnorm":
        return nn.GroupNorm(4, width, affine=True)
    raise ValueError(f"unknown ConvNet norm {norm!r}")


def _check_convnet_input(channel: int, im_size: tuple[int, int]) -> None:
    # The reference pads the first conv by 3 for every 1-channel input and treats every 28-pixel
    # input as 32x32; only (1 channel, 28x28) and (other channels, no 28) agree with each other.
    if channel == 1 and im_size != (28, 28):
        raise UserError(
            f"ConvNet with 1 input channel expects 28x28 images, got {im_size[0]}x{im_size[1]}; "
            "1-channel data must be MNIST-sized (28x28)"
        )
    if channel != 1 and 28 in im_size:
        raise UserError(
            f"ConvNet with {channel} input channels cannot take {im_size[0]}x{im_size[1]} images: "
            "28-pixel inputs are only supported with 1 channel (MNIST-style)"
        )


class ConvNet(nn.Module):
    """`depth` x [conv 3x3 -> norm -> act -> pool 2x2], then one linear classifier.

    Modules are named features.conv{d} / norm{d} / act{d} / pool{d} and classifier, which gives
    the flat parameter order conv0.weight, conv0.bias, norm0.weight, norm0.bias, conv1..., ...,
    classifier.weight, classifier.bias (docs/algorithms.md#the-flattened-parameter-vector).
    """

    def __init__(
        self,
        channel: int,
        num_classes: int,
        im_size: tuple[int, int] = (32, 32),
        *,
        width: int = 128,
        depth: int = 3,
        act: str = "relu",
        norm: str = "instancenorm",
        pooling: str = "avgpooling",
    ) -> None:
        super().__init__()
        if act not in _ACTIVATIONS:
            raise ValueError(f"unknown ConvNet activation {act!r}")
        if pooling != "none" and pooling not in _POOLINGS:
            raise ValueError(f"unknown ConvNet pooling {pooling!r}")
        _check_convnet_input(channel, im_size)
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        h, w = im_size
        in_ch = channel
        for d in range(depth):
            # MNIST quirk kept for fidelity: padding 3 turns 28x28 into 32x32 feature maps
            pad = 3 if channel == 1 and d == 0 else 1
            layers[f"conv{d}"] = nn.Conv2d(in_ch, width, kernel_size=3, padding=pad)
            h, w = h + 2 * pad - 2, w + 2 * pad - 2
            if norm != "none":
                layers[f"norm{d}"] = _convnet_norm(norm, width, h, w)
            layers[f"act{d}"] = _ACTIVATIONS[act]()
            if pooling != "none":
                if min(h, w) < 2:
                    raise UserError(
                        f"ConvNet of depth {depth} halves the image {depth} times and needs at "
                        f"least {2**depth}x{2**depth} input, got {im_size[0]}x{im_size[1]}: "
                        "use a smaller depth or larger images"
                    )
                layers[f"pool{d}"] = _POOLINGS[pooling]()
                h, w = h // 2, w // 2
            in_ch = width
        self.features = nn.Sequential(layers)
        self.classifier = nn.Linear(width * h * w, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x).flatten(1))


# ---------------------------------------------------------------------------------------------
# Cross-architecture models (docs/algorithms.md#cross-architecture-models); `res` is 32, or 64
# for the _Tiny variants


def _norm2d(norm: str, channels: int) -> nn.Module:
    if norm == "instancenorm":
        return nn.GroupNorm(channels, channels, affine=True)
    if norm == "batchnorm":
        return nn.BatchNorm2d(channels)
    raise ValueError(f"unknown norm {norm!r}")


class MLP(nn.Module):
    def __init__(self, channel: int, num_classes: int, res: int = 32) -> None:
        super().__init__()
        # 1-channel input is assumed to be 28x28 (hard-coded in the reference)
        in_features = 28 * 28 if channel == 1 else channel * res * res
        self.fc1 = nn.Linear(in_features, 128)
        self.fc2 = nn.Linear(128, 128)
        self.classifier = nn.Linear(128, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.fc1(x.flatten(1)))
        out = F.relu(self.fc2(out))
        return self.classifier(out)


class LeNet(nn.Module):
    def __init__(self, channel: int, num_classes: int, res: int = 32) -> None:
        super().__init__()
        stride = 1 if res == 32 else 2
        self.features = nn.Sequential(
            nn.Conv2d(channel, 6, kernel_size=5, padding=2 if channel == 1 else 0, stride=stride),
            nn.ReLU(),
            nn.MaxPool2d(kernel_size=2, stride=2),
            nn.Conv2d(6, 16, kernel_size=5),
            nn.ReLU(),
            nn.MaxPool2d(kernel_size=2, stride=2),
        )
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.classifier = nn.Linear(84, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out = self.features(x).flatten(1)
        out = F.relu(self.fc1(out))
        out = F.relu(self.fc2(out))
        return self.classifier(out)


class AlexNet(nn.Module):
    """CIFAR-style AlexNet without normalisation layers."""

    def __init__(self, channel: int, num_classes: int, res: int = 32) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(
                channel,
                128,
                kernel_size=5,
                stride=1 if res == 32 else 2,
                padding=4 if channel == 1 else 2,
            ),
            nn.ReLU(),
            nn.MaxPool2d(kernel_size=2, stride=2),
            nn.Conv2d(128, 192, kernel_size=5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(kernel_size=2, stride=2),
            nn.Conv2d(192, 256, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv2d(256, 192, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv2d(192, 192, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(kernel_size=2, stride=2),
        )
        self.classifier = nn.Linear(192 * 4 * 4, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x).flatten(1))


_VGG11_CFG = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


class VGG11(nn.Module):
    def __init__(
        self, channel: int, num_classes: int, norm: str = "instancenorm", res: int = 32
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        in_ch = channel
        for i, v in enumerate(_VGG11_CFG):
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
                continue
            pad = 3 if channel == 1 and i == 0 else 1  # 28x28 -> 32x32, as in ConvNet
            layers += [nn.Conv2d(in_ch, v, kernel_size=3, padding=pad), _norm2d(norm, v), nn.ReLU()]
            in_ch = v
        # For 64x64 inputs this kernel-1, stride-2 "pooling" keeps the top-left element of the
        # 2x2 map instead of averaging; reproduced because it is what the reference evaluates.
        layers.append(nn.AvgPool2d(kernel_size=1, stride=1 if res == 32 else 2))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(512, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x).flatten(1))


class BasicBlock(nn.Module):
    """ResNet basic block; `avgpool=True` is the _AP variant (stride-1 convs + AvgPool2d)."""

    def __init__(
        self, in_planes: int, planes: int, stride: int, norm: str, avgpool: bool = False
    ) -> None:
        super().__init__()
        self.downsample = stride != 1 and avgpool
        conv_stride = 1 if avgpool else stride
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=conv_stride, padding=1, bias=False)
        self.bn1 = _norm2d(norm, planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = _norm2d(norm, planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            conv = nn.Conv2d(in_planes, planes, 1, stride=conv_stride, bias=False)
            if avgpool:
                self.shortcut = nn.Sequential(conv, nn.AvgPool2d(2, 2), _norm2d(norm, planes))
            else:
                self.shortcut = nn.Sequential(conv, _norm2d(norm, planes))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        if self.downsample:
            out = F.avg_pool2d(out, kernel_size=2, stride=2)
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """CIFAR ResNet-18; `avgpool=True` gives ResNet18_AP (avg-pool downsampling, no final pool)."""

    def __init__(
        self,
        channel: int,
        num_classes: int,
        norm: str = "instancenorm",
        res: int = 32,
        avgpool: bool = False,
    ) -> None:
        super().__init__()
        # the stride-2 stem of the 64x64 variants brings stage 4 back to 4x4
        stem_stride = 1 if res == 32 else 2
        self.conv1 = nn.Conv2d(channel, 64, 3, stride=stem_stride, padding=1, bias=False)
        self.bn1 = _norm2d(norm, 64)
        in_planes = 64
        stages = []
        for planes, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            stages.append(
                nn.Sequential(
                    BasicBlock(in_planes, planes, stride, norm, avgpool),
                    BasicBlock(planes, planes, 1, norm, avgpool),
                )
            )
            in_planes = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool_downsampling = avgpool
        # _AP keeps the whole stage-4 map: 4x4 for 32x32 input, 3x3 for 1-channel 28x28
        # (28 -> 14 -> 7 -> 3)
        final = (28 if channel == 1 else 32) // 8
        self.classifier = nn.Linear(512 * final * final if avgpool else 512, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        if not self.avgpool_downsampling:
            out = F.avg_pool2d(out, 4)  # fixed kernel 4, not adaptive
        return self.classifier(out.flatten(1))


def _fixed_resolution(
    model_cls: Callable[..., nn.Module],
    channel: int,
    num_classes: int,
    im_size: tuple[int, int],
    *,
    res: int,
    **kwargs,
) -> nn.Module:
    """Build a model whose input size is fixed by its name: res x res, or 1-channel 28x28."""
    if channel == 1 and res != 32:
        raise UserError("_Tiny models take no 1-channel input: use the non-_Tiny name for 28x28")
    if channel == 1 and im_size != (28, 28):
        raise UserError(
            f"1-channel input must be 28x28 (MNIST-style), got {im_size[0]}x{im_size[1]}"
        )
    if channel != 1 and im_size != (res, res):
        raise UserError(
            f"expects {res}x{res} images, got {im_size[0]}x{im_size[1]}: use the _Tiny name for "
            "64x64 data, or a ConvNet (which adapts to any size)"
        )
    return model_cls(channel, num_classes, res=res, **kwargs)


def _at(res: int, model_cls: Callable[..., nn.Module], **kwargs) -> Callable[..., nn.Module]:
    return partial(_fixed_resolution, model_cls, res=res, **kwargs)


# ---------------------------------------------------------------------------------------------
# The registry (docs/algorithms.md#model-names); every ConvNet variant adapts to im_size (a fix)

_Builder = Callable[[int, int, tuple[int, int]], nn.Module]

_REGISTRY: dict[str, _Builder] = {
    "MLP": _at(32, MLP),
    "MLP_Tiny": _at(64, MLP),
    "LeNet": _at(32, LeNet),
    "LeNet_Tiny": _at(64, LeNet),
    "AlexNet": _at(32, AlexNet),
    "AlexNet_Tiny": _at(64, AlexNet),
    "VGG11": _at(32, VGG11),
    "VGG11_Tiny": _at(64, VGG11),
    "VGG11BN": _at(32, VGG11, norm="batchnorm"),
    "ResNet18": _at(32, ResNet18),
    "ResNet18BN": _at(32, ResNet18, norm="batchnorm"),
    "ResNet18_Tiny": _at(64, ResNet18),
    "ResNet18BN_Tiny": _at(64, ResNet18, norm="batchnorm"),
    "ResNet18_AP": _at(32, ResNet18, avgpool=True),
    "ResNet18BN_AP": _at(32, ResNet18, norm="batchnorm", avgpool=True),
    "ConvNet": ConvNet,
    **{f"ConvNetD{d}": partial(ConvNet, depth=d) for d in range(1, 9)},
    "ConvNetD4BN": partial(ConvNet, depth=4, norm="batchnorm"),
    **{f"ConvNetW{w}": partial(ConvNet, width=w) for w in (32, 64, 128, 256, 512, 1024)},
    "ConvNetKIP": partial(ConvNet, width=1024, norm="none"),
    "ConvNetAS": partial(ConvNet, act="sigmoid"),
    "ConvNetAR": partial(ConvNet, act="relu"),
    "ConvNetAL": partial(ConvNet, act="leakyrelu"),
    "ConvNetNN": partial(ConvNet, norm="none"),
    "ConvNetBN": partial(ConvNet, norm="batchnorm"),
    "ConvNetLN": partial(ConvNet, norm="layernorm"),
    "ConvNetIN": partial(ConvNet, norm="instancenorm"),
    "ConvNetGN": partial(ConvNet, norm="groupnorm"),
    "ConvNetNP": partial(ConvNet, pooling="none"),
    "ConvNetMP": partial(ConvNet, pooling="maxpooling"),
    "ConvNetAP": partial(ConvNet, pooling="avgpooling"),
}

MODEL_NAMES: tuple[str, ...] = tuple(_REGISTRY)


def check_model_names(names: Iterable[str], what: str = "model") -> None:
    """UserError naming the first name the registry lacks, with its close matches; `what` names
    the value in the message (e.g. "--model")."""
    for name in names:
        if name not in _REGISTRY:
            by_lower = {n.lower(): n for n in MODEL_NAMES}
            close = [by_lower[m] for m in difflib.get_close_matches(name.lower(), by_lower, n=4)]
            hint = f"did you mean {', '.join(close)}? " if close else ""
            raise UserError(
                f"unknown {what} {name!r}: {hint}valid names are utils.networks.MODEL_NAMES: "
                + ", ".join(MODEL_NAMES)
            )


def get_network(
    name: str, channel: int, num_classes: int, im_size: tuple[int, int] = (32, 32)
) -> nn.Module:
    """Build model `name` for `channel` x im_size inputs and `num_classes` outputs (CPU, train
    mode, PyTorch default initialisation drawn from the global torch RNG, no reseeding)."""
    check_model_names([name])
    builder = _REGISTRY[name]
    if channel < 1 or num_classes < 1:
        raise UserError(
            f"model {name}: channel={channel} and num_classes={num_classes} must both be >= 1"
        )
    im_size = (int(im_size[0]), int(im_size[1]))
    try:
        return builder(channel, num_classes, im_size)
    except UserError as err:
        raise UserError(f"model {name}: {err}") from None


def last_linear(model: nn.Module) -> nn.Linear:
    """The final classifier layer; its input is the penultimate embedding."""
    layer = getattr(model, "classifier", None)
    if not isinstance(layer, nn.Linear):
        raise TypeError(f"{type(model).__name__} has no nn.Linear `classifier` attribute")
    return layer


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
