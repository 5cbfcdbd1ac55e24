"""Short fine-tuning runs: the HyperRule schedule scaled to 30 steps barely trains and says so;
the short-run schedule reaches what a practitioner's hand-picked settings reach; the training curve
has one loss per step. Through `python -m conversion.finetune` as typed, on the embedded digits
checkpoint and digits images."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conversion.convert import DEFAULT_CHECKPOINT
from conversion.digits import load_digits_split
from tfbit.finetune.hyperrule import hyperrule_plan, learning_shortfall, short_run_plan

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WARNING = "warning: this schedule gives the model 0.39% of the learning of the full BiT-HyperRule schedule"


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """320 training digits and 100 held-out ones as root/<digit>/<i>.png."""
    root = tmp_path_factory.mktemp("digits")
    x, y, x_test, y_test = load_digits_split()
    for split, images, labels in (("train", x[:320], y[:320]), ("val", x_test[:100], y_test[:100])):
        for i, (image, label) in enumerate(zip(images, labels)):
            (root / split / str(label)).mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(root / split / str(label) / f"{i}.png")
    return root


def finetune_cli(digits, output, *args):
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "conversion.finetune",
            DEFAULT_CHECKPOINT,
            "--data",
            digits / "train",
            "--validation",
            digits / "val",
            "--output",
            output,
            "--batch-size",
            "32",
            "--steps",
            "30",
            "--epochs",
            "3",
            "--no-flip",
            *args,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done, json.loads((output / "metrics.json").read_text())


def test_scaled_hyperrule_warns_and_barely_trains_where_the_short_schedule_learns(digits, tmp_path):
    done, metrics = finetune_cli(digits, tmp_path / "hyperrule")
    assert WARNING in done.stderr and "--schedule short" in done.stderr
    assert metrics["validation"]["accuracy"] < 0.5  # 12% on all held-out digits (README)
    done, metrics = finetune_cli(digits, tmp_path / "short", "--schedule", "short")
    assert "warning:" not in done.stderr, done.stderr
    assert metrics["validation"]["accuracy"] >= 0.9  # 98% on all held-out digits (README)
    assert metrics["plan"]["crop_size"] == 32 and metrics["plan"]["learning_rate"] == 0.01
    # per-step loss: one value per optimizer step, whose epoch means are Keras' epoch losses
    steps = metrics["steps"]
    assert steps["step"] == list(range(1, 31)) and all(math.isfinite(v) for v in steps["loss"])
    per_epoch = metrics["steps_per_epoch"]
    np.testing.assert_allclose(
        [np.mean(steps["loss"][i : i + per_epoch]) for i in range(0, 30, per_epoch)],
        metrics["history"]["loss"],
        rtol=1e-4,
    )
    with Image.open(tmp_path / "short" / "training_curve.png") as image:
        assert image.format == "PNG"
    # a log file gets one line per epoch, no progress bar
    assert "\r" not in done.stdout and "\x1b[" not in done.stdout
    assert [line.startswith("Epoch ") for line in done.stdout.splitlines()].count(True) == 3


def test_learning_rates_are_the_schedules():
    plan = hyperrule_plan(1438, (32, 32), batch_size=32).scaled_to(30)
    schedule = plan.schedule()
    np.testing.assert_allclose(plan.learning_rates(), [float(schedule(step)) for step in range(30)], rtol=1e-6)


def test_shortfall_is_measured_against_the_full_rule():
    full = hyperrule_plan(1438, (32, 32))
    assert learning_shortfall(full) is None and abs(full.total_learning() - 0.485) < 0.001
    message = learning_shortfall(hyperrule_plan(1438, (32, 32), batch_size=32).scaled_to(30))
    assert message.startswith("this schedule gives the model 0.39% of the learning")
    assert "sums to 0.0019 over 30 steps, peak 0.00019" in message
    assert learning_shortfall(short_run_plan(1438, (32, 32), 30, batch_size=32)) is None


def test_short_run_plan():
    plan = short_run_plan(1438, (32, 32), 30, batch_size=32, source_resolution=32)
    assert (plan.learning_rate, plan.warmup_steps, plan.decay_boundaries) == (0.01, 3, (24,))
    assert (plan.crop_size, plan.resize_size) == (32, 40)
    # small images never go above the rule's 128 px, large ones keep the rule's resolution
    assert short_run_plan(100, (64, 64), 30, 32, source_resolution=224).crop_size == 128
    assert short_run_plan(100, (64, 64), 30, 32).crop_size == 64
    assert short_run_plan(100, (300, 300), 30, 32, source_resolution=32).crop_size == 480
    assert short_run_plan(100, (32, 32), 30, 32, base_lr=0.048).learning_rate == pytest.approx(0.003)
    with pytest.raises(ValueError, match="source_resolution must be a positive int or None, got 0"):
        short_run_plan(100, (32, 32), 30, source_resolution=0)
    with pytest.raises(TypeError, match=r"unknown HyperRulePlan field\(s\): \['lr'\]"):
        short_run_plan(100, (32, 32), 30, lr=0.1)


def test_unknown_schedule_is_refused(tmp_path):
    from tfbit.finetune import from_arrays
    from tfbit.finetune.trainer import finetune

    data = from_arrays(np.zeros((4, 8, 8, 3), np.uint8), [0, 1, 0, 1])
    with pytest.raises(ValueError, match=r"schedule must be one of \('hyperrule', 'short'\), got 'fast'"):
        finetune(DEFAULT_CHECKPOINT, data, str(tmp_path), schedule="fast")
