"""CPU defaults of the command-line tools (conversion/runtime.py) and the parallel int8 export."""

import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import SMALL

from conversion import convert, export, predict, runtime
from conversion.environment import ONEDNN, onednn_default

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHILD = (
    "import sys; from conversion import runtime; "
    "threads = runtime.set_threads(int(sys.argv[1]) if len(sys.argv) > 1 else None); "
    "import tensorflow as tf; print(threads, tf.config.threading.get_intra_op_parallelism_threads())"
)


def _child(*args, environment=None):
    """What a fresh process (as a CLI starts) ends up with after the runtime defaults."""
    env = {k: v for k, v in os.environ.items() if k != ONEDNN}
    if environment is not None:
        env[ONEDNN] = environment
    out = subprocess.run(
        [sys.executable, "-c", CHILD, *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip().splitlines()[-1].split()


@pytest.mark.parametrize("exported", [None, "0", "1"])
def test_onednn_is_off_for_inference_and_on_for_training_unless_exported(exported, monkeypatch):
    """What the CLIs set before TensorFlow is imported; that TensorFlow then runs with it is
    checked through the CLIs themselves (tests/test_quiet_cli.py, --verbose shows its notice)."""
    for training, default in ((False, "0"), (True, "1")):
        if exported is None:
            monkeypatch.delenv(ONEDNN, raising=False)
        else:
            monkeypatch.setenv(ONEDNN, exported)
        onednn_default(training)
        assert os.environ[ONEDNN] == (exported or default)


def test_threads_default_to_every_available_core_and_can_be_set():
    cores = runtime.available_cores()
    assert _child() == [str(cores), "0"]  # TF's own default (0) already means every core
    assert _child("1") == ["1", "1"]


@pytest.mark.parametrize("main", [convert.main, predict.main])
def test_cli_rejects_bad_thread_counts(main, tmp_path, capsys):
    positional = [str(tmp_path), str(tmp_path / "x.png")] if main is predict.main else [str(tmp_path)]
    with pytest.raises(SystemExit) as info:
        main([*positional, "--threads", "0"])
    assert info.value.code == 2
    assert "--threads: must be at least 1, got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*positional, "--threads", "two"])
    assert "--threads: must be a whole number, got 'two'" in capsys.readouterr().err


def test_int8_without_calibration_images_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        convert.main(["--output", str(tmp_path / "o"), "--calibration-images", "0"])
    assert info.value.code == 2
    assert "--calibration-images: must be at least 1, got 0" in capsys.readouterr().err
    with pytest.raises(
        convert.ConversionError, match="full int8 TFLite needs calibration images, got calibration_images=0"
    ):
        convert.convert(output=str(tmp_path / "o"), calibration_images=0, log=lambda m: None)
    assert not (tmp_path / "o").exists()
    # without int8 nothing is calibrated, so the count does not matter
    report = convert.convert(
        output=str(tmp_path / "o"),
        formats=("tflite",),
        quantizations=("fp32",),
        calibration_images=0,
        log=lambda m: None,
    )
    assert report["passed"] and (tmp_path / "o" / "tflite" / "digits_fp32.tflite").exists()


@pytest.fixture(scope="module")
def small_inference_model():
    import keras

    import tfbit

    keras.utils.set_random_seed(0)
    return tfbit.fold_weight_standardization(tfbit.BitForImageClassification(tfbit.BitConfig(**dict(SMALL))))


def test_int8_converted_beside_the_float_variants_equals_int8_alone(small_inference_model):
    calibration = np.random.RandomState(0).uniform(-1, 1, (4, 32, 32, 3)).astype("float32")
    together = export.tflite_models(small_inference_model, "classification", (32, 32), ("int8", "fp32"), calibration)
    assert list(together) == ["int8", "fp32"]  # the order asked for
    alone = export.tflite_bytes(small_inference_model, "classification", (32, 32), "int8", calibration)
    assert together["int8"] == alone
    assert together["fp32"] == export.tflite_bytes(small_inference_model, "classification", (32, 32), "fp32")


def test_float_variants_from_one_converter_equal_fresh_conversions(small_inference_model):
    """The float variants reuse one converter; each must be what a converter of its own makes."""
    floats = ("fp32", "fp16", "dynamic_int8")
    shared = export.tflite_models(small_inference_model, "classification", (32, 32), floats)
    for quantization in floats:
        assert shared[quantization] == export.tflite_bytes(
            small_inference_model, "classification", (32, 32), quantization
        ), quantization


def test_representative_images_of_another_size_are_refused(small_inference_model):
    with pytest.raises(
        ValueError,
        match=r"representative images have shape \(16, 16, 3\); "
        r"the TFLite graph takes \(32, 32, 3\)",
    ):
        export.tflite_models(
            small_inference_model, "classification", (32, 32), ("fp32", "int8"), np.zeros((2, 16, 16, 3), "float32")
        )


def test_a_failing_int8_worker_reports_its_last_words(tmp_path):
    worker = export._Int8Worker(np.zeros((1, 8, 8, 3), "float32"), str(tmp_path))
    worker.convert(str(tmp_path / "not_a_saved_model"))
    with pytest.raises(RuntimeError, match=r"^TFLite int8 conversion failed \(exit code 1\): .*not_a_saved_model"):
        worker.result()
    worker.close()


def test_an_int8_worker_without_a_graph_says_so(tmp_path):
    worker = export._Int8Worker(np.zeros((1, 8, 8, 3), "float32"), str(tmp_path))
    worker.process.stdin.close()  # as when the parent dies before saving the graph
    with pytest.raises(RuntimeError, match="no graph to convert: the parent process stopped before saving it"):
        worker.result()
    worker.close()


def test_an_int8_worker_killed_early_is_reported_as_such(tmp_path):
    worker = export._Int8Worker(np.zeros((1, 8, 8, 3), "float32"), str(tmp_path))
    worker.process.kill()
    worker.process.wait()
    worker.convert(str(tmp_path / "graph"))  # the pipe is broken: no error here, `result` tells
    with pytest.raises(
        RuntimeError, match=r"^TFLite int8 conversion failed \(killed by signal 9 \(out of memory\?\)\)"
    ):
        worker.result()
    worker.close()
