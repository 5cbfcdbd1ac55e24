"""Real images the converter verifies and calibrates on: the shipped photos (default for
natural-image models), the held-out digits (the digits demo only) or a user's folder."""

import dataclasses
import io
import os

import numpy as np

from tfbit.preprocessing.decode import IMAGE_EXTENSIONS

# 32 files: 12 license-clean photos (scikit-image, matplotlib, scikit-learn, scipy) and 20 crops
# of them, mostly JPEG plus grayscale, RGBA and RGB PNGs, odd sizes up to 512 px; origins and
# licenses in its README.md, rebuilt by tools/make_photos.py.
PHOTOS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "photos")


@dataclasses.dataclass
class RealImages:
    """Encoded images (what a serving client sends), the same decoded (PIL images as
    transformers' path loader gives them, or arrays), optional labels."""

    encoded: list
    images: list
    labels: np.ndarray | None = None
    description: str = ""


def spread(items, count):
    """`count` of `items` taken evenly over the list (sorted class folders: every class)."""
    if count is None or count >= len(items):
        return list(items)
    return [items[i] for i in np.unique(np.linspace(0, len(items) - 1, count).round().astype(int))]


def _encode_png(array):
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "PNG")
    return buffer.getvalue()


def digits_images(split="test", limit=None):
    """Held-out (or training) digits, losslessly PNG-encoded, labelled."""
    from conversion.digits import load_digits_split

    x_train, y_train, x_test, y_test = load_digits_split()
    images, labels = (x_test, y_test) if split == "test" else (x_train, y_train)
    images, labels = images[:limit], labels[:limit]
    return RealImages([_encode_png(a) for a in images], list(images), labels, f"held-out digits ({split})")


def _read_files(paths, description, labels=None):
    from tfbit.preprocessing.decode import load_image

    encoded = []
    for p in paths:
        try:
            with open(p, "rb") as f:
                encoded.append(f.read())
        except OSError as e:  # a dangling link, a link loop, a folder named like an image
            raise ValueError(f"cannot read {p}: {e.strerror}") from None
    # PIL images, not arrays: the processor then handles a transparency colour as transformers does
    return RealImages(encoded, [load_image(p) for p in paths], labels, description)


def folder_images(folder, limit=None, label2id=None, calibration=0):
    """(verification images, calibration images) from `folder`.

    Args:
        limit: verification images, taken evenly over the sorted files (every class folder).
        label2id: the model's labels: the images are labelled when each sits in a folder
            named after one (folder/<label>/*.png), so the report can show accuracy.
        calibration: calibration images, taken from the files not verified on when there
            are enough (so verification is not flattered), else from the same ones.
    """
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"--images {folder}: no such directory")
    paths = sorted(
        os.path.join(d, f) for d, _, files in os.walk(folder) for f in files if f.lower().endswith(IMAGE_EXTENSIONS)
    )
    if not paths:
        raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {folder}")
    chosen = spread(paths, limit)
    rest = sorted(set(paths) - set(chosen))
    calibration_paths = spread(rest if len(rest) >= calibration else chosen, calibration) if calibration else []
    classes = [os.path.basename(os.path.dirname(p)) for p in chosen]
    labels = None
    if label2id and all(c in label2id for c in classes):
        labels = np.array([label2id[c] for c in classes])
    calibration = _read_files(calibration_paths, "").images if calibration_paths else None
    return _read_files(chosen, f"{len(chosen)} images from {folder}", labels), calibration


def photo_paths():
    """Sorted paths of the photographs shipped in conversion/photos/."""
    return sorted(os.path.join(PHOTOS_DIR, f) for f in os.listdir(PHOTOS_DIR) if f.lower().endswith(IMAGE_EXTENSIONS))


def photo_images(limit=None):
    """The shipped photographs (`limit` of them, taken evenly), unlabelled."""
    paths = spread(photo_paths(), limit)
    return _read_files(paths, f"{len(paths)} shipped photos")


def mirrored(images):
    """Left-right mirrored copies (PIL images): calibration inputs from the same distribution as
    the verification images without being the same images."""
    from PIL import ImageOps

    return [ImageOps.mirror(image) for image in images]
