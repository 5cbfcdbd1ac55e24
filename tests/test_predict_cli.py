"""`python -m conversion.predict` as typed, in fresh processes, on the digits demo exported to
.keras, SavedModel and TFLite fp32: files, folders and globs in batches, CSV/JSON-lines output,
bad images skipped by path, --evaluate's accuracy and confusion matrix, progress lines."""

import csv
import io
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conversion.digits import load_digits_split

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cli(*args, env=None):
    environment = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    return subprocess.run(
        [sys.executable, "-m", *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**environment, "HF_HUB_OFFLINE": "1", **(env or {})},
    )


def error_line(done):
    lines = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    return lines[0]


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """The demo's trained digits classifier in every format predict runs (one TFLite variant)."""
    output = tmp_path_factory.mktemp("export") / "digits"
    done = cli(
        "conversion.convert", "--output", output, "--formats", "keras", "saved_model", "tflite", "--tflite", "fp32"
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return output


@pytest.fixture(scope="module")
def heldout(tmp_path_factory):
    """30 held-out digits as root/<label>/<i>.png, and in a nested unlabelled folder."""
    root = tmp_path_factory.mktemp("heldout")
    _, _, x_test, y_test = load_digits_split()
    for i in range(30):
        (root / "labelled" / str(y_test[i])).mkdir(parents=True, exist_ok=True)
        Image.fromarray(x_test[i]).save(root / "labelled" / str(y_test[i]) / f"{i}.png")
    return root / "labelled", {str(root / "labelled" / str(y_test[i]) / f"{i}.png"): str(y_test[i]) for i in range(30)}


def read_csv(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_files_folders_and_globs_in_batches_to_csv(export, heldout, tmp_path):
    folder, truth = heldout
    one_file = sorted(truth)[0]
    # the second glob names the first folder's files again: each image is predicted once
    done = cli(
        "conversion.predict",
        export / "tflite/digits_fp32.tflite",
        folder / "3",
        str(folder / "7") + "/*.png",
        one_file,
        str(folder / "3") + "/*.png",
        "--batch-size",
        "4",
        "--top-k",
        "3",
        "--output",
        tmp_path / "preds.csv",
    )
    assert done.returncode == 0, done.stderr
    expected = [p for p in sorted(truth) if "/3/" in p] + [p for p in sorted(truth) if "/7/" in p] + [one_file]
    rows = read_csv(tmp_path / "preds.csv")
    assert [r["path"] for r in rows] == expected
    assert list(rows[0]) == ["path", "label_1", "score_1", "label_2", "score_2", "label_3", "score_3"]
    for row in rows:
        scores = [float(row[f"score_{i}"]) for i in (1, 2, 3)]
        assert scores == sorted(scores, reverse=True) and 0 < sum(scores) <= 1 + 1e-5
        assert {row[f"label_{i}"] for i in (1, 2, 3)} <= {str(d) for d in range(10)}
    assert sum(row["label_1"] == truth[row["path"]] for row in rows) >= len(rows) - 1  # a 98.6% model
    assert done.stdout.strip() == f"wrote {len(expected)} predictions to {tmp_path / 'preds.csv'}"


def test_every_artifact_writes_the_same_jsonl(export, heldout, tmp_path):
    """.keras and TFLite run the Python processor, the SavedModel decodes in its graph (within
    one uint8 level of it): the same top labels, scores equal to float32 parity or close."""
    folder, truth = heldout
    records = {}
    for name, artifact in [
        ("keras", export / "digits.keras"),
        ("tflite", export / "tflite/digits_fp32.tflite"),
        ("saved_model", export),
    ]:
        out = tmp_path / f"{name}.jsonl"
        done = cli("conversion.predict", artifact, folder, "--batch-size", "8", "--output", out)
        assert done.returncode == 0, done.stderr
        records[name] = [json.loads(line) for line in out.read_text().splitlines()]
        assert [r["path"] for r in records[name]] == sorted(truth)
        assert set(records[name][0]) == {"path", "labels", "scores"} and len(records[name][0]["labels"]) == 5
    for name in ("tflite", "saved_model"):
        assert [r["labels"][0] for r in records[name]] == [r["labels"][0] for r in records["keras"]], name
        np.testing.assert_allclose(
            [r["scores"] for r in records[name]],
            [r["scores"] for r in records["keras"]],
            atol=1e-4 if name == "tflite" else 2e-2,
            err_msg=name,
        )


def _with_bad_crc(png, chunk):
    """`png` with the CRC of its first `chunk` chunk wrong (a bit flipped on disk or in transit)."""
    pos = 8
    while png[pos + 4 : pos + 8] != chunk:
        pos += 12 + int.from_bytes(png[pos : pos + 4], "big")
    end = pos + 8 + int.from_bytes(png[pos : pos + 4], "big")
    return png[:end] + bytes([png[end] ^ 0xFF]) + png[end + 1 :]


def test_every_artifact_answers_the_same_about_a_damaged_png(export, tmp_path):
    """The SavedModel's decoder (libpng) refuses a PNG whose image data or end fails its CRC and
    drops a text chunk that does; PIL checks neither the same way. Every artifact must agree."""
    from PIL import Image, PngImagePlugin

    text = PngImagePlugin.PngInfo()
    text.add_text("Comment", "a damaged text chunk is dropped, not fatal")
    buffer = io.BytesIO()
    Image.open(os.path.join(ROOT, "conversion", "photos", "flower_dahlia.png")).save(buffer, "PNG", pnginfo=text)
    folder = tmp_path / "damaged"
    folder.mkdir()
    for chunk in ("tEXt", "IDAT", "IEND"):
        (folder / f"bad_{chunk}.png").write_bytes(_with_bad_crc(buffer.getvalue(), chunk.encode()))
    answers = {}
    for artifact in ("digits.keras", "tflite/digits_fp32.tflite", "serving/1"):
        done = cli("conversion.predict", export / artifact, folder, "--top-k", "1")
        assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
        skipped = [line for line in done.stderr.splitlines() if line.startswith("skipped: ")]
        answers[artifact] = (done.stdout.split()[0], [line.split(": ")[1].split()[2] for line in skipped])
        assert all(": could not decode image: " in line for line in skipped), skipped
    expected = (str(folder / "bad_tEXt.png"), [str(folder / f"bad_{chunk}.png") for chunk in ("IDAT", "IEND")])
    assert all(answer == expected for answer in answers.values()), answers


@pytest.mark.parametrize("artifact", ["digits.keras", "serving/1"])
def test_bad_images_are_skipped_by_path_and_the_rest_predicted(artifact, export, heldout, tmp_path):
    """A SavedModel batch holding an undecodable image is rerun image by image: only it is lost."""
    _, truth = heldout
    folder = tmp_path / "mixed"
    folder.mkdir()
    good = sorted(truth)[:5]
    for path in good:
        (folder / os.path.basename(path)).write_bytes(open(path, "rb").read())
    (folder / "garbage.png").write_bytes(b"not an image at all")
    encoded = io.BytesIO()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(encoded, "JPEG")
    (folder / "truncated.jpg").write_bytes(encoded.getvalue()[:200])
    done = cli(
        "conversion.predict",
        export / artifact,
        folder,
        str(tmp_path / "missing.png"),
        "--batch-size",
        "8",
        "--output",
        tmp_path / "preds.jsonl",
    )
    assert done.returncode == 1, done.stderr
    skipped = [line for line in done.stderr.splitlines() if line.startswith("skipped: ")]
    assert len(skipped) == 3, done.stderr
    assert f"cannot read {folder / 'garbage.png'} as an image" in done.stderr
    assert f"cannot read {folder / 'truncated.jpg'} as an image" in done.stderr
    assert f"image file not found: {tmp_path / 'missing.png'}" in done.stderr
    predicted = [json.loads(line)["path"] for line in (tmp_path / "preds.jsonl").read_text().splitlines()]
    assert predicted == sorted(str(folder / os.path.basename(p)) for p in good)


def test_evaluate_prints_accuracy_and_writes_a_confusion_matrix(export, heldout, tmp_path):
    folder, truth = heldout
    png = tmp_path / "cm.png"
    done = cli(
        "conversion.predict",
        export / "tflite/digits_fp32.tflite",
        folder,
        "--evaluate",
        "--confusion-matrix",
        png,
        "--output",
        tmp_path / "preds.csv",
    )
    assert done.returncode == 0 and done.stderr == "", done.stderr  # one batch: no progress line
    rows = read_csv(tmp_path / "preds.csv")
    assert {r["path"]: r["true_label"] for r in rows} == truth
    correct = sum(r["label_1"] == r["true_label"] for r in rows)
    assert correct >= 28  # the model's held-out accuracy is 98.6%
    assert f"accuracy: {correct / 30:.2%} ({correct}/30 images); confusion matrix: {png}" in done.stdout
    with Image.open(png) as image:
        assert image.format == "PNG" and min(image.size) >= 300


def test_evaluate_refuses_folders_that_are_not_labels(export, tmp_path):
    (tmp_path / "data" / "cat").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "data" / "cat" / "a.png")
    done = cli("conversion.predict", export, tmp_path / "data", "--evaluate")
    assert done.returncode == 2
    assert f"folder(s) {tmp_path / 'data' / 'cat'} are not labels of the model (its labels: 0, 1, 2" in error_line(done)
    done = cli("conversion.predict", export, tmp_path / "data" / "cat" / "a.png", "--evaluate")
    assert done.returncode == 2
    assert "--evaluate needs labelled folders (root/<label>/...)" in error_line(done)


def test_output_paths_are_checked_before_the_model_loads(export, heldout, tmp_path):
    folder, _ = heldout
    done = cli("conversion.predict", export, folder, "--output", tmp_path / "preds.txt")
    assert done.returncode == 2 and "--output" in error_line(done) and "name a .csv or .jsonl file" in error_line(done)
    done = cli("conversion.predict", export, folder, "--output", tmp_path / "nowhere" / "p.csv")
    assert done.returncode == 2 and f"the folder {tmp_path / 'nowhere'} does not exist" in error_line(done)
    assert not list(tmp_path.glob("**/*.partial-*"))


def test_progress_is_plain_lines_in_a_log(export, heldout):
    """stderr is a pipe here: progress is whole lines, no carriage returns."""
    folder, _ = heldout
    done = cli("conversion.predict", export / "tflite/digits_fp32.tflite", folder, "--batch-size", "4")
    assert done.returncode == 0, done.stderr
    assert "\r" not in done.stderr and "\x1b[" not in done.stderr
    assert re.fullmatch(r"(images: \d+/30 \(\d+\.\d/s\)\n)*images: 30/30 \(\d+\.\d/s\)\n", done.stderr), done.stderr


def test_progress_rewrites_one_line_on_a_terminal():
    from conversion.cli import Progress

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    stream = Terminal()
    progress = Progress(10, "images", stream=stream)
    for done in (4, 8, 10):
        progress.update(done)
    text = stream.getvalue()
    assert text.startswith("\rimages: 4/10 (") and "\rimages: 10/10 (" in text and text.endswith("/s)\n")
    assert text.count("\r") == 3 and text.count("\n") == 1
