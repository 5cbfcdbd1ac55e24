"""Backbone exports are what they say: the checkpoint's out_features (or --out-features), in
every format, verified against transformers' BitBackbone; a full-size R50x1's TFLite fp32 file
is as exact as float32 allows and is published."""

import json
import os
import subprocess
import sys

import pytest
from conftest import SMALL

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _outputs(export, name):
    """The output names of each format of an export."""
    import keras
    import tensorflow as tf
    from ai_edge_litert.interpreter import Interpreter

    import tfbit  # noqa: F401  (registers the layers)

    saved = tf.saved_model.load(str(export / "serving" / "1")).signatures
    tflite = Interpreter(model_path=str(export / "tflite" / f"{name}_fp32.tflite")).get_signature_runner()
    return {
        "keras": sorted(keras.saving.load_model(export / f"{name}.keras").output),
        "pixel_values": sorted(saved["pixel_values"].structured_outputs),
        "serving_default": sorted(saved["serving_default"].structured_outputs),
        "tflite": sorted(tflite.get_output_details()),
    }


def test_full_size_backbone_honours_out_features_in_every_format(tmp_path, hf_checkpoint):
    checkpoint, _ = hf_checkpoint("BitBackbone", out_features=["stage2", "stage4"])  # R50x1
    env = {**os.environ, "PYTHONPATH": ROOT, "TF_CPP_MIN_LOG_LEVEL": "2"}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "conversion.convert",
            str(checkpoint),
            "--task",
            "backbone",
            "--output",
            str(tmp_path / "out"),
            "--tflite",
            "fp32",
            "--num-images",
            "8",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["reference"] == "pytorch" and report["passed"]
    rows = {row["artifact"]: row for row in report["artifacts"]}
    fp32 = rows["tflite_fp32"]
    assert fp32["published"] and fp32["criterion"] == "parity"
    # float32's own error at stage4 is ~3e-5 x max |reference| (conversion/verify.py): the file
    # stays within half of the contract (GroupNorm's whole-plane sums, before tfbit summed rows
    # then columns, put it at 1.3x the contract on these photos)
    assert fp32["max_abs_diff"] <= fp32["tolerance"] / 2, fp32
    assert json.loads((tmp_path / "out" / "config.json").read_text())["out_features"] == ["stage2", "stage4"]
    outputs = _outputs(tmp_path / "out", "hf")
    assert all(names == ["stage2", "stage4"] for names in outputs.values()), outputs


def test_out_features_option_replaces_the_checkpoints(tmp_path, hf_checkpoint):
    from conversion import convert

    checkpoint, _ = hf_checkpoint("BitBackbone", **{k: v for k, v in SMALL.items() if k != "num_labels"})
    report = convert.convert(
        str(checkpoint),
        output=str(tmp_path / "out"),
        task="backbone",
        out_features=["stage1", "stage3"],
        quantizations=("fp32",),
        num_images=4,
        log=lambda m: None,
    )
    assert report["passed"] and report["reference"] == "pytorch"
    assert json.loads((tmp_path / "out" / "config.json").read_text())["out_features"] == ["stage1", "stage3"]
    assert all(names == ["stage1", "stage3"] for names in _outputs(tmp_path / "out", "hf").values())
    with pytest.raises(convert.ConversionError, match=r"out_features must be a subset of stage_names"):
        convert.convert(
            str(checkpoint), output=str(tmp_path / "bad"), task="backbone", out_features=["stage9"], log=lambda m: None
        )
