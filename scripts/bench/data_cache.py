"""Benchmark the data cache: CIFAR-10 from JPEGs versus from the uint8 tensor cache.

Unpacks the CIFAR-10 JPEG copy once (if not there yet), then loads CIFAR10 twice with a fresh
cache folder: the first load decodes 60,000 JPEGs and writes the cache, the second reads the
cache. Then times the ZCA fit (zca=True) the same way, first fitted, then from its cache.

    .venv/bin/python scripts/bench/data_cache.py
    .venv/bin/python scripts/bench/data_cache.py --data_path ~/.cache/pad-data/cifar10 --zca false

This should give: 50000 / 10000 images, train mean within 0.01 of (0.489, 0.482, 0.447), and a
second load several times faster than the first.
"""

import argparse
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from utils.config import str2bool  # noqa: E402
from utils.data import get_dataset  # noqa: E402
from utils.io import UserError, run_main  # noqa: E402
from utils.runtime import repo_root  # noqa: E402

README_MEAN = (0.489, 0.482, 0.447)  # ../shared/datasets/README.md, measured on the JPEG copy


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data_path",
        default="~/.cache/pad-data/cifar10",
        help="folder the JPEG copy is unpacked into (train/, test/)",
    )
    parser.add_argument(
        "--archive",
        default=str(repo_root().parent / "shared/datasets/cifar10-jpeg.tar.gz"),
        help="the CIFAR-10 JPEG tarball",
    )
    parser.add_argument("--zca", type=str2bool, default=True, help="also time the ZCA fit")
    return parser.parse_args(argv)  # fmt: skip


def unpack(archive: Path, data_path: Path) -> None:
    if (data_path / "train").is_dir() and (data_path / "test").is_dir():
        print(f"data: {data_path} (already unpacked)")
        return
    if not archive.is_file():
        raise UserError(f"archive not found: {archive}; pass --archive or unpack it yourself")
    start = time.perf_counter()
    with tarfile.open(archive) as tar:
        tar.extractall(data_path, filter="data")
    print(f"data: unpacked {archive} into {data_path} in {time.perf_counter() - start:.1f} s")


def timed_load(data_path: Path, cache_dir: str, zca: bool):
    start = time.perf_counter()
    data = get_dataset("CIFAR10", str(data_path), zca=zca, cache_dir=cache_dir, download=False)
    return data, time.perf_counter() - start


def main(args: argparse.Namespace) -> None:
    data_path = Path(args.data_path).expanduser()
    unpack(Path(args.archive), data_path)
    with tempfile.TemporaryDirectory(prefix="pad-bench-cache-") as cache_dir:
        data, first = timed_load(data_path, cache_dir, zca=False)
        again, second = timed_load(data_path, cache_dir, zca=False)
        print(f"train / test: {len(data.labels_train)} / {len(data.labels_test)} images, "
              f"{data.channel}x{data.im_size[0]}x{data.im_size[1]}")  # fmt: skip
        print(f"classes: {', '.join(data.class_names)}")
        mean = data.to_viewable(data.images_train).mean(dim=(0, 2, 3)).tolist()
        off = max(abs(m - r) for m, r in zip(mean, README_MEAN, strict=True))
        verdict = "ok" if off <= 0.01 else "MISMATCH"
        print(f"train mean per channel: ({', '.join(f'{m:.4f}' for m in mean)}); README "
              f"{README_MEAN}; max difference {off:.4f} -> {verdict}")  # fmt: skip
        print(f"load from JPEGs: {first:6.2f} s | from cache: {second:6.2f} s | "
              f"ratio {first / second:5.1f}x (target > 5x)")  # fmt: skip
        same = torch.equal(again.images_train, data.images_train)
        print(f"cached load identical to the decoded one: {same}")
        if args.zca:
            _, fit = timed_load(data_path, cache_dir, zca=True)
            _, cached = timed_load(data_path, cache_dir, zca=True)
            print(f"zca=True load, ZCA fitted: {fit:6.2f} s | ZCA from cache: {cached:6.2f} s | "
                  f"ratio {fit / cached:5.1f}x")  # fmt: skip


if __name__ == "__main__":
    run_main(main, parse_args)
