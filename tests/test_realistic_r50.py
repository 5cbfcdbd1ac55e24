"""The full-size path: a full-size R50x1 whose head tells the shipped photos apart (see
benchmarks/realistic_model.py), converted with the default command as a user types it. Every
lossless artifact and the all-integer full int8 file (the mobile model) must be published; the
other lossy variants' agreement is recorded."""

import json
import os
import subprocess
import sys

from conversion.tflite_graph import float_ops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_full_size_r50x1_converts_with_the_default_command(tmp_path, torch_module):
    from benchmarks.realistic_model import realistic_checkpoint

    source = realistic_checkpoint(log=lambda m: None)
    output = tmp_path / "realistic"
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "conversion.convert", source, "--output", str(output)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert done.returncode in (0, 1), done.stdout + done.stderr
    report = json.loads((output / "report.json").read_text())
    rows = {row["artifact"]: row for row in report["artifacts"]}
    assert report["images"] == "32 shipped photos" and report["reference"] == "pytorch"
    for name in ("keras", "saved_model[pixel_values]", "saved_model[image_bytes]", "tflite_fp32", "tflite_int8"):
        assert rows[name]["passed"] and rows[name]["published"], rows[name]
        assert (output / rows[name]["path"]).exists()
    for name, row in rows.items():
        print(
            f"REALISTIC {name}: top-1 {row['top1_agreement']}, max |delta| {row['max_abs_diff']:.3g} "
            f"(tolerance {row['tolerance']:.3g}), passed {row['passed']}"
        )
        assert (output / row["path"]).exists() == row["published"]
    assert report["passed"] == (done.returncode == 0)
    with open(output / rows["tflite_int8"]["path"], "rb") as f:
        assert float_ops(f.read()) == []
