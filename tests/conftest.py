"""Helpers shared by the test files."""

from pathlib import Path

import pytest
import torch
from torchvision.io import write_png

from utils.data import Data


def make_color_image_folder(root: Path, classes: int, size: int, counts: dict[str, int]) -> None:
    """root/<split>/class<c>/<i>.png: random RGB images, class c with a cast in channel c."""
    generator = torch.Generator().manual_seed(0)
    for split, count in counts.items():
        for c in range(classes):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(count):
                image = torch.randint(0, 256, (3, size, size), generator=generator)
                image[c] = image[c] // 2 + 128  # a class-dependent colour cast
                write_png(image.to(torch.uint8), str(folder / f"{i}.png"))


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module (`pytestmark = pytest.mark.usefixtures("one_thread")`): the
    tensors are tiny and the machine's cores are shared, so a second thread mostly waits."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# A fake 3-class 3x8x8 data set and synthetic sets, for the evaluation tests.
CLASSES, SIZE = 3, 8


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


# Covariances for the ZCA tests.


def closed_form_whitened_covariance(x: torch.Tensor, eps: float) -> torch.Tensor:
    """U diag(lam / (lam + eps)) U^T of the unbiased covariance of x, in float64."""
    flat = x.reshape(len(x), -1).double()
    centred = flat - flat.mean(dim=0)
    lam, u = torch.linalg.eigh(centred.T @ centred / (len(x) - 1))
    return u @ torch.diag(lam / (lam + eps)) @ u.T


def covariance(z: torch.Tensor) -> torch.Tensor:
    flat = z.reshape(len(z), -1).double()
    centred = flat - flat.mean(dim=0)
    return centred.T @ centred / (len(z) - 1)
