"""The verification criteria on outputs built to sit on either side of each bound."""

import numpy as np
import pytest

from conversion import verify


def test_top1_agreement_is_judged_with_the_sample_size_in_mind():
    assert verify.agreement_is_plausible(32, 32) and verify.agreement_is_plausible(31, 32)
    assert not verify.agreement_is_plausible(30, 32)
    assert verify.agreement_is_plausible(97, 100) and not verify.agreement_is_plausible(96, 100)
    assert verify.agreement_is_plausible(1, 1) and not verify.agreement_is_plausible(0, 1)


def _reference(n=32, classes=10, seed=0):
    """Logits with a clear winner per image (margin >= 4), as a trained head gives."""
    rng = np.random.RandomState(seed)
    logits = rng.randn(n, classes)
    logits[np.arange(n), rng.randint(0, classes, n)] += 6
    return {"logits": logits.astype(np.float32)}


def _compare(name, outputs, reference, lossless, labels=None, tmp_path=None):
    batches = iter(range(0, len(reference["logits"]), 16))

    def run(x):
        start = next(batches, 0)
        return {k: v[start : start + len(x)] for k, v in outputs.items()}

    return verify.compare(
        name,
        str(tmp_path),
        run,
        np.zeros((len(reference["logits"]), 1)),
        reference,
        labels,
        lossless=lossless,
        batch=16,
    )


def test_lossless_artifacts_are_held_to_the_parity_contract(tmp_path):
    reference = _reference()
    scale = float(np.abs(reference["logits"]).max())
    close = {"logits": reference["logits"] + 0.9e-4 * scale}
    far = {"logits": reference["logits"] + 1.1e-4 * scale}
    assert _compare("keras", close, reference, True, tmp_path=tmp_path).passed
    row = _compare("keras", far, reference, True, tmp_path=tmp_path)
    assert not row.passed and row.criterion == "parity" and "max |Δ|" in row.note


def test_lossy_error_is_measured_against_the_logits_spread(tmp_path):
    reference = _reference()
    spread = verify.spread(reference["logits"])
    assert spread == pytest.approx(np.mean(reference["logits"].max(-1) - reference["logits"].min(-1)))
    noise = np.random.RandomState(1).uniform(-1, 1, reference["logits"].shape).astype(np.float32)
    small = {"logits": reference["logits"] + 0.1 * spread * noise * 0.5}
    # an error of ~5% of the spread flips no confident prediction: dynamic int8 (0.3) passes
    row = _compare("tflite_dynamic_int8", small, reference, False, tmp_path=tmp_path)
    assert row.passed, row.note
    big = {"logits": reference["logits"] + 0.4 * spread * np.sign(noise)}
    row = _compare("tflite_dynamic_int8", big, reference, False, tmp_path=tmp_path)
    assert not row.passed and "x spread" in row.note


def _near_ties(reference, count):
    """Make the first `count` images near-ties (top-2 0.1 below top-1), where a small error flips."""
    logits = reference["logits"]
    order = np.argsort(-logits, -1)
    for i in range(count):
        logits[i, order[i, 1]] = logits[i, order[i, 0]] - 0.1
    return reference


def test_lossy_top1_flips_fail_beyond_the_allowance(tmp_path):
    reference = _near_ties(_reference(), 3)
    flipped = reference["logits"].copy()
    order = np.argsort(-flipped, -1)
    for i in range(2):  # swap top-1 and top-2 of two images; the error stays small elsewhere
        a, b = order[i, 0], order[i, 1]
        flipped[i, a], flipped[i, b] = flipped[i, b], flipped[i, a]
    one = reference["logits"].copy()
    one[0] = flipped[0]
    assert _compare("tflite_int8", {"logits": one}, reference, False, tmp_path=tmp_path).passed
    row = _compare("tflite_int8", {"logits": flipped}, reference, False, tmp_path=tmp_path)
    assert not row.passed and "top-1 agreement 30/32 is significantly below 99%" in row.note


def test_accuracy_is_reported_where_labels_are_known(tmp_path):
    reference = _near_ties(_reference(), 3)
    labels = reference["logits"].argmax(-1)
    worse = reference["logits"].copy()
    order = np.argsort(-worse, -1)
    for i in range(3):
        a, b = order[i, 0], order[i, 1]
        worse[i, a], worse[i, b] = worse[i, b], worse[i, a]
    row = _compare("tflite_int8", {"logits": worse}, reference, False, labels=labels, tmp_path=tmp_path)
    assert not row.passed and "top-1 agreement 29/32" in row.note
    assert row.accuracy == pytest.approx(29 / 32) and row.reference_accuracy == 1.0


def test_missing_output_is_named(tmp_path):
    reference = _reference()
    with pytest.raises(KeyError, match="tflite_fp16 has no output 'logits'"):
        _compare("tflite_fp16", {"features": reference["logits"]}, reference, False, tmp_path=tmp_path)


def test_each_output_is_judged_against_its_own_spread(tmp_path):
    """A backbone's early stage has a small range, its last a large one: an error that is
    large for the first must fail even though it is small against the second."""
    rng = np.random.RandomState(0)
    reference = {"stage1": rng.uniform(0, 1, (4, 8, 8, 2)), "stage4": rng.uniform(0, 100, (4, 2, 2, 2))}
    run = lambda x: {"stage1": reference["stage1"] + 0.05, "stage4": reference["stage4"]}
    ok = verify.compare(
        "tflite_fp16",
        str(tmp_path),
        lambda x: {"stage1": reference["stage1"] + 0.01, "stage4": reference["stage4"]},
        np.zeros((4, 1)),
        reference,
        lossless=False,
    )
    assert ok.passed and ok.top1_agreement is None
    row = verify.compare("tflite_fp16", str(tmp_path), run, np.zeros((4, 1)), reference, lossless=False)
    assert not row.passed and "in stage1" in row.note
