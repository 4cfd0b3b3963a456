"""Helpers shared by the test files."""

from pathlib import Path

import torch
from torchvision.io import write_png


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
