"""The handwritten digits (scikit-learn's ``load_digits``, shipped in digits_data/) rendered as
small RGB images.

The 1797 8x8 digits (ink intensity 0..16) become dark-on-light RGB uint8 images:
``gray = 255 - round(v * 255 / 16)``, upsampled with PIL bicubic to
``IMAGE_SIZE`` and replicated to 3 channels.

The train / held-out split is stratified and fixed: for each class (in label
order) the sample indices are shuffled by one ``numpy.random.default_rng(SEED)``
generator and the first ``round(HELDOUT_FRACTION * n_class)`` go to the held-out
set. Both sets keep the original dataset order. PCG64 streams are stable across
numpy versions, so the split does not depend on the installed scikit-learn's
``train_test_split`` implementation.

Only numpy and PIL are used: the 8x8 digits ship in ``digits_data/digits.npz`` (CC BY 4.0, see
its README.md), so neither the demo nor the tests need scikit-learn.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

IMAGE_SIZE = 32
SEED = 0
HELDOUT_FRACTION = 0.2
NUM_CLASSES = 10
DIGIT_LABELS = {i: str(i) for i in range(NUM_CLASSES)}
DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "digits_data", "digits.npz")

__all__ = [
    "DIGIT_LABELS",
    "HELDOUT_FRACTION",
    "IMAGE_SIZE",
    "NUM_CLASSES",
    "SEED",
    "heldout_indices",
    "load_digits_images",
    "load_digits_split",
    "render_digit",
    "write_heldout_pngs",
]


def render_digit(digit_8x8: np.ndarray, image_size: int = IMAGE_SIZE) -> np.ndarray:
    """One 8x8 digit (values 0..16) -> (image_size, image_size, 3) uint8, dark ink on white."""
    gray = 255 - np.rint(np.asarray(digit_8x8, np.float64) * (255.0 / 16.0))
    img = Image.fromarray(gray.astype(np.uint8), mode="L")
    if image_size != 8:
        img = img.resize((image_size, image_size), Image.Resampling.BICUBIC)
    return np.repeat(np.asarray(img, np.uint8)[:, :, None], 3, axis=2)


def load_digits_images(image_size: int = IMAGE_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """All 1797 digits as (N, image_size, image_size, 3) uint8 images and int64 labels."""
    with np.load(DATA) as data:
        digits, labels = data["images"], data["labels"]
    images = np.stack([render_digit(d, image_size) for d in digits])
    return images, labels.astype(np.int64)


def heldout_indices(labels: np.ndarray, fraction: float = HELDOUT_FRACTION, seed: int = SEED) -> np.ndarray:
    """Sorted dataset indices of the stratified held-out set (see module docstring)."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    picked = []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        picked.append(idx[: int(round(fraction * len(idx)))])
    return np.sort(np.concatenate(picked))


def load_digits_split(
    image_size: int = IMAGE_SIZE, fraction: float = HELDOUT_FRACTION, seed: int = SEED
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_train, y_train, x_test, y_test): NHWC uint8 images and int64 labels."""
    images, labels = load_digits_images(image_size)
    test = np.zeros(len(labels), bool)
    test[heldout_indices(labels, fraction, seed)] = True
    return images[~test], labels[~test], images[test], labels[test]


def write_heldout_pngs(
    folder: str | os.PathLike, per_class: int | None = 1, image_size: int = IMAGE_SIZE
) -> list[tuple[str, int]]:
    """Write the first ``per_class`` held-out images of every digit (all if None) as PNGs.

    Files are named ``digit{label}_{k}.png``; returns ``[(path, label), ...]``
    ordered by label then k. PNG is lossless, so reading a file back gives
    exactly the array from ``load_digits_split``.
    """
    _, _, x_test, y_test = load_digits_split(image_size)
    os.makedirs(folder, exist_ok=True)
    written = []
    for label in range(NUM_CLASSES):
        for k, i in enumerate(np.flatnonzero(y_test == label)[:per_class]):
            path = os.path.join(os.fspath(folder), f"digit{label}_{k}.png")
            Image.fromarray(x_test[i]).save(path)
            written.append((path, label))
    return written
