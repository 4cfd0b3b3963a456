"""Raw files to uint8 tensors: image files (every format torchvision or PIL reads), ImageFolder
trees (`<split>/<class>/*`, classes and files sorted as torchvision's ImageFolder) and IDX files."""

from __future__ import annotations

import gzip
import os
import warnings
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torch import Tensor
from torchvision.datasets.folder import IMG_EXTENSIONS
from torchvision.io import decode_image
from tqdm import tqdm

from utils.io import UserError

# ----------------------------------------------------------------------------------------------
# Image files


def read_image(path: Path) -> Tensor:
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


def decode_files(
    files: list[Path], desc: str, channels: int | None, size: tuple[int, int] | None
) -> Tensor:
    """Decode into uint8 [N, C, H, W]. channels None: 1 if every image is grayscale, else 3.

    size None: the first image's size. Other sizes are resized to it.
    """
    # Threads do not help here: torchvision's decoder holds the GIL and a 32x32 JPEG takes ~40 us.
    images = [read_image(f) for f in tqdm(files, desc=f"decoding {desc}", disable=None)]
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


def image_files(folder: Path) -> list[Path]:
    """Image files under `folder` (recursively), sorted by path as torchvision's ImageFolder."""
    return sorted(
        (p for p in folder.rglob("*") if p.suffix.lower() in IMG_EXTENSIONS and p.is_file()),
        key=str,
    )


def is_image_folder(root: Path) -> bool:
    return (root / "train").is_dir() and (root / "test").is_dir()


def class_folders(split_dir: Path) -> list[str]:
    return sorted(d.name for d in split_dir.iterdir() if d.is_dir())


def image_folder_split_files(root: Path, split: str, class_names: list[str]) -> list[list[Path]]:
    """Files per class of `root/split/<class>/`; a class folder may be absent from test."""
    split_dir = root / split
    unknown = sorted(set(class_folders(split_dir)) - set(class_names))
    if unknown:
        raise UserError(
            f"{split_dir} has class folders {unknown} that train/ lacks: "
            "train/ and test/ must hold the same classes"
        )
    files = [image_files(split_dir / c) if (split_dir / c).is_dir() else [] for c in class_names]
    if split == "train":
        empty = [c for c, class_files in zip(class_names, files, strict=True) if not class_files]
        if empty:
            raise UserError(
                f"no images in {split_dir} for classes {empty}: add images or remove the folders"
            )
    if not any(files):
        raise UserError(f"no images ({', '.join(IMG_EXTENSIONS)}) found under {split_dir}")
    return files


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
