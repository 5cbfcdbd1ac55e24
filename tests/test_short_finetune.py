"""Short fine-tuning runs: the HyperRule schedule scaled to 30 steps barely trains and says so;
the short-run schedule reaches what a practitioner's hand-picked settings reach; the training curve
has one loss per step. docs/finetuning.md's digits block as typed, then the same command without
`--schedule short`, on the embedded digits checkpoint and scikit-learn's digits as image folders."""

import json
import math
import os

import numpy as np
import pytest
from PIL import Image
from test_docs import _run, block

from conversion.convert import DEFAULT_CHECKPOINT
from tfbit.finetune.hyperrule import hyperrule_plan, learning_shortfall, short_run_plan

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WARNING = "warning: this schedule gives the model 0.39% of the learning of the full BiT-HyperRule schedule"
SHORT = "--schedule short"


def _finetune(cwd, command):
    done = _run(cwd, ["bash", "-e", "-c", command])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    return done


def test_scaled_hyperrule_warns_and_barely_trains_where_the_short_schedule_learns(tmp_path):
    os.symlink(os.path.join(ROOT, "conversion"), tmp_path / "conversion")  # `conversion/default_checkpoint`
    typed = block("docs/finetuning.md", "load_digits_split")
    assert typed.rstrip().endswith(SHORT) and "--output runs/digits" in typed
    done = _finetune(tmp_path, typed)
    assert "warning:" not in done.stderr, done.stderr
    metrics = json.loads((tmp_path / "runs" / "digits" / "metrics.json").read_text())
    assert metrics["validation"]["accuracy"] >= 0.9  # 97.8% (docs/finetuning.md's table)
    assert metrics["plan"]["crop_size"] == 32 and metrics["plan"]["learning_rate"] == 0.01
    # per-step loss: one value per optimizer step, whose epoch means are Keras' epoch losses
    steps, per_epoch = metrics["steps"], metrics["steps_per_epoch"]
    assert steps["step"] == list(range(1, 31)) and all(math.isfinite(v) for v in steps["loss"])
    np.testing.assert_allclose(
        [np.mean(steps["loss"][i : i + per_epoch]) for i in range(0, 30, per_epoch)],
        metrics["history"]["loss"],
        rtol=1e-4,
    )
    with Image.open(tmp_path / "runs" / "digits" / "training_curve.png") as image:
        assert image.format == "PNG"
    # a log file gets one line per epoch, no progress bar
    assert "\r" not in done.stdout and "\x1b[" not in done.stdout
    epochs = [line.startswith("Epoch ") for line in done.stdout.splitlines()].count(True)
    assert epochs == len(metrics["history"]["loss"]) == math.ceil(30 / per_epoch)

    command = typed.splitlines()[-2:]  # the fine-tuning command, on the folders the block wrote
    hyperrule = "\n".join(command).replace("runs/digits", "runs/hyperrule").replace(SHORT, "")
    done = _finetune(tmp_path, hyperrule)
    assert WARNING in done.stderr and SHORT in done.stderr
    metrics = json.loads((tmp_path / "runs" / "hyperrule" / "metrics.json").read_text())
    assert metrics["validation"]["accuracy"] < 0.5  # 12.3% (docs/finetuning.md's table)


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
