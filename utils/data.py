"""Data sets as in-memory tensors, normalised or ZCA-whitened
(docs/algorithms.md#data-and-zca-whitening).

`get_dataset(name, data_path)` returns a `Data`: the whole train and test sets as float32
[N, C, H, W] tensors, already preprocessed (ZCA-whitened with `zca=True`, else (x - mean) / std),
with int64 labels in loader order. File-based sources (ImageFolder folders, the CIFAR-10 JPEG
copy, Tiny ImageNet, ImageNet subsets, IDX files) are decoded once and cached as one uint8 tensor
file per split; the ZCA fit is cached the same way. Cache files are keyed by data set name,
absolute source path and split only, so delete the cache folder after changing the source files.

Where the parts live: the data sets' sources in utils/data_sources.py, file decoding in
utils/decode.py, the cache in utils/tensor_cache.py, ZCA in utils/zca.py.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from utils.data_sources import DATASET_NAMES, LOADERS, Source
from utils.io import UserError
from utils.tensor_cache import cache_root, cached
from utils.validation import Split, split_train_val
from utils.zca import ZCA, ZCA_EPS


@dataclass
class Data:
    """One data set in memory; images are already preprocessed
    (docs/algorithms.md#data-and-zca-whitening)."""

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
    # with val_per_class > 0 (docs/evaluation.md#validation-split): the held-out images, class by
    # class, and where the train and held-out images sit in the loader's order
    images_val: Tensor | None = field(default=None, repr=False)
    labels_val: Tensor | None = field(default=None, repr=False)
    split: Split | None = field(default=None, repr=False)

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


def check_dataset_name(name: str) -> None:
    """UserError for a name no loader knows, with the close matches (before any file is read)."""
    if name not in LOADERS:
        lowered = {known.lower(): known for known in DATASET_NAMES}
        close = difflib.get_close_matches(name.lower(), lowered, n=2, cutoff=0.6)
        hint = f" (did you mean {' or '.join(lowered[c] for c in close)}?)" if close else ""
        raise UserError(
            f"unknown data set {name!r}{hint}: expected one of {', '.join(DATASET_NAMES)}"
        )


def get_dataset(
    name: str,
    data_path: str,
    *,
    subset: str = "imagenette",
    zca: bool = False,
    max_per_class: int | None = None,
    val_per_class: int = 0,
    cache_dir: str | None = None,
    download: bool = True,
) -> Data:
    """Load `name` from `data_path` (docs/algorithms.md#data-and-zca-whitening); see the module
    docstring for caching. `val_per_class` > 0 holds out the last that many train images of every
    class as `images_val` (docs/evaluation.md#validation-split)."""
    check_dataset_name(name)
    if zca and name == "ImageNet":
        raise UserError(
            "zca=True with ImageNet: a 49,152-feature ZCA (a 9.7 GB covariance) is infeasible; "
            "run ImageNet subsets with zca false"
        )
    if max_per_class is not None and max_per_class < 1:
        raise UserError(f"max_per_class={max_per_class}: expected at least 1 image per class")
    cache = cache_root(cache_dir)
    source = LOADERS[name](Path(data_path).expanduser().absolute(), subset, cache, download)
    num_classes = len(source.class_names)
    keep, split = None, None
    if max_per_class is not None or val_per_class:
        keep, held_out = split_train_val(
            source.train.labels, num_classes, val_per_class, max_per_class, source.class_names
        )
        if val_per_class:
            split = Split(val_per_class, source.train.labels.clone(), keep, held_out)
    images_train = source.train.images if keep is None else source.train.images[keep]
    labels_train = source.train.labels if keep is None else source.train.labels[keep]

    whitening = _cached_zca(source, cache) if zca else None
    val_pixels = None if split is None else source.train.images[split.val_positions]
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
        images_val=None if split is None else _preprocess(val_pixels, source, whitening),
        labels_val=None if split is None else source.train.labels[split.val_positions].clone(),
        split=split,
    )


def _preprocess(pixels: Tensor, source: Source, whitening: ZCA | None) -> Tensor:
    """docs/algorithms.md#normalisation-and-zca-whitening: uint8 -> [0, 1] -> ZCA or (x - mean) /
    std, in place on one float copy."""
    images = pixels.float().div_(255)
    if whitening is not None:
        return whitening(images, out=images)
    mean = torch.tensor(source.mean).view(1, -1, 1, 1)
    std = torch.tensor(source.std).view(1, -1, 1, 1)
    return images.sub_(mean).div_(std)


def _cached_zca(source: Source, cache: Path) -> ZCA:
    """ZCA fitted on the full train set in [0, 1]
    (docs/algorithms.md#normalisation-and-zca-whitening), cached like the images."""

    def fit() -> dict:
        return ZCA.fit(source.train.images.float().div_(255)).state_dict()

    state = cached(cache, source.cache_name, source.origin, f"zca{ZCA_EPS}", fit)
    return ZCA.from_state_dict(state)
