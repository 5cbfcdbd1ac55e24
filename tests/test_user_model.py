"""A model the user wrote, built on tfbit, leaves Python like tfbit's own: converted, verified
against the user's Keras model, served and predicted, through the command lines in fresh
processes (as a user types them), on the shipped photos."""

import base64
import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import SMALL

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PHOTOS = sorted(glob.glob(os.path.join(ROOT, "conversion", "photos", "*.jpg")))
LABELS = ["chat", "café, noir", "chien", "voiture"]  # accents and a comma survive every format

# keras.io's transfer-learning recipe with a tfbit body: frozen pretrained body, the user's
# Dropout + Dense head, fit, save. Run in its own process, as the user's script would be.
RECIPE = r"""
import sys
import numpy as np
import keras, tfbit

checkpoint, out = sys.argv[1], sys.argv[2]
keras.utils.set_random_seed(0)
base = tfbit.BitModel.from_pretrained(checkpoint)
base.trainable = False
inputs = keras.Input((224, 224, 3))
features = base(inputs, training=False)["pooler_output"]
outputs = keras.layers.Dense(4, name="head")(keras.layers.Dropout(0.2)(features))
model = keras.Model(inputs, outputs)
model.compile(keras.optimizers.Adam(1e-2), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
x = np.random.RandomState(0).uniform(-1, 1, (8, 224, 224, 3)).astype("float32")
model.fit(x, np.arange(8) % 4, epochs=1, batch_size=4, verbose=0)
model.save(f"{out}/mine.keras")
"""

# A Sequential model starting with BitPreprocessing: the model knows its own preprocessing
# and (through its tfbit classifier) its labels, so nothing needs to lie beside the file.
SEQUENTIAL = r"""
import sys
import keras, tfbit

config, out = sys.argv[1], sys.argv[2]
processor = tfbit.preprocessing.processor.BitImageProcessor(size={"shortest_edge": 160},
                                                    crop_size={"height": 128, "width": 128})
model = keras.Sequential([keras.Input((None, None, 3), dtype="uint8"), tfbit.BitPreprocessing(processor),
                          tfbit.BitForImageClassification(tfbit.BitConfig.from_pretrained(config))])
model.save(f"{out}/seq.keras")
"""


def _run(args, cwd=None, timeout=900):
    env = {**os.environ, "PYTHONPATH": ROOT}
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)  # the command lines' own default, as a user has it
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _ok(done):
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def recipe(tmp_path_factory, torch_module):
    """The user's mine.keras (frozen pretrained body + Dropout + Dense) and labels.txt, then
    `python -m conversion.convert mine.keras --labels labels.txt` with the default formats."""
    import transformers
    from conftest import perturb_

    root = tmp_path_factory.mktemp("user")
    torch_module.manual_seed(0)
    config = {k: v for k, v in SMALL.items() if k != "num_labels"}
    perturb_(transformers.BitModel(transformers.BitConfig(**config))).save_pretrained(root / "pretrained")
    _ok(_run(["-c", RECIPE, str(root / "pretrained"), str(root)]))
    (root / "labels.txt").write_text("\n".join(LABELS) + "\n", encoding="utf-8")
    (root / "preprocessor_config.json").write_text(
        json.dumps({"size": {"shortest_edge": 256}, "crop_size": {"height": 224, "width": 224}})
    )
    done = _ok(
        _run(
            [
                "-m",
                "conversion.convert",
                "mine.keras",
                "--labels",
                "labels.txt",
                "--output",
                "export",
                "--num-images",
                "12",
            ],
            cwd=root,
        )
    )
    return root, done


def test_users_functional_model_converts_to_every_format_verified_against_it(recipe):
    root, done = recipe
    report = json.loads((root / "export" / "report.json").read_text())
    assert report["passed"] and report["reference"] == "keras" and report["model"] == "Functional"
    rows = {row["artifact"]: row for row in report["artifacts"]}
    assert list(rows) == [
        "keras",
        "saved_model[pixel_values]",
        "saved_model[image_bytes]",
        "tflite_fp32",
        "tflite_fp16",
        "tflite_dynamic_int8",
        "tflite_int8",
    ]
    for name in ("keras", "saved_model[pixel_values]", "tflite_fp32"):  # lossless: the parity contract
        assert rows[name]["criterion"] == "parity" and rows[name]["max_abs_diff"] <= rows[name]["tolerance"]
    assert all(row["published"] for row in rows.values())
    for path in ("mine.keras", "serving/1/saved_model.pb", "tflite/mine_fp32.tflite", "tflite/mine_int8.tflite"):
        assert (root / "export" / path).exists(), path
    config = json.loads((root / "export" / "config.json").read_text())
    assert [config["id2label"][str(i)] for i in range(4)] == LABELS
    assert "your Functional built on tfbit, 4 labels" in done.stdout
    assert "reference: your Keras model" in done.stdout


def test_predict_on_the_export_and_on_the_keras_file_equals_the_users_model(recipe):
    import keras

    import tfbit
    from tfbit.preprocessing.decode import load_image

    root, _ = recipe
    photos = PHOTOS[:5]
    model = keras.saving.load_model(root / "mine.keras")
    processor = tfbit.preprocessing.processor.BitImageProcessor.from_pretrained(root)
    logits = model.predict(processor([load_image(p) for p in photos]), verbose=0)
    expected = np.exp(logits - logits.max(-1, keepdims=True))
    expected /= expected.sum(-1, keepdims=True)
    for artifact in ("mine.keras", "export", "export/tflite/mine_fp32.tflite"):
        done = _ok(
            _run(
                [
                    "-m",
                    "conversion.predict",
                    artifact,
                    *photos,
                    "--json",
                    "--top-k",
                    "4",
                    *(["--labels", "labels.txt"] if artifact == "mine.keras" else []),
                ],
                cwd=root,
            )
        )
        for row, probabilities in zip(json.loads(done.stdout), expected):
            got = {top["label"]: top["probability"] for top in row["top"]}
            want = {LABELS[i]: float(p) for i, p in enumerate(probabilities)}
            assert set(got) == set(want), artifact
            # the SavedModel decodes in its graph: the same top-1, probabilities near
            tolerance = 1e-4 if artifact != "export" else 2e-2
            assert max(abs(got[k] - want[k]) for k in want) <= tolerance, artifact
            assert row["top"][0]["label"] == LABELS[int(np.argmax(probabilities))], artifact
    # without --labels, the .keras file names its own classes (its tfbit body has none for them)
    done = _ok(_run(["-m", "conversion.predict", "mine.keras", photos[0], "--json"], cwd=root))
    assert {top["label"] for top in json.loads(done.stdout)[0]["top"]} == {f"LABEL_{i}" for i in range(4)}


def test_saved_model_image_bytes_signature_gives_the_same_top1(recipe):
    import keras
    import tensorflow as tf

    import tfbit
    from tfbit.preprocessing.decode import load_image

    root, _ = recipe
    model = keras.saving.load_model(root / "mine.keras")
    processor = tfbit.preprocessing.processor.BitImageProcessor.from_pretrained(root)
    serve = tf.saved_model.load(str(root / "export" / "serving" / "1")).signatures["serving_default"]
    blobs = [open(p, "rb").read() for p in PHOTOS[:8]]
    out = serve(image_bytes=tf.constant(blobs))
    expected = model.predict(processor([load_image(p) for p in PHOTOS[:8]]), verbose=0).argmax(-1)
    np.testing.assert_array_equal(out["classes"].numpy()[:, 0], expected)
    assert [s.decode() for s in out["labels"].numpy()[:, 0]] == [LABELS[i] for i in expected]
    # what TF Serving's REST API would receive: {"b64": ...} decodes to the same bytes
    assert base64.b64decode(base64.b64encode(blobs[0])) == blobs[0]


def test_uint8_tflite_of_the_users_model_carries_its_labels(recipe):
    from conversion import tflite_metadata

    root, _ = recipe
    _ok(
        _run(
            [
                "-m",
                "conversion.convert",
                "mine.keras",
                "--labels",
                "labels.txt",
                "--output",
                "mobile",
                "--formats",
                "tflite",
                "--tflite",
                "fp32",
                "--tflite-input",
                "uint8",
                "--num-images",
                "8",
            ],
            cwd=root,
        )
    )
    for path in ("mobile/tflite/mine_fp32_uint8.tflite",):
        metadata = tflite_metadata.read_classifier_metadata(str(root / path))
        assert metadata["labels"] == LABELS and metadata["image_size"] == (224, 224), path


def test_sequential_model_with_its_own_preprocessing_converts_and_predicts(tmp_path, hf_checkpoint):
    """BitPreprocessing first in the model: the exports take it as their preprocessing (no
    preprocessor_config.json anywhere), and the .keras file predicts with its own labels."""
    from PIL import Image

    checkpoint, _ = hf_checkpoint(**SMALL)
    _ok(_run(["-c", SEQUENTIAL, str(checkpoint), str(tmp_path)]))
    done = _ok(
        _run(
            [
                "-m",
                "conversion.convert",
                "seq.keras",
                "--output",
                "out",
                "--formats",
                "keras",
                "saved_model",
                "--num-images",
                "6",
            ],
            cwd=tmp_path,
        )
    )
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["passed"] and report["image_size"] == [128, 128]
    pre = json.loads((tmp_path / "out" / "preprocessor_config.json").read_text())
    assert pre["crop_size"] == {"height": 128, "width": 128} and pre["size"] == {"shortest_edge": 160}
    assert "warning" not in done.stdout
    photo = tmp_path / "photo.png"
    Image.open(PHOTOS[0]).save(photo)
    keras_top = json.loads(
        _ok(_run(["-m", "conversion.predict", "seq.keras", str(photo), "--json"], cwd=tmp_path)).stdout
    )[0]["top"]
    serving_top = json.loads(_ok(_run(["-m", "conversion.predict", "out", str(photo), "--json"], cwd=tmp_path)).stdout)[
        0
    ]["top"]
    assert keras_top[0]["label"] == serving_top[0]["label"] and keras_top[0]["label"].startswith("LABEL_")
    assert abs(keras_top[0]["probability"] - serving_top[0]["probability"]) < 1e-4  # PNG: same pixels


def _user_model(kind, config):
    import keras

    import tfbit

    inputs = keras.Input((64, 64, 3))
    if kind == "two_outputs":
        maps = tfbit.BitBackbone(tfbit.BitConfig(**{**config, "out_features": ["stage2", "stage4"]}))(inputs)
        pooled = keras.layers.GlobalAveragePooling2D(name="pooled")(maps["stage4"])
        return keras.Model(inputs, {"stage2": maps["stage2"], "pooled": pooled})
    if kind == "no_tfbit":
        return keras.Model(inputs, keras.layers.Dense(3)(keras.layers.GlobalAveragePooling2D()(inputs)))
    if kind == "preprocessing_inside":
        images = keras.Input((None, None, 3))
        pixels = tfbit.BitPreprocessing()(keras.layers.Rescaling(1.0)(images))
        return keras.Model(images, tfbit.BitModel(tfbit.BitConfig(**config))(pixels)["pooler_output"])
    layers_only = keras.layers.GlobalAveragePooling2D()(tfbit.WSConv2D(8, 3, padding="same")(inputs))
    return keras.Model(inputs, keras.layers.Dense(5, name="head")(layers_only))


@pytest.mark.parametrize(
    "kind, options, message",
    [
        (
            "two_outputs",
            {},
            r"has the outputs pooled \(None, 128\), stage2 \(None, 8, 8, 64\): task "
            r"'classification' needs one \(batch, classes\) output; task 'backbone' exports every output",
        ),
        ("two_outputs", {"task": "features"}, r"task 'features' needs one \(batch, features\) output"),
        (
            "no_tfbit",
            {},
            r"holds a Functional with no tfbit model or layer inside: tfbit converts BiT models and "
            r"Keras models built on them",
        ),
        (
            "preprocessing_inside",
            {},
            r"BitPreprocessing layer 'bit_preprocessing.*' of .* is not applied to the "
            r"model's input",
        ),
        ("layers_only", {"labels": "three.txt"}, r"3 labels given, but the model's output has 5 classes"),
        ("layers_only", {"labels": "empty.txt"}, r"--labels .*empty.txt: line 2 is empty \(one label per line\)"),
        (
            "two_outputs",
            {"out_features": ["stage2"]},
            r"--out-features chooses the stages of a backbone: add --task backbone",
        ),
    ],
)
def test_models_that_cannot_convert_say_why(tmp_path, kind, options, message):
    from conversion import convert

    config = {**SMALL, "num_labels": 0}
    _user_model(kind, config).save(tmp_path / "m.keras")
    (tmp_path / "three.txt").write_text("a\nb\nc\n")
    (tmp_path / "empty.txt").write_text("a\n\nc\n")
    options = {k: str(tmp_path / v) if k == "labels" else v for k, v in options.items()}
    with pytest.raises(convert.ConversionError, match=message):
        convert.convert(
            str(tmp_path / "m.keras"), output=str(tmp_path / "o"), preprocessor=None, log=lambda m: None, **options
        )
    assert not (tmp_path / "o").exists()


def test_users_two_output_model_exports_each_output_as_a_backbone(tmp_path):
    """--task backbone: every output under its own name, in every format; tfbit layers alone
    (no tfbit model inside) are enough."""
    from conversion import convert

    config = {**SMALL, "num_labels": 0}
    _user_model("two_outputs", config).save(tmp_path / "two.keras")
    _user_model("layers_only", config).save(tmp_path / "layers.keras")
    pre = {"size": {"height": 64, "width": 64}, "crop_size": {"height": 64, "width": 64}, "do_center_crop": False}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(pre))
    report = convert.convert(
        str(tmp_path / "two.keras"),
        output=str(tmp_path / "o"),
        task="backbone",
        quantizations=("fp32",),
        num_images=4,
        log=lambda m: None,
    )
    assert report["passed"], report
    import tensorflow as tf

    serve = tf.saved_model.load(str(tmp_path / "o" / "serving" / "1")).signatures["pixel_values"]
    assert sorted(serve.structured_outputs) == ["pooled", "stage2"]
    from ai_edge_litert.interpreter import Interpreter

    runner = Interpreter(model_path=str(tmp_path / "o" / "tflite" / "two_fp32.tflite")).get_signature_runner()
    assert sorted(runner.get_output_details()) == ["pooled", "stage2"]
    report = convert.convert(
        str(tmp_path / "layers.keras"),
        output=str(tmp_path / "l"),
        quantizations=("fp32",),
        num_images=4,
        log=lambda m: None,
    )
    assert report["passed"] and [a["artifact"] for a in report["artifacts"]][-1] == "tflite_fp32"


def test_mixed_precision_user_model_is_verified_against_its_float32_self(tmp_path):
    import keras

    import tfbit
    from conversion import convert

    keras.utils.set_random_seed(0)
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        inputs = keras.Input((64, 64, 3))
        features = tfbit.BitModel(tfbit.BitConfig(**{**SMALL, "num_labels": 0}))(inputs)["pooler_output"]
        model = keras.Model(inputs, keras.layers.Dense(3, dtype="float32")(features))
    finally:
        keras.config.set_dtype_policy(previous)
    model.save(tmp_path / "mixed.keras")
    (tmp_path / "preprocessor_config.json").write_text(
        json.dumps({"size": {"height": 64, "width": 64}, "do_center_crop": False})
    )
    report = convert.convert(
        str(tmp_path / "mixed.keras"),
        output=str(tmp_path / "o"),
        formats=("keras", "tflite"),
        quantizations=("fp32",),
        num_images=6,
        log=lambda m: None,
    )
    rows = {row["artifact"]: row for row in report["artifacts"]}
    assert rows["keras"]["criterion"] == "0.05 x spread"  # bfloat16 compute: held to the lossy bound
    assert rows["tflite_fp32"]["criterion"] == "parity" and rows["tflite_fp32"]["passed"]


def test_fixed_input_size_must_match_the_preprocessing(tmp_path):
    import keras

    import tfbit
    from conversion import convert

    inputs = keras.Input((224, 224, 3))
    model = keras.Model(
        inputs, keras.layers.Dense(2)(tfbit.BitModel(tfbit.BitConfig(**SMALL))(inputs)["pooler_output"])
    )
    model.save(tmp_path / "m.keras")
    (tmp_path / "preprocessor_config.json").write_text(
        json.dumps({"size": {"shortest_edge": 160}, "crop_size": {"height": 128, "width": 128}})
    )
    with pytest.raises(
        convert.ConversionError,
        match=r"m.keras takes 224x224 images, but its preprocessing gives "
        r"128x128: pass the preprocessor_config.json it was trained with",
    ):
        convert.convert(str(tmp_path / "m.keras"), output=str(tmp_path / "o"), log=lambda m: None)


def test_custom_layer_keras_cannot_load_is_named(tmp_path):
    """A layer class the converting process does not know: Keras' own message names it."""
    code = r"""
import sys, keras, tfbit
@keras.saving.register_keras_serializable(package="mine")
class Scale(keras.layers.Layer):
    def call(self, x):
        return 2 * x
inputs = keras.Input((64, 64, 3))
features = tfbit.BitModel(tfbit.BitConfig(embedding_size=16, hidden_sizes=[32, 64, 96, 128], depths=[1, 1, 1, 1],
                                          num_groups=8))(inputs)["pooler_output"]
keras.Model(inputs, Scale()(features)).save(sys.argv[1])
"""
    _ok(_run(["-c", code, str(tmp_path / "custom.keras")]))
    done = _run(["-m", "conversion.convert", "custom.keras", "--task", "features"], cwd=tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    first = done.stderr.strip().splitlines()[0]
    assert first == (
        "error: custom.keras uses the layer class Scale (registered as 'mine>Scale'), which this "
        "process does not know: convert it from Python after importing the module that defines it "
        "(conversion.convert.convert('custom.keras', ...))"
    ), first


def test_batch_predict_runs_on_the_users_export(recipe, tmp_path):
    root, _ = recipe
    done = _run(
        ["-m", "conversion.batch_predict", "export", *PHOTOS[:3], "--output", str(tmp_path / "preds")], cwd=root
    )
    assert done.returncode == 0, done.stderr[-3000:]
    records = [
        json.loads(line)
        for path in sorted(tmp_path.glob("preds-*-of-*.jsonl"))
        if "errors" not in path.name
        for line in path.read_text().splitlines()
    ]
    assert len(records) == 3 and all(set(r["labels"]) <= set(LABELS) for r in records)
