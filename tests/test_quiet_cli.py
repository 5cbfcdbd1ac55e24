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


def run(*args, env=None):
    return subprocess.run(
        [sys.executable, *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**USER_ENV, "HF_HUB_OFFLINE": "1", **(env or {})},
    )


def native_lines(text):
    return [line for line in text.splitlines() if _NATIVE_LOG_LINE.match(line)]


def imported_modules(importtime_stderr):
    """Top-level packages in `python -X importtime` output."""
    return {
        line.rsplit("|", 1)[1].strip().split(".")[0]
        for line in importtime_stderr.splitlines()
        if line.startswith("import time:") and "|" in line
    }


@pytest.mark.parametrize("module", ["conversion.convert", "conversion.predict", "conversion.finetune"])
def test_help_imports_no_tensorflow(module):
    done = run("-X", "importtime", "-m", module, "--help")
    assert done.returncode == 0 and "--verbose" in done.stdout, done.stderr[-2000:]
    imported = imported_modules(done.stderr)
    assert "conversion" in imported and not {"tfbit", "tensorflow", "keras", "torch"} & imported
    started = time.perf_counter()
    done = run("-m", module, "--help")
    seconds = time.perf_counter() - started
    assert done.returncode == 0 and done.stderr == ""
    assert seconds < 3, f"{module} --help took {seconds:.1f} s"  # importing TensorFlow alone takes 5-10 s


@pytest.mark.parametrize("artifact, message", [("m.keras", "is damaged, not a .keras file"), ("m.tflite", "no TFL3")])
def test_predict_refuses_a_damaged_artifact_before_importing_tensorflow(tmp_path, artifact, message):
    (tmp_path / artifact).write_bytes(b"garbage" * 20)
    done = run("-X", "importtime", "-m", "conversion.predict", tmp_path / artifact, os.path.join(ROOT, "README.md"))
    assert done.returncode == 2 and message in done.stderr.splitlines()[-1], done.stderr[-2000:]
    assert not {"tfbit", "tensorflow", "keras"} & imported_modules(done.stderr)


@pytest.mark.parametrize("module", sorted(cli.COMMANDS))
def test_console_commands_answer_help_at_once(module):
    """The console entry points pip installs (setup.cfg) next to `python -m`: same parser, named
    as typed, and no TensorFlow or tfbit imported to print it."""
    command = os.path.join(os.path.dirname(sys.executable), cli.COMMANDS[module])
    started = time.perf_counter()
    done = subprocess.run([command, "--help"], capture_output=True, text=True, timeout=60, env=USER_ENV)
    seconds = time.perf_counter() - started
    assert done.returncode == 0 and done.stderr == "", done.stderr
    assert done.stdout.startswith(f"usage: {cli.COMMANDS[module]} ") and "--verbose" in done.stdout
    assert seconds < 3, f"{command} --help took {seconds:.1f} s"
    as_module = run("-m", module, "--help")
    assert as_module.stdout.replace(f"python -m {module}", cli.COMMANDS[module]).split() == done.stdout.split()


def test_no_import_reads_the_command_line():
    """What `import tfbit` does may not depend on how the process started (issue 21): no module
    reads sys.argv/orig_argv except to name the running command in its help."""
    readers = []
    for folder in ("tfbit", "conversion"):
        for path, _, files in os.walk(os.path.join(ROOT, folder)):
            for name in files:
                if name.endswith(".py"):
                    text = open(os.path.join(path, name), encoding="utf-8").read()
                    if "orig_argv" in text or "sys.argv" in text:
                        readers.append(os.path.relpath(os.path.join(path, name), ROOT))
    assert sorted(readers) == ["conversion/cli.py", "conversion/export.py"], readers


def test_import_tfbit_elsewhere_registers_the_layers(tmp_path):
    """`import tfbit` registers every layer, so a `.keras` file with tfbit's layers loads with
    Keras' own loader; the command lines import tfbit only after configuring TensorFlow."""
    import tfbit

    tfbit.BitForImageClassification(tfbit.BitConfig(**SMALL)).save(tmp_path / "m.keras")
    done = run(
        "-c", f"import tfbit, keras; print(type(keras.saving.load_model({str(tmp_path / 'm.keras')!r})).__name__)"
    )
    assert done.returncode == 0 and done.stdout.split()[-1] == "BitForImageClassification", done.stderr[-2000:]


def test_the_cli_choices_are_the_librarys():
    from conversion.export import TFLITE_QUANTIZATIONS
    from tfbit.models.pretrained import TASKS
    from tfbit.weights import FORMATS

    assert (cli.TFLITE_QUANTIZATIONS, cli.TASKS, cli.SOURCE_FORMATS) == (TFLITE_QUANTIZATIONS, TASKS, FORMATS)


def test_converter_output_is_only_its_own(hf_checkpoint, tmp_path):
    """The ~35 lines TensorFlow, the MLIR converter and LiteRT printed (measured before this
    change) are gone; --verbose brings them back. Hugging Face's progress bar is off in a log."""
    path, _ = hf_checkpoint(**SMALL)
    done = run(
        "-m",
        "conversion.convert",
        path,
        "--output",
        tmp_path / "o",
        "--formats",
        "tflite",
        "--tflite",
        "fp32",
        "fp16",
        "--num-images",
        "4",
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stderr == ""
    assert not native_lines(done.stdout) and "\r" not in done.stdout
    assert done.stdout.startswith("[1/5] loading ") and "[5/5] all artifacts verified" in done.stdout
    done = run(
        "-m",
        "conversion.convert",
        path,
        "--output",
        tmp_path / "o",
        "--formats",
        "tflite",
        "--tflite",
        "fp32",
        "--num-images",
        "4",
        "--overwrite",
        "--verbose",
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert len(native_lines(done.stderr)) >= 5, done.stderr


def test_predict_is_quiet_and_inference_defaults_apply(tmp_path):
    """predict used to import TensorFlow (through tfbit) before setting its oneDNN default; with
    --verbose, TensorFlow's own notice shows whether oneDNN came up."""
    import numpy as np
    from PIL import Image

    import tfbit
    from conversion import export
    from tfbit.preprocessing.processor import BitImageProcessor

    model = tfbit.BitForImageClassification(tfbit.BitConfig(**SMALL))
    model.config.save_pretrained(tmp_path)
    BitImageProcessor(size=40, crop_size=32).save_pretrained(tmp_path)
    (tmp_path / "m.tflite").write_bytes(
        export.tflite_bytes(export.float32_inference_model(model), "classification", (32, 32), "fp32")
    )
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(tmp_path / "x.png")
    done = run("-m", "conversion.predict", tmp_path / "m.tflite", tmp_path / "x.png")
    assert done.returncode == 0 and done.stderr == "", done.stderr
    done = run("-m", "conversion.predict", tmp_path / "m.tflite", tmp_path / "x.png", "--verbose")
    assert done.returncode == 0 and native_lines(done.stderr), done.stderr
    assert "oneDNN custom operations are on" not in done.stderr
    done = run(
        "-m",
        "conversion.predict",
        tmp_path / "m.tflite",
        tmp_path / "x.png",
        "--verbose",
        env={"TF_ENABLE_ONEDNN_OPTS": "1"},
    )
    assert done.returncode == 0 and "oneDNN custom operations are on" in done.stderr, done.stderr  # exported wins


def test_filtering_keeps_everything_but_native_log_lines():
    done = run(
        "-c",
        "import os, sys, warnings\n"
        "from conversion.environment import native_logs_filtered\n"
        "try:\n"
        "    with native_logs_filtered():\n"
        "        os.write(2, b'W0000 00:00:1795969144.623448   22771 helpers.cc:364] Ignored output_format.\\n')\n"
        "        os.write(2, b'INFO: Created TensorFlow Lite XNNPACK delegate for CPU.\\n')\n"
        "        warnings.warn('a Python warning')\n"
        "        raise RuntimeError('boom')\n"
        "except RuntimeError:\n"
        "    print('after', file=sys.stderr)\n",
    )
    assert done.returncode == 0
    assert "UserWarning: a Python warning" in done.stderr and done.stderr.endswith("after\n")
    assert "Ignored output_format" not in done.stderr and "XNNPACK" not in done.stderr


def test_finetune_is_quiet_unless_verbose(tmp_path):
    """`python -m conversion.finetune` printed 5-7 TensorFlow lines (and a oneDNN note) at every start."""
    from PIL import Image

    import tfbit

    tfbit.BitForImageClassification(tfbit.BitConfig(**dict(SMALL, num_labels=2))).save(tmp_path / "m.keras")
    for label, value in (("dark", 40), ("light", 210)):
        (tmp_path / "data" / label).mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (36, 36), (value + i, value, value)).save(tmp_path / "data" / label / f"{i}.png")
    command = [
        "-m",
        "conversion.finetune",
        tmp_path / "m.keras",
        "--data",
        tmp_path / "data",
        "--steps",
        "2",
        "--batch-size",
        "4",
        "--crop-size",
        "32",
        "--resize-size",
        "36",
        "--epochs",
        "1",
    ]
    done = run(*command, "--output", tmp_path / "quiet")
    assert done.returncode == 0, done.stderr[-3000:]
    assert not native_lines(done.stderr) and "oneDNN" not in done.stderr, done.stderr
    assert "best checkpoint:" in done.stdout
    done = run(*command, "--output", tmp_path / "verbose", "--verbose")
    assert done.returncode == 0, done.stderr[-3000:]
    assert native_lines(done.stderr), done.stderr
    assert "oneDNN custom operations are on" in done.stderr  # fine-tuning's default (conversion/runtime.py)
