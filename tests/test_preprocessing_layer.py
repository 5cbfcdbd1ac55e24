"""tfbit.BitPreprocessing: the Python processor as a Keras layer (functional models, tf.data, .keras)."""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfbit
from conftest import SMALL
from conversion import images as photos
from tfbit.image_files import load_image
from tfbit.image_processor import BitImageProcessor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# TF resizes with float32 weights where the processor uses torch's 16-bit fixed point
# (tfbit/image_ops.py): values near a .5 rounding boundary land one uint8 level apart,
# 1 / 255 / std after normalizing, on <= 0.8% of the values of the shipped photos. The second
# (vertical) pass can carry a first-pass difference into a neighbour's own rounding, the bound
# image_ops documents: with the default config one value of the 150528 of each of 3 of the 32
# photos is 1.9 levels off (grace_hopper_ribbons, immunohistochemistry_gland, retina_macula);
# bilinear (timm's original BiT at 448 px) is further off: 5% of camera.png's values by one level,
# 0.011% by two, so it is not held to this bound here. Exact agreement needs the fixed-point
# weights in the graph (not done).
MAX_FRACTION = 0.01  # of the values that may differ at all
MAX_FRACTION_TWO_LEVELS = 2e-4  # of the values that may differ by more than one level (<= 2)


# Float images are resized without rounding by both: only float32 summation order differs
# (measured max 3e-5 after normalizing, the processor's own float path against torch: 2.2e-6).
FLOAT_TOL = 1e-4


def _one_level(processor):
    return processor.rescale_factor / min(np.atleast_1d(processor.image_std)) + 1e-6


def _assert_within_one_level(ours, ref, what, processor):
    ours = np.asarray(ours)
    assert ours.shape == ref.shape and ours.dtype == np.float32, what
    delta, ONE_LEVEL = np.abs(ours - ref), _one_level(processor)
    assert delta.max() <= 2 * ONE_LEVEL, f"{what}: max |Δ| {delta.max():.3g}"
    assert np.mean(delta > ONE_LEVEL) <= MAX_FRACTION_TWO_LEVELS, f"{what}: {np.sum(delta > ONE_LEVEL)} values differ by 2 levels"
    assert np.mean(delta > 1e-5) <= MAX_FRACTION, f"{what}: {np.mean(delta > 1e-5):.2%} differ"


def _assert_float_close(ours, ref, what):
    delta = np.abs(np.asarray(ours) - ref)
    print(f"\n{what}: max |Δ| {delta.max():.2g}", end="")
    assert delta.max() <= FLOAT_TOL, f"{what}: max |Δ| {delta.max():.3g}"


@pytest.fixture(scope="module")
def shipped_photos():
    return {os.path.basename(p): np.asarray(image) for p, image in
            zip(photos.photo_paths(), photos.photo_images().images)}


def _odd_sizes():
    rng = np.random.RandomState(0)
    chelsea = np.asarray(load_image(os.path.join(photos.PHOTOS_DIR, "chelsea.jpg")))
    return {"225x1001": np.tile(chelsea, (1, 3, 1))[:225, :1001], "1001x225": np.tile(chelsea, (4, 1, 1))[:1001, :225],
            "301x451": np.pad(chelsea, ((0, 1), (0, 0), (0, 0)), mode="edge")[:301, :451],
            "17x9 upscaled": chelsea[::18, ::50][:17, :9], "224x224": chelsea[:224, :224],
            "noise 97x131": rng.randint(0, 256, (97, 131, 3)).astype(np.uint8)}


def test_shipped_photos_and_odd_sizes_match_the_processor(shipped_photos):
    processor = BitImageProcessor()
    layer = tfbit.BitPreprocessing(processor)
    for name, image in {**shipped_photos, **_odd_sizes()}.items():
        image = image[..., None] if image.ndim == 2 else image
        _assert_within_one_level(layer(image[None]), processor(image), f"{name} uint8", processor)
        floats = image.astype(np.float32)  # resized without rounding or clamping, like the processor
        _assert_float_close(layer(floats[None]), processor(floats), f"{name} float32 0-255")


@pytest.mark.parametrize("config", [dict(backend="pil"), dict(size=448, crop_size=448, resample=3),
                                    dict(size={"height": 96, "width": 128}, do_center_crop=False),
                                    dict(crop_size=320)])  # larger than the resized image: padded
def test_other_configurations(config, shipped_photos):
    processor = BitImageProcessor.original_bit(**config) if "resample" in config else BitImageProcessor(**config)
    layer = tfbit.BitPreprocessing(processor)
    for name in ("astronaut_shuttle.png", "camera.png", "grace_hopper.jpg"):
        image = shipped_photos[name]
        image = image[..., None] if image.ndim == 2 else image
        _assert_within_one_level(layer(image[None]), processor(image), f"{name} {config}", processor)


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
    script = ("import keras, numpy as np, tfbit, sys\n"
              "model = keras.saving.load_model(sys.argv[1])\n"
              "layer = next(l for l in model.layers if isinstance(l, tfbit.BitPreprocessing))\n"
              "np.save(sys.argv[2], np.asarray(model(np.load(sys.argv[3]))))\n"
              "print(layer.processor.backend, layer.processor.crop_size['height'])\n")
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "m.keras"), str(tmp_path / "out.npy"),
                           str(tmp_path / "image.npy")], capture_output=True, text=True, cwd=ROOT, timeout=300,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["pil", "56"]
    # Another process may pick other convolution kernels (the oneDNN switch and thread count
    # come from the environment it inherits, which earlier tests' CLIs set): float32 rounding
    # differences only (1.2e-7 seen in a full-suite run).
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), expected, rtol=0,
                               atol=1e-6 * max(1.0, float(np.abs(expected).max())))


def test_config_is_complete():
    processor = BitImageProcessor(size=300, crop_size={"height": 256, "width": 192}, image_mean=0.5, image_std=0.25,
                                  do_convert_rgb=False, backend="pil")
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
    dataset = tf.data.Dataset.from_generator(lambda: iter(images),
                                             output_signature=tf.TensorSpec([None, None, 3], tf.uint8))
    batch, = dataset.map(layer).batch(3).as_numpy_iterator()
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
    _assert_within_one_level(out, BitImageProcessor()(shipped_photos["camera.png"]), "mixed policy", layer.processor)


def test_errors_name_the_problem(tmp_path):
    layer = tfbit.BitPreprocessing()
    with pytest.raises(ValueError, match=r"expected \(H, W, C\) or \(N, H, W, C\) images with C in 1, 3, 4; "
                                         r"got shape \(1, 32, 32, 2\)"):
        layer(np.zeros((1, 32, 32, 2), np.uint8))
    with pytest.raises(ValueError, match="backend must be one of"):
        tfbit.BitPreprocessing(backend="opencv")
    with pytest.raises(FileNotFoundError, match="no preprocessor_config.json at"):
        tfbit.BitPreprocessing.from_pretrained(tmp_path)


def test_readme_example_runs_as_written(tmp_path, shipped_photos, monkeypatch):
    import re
    blocks = re.findall(r"```python\n(.*?)```", open(os.path.join(ROOT, "README.md"), encoding="utf-8").read(), re.S)
    block, = [b for b in blocks if "BitPreprocessing.from_pretrained" in b]
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
    _assert_within_one_level(pixels, processor(image[0]), "rocket.jpg at 32 px", processor)
    np.testing.assert_allclose(namespace["model"](image), model(pixels), atol=1e-5)
