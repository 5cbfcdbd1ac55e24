"""Run every exported artifact on the same real images and compare it with the source.

Each artifact is reloaded from disk (what a user deploys is what is checked); its outputs are
compared with the reference (the PyTorch source when torch is installed, else the Keras model)
and the result is a row of the report: max |delta|, tolerance, top-1 agreement, accuracy when
labels are known, size on disk, single-image latency.
"""

import dataclasses
import os
import statistics
import time

import numpy as np

# max |delta| <= factor * max(1, max |reference|)
TOLERANCE = {"keras": 1e-4, "saved_model": 1e-4, "tflite_fp32": 1e-4, "tflite_fp16": 1e-2}
TOP1_TARGET = 0.99


@dataclasses.dataclass
class Row:
    artifact: str
    path: str
    size_bytes: int
    max_abs_diff: float
    tolerance: float | None
    top1_agreement: float | None
    accuracy: float | None
    latency_ms: float
    passed: bool
    note: str = ""


def disk_size(path):
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def _latency_ms(run, one, repeats=5):
    run(one)  # warm-up (tracing, delegate set-up)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run(one)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def _batched(run, inputs, batch):
    outs = [run(inputs[i:i + batch]) for i in range(0, len(inputs), batch)]
    return {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}


# -- runners: inputs -> {output name: numpy array} ------------------------------------------------
def keras_runner(path, jit_compile=False):
    import keras
    import tfbit
    model = tfbit.fold_weight_standardization(keras.saving.load_model(path))
    import tensorflow as tf
    call = tf.function(lambda x: model(x, training=False), jit_compile=jit_compile, autograph=False)

    def run(x):
        out = call(x)
        return {k: np.asarray(v) for k, v in out.items()} if isinstance(out, dict) else {"logits": np.asarray(out)}
    return run


def saved_model_runner(path, signature):
    import tensorflow as tf
    fn = tf.saved_model.load(path).signatures[signature]
    key = "image_bytes" if signature == "serving_default" else "pixel_values"
    return lambda x: {k: v.numpy() for k, v in fn(**{key: tf.constant(x)}).items()}


def tflite_runner(path, num_threads=None):
    from ai_edge_litert.interpreter import Interpreter
    from tfbit.runtime import available_cores
    interpreter = Interpreter(model_path=path, num_threads=num_threads or available_cores())
    runner = interpreter.get_signature_runner("serving_default")
    # One image per call: the signature has a dynamic batch, but mobile runtimes run batch 1.
    return lambda x: {k: np.concatenate([runner(pixel_values=x[i:i + 1])[k] for i in range(len(x))])
                      for k in runner.get_output_details()}


def compare(name, path, run, inputs, reference, labels=None, batch=16, tolerance_factor=None,
            note=""):
    """Run one artifact on `inputs` and compare each output with `reference` (same keys)."""
    outputs = _batched(run, inputs, batch)
    diffs, scale = [], 1.0
    for key, ref in reference.items():
        if key not in outputs:
            raise KeyError(f"{name} has no output {key!r} (has {sorted(outputs)})")
        diffs.append(float(np.abs(outputs[key].astype(np.float64) - ref).max()))
        scale = max(scale, float(np.abs(ref).max()))
    max_diff = max(diffs)
    top1 = accuracy = None
    if "logits" in reference:
        predicted = outputs["logits"].argmax(-1)
        top1 = float((predicted == reference["logits"].argmax(-1)).mean())
        if labels is not None:
            accuracy = float((predicted == labels).mean())
    tolerance = None if tolerance_factor is None else tolerance_factor * scale
    passed = (max_diff <= tolerance) if tolerance is not None else (top1 is None or top1 >= TOP1_TARGET)
    if tolerance is None and top1 is not None and top1 < TOP1_TARGET:
        note = (note + "; " if note else "") + f"top-1 agreement below the {TOP1_TARGET:.0%} target"
    return Row(name, path, disk_size(path), max_diff, tolerance, top1, accuracy,
               _latency_ms(run, inputs[:1]), passed, note)


def format_table(rows):
    header = ("artifact", "max |Δ|", "tolerance", "top-1 agree", "accuracy", "size", "latency", "ok")
    lines = [header]
    for r in rows:
        lines.append((
            r.artifact, f"{r.max_abs_diff:.2e}", "-" if r.tolerance is None else f"{r.tolerance:.1e}",
            "-" if r.top1_agreement is None else f"{r.top1_agreement:.2%}",
            "-" if r.accuracy is None else f"{r.accuracy:.2%}",
            f"{r.size_bytes / 2**20:.2f} MB", f"{r.latency_ms:.1f} ms", "yes" if r.passed else "NO"))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = ["  ".join(c.ljust(w) for c, w in zip(line, widths)) for line in lines]
    text.insert(1, "  ".join("-" * w for w in widths))
    notes = [f"  {r.artifact}: {r.note}" for r in rows if r.note]
    return "\n".join(text + (["notes:"] + notes if notes else []))
