"""tfbit.BitPreprocessing: the Python processor as a Keras layer (functional models, tf.data, .keras)."""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import SMALL

import tfbit
from conversion import images as photos
from tfbit.preprocessing.decode import load_image
from tfbit.preprocessing.processor import BitImageProcessor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# uint8 images: the layer resizes in the processor's own fixed-point arithmetic (tfbit/preprocessing/tf_processor.py),
# so the pixels are equal and only the float32 normalization may round differently (measured
# <= 4.8e-7; the float32 ulp of values near 2.6). Before that, TF's float32 resize weights left
# one uint8 level (1 / 255 / std = 0.015) on <= 0.8% of the values and 1.9 levels on a few.
PIXEL_TOL = 1e-6


def _assert_equal_to_processor(ours, ref, what):
    ours = np.asarray(ours)
    assert ours.shape == ref.shape and ours.dtype == np.float32, what
    np.testing.assert_allclose(ours, ref, rtol=0, atol=PIXEL_TOL, err_msg=what)


# Float images are resized without rounding by both: only float32 summation order differs
# (measured max 3e-5 after normalizing, the processor's own float path against torch: 2.2e-6).
FLOAT_TOL = 1e-4


def _assert_float_close(ours, ref, what):
    delta = np.abs(np.asarray(ours) - ref)
    print(f"\n{what}: max |Δ| {delta.max():.2g}", end="")
    assert delta.max() <= FLOAT_TOL, f"{what}: max |Δ| {delta.max():.3g}"


@pytest.fixture(scope="module")
def shipped_photos():
    return {
        os.path.basename(p): np.asarray(image) for p, image in zip(photos.photo_paths(), photos.photo_images().images)
    }


def _odd_sizes():
    rng = np.random.RandomState(0)
    chelsea = np.asarray(load_image(os.path.join(photos.PHOTOS_DIR, "chelsea.jpg")))
    return {
        "225x1001": np.tile(chelsea, (1, 3, 1))[:225, :1001],
        "1001x225": np.tile(chelsea, (4, 1, 1))[:1001, :225],
        "301x451": np.pad(chelsea, ((0, 1), (0, 0), (0, 0)), mode="edge")[:301, :451],
        "17x9 upscaled": chelsea[::18, ::50][:17, :9],
        "224x224": chelsea[:224, :224],
        "noise 97x131": rng.randint(0, 256, (97, 131, 3)).astype(np.uint8),
    }


def test_shipped_photos_and_odd_sizes_match_the_processor(shipped_photos):
    processor = BitImageProcessor()
    layer = tfbit.BitPreprocessing(processor)
    for name, image in {**shipped_photos, **_odd_sizes()}.items():
        image = image[..., None] if image.ndim == 2 else image
        _assert_equal_to_processor(layer(image[None]), processor(image), f"{name} uint8")
        floats = image.astype(np.float32)  # resized without rounding or clamping, like the processor
        _assert_float_close(layer(floats[None]), processor(floats), f"{name} float32 0-255")


@pytest.mark.parametrize(
    "config",
    [
        dict(backend="pil"),
        dict(size=448, crop_size=448, resample=3),
        dict(size={"height": 96, "width": 128}, do_center_crop=False),
        dict(crop_size=320),
    ],
)  # larger than the resized image: padded
def test_other_configurations(config, shipped_photos):
    processor = BitImageProcessor.original_bit(**config) if "resample" in config else BitImageProcessor(**config)
    layer = tfbit.BitPreprocessing(processor)
    for name in ("astronaut_shuttle.png", "camera.png", "grace_hopper.jpg"):
        image = shipped_photos[name]
        image = image[..., None] if image.ndim == 2 else image
        _assert_equal_to_processor(layer(image[None]), processor(image), f"{name} {config}")


def test_inside_a_functional_model_saved_and_reloaded_in_a_fresh_process(tmp_path, shipped_photos):
    classifier = tfbit.BitForImageClassification(tfbit.BitConfig(**SMALL))
    processor = BitImageProcessor(size=64, crop_size=56, backend="pil")
    images = keras.Input((None, None, 3), dtype="uint8", name="image")
    preprocess = tfbit.BitPreprocessing(processor)
    model = keras.Model(images, classifier(preprocess(images)))
    assert preprocess.output.shape == (None, 56, 56, 3) and preprocess.output.dtype == "float32"
    image = shipped_photos["coffee.jpg"][None]
    expected = np.asarray(model(image))
    np.testing.assert_array_equal(expected, classifier(preprocess(image)))
    model.save(tmp_path / "m.keras")
    np.save(tmp_path / "image.npy", image)
    script = (
        "import keras, numpy as np, tfbit, sys\n"
        "model = keras.saving.load_model(sys.argv[1])\n"
        "layer = next(l for l in model.layers if isinstance(l, tfbit.BitPreprocessing))\n"
        "np.save(sys.argv[2], np.asarray(model(np.load(sys.argv[3]))))\n"
        "print(layer.processor.backend, layer.processor.crop_size['height'])\n"
    )
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            script,
            str(tmp_path / "m.keras"),
            str(tmp_path / "out.npy"),
            str(tmp_path / "image.npy"),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["pil", "56"]
    # Another process may pick other convolution kernels (the oneDNN switch and thread count
    # come from the environment it inherits, which earlier tests' CLIs set): float32 rounding
    # differences only (1.2e-7 seen in a full-suite run).
    np.testing.assert_allclose(
        np.load(tmp_path / "out.npy"), expected, rtol=0, atol=1e-6 * max(1.0, float(np.abs(expected).max()))
    )


def test_config_is_complete():
    processor = BitImageProcessor(
        size=300,
        crop_size={"height": 256, "width": 192},
        image_mean=0.5,
        image_std=0.25,
        do_convert_rgb=False,
        backend="pil",
    )
    layer = tfbit.BitPreprocessing(processor, name="prep")
    config = layer.get_config()
    json.dumps(config)
    restored = tfbit.BitPreprocessing.from_config(config)
    assert restored.processor == processor and restored.name == "prep"
    assert restored.get_config() == config


def test_from_pretrained_and_a_dict(tmp_path):
    processor = BitImageProcessor.original_bit(size=128, crop_size=128)
    processor.save_pretrained(tmp_path)
    assert tfbit.BitPreprocessing.from_pretrained(tmp_path).processor == processor
    with open(tmp_path / "preprocessor_config.json") as f:
        assert tfbit.BitPreprocessing(json.load(f)).processor == processor
    assert tfbit.BitPreprocessing().processor == BitImageProcessor()


def test_in_tf_data_on_images_of_different_sizes(shipped_photos):
    layer = tfbit.BitPreprocessing()
    images = [shipped_photos[n] for n in ("chelsea.jpg", "rocket.jpg", "flower_dahlia.png")]
    images = [i[..., :3] for i in images]
    dataset = tf.data.Dataset.from_generator(
        lambda: iter(images), output_signature=tf.TensorSpec([None, None, 3], tf.uint8)
    )
    (batch,) = dataset.map(layer).batch(3).as_numpy_iterator()
    assert batch.shape == (3, 224, 224, 3)
    for image, out in zip(images, batch):
        np.testing.assert_allclose(out, layer(image[None])[0], atol=1e-6)
    ragged = layer(tf.ragged.stack(images))  # a batch of different sizes at once
    np.testing.assert_allclose(ragged, batch, atol=1e-6)


def test_mixed_precision_policy_keeps_float32(shipped_photos):
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_float16")
    try:
        layer = tfbit.BitPreprocessing()
        out = layer(shipped_photos["camera.png"][None])
    finally:
        keras.config.set_dtype_policy(previous)
    assert out.dtype == tf.float32
    _assert_equal_to_processor(out, BitImageProcessor()(shipped_photos["camera.png"]), "mixed policy")


def test_errors_name_the_problem(tmp_path):
    layer = tfbit.BitPreprocessing()
    with pytest.raises(
        ValueError,
        match=r"expected \(H, W, C\) or \(N, H, W, C\) images with C in 1, 3, 4; "
        r"got shape \(1, 32, 32, 2\)",
    ):
        layer(np.zeros((1, 32, 32, 2), np.uint8))
    with pytest.raises(ValueError, match="backend must be one of"):
        tfbit.BitPreprocessing(backend="opencv")
    with pytest.raises(FileNotFoundError, match="no preprocessor_config.json at"):
        tfbit.BitPreprocessing.from_pretrained(tmp_path)


def test_readme_example_runs_as_written(tmp_path, shipped_photos, monkeypatch):
    import re

    page = os.path.join(ROOT, "docs", "models.md")  # the preprocessing section
    blocks = re.findall(r"```python\n(.*?)```", open(page, encoding="utf-8").read(), re.S)
    (block,) = [b for b in blocks if "BitPreprocessing.from_pretrained" in b]
    model, checkpoint = tfbit.load_model(os.path.join(ROOT, "conversion", "default_checkpoint"))
    folder = tmp_path / "saved_models" / "digits"
    folder.mkdir(parents=True)
    model.save(folder / "digits.keras")
    processor = BitImageProcessor.from_dict(checkpoint.preprocessor)
    processor.save_pretrained(folder)
    monkeypatch.chdir(tmp_path)  # the example's relative paths
    namespace = {}
    exec(block, namespace)
    image = shipped_photos["rocket.jpg"][None]
    pixels = namespace["preprocess"](image)
    _assert_equal_to_processor(pixels, processor(image[0]), "rocket.jpg at 32 px")
    np.testing.assert_allclose(namespace["model"](image), model(pixels), atol=1e-5)
