"""Errors users hit, through the command lines as typed, in fresh processes: one clear line
naming the problem, exit 2 for bad input."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import SMALL
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cli(*args, timeout=600):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


def error_line(done):
    lines = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    return lines[0]


def test_config_json_that_is_a_list(tmp_path):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text("[1, 2]")
    done = cli("conversion.convert", str(tmp_path / "ckpt"), "--output", str(tmp_path / "o"))
    assert done.returncode == 2
    assert "config.json holds a JSON list, expected an object of settings" in error_line(done)


def test_bfloat16_checkpoint_converts_like_transformers_loads_it(tmp_path, hf_checkpoint, torch_module):
    path, model = hf_checkpoint(**SMALL)
    model.to(torch_module.bfloat16).save_pretrained(path)
    done = cli(
        "conversion.convert", str(path), "--output", str(tmp_path / "o"), "--formats", "keras", "--num-images", "4"
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert json.loads((tmp_path / "o" / "report.json").read_text())["passed"]


def test_keras_file_without_its_preprocessing_is_refused(tmp_path):
    import tfbit

    tfbit.BitForImageClassification(tfbit.BitConfig(**SMALL)).save(tmp_path / "m.keras")
    done = cli("conversion.convert", str(tmp_path / "m.keras"), "--output", str(tmp_path / "o"))
    assert done.returncode == 2
    assert "m.keras has no preprocessor_config.json beside it" in error_line(done)
    assert "--preprocessor" in error_line(done)


def test_bad_numbers_are_refused_by_argparse(tmp_path):
    done = cli("conversion.convert", "--num-images", "0")
    assert done.returncode == 2 and "--num-images: must be at least 1, got 0" in done.stderr


@pytest.mark.parametrize("module", ["conversion.convert", "conversion.predict"])
def test_absurd_thread_counts_are_refused_before_tensorflow_starts(module, tmp_path):
    done = cli(module, str(tmp_path / "anything"), "--threads", "100000", timeout=60)
    cores = len(os.sched_getaffinity(0))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert (
        f"argument --threads: at most 4 threads per available core ({4 * cores} on this machine's {cores}), got 100000"
        in (done.stderr)
    )


@pytest.fixture(scope="module")
def small_export(tmp_path_factory):
    """A small classifier exported to .keras and TFLite fp32, with its config beside them."""
    import tfbit
    from conversion import export
    from tfbit.preprocessing.processor import BitImageProcessor

    root = tmp_path_factory.mktemp("export")
    model = tfbit.BitForImageClassification(tfbit.BitConfig(**SMALL))
    model.save(root / "m.keras")
    model.config.save_pretrained(root)
    BitImageProcessor(size=40, crop_size=32).save_pretrained(root)
    (root / "m.tflite").write_bytes(
        export.tflite_bytes(export.float32_inference_model(model), "classification", (32, 32), "fp32")
    )
    return root


def test_predict_on_folders_skips_bad_images_by_path(small_export, tmp_path):
    photos = tmp_path / "photos" / "nested"
    photos.mkdir(parents=True)
    rng = np.random.RandomState(0)
    for i in range(2):
        Image.fromarray(rng.randint(0, 255, (50, 60, 3), np.uint8)).save(photos / f"{i}.jpg")
    (photos / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    done = cli("conversion.predict", str(small_export / "m.keras"), str(tmp_path / "photos"), "--json")
    assert done.returncode == 1, done.stderr  # some images skipped
    assert [r["image"].endswith(("0.jpg", "1.jpg")) for r in json.loads(done.stdout)] == [True, True]
    assert "skipped:" in done.stderr and "broken.png" in done.stderr
    done = cli("conversion.predict", str(small_export / "m.keras"), str(photos / "*.jpg"))
    assert done.returncode == 0 and done.stdout.count("LABEL_") == 2 * 5
    done = cli("conversion.predict", str(small_export / "m.keras"), str(photos / "broken.png"))
    assert done.returncode == 2 and "none of the images could be read" in done.stderr


def test_tflite_refuses_wrongly_shaped_input(small_export):
    from conversion.runners import tflite_runner

    run = tflite_runner(str(small_export / "m.tflite"))
    assert run(np.zeros((2, 32, 32, 3), np.float32))["logits"].shape == (2, 7)
    with pytest.raises(
        ValueError, match=r"m.tflite takes a batch of \(32, 32, 3\) float32 images .* got shape \(32, 32, 3\)"
    ):
        run(np.zeros((32, 32, 3), np.float32))
    with pytest.raises(ValueError, match="takes float32 input, got uint8: preprocess the images"):
        run(np.zeros((1, 32, 32, 3), np.uint8))


def test_converting_into_the_source_folder_never_touches_the_source(tmp_path, hf_checkpoint):
    path, _ = hf_checkpoint(**SMALL)
    before = {p.name: p.read_bytes() for p in path.iterdir()}
    for extra in ([], ["--overwrite"]):
        done = cli("conversion.convert", str(path), "--output", str(path), "--formats", "keras", *extra)
        assert done.returncode == 2, done.stdout + done.stderr
        assert "holds the source checkpoint" in error_line(done) and "config.json" in error_line(done)
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before


def test_an_unwritable_output_is_bad_input():
    done = cli("conversion.convert", "--output", "/proc/tfbit-out", "--formats", "keras")
    assert done.returncode == 2
    assert "/proc" in error_line(done)


def test_an_output_below_a_file_is_bad_input(tmp_path):
    (tmp_path / "afile").write_text("")
    done = cli("conversion.convert", "--output", str(tmp_path / "afile" / "out"), "--formats", "keras")
    assert done.returncode == 2
    assert f"cannot create {tmp_path / 'afile' / 'out'}: {tmp_path / 'afile'} is a file, not a folder" in error_line(
        done
    )


@pytest.fixture
def read_only_folder(tmp_path):
    """A folder on a read-only file system (a tmpfs mounted read-only; root may write anywhere else)."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a read-only tmpfs here: {mounted.stderr.decode().strip()}")
    yield folder
    subprocess.run(["umount", str(folder)], check=True)


def test_predict_refuses_what_it_cannot_read_or_write_before_it_starts(small_export, tmp_path, read_only_folder):
    photo = os.path.join(ROOT, "conversion", "photos", "coffee.jpg")
    artifact = str(small_export / "m.keras")
    cases = [
        ([str(tmp_path / "missing.keras"), photo], f"no artifact at {tmp_path / 'missing.keras'}"),
        ([artifact, photo, "--output", str(tmp_path / "x.csv") + "/"], "name a .csv or .jsonl file"),
        (
            [artifact, photo, "--output", str(read_only_folder / "p.csv")],
            f"--output {read_only_folder / 'p.csv'}: cannot write there (read-only file or folder)",
        ),
    ]
    (tmp_path / "folder.csv").mkdir()
    cases.append(([artifact, photo, "--output", str(tmp_path / "folder.csv")], "folder.csv is a folder: name a file"))
    for args, message in cases:
        done = cli("conversion.predict", *args, timeout=60)
        assert done.returncode == 2, done.stderr
        assert message in error_line(done)
    assert os.listdir(read_only_folder) == []
