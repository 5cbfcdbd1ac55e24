"""Real images the converter verifies and calibrates on: the shipped photos (default for
natural-image models), the held-out digits (the digits demo only) or a user's folder."""

import dataclasses
import io
import os

import numpy as np

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")


@dataclasses.dataclass
class RealImages:
    """Encoded images (what a serving client sends), their decoded arrays, optional labels."""
    encoded: list
    arrays: list
    labels: np.ndarray | None = None
    description: str = ""

    def pick(self, count):
        """`count` of the images spread evenly over the list (class folders are sorted)."""
        picks = np.unique(np.linspace(0, len(self.arrays) - 1, count).round().astype(int))
        return [self.arrays[i] for i in picks]


def _encode_png(array):
    from PIL import Image
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "PNG")
    return buffer.getvalue()


def digits_images(split="test", limit=None):
    """Held-out (or training) digits, losslessly PNG-encoded, labelled. Needs scikit-learn."""
    try:
        from conversion.digits import load_digits_split
        x_train, y_train, x_test, y_test = load_digits_split()
    except ImportError as e:
        raise ImportError(f"the digits demo needs scikit-learn ({e}): pip install 'tfbit[demo]'") from None
    images, labels = (x_test, y_test) if split == "test" else (x_train, y_train)
    images, labels = images[:limit], labels[:limit]
    return RealImages([_encode_png(a) for a in images], list(images), labels, f"held-out digits ({split})")


def _read_files(paths, description, labels=None):
    from tfbit.image_processor import load_image
    encoded = []
    for p in paths:
        with open(p, "rb") as f:
            encoded.append(f.read())
    return RealImages(encoded, [np.asarray(load_image(p)) for p in paths], labels, description)


def folder_images(folder, limit=None, label2id=None):
    """Images under `folder`; labelled when every image sits in a folder named after a label
    of the model (folder/<label>/*.png), so the report can show each artifact's accuracy."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"--images {folder}: no such directory")
    paths = sorted(os.path.join(d, f) for d, _, files in os.walk(folder) for f in files
                   if f.lower().endswith(IMAGE_EXTENSIONS))
    if not paths:
        raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {folder}")
    paths = paths[:limit]
    classes = [os.path.basename(os.path.dirname(p)) for p in paths]
    labels = None
    if label2id and all(c in label2id for c in classes):
        labels = np.array([label2id[c] for c in classes])
    return _read_files(paths, f"{len(paths)} images from {folder}", labels)


def photo_images(limit=None):
    """The colour photographs shipped with tfbit (conversion/photos, see its README)."""
    from conversion.photos import photo_paths
    paths = photo_paths()[:limit]
    return _read_files(paths, f"{len(paths)} shipped photos")


def mirrored(arrays):
    """Left-right mirrored copies: calibration inputs from the same distribution as the
    verification images without being the same images."""
    return [np.ascontiguousarray(a[:, ::-1]) for a in arrays]
