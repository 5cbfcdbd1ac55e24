"""What every benchmark script shares: thread budget and environment, worker subprocesses and
their interleaved timing, the TF op profile, tables, versions and CPU info, and the previous
GroupNorm kept for before/after comparisons.

The scripts import it as `benchmarks.common` (they put the repository root on sys.path when run
as files), and no script imports another.
"""

import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
THREADS = 2
SIZE = 224
NUM_CLASSES = 1000

# Same thread budget for every framework; also set for libraries that read it at import.
BASE_ENV = {
    "OMP_NUM_THREADS": str(THREADS),
    "MKL_NUM_THREADS": str(THREADS),
    "TF_CPP_MIN_LOG_LEVEL": "2",
    "TF_ENABLE_ONEDNN_OPTS": "0",
    "HF_HUB_OFFLINE": "1",
    "PYTHONPATH": ROOT,
}

# With the cores shared by other jobs, OpenMP's default spinning barriers make torch with 2 threads
# ~15x slower than with 1 (measured here); passive waiting restores normal speed.
TORCH_ENV = {"OMP_WAIT_POLICY": "PASSIVE"}


# ---- inputs and frameworks --------------------------------------------------------------------


def images(batch, size=SIZE, seed=0):
    return np.random.RandomState(seed).uniform(-1, 1, (batch, size, size, 3)).astype("float32")


def setup_tf():
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(THREADS)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    return tf


def setup_torch():
    import torch

    torch.set_num_threads(THREADS)
    torch.set_num_interop_threads(1)
    return torch


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def fit_step_times(model, data):
    """run(k) -> the seconds of each of k `model.fit` steps on `data` (a repeating dataset)."""
    import keras

    class StepTimer(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            self.start = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            self.times.append(time.perf_counter() - self.start)

    timer = StepTimer()

    def run(k):
        timer.times = []
        model.fit(data, steps_per_epoch=k, epochs=1, verbose=0, callbacks=[timer])
        return timer.times

    return run


# ---- subprocesses -----------------------------------------------------------------------------


def emit(result):
    """Child side: print the result the parent reads (the last "RESULT " line of stdout)."""
    print("RESULT " + json.dumps(result), flush=True)


def run_child(args, env=None, timeout=1800):
    """Run a bench script (or `-c code`) as a subprocess; returns the JSON it emits last."""
    proc = subprocess.run(
        [sys.executable, *args],
        env={**os.environ, **BASE_ENV, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        return {"error": f"exit {proc.returncode}: " + "\n".join(proc.stderr.splitlines()[-15:])}
    return json.loads(lines[-1][len("RESULT ") :])


class Worker:
    """A subprocess (`script --serve NAME ...args`) that builds one system, warms it up, then
    times samples on request.

    Several workers stay alive at once and the parent asks them for samples in turn, so systems
    are compared on interleaved samples under the same background load; idle workers block on
    stdin and use no CPU.
    """

    def __init__(self, script, name, args, env=None):
        self.name = name
        self.log = tempfile.TemporaryFile("w+")
        self.proc = subprocess.Popen(
            [sys.executable, script, "--serve", name, *args],
            text=True,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            env={**os.environ, **BASE_ENV, **(env or {})},
        )

    def reply(self):
        for line in self.proc.stdout:
            if line.startswith("RESULT "):
                return json.loads(line[len("RESULT ") :])
        self.proc.wait()
        self.log.seek(0)
        raise RuntimeError(
            f"{self.name} exited {self.proc.returncode}: " + "\n".join(self.log.read().splitlines()[-10:])
        )

    def ask(self, request):
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        return self.reply()

    def close(self):
        try:
            return self.ask("quit")
        finally:
            self.proc.wait()


def serve(handler, ready_info):
    """Worker side of `Worker`: answer JSON requests with handler(request) until "quit"."""
    emit({"ready": True, **ready_info})
    for line in sys.stdin:
        request = json.loads(line)
        if request == "quit":
            return emit({"rss_mb": peak_rss_mb()})
        emit(handler(request))


def interleave(workers, requests, repeats, log=print):
    """Ask every live worker each request, `repeats` times, rotating the worker order each time.
    Returns {worker name: {request key: [samples]}}; a failing worker is dropped and reported."""
    samples = {w.name: {} for w in workers}
    live = list(workers)
    for r in range(repeats):
        shift = r % len(live) if live else 0
        for w in live[shift:] + live[:shift]:
            for request in requests:
                try:
                    out = w.ask(request)
                except (RuntimeError, BrokenPipeError) as e:
                    log(f"  {w.name} FAILED: {e}")
                    live.remove(w)
                    break
                samples[w.name].setdefault(str(request), []).append(out)
        log(f"  repeat {r + 1}/{repeats} done", flush=True)
    return samples, live


# ---- op-level profile -------------------------------------------------------------------------


def op_profile(step):
    """Wall time of one step() after warm-up and the TF op types that fill it (TF profiler trace):
    {"wall_ms": ms, "ops_ms": {op type: ms}}, largest first."""
    import glob
    import shutil
    from collections import Counter

    import tensorflow as tf  # set up by whoever built step
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    step()
    step()
    start = time.perf_counter()
    step()
    wall = time.perf_counter() - start
    logdir = tempfile.mkdtemp(prefix="tfbit_profile_")
    tf.profiler.experimental.start(logdir)
    step()
    tf.profiler.experimental.stop()
    space = xplane_pb2.XSpace()
    with open(glob.glob(os.path.join(logdir, "**", "*.xplane.pb"), recursive=True)[0], "rb") as f:
        space.ParseFromString(f.read())
    shutil.rmtree(logdir)
    ops = Counter()
    for plane in space.planes:
        for line in plane.lines:
            for event in line.events:
                name, _, op = plane.event_metadata[event.metadata_id].name.rpartition(":")
                op = op.strip()
                # Only kernels ("node:OpType"): skip the function / executor frames around them.
                if name and not op.startswith("__") and op not in ("Run", "Process"):
                    ops[op] += event.duration_ps / 1e9
    return {"wall_ms": wall * 1e3, "ops_ms": dict(ops.most_common())}


def report_profile(target, out):
    total = sum(out["ops_ms"].values())
    top = ", ".join(f"{op} {ms:.0f} ({100 * ms / total:.0f}%)" for op, ms in list(out["ops_ms"].items())[:8])
    return f"- {target}: {out['wall_ms']:.0f} ms wall, {total:.0f} ms in ops: {top}"


# ---- statistics and reports -------------------------------------------------------------------


def median(values):
    return float(np.median(values)) if len(values) else float("nan")


def table(header, rows):
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    fmt = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"
    return "\n".join([fmt(header), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows])


def versions():
    code = (
        "import json, platform, numpy, tensorflow as tf, keras, torch, transformers, timm, ai_edge_litert;"
        "from importlib.metadata import version;"
        "print('RESULT ' + json.dumps({'python': platform.python_version(), 'numpy': numpy.__version__,"
        "'tensorflow': tf.__version__, 'keras': keras.__version__, 'torch': torch.__version__,"
        "'transformers': transformers.__version__, 'timm': timm.__version__,"
        "'ai-edge-litert': version('ai-edge-litert')}))"
    )
    return run_child(["-c", code])


def header(script, detail):
    """The first lines of a benchmark's output: what ran, when, where, with which versions."""
    return (
        f"# {script}  {time.strftime('%Y-%m-%d %H:%M')}  CPU: {cpu_model()}, {os.cpu_count()} cores, "
        f"{detail}\n# {json.dumps(versions())}"
    )


def cpu_model():
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except Exception:  # noqa: BLE001  informational only
        return "unknown"


# ---- the previous GroupNorm, kept for before/after comparisons ---------------------------------


def previous_groupnorm_call(self, inputs):
    """`GroupNormActivation.call` before 2026-11-28: moments of a grouped (N, HW, G, C/G) view over
    the strided axes (1, 3). Replaced by per-channel moments + law of total variance (layers.py)."""
    from keras import ops

    channels = self.gamma.shape[0]
    grouped = ops.reshape(ops.cast(inputs, "float32"), (ops.shape(inputs)[0], -1, self.groups, channels // self.groups))
    mean, var = ops.moments(grouped, axes=(1, 3), keepdims=True)  # (N, 1, G, 1)
    scale = ops.reshape(ops.cast(self.gamma, "float32"), (1, 1, self.groups, -1)) * ops.rsqrt(var + self.epsilon)
    offset = ops.reshape(ops.cast(self.beta, "float32"), (1, 1, self.groups, -1)) - mean * scale
    scale = ops.cast(ops.reshape(scale, (-1, 1, 1, channels)), self.compute_dtype)
    offset = ops.cast(ops.reshape(offset, (-1, 1, 1, channels)), self.compute_dtype)
    return self.activation(inputs * scale + offset)


def whole_plane_groupnorm_call(self, inputs):
    """`GroupNormActivation.call` from 2026-11-28 to 2026-12-06: per-channel moments over all H*W
    pixels at once (one float32 sum of 3136 values at R50x1's stage 1), which lost accuracy
    against float64, in TFLite most. Replaced by sums over rows, then columns (layers.py)."""
    from keras import ops

    channels = self.gamma.shape[0]
    per_group = channels // self.groups
    h, w = inputs.shape[1:3]
    x = ops.reshape(ops.cast(inputs, "float32"), (-1, h * w, channels))
    channel_mean = ops.mean(x, axis=1, keepdims=True)
    channel_var = ops.mean((x - channel_mean) * (x - channel_mean), axis=1)
    channel_mean = ops.reshape(channel_mean, (-1, self.groups, per_group))
    mean = ops.mean(channel_mean, axis=-1, keepdims=True)
    var = ops.mean(ops.reshape(channel_var, (-1, self.groups, per_group)), axis=-1, keepdims=True) + ops.mean(
        (channel_mean - mean) * (channel_mean - mean), axis=-1, keepdims=True
    )
    scale = ops.reshape(self.gamma, (self.groups, per_group)) * ops.rsqrt(var + self.epsilon)
    offset = ops.reshape(self.beta, (self.groups, per_group)) - mean * scale
    return self.activation(
        inputs * ops.reshape(scale, (-1, 1, 1, channels)) + ops.reshape(offset, (-1, 1, 1, channels))
    )


def use_previous_groupnorm():
    import tfbit

    tfbit.GroupNormActivation.call = previous_groupnorm_call
