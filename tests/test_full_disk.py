"""A full disk and signals, as users hit them: every command line that writes ends with one line
and exit 2 (130/143 for Ctrl-C/SIGTERM), leaving what was there before and no partial files.

Two kinds of full disk: a small tmpfs mounted by the test (root only; the converter refuses
it before exporting), and a file-size limit (`ulimit -f`, RLIMIT_FSIZE) under which writes fail
with EFBIG part-way, as on a disk that fills up during the run."""

import json
import os
import resource
import signal
import subprocess
import sys
import time

import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PHOTOS = os.path.join(ROOT, "conversion", "photos")
CHECKPOINT = os.path.join(ROOT, "conversion", "default_checkpoint")
SMALL_TRAINING = ["--batch-size", "4", "--crop-size", "32", "--resize-size", "36"]


def _env():
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TF_CPP_MIN_LOG_LEVEL")}
    return {**env, "HF_HUB_OFFLINE": "1"}


def _limited(max_file_bytes):
    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_file_bytes, max_file_bytes))

    return limit


def run(args, cwd, max_file_bytes=None):
    return subprocess.run(
        [sys.executable, "-m", *map(str, args)],
        cwd=cwd,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
        preexec_fn=_limited(max_file_bytes) if max_file_bytes else None,
    )


def _one_line_exit_2(done, starts):
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(starts), done.stderr[-2000:]
    return last


def _tree(folder):
    return sorted(
        (os.path.relpath(os.path.join(d, f), folder), os.path.getsize(os.path.join(d, f)))
        for d, _, files in os.walk(folder)
        for f in files
    )


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """An earlier export (demo), photos, and a two-class image folder."""
    root = tmp_path_factory.mktemp("disk")
    done = run(["conversion.convert", "--output", root / "export", "--formats", "saved_model", "keras"], root)
    assert done.returncode == 0, done.stderr[-3000:]
    (root / "photos").mkdir()
    for name in sorted(os.listdir(PHOTOS))[:12]:
        if name.endswith(".jpg"):
            Image.open(os.path.join(PHOTOS, name)).convert("RGB").save(root / "photos" / name)
    for label, name in (("cat", "chelsea.jpg"), ("rocket", "rocket.jpg")):
        (root / "data" / label).mkdir(parents=True)
        for i in range(4):
            Image.open(os.path.join(PHOTOS, name)).convert("RGB").save(root / "data" / label / f"{i}.jpg")
    return root


def _mount_tmpfs(mount, options):
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mount)]).returncode:
        pytest.skip("mounting a tmpfs needs root (the file-size limit tests below run everywhere)")


@pytest.fixture(scope="module")
def read_only(tmp_path_factory):
    mount = tmp_path_factory.mktemp("mounts") / "read-only"
    _mount_tmpfs(mount, "size=1m,ro")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


# predict's refusal: tests/test_cli_errors.py
READ_ONLY_CASES = {
    "convert": (["conversion.convert", "--output", "{ro}/export"], "error: cannot write into {ro}: "),
    "batch_predict": (
        ["conversion.batch_predict", "export", "photos/*", "--output", "{ro}/out/preds"],
        "error: --output {ro}/out/preds: cannot write in {ro} (read-only folder)",
    ),
    "finetune": (
        ["conversion.finetune", CHECKPOINT, "--data", "data", "--output", "{ro}/run", "--steps", "2"],
        "error: --output {ro}/run: cannot write into {ro}: read-only file system or folder",
    ),
}


@pytest.mark.parametrize("command", READ_ONLY_CASES)
def test_a_read_only_output_is_refused_before_the_work(world, read_only, command):
    args, message = READ_ONLY_CASES[command]
    if command == "batch_predict":
        pytest.importorskip("apache_beam")
    done = run([arg.format(ro=read_only) for arg in args], world)
    _one_line_exit_2(done, message.format(ro=read_only))
    assert "[2/5]" not in done.stdout and "Epoch" not in done.stdout


def test_convert_refuses_a_file_system_too_small_before_exporting(world, tmp_path):
    mount = tmp_path / "small"
    _mount_tmpfs(mount, "size=1m")
    try:
        started = time.perf_counter()
        done = run(["conversion.convert", "--output", mount / "export"], world)
        seconds = time.perf_counter() - started
        last = _one_line_exit_2(done, f"error: not enough space for the export in {mount / 'export'}: it needs")
        assert "MB are free" in last and "[2/5]" not in done.stdout  # refused before exporting
        assert os.listdir(mount) == [], os.listdir(mount)
        print(f"refused in {seconds:.1f} s: {last}")
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_convert_on_a_disk_filling_up_keeps_the_previous_export(world):
    before = _tree(world / "export")
    done = run(["conversion.convert", "--output", "export", "--overwrite"], world, max_file_bytes=200_000)
    last = _one_line_exit_2(done, "error: file too large for the file system or the process's file-size limit")
    assert "nothing was published" in last
    assert _tree(world / "export") == before
    assert sorted(os.listdir(world)) == ["data", "export", "photos"]  # no staging folder left


def test_predict_output_on_a_full_disk_leaves_no_partial_file(world):
    # a limit far below the ~1 KB of TensorFlow's start-up lines, which the CLI filters out of
    # its stderr: none of them may get through cut off
    done = run(
        ["conversion.predict", "export", PHOTOS, "--top-k", "10", "--output", "preds.csv"], world, max_file_bytes=100
    )
    _one_line_exit_2(done, "error: file too large for the file system or the process's file-size limit")
    assert len(done.stderr.splitlines()) == 1, done.stderr
    assert sorted(os.listdir(world)) == ["data", "export", "photos"]


def test_batch_predict_on_a_full_disk(world):
    pytest.importorskip("apache_beam")
    done = run(
        ["conversion.batch_predict", "export", f"{PHOTOS}/*", "--top-k", "10", "--output", "out/preds"],
        world,
        max_file_bytes=3000,
    )
    last = _one_line_exit_2(done, "error: file too large for the file system or the process's file-size limit")
    assert last.endswith("while writing out/preds-*")
    assert not list((world / "out").glob("*")), list((world / "out").glob("*"))  # Beam's temporary folders too


def test_finetune_on_a_full_disk_says_how_to_resume(world, tmp_path):
    done = run(
        ["conversion.finetune", CHECKPOINT, "--data", world / "data", "--output", tmp_path / "run", "--steps", "4"]
        + SMALL_TRAINING,
        world,
        max_file_bytes=20_000,
    )
    last = _one_line_exit_2(done, "error: file too large for the file system or the process's file-size limit")
    assert last.endswith("the same command starts the run again once there is space")
    assert not (tmp_path / "run" / "best.keras").exists()


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_finetune_stops_on_a_signal_with_one_line(world, tmp_path, signum, code):
    """Sent once the first epoch's backup exists: the line says the same command resumes."""
    output = tmp_path / "run"
    process = subprocess.Popen(
        [sys.executable, "-m", "conversion.finetune", CHECKPOINT, "--data", world / "data", "--output", output]
        + ["--steps", "20000", "--epochs", "100"]
        + SMALL_TRAINING,
        cwd=world,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # a test runner started in the background of a shell inherits SIGINT ignored
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    metadata = output / "backup"
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None and not metadata.is_dir():
        time.sleep(0.2)
    time.sleep(1)
    process.send_signal(signum)
    out, err = process.communicate(timeout=300)
    assert process.returncode == code, out[-2000:] + err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    name = "interrupted" if signum == signal.SIGINT else "terminated by SIGTERM"
    assert err.strip().splitlines()[-1] == f"{name}: the same command resumes the run from its last backup"
    assert not (output / "best.keras").exists() and json.loads((output / "run" / "journal.json").read_text())
