"""Mobile-ready TFLite: `convert --tflite-input uint8` files take raw RGB crops and normalize
inside, every classification file carries labels and normalization as TFLite metadata, and a
file refuses the input dtype it does not take."""

import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import SMALL

from conversion import convert, runners, tflite_metadata
from conversion.digits import load_digits_split
from tfbit.preprocessing.processor import BitImageProcessor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MOBILE_PAGE = os.path.join(ROOT, "docs", "mobile.md")
QUANTIZATIONS = ("fp32", "fp16", "dynamic_int8", "int8")
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}


@pytest.fixture(scope="module")
def uint8_export(tmp_path_factory):
    """The digits demo with raw uint8 input, through the CLI as typed."""
    output = tmp_path_factory.mktemp("uint8") / "digits"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "conversion.convert",
            "--output",
            str(output),
            "--formats",
            "tflite",
            "--tflite-input",
            "uint8",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=ENV,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return output, done.stdout


@pytest.fixture(scope="module")
def float_export(tmp_path_factory):
    output = tmp_path_factory.mktemp("float") / "digits"
    convert.convert(output=str(output), formats=("tflite",), quantizations=("fp32",), log=lambda m: None)
    return output


def _interpreter(path):
    from ai_edge_litert.interpreter import Interpreter

    return Interpreter(model_path=str(path))


def test_every_quantization_verifies_on_raw_crops(uint8_export):
    output, stdout = uint8_export
    report = json.loads((output / "report.json").read_text())
    rows = {row["artifact"]: row for row in report["artifacts"]}
    assert list(rows) == [f"tflite_{q}[uint8]" for q in QUANTIZATIONS] and report["passed"]
    assert rows["tflite_fp32[uint8]"]["criterion"] == "parity"  # in-graph normalization is exact
    for q in QUANTIZATIONS:
        row = rows[f"tflite_{q}[uint8]"]
        assert row["path"] == f"tflite/digits_{q}_uint8.tflite" and row["published"]
        assert abs(row["accuracy"] - report["transformers_accuracy"]) <= 0.005, q
        assert (output / row["path"]).is_file()
    assert "tflite_int8[uint8]" in stdout and "(raw uint8 input)" in stdout
    assert not (output / "tflite" / "digits_fp32.tflite").exists()


def test_signature_is_raw_uint8_rgb_at_batch_one(uint8_export):
    output, _ = uint8_export
    for q in QUANTIZATIONS:
        interpreter = _interpreter(output / "tflite" / f"digits_{q}_uint8.tflite")
        assert interpreter.get_signature_list() == {"serving_default": {"inputs": ["image"], "outputs": ["logits"]}}
        runner = interpreter.get_signature_runner("serving_default")
        detail = runner.get_input_details()["image"]
        assert detail["dtype"] == np.uint8 and list(detail["shape"]) == [1, 32, 32, 3], q
        if q == "int8":  # the quantized input is the pixel itself: scale 1, zero point 0
            assert detail["quantization"] == (1.0, 0)
            from conversion import tflite_graph  # all-integer: no uint8 -> float cast at the input

            assert tflite_graph.float_ops((output / "tflite" / "digits_int8_uint8.tflite").read_bytes()) == []
        assert runner(image=np.zeros((1, 32, 32, 3), np.uint8))["logits"].shape == (1, 10)


def test_fp32_uint8_file_equals_the_keras_model_on_processed_images(uint8_export):
    """Independent of the verifier: raw crops into the file against the Keras model on the
    processor's normalized images, within the parity contract."""
    import tfbit

    output, _ = uint8_export
    model = tfbit.BitForImageClassification.from_pretrained(convert.DEFAULT_CHECKPOINT)
    processor = BitImageProcessor.from_pretrained(output)
    _, _, images, _ = load_digits_split()
    images = images[:8]
    run = runners.tflite_runner(str(output / "tflite" / "digits_fp32_uint8.tflite"))
    logits = run(runners.raw_crops(processor, list(images)))["logits"]
    reference = np.asarray(model(processor(list(images))))
    assert np.abs(logits - reference).max() <= 1e-4 * max(1.0, np.abs(reference).max())


def test_metadata_carries_labels_and_normalization(uint8_export, float_export):
    output, _ = uint8_export
    labels = [str(i) for i in range(10)]
    files = [output / "tflite" / f"digits_{q}_uint8.tflite" for q in QUANTIZATIONS]
    for path in files + [float_export / "tflite" / "digits_fp32.tflite"]:
        metadata = tflite_metadata.read_classifier_metadata(path)
        assert metadata["labels"] == labels, path.name
        assert metadata["label_files"] == {"labels.txt": 2}  # TENSOR_AXIS_LABELS on the output
        np.testing.assert_allclose(metadata["mean"], [127.5] * 3)  # digits: mean = std = 0.5, on 0-255
        np.testing.assert_allclose(metadata["std"], [127.5] * 3)
        assert (metadata["input"], metadata["output"], metadata["image_size"]) == ("image", "logits", (32, 32))
        assert metadata["name"] == "digits" and metadata["min_parser_version"] == "1.0.0"


def test_pixel_normalization_of_processors():
    mean, std = tflite_metadata.pixel_normalization(BitImageProcessor())
    np.testing.assert_allclose(mean, [122.7709383, 116.7460125, 104.09373615])
    np.testing.assert_allclose(std, [68.5005327, 66.6321579, 70.32316305])
    assert tflite_metadata.pixel_normalization(BitImageProcessor(do_normalize=False)) == ([0.0] * 3, [255.0] * 3)
    assert tflite_metadata.pixel_normalization(BitImageProcessor(do_rescale=False, image_mean=0.5, image_std=2)) == (
        [0.5] * 3,
        [2.0] * 3,
    )


def test_metadata_writer_errors(float_export):
    flatbuffer = (float_export / "tflite" / "digits_fp32.tflite").read_bytes()
    with pytest.raises(ValueError, match="the model has 10 outputs but 2 labels were given"):
        tflite_metadata.add_classifier_metadata(flatbuffer, ["a", "b"], [0] * 3, [1] * 3, "m", "d")
    with pytest.raises(ValueError, match="a label contains a line break"):
        tflite_metadata.add_classifier_metadata(flatbuffer, ["a\nb"] + list("123456789"), [0] * 3, [1] * 3, "m", "d")


def test_each_file_refuses_the_other_input_dtype(uint8_export, float_export):
    output, _ = uint8_export
    float_file = float_export / "tflite" / "digits_fp32.tflite"
    raw = np.zeros((1, 32, 32, 3), np.uint8)
    with pytest.raises(
        ValueError,
        match=re.escape(
            f"{float_file} takes float32 input, got uint8: preprocess the images (BitImageProcessor) first, "
            "raw pixels give wrong answers; or use a file converted with --tflite-input uint8, which "
            "takes raw uint8 pixels"
        ),
    ):
        runners.tflite_runner(str(float_file))(raw)
    uint8_file = output / "tflite" / "digits_int8_uint8.tflite"
    with pytest.raises(
        ValueError,
        match=re.escape(
            f"{uint8_file} takes raw uint8 RGB pixels (images resized and center-cropped to 32x32, not "
            "normalized: the file normalizes them), got float32: conversion.runners.raw_crops(processor, "
            "images) gives them"
        ),
    ):
        runners.tflite_runner(str(uint8_file))(raw.astype(np.float32))


def test_predict_cli_on_a_uint8_file(uint8_export, tmp_path):
    from PIL import Image

    output, _ = uint8_export
    _, _, images, labels = load_digits_split()
    for i in range(1, 4):  # held-out digits the model classifies correctly (image 0 it does not)
        Image.fromarray(images[i]).save(tmp_path / f"{i}.png")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "conversion.predict",
            str(output / "tflite" / "digits_int8_uint8.tflite"),
            str(tmp_path),
            "--top-k",
            "1",
            "--json",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=ENV,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    predicted = {
        os.path.basename(r["image"]): r["top"][0]["label"] for r in json.loads(done.stdout[done.stdout.index("[") :])
    }
    assert predicted == {f"{i}.png": str(labels[i]) for i in range(1, 4)}


def test_unknown_tflite_input_is_refused(tmp_path):
    with pytest.raises(
        convert.ConversionError, match=r"unknown TFLite input 'int4': choose from \('float32', 'uint8'\)"
    ):
        convert.convert(output=str(tmp_path / "out"), tflite_input="int4", log=lambda m: None)
    done = subprocess.run(
        [sys.executable, "-m", "conversion.convert", "--tflite-input", "int4"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=ENV,
        timeout=300,
    )
    assert done.returncode == 2 and "argument --tflite-input: invalid choice: 'int4'" in done.stderr


def test_features_export_with_uint8_input_has_no_classifier_metadata(hf_checkpoint, tmp_path):
    source, _ = hf_checkpoint(**SMALL)
    report = convert.convert(
        str(source),
        output=str(tmp_path / "out"),
        formats=("tflite",),
        task="features",
        quantizations=("fp32",),
        num_images=4,
        tflite_input="uint8",
        log=lambda m: None,
    )
    assert report["passed"] and [r["artifact"] for r in report["artifacts"]] == ["tflite_fp32[uint8]"]
    assert tflite_metadata.read_classifier_metadata(str(tmp_path / "out/tflite/hf_fp32_uint8.tflite")) is None


def _readme_block(marker):
    blocks = re.findall(r"```python\n(.*?)```", open(MOBILE_PAGE, encoding="utf-8").read(), re.S)
    found = [b for b in blocks if marker in b]
    assert len(found) == 1, f"docs/mobile.md has {len(found)} python blocks with {marker!r}"
    return found[0]


def _photos(folder, digit):
    """The shipped photos, a digit, and the cases a phone's gallery holds: an EXIF-rotated photo,
    a transparent PNG and a grayscale one."""
    from PIL import Image

    os.makedirs(folder)
    names = []
    for name in sorted(os.listdir(os.path.join(ROOT, "conversion", "photos"))):
        if name.endswith((".jpg", ".png")):
            shutil.copy(os.path.join(ROOT, "conversion", "photos", name), folder)
            names.append(name)
    Image.fromarray(digit).resize((48, 40), Image.BICUBIC).save(os.path.join(folder, "digit.png"))
    rocket = Image.open(os.path.join(folder, "rocket.jpg"))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: viewers (and tfbit) turn it 90 degrees clockwise
    rocket.transpose(Image.Transpose.ROTATE_90).save(os.path.join(folder, "rotated.jpg"), exif=exif)
    coffee = Image.open(os.path.join(folder, "coffee.jpg")).convert("RGBA")
    coffee.putalpha(Image.linear_gradient("L").resize(coffee.size))
    coffee.save(os.path.join(folder, "transparent.png"))
    Image.open(os.path.join(folder, "chelsea.jpg")).convert("L").save(os.path.join(folder, "gray.png"))
    return names + ["digit.png", "rotated.jpg", "transparent.png", "gray.png"]


def _top_labels(stdout):
    """{image as given: top label} of `conversion.predict --top-k 1`'s output."""
    lines = stdout.splitlines()
    return {path: row.split()[-1] for path, row in zip(lines[::2], lines[1::2])}


def test_readme_litert_snippet_is_the_processor(uint8_export, tmp_path):
    """docs/mobile.md's example (LiteRT, a raw image file, no tfbit code) run as written, one
    image at a time, answers as `predict` on the same file: it resizes (the long edge truncated),
    crops, turns by EXIF and drops transparency exactly as tfbit's processor does."""
    output, _ = uint8_export
    snippet = _readme_block("digits_int8_uint8.tflite")
    assert "tfbit" not in snippet and "conversion" not in snippet and snippet.count('"photo.jpg"') == 1
    shutil.copytree(output, tmp_path / "saved_models" / "digits")
    _, _, images, _ = load_digits_split()
    names = _photos(tmp_path / "photos", images[5])
    (tmp_path / "snippet.py").write_text(snippet)
    each = "import sys\nfor name in sys.argv[2:]:\n    exec(open(sys.argv[1]).read().replace('photo.jpg', name), {})\n"
    paths = [f"photos/{name}" for name in names]
    run = dict(capture_output=True, text=True, cwd=tmp_path, env=ENV, timeout=600)
    done = subprocess.run([sys.executable, "-c", each, "snippet.py", *paths], **run)
    assert done.returncode == 0, done.stderr[-3000:]
    answers = done.stdout.split()
    model = "saved_models/digits/tflite/digits_int8_uint8.tflite"
    predicted = subprocess.run([sys.executable, "-m", "conversion.predict", model, *paths, "--top-k", "1"], **run)
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    assert len(answers) == len(paths) == 36
    assert dict(zip(paths, answers)) == _top_labels(predicted.stdout)
