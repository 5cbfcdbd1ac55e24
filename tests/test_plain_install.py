"""`pip install .` with no extras (no torch, transformers, timm or scikit-learn), then the
converter's console command (`tfbit-convert`) on a checkpoint, from a folder outside the repository: what a new
user runs first."""

import json
import os
import subprocess
import sys

from conftest import SMALL

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_convert_works_on_a_plain_install(tmp_path, hf_checkpoint):
    source, _ = hf_checkpoint(**SMALL)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    install = subprocess.run(
        [python, "-m", "pip", "install", "--quiet", ROOT], capture_output=True, text=True, timeout=1800
    )
    assert install.returncode == 0, install.stderr[-3000:]
    listed = subprocess.run([python, "-m", "pip", "list"], capture_output=True, text=True, check=True).stdout
    versions = dict(line.split()[:2] for line in listed.splitlines()[2:])
    assert not {"torch", "transformers", "timm", "scikit-learn"} & set(versions)
    assert versions["ml_dtypes"] != "0.7.0"  # setup.cfg: a second more for every TensorFlow start
    output = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    done = subprocess.run(  # the console command pip installed, as a user types it
        [str(venv / "bin" / "tfbit-convert"), str(source), "--output", str(output)],
        cwd=tmp_path,
        env={**env, "TF_CPP_MIN_LOG_LEVEL": "2"},
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads((output / "report.json").read_text())
    assert report["reference"] == "keras" and report["images"] == "32 shipped photos"
    assert all(row["published"] for row in report["artifacts"])
    done = subprocess.run(  # the KerasHub format without the keras-hub extra: refused before any work
        [str(venv / "bin" / "tfbit-convert"), str(source), "--output", str(tmp_path / "hub"), "--formats", "keras_hub"],
        cwd=tmp_path,
        env={k: v for k, v in env.items() if k != "TF_CPP_MIN_LOG_LEVEL"},  # as a user's shell has it
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 2 and done.stdout == "", done.stdout + done.stderr
    assert done.stderr.splitlines() == [
        "error: --formats keras_hub needs KerasHub (No module named 'keras_hub'): pip install 'tfbit[keras-hub]'"
    ]
    assert not (tmp_path / "hub").exists()

    # The newest Pillow (13 or later: the test extra's apache-beam holds the test environment at 12)
    # orders its two resize passes by shape; the serving graph's fixed-point resize must follow it.
    done = subprocess.run(
        [python, "-c", PILLOW_ORDER_CHECK], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    version, delta, names_21k, first = done.stdout.splitlines()[-1].split("\t")
    assert int(version.split(".")[0]) >= 13 and float(delta) <= 1e-6, done.stdout
    # label names ship as package data: the plain install has no timm to borrow them from
    assert names_21k == "21843" and first.strip() == "tench, Tinca tinca", done.stdout


PILLOW_ORDER_CHECK = """
import importlib.util
import numpy as np, PIL
from conversion import images
from tfbit.preprocessing import tf_processor
from tfbit.preprocessing.processor import BitImageProcessor
photo = np.asarray(images.photo_images().images[0].convert("RGB"))
shapes = [np.tile(photo, (4, 1, 1))[:2000, :300], np.tile(photo, (1, 4, 1))[:300, :2000], photo]
deltas = [np.abs(tf_processor.preprocess_images(x, p).numpy() - p(x)).max()
          for resample in (2, 3) for p in [BitImageProcessor(backend="pil", resample=resample)] for x in shapes]
from tfbit.weights.labels import known_labels
assert importlib.util.find_spec("timm") is None
print(PIL.__version__, max(deltas), len(known_labels(21843)), known_labels(1000)[0], sep="\t")
"""
