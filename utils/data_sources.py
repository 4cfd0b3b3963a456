"""The data sets' sources: per data set name, a loader that finds its files and returns the raw
uint8 pixels of both splits, the class names and the normalisation
(docs/algorithms.md#data-and-zca-whitening, docs/algorithms.md#data-and-zca-whitening). Decoded
pixels are cached (utils/tensor_cache.py)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torchvision
import torchvision.transforms.v2.functional as TF
from torch import Tensor
from tqdm import tqdm

from utils.decode import (
    class_folders,
    decode_files,
    image_files,
    image_folder_split_files,
    is_image_folder,
    read_idx,
    read_image,
)
from utils.io import UserError
from utils.tensor_cache import cached
from utils.zca import CHUNK_ELEMENTS

# docs/algorithms.md#data-sets: the CIFAR std values are the lineage's historical
# ones, kept for fidelity.
CIFAR_MEAN, CIFAR_STD = [0.4914, 0.4822, 0.4465], [0.2023, 0.1994, 0.2010]
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]

# docs/algorithms.md#data-sets: ImageNet class ids; the position in the list is the label.
IMAGENET_SUBSETS = {
    "imagenette": [0, 217, 482, 491, 497, 566, 569, 571, 574, 701],
    "imagewoof": [193, 182, 258, 162, 155, 167, 159, 273, 207, 229],
    "imagemeow": [281, 282, 283, 284, 285, 291, 292, 290, 289, 287],
    "imagesquawk": [84, 130, 88, 144, 145, 22, 96, 9, 100, 89],
    "imagefruit": [953, 954, 949, 950, 951, 957, 952, 945, 943, 948],
    "imageyellow": [309, 986, 954, 951, 987, 779, 599, 291, 72, 11],
}
IMAGENET_RES = 128

MNIST_CLASSES = [str(digit) for digit in range(10)]
FASHION_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip
IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
# Where Debian's dataset-* packages put the gzipped IDX files.
SYSTEM_IDX_DIRS = {
    "MNIST": Path("/usr/share/datasets/mnist"),
    "FashionMNIST": Path("/usr/share/datasets/fashion-mnist"),
}


@dataclass
class Split:
    images: Tensor  # uint8 [N, C, H, W]
    labels: Tensor  # int64 [N]


@dataclass
class Source:
    """What a loader returns: raw pixels, plus what keys the caches of this source."""

    train: Split
    test: Split
    class_names: list[str]
    mean: list[float]
    std: list[float]
    cache_name: str  # e.g. "CIFAR10" or "ImageNet-imagenette"
    origin: Path  # absolute path the pixels came from


def _split_from_cache(content: dict) -> Split:
    return Split(content["images"], content["labels"])


def _folder_split(
    files_by_class: list[list[Path]],
    desc: str,
    channels: int | None,
    size: tuple[int, int] | None,
) -> Split:
    files = [f for class_files in files_by_class for f in class_files]
    labels = [c for c, class_files in enumerate(files_by_class) for _ in class_files]
    images = decode_files(files, desc, channels, size)
    return Split(images, torch.tensor(labels, dtype=torch.int64))


def _image_folder_source(
    cache_name: str,
    root: Path,
    cache: Path,
    *,
    channels: int | None,
    mean_std: tuple[list[float], list[float]] | None,
    num_classes: int | None = None,
) -> Source:
    """`root/train/<class>/*`, `root/test/<class>/*`; classes and files sorted.

    channels None: decided from the train images; mean_std None: measured on the train set.
    """

    def build_train() -> dict:
        class_names = class_folders(root / "train")
        if num_classes is not None and len(class_names) != num_classes:
            raise UserError(
                f"{root / 'train'} has {len(class_names)} class folders, {cache_name} has "
                f"{num_classes}: point data_path at the right copy"
            )
        files = image_folder_split_files(root, "train", class_names)
        split = _folder_split(files, f"{cache_name} train", channels, None)
        content = {"images": split.images, "labels": split.labels, "class_names": class_names}
        if mean_std is None:  # ImageFolder: measured once, cached with the pixels
            content["mean"], content["std"] = _channel_mean_std(split.images)
        return content

    train = cached(cache, cache_name, root, "train", build_train)
    class_names = train["class_names"]
    channel, height, width = train["images"].shape[1:]

    def build_test() -> dict:
        files = image_folder_split_files(root, "test", class_names)
        split = _folder_split(files, f"{cache_name} test", channel, (height, width))
        return {"images": split.images, "labels": split.labels}

    test = cached(cache, cache_name, root, "test", build_test)
    mean, std = mean_std or (train["mean"], train["std"])
    return Source(
        _split_from_cache(train), _split_from_cache(test), class_names,
        list(mean), list(std), cache_name, root,
    )  # fmt: skip


def _channel_mean_std(images: Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean and (unbiased) std of uint8 images, in [0, 1] units, float64 sums."""
    total = torch.zeros(images.shape[1], dtype=torch.float64)
    total_sq = torch.zeros_like(total)
    rows = max(1, CHUNK_ELEMENTS // math.prod(images.shape[1:]))
    for start in range(0, len(images), rows):
        chunk = images[start : start + rows].double() / 255
        total += chunk.sum(dim=(0, 2, 3))
        total_sq += chunk.square().sum(dim=(0, 2, 3))
    count = images.numel() // images.shape[1]
    mean = total / count
    var = (total_sq - count * mean.square()) / max(1, count - 1)
    return mean.tolist(), var.clamp_min(0).sqrt().tolist()


# ----------------------------------------------------------------------------------------------
# Loaders: (data_path, subset, cache, download) -> Source


def _load_image_folder(root: Path, subset: str, cache: Path, download: bool) -> Source:
    if not is_image_folder(root):
        raise UserError(
            f"ImageFolder data not found: expected {root}/train/<class>/* and "
            f"{root}/test/<class>/*; point data_path at a folder with that layout"
        )
    return _image_folder_source("ImageFolder", root, cache, channels=None, mean_std=None)


_CIFAR = {  # name -> (torchvision class, torchvision folder, number of classes)
    "CIFAR10": (torchvision.datasets.CIFAR10, "cifar-10-batches-py", 10),
    "CIFAR100": (torchvision.datasets.CIFAR100, "cifar-100-python", 100),
}


def _load_cifar(name: str, root: Path, cache: Path, download: bool) -> Source:
    """torchvision's files, else an ImageFolder copy (root or root/<name lower>), else download."""
    dataset_cls, folder, num_classes = _CIFAR[name]
    if (root / folder).is_dir():
        return _cifar_torchvision(name, root, download=False)
    copies = [root, root / name.lower()]
    for copy in copies:
        if is_image_folder(copy):
            return _image_folder_source(
                name, copy, cache, channels=3, mean_std=(CIFAR_MEAN, CIFAR_STD),
                num_classes=num_classes,
            )  # fmt: skip
    failure = "download=False"
    if download:
        try:
            return _cifar_torchvision(name, root, download=True)
        except (OSError, RuntimeError) as exc:  # no network, DNS failure, bad checksum
            failure = f"download failed ({str(exc).strip()[:120] or type(exc).__name__})"
    how = f"put torchvision's {folder}/ there or run once with download=True online"
    if name == "CIFAR10":  # a JPEG copy is the usual offline form of CIFAR-10
        how = f"unpack a JPEG copy there (`tar xzf <archive> -C {root}`), " + how
    raise UserError(
        f"{name} not found: looked for {root / folder} (torchvision files) and for "
        f"train/<class>/ + test/<class>/ in {copies[0]} and {copies[1]}; {failure}; {how}"
    )


def _cifar_torchvision(name: str, root: Path, download: bool) -> Source:
    dataset_cls, folder, _ = _CIFAR[name]
    splits = []
    for train in (True, False):
        try:
            dataset = dataset_cls(str(root), train=train, download=download)
        except RuntimeError as exc:
            if download:
                raise
            raise UserError(f"{root / folder}: {exc}; delete it or re-download it") from exc
        images = torch.from_numpy(dataset.data).permute(0, 3, 1, 2).contiguous()  # NHWC -> NCHW
        splits.append(Split(images, torch.tensor(dataset.targets, dtype=torch.int64)))
    return Source(
        splits[0], splits[1], list(dataset.classes), CIFAR_MEAN, CIFAR_STD, name, root / folder
    )


def _load_cifar10(root: Path, subset: str, cache: Path, download: bool) -> Source:
    return _load_cifar("CIFAR10", root, cache, download)


def _load_cifar100(root: Path, subset: str, cache: Path, download: bool) -> Source:
    return _load_cifar("CIFAR100", root, cache, download)


def _load_tiny(root: Path, subset: str, cache: Path, download: bool) -> Source:
    """Tiny ImageNet: train/<wnid>/images/*.JPEG; val labels from val/val_annotations.txt."""
    if not (root / "train").is_dir() and (root / "tiny-imagenet-200" / "train").is_dir():
        root = root / "tiny-imagenet-200"
    if not (root / "train").is_dir():
        raise UserError(
            f"Tiny ImageNet not found: expected {root}/train/<wnid>/images/*.JPEG and "
            f"{root}/val/val_annotations.txt; unzip tiny-imagenet-200.zip and point data_path at it"
        )

    def build_train() -> dict:
        wnids = class_folders(root / "train")
        files = [image_files(root / "train" / wnid) for wnid in wnids]
        split = _folder_split(files, "Tiny train", 3, None)
        return {"images": split.images, "labels": split.labels, "class_names": wnids}

    train = cached(cache, "Tiny", root, "train", build_train)
    wnids = train["class_names"]

    def build_test() -> dict:
        split = _folder_split(_tiny_val_files(root, wnids), "Tiny val", 3, None)
        return {"images": split.images, "labels": split.labels}

    test = cached(cache, "Tiny", root, "test", build_test)
    return Source(
        _split_from_cache(train), _split_from_cache(test), wnids,
        IMAGENET_MEAN, IMAGENET_STD, "Tiny", root,
    )  # fmt: skip


def _tiny_val_files(root: Path, wnids: list[str]) -> list[list[Path]]:
    """Val files per class, sorted by name within a class (the reorganised ImageFolder order)."""
    annotations = root / "val" / "val_annotations.txt"
    if not annotations.is_file():
        raise UserError(f"Tiny ImageNet val labels not found: {annotations}")
    label_of = {wnid: c for c, wnid in enumerate(wnids)}
    files: list[list[Path]] = [[] for _ in wnids]
    for line_no, line in enumerate(annotations.read_text().splitlines(), start=1):
        parts = line.split("\t")
        if len(parts) < 2 or parts[1] not in label_of:
            raise UserError(
                f"{annotations}:{line_no}: expected '<file>\\t<wnid of train/>', got {line!r}"
            )
        files[label_of[parts[1]]].append(root / "val" / "images" / parts[0])
    return [sorted(class_files, key=str) for class_files in files]


def _load_imagenet(root: Path, subset: str, cache: Path, download: bool) -> Source:
    """torchvision ImageNet folders (train/<wnid>/, val/<wnid>/); 10-class subset at 128x128."""
    if subset not in IMAGENET_SUBSETS:
        raise UserError(
            f"unknown ImageNet subset {subset!r}: expected one of {', '.join(IMAGENET_SUBSETS)}"
        )
    if not ((root / "train").is_dir() and (root / "val").is_dir()):
        raise UserError(
            f"ImageNet not found: expected torchvision's {root}/train/<wnid>/ and "
            f"{root}/val/<wnid>/"
        )
    class_ids = IMAGENET_SUBSETS[subset]
    cache_name = f"ImageNet-{subset}"

    def build(split: str) -> dict:
        wnids = class_folders(root / "train")
        if len(wnids) != 1000:
            raise UserError(f"{root / 'train'} has {len(wnids)} class folders, ImageNet has 1000")
        # The reference takes a Subset of the full data set, so images follow ImageNet's class
        # order; the label is the class's position in the subset list.
        files, labels = [], []
        for class_id in sorted(class_ids):
            class_files = image_files(root / split / wnids[class_id])
            files += class_files
            labels += [class_ids.index(class_id)] * len(class_files)
        if not files:
            raise UserError(f"no images of {subset} in {root / split}/<wnid>/")
        progress = tqdm(files, desc=f"decoding {cache_name} {split}", disable=None)
        images = torch.stack([_resize_crop(read_image(f)) for f in progress])
        labels = torch.tensor(labels, dtype=torch.int64)
        return {"images": images, "labels": labels, "class_names": [wnids[i] for i in class_ids]}

    train = cached(cache, cache_name, root, "train", lambda: build("train"))
    test = cached(cache, cache_name, root, "test", lambda: build("val"))
    return Source(
        _split_from_cache(train), _split_from_cache(test), train["class_names"],
        IMAGENET_MEAN, IMAGENET_STD, cache_name, root,
    )  # fmt: skip


def _resize_crop(image: Tensor) -> Tensor:
    """docs/algorithms.md#data-sets: Resize(128) (shorter side) then CenterCrop(128), in RGB."""
    image = image.expand(3, -1, -1) if image.shape[0] == 1 else image
    image = TF.resize(image, [IMAGENET_RES], antialias=True)
    return TF.center_crop(image, [IMAGENET_RES, IMAGENET_RES])


def _idx_file(folder: Path, stem: str) -> Path | None:
    for candidate in (folder / stem, folder / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _find_idx_dir(name: str, root: Path) -> Path | None:
    stems = [stem for pair in IDX_FILES.values() for stem in pair]
    for folder in (root / name / "raw", SYSTEM_IDX_DIRS[name]):
        if all(_idx_file(folder, stem) is not None for stem in stems):
            return folder
    return None


def _load_idx_dataset(name: str, root: Path, cache: Path, download: bool) -> Source:
    """torchvision's <root>/<name>/raw/, else Debian's /usr/share/datasets/..., else download."""
    folder = _find_idx_dir(name, root)
    failure = "download=False"
    if folder is None and download:
        dataset_cls = getattr(torchvision.datasets, name)
        try:
            dataset_cls(str(root), train=True, download=True)
            folder = _find_idx_dir(name, root)
        except (OSError, RuntimeError) as exc:  # no network, DNS failure, bad checksum
            failure = f"download failed ({str(exc).strip()[:120] or type(exc).__name__})"
    if folder is None:
        package = "dataset-fashion-mnist" if name == "FashionMNIST" else "an MNIST IDX copy"
        raise UserError(
            f"{name} not found: looked for {root / name / 'raw'}/<idx files> and "
            f"{SYSTEM_IDX_DIRS[name]}/; {failure}; run `apt-get install {package}` or put "
            f"{', '.join(IDX_FILES['train'] + IDX_FILES['test'])} (raw or .gz) in "
            f"{root / name / 'raw'}"
        )

    def build(split: str) -> dict:
        images_file, labels_file = (_idx_file(folder, stem) for stem in IDX_FILES[split])
        images = torch.from_numpy(read_idx(images_file).astype(np.uint8)).unsqueeze(1)
        labels = torch.from_numpy(read_idx(labels_file).astype(np.int64))
        if len(images) != len(labels) or images.dim() != 4:
            raise UserError(
                f"{images_file} {tuple(images.shape)} and {labels_file} {tuple(labels.shape)}: "
                "expected N images [N, H, W] and N labels"
            )
        return {"images": images, "labels": labels}

    train = cached(cache, name, folder, "train", lambda: build("train"))
    test = cached(cache, name, folder, "test", lambda: build("test"))
    # docs/algorithms.md#data-sets
    mean, std = ([0.1307], [0.3081]) if name == "MNIST" else ([0.2861], [0.3530])
    classes = MNIST_CLASSES if name == "MNIST" else FASHION_CLASSES
    return Source(
        _split_from_cache(train), _split_from_cache(test), classes, mean, std, name, folder
    )


def _load_mnist(root: Path, subset: str, cache: Path, download: bool) -> Source:
    return _load_idx_dataset("MNIST", root, cache, download)


def _load_fashion_mnist(root: Path, subset: str, cache: Path, download: bool) -> Source:
    return _load_idx_dataset("FashionMNIST", root, cache, download)


LOADERS: dict[str, Callable[[Path, str, Path, bool], Source]] = {
    "CIFAR10": _load_cifar10,
    "CIFAR100": _load_cifar100,
    "Tiny": _load_tiny,
    "ImageNet": _load_imagenet,
    "MNIST": _load_mnist,
    "FashionMNIST": _load_fashion_mnist,
    "ImageFolder": _load_image_folder,
}

DATASET_NAMES = tuple(LOADERS)
