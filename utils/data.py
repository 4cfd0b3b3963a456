"""Data sets as in-memory tensors, normalised or ZCA-whitened (ALGORITHMS 2, REFERENCE_NOTES 2).

`get_dataset(name, data_path)` returns a `Data`: the whole train and test sets as float32
[N, C, H, W] tensors, already preprocessed (ZCA-whitened with `zca=True`, else (x - mean) / std),
with int64 labels in loader order. File-based sources (ImageFolder folders, the CIFAR-10 JPEG
copy, Tiny ImageNet, ImageNet subsets, IDX files) are decoded once and cached as one uint8 tensor
file per split; the ZCA fit is cached the same way. Cache files are keyed by data set name,
absolute source path and split only, so delete the cache folder after changing the source files.
"""

from __future__ import annotations

import difflib
import gzip
import hashlib
import math
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import kornia
import numpy as np
import torch
import torchvision
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torch import Tensor
from torchvision.datasets.folder import IMG_EXTENSIONS
from torchvision.io import decode_image
from tqdm import tqdm

from utils.io import UserError, load_pt, save_json, save_pt

DATASET_NAMES = ("CIFAR10", "CIFAR100", "Tiny", "ImageNet", "MNIST", "FashionMNIST", "ImageFolder")

# ALGORITHMS 2: the CIFAR std values are the lineage's historical ones, kept for fidelity.
CIFAR_MEAN, CIFAR_STD = [0.4914, 0.4822, 0.4465], [0.2023, 0.1994, 0.2010]
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]

# REFERENCE_NOTES 2.1: ImageNet class ids; the position in the list is the label.
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

ZCA_EPS = 0.1  # ALGORITHMS 2: kornia ZCAWhitening(eps=0.1, compute_inv=True)
CACHE_VERSION = 1  # part of every cache key: bump when decoding changes
CHUNK_ELEMENTS = 1 << 23  # bounds the temporary float memory of chunked transforms (32 MB)


class ZCA:
    """A fitted ZCA whitening: z = (flat(x) - mean) @ transform, x = flat(z) @ transform_inv + mean.

    The matrices come from kornia's `ZCAWhitening` (REFERENCE_NOTES 2.2); applying them is a
    plain matmul a chunk of rows at a time, so temporary memory stays at one chunk; `out=x`
    whitens in place.
    """

    def __init__(self, mean: Tensor, transform: Tensor, transform_inv: Tensor) -> None:
        self.mean = mean.reshape(1, -1)  # [1, D]
        self.transform = transform  # [D, D], symmetric
        self.transform_inv = transform_inv  # [D, D]

    @classmethod
    def fit(cls, x: Tensor, eps: float = ZCA_EPS) -> ZCA:
        """Fit on images [N, C, H, W] in [0, 1]: unbiased covariance, eps added to eigenvalues."""
        whitening = kornia.enhance.ZCAWhitening(eps=float(eps), compute_inv=True).fit(x)
        return cls(whitening.mean_vector, whitening.transform_matrix, whitening.transform_inv)

    def __call__(self, x: Tensor, *, out: Tensor | None = None) -> Tensor:
        """Whiten images [N, C, H, W] (or [N, D]); same shape out."""
        return _affine_chunked(x, self.transform, shift_before=self.mean, shift_after=None, out=out)

    def inverse(self, z: Tensor) -> Tensor:
        """Undo the whitening: recovers the [0, 1] images."""
        # Adding the mean after the matmul equals kornia's (z + mean @ W) @ W_inv without the
        # round trip of the mean through both matrices.
        return _affine_chunked(z, self.transform_inv, shift_before=None, shift_after=self.mean)

    def state_dict(self) -> dict[str, Tensor]:
        return {"mean": self.mean, "transform": self.transform, "transform_inv": self.transform_inv}

    @classmethod
    def from_state_dict(cls, state: dict[str, Tensor]) -> ZCA:
        return cls(state["mean"], state["transform"], state["transform_inv"])


def _affine_chunked(
    x: Tensor,
    matrix: Tensor,
    *,
    shift_before: Tensor | None,
    shift_after: Tensor | None,
    out: Tensor | None = None,
) -> Tensor:
    """(flat(x) - shift_before) @ matrix + shift_after, a chunk of rows at a time, into `out`."""
    flat = x.reshape(len(x), -1)
    if flat.shape[1] != matrix.shape[0]:
        raise ValueError(f"ZCA fitted on {matrix.shape[0]} features, got images {tuple(x.shape)}")
    matrix = matrix.to(flat.device, flat.dtype)
    result = torch.empty_like(x) if out is None else out
    out_flat = result.view(len(x), -1)  # a chunk is read whole before its rows are written
    rows = max(1, CHUNK_ELEMENTS // flat.shape[1])
    for start in range(0, len(flat), rows):
        chunk = flat[start : start + rows]
        if shift_before is not None:
            chunk = chunk - shift_before.to(flat.device, flat.dtype)
        chunk = chunk @ matrix
        if shift_after is not None:
            chunk = chunk + shift_after.to(flat.device, flat.dtype)
        out_flat[start : start + rows] = chunk
    return result


@dataclass
class Data:
    """One data set in memory; images are already preprocessed (ALGORITHMS 2)."""

    name: str
    channel: int
    im_size: tuple[int, int]
    num_classes: int
    class_names: list[str]
    mean: list[float]
    std: list[float]
    images_train: Tensor = field(repr=False)  # float32 [N, C, H, W]
    labels_train: Tensor = field(repr=False)  # int64 [N]
    images_test: Tensor = field(repr=False)
    labels_test: Tensor = field(repr=False)
    zca: ZCA | None = field(default=None, repr=False)

    def indices_class(self) -> list[Tensor]:
        """Per class, the ascending int64 indices of its images in `images_train`."""
        return [torch.nonzero(self.labels_train == c).flatten() for c in range(self.num_classes)]

    def to_viewable(self, images: Tensor) -> Tensor:
        """Map preprocessed images back to pixel space (about [0, 1]): inverse ZCA or x*std+mean."""
        if self.zca is not None:
            return self.zca.inverse(images)
        shape = (1, -1, 1, 1)
        mean = torch.tensor(self.mean, dtype=images.dtype, device=images.device).view(shape)
        std = torch.tensor(self.std, dtype=images.dtype, device=images.device).view(shape)
        return images * std + mean


@dataclass
class _Split:
    images: Tensor  # uint8 [N, C, H, W]
    labels: Tensor  # int64 [N]


@dataclass
class _Source:
    """What a loader returns: raw pixels, plus what keys the caches of this source."""

    train: _Split
    test: _Split
    class_names: list[str]
    mean: list[float]
    std: list[float]
    cache_name: str  # e.g. "CIFAR10" or "ImageNet-imagenette"
    origin: Path  # absolute path the pixels came from


def get_dataset(
    name: str,
    data_path: str,
    *,
    subset: str = "imagenette",
    zca: bool = False,
    max_per_class: int | None = None,
    cache_dir: str | None = None,
    download: bool = True,
) -> Data:
    """Load `name` from `data_path` (ALGORITHMS 2); see the module docstring for caching."""
    if name not in _LOADERS:
        lowered = {known.lower(): known for known in DATASET_NAMES}
        close = difflib.get_close_matches(name.lower(), lowered, n=2, cutoff=0.6)
        hint = f" (did you mean {' or '.join(lowered[c] for c in close)}?)" if close else ""
        raise UserError(
            f"unknown data set {name!r}{hint}: expected one of {', '.join(DATASET_NAMES)}"
        )
    if zca and name == "ImageNet":
        raise UserError(
            "zca=True with ImageNet: a 49,152-feature ZCA (a 9.7 GB covariance) is infeasible; "
            "run ImageNet subsets with zca false"
        )
    if max_per_class is not None and max_per_class < 1:
        raise UserError(f"max_per_class={max_per_class}: expected at least 1 image per class")
    cache = _cache_root(cache_dir)
    source = _LOADERS[name](Path(data_path).expanduser().absolute(), subset, cache, download)
    num_classes = len(source.class_names)
    keep = _first_per_class(source.train.labels, num_classes, max_per_class, source.class_names)
    images_train = source.train.images if keep is None else source.train.images[keep]
    labels_train = source.train.labels if keep is None else source.train.labels[keep]

    whitening = _cached_zca(source, cache) if zca else None
    channel, height, width = source.train.images.shape[1:]
    return Data(
        name=name,
        channel=channel,
        im_size=(height, width),
        num_classes=num_classes,
        class_names=list(source.class_names),
        mean=list(source.mean),
        std=list(source.std),
        images_train=_preprocess(images_train, source, whitening),
        labels_train=labels_train.clone(),
        images_test=_preprocess(source.test.images, source, whitening),
        labels_test=source.test.labels.clone(),
        zca=whitening,
    )


def _cache_root(cache_dir: str | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    return Path(os.environ.get("PAD_CACHE_DIR") or Path.home() / ".cache" / "pad").expanduser()


def _first_per_class(
    labels: Tensor, num_classes: int, max_per_class: int | None, class_names: list[str]
) -> Tensor | None:
    """Indices of the first `max_per_class` images of every class, in loader order."""
    if max_per_class is None:
        return None
    keep = torch.zeros(len(labels), dtype=torch.bool)
    for c in range(num_classes):
        members = torch.nonzero(labels == c).flatten()
        if len(members) < max_per_class:
            raise UserError(
                f"max_per_class={max_per_class} but class {c} ({class_names[c]}) has only "
                f"{len(members)} train images: use max_per_class <= {len(members)}"
            )
        keep[members[:max_per_class]] = True
    return torch.nonzero(keep).flatten()


def _preprocess(pixels: Tensor, source: _Source, whitening: ZCA | None) -> Tensor:
    """ALGORITHMS 2: uint8 -> [0, 1] -> ZCA or (x - mean) / std, in place on one float copy."""
    images = pixels.float().div_(255)
    if whitening is not None:
        return whitening(images, out=images)
    mean = torch.tensor(source.mean).view(1, -1, 1, 1)
    std = torch.tensor(source.std).view(1, -1, 1, 1)
    return images.sub_(mean).div_(std)


# ----------------------------------------------------------------------------------------------
# Caches


def _cache_path(cache: Path, cache_name: str, origin: Path, part: str) -> Path:
    key = f"v{CACHE_VERSION}|{cache_name}|{origin}|{part}"
    digest = hashlib.sha1(key.encode()).hexdigest()[:16]
    return cache / f"{cache_name}-{part}-{digest}.pt"


def _cached(
    cache: Path, cache_name: str, origin: Path, part: str, build: Callable[[], dict]
) -> dict:
    """Load the cached dict of (name, origin, part), or build it and write it atomically."""
    path = _cache_path(cache, cache_name, origin, part)
    if path.exists():
        return load_pt(path, what=f"{cache_name} {part} cache (delete it to rebuild)")
    content = build()
    save_pt(content, path)
    shapes = {k: list(v.shape) for k, v in content.items() if isinstance(v, Tensor)}
    save_json({"data set": cache_name, "source": origin, "part": part, "shapes": shapes},
              path.with_suffix(".json"))  # fmt: skip
    return content


def _cached_zca(source: _Source, cache: Path) -> ZCA:
    """ZCA fitted on the full train set in [0, 1] (ALGORITHMS 2), cached like the images."""

    def fit() -> dict:
        return ZCA.fit(source.train.images.float().div_(255)).state_dict()

    state = _cached(cache, source.cache_name, source.origin, f"zca{ZCA_EPS}", fit)
    return ZCA.from_state_dict(state)


def _split_from_cache(content: dict) -> _Split:
    return _Split(content["images"], content["labels"])


# ----------------------------------------------------------------------------------------------
# Image files


def _read_image(path: Path) -> Tensor:
    """uint8 [C, H, W] with C = 1 (grayscale) or 3 (colour); alpha dropped."""
    raw = path.read_bytes()
    # torchvision returns a palette PNG's indices as one grey channel; PIL expands the palette.
    if raw[:8] == b"\x89PNG\r\n\x1a\n" and len(raw) > 25 and raw[25] == 3:
        return _read_image_pil(path)
    try:
        image = decode_image(torch.frombuffer(bytearray(raw), dtype=torch.uint8))
    except RuntimeError:  # formats torchvision cannot decode (BMP, TIFF, ...)
        return _read_image_pil(path)
    image = TF.to_dtype(image, torch.uint8, scale=True)  # 16-bit PNGs
    return image[:1] if image.shape[0] == 2 else image[:3]


def _read_image_pil(path: Path) -> Tensor:
    try:
        with Image.open(path) as pil:
            gray = pil.mode in ("1", "L", "LA", "I", "I;16", "F")
            array = np.asarray(pil.convert("L" if gray else "RGB"))
    except OSError as exc:
        raise UserError(f"cannot decode image {path}: {exc}; fix or remove the file") from exc
    return torch.from_numpy(array.copy()).view(array.shape[0], array.shape[1], -1).permute(2, 0, 1)


def _fit_image(image: Tensor, channels: int, size: tuple[int, int]) -> Tensor:
    if image.shape[0] != channels:
        image = image.expand(3, -1, -1) if channels == 3 else TF.rgb_to_grayscale(image)
    if tuple(image.shape[1:]) != size:
        image = TF.resize(image, list(size), antialias=True)
    return image


def _decode_files(
    files: list[Path], desc: str, channels: int | None, size: tuple[int, int] | None
) -> Tensor:
    """Decode into uint8 [N, C, H, W]. channels None: 1 if every image is grayscale, else 3.

    size None: the first image's size. Other sizes are resized to it.
    """
    # Threads do not help here: torchvision's decoder holds the GIL and a 32x32 JPEG takes ~40 us.
    images = [_read_image(f) for f in tqdm(files, desc=f"decoding {desc}", disable=None)]
    if channels is None:
        channels = 1 if all(image.shape[0] == 1 for image in images) else 3
    if size is None:
        size = tuple(images[0].shape[1:])
    resized = sum(tuple(image.shape[1:]) != size for image in images)
    if resized:
        warnings.warn(
            f"{desc}: {resized} images are not {size[0]}x{size[1]}; resized to it", stacklevel=2
        )
    out = torch.empty((len(images), channels, *size), dtype=torch.uint8)
    for i, image in enumerate(images):
        out[i] = _fit_image(image, channels, size)
    return out


def _image_files(folder: Path) -> list[Path]:
    """Image files under `folder` (recursively), sorted by path as torchvision's ImageFolder."""
    return sorted(
        (p for p in folder.rglob("*") if p.suffix.lower() in IMG_EXTENSIONS and p.is_file()),
        key=str,
    )


def _is_image_folder(root: Path) -> bool:
    return (root / "train").is_dir() and (root / "test").is_dir()


def _folder_split(
    files_by_class: list[list[Path]],
    desc: str,
    channels: int | None,
    size: tuple[int, int] | None,
) -> _Split:
    files = [f for class_files in files_by_class for f in class_files]
    labels = [c for c, class_files in enumerate(files_by_class) for _ in class_files]
    images = _decode_files(files, desc, channels, size)
    return _Split(images, torch.tensor(labels, dtype=torch.int64))


def _class_folders(split_dir: Path) -> list[str]:
    return sorted(d.name for d in split_dir.iterdir() if d.is_dir())


def _image_folder_split_files(root: Path, split: str, class_names: list[str]) -> list[list[Path]]:
    """Files per class of `root/split/<class>/`; a class folder may be absent from test."""
    split_dir = root / split
    unknown = sorted(set(_class_folders(split_dir)) - set(class_names))
    if unknown:
        raise UserError(
            f"{split_dir} has class folders {unknown} that train/ lacks: "
            "train/ and test/ must hold the same classes"
        )
    files = [_image_files(split_dir / c) if (split_dir / c).is_dir() else [] for c in class_names]
    if split == "train":
        empty = [c for c, class_files in zip(class_names, files, strict=True) if not class_files]
        if empty:
            raise UserError(
                f"no images in {split_dir} for classes {empty}: add images or remove the folders"
            )
    if not any(files):
        raise UserError(f"no images ({', '.join(IMG_EXTENSIONS)}) found under {split_dir}")
    return files


def _image_folder_source(
    cache_name: str,
    root: Path,
    cache: Path,
    *,
    channels: int | None,
    mean_std: tuple[list[float], list[float]] | None,
    num_classes: int | None = None,
) -> _Source:
    """`root/train/<class>/*`, `root/test/<class>/*`; classes and files sorted.

    channels None: decided from the train images; mean_std None: measured on the train set.
    """

    def build_train() -> dict:
        class_names = _class_folders(root / "train")
        if num_classes is not None and len(class_names) != num_classes:
            raise UserError(
                f"{root / 'train'} has {len(class_names)} class folders, {cache_name} has "
                f"{num_classes}: point data_path at the right copy"
            )
        files = _image_folder_split_files(root, "train", class_names)
        split = _folder_split(files, f"{cache_name} train", channels, None)
        content = {"images": split.images, "labels": split.labels, "class_names": class_names}
        if mean_std is None:  # ImageFolder: measured once, cached with the pixels
            content["mean"], content["std"] = _channel_mean_std(split.images)
        return content

    train = _cached(cache, cache_name, root, "train", build_train)
    class_names = train["class_names"]
    channel, height, width = train["images"].shape[1:]

    def build_test() -> dict:
        files = _image_folder_split_files(root, "test", class_names)
        split = _folder_split(files, f"{cache_name} test", channel, (height, width))
        return {"images": split.images, "labels": split.labels}

    test = _cached(cache, cache_name, root, "test", build_test)
    mean, std = mean_std or (train["mean"], train["std"])
    return _Source(
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
# Loaders: (data_path, subset, cache, download) -> _Source


def _load_image_folder(root: Path, subset: str, cache: Path, download: bool) -> _Source:
    if not _is_image_folder(root):
        raise UserError(
            f"ImageFolder data not found: expected {root}/train/<class>/* and "
            f"{root}/test/<class>/*; point data_path at a folder with that layout"
        )
    return _image_folder_source("ImageFolder", root, cache, channels=None, mean_std=None)


_CIFAR = {  # name -> (torchvision class, torchvision folder, number of classes)
    "CIFAR10": (torchvision.datasets.CIFAR10, "cifar-10-batches-py", 10),
    "CIFAR100": (torchvision.datasets.CIFAR100, "cifar-100-python", 100),
}


def _load_cifar(name: str, root: Path, cache: Path, download: bool) -> _Source:
    """torchvision's files, else an ImageFolder copy (root or root/<name lower>), else download."""
    dataset_cls, folder, num_classes = _CIFAR[name]
    if (root / folder).is_dir():
        return _cifar_torchvision(name, root, download=False)
    copies = [root, root / name.lower()]
    for copy in copies:
        if _is_image_folder(copy):
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
    how = (
        f"unpack the JPEG copy with `tar xzf /work/shared/datasets/cifar10-jpeg.tar.gz -C {root}`"
        if name == "CIFAR10"
        else f"put torchvision's {folder}/ there or run once with download=True online"
    )
    raise UserError(
        f"{name} not found: looked for {root / folder} (torchvision files) and for "
        f"train/<class>/ + test/<class>/ in {copies[0]} and {copies[1]}; {failure}; {how}"
    )


def _cifar_torchvision(name: str, root: Path, download: bool) -> _Source:
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
        splits.append(_Split(images, torch.tensor(dataset.targets, dtype=torch.int64)))
    return _Source(
        splits[0], splits[1], list(dataset.classes), CIFAR_MEAN, CIFAR_STD, name, root / folder
    )


def _load_cifar10(root: Path, subset: str, cache: Path, download: bool) -> _Source:
    return _load_cifar("CIFAR10", root, cache, download)


def _load_cifar100(root: Path, subset: str, cache: Path, download: bool) -> _Source:
    return _load_cifar("CIFAR100", root, cache, download)


def _load_tiny(root: Path, subset: str, cache: Path, download: bool) -> _Source:
    """Tiny ImageNet: train/<wnid>/images/*.JPEG; val labels from val/val_annotations.txt."""
    if not (root / "train").is_dir() and (root / "tiny-imagenet-200" / "train").is_dir():
        root = root / "tiny-imagenet-200"
    if not (root / "train").is_dir():
        raise UserError(
            f"Tiny ImageNet not found: expected {root}/train/<wnid>/images/*.JPEG and "
            f"{root}/val/val_annotations.txt; unzip tiny-imagenet-200.zip and point data_path at it"
        )

    def build_train() -> dict:
        wnids = _class_folders(root / "train")
        files = [_image_files(root / "train" / wnid) for wnid in wnids]
        split = _folder_split(files, "Tiny train", 3, None)
        return {"images": split.images, "labels": split.labels, "class_names": wnids}

    train = _cached(cache, "Tiny", root, "train", build_train)
    wnids = train["class_names"]

    def build_test() -> dict:
        split = _folder_split(_tiny_val_files(root, wnids), "Tiny val", 3, None)
        return {"images": split.images, "labels": split.labels}

    test = _cached(cache, "Tiny", root, "test", build_test)
    return _Source(
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


def _load_imagenet(root: Path, subset: str, cache: Path, download: bool) -> _Source:
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
        wnids = _class_folders(root / "train")
        if len(wnids) != 1000:
            raise UserError(f"{root / 'train'} has {len(wnids)} class folders, ImageNet has 1000")
        # The reference takes a Subset of the full data set, so images follow ImageNet's class
        # order; the label is the class's position in the subset list.
        files, labels = [], []
        for class_id in sorted(class_ids):
            class_files = _image_files(root / split / wnids[class_id])
            files += class_files
            labels += [class_ids.index(class_id)] * len(class_files)
        if not files:
            raise UserError(f"no images of {subset} in {root / split}/<wnid>/")
        progress = tqdm(files, desc=f"decoding {cache_name} {split}", disable=None)
        images = torch.stack([_resize_crop(_read_image(f)) for f in progress])
        labels = torch.tensor(labels, dtype=torch.int64)
        return {"images": images, "labels": labels, "class_names": [wnids[i] for i in class_ids]}

    train = _cached(cache, cache_name, root, "train", lambda: build("train"))
    test = _cached(cache, cache_name, root, "test", lambda: build("val"))
    return _Source(
        _split_from_cache(train), _split_from_cache(test), train["class_names"],
        IMAGENET_MEAN, IMAGENET_STD, cache_name, root,
    )  # fmt: skip


def _resize_crop(image: Tensor) -> Tensor:
    """REFERENCE_NOTES 2.1: Resize(128) (shorter side) then CenterCrop(128), in RGB."""
    image = image.expand(3, -1, -1) if image.shape[0] == 1 else image
    image = TF.resize(image, [IMAGENET_RES], antialias=True)
    return TF.center_crop(image, [IMAGENET_RES, IMAGENET_RES])


# ----------------------------------------------------------------------------------------------
# IDX files (MNIST, FashionMNIST)

_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (raw or .gz): 2 zero bytes, a dtype code, ndim, then big-endian dims."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as exc:  # gzip raises these on truncated files
        raise UserError(f"cannot read IDX file {path}: {exc}") from exc
    if len(data) < 4 or data[:2] != b"\x00\x00" or data[2] not in _IDX_DTYPES:
        raise UserError(f"{path} is not an IDX file (bad magic number {data[:4].hex()})")
    ndim = data[3]
    dims = np.frombuffer(data, dtype=">i4", count=ndim, offset=4).tolist()
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    offset = 4 + 4 * ndim
    expected = offset + int(np.prod(dims)) * dtype.itemsize
    if len(data) != expected:
        raise UserError(f"{path}: header says {dims} ({expected} bytes), file has {len(data)}")
    array = np.frombuffer(data, dtype=dtype, offset=offset).reshape(dims)
    return array.astype(dtype.newbyteorder("="))  # native byte order, writable copy


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


def _load_idx_dataset(name: str, root: Path, cache: Path, download: bool) -> _Source:
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

    train = _cached(cache, name, folder, "train", lambda: build("train"))
    test = _cached(cache, name, folder, "test", lambda: build("test"))
    mean, std = ([0.1307], [0.3081]) if name == "MNIST" else ([0.2861], [0.3530])  # ALGORITHMS 2
    classes = MNIST_CLASSES if name == "MNIST" else FASHION_CLASSES
    return _Source(
        _split_from_cache(train), _split_from_cache(test), classes, mean, std, name, folder
    )


def _load_mnist(root: Path, subset: str, cache: Path, download: bool) -> _Source:
    return _load_idx_dataset("MNIST", root, cache, download)


def _load_fashion_mnist(root: Path, subset: str, cache: Path, download: bool) -> _Source:
    return _load_idx_dataset("FashionMNIST", root, cache, download)


_LOADERS: dict[str, Callable[[Path, str, Path, bool], _Source]] = {
    "CIFAR10": _load_cifar10,
    "CIFAR100": _load_cifar100,
    "Tiny": _load_tiny,
    "ImageNet": _load_imagenet,
    "MNIST": _load_mnist,
    "FashionMNIST": _load_fashion_mnist,
    "ImageFolder": _load_image_folder,
}
