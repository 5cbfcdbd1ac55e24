"""The digits data split and the shipped default checkpoint (conversion/default_checkpoint)."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from conversion import digits
from conversion.convert import DEFAULT_CHECKPOINT as CHECKPOINT


@pytest.fixture(scope="module")
def split():
    return digits.load_digits_split()


def test_shipped_digits_are_scikit_learns():
    """conversion/digits_data/digits.npz holds load_digits' arrays (scikit-learn 1.9.1, written by
    tools/make_digits_data.py): UCI optdigits.tes' per-class counts and a pinned digest, so any
    change to the file fails here (the test environment has no scikit-learn to compare with)."""
    import hashlib

    with np.load(digits.DATA) as data:
        images, labels = data["images"], data["labels"]
    assert images.shape == (1797, 8, 8) and images.dtype == labels.dtype == np.uint8
    assert images.max() == 16 and np.bincount(labels).tolist() == [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]
    digest = hashlib.sha256(images.tobytes() + labels.tobytes()).hexdigest()
    assert digest == "87ff0c9e40dc7e2c0e34e7257799c2e3f3aec1a016363bb11cad869ec428a826"


def test_shapes_and_dtypes(split):
    x_train, y_train, x_test, y_test = split
    s = digits.IMAGE_SIZE
    assert x_train.shape == (len(y_train), s, s, 3) and x_test.shape == (len(y_test), s, s, 3)
    assert x_train.dtype == x_test.dtype == np.uint8
    assert y_train.dtype.kind == y_test.dtype.kind == "i"
    assert len(y_train) + len(y_test) == 1797 and len(y_test) == 359
    # Dark ink on white paper, grey replicated over RGB.
    assert (x_test[:, 0, 0] == 255).all() and x_test.mean() > 128 and x_test.min() < 20
    assert (x_test[..., 0] == x_test[..., 2]).all()
    assert digits.DIGIT_LABELS == {i: str(i) for i in range(10)}


def test_split_is_deterministic_and_stratified(split):
    images, labels = digits.load_digits_images()
    held = digits.heldout_indices(labels)
    np.testing.assert_array_equal(held, digits.heldout_indices(labels))
    assert held[:5].tolist() == [5, 9, 12, 14, 16]  # pins the documented seed-0 split
    x_train, y_train, x_test, y_test = split
    np.testing.assert_array_equal(x_test, images[held])
    np.testing.assert_array_equal(y_test, labels[held])
    assert len(np.unique(held)) == len(held) == len(y_test)
    # the training set is exactly the rest, in dataset order: no held-out digit is trained on
    np.testing.assert_array_equal(x_train, images[np.setdiff1d(np.arange(len(labels)), held)])
    per_class_test, per_class_all = np.bincount(y_test, minlength=10), np.bincount(labels, minlength=10)
    np.testing.assert_array_equal(per_class_test, np.rint(0.2 * per_class_all))
    np.testing.assert_array_equal(np.bincount(y_train, minlength=10), per_class_all - per_class_test)


def test_pngs_roundtrip(tmp_path, split):
    _, _, x_test, y_test = split
    written = digits.write_heldout_pngs(tmp_path, per_class=2)
    assert [label for _, label in written] == [d for d in range(10) for _ in range(2)]
    for path, label in written[::2]:
        first = np.flatnonzero(y_test == label)[0]
        np.testing.assert_array_equal(np.asarray(Image.open(path).convert("RGB")), x_test[first])


def test_checkpoint_files_and_config():
    transformers = pytest.importorskip("transformers")
    names = set(os.listdir(CHECKPOINT))
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "metrics.json", "README.md"} <= names
    assert sum(os.path.getsize(os.path.join(CHECKPOINT, n)) for n in names) <= 3 * 1024 * 1024
    config = transformers.BitConfig.from_pretrained(CHECKPOINT)
    assert config.layer_type == "preactivation" and config.global_padding is None
    assert config.num_labels == 10 and config.id2label == digits.DIGIT_LABELS


def test_checkpoint_heldout_accuracy_matches_metrics(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    with open(os.path.join(CHECKPOINT, "metrics.json")) as f:
        metrics = json.load(f)
    assert metrics["heldout_accuracy_transformers"] >= 0.97
    assert metrics["image_size"] == digits.IMAGE_SIZE and metrics["seed"] == digits.SEED

    # Re-measure from real PNG files through the auto classes, as a user of the folder would.
    written = digits.write_heldout_pngs(tmp_path, per_class=None)
    labels = np.array([label for _, label in written])
    processor = transformers.AutoImageProcessor.from_pretrained(CHECKPOINT)
    model = transformers.AutoModelForImageClassification.from_pretrained(CHECKPOINT).eval()
    inputs = processor([Image.open(p) for p, _ in written], return_tensors="pt")
    with torch.no_grad():
        predicted = model(**inputs).logits.argmax(-1).numpy()
    assert len(labels) == metrics["num_heldout"]
    assert int((predicted == labels).sum()) == metrics["num_correct"]
    assert (predicted == labels).mean() == metrics["heldout_accuracy_transformers"]
