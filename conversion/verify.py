"""Run every exported artifact on the same real images and compare it with the reference.

Each artifact is reloaded from disk (what a user deploys is what is checked) and compared with
the reference (the PyTorch source when torch is installed, else the Keras model). Criteria:

* Lossless artifacts (`.keras`, the SavedModel on pixel values, TFLite fp32) compute the same
  function in float32: max |Δ| <= 1e-4 * max(1, max |reference|), the parity contract, for each
  output on its own scale (a backbone's stage maps differ in magnitude). Float32 itself allows
  less as the network gets deeper: measured against float64 on a random-weight R50x1 backbone
  (32 photos), PyTorch's float32 error grows from 1.4e-6 x max |reference| at stage1 to 3.0e-5
  at stage4, and tfbit's TFLite fp32 file matches it (3.3e-5 at stage4). So the contract leaves
  a 3x margin at the deepest output for summation-order noise, and anything larger is a
  difference in what is computed, not rounding.
* Lossy ones (TFLite fp16, dynamic-range and full int8) and the SavedModel on encoded images
  (in-graph decoding, by TensorFlow's image decoders rather than Pillow's) cannot be held to
  that. They pass when
  - their error is small against the outputs' own scale: max |Δ| <= factor * spread, where
    spread is the reference output's mean per-image range (max - min), for logits, pooled
    features and each backbone stage alike, so the bound means the same for a 10-class digits
    head and a 21843-class one, and for outputs of any magnitude;
  - top-1 agreement is consistent with a true agreement of 99%: with n images the observed
    number of agreements must not be significantly low (one-sided binomial test at 5%). With 32
    images one disagreement passes and two fail; with 100 images three pass. A fixed
    percentage would fail a good variant on a small sample and pass a bad one on a large one;
* A classifier file that outputs probabilities (`--tflite-input uint8`: softmax, or sigmoid for
  a multi-label head) is compared with the reference's logits put through the same function,
  under the logits' tolerance times the function's Lipschitz bound, so the criterion is the
  logits' one, neither looser nor tighter: softmax moves p_i by p_i (dz_i - sum_j p_j dz_j),
  at most p_i (1 - p_i) (max dz - min dz) <= max |dz| / 2; sigmoid's slope is at most 1/4.
  Top-1 is the argmax of either, the same class.
  Where labels are known each artifact's accuracy is reported beside the reference's; it can
  only drop by as many images as disagree, so the agreement test bounds its change too.
"""

import dataclasses
import math
import os
import statistics
import time
import typing

import numpy as np

LOSSLESS_FACTOR = 1e-4
# max |Δ| / spread allowed per lossy artifact, 1.2-3x what a full-size R50x1 with a head fitted
# to the shipped photos measured (image bytes 0.038, fp16 0.006, dynamic int8 0.16, full int8
# 0.42, all with 32/32 top-1 agreement; benchmarks/realistic_model.py): loose enough for each
# quantization's inherent error, tight enough that a file whose errors approach the outputs' own
# range is refused. Top-1 agreement is the stricter test for classifiers. A `.keras` file is
# lossy only when its model computes in float16/bfloat16 (a mixed-precision fine-tune): the
# trained digits model measured 0.005 (mixed_bfloat16) and 0.0007 (mixed_float16).
LOSSY_FACTOR = {
    "keras": 0.05,
    "saved_model[image_bytes]": 0.1,
    "tflite_fp16": 0.02,
    "tflite_dynamic_int8": 0.3,
    "tflite_int8": 0.5,
}
BATCH = 16  # images per call of an artifact's runner (a TFLite runner runs them one at a time)
TARGET_AGREEMENT = 0.99
SIGNIFICANCE = 0.05


@dataclasses.dataclass
class Row:
    artifact: str
    path: str
    size_bytes: int
    max_abs_diff: float
    tolerance: float
    criterion: str
    top1_agreement: float | None
    accuracy: float | None
    reference_accuracy: float | None
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
    outs = [run(inputs[i : i + batch]) for i in range(0, len(inputs), batch)]
    return {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}


def agreement_is_plausible(agree, n, target=TARGET_AGREEMENT, significance=SIGNIFICANCE):
    """False when `agree` of `n` is significantly below `target` (one-sided binomial test)."""
    p_low = sum(math.comb(n, k) * target**k * (1 - target) ** (n - k) for k in range(agree + 1))
    return p_low >= significance


def lossy_factor(name):
    """`LOSSY_FACTOR` of an artifact; a TFLite file taking raw uint8 pixels (`tflite_int8[uint8]`)
    has its quantization's: its in-graph normalization is the processor's float32 arithmetic
    (full int8 quantizes it with the rest of the graph)."""
    return LOSSY_FACTOR[name.removesuffix("[uint8]")]


def spread(output):
    """An output's own scale: its per-image range (max - min), averaged over the images."""
    flat = np.asarray(output, np.float64).reshape(len(output), -1)
    return float(np.mean(flat.max(-1) - flat.min(-1)))


def _softmax(logits):
    exp = np.exp(logits - logits.max(-1, keepdims=True))
    return exp / exp.sum(-1, keepdims=True)


def _sigmoid(logits):
    return 1 / (1 + np.exp(-logits))


# logits -> probabilities, and the most a logit error of e moves a probability (module docstring)
ACTIVATIONS = {"softmax": (_softmax, 0.5), "sigmoid": (_sigmoid, 0.25)}


class Rule(typing.NamedTuple):
    """How an artifact is judged: {output: max |Δ| allowed}, the criterion's name, lossless."""

    tolerances: dict
    criterion: str
    lossless: bool


def _rule(name, reference, lossless):
    if lossless:  # each output on its own scale
        tolerances = {k: LOSSLESS_FACTOR * max(1.0, float(np.abs(ref).max())) for k, ref in reference.items()}
        return Rule(tolerances, "parity", True)
    factor = lossy_factor(name)  # each output (a backbone has several) against its own spread
    return Rule({k: factor * spread(ref) for k, ref in reference.items()}, f"{factor:g} x spread", False)


def as_probabilities(reference, tolerances, activation):
    """The reference logits and their tolerance as probabilities by `activation` (a key of
    `ACTIVATIONS`): the logits' criterion carried through the function (module docstring)."""
    function, bound = ACTIVATIONS[activation]
    logits = np.asarray(reference["logits"], np.float64)
    return {"probabilities": function(logits)}, {"probabilities": bound * tolerances["logits"]}


def compare(name, path, run, inputs, reference, labels=None, *, lossless, batch=BATCH):
    """Run one artifact on `inputs` and judge it against `reference` (same output keys).

    Args:
        name: the artifact's report name; lossy ones use `LOSSY_FACTOR[name]`.
        run: `inputs -> {output: array}` (see `conversion.runners`).
        labels: true classes of the images, when known.
        lossless: hold the artifact to the parity contract instead of the lossy criteria.
    """
    outputs = _batched(run, inputs, batch)
    return _judge(name, path, run, inputs, outputs, reference, labels, _rule(name, reference, lossless))


def compare_probabilities(name, path, run, inputs, reference, labels=None, *, lossless, activation):
    """`compare` for an artifact that outputs `probabilities`, `activation` ("softmax" or
    "sigmoid") of the logits the reference holds, judged by the logits' criterion carried
    through it (module docstring)."""
    rule = _rule(name, reference, lossless)
    reference, tolerances = as_probabilities(reference, rule.tolerances, activation)
    rule = Rule(tolerances, f"{rule.criterion} through {activation}", lossless)
    return _judge(name, path, run, inputs, _batched(run, inputs, BATCH), reference, labels, rule)


def _judge(name, path, run, inputs, outputs, reference, labels, rule):
    """The report row of an artifact whose `outputs` on `inputs` are judged by `rule`."""
    missing = sorted(set(reference) - set(outputs))
    if missing:
        raise KeyError(f"{name} has no output {missing[0]!r} (has {sorted(outputs)})")
    diffs = {k: float(np.abs(outputs[k].astype(np.float64) - ref).max()) for k, ref in reference.items()}
    tolerances = rule.tolerances
    worst = max(reference, key=lambda k: diffs[k] / tolerances[k] if tolerances[k] else np.inf)
    max_diff, tolerance = diffs[worst], tolerances[worst]
    where = f" in {worst}" if len(reference) > 1 else ""
    failures = (
        [] if max_diff <= tolerance else [f"max |Δ| {max_diff:.3g}{where} above {tolerance:.3g} ({rule.criterion})"]
    )
    top1 = accuracy = reference_accuracy = None
    scores = next((k for k in ("logits", "probabilities") if k in reference), None)
    if scores:
        predicted, expected = outputs[scores].argmax(-1), reference[scores].argmax(-1)
        agree, n = int((predicted == expected).sum()), len(expected)
        top1 = agree / n
        if not rule.lossless and not agreement_is_plausible(agree, n):
            failures.append(f"top-1 agreement {agree}/{n} is significantly below {TARGET_AGREEMENT:.0%}")
        if labels is not None:
            accuracy = float((predicted == labels).mean())
            reference_accuracy = float((expected == labels).mean())
    return Row(
        name,
        path,
        disk_size(path),
        max_diff,
        tolerance,
        rule.criterion,
        top1,
        accuracy,
        reference_accuracy,
        _latency_ms(run, inputs[:1]),
        not failures,
        "; ".join(failures),
    )


def format_table(rows):
    header = ("artifact", "max |Δ|", "tolerance", "top-1 agree", "accuracy", "size", "latency", "ok")
    lines = [header]
    for r in rows:
        lines.append(
            (
                r.artifact,
                f"{r.max_abs_diff:.2e}",
                f"{r.tolerance:.1e}",
                "-" if r.top1_agreement is None else f"{r.top1_agreement:.2%}",
                "-" if r.accuracy is None else f"{r.accuracy:.2%}",
                f"{r.size_bytes / 2**20:.2f} MB",
                f"{r.latency_ms:.1f} ms",
                "yes" if r.passed else "NO",
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = ["  ".join(c.ljust(w) for c, w in zip(line, widths)) for line in lines]
    text.insert(1, "  ".join("-" * w for w in widths))
    notes = [f"  {r.artifact}: {r.note}" for r in rows if r.note]
    return "\n".join(text + (["notes:"] + notes if notes else []))
