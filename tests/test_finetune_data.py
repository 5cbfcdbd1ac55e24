import shutil

import numpy as np
import pytest
import skimage.data
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from tfbit.finetune import (
    MixUp,
    Normalize,
    PipelineOptions,
    from_arrays,
    from_image_folder,
    from_tfds,
    hyperrule_plan,
    make_pipeline,
    mixup,
    sample_mixup_lambda,
)


def _small(array, size=(64, 48)):
    return Image.fromarray(array).resize(size)


@pytest.fixture(scope="module")
def photo_root(tmp_path_factory):
    """tfds.ImageFolder layout root/train/<class>/<image>; root/train is a plain image folder."""
    root = tmp_path_factory.mktemp("photos")
    files = {
        "cat": [
            ("chelsea.png", skimage.data.chelsea()),
            ("cat.JPG", skimage.data.cat()),
            ("cat2.gif", skimage.data.chelsea()[::-1]),
        ],
        "astronaut": [
            ("astronaut.jpg", skimage.data.astronaut()),
            ("astronaut.bmp", skimage.data.astronaut()[:, ::-1]),
        ],
        "coffee": [
            ("coffee.jpeg", skimage.data.coffee()),
            ("camera.png", skimage.data.camera()),
            ("rocket.png", skimage.data.rocket()),
        ],
    }
    for label, items in files.items():
        folder = root / "train" / label
        folder.mkdir(parents=True)
        for name, array in items:
            _small(array).save(folder / name)
    (root / "train" / "cat" / "notes.txt").write_text("not an image, ignored")
    return root


# --- sources -----------------------------------------------------------------------------


def test_image_folder(photo_root):
    ds = from_image_folder(photo_root / "train")
    assert ds.class_names == ("astronaut", "cat", "coffee")
    assert ds.id2label == {0: "astronaut", 1: "cat", 2: "coffee"} and ds.label2id["cat"] == 1
    assert ds.num_examples == 8 and ds.num_classes == 3
    assert ds.image_size == (48, 64)
    examples = list(ds.dataset.as_numpy_iterator())
    assert len(examples) == 8
    assert sorted(int(y) for _, y in examples) == [0, 0, 1, 1, 1, 2, 2, 2]
    for image, _ in examples:  # grayscale PNG and GIF decode to 3 channels too
        assert image.dtype == np.uint8 and image.shape == (48, 64, 3)


def test_image_folder_pipelines(photo_root):
    ds = from_image_folder(photo_root / "train")
    x, y = next(iter(make_pipeline(ds, (40, 32), batch_size=8)))
    assert x.shape == (8, 32, 32, 3) and x.dtype == tf.float32
    assert y.shape == (8,) and y.dtype == tf.int64
    assert -1.0 <= float(tf.reduce_min(x)) < 0 < float(tf.reduce_max(x)) <= 1.0

    train = make_pipeline(ds, (40, 32), batch_size=3, training=True, one_hot=True, options=PipelineOptions(seed=1))
    batches = list(train.take(5))  # repeats: 15 examples from 8
    assert all(b[0].shape == (3, 32, 32, 3) for b in batches)
    assert all(b[1].shape == (3, 3) for b in batches)
    np.testing.assert_allclose(tf.reduce_sum(batches[0][1], axis=1), 1.0)


def test_evaluation_pipeline_decodes_each_image_once_when_it_fits_in_memory(photo_root, tmp_path):
    """A second pass over a small evaluation pipeline reads nothing from disk (Keras starts a new
    iterator per validation pass); above `evaluation_cache_bytes` every pass decodes again."""
    folder = tmp_path / "train"
    shutil.copytree(photo_root / "train", folder)
    ds = from_image_folder(folder)
    cached = make_pipeline(ds, 32, batch_size=4)  # 8 crops of 32x32x3 float32: 98 KB
    uncached = make_pipeline(ds, 32, batch_size=4, options=PipelineOptions(evaluation_cache_bytes=8 * 32 * 32 * 12 - 1))
    first = np.concatenate([x for x, _ in cached])
    np.testing.assert_array_equal(np.concatenate([x for x, _ in uncached]), first)
    shutil.rmtree(folder)
    np.testing.assert_array_equal(np.concatenate([x for x, _ in cached]), first)
    with pytest.raises(tf.errors.NotFoundError):
        list(uncached)


def test_image_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        from_image_folder(tmp_path / "does-not-exist")
    with pytest.raises(ValueError, match="no class folders"):
        from_image_folder(tmp_path)

    (tmp_path / "good").mkdir()
    _small(skimage.data.astronaut()).save(tmp_path / "good" / "a.png")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    with pytest.raises(ValueError, match=r"empty.*contains no images"):
        from_image_folder(tmp_path)

    (tmp_path / "empty" / "bad.jpg").write_bytes(b"this is not a jpeg")
    with pytest.raises(ValueError, match=r"bad\.jpg"):
        from_image_folder(tmp_path)

    png = (tmp_path / "good" / "a.png").read_bytes()
    (tmp_path / "empty" / "bad.jpg").unlink()
    (tmp_path / "empty" / "truncated.png").write_bytes(png[: len(png) // 2])
    with pytest.raises(ValueError, match=r"truncated\.png"):
        from_image_folder(tmp_path)


def test_truncated_jpeg_is_caught_by_the_up_front_check(tmp_path):
    import io

    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        _small(skimage.data.astronaut()).save(tmp_path / name / "fine.png")
    encoded = io.BytesIO()
    Image.fromarray(skimage.data.astronaut()[::4, ::4]).save(encoded, "JPEG")
    cut = encoded.getvalue()[: len(encoded.getvalue()) // 2]
    (tmp_path / "b" / "cut.jpg").write_bytes(cut)
    with Image.open(tmp_path / "b" / "cut.jpg") as image:
        image.verify()  # PIL's verify does not decode, so it misses this
    unchecked = from_image_folder(tmp_path, verify=False)
    assert unchecked.image_size is None and str(tmp_path / "b" / "cut.jpg") in unchecked.paths
    with pytest.raises(ValueError, match=r"cannot decode image file '.*b/cut\.jpg': .*JPEG"):
        from_image_folder(tmp_path)

    (tmp_path / "a" / "cut.jpg").write_bytes(cut)
    (tmp_path / "a" / "empty.png").write_bytes(b"")
    with pytest.raises(ValueError, match=r"a/cut\.jpg'.*\(2 more cannot be decoded: .*a/empty\.png', .*b/cut\.jpg'\)"):
        from_image_folder(tmp_path)


def test_relabeled_maps_classes_by_name():
    images = np.zeros((3, 4, 4, 3), np.uint8)
    validation = from_arrays(images, np.array([0, 1, 0]), class_names=["cat", "ant"])
    aligned = validation.relabeled(["ant", "bee", "cat"])
    assert aligned.class_names == ("ant", "bee", "cat") and aligned.num_examples == 3
    assert [int(y) for _, y in aligned.dataset.as_numpy_iterator()] == [2, 0, 2]
    _, labels = next(iter(make_pipeline(aligned, 4, batch_size=3, one_hot=True)))
    np.testing.assert_array_equal(labels, [[0, 0, 1], [1, 0, 0], [0, 0, 1]])
    with pytest.raises(ValueError, match=r"classes \['cat'\] are not among the classes \['ant', 'bee'\]"):
        validation.relabeled(["ant", "bee"])


def test_arrays():
    images = np.random.default_rng(0).integers(0, 256, (6, 10, 12), dtype=np.uint8)  # grayscale
    ds = from_arrays(images, np.array([0, 1, 2, 0, 1, 2]), class_names=["a", "b", "c"])
    assert ds.class_names == ("a", "b", "c") and ds.num_examples == 6 and ds.image_size == (10, 12)
    image, label = next(ds.dataset.as_numpy_iterator())
    assert image.shape == (10, 12, 3) and image.dtype == np.uint8 and label == 0
    np.testing.assert_array_equal(image[..., 0], images[0])

    square = images[:, :, :10]
    floats = from_arrays(square[..., None].astype(np.float64), np.arange(6))
    assert floats.class_names == tuple("012345")
    x, _ = next(iter(make_pipeline(floats, 10, batch_size=6)))
    np.testing.assert_allclose(x[..., 1], square / 127.5 - 1, atol=1e-5)  # same-size resize is exact


@pytest.mark.parametrize(
    "images, labels, match",
    [
        (np.zeros((4, 8, 8, 3)), np.zeros(3, int), r"images \(4, 8, 8, 3\), labels \(3,\)"),
        (np.zeros((8, 8)), np.zeros(8, int), r"\(8, 8\)"),
        (np.zeros((2, 4, 8, 8, 3)), np.zeros(2, int), r"\(2, 4, 8, 8, 3\)"),
        (np.zeros((4, 8, 8, 2)), np.zeros(4, int), r"\(4, 8, 8, 2\)"),
        (np.zeros((4, 8, 8, 3)), np.zeros((4, 1), int), r"\(4, 1\)"),
        (np.zeros((4, 8, 8, 3)), np.zeros(4), "integer"),
    ],
)
def test_array_errors(images, labels, match):
    with pytest.raises(ValueError, match=match):
        from_arrays(images, labels)


def test_array_label_range():
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        from_arrays(np.zeros((3, 8, 8, 3), np.uint8), np.array([0, 1, 2]), class_names=["a", "b"])


class TinyGray(tfds.core.GeneratorBasedBuilder):
    """A locally generated tfds dataset: 16×16 grayscale, two classes."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(16, 16, 1)),
                    "label": tfds.features.ClassLabel(names=["dark", "light"]),
                }
            ),
        )

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(10), "test": self._generate_examples(4)}

    def _generate_examples(self, n):
        for i in range(n):
            yield i, {"image": np.full((16, 16, 1), 40 + 170 * (i % 2), np.uint8), "label": i % 2}


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("tfds")
    TinyGray(data_dir=str(data_dir)).download_and_prepare()
    return data_dir


def test_tfds_by_name_offline(tfds_dir):
    ds = from_tfds("tiny_gray", "train", data_dir=str(tfds_dir))
    assert ds.class_names == ("dark", "light") and ds.num_examples == 10
    assert ds.image_size == (16, 16) and ds.id2label == {0: "dark", 1: "light"}
    for image, label in ds.dataset.as_numpy_iterator():
        assert image.shape == (16, 16, 3) and image.dtype == np.uint8
        assert image[0, 0, 0] == (210 if label else 40)

    assert from_tfds("tiny_gray", "test[:3]", data_dir=str(tfds_dir)).num_examples == 3
    plan = hyperrule_plan(ds.num_examples, ds.image_size, batch_size=4)
    x, y = next(iter(make_pipeline(ds, plan, training=True, options=PipelineOptions(seed=0))))
    assert x.shape == (4, 128, 128, 3) and y.shape == (4,)
    for image, label in zip(x.numpy(), y.numpy()):  # constant images survive the pipeline
        np.testing.assert_allclose(image, (210 if label else 40) / 127.5 - 1, atol=1e-5)


def test_tfds_from_directory_and_builder(tfds_dir, photo_root):
    prepared = tfds.builder("tiny_gray", data_dir=str(tfds_dir)).data_dir
    assert from_tfds(prepared, "test").num_examples == 4

    ds = from_tfds(tfds.ImageFolder(str(photo_root)), "train")
    # tfds.ImageFolder skips .bmp/.gif: compare with our reader restricted the same way.
    same = from_image_folder(photo_root / "train", extensions=(".jpg", ".jpeg", ".png"))
    assert ds.class_names == same.class_names and ds.num_examples == same.num_examples == 6
    x, y = next(iter(make_pipeline(ds, (36, 32), batch_size=8)))
    assert x.shape == (6, 32, 32, 3)
    assert sorted(y.numpy()) == sorted(label for _, label in same.dataset.as_numpy_iterator())


def test_tfds_not_prepared_or_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        from_tfds("tiny_gray", "train", data_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no-such-dir"):
        from_tfds(tmp_path / "no-such-dir", "train")


# --- augmentation --------------------------------------------------------------------------


def _half_white(n, size=8):
    images = np.zeros((n, size, size, 3), np.uint8)
    images[:, :, size // 2 :] = 255
    return from_arrays(images, np.zeros(n, int))


def _flipped(batch):
    return (batch[:, :, 0, 0] > 0).numpy().all(axis=1)  # white on the left


def test_flips_are_random_per_image():
    ds = _half_white(64)
    seeded = PipelineOptions(seed=3)
    x, _ = next(iter(make_pipeline(ds, (8, 8), batch_size=64, training=True, options=seeded)))
    flipped = _flipped(x)
    assert 10 < flipped.sum() < 54  # Binomial(64, 0.5), not all and not none
    assert set(np.unique(x)) <= {-1.0, 1.0}  # nothing else altered

    again = next(iter(make_pipeline(ds, (8, 8), batch_size=64, training=True, options=seeded)))[0]
    np.testing.assert_array_equal(_flipped(again), flipped)  # seed reproduces

    evaluation = next(iter(make_pipeline(ds, (8, 8), batch_size=64)))[0]
    assert not _flipped(evaluation).any()


def test_flips_and_crops_change_between_epochs():
    ds = _half_white(32)
    pipeline = make_pipeline(ds, (8, 8), batch_size=32, training=True, repeat=False, options=PipelineOptions(seed=5))
    first, second = (_flipped(next(iter(pipeline))[0]) for _ in range(2))
    assert (first != second).any()

    ramp = np.tile(np.arange(16, dtype=np.uint8)[None, :, None] * 16, (16, 1, 3))[None].repeat(32, 0)
    crops = next(
        iter(
            make_pipeline(
                from_arrays(ramp, np.zeros(32, int)),
                (16, 8),
                batch_size=32,
                training=True,
                options=PipelineOptions(seed=0),
            )
        )
    )[0]
    assert len({float(row.min()) for row in crops.numpy()}) > 2  # several crop offsets


def test_custom_preprocess_and_mixup_in_pipeline():
    ds = _half_white(8)
    unit_range = PipelineOptions(preprocess=Normalize(0.0, 1.0))
    x, _ = next(iter(make_pipeline(ds, 8, batch_size=8, options=unit_range)))
    assert set(np.unique(x)) == {0.0, 1.0}

    ds = from_arrays(np.zeros((8, 32, 32, 3), np.uint8), np.arange(8) % 4)
    plan = hyperrule_plan(50_000, 32, batch_size=8)  # MixUp 0.1 from the rule
    x, y = next(iter(make_pipeline(ds, plan, training=True, options=PipelineOptions(seed=0))))
    assert x.shape == (8, 128, 128, 3) and y.shape == (8, 4) and y.dtype == tf.float32
    np.testing.assert_allclose(tf.reduce_sum(y, axis=1), 1.0, rtol=1e-6)
    assert make_pipeline(ds, plan, training=False).element_spec[1].shape.rank == 1
    with pytest.raises(ValueError, match="training"):
        make_pipeline(ds, plan, training=False, options=PipelineOptions(mixup_alpha=0.1))


# --- MixUp ---------------------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [0.1, 1.0])
def test_lambda_is_beta_distributed(alpha):
    lam = sample_mixup_lambda(alpha, seed=(1, 2), shape=(20_000,)).numpy()
    assert np.isfinite(lam).all() and lam.min() >= 0 and lam.max() <= 1
    assert lam.mean() == pytest.approx(0.5, abs=0.02)
    assert lam.var() == pytest.approx(1 / (4 * (2 * alpha + 1)), rel=0.05)  # Beta(α, α) variance
    if alpha == 0.1:  # mass concentrates near 0 and 1
        assert ((lam < 0.1) | (lam > 0.9)).mean() > 0.6
    np.testing.assert_array_equal(lam, sample_mixup_lambda(alpha, seed=(1, 2), shape=(20_000,)))


def test_mixup_with_reverse_is_exact():
    images = tf.random.uniform((5, 4, 4, 3), 0, 255, seed=0)
    labels = tf.constant([0, 1, 2, 3, 4])
    x, y = mixup(images, labels, alpha=0.4, num_classes=6, seed=7)
    lam = float(y[0, 0])  # label 0 gets λ from itself, its partner is label 4
    assert 0 < lam < 1 and float(y[0, 4]) == pytest.approx(1 - lam)
    np.testing.assert_allclose(x, lam * images + (1 - lam) * images[::-1], rtol=1e-6, atol=1e-4)
    np.testing.assert_allclose(tf.reduce_sum(y, axis=1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(y[2], tf.one_hot(2, 6))  # the middle image pairs with itself
    np.testing.assert_allclose(x[2], images[2], rtol=1e-6)


def test_mixup_alpha_zero_is_identity():
    images = tf.constant(np.arange(2 * 2 * 2 * 3).reshape(2, 2, 2, 3), tf.uint8)
    x, y = mixup(images, tf.constant([1, 0]), alpha=0.0, num_classes=3)
    assert x.dtype == tf.float32
    np.testing.assert_array_equal(x, tf.cast(images, tf.float32))
    np.testing.assert_array_equal(y, [[0, 1, 0], [1, 0, 0]])
    with pytest.raises(ValueError, match="alpha"):
        mixup(images, tf.constant([1, 0]), alpha=-1.0, num_classes=3)


def test_mixup_callable_in_dataset_map():
    images = np.random.default_rng(0).uniform(0, 255, (40, 2, 2, 3)).astype(np.float32)
    ds = tf.data.Dataset.from_tensor_slices((images, np.arange(40) % 2)).batch(2)

    def lambdas(pipeline):  # labels are [0, 1] per batch: λ sits at y[0, 0]
        return np.array([float(y[0, 0]) for _, y in pipeline])

    mixed = ds.map(MixUp(0.5, num_classes=2, seed=11))
    first, second = lambdas(mixed), lambdas(mixed)
    assert len(set(first.round(6))) == 20  # a fresh λ per batch
    assert not np.allclose(first, second)  # and per epoch
    np.testing.assert_allclose(first, lambdas(ds.map(MixUp(0.5, num_classes=2, seed=11))))
    one_hot = ds.map(lambda x, y: (x, tf.one_hot(y, 2)))
    y = next(iter(one_hot.map(MixUp(0.5, num_classes=2))))[1]
    np.testing.assert_allclose(tf.reduce_sum(y, axis=1), 1.0, rtol=1e-6)


def test_every_iterator_of_a_training_pipeline_yields_the_same_stream():
    """Keras' `fit` under JAX reads one batch to build the model, drops that iterator and opens
    another: its order, crops, flips and MixUp λs must not depend on how far the first (and its
    prefetching) got, and equal what a single iterator sees under TensorFlow."""
    ds = from_arrays(np.random.default_rng(0).integers(0, 255, (16, 10, 10, 3), np.uint8), np.arange(16) % 4)

    def pipeline():
        options = PipelineOptions(mixup_alpha=0.5, seed=3)
        return make_pipeline(ds, (10, 8), batch_size=4, training=True, options=options)

    def batches(dataset):
        return [np.concatenate([x.numpy().ravel(), y.numpy().ravel()]) for x, y in dataset.take(6)]

    def after_reading(count):
        dataset = pipeline()
        first = iter(dataset)
        for _ in range(count):
            next(first)
        del first
        return batches(dataset)

    alone = batches(pipeline())
    np.testing.assert_array_equal(after_reading(1), alone)
    np.testing.assert_array_equal(after_reading(40), alone)
