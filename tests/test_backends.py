"""tfbit under Keras' JAX and PyTorch backends: parity with transformers, fine-tuning, `.keras`
files the converter (TensorFlow) exports, and data-parallel training under JAX.

Keras fixes its backend at the first `import keras`, so each backend runs in a fresh process:
`tests/backend_check.py` measures there and reports JSON; the assertions are here. The
TensorFlow backend is what every other test runs under.
"""

import importlib.util
import json
import os
import subprocess
import sys
import zipfile

import numpy as np
import pytest
from conftest import assert_parity

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)
BACKENDS = ["jax", "torch"]
# `make install-test` puts JAX beside the venv, not in it (see the Makefile): only the processes
# that run Keras on JAX have it on their path.
JAX_PATH = os.path.join(sys.prefix, "jax")


def run(command, backend, **env):
    env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3", **env}
    if backend == "jax":
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [JAX_PATH, env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, *command], cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)


def require(backend):
    """importorskip, for JAX in the folder its processes get (conftest turns the skip into a failure)."""
    if backend != "jax":
        pytest.importorskip(backend)
    elif not os.path.isfile(os.path.join(JAX_PATH, "jax", "__init__.py")) and importlib.util.find_spec("jax") is None:
        pytest.skip(f"could not import 'jax': neither in {JAX_PATH} nor installed (make install-test)")


def backend_check(backend, output_dir, *args, **env):
    require(backend)
    pytest.importorskip("transformers")
    result = run([os.path.join(TESTS, "backend_check.py"), str(output_dir), *args], backend, **env)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["backend"] == backend
    return report


@pytest.fixture(scope="module", params=BACKENDS)
def checked(request, tmp_path_factory):
    """(backend, its report, the folder holding the `.keras` file it wrote)."""
    output_dir = tmp_path_factory.mktemp(f"written_under_{request.param}")
    return request.param, backend_check(request.param, output_dir), output_dir


def test_parity_with_transformers(checked):
    """Logits (eager and compiled predict), the folded inference form, hidden states and
    backbone maps of weights loaded with `from_pretrained`, within the 1e-4 contract."""
    backend, report, _ = checked
    for name, delta in report["parity"].items():
        print(f"PARITY {backend} {name}: max |delta| / max(1, max |reference|) = {delta:.3g} (contract: 1e-4)")
        assert delta <= 1e-4, f"{backend} {name}: {delta:.3g}"
    assert report["keras_file"]["saved_delta"] <= 1e-4


def test_training_step_equals_transformers(checked):
    """One SGD step of `model.fit`'s machinery updates every weight as transformers' own loss
    and autograd do: the gradients agree within the contract."""
    backend, report, _ = checked
    print(f"TRAINING STEP {backend}: max |delta update| / max(1, max |update|) = {report['training_step']:.3g}")
    assert report["training_step"] <= 1e-4


def test_schedule_new_heads_and_freezing(checked):
    _, report, _ = checked
    np.testing.assert_allclose(report["schedule"], [0.0, 0.05, 0.1, 0.1, 0.01, 0.001], rtol=1e-6)
    assert report["new_head_is_zero"]
    assert report["trainable"] == ["classifier/kernel", "classifier/bias"]
    assert report["changed"] == ["classifier/bias", "classifier/kernel"]  # the frozen body did not move
    assert report["fit_losses"][-1] < report["fit_losses"][0]


def test_finetune_with_mixup_writes_a_reloadable_checkpoint(checked):
    _, report, _ = checked
    finetuned = report["finetune"]
    assert finetuned["final_step"] == 6
    assert {"best.keras", "config.json", "metrics.json", "preprocessor_config.json"} <= set(finetuned["files"])
    assert all(np.isfinite(finetuned["losses"]))
    # HyperRule scaled to 6 steps: lr 0.1 x 8/512 after the 1-step warm-up, /10 after steps 3 and 4
    np.testing.assert_allclose(finetuned["learning_rate"], [0.1 * 8 / 512 / 10, 0.1 * 8 / 512 / 1000], rtol=1e-5)
    assert finetuned["reloaded_delta"] == 0.0
    assert report["keras_file"]["reloaded_equal"]


def test_tf_distribute_strategy_is_refused_with_the_alternative(checked):
    backend, report, _ = checked
    message = report["strategy_error"]
    assert message is not None and f"Keras runs on {backend}" in message
    assert "keras.distribution.set_distribution(keras.distribution.DataParallel())" in message


def test_keras_file_written_under_the_backend_converts_under_tensorflow(checked, tmp_path):
    """The converter CLI, run as users run it (TensorFlow backend), exports the `.keras` file
    written under JAX or PyTorch; the SavedModel and TFLite reproduce transformers' logits."""
    from conversion import runners

    backend, _, written = checked
    output = tmp_path / "export"
    result = run(
        [
            "-m",
            "conversion.convert",
            str(written / "bit.keras"),
            "--output",
            str(output),
            "--formats",
            "saved_model",
            "tflite",
            "--tflite",
            "fp32",
            "--num-images",
            "4",
        ],
        "tensorflow",
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert json.loads((output / "report.json").read_text())["passed"]
    expected = np.load(written / "expected.npz")
    x, logits = expected["pixel_values"], expected["logits"]
    saved_model = runners.saved_model_runner(str(output / "serving" / "1"), "pixel_values")
    tflite = runners.tflite_runner(str(output / "tflite" / "bit_fp32.tflite"))
    print(
        f"CONVERTED FROM {backend}: SavedModel {assert_parity(saved_model(x)['logits'], logits, 'SavedModel'):.3g}, "
        f"TFLite {assert_parity(tflite(x)['logits'], logits, 'TFLite fp32'):.3g} (contract: 1e-4)"
    )


def test_converter_says_exports_need_tensorflow(tmp_path):
    require("jax")
    output = tmp_path / "out"
    result = run(
        ["-m", "conversion.convert", os.path.join(ROOT, "conversion", "default_checkpoint"), "--output", str(output)],
        "jax",
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert (
        "error: exports need the TensorFlow backend of Keras, but it runs on jax (KERAS_BACKEND or "
        "~/.keras/keras.json): run the converter with KERAS_BACKEND=tensorflow"
    ) in result.stderr
    assert not output.exists()


def test_predict_says_it_needs_tensorflow(tmp_path):
    require("jax")
    # a zip archive named .keras passes predict's checks made before Keras starts
    zipfile.ZipFile(tmp_path / "model.keras", "w").close()
    result = run(
        [
            "-m",
            "conversion.predict",
            str(tmp_path / "model.keras"),
            os.path.join(ROOT, "conversion", "photos", "coffee.jpg"),
        ],
        "jax",
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert (
        "error: predict needs the TensorFlow backend of Keras, but it runs on jax (KERAS_BACKEND or "
        "~/.keras/keras.json): run predict with KERAS_BACKEND=tensorflow"
    ) in result.stderr


def test_data_parallel_finetune_under_jax_on_two_devices(tmp_path):
    """The README's example: `keras.distribution.DataParallel` over two (CPU) devices trains as
    one device does, with the weights replicated on both."""
    report = backend_check("jax", tmp_path, "--data-parallel", XLA_FLAGS="--xla_force_host_platform_device_count=2")[
        "data_parallel"
    ]
    print(f"DATA PARALLEL jax: {report}")
    assert report["devices"] == report["weight_devices"] == report["num_replicas"] == 2
    assert report["final_step"] == 6
    assert report["weight_delta"] <= 1e-6 and report["loss_delta"] <= 1e-6


def test_finetune_cli_under_jax_exports_through_tensorflow(tmp_path):
    """`python -m conversion.finetune ... --export` under JAX: training runs on JAX, and the export
    (a converter process of its own) on TensorFlow, which verifies what it exported."""
    require("jax")
    from PIL import Image

    rng = np.random.RandomState(0)
    for label, level in (("dark", 60), ("bright", 190)):
        (tmp_path / "data" / label).mkdir(parents=True)
        for i in range(4):
            pixels = np.clip(rng.normal(level, 30, (36, 36, 3)), 0, 255).astype("uint8")
            Image.fromarray(pixels).save(tmp_path / "data" / label / f"{i}.png")
    output = tmp_path / "run"
    result = run(
        [
            "-m",
            "conversion.finetune",
            os.path.join(ROOT, "conversion", "default_checkpoint"),
            "--data",
            str(tmp_path / "data"),
            "--validation",
            str(tmp_path / "data"),
            "--output",
            str(output),
            "--steps",
            "2",
            "--epochs",
            "1",
            "--batch-size",
            "4",
            "--crop-size",
            "32",
            "--resize-size",
            "36",
            "--export",
            "saved_model",
        ],
        "jax",
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert (output / "best.keras").is_file()
    report = json.loads((output / "export" / "report.json").read_text())
    assert report["passed"] and report["format"] == "keras"
