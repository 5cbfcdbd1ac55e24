"""The command lines are quiet and start fast: no TensorFlow/LiteRT C++ log lines unless
--verbose, none inside the converter's progress, and --help without importing TensorFlow.
Fresh processes with the user's environment (no TF_CPP_MIN_LOG_LEVEL of the test run)."""

import os
import subprocess
import sys
import time

import pytest

from conftest import SMALL
from conversion import cli
from conversion.environment import _NATIVE_LOG_LINE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
USER_ENV = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "TF_ENABLE_ONEDNN_OPTS")}


def run(*args, **kwargs):
    return subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env={**USER_ENV, "HF_HUB_OFFLINE": "1"}, **kwargs)


def native_lines(text):
    return [line for line in text.splitlines() if _NATIVE_LOG_LINE.match(line)]


@pytest.mark.parametrize("module", ["conversion.convert", "conversion.predict"])
def test_help_imports_no_tensorflow(module):
    done = run("-c", f"import runpy, sys; sys.argv = ['{module}', '--help']\n"
                     f"try:\n    runpy.run_module('{module}', run_name='__main__')\n"
                     "except SystemExit:\n    pass\n"
                     "print(sorted({'tensorflow', 'keras', 'tfbit', 'torch'} & set(sys.modules)))")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "[]" and "--verbose" in done.stdout
    started = time.perf_counter()
    done = run("-m", module, "--help")
    seconds = time.perf_counter() - started
    assert done.returncode == 0 and done.stderr == ""
    assert seconds < 3, f"{module} --help took {seconds:.1f} s"  # importing TensorFlow alone takes 5-10 s


def test_the_cli_choices_are_the_librarys():
    from conversion.export import TFLITE_QUANTIZATIONS
    from tfbit.pretrained import TASKS
    from tfbit.weights import FORMATS
    assert (cli.TFLITE_QUANTIZATIONS, cli.TASKS, cli.SOURCE_FORMATS) == (TFLITE_QUANTIZATIONS, TASKS, FORMATS)


def test_converter_output_is_only_its_own(hf_checkpoint, tmp_path):
    """The ~35 lines TensorFlow, the MLIR converter and LiteRT printed (measured before this
    change) are gone; --verbose brings them back. Hugging Face's progress bar is off in a log."""
    path, _ = hf_checkpoint(**SMALL)
    done = run("-m", "conversion.convert", path, "--output", tmp_path / "o", "--formats", "tflite",
               "--tflite", "fp32", "fp16", "--num-images", "4")
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stderr == ""
    assert not native_lines(done.stdout) and "\r" not in done.stdout
    assert done.stdout.startswith("[1/5] loading ") and "[5/5] all artifacts verified" in done.stdout
    done = run("-m", "conversion.convert", path, "--output", tmp_path / "o", "--formats", "tflite",
               "--tflite", "fp32", "--num-images", "4", "--overwrite", "--verbose")
    assert done.returncode == 0, done.stdout + done.stderr
    assert len(native_lines(done.stderr)) >= 5, done.stderr


def test_predict_is_quiet_and_inference_defaults_apply(tmp_path):
    """predict used to import TensorFlow (through tfbit) before setting its oneDNN default; with
    --verbose, TensorFlow's own notice shows whether oneDNN came up."""
    import numpy as np
    import tfbit
    from conversion import export
    from PIL import Image
    from tfbit.image_processor import BitImageProcessor
    model = tfbit.BitForImageClassification(tfbit.BitConfig(**SMALL))
    model.config.save_pretrained(tmp_path)
    BitImageProcessor(size=40, crop_size=32).save_pretrained(tmp_path)
    (tmp_path / "m.tflite").write_bytes(export.tflite_bytes(export.float32_inference_model(model),
                                                            "classification", (32, 32), "fp32"))
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(tmp_path / "x.png")
    done = run("-m", "conversion.predict", tmp_path / "m.tflite", tmp_path / "x.png")
    assert done.returncode == 0 and done.stderr == "", done.stderr
    done = run("-m", "conversion.predict", tmp_path / "m.tflite", tmp_path / "x.png", "--verbose")
    assert done.returncode == 0 and native_lines(done.stderr), done.stderr
    assert "oneDNN custom operations are on" not in done.stderr


def test_filtering_keeps_everything_but_native_log_lines():
    done = run("-c", "import os, sys, warnings\n"
                     "from conversion.environment import native_logs_filtered\n"
                     "try:\n"
                     "    with native_logs_filtered():\n"
                     "        os.write(2, b'W0000 00:00:1795969144.623448   22771 helpers.cc:364] Ignored output_format.\\n')\n"
                     "        os.write(2, b'INFO: Created TensorFlow Lite XNNPACK delegate for CPU.\\n')\n"
                     "        warnings.warn('a Python warning')\n"
                     "        raise RuntimeError('boom')\n"
                     "except RuntimeError:\n"
                     "    print('after', file=sys.stderr)\n")
    assert done.returncode == 0
    assert "UserWarning: a Python warning" in done.stderr and done.stderr.endswith("after\n")
    assert "Ignored output_format" not in done.stderr and "XNNPACK" not in done.stderr
