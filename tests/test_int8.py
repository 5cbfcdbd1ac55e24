"""Full int8 TFLite is LiteRT's quantizer's (`conversion.quantize`, the recipe recorded there)
and all-integer: no float op between the input's QUANTIZE and the output's DEQUANTIZE, for every
task, as the converter CLI writes it; it answers as the float file does."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import SMALL

from conversion import export, quantize, tflite_graph
from tfbit.private_api import tflite_flatbuffer_utils, tflite_schema

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_float_ops_finds_the_float_graph_and_passes_the_integer_one():
    import tfbit

    model = export.float32_inference_model(tfbit.BitForImageClassification(tfbit.BitConfig(**SMALL)))
    calibration = np.random.RandomState(0).uniform(-1, 1, (4, 32, 32, 3)).astype("float32")
    files = export.tflite_models(model, "classification", (32, 32), ("fp32", "int8"), calibration)
    found = tflite_graph.float_ops(files["fp32"])
    assert len(found) > 20 and any(op.startswith("CONV_2D(") for op in found)
    assert tflite_graph.float_ops(files["int8"]) == []


def _tensor_types(flatbuffer):
    names = {code: name for name, code in vars(tflite_schema().TensorType).items() if not name.startswith("_")}
    model = tflite_flatbuffer_utils().read_model_from_bytearray(bytearray(flatbuffer))
    return {names[t.type] for t in model.subgraphs[0].tensors}


@pytest.fixture(scope="module")
def digits_files():
    """The digits demo (a trained model) as fp32 and int8 files, the int8 calibrated as the
    converter does (16 images), and held-out digits to compare them on."""
    import tfbit
    from conversion import digits
    from tfbit.preprocessing.processor import BitImageProcessor

    model, checkpoint = tfbit.load_model(os.path.join(ROOT, "conversion", "default_checkpoint"))
    processor = BitImageProcessor.from_dict(checkpoint.preprocessor)
    x_train, _, x_test, _ = digits.load_digits_split()
    calibration = processor(list(x_train[:16]))
    size = tuple(calibration.shape[1:3])
    inference = export.float32_inference_model(model)
    files = export.tflite_models(inference, "classification", size, ("fp32", "int8"), calibration)
    return files, calibration, processor(list(x_test[:120]))


def test_int8_is_the_recorded_recipe_and_all_integer(digits_files):
    files, calibration, _ = digits_files
    # The published bytes are the recorded recipe's, applied to the fp32 file on the same images.
    assert files["int8"] == quantize.quantize(files["fp32"], calibration, quantize.DEFAULT_RECIPE)
    assert tflite_graph.float_ops(files["int8"]) == []
    int16 = any(bits == 16 for *_, bits in quantize.RECIPES[quantize.DEFAULT_RECIPE])
    # float32: the input and output only; int32: biases; int64: the zero points int16 tensors take
    assert _tensor_types(files["int8"]) - {"FLOAT32", "INT32", "INT64"} == ({"INT8", "INT16"} if int16 else {"INT8"})


def test_int8_answers_as_the_float_file(digits_files):
    from ai_edge_litert.interpreter import Interpreter

    files, _, images = digits_files
    fp32, int8 = (Interpreter(model_content=files[q]).get_signature_runner() for q in ("fp32", "int8"))
    reference = np.concatenate([fp32(pixel_values=x[None])["logits"] for x in images])
    logits = np.concatenate([int8(pixel_values=x[None])["logits"] for x in images])
    spread = np.mean(reference.max(1) - reference.min(1))
    assert np.mean(logits.argmax(1) == reference.argmax(1)) >= 0.97
    assert np.abs(logits - reference).max() < 0.2 * spread


def test_an_unknown_recipe_is_refused():
    with pytest.raises(ValueError, match=r"unknown quantization recipe 'int4'; choose from \['a16_"):
        quantize.quantizer_for(b"", "int4")


def test_int8_without_the_quantizer_fails_only_that_variant_and_says_what_to_install(tmp_path):
    # An `ai_edge_quantizer` that cannot be imported, first on the path of this process's child
    # and of the int8 worker it starts, stands for the package not being installed.
    shadow = tmp_path / "shadow" / "ai_edge_quantizer"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('No module named ai_edge_quantizer')\n")
    code = (
        "import json, numpy as np, tfbit; from conversion import export; from conftest import SMALL\n"
        "model = export.float32_inference_model(tfbit.BitForImageClassification(tfbit.BitConfig(**SMALL)))\n"
        "images = np.zeros((2, 32, 32, 3), 'float32')\n"
        "files = export.tflite_models(model, 'classification', (32, 32), ('fp32', 'int8'), images)\n"
        "print(json.dumps({q: str(v) if isinstance(v, Exception) else len(v) for q, v in files.items()}))\n"
    )
    path = os.pathsep.join([str(tmp_path / "shadow"), ROOT, os.path.join(ROOT, "tests")])
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": path}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["fp32"] > 0
    assert result["int8"].startswith(
        "TFLite int8 conversion failed (exit code 1): full int8 TFLite needs LiteRT's quantizer: "
        "pip install ai-edge-quantizer"
    )


@pytest.mark.parametrize("task", ["classification", "backbone"])
def test_converter_writes_an_all_integer_int8_file(task, hf_checkpoint, tmp_path):
    # 32 groups, as every released BiT: the int8 kernels must hold at the real models' group count
    config = dict(SMALL, num_groups=32, embedding_size=32, hidden_sizes=[128, 256, 384, 512])
    path, _ = hf_checkpoint("BitForImageClassification" if task == "classification" else "BitBackbone", **config)
    output = tmp_path / "out"
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "conversion.convert",
            str(path),
            "--output",
            str(output),
            "--task",
            task,
            "--formats",
            "tflite",
            "--tflite",
            "int8",
            "--num-images",
            "8",
            "--calibration-images",
            "8",
            "--keep-failed",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    # a random model's int8 logits may miss the verifier's bound (exit 1); --keep-failed publishes it
    assert done.returncode in (0, 1), done.stdout + done.stderr
    report = json.loads((output / "report.json").read_text())
    (row,) = report["artifacts"]
    with open(output / row["path"], "rb") as f:
        flatbuffer = f.read()
    assert tflite_graph.float_ops(flatbuffer) == []
