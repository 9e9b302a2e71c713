"""Boards' image folders of real pictures for tests: handwritten digits (scikit-learn's 1,797, offline and
loaded in milliseconds) written as PNG and JPEG files into one sub-folder per class, as a board's
`--data DIR` holds them."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
from PIL import Image

from odl_fed.training.data import load_dataset

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


@functools.lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    data = load_dataset("digits", split="train")
    return data.images[:, 0].numpy(), data.labels.numpy()


def digit_folder(root: Path, classes: dict[str, int], *, per_class: int, start: int = 0,
                 formats: tuple[str, ...] = ("png", "jpg")) -> list[Path]:
    """Write ``per_class`` real digits of each ``{folder: digit}`` into ``root/folder/``, as greyscale
    PNGs and RGB JPEGs in turn (``formats``), upscaled from 8 to 56 px; the images ``start`` deep into each
    digit's list (boards given different starts hold different pictures). Returns the files written."""
    images, labels = _digits()
    written = []
    for folder, digit in classes.items():
        (root / folder).mkdir(parents=True, exist_ok=True)
        chosen = np.flatnonzero(labels == digit)[start:start + per_class]
        assert len(chosen) == per_class, f"only {len(chosen)} digits {digit} from {start}"
        for i, index in enumerate(chosen):
            image = Image.fromarray(images[index], mode="L").resize((56, 56), Image.Resampling.BILINEAR)
            kind = formats[i % len(formats)]
            path = root / folder / f"{digit}-{index}.{kind}"
            (image if kind == "png" else image.convert("RGB")).save(path, quality=95) if kind == "jpg" \
                else image.save(path)
            written.append(path)
    return written
