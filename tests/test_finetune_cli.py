"""`python -m conversion.finetune` as typed: bad data and arguments exit with 2 and a message naming
the problem, and a killed run resumes to exactly the planned number of steps."""

import io
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import skimage.data
from PIL import Image

import tfbit
from conversion.digits import load_digits_split

TINY = dict(embedding_size=16, hidden_sizes=[32, 64], depths=[1, 1], num_groups=8, num_labels=3)
# The short schedule every run here uses: 32 px crops of the 8x8 digits, batches of 8.
SMALL_RUN = ["--batch-size", "8", "--crop-size", "32", "--resize-size", "36", "--no-flip"]


def _write_digits(root, classes=("even", "odd"), count=40):
    """Digits as root/<class>/<i>.png, the class being the digit's parity."""
    x, y, _, _ = load_digits_split()
    for i in range(count):
        name = classes[int(y[i]) % len(classes)]
        (root / name).mkdir(parents=True, exist_ok=True)
        Image.fromarray(x[i]).save(root / name / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    path = tmp_path_factory.mktemp("source") / "tiny.keras"
    tfbit.BitForImageClassification(tfbit.BitConfig(**TINY)).save(path)
    return str(path)


@pytest.fixture(scope="module")
def digits_folder(tmp_path_factory):
    return _write_digits(tmp_path_factory.mktemp("digits"))


def _cli(*args, **kwargs):
    return subprocess.run(
        [sys.executable, "-m", "conversion.finetune", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=600,
        **kwargs,
    )


def _assert_refused(process, *fragments):
    assert process.returncode == 2, process.stderr[-3000:]
    assert "Traceback" not in process.stderr, process.stderr[-3000:]
    for fragment in fragments:
        assert fragment in process.stderr, process.stderr[-3000:]


def test_truncated_jpeg_is_named_before_training(tmp_path, source):
    data = _write_digits(tmp_path / "data")
    encoded = io.BytesIO()
    Image.fromarray(skimage.data.astronaut()[::4, ::4]).save(encoded, "JPEG")
    truncated = data / "odd" / "cut.jpg"
    truncated.write_bytes(encoded.getvalue()[: len(encoded.getvalue()) // 2])
    with Image.open(truncated) as image:
        image.verify()  # PIL's check does not decode: this file passes it
    process = _cli(source, "--data", data, "--output", tmp_path / "run", "--steps", "4", *SMALL_RUN)
    _assert_refused(process, "cannot decode image file", str(truncated))
    assert not (tmp_path / "run" / "best.keras").exists()


def test_validation_class_unknown_to_training_is_named(tmp_path, source, digits_folder):
    validation = _write_digits(tmp_path / "val", classes=("even", "odd", "prime"), count=12)
    process = _cli(
        source,
        "--data",
        digits_folder,
        "--validation",
        validation,
        "--output",
        tmp_path / "run",
        "--steps",
        "4",
        *SMALL_RUN,
    )
    _assert_refused(process, "validation data", "['prime']", "['even', 'odd']")


def test_a_single_class_is_refused(tmp_path, source):
    data = _write_digits(tmp_path / "data", classes=("all",), count=8)
    process = _cli(source, "--data", data, "--output", tmp_path / "run", "--steps", "4", *SMALL_RUN)
    _assert_refused(process, "1 class ['all']", "at least 2 classes")


def test_overwrite_trains_again_and_replaces_the_completed_run(tmp_path, source, digits_folder):
    command = [
        source,
        "--data",
        digits_folder,
        "--output",
        tmp_path / "run",
        "--steps",
        "2",
        "--epochs",
        "1",
        *SMALL_RUN,
    ]
    assert _cli(*command).returncode == 0
    first = (tmp_path / "run" / "metrics.json").read_text()
    done = _cli(*command, "--overwrite", "--base-lr", "0.5")
    assert done.returncode == 0, done.stderr[-3000:]
    second = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert second["plan"]["base_lr"] == 0.5 and json.loads(first)["plan"]["base_lr"] != 0.5
    assert sorted(os.listdir(tmp_path / "run")) == [
        "best.keras",
        "config.json",
        "metrics.json",
        "preprocessor_config.json",
        "training_curve.png",
    ]


@pytest.mark.parametrize("flag", ["--epochs", "--steps", "--batch-size"])
def test_counts_must_be_positive(tmp_path, source, digits_folder, flag):
    process = _cli(source, "--data", digits_folder, "--output", tmp_path / "run", flag, "0")
    _assert_refused(process, f"argument {flag}: must be at least 1, got 0")
    assert not (tmp_path / "run").exists()


def test_absurd_batch_size_and_threads_are_refused_up_front(tmp_path, source, digits_folder):
    """`--batch-size 100000000` printed nothing for 400 s and `--threads 100000` started that many
    TensorFlow threads; both are refused before any work, naming the sizes."""
    started = time.monotonic()
    process = _cli(source, "--data", digits_folder, "--output", tmp_path / "run", "--batch-size", "100000000")
    _assert_refused(process, "batch_size 100000000: one batch of ", " GiB of float32 pixels, more than this machine's ")
    assert time.monotonic() - started < 120 and not (tmp_path / "run").exists()
    process = _cli(source, "--data", digits_folder, "--output", tmp_path / "run", "--threads", "100000")
    cores = len(os.sched_getaffinity(0))
    _assert_refused(process, f"argument --threads: at most 4 threads per available core ({4 * cores} on this machine's")
    assert not (tmp_path / "run").exists()


def test_killed_run_resumes_to_exactly_the_planned_steps(tmp_path, source, digits_folder):
    """Killed once the first epoch's backup exists, the same command finishes the plan: 60 steps,
    not 60 plus the steps already made; metrics.json covers every epoch and step of the whole
    run, and best.keras is the best of the whole run (its validation accuracy is the history's
    highest), whichever part of the run reached it."""
    command = [
        sys.executable,
        "-m",
        "conversion.finetune",
        source,
        "--data",
        str(digits_folder),
        "--validation",
        str(digits_folder),
        "--output",
        str(tmp_path / "run"),
        "--steps",
        "60",
        "--epochs",
        "6",
        *SMALL_RUN,
    ]
    metadata = tmp_path / "run" / "backup" / "training_metadata.json"
    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.time() + 300
        while time.time() < deadline and first.poll() is None:
            try:
                if json.loads(metadata.read_text())["epoch"] >= 1:
                    break
            except (OSError, ValueError, KeyError):  # not written yet, or being written
                pass
            time.sleep(0.05)
        assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        os.kill(first.pid, signal.SIGKILL)
        first.wait()
    assert not (tmp_path / "run" / "metrics.json").exists()

    resumed = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["resumed_from_step"] >= 10
    assert metrics["final_step"] == metrics["plan"]["total_steps"] == 60
    assert not (tmp_path / "run" / "backup").exists() and not (tmp_path / "run" / "run").exists()
    history = metrics["history"]
    assert len(history["loss"]) == len(history["val_accuracy"]) == 6  # every epoch, before the kill too
    assert metrics["steps"]["step"] == list(range(1, 61))
    assert metrics["validation"]["accuracy"] == pytest.approx(max(history["val_accuracy"]), abs=1e-6)

    # the completed run is not silently trained again
    again = subprocess.run(command, capture_output=True, text=True, timeout=600)
    _assert_refused(
        again,
        f"{tmp_path / 'run'} holds a completed fine-tune (metrics.json, best.keras): pass "
        "overwrite=True (--overwrite) to train again",
    )
    assert json.loads((tmp_path / "run" / "metrics.json").read_text()) == metrics
