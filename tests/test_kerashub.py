"""tfbit models as KerasHub presets (tfbit.kerashub, docs/kerashub.md): a preset written from a
small random classifier loads with keras_hub's own `from_preset` in a fresh process and computes
tfbit's outputs (within 1e-5, bit for bit in practice) on the shipped photos, preprocessing
included; `upload_preset`'s checks pass; KerasHub's task API predicts and fits; the converter's
`--formats keras_hub` writes and verifies one. docs/kerashub.md's blocks run here."""

import json
import os
import re
import shutil
import subprocess
import sys
from typing import NamedTuple

import keras
import numpy as np
import pytest
from conftest import SMALL, random_images
from test_save_pretrained import randomized

import tfbit
from conversion import convert
from conversion.images import photo_paths, spread
from tfbit.models.bit import copy_weights
from tfbit.preprocessing.decode import load_image

keras_hub = pytest.importorskip("keras_hub")
from tfbit import kerashub  # noqa: E402  (needs keras_hub)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(ROOT, "docs", "kerashub.md")
LABELS = ["cat", "dog", "eel", "fox", "gnu", "hen", "owl"]
# shortest edge 36, then the 32 px centre: the resize and the crop differ
PROCESSOR = tfbit.BitImageProcessor(size={"shortest_edge": 36}, crop_size={"height": 32, "width": 32})
PHOTOS = spread(photo_paths(), 8)
SAME_SIZE = ["china.jpg", "flower.jpg", "rocket.jpg"]  # 512x342: one uint8 batch
TOLERANCE = 1e-5


def docs_block(marker, language="python"):
    blocks = re.findall(rf"```{language}\n(.*?)```", open(DOCS, encoding="utf-8").read(), re.S)
    (block,) = [b for b in blocks if marker in b]
    return block


def pixels(path):
    return np.asarray(load_image(path))


def max_delta(a, b):
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


class World(NamedTuple):
    root: object  # the user's folder (pathlib.Path)
    preset: object  # root / "bit-50-keras-hub"
    model: object  # the tfbit classifier the preset was written from


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A user's folder: `google/bit-50` a small random classifier (named labels, 36 -> 32 px
    preprocessing), the preset docs/kerashub.md's save block writes from it, photos."""
    root = tmp_path_factory.mktemp("kerashub")
    config = tfbit.BitConfig(**{**SMALL, "id2label": dict(enumerate(LABELS))})
    randomized(tfbit.BitForImageClassification(config)).save_pretrained(root / "google" / "bit-50", PROCESSOR)
    for name, photo in [
        ("photo.jpg", "chelsea.jpg"),
        ("cat.jpg", "chelsea_eyes.jpg"),
        ("dog.png", "flower_dahlia.png"),
    ]:
        shutil.copy(os.path.join(ROOT, "conversion", "photos", photo), root / name)
    namespace, cwd = {}, os.getcwd()
    os.chdir(root)
    try:
        exec(docs_block("tfbit.kerashub.save_to_preset(model"), namespace)
    finally:
        os.chdir(cwd)
    return World(root, root / "bit-50-keras-hub", namespace["model"])


def body_of(model):
    body = tfbit.BitModel(model.config)
    copy_weights(model, body)
    return body


def test_classifier_and_backbone_compute_tfbits_outputs(world):
    task = keras_hub.models.ImageClassifier.from_preset(str(world.preset))
    backbone = keras_hub.models.Backbone.from_preset(str(world.preset))
    assert type(task) is kerashub.TfbitImageClassifier and type(backbone) is kerashub.TfbitBackbone
    x = random_images(3, 40, 48)
    assert max_delta(task(x), world.model(x)) <= TOLERANCE
    assert max_delta(backbone(x), body_of(world.model)(x)["last_hidden_state"]) <= TOLERANCE
    assert task.output_dense.compute_dtype == "float32" and backbone.bit_config.id2label[1] == "dog"


def test_converter_is_bit_preprocessing_exactly(world):
    images = np.random.RandomState(0).randint(0, 256, (2, 50, 41, 3)).astype(np.uint8)
    for backend in ("torchvision", "pil"):
        converter = kerashub.TfbitImageConverter(PROCESSOR, backend=backend)
        layer = tfbit.BitPreprocessing(PROCESSOR, backend=backend)
        np.testing.assert_array_equal(converter(images), layer(images), err_msg=backend)
        np.testing.assert_array_equal(converter(images[0]), layer(images[0]), err_msg=backend)
    sizes = [pixels(PHOTOS[0]), pixels(PHOTOS[1])[:300, :200]]  # a list of different sizes
    np.testing.assert_array_equal(converter(sizes), np.concatenate([layer(x[None]) for x in sizes]))
    assert converter.image_size == (32, 32)
    with pytest.raises(tfbit.ConfigError, match=r"crop size \(32, 32\), not \(64, 64\)"):
        converter.image_size = (64, 64)
    with pytest.raises(tfbit.ConfigError, match="build it from BitImageProcessor"):
        kerashub.TfbitImageConverter(PROCESSOR, image_size=(64, 64))
    loaded = keras_hub.models.ImageClassifier.from_preset(str(world.preset)).preprocessor.image_converter
    assert loaded.processor == PROCESSOR


def test_preset_layout_and_registered_names(world):
    assert sorted(os.listdir(world.preset)) == sorted(kerashub.preset_files(world.model))
    assert set(kerashub.preset_files(world.model)) == set(kerashub.BACKBONE_FILES + kerashub.TASK_FILES)
    configs = ("config.json", "task.json", "preprocessor.json", "image_converter.json")
    assert [json.loads((world.preset / f).read_text())["registered_name"] for f in configs] == [
        "tfbit>TfbitBackbone",
        "tfbit>TfbitImageClassifier",
        "tfbit>TfbitImageClassifierPreprocessor",
        "tfbit>TfbitImageConverter",
    ]
    assert json.loads((world.preset / "metadata.json").read_text())["tasks"] == ["ImageClassifier"]
    converter = json.loads((world.preset / "image_converter.json").read_text())["config"]
    assert converter["processor"]["crop_size"] == {"height": 32, "width": 32} and "scale" not in converter
    assert json.loads((world.preset / "task.json").read_text())["config"]["head_dtype"] == "float32"


# In a fresh interpreter: `import tfbit` leaves keras_hub out; from_preset without tfbit.kerashub
# fails with keras_hub's message; docs/kerashub.md's loading block (stdin); then the preset
# through keras_hub's base classes on the photos, back as one .npz.
FRESH = """
import json, sys
import numpy as np
import tfbit
assert "keras_hub" not in sys.modules, "import tfbit imported keras_hub"
import keras_hub
args = json.loads(sys.argv[1])
try:
    keras_hub.models.Backbone.from_preset(args["preset"])
    error = ""
except ValueError as e:
    error = str(e)
docs = {}
exec(sys.stdin.read(), docs)
data = np.load(args["inputs"])
photos = [data[f"photo{i}"] for i in range(args["photos"])]
task = keras_hub.models.ImageClassifier.from_preset(args["preset"])
backbone = keras_hub.models.Backbone.from_preset(args["preset"])
out = {
    "error": error,
    "classes": [type(task).__name__, type(backbone).__name__, type(task.preprocessor.image_converter).__name__],
    "logits": task(task.preprocessor(photos)),
    "predict": task.predict(data["batch"], verbose=0),
    "features": backbone(data["pixel_values"]),
    "docs": docs["logits"],
}
np.savez(args["out"], **{k: np.asarray(v) for k, v in out.items()})
"""


def test_fresh_process_loads_the_preset_with_keras_hub(world, tmp_path):
    photos = [pixels(p) for p in PHOTOS]
    batch = np.stack([pixels(os.path.join(ROOT, "conversion", "photos", name)) for name in SAME_SIZE])
    x = random_images(2, 32, 32)
    np.savez(tmp_path / "in.npz", batch=batch, pixel_values=x, **{f"photo{i}": p for i, p in enumerate(photos)})
    args = {
        "preset": str(world.preset),
        "inputs": str(tmp_path / "in.npz"),
        "photos": len(photos),
        "out": str(tmp_path / "out.npz"),
    }
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    done = subprocess.run(
        [sys.executable, "-c", FRESH, json.dumps(args)],
        cwd=world.root,
        env=env,
        input=docs_block("classifier.preprocessor(images)"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = np.load(tmp_path / "out.npz")
    assert "no class registered with Keras for tfbit>TfbitBackbone" in str(out["error"])
    docs = open(DOCS, encoding="utf-8").read()
    assert "Attempting to load class tfbit>TfbitBackbone" in docs and "import tfbit.kerashub" in docs
    assert list(out["classes"]) == ["TfbitImageClassifier", "TfbitBackbone", "TfbitImageConverter"]
    reference = world.model(PROCESSOR(photos)).numpy()
    assert max_delta(out["logits"], reference) <= TOLERANCE
    assert (out["logits"].argmax(-1) == reference.argmax(-1)).all()
    assert max_delta(out["predict"], world.model(PROCESSOR(list(batch)))) <= TOLERANCE
    assert max_delta(out["features"], body_of(world.model)(x)["last_hidden_state"]) <= TOLERANCE
    docs_photos = [pixels(world.root / "cat.jpg"), pixels(world.root / "dog.png")]
    assert max_delta(out["docs"], world.model(PROCESSOR(docs_photos))) <= TOLERANCE


def test_a_new_head_keeps_the_body(world):
    task = keras_hub.models.ImageClassifier.from_preset(str(world.preset), num_classes=3)
    x = random_images(2, 32, 32)
    assert task(x).shape == (2, 3)
    assert max_delta(task.backbone(x), body_of(world.model)(x)["last_hidden_state"]) <= TOLERANCE


def test_backbone_presets(world, tmp_path):
    """A BitModel's preset has no task files (a classifier's, saved over, loses them); a
    BitBackbone's ends at its last map, before the final norm; both take a new head."""
    body = body_of(world.model)
    folder = shutil.copytree(world.preset, tmp_path / "preset")
    kerashub.save_to_preset(body, folder, PROCESSOR)
    assert sorted(os.listdir(folder)) == sorted(kerashub.BACKBONE_FILES)
    x = random_images(2, 32, 32)
    backbone = keras_hub.models.Backbone.from_preset(str(folder))
    assert max_delta(backbone(x), body(x)["last_hidden_state"]) <= TOLERANCE
    task = keras_hub.models.ImageClassifier.from_preset(str(folder), num_classes=4)
    assert task(task.preprocessor(np.zeros((2, 40, 40, 3), np.uint8))).shape == (2, 4)
    stages = tfbit.BitBackbone(tfbit.BitConfig(**{**SMALL, "out_features": ["stage2", "stage4"]}))
    copy_weights(world.model, stages)
    kerashub.save_to_preset(
        stages, tmp_path / "stages", world.root / "google" / "bit-50"
    )  # its preprocessor_config.json
    loaded = keras_hub.models.Backbone.from_preset(str(tmp_path / "stages"))
    assert max_delta(loaded(x), stages(x)["stage4"]) <= TOLERANCE
    converter = keras_hub.layers.ImageConverter.from_preset(str(tmp_path / "stages"))
    assert type(converter) is kerashub.TfbitImageConverter and converter.processor == PROCESSOR


def test_upload_preset_validates_the_folder(world, tmp_path):
    """`upload_preset` checks the folder, then dispatches on the URI: an unknown scheme fails
    only after the checks passed, without any network."""
    folder = shutil.copytree(world.preset, tmp_path / "preset")
    with pytest.raises(ValueError, match="Unknown URI"):
        keras_hub.upload_preset("local://validate", str(folder))
    (folder / "model.weights.h5").unlink()
    with pytest.raises(FileNotFoundError, match="weights file is missing"):
        keras_hub.upload_preset("local://validate", str(folder))
    folder = shutil.copytree(world.preset, tmp_path / "broken")
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="invalid json"):
        keras_hub.upload_preset("local://validate", str(folder))


def test_docs_fine_tuning_block_fits(world, monkeypatch):
    """Two steps of KerasHub's fit (a new head), as docs/kerashub.md shows it; what it saves
    loads back and computes the trained model's logits."""
    for i, path in enumerate(PHOTOS):
        os.makedirs(world.root / "flowers" / "train" / "ab"[i % 2], exist_ok=True)
        shutil.copy(path, world.root / "flowers" / "train" / "ab"[i % 2])
    monkeypatch.chdir(world.root)
    namespace = {}
    exec(docs_block("classifier.fit(train"), namespace)
    classifier = namespace["classifier"]
    assert classifier.optimizer.iterations.numpy() == 2
    assert np.isfinite(classifier.history.history["loss"]).all()
    before = keras_hub.models.Backbone.from_preset(str(world.preset)).get_layer("stem_conv").get_weights()[0]
    assert max_delta(classifier.backbone.get_layer("stem_conv").get_weights()[0], before) > 0
    reloaded = keras_hub.models.ImageClassifier.from_preset(str(world.root / "flowers-keras-hub"))
    x = random_images(2, 32, 32)
    assert max_delta(reloaded(x), classifier(x)) <= TOLERANCE


def test_save_to_preset_refuses_what_no_preset_holds(world, tmp_path):
    truncated = tfbit.BitBackbone(tfbit.BitConfig(**{**SMALL, "out_features": ["stage2"]}))
    with pytest.raises(tfbit.ModelError, match=r"returns \['stage2'\], which stop before stage4: .* out_features"):
        kerashub.save_to_preset(truncated, tmp_path / "truncated")
    wrapper = keras.Sequential([keras.Input((32, 32, 3)), world.model])
    with pytest.raises(tfbit.ModelError, match="from a tfbit BitModel, .* got a Sequential"):
        kerashub.save_to_preset(wrapper, tmp_path / "wrapper")
    assert not os.listdir(tmp_path)


def test_convert_cli_writes_a_verified_preset(world):
    """docs/kerashub.md's command, as typed (4 verification photos instead of 32), in a fresh
    process: the preset is verified against the PyTorch source and published in keras_hub/."""
    command = docs_block("--formats keras_hub", "bash").replace("pip install 'tfbit[keras-hub]'\n", "")
    env = {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]}
    done = subprocess.run(
        ["bash", "-e", "-c", command.replace("--formats keras_hub", "--formats keras_hub --num-images 4")],
        cwd=world.root,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    output = world.root / "saved_models" / "bit-50"
    report = json.loads((output / "report.json").read_text())
    (row,) = report["artifacts"]
    assert row["artifact"] == "keras_hub" and row["passed"] and row["published"] and row["criterion"] == "parity"
    assert report["reference"] == "pytorch" and row["top1_agreement"] == 1.0
    assert sorted(os.listdir(output / "keras_hub")) == sorted(kerashub.preset_files(world.model))
    with pytest.raises(ValueError, match="Unknown URI"):
        keras_hub.upload_preset("local://validate", str(output / "keras_hub"))
    x = random_images(2, 32, 32)
    assert (
        max_delta(keras_hub.models.ImageClassifier.from_preset(str(output / "keras_hub"))(x), world.model(x))
        <= TOLERANCE
    )


def test_convert_refuses_keras_hub_up_front(world, tmp_path, capsys):
    checkpoint = str(world.root / "google" / "bit-50")
    args = [checkpoint, "--output", str(tmp_path / "o"), "--formats", "keras_hub"]
    assert convert.main([*args, "--task", "backbone", "--out-features", "stage2", "stage4"]) == 2
    captured = capsys.readouterr()
    assert "a KerasHub backbone returns one feature map, the last stage's" in captured.err
    assert "[2/5]" not in captured.out
    # without keras_hub installed: tests/test_plain_install.py
