"""Multi-worker fine-tuning as users run it: the same command on two worker processes on
localhost (TF_CONFIG, free ports, CPU), through the CLI and through the Python API; a worker
killed mid-run and the cluster restarted resumes to exactly the planned steps."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

import tfbit
from tests.test_finetune_cli import SMALL_RUN, TINY, _write_digits
from tfbit.finetune.workers import localhost_tf_configs

STEPS = ["--steps", "24", "--epochs", "6"]  # 4 steps per epoch, a backup after each
VALIDATED_STEPS = ["--steps", "12", "--epochs", "3"]


def _worker_envs(count):
    return [{**os.environ, "TF_CONFIG": config} for config in localhost_tf_configs(count)]


def _start(command, envs, log_dir, tag):
    return [
        subprocess.Popen(command, env=env, stdout=open(log_dir / f"{tag}-{i}.log", "w"), stderr=subprocess.STDOUT)
        for i, env in enumerate(envs)
    ]


def _wait(processes, log_dir, tag, timeout=420):
    deadline = time.time() + timeout
    codes = []
    for i, process in enumerate(processes):
        try:
            codes.append(process.wait(timeout=max(1, deadline - time.time())))
        except subprocess.TimeoutExpired:
            for p in processes:
                p.kill()
            pytest.fail(f"worker {i} did not finish: {(log_dir / f'{tag}-{i}.log').read_text()[-3000:]}")
    return codes


def _log(log_dir, tag, i):
    return (log_dir / f"{tag}-{i}.log").read_text()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """(a tiny classifier's .keras file, a two-class folder of 60 digits)."""
    root = tmp_path_factory.mktemp("inputs")
    tfbit.BitForImageClassification(tfbit.BitConfig(**TINY)).save(root / "tiny.keras")
    return str(root / "tiny.keras"), _write_digits(root / "digits", count=60)


def _command(source, digits_folder, output, validation=False):
    # Validation costs each epoch a retrace of Keras' evaluation function under this strategy
    # (~7 s here), so only the first test validates, over fewer epochs.
    return [
        sys.executable,
        "-m",
        "conversion.finetune",
        source,
        "--data",
        str(digits_folder),
        *(["--validation", str(digits_folder)] if validation else []),
        "--output",
        str(output),
        "--distribute",
        "multi_worker",
        "--threads",
        "1",
        *(VALIDATED_STEPS if validation else STEPS),
        *SMALL_RUN,
    ]


def test_two_workers_train_and_only_the_chief_writes(tmp_path, inputs):
    source, digits_folder = inputs
    output = tmp_path / "run"
    processes = _start(_command(source, digits_folder, output, validation=True), _worker_envs(2), tmp_path, "run")
    codes = _wait(processes, tmp_path, "run")
    assert codes == [0, 0], _log(tmp_path, "run", 0)[-3000:] + _log(tmp_path, "run", 1)[-3000:]
    metrics = json.loads((output / "metrics.json").read_text())
    assert (metrics["num_workers"], metrics["num_replicas"]) == (2, 2)
    assert metrics["final_step"] == metrics["plan"]["total_steps"] == 12
    assert metrics["plan"]["batch_size"] == 8  # the global batch: 4 per worker
    assert len(metrics["steps"]["seconds"]) == 12 and min(metrics["steps"]["seconds"]) > 0
    assert "best checkpoint" in _log(tmp_path, "run", 0)
    assert "the chief writes the outputs" in _log(tmp_path, "run", 1)
    # the worker's backups lived in its own folder, removed at the end
    assert sorted(p.name for p in output.iterdir()) == sorted(
        ["best.keras", "config.json", "metrics.json", "preprocessor_config.json", "training_curve.png"]
    )
    # both workers logged the same (all-reduced) training loss every epoch
    losses = [
        [line.split("loss: ")[1].split()[0] for line in _log(tmp_path, "run", i).splitlines() if "/step - " in line]
        for i in range(2)
    ]
    assert len(losses[0]) == 3 and losses[0] == losses[1]
    # every worker evaluated the whole validation set: the same numbers, and the chief's final ones
    validation = [
        [
            line.split("val_accuracy: ")[1].split()[0]
            for line in _log(tmp_path, "run", i).splitlines()
            if "val_accuracy: " in line
        ]
        for i in range(2)
    ]
    assert len(validation[0]) == 3 and validation[0] == validation[1]
    assert "validation" in metrics


def test_without_tf_config_the_message_says_what_to_set(tmp_path, inputs):
    source, digits_folder = inputs
    env = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"}
    process = subprocess.run(
        _command(source, digits_folder, tmp_path / "run"), env=env, capture_output=True, text=True, timeout=300
    )
    assert process.returncode == 2, process.stderr[-2000:]
    assert "--distribute multi_worker needs TF_CONFIG" in process.stderr
    env["TF_CONFIG"] = json.dumps({"cluster": {"worker": ["localhost:1"]}, "task": {"type": "worker", "index": 3}})
    process = subprocess.run(
        _command(source, digits_folder, tmp_path / "run"), env=env, capture_output=True, text=True, timeout=300
    )
    assert process.returncode == 2 and 'TF_CONFIG\'s "task" must name' in process.stderr, process.stderr[-2000:]


def test_a_killed_worker_restarted_with_the_cluster_resumes_the_plan(tmp_path, inputs):
    """Worker 1 is killed once a backup exists; the chief stops with a message (TensorFlow
    ends collectives when a peer stops sending heartbeats); both restarted finish 24 steps."""
    source, digits_folder = inputs
    output = tmp_path / "run"
    command = _command(source, digits_folder, output)
    envs = _worker_envs(2)
    processes = _start(command, envs, tmp_path, "first")
    metadata = output / ".worker-1" / "backup" / "training_metadata.json"
    deadline = time.time() + 300
    while time.time() < deadline and processes[1].poll() is None:
        try:
            if json.loads(metadata.read_text())["epoch"] >= 2:
                break
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.05)
    assert processes[1].poll() is None, _log(tmp_path, "first", 1)[-3000:]
    os.kill(processes[1].pid, signal.SIGKILL)
    codes = _wait(processes, tmp_path, "first", timeout=240)
    assert codes[0] == 1, _log(tmp_path, "first", 0)[-3000:]
    assert "error: distributed training stopped" in _log(tmp_path, "first", 0)
    assert "resumes from the last backup" in _log(tmp_path, "first", 0)
    assert not (output / "metrics.json").exists()

    processes = _start(command, envs, tmp_path, "second")
    codes = _wait(processes, tmp_path, "second")
    assert codes == [0, 0], _log(tmp_path, "second", 0)[-3000:] + _log(tmp_path, "second", 1)[-3000:]
    metrics = json.loads((output / "metrics.json").read_text())
    assert metrics["resumed_from_step"] >= 8
    assert metrics["final_step"] == metrics["plan"]["total_steps"] == 24
    assert not (output / "backup").exists() and not (output / ".worker-1").exists()


PYTHON_API = textwrap.dedent("""
    import json
    import sys
    from tfbit.finetune import from_image_folder
    from tfbit.finetune.trainer import finetune
    from tfbit.finetune.workers import multi_worker_strategy

    strategy = multi_worker_strategy()  # first: before any TensorFlow op
    source, data, output = sys.argv[1:]
    result = finetune(source, from_image_folder(data), output, strategy=strategy, batch_size=8, steps=12,
                      epochs=3, plan_overrides={"crop_size": 32, "resize_size": 36}, random_flip=False)
    print("output_dir", result.output_dir)
    print("losses", json.dumps(result.metrics["steps"]["loss"]))
""")


def test_python_api_trains_one_model_on_both_workers(tmp_path, inputs):
    source, digits_folder = inputs
    script = tmp_path / "train.py"
    script.write_text(PYTHON_API)
    processes = [
        subprocess.Popen(
            [sys.executable, str(script), source, str(digits_folder), str(tmp_path / "run")],
            env=env,
            stdout=open(tmp_path / f"api-{i}.log", "w"),
            stderr=subprocess.STDOUT,
        )
        for i, env in enumerate(_worker_envs(2))
    ]
    assert _wait(processes, tmp_path, "api") == [0, 0], _log(tmp_path, "api", 0)[-3000:]
    logs = [_log(tmp_path, "api", i) for i in range(2)]
    assert f"output_dir {tmp_path / 'run'}" in logs[0] and "output_dir None" in logs[1]
    losses = [json.loads(next(line for line in log.splitlines() if line.startswith("losses "))[7:]) for log in logs]
    # each step's loss is the mean over both workers' halves of the batch: the same on both
    assert len(losses[0]) == 12 and np.allclose(losses[0], losses[1], rtol=1e-6)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["num_workers"] == 2 and metrics["final_step"] == 12
