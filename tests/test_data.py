"""get_dataset on tiny generated data sets (utils/data.py, data_sources.py, decode.py,
tensor_cache.py): labels, order, caching, IDX files, the fitted ZCA, errors."""

import gzip
import pickle
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import utils.data_sources as data_sources
import utils.decode as decode
from tests.conftest import closed_form_whitened_covariance, covariance
from utils.data import get_dataset
from utils.decode import read_idx
from utils.io import UserError

# Created in an order that is not sorted, so the test sees the loader sort them.
CLASSES = {"zebra": 4, "apple": 3, "mango": 5}  # class folder -> number of train images
FILE_NAMES = ["f10.png", "f02.png", "f01.png", "f07.png", "f05.png"]  # sorted: f01 f02 f05 f07 f10


def pixel_value(class_name: str, file_name: str) -> int:
    """A value that identifies (class, file), so tests can check which image landed where."""
    return 40 * sorted(CLASSES).index(class_name) + int(file_name[1:3])


def make_image_folder(root: Path, size: int = 8, gray: bool = False) -> None:
    """train/<class>/ with CLASSES[class] PNGs, test/<class>/ with 2 each; each image constant."""
    for class_name, count in CLASSES.items():
        for split, n in (("train", count), ("test", 2)):
            folder = root / split / class_name
            folder.mkdir(parents=True)
            for file_name in FILE_NAMES[:n]:
                value = pixel_value(class_name, file_name) + (100 if split == "test" else 0)
                if gray:
                    array = np.full((size, size), value, dtype=np.uint8)
                else:  # channels differ so a channel mix-up shows
                    planes = [np.full((size, size), value + k, np.uint8) for k in range(3)]
                    array = np.stack(planes, axis=-1)
                Image.fromarray(array).save(folder / file_name)


def expected_order(split: str) -> list[tuple[int, int]]:
    """(label, pixel value) of each image in loader order: classes sorted, files sorted."""
    out = []
    for label, class_name in enumerate(sorted(CLASSES)):
        n = CLASSES[class_name] if split == "train" else 2
        for file_name in sorted(FILE_NAMES[:n]):
            offset = 100 if split == "test" else 0
            out.append((label, pixel_value(class_name, file_name) + offset))
    return out


def to_pixels(data, images: torch.Tensor) -> torch.Tensor:
    return (data.to_viewable(images) * 255).round().to(torch.int64)


def test_image_folder_labels_order_counts_and_mean_std(tmp_path):
    make_image_folder(tmp_path / "data")
    data = get_dataset("ImageFolder", str(tmp_path / "data"), cache_dir=str(tmp_path / "cache"))
    assert data.class_names == ["apple", "mango", "zebra"]
    assert (data.channel, data.im_size, data.num_classes) == (3, (8, 8), 3)
    for split, images, labels in (
        ("train", data.images_train, data.labels_train),
        ("test", data.images_test, data.labels_test),
    ):
        expected = expected_order(split)
        assert labels.tolist() == [label for label, _ in expected]
        pixels = to_pixels(data, images)
        assert pixels[:, 0, 3, 5].tolist() == [value for _, value in expected]
        assert pixels[:, 2, 0, 0].tolist() == [value + 2 for _, value in expected]
    assert [len(i) for i in data.indices_class()] == [3, 5, 4]

    # Mean/std measured on the train pixels; images normalised with them.
    raw = np.array([[v, v + 1, v + 2] for _, v in expected_order("train")], dtype=np.float64) / 255
    np.testing.assert_allclose(data.mean, raw.mean(axis=0), atol=1e-6)
    np.testing.assert_allclose(data.std, raw.std(axis=0), rtol=1e-3)
    per_channel = data.images_train.transpose(0, 1).reshape(3, -1)
    np.testing.assert_allclose(per_channel.mean(dim=1).numpy(), 0, atol=1e-5)


def test_grayscale_folder_has_one_channel_and_mixed_has_three(tmp_path):
    make_image_folder(tmp_path / "gray", gray=True)
    gray = get_dataset("ImageFolder", str(tmp_path / "gray"), cache_dir=str(tmp_path / "cache"))
    assert gray.channel == 1 and len(gray.mean) == 1
    assert to_pixels(gray, gray.images_train)[:, 0, 1, 1].tolist() == [
        v for _, v in expected_order("train")
    ]

    make_image_folder(tmp_path / "mixed", gray=True)
    rgb = np.zeros((8, 8, 3), np.uint8)
    rgb[..., 2] = 200
    Image.fromarray(rgb).save(tmp_path / "mixed" / "train" / "zebra" / "f99.png")
    big = np.full((16, 16), 77, np.uint8)  # size comes from the first train image: resized
    Image.fromarray(big).save(tmp_path / "mixed" / "test" / "apple" / "f00.png")
    with pytest.warns(UserWarning, match="1 images are not 8x8"):
        mixed = get_dataset(
            "ImageFolder", str(tmp_path / "mixed"), cache_dir=str(tmp_path / "cache")
        )
    assert mixed.channel == 3 and mixed.images_test.shape == (7, 3, 8, 8)
    assert to_pixels(mixed, mixed.images_test)[0, :, 4, 4].tolist() == [77, 77, 77]
    pixels = to_pixels(mixed, mixed.images_train)
    assert pixels[-1, :, 0, 0].tolist() == [0, 0, 200]  # the colour image, last of the last class
    first = expected_order("train")[0][1]
    assert pixels[0, :, 0, 0].tolist() == [first] * 3  # a grey image repeated to 3 channels


def test_max_per_class_keeps_first_images_in_order(tmp_path):
    make_image_folder(tmp_path / "data")
    data = get_dataset(
        "ImageFolder", str(tmp_path / "data"), max_per_class=2, cache_dir=str(tmp_path / "cache")
    )
    expected = []
    for label, class_name in enumerate(sorted(CLASSES)):
        names = sorted(FILE_NAMES[: CLASSES[class_name]])[:2]
        expected += [(label, pixel_value(class_name, name)) for name in names]
    assert data.labels_train.tolist() == [label for label, _ in expected]
    assert to_pixels(data, data.images_train)[:, 0, 0, 0].tolist() == [v for _, v in expected]
    assert [i.tolist() for i in data.indices_class()] == [[0, 1], [2, 3], [4, 5]]
    assert len(data.labels_test) == 6  # the test set is untouched

    with pytest.raises(UserError, match="has only 3 train images"):
        get_dataset("ImageFolder", str(tmp_path / "data"), max_per_class=4,
                    cache_dir=str(tmp_path / "cache"))  # fmt: skip
    with pytest.raises(UserError, match="max_per_class=0"):
        get_dataset("ImageFolder", str(tmp_path / "data"), max_per_class=0,
                    cache_dir=str(tmp_path / "cache"))  # fmt: skip


def test_second_load_comes_from_the_cache(tmp_path, monkeypatch):
    make_image_folder(tmp_path / "data")
    monkeypatch.setenv("PAD_CACHE_DIR", str(tmp_path / "env_cache"))
    first = get_dataset("ImageFolder", str(tmp_path / "data"))
    assert len(list((tmp_path / "env_cache").glob("ImageFolder-*.pt"))) == 2  # train + test

    shutil.rmtree(tmp_path / "data" / "train" / "apple")  # the source changes, the cache does not
    for f in (tmp_path / "data").rglob("*.png"):
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(f)
    calls = []
    monkeypatch.setattr(decode, "read_image", lambda path: calls.append(path))
    second = get_dataset("ImageFolder", str(tmp_path / "data"))
    assert calls == []
    assert second.class_names == first.class_names
    for name in ("images_train", "labels_train", "images_test", "labels_test"):
        assert torch.equal(getattr(first, name), getattr(second, name)), name
    assert second.mean == first.mean and second.std == first.std


def write_idx(path: Path, array: np.ndarray, compress: bool) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}i", *array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    if compress:
        path = path.with_name(path.name + ".gz")
        payload = gzip.compress(payload)
    path.write_bytes(payload)


def make_idx_dataset(root: Path, name: str, compress: bool, seed: int):
    rng = np.random.default_rng(seed)
    raw = root / name / "raw"
    raw.mkdir(parents=True)
    arrays = {}
    for split, n in (("train", 7), ("t10k", 3)):
        images = rng.integers(0, 256, size=(n, 5, 4), dtype=np.uint8)  # 5x4: catches transposes
        labels = rng.integers(0, 10, size=n, dtype=np.uint8)
        write_idx(raw / f"{split}-images-idx3-ubyte", images, compress)
        write_idx(raw / f"{split}-labels-idx1-ubyte", labels, compress)
        arrays[split] = (images, labels)
    return arrays


@pytest.mark.parametrize("name,compress", [("FashionMNIST", False), ("MNIST", True)])
def test_idx_files_load(tmp_path, name, compress):
    arrays = make_idx_dataset(tmp_path, name, compress, seed=len(name))
    data = get_dataset(name, str(tmp_path), download=False, cache_dir=str(tmp_path / "cache"))
    assert (data.channel, data.im_size, data.num_classes) == (1, (5, 4), 10)
    for (images, labels), got_images, got_labels in (
        (arrays["train"], data.images_train, data.labels_train),
        (arrays["t10k"], data.images_test, data.labels_test),
    ):
        assert got_labels.tolist() == labels.tolist()
        assert torch.equal(to_pixels(data, got_images)[:, 0], torch.from_numpy(images).long())
    expected_mean = 0.1307 if name == "MNIST" else 0.2861
    assert data.mean == [expected_mean]


def test_read_idx_rejects_a_truncated_file(tmp_path):
    path = tmp_path / "x-idx3-ubyte"
    write_idx(path, np.arange(24).reshape(2, 3, 4), compress=False)
    assert read_idx(path).shape == (2, 3, 4)
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(UserError, match="header says"):
        read_idx(path)


def test_mnist_missing_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setitem(data_sources.SYSTEM_IDX_DIRS, "FashionMNIST", tmp_path / "nowhere")
    with pytest.raises(UserError, match="apt-get install dataset-fashion-mnist"):
        get_dataset("FashionMNIST", str(tmp_path), download=False, cache_dir=str(tmp_path))


def test_get_dataset_zca_fits_full_train_set_and_caches_it(tmp_path):
    make_image_folder(tmp_path / "data", size=4)
    cache = str(tmp_path / "cache")
    full = get_dataset("ImageFolder", str(tmp_path / "data"), zca=True, cache_dir=cache)
    pixels_train = (
        torch.tensor(
            [[[[v + k] * 4] * 4 for k in range(3)] for _, v in expected_order("train")]
        ).double()
        / 255
    )
    expected = closed_form_whitened_covariance(pixels_train, eps=0.1)
    assert (covariance(full.images_train) - expected).abs().max() < 1e-4
    viewable = (full.to_viewable(full.images_test) * 255).round()[:, 0, 0, 0]
    assert viewable.tolist() == [v for _, v in expected_order("test")]
    assert len(list(Path(cache).glob("ImageFolder-zca*.pt"))) == 1

    subset = get_dataset(
        "ImageFolder", str(tmp_path / "data"), zca=True, max_per_class=1, cache_dir=cache
    )
    assert torch.equal(subset.zca.mean, full.zca.mean)  # fitted on all 12 images, not on 3
    assert torch.allclose(subset.images_train, full.images_train[[0, 3, 8]])


def test_cifar10_from_image_folder_copy_in_subfolder(tmp_path):
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
             "truck"]  # fmt: skip
    for label, name in enumerate(names):
        for split in ("train", "test"):
            folder = tmp_path / "cifar10" / split / name
            folder.mkdir(parents=True)
            Image.fromarray(np.full((32, 32, 3), 20 * label, np.uint8)).save(folder / "0000.jpg")
    data = get_dataset("CIFAR10", str(tmp_path), download=False, cache_dir=str(tmp_path / "c"))
    assert data.class_names == names and data.labels_train.tolist() == list(range(10))
    # constants of docs/algorithms.md#data-sets, not measured
    assert data.mean == [0.4914, 0.4822, 0.4465]
    pixels = to_pixels(data, data.images_train)[:, :, 16, 16].float().mean(dim=1)
    assert (pixels - torch.arange(10) * 20).abs().max() <= 2  # JPEG is lossy


def test_tiny_imagenet_layout(tmp_path):
    wnids = ["n02", "n01"]
    lines = []
    for wnid in wnids:
        folder = tmp_path / "train" / wnid / "images"
        folder.mkdir(parents=True)
        (tmp_path / "train" / wnid / f"{wnid}_boxes.txt").write_text("not an image\n")
        for i in range(2):
            value = 60 * int(wnid[-1]) + 20 * i
            Image.fromarray(np.full((64, 64, 3), value, np.uint8)).save(folder / f"{wnid}_{i}.JPEG")
    (tmp_path / "val" / "images").mkdir(parents=True)
    for i, wnid in enumerate(["n02", "n01", "n02"]):
        value = 60 * int(wnid[-1]) + 5 * i
        gray = Image.fromarray(np.full((64, 64), value, np.uint8))  # Tiny has grey JPEGs
        gray.save(tmp_path / "val" / "images" / f"val_{i}.JPEG")
        lines.append(f"val_{i}.JPEG\t{wnid}\t0\t0\t63\t63")
    annotations = "\n".join(reversed(lines)) + "\n"  # unsorted, as in the real file
    (tmp_path / "val" / "val_annotations.txt").write_text(annotations)

    data = get_dataset("Tiny", str(tmp_path), cache_dir=str(tmp_path / "cache"))
    assert data.class_names == ["n01", "n02"] and (data.channel, data.im_size) == (3, (64, 64))
    assert data.labels_train.tolist() == [0, 0, 1, 1]
    assert data.labels_test.tolist() == [0, 1, 1]  # val_1 (n01), then val_0, val_2 (n02)
    train = to_pixels(data, data.images_train)[:, :, 30, 30].float().mean(dim=1)
    test = to_pixels(data, data.images_test)[:, :, 30, 30].float().mean(dim=1)
    assert (train - torch.tensor([60.0, 80, 120, 140])).abs().max() <= 2
    assert (test - torch.tensor([65.0, 120, 130])).abs().max() <= 2


def test_cifar10_missing_names_the_path(tmp_path):
    with pytest.raises(UserError) as info:
        get_dataset("CIFAR10", str(tmp_path / "empty"), download=False, cache_dir=str(tmp_path))
    message = str(info.value)
    assert str(tmp_path / "empty" / "cifar-10-batches-py") in message
    assert "tar xzf" in message and "download=False" in message


def test_unknown_name_lists_valid_names(tmp_path):
    with pytest.raises(UserError, match="did you mean CIFAR10.*ImageFolder"):
        get_dataset("cifar10", str(tmp_path))
    with pytest.raises(UserError, match="ZCA"):
        get_dataset("ImageNet", str(tmp_path), zca=True)


def test_cifar10_prefers_torchvision_files(tmp_path, monkeypatch):
    import torchvision.datasets.cifar as tv_cifar

    # torchvision checks md5 sums of the real files; these are 5x4 + 4 fake images.
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *args, **kwargs: True)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    batches = {}
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        batches[name] = {"data": rng.integers(0, 256, (4, 3072), np.uint8), "labels": [i, 9, 0, 5]}
        (folder / name).write_bytes(pickle.dumps(batches[name]))
    meta = {"label_names": [f"c{i}" for i in range(10)]}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta))
    make_image_folder(tmp_path)  # an ImageFolder copy next to it must be ignored

    data = get_dataset("CIFAR10", str(tmp_path), download=False, cache_dir=str(tmp_path / "c"))
    assert data.labels_train.tolist() == [label for i in range(5) for label in (i, 9, 0, 5)]
    assert data.class_names[:2] == ["c0", "c1"] and len(data.labels_test) == 4
    expected = torch.from_numpy(batches["data_batch_2"]["data"][3].reshape(3, 32, 32)).long()
    assert torch.equal(to_pixels(data, data.images_train[7:8])[0], expected)  # CHW order


def test_imagenet_subset_follows_imagenet_class_order(tmp_path):
    wnids = [f"n{i:08d}" for i in range(1000)]
    for split in ("train", "val"):
        for wnid in wnids:
            (tmp_path / split / wnid).mkdir(parents=True)
    # imagewoof lists 193 first and 155 fifth; the loader keeps ImageNet's order (155 first).
    for class_id, value in ((193, 50), (155, 200)):
        for split in ("train", "val"):
            array = np.full((160, 200, 3), value, np.uint8)
            # Resize(128) makes it 128x160, CenterCrop(128) cuts 16 columns (20 here) each side.
            array[:, :16] = array[:, -16:] = 0
            Image.fromarray(array).save(tmp_path / split / wnids[class_id] / "a.png")
    data = get_dataset("ImageNet", str(tmp_path), subset="imagewoof", cache_dir=str(tmp_path))
    assert data.im_size == (128, 128) and data.num_classes == 10
    assert data.labels_train.tolist() == [4, 0] and data.labels_test.tolist() == [4, 0]
    assert data.class_names[0] == wnids[193] and data.class_names[4] == wnids[155]
    pixels = to_pixels(data, data.images_train)
    assert pixels[0].min() >= 199 and pixels[1].max() <= 51  # no black border left
