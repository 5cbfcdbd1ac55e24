"""Mobile-ready TFLite: `convert --tflite-input uint8` files take raw RGB crops and normalize
inside, every classification file carries labels and normalization as TFLite metadata, and a
file refuses the input dtype it does not take. docs/mobile.md's LiteRT and Task Library
blocks run in tests/test_task_library.py, on a classifier confident on the photos: the digits
model's answers on photos are near ties, which a one-pixel rounding difference flips."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from conftest import SMALL

from conversion import convert, runners, tflite_metadata
from conversion.digits import load_digits_split
from tfbit.preprocessing.processor import BitImageProcessor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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
    # in-graph normalization is exact; probabilities against the reference logits' softmax
    assert rows["tflite_fp32[uint8]"]["criterion"] == "parity through softmax"
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
        signature = {"serving_default": {"inputs": ["image"], "outputs": ["probabilities"]}}
        assert interpreter.get_signature_list() == signature
        runner = interpreter.get_signature_runner("serving_default")
        detail = runner.get_input_details()["image"]
        assert detail["dtype"] == np.uint8 and list(detail["shape"]) == [1, 32, 32, 3], q
        if q == "int8":  # the quantized input is the pixel itself: scale 1, zero point 0
            assert detail["quantization"] == (1.0, 0)
            from conversion import tflite_graph  # all-integer: no uint8 -> float cast at the input

            assert tflite_graph.float_ops((output / "tflite" / "digits_int8_uint8.tflite").read_bytes()) == []
        probabilities = runner(image=np.full((1, 32, 32, 3), 128, np.uint8))["probabilities"]
        # full int8's output is in 1/256 steps: each of the 10 rounded by up to half of one
        assert probabilities.shape == (1, 10) and abs(probabilities.sum() - 1) <= (10 / 512 if q == "int8" else 1e-5), q


def test_fp32_uint8_file_equals_the_keras_model_on_processed_images(uint8_export):
    """Independent of the verifier: raw crops into the file against the softmax of the Keras
    model's logits on the processor's normalized images, within the parity contract carried
    through the softmax (half the logits' tolerance)."""
    import tfbit

    output, _ = uint8_export
    model = tfbit.BitForImageClassification.from_pretrained(convert.DEFAULT_CHECKPOINT)
    processor = BitImageProcessor.from_pretrained(output)
    _, _, images, _ = load_digits_split()
    images = images[:8]
    run = runners.tflite_runner(str(output / "tflite" / "digits_fp32_uint8.tflite"))
    probabilities = run(runners.raw_crops(processor, list(images)))["probabilities"]
    reference = np.asarray(model(processor(list(images))), np.float64)
    expected = np.exp(reference) / np.exp(reference).sum(-1, keepdims=True)
    assert np.abs(probabilities - expected).max() <= 0.5e-4 * max(1.0, np.abs(reference).max())
    np.testing.assert_allclose(probabilities.sum(-1), 1, atol=1e-6)


def test_metadata_carries_labels_normalization_and_what_the_output_is(uint8_export, float_export):
    output, _ = uint8_export
    labels = [str(i) for i in range(10)]
    files = [output / "tflite" / f"digits_{q}_uint8.tflite" for q in QUANTIZATIONS]
    float_file = float_export / "tflite" / "digits_fp32.tflite"
    for path in files + [float_file]:
        metadata = tflite_metadata.read_classifier_metadata(path)
        assert metadata["labels"] == labels, path.name
        assert metadata["label_files"] == {"labels.txt": 2}  # TENSOR_AXIS_LABELS on the output
        np.testing.assert_allclose(metadata["mean"], [127.5] * 3)  # digits: mean = std = 0.5, on 0-255
        np.testing.assert_allclose(metadata["std"], [127.5] * 3)
        assert (metadata["input"], metadata["image_size"]) == ("image", (32, 32))
        assert metadata["name"] == "digits" and metadata["min_parser_version"] == "1.0.0"
        if path == float_file:  # preprocessed floats in, logits out
            assert (metadata["output"], metadata["output_range"]) == ("logits", None)
            assert metadata["output_description"] == "Logits of the classes, not probabilities (softmax gives them)."
        else:  # the value range, as tflite-support's classifier writer records probabilities
            assert (metadata["output"], metadata["output_range"]) == ("probabilities", (0.0, 1.0))
            assert metadata["output_description"] == (
                "Probabilities of the classes (softmax of the logits): they sum to 1."
            )


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


def test_predict_prints_a_uint8_files_probabilities_as_they_are(uint8_export, tmp_path):
    """The file outputs probabilities: `predict` ranks and prints them, not a softmax of them."""
    from PIL import Image

    from tfbit.preprocessing.decode import load_image

    output, _ = uint8_export
    model = output / "tflite" / "digits_fp32_uint8.tflite"
    _, _, images, _ = load_digits_split()
    paths = [str(tmp_path / f"{i}.png") for i in range(1, 3)]
    for i, path in enumerate(paths, 1):
        Image.fromarray(images[i]).save(path)
    processor = BitImageProcessor.from_pretrained(output)
    crops = runners.raw_crops(processor, [load_image(p) for p in paths])
    expected = runners.tflite_runner(str(model))(crops)["probabilities"]
    run = dict(capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=300)
    command = [sys.executable, "-m", "conversion.predict", str(model), *paths, "--top-k", "3"]
    done = subprocess.run(command + ["--json"], **run)
    assert done.returncode == 0, done.stderr[-3000:]
    for row, probabilities in zip(json.loads(done.stdout[done.stdout.index("[") :]), expected):
        best = np.argsort(-probabilities, kind="stable")[:3]
        assert [t["label"] for t in row["top"]] == [str(i) for i in best]
        np.testing.assert_allclose([t["probability"] for t in row["top"]], probabilities[best], rtol=1e-6)
    text = subprocess.run(command, **run).stdout.splitlines()
    assert text[1] == f"  {expected[0].max():7.2%}  {expected[0].argmax()}", text


def test_multi_label_head_outputs_sigmoid_probabilities(hf_checkpoint, tmp_path):
    """A multi-label classifier (problem_type, as transformers writes it): each class's sigmoid,
    said so in the metadata, verified against the reference logits' sigmoid."""
    source, _ = hf_checkpoint(**SMALL, problem_type="multi_label_classification")
    report = convert.convert(
        str(source),
        output=str(tmp_path / "out"),
        formats=("tflite",),
        quantizations=("fp32",),
        num_images=8,
        tflite_input="uint8",
        log=lambda m: None,
    )
    (row,) = report["artifacts"]
    assert report["passed"] and row["criterion"] == "parity through sigmoid", row
    path = str(tmp_path / "out" / row["path"])
    metadata = tflite_metadata.read_classifier_metadata(path)
    assert (metadata["output"], metadata["output_range"]) == ("probabilities", (0.0, 1.0))
    assert metadata["output_description"] == tflite_metadata.OUTPUTS["sigmoid"][1]
    assert "multi-label" in metadata["output_description"]
    rng = np.random.default_rng(0)
    probabilities = runners.tflite_runner(path)(rng.integers(0, 256, (4, 224, 224, 3), np.uint8))["probabilities"]
    assert probabilities.shape == (4, 7) and ((probabilities > 0) & (probabilities < 1)).all()
    assert np.abs(probabilities.sum(-1) - 1).min() > 1e-3  # each class on its own, not a distribution


@pytest.mark.parametrize("activation", ["softmax", "sigmoid"])
def test_probability_tolerance_bounds_what_a_logit_error_can_do(activation):
    """`verify.as_probabilities` (what `compare_probabilities` judges by) carries the logits'
    tolerance through the function: no logit error within it moves a probability further, and
    the worst cases come close (the bound is not loose)."""
    from conversion import verify

    function, _ = verify.ACTIVATIONS[activation]
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 4, (2000, 10))
    tolerance = 0.1
    reference, tolerances = verify.as_probabilities({"logits": logits}, {"logits": tolerance}, activation)
    moved = function(logits + rng.choice([-tolerance, tolerance], logits.shape))
    worst = np.abs(moved - reference["probabilities"]).max()
    assert worst <= tolerances["probabilities"] and worst >= 0.8 * tolerances["probabilities"]
    np.testing.assert_allclose(reference["probabilities"], function(logits))


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


def test_probabilities_judged_by_the_logits_criterion_through_the_function(tmp_path):
    """A probabilities file off by more than half the logits' parity tolerance fails, with the
    criterion named; its top-1 is compared with the logits' argmax."""
    from conversion import verify

    logits = np.random.default_rng(0).normal(0, 3, (8, 5))
    probabilities = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    tolerance = 0.5e-4 * max(1.0, np.abs(logits).max())

    def judge(outputs):
        return verify.compare_probabilities(
            "tflite_fp32[uint8]",
            str(tmp_path),
            lambda x: {"probabilities": outputs[: len(x)]},
            np.zeros((8, 1)),  # one batch: the run returns every row
            {"logits": logits},
            lossless=True,
            activation="softmax",
        )

    row = judge(probabilities + 0.9 * tolerance)
    assert row.passed and row.top1_agreement == 1 and row.criterion == "parity through softmax"
    np.testing.assert_allclose(row.tolerance, tolerance)
    row = judge(probabilities + 1.1 * tolerance)
    assert not row.passed
    assert row.note == f"max |Δ| {1.1 * tolerance:.3g} above {tolerance:.3g} (parity through softmax)"
