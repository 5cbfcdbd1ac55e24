"""A corpus of bad inputs (issue 25): each command line as a user types it, in a fresh process
in a folder of its own, must answer in one line with its documented exit code (docs/conversion.md,
docs/scaling.md): no traceback, the first line of stderr naming the file or argument, and
nothing written where it failed. The cases run two at a time (each process spends ~6 s
importing TensorFlow); each test reads its own case's outcome.
"""

import concurrent.futures
import csv
import json
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHECKPOINT = os.path.join(ROOT, "conversion", "default_checkpoint")
PHOTO = os.path.join(ROOT, "conversion", "photos", "coffee.jpg")
CAFE = b"caf\xe9"  # Latin-1 bytes: not UTF-8, yet a valid Linux file name


def checkpoint(folder, name="ckpt", **changes):
    """A copy of the embedded checkpoint, with `changes` {file: {key: value}} to its JSON files."""
    target = os.path.join(os.fsencode(folder), os.fsencode(name))
    shutil.copytree(os.fsencode(CHECKPOINT), target)
    for file, values in changes.items():
        path = os.path.join(target, os.fsencode(file))
        with open(path) as f:
            data = json.load(f)
        with open(path, "w") as f:
            json.dump({**data, **values}, f)


def images(folder, *names):
    os.makedirs(folder, exist_ok=True)
    for name in names:
        shutil.copy(PHOTO, os.path.join(os.fsencode(folder), os.fsencode(name)))


def damaged_export(folder, export):
    shutil.copytree(export, os.path.join(folder, "export"))
    pb = os.path.join(folder, "export", "serving", "1", "saved_model.pb")
    with open(pb, "r+b") as f:
        f.truncate(300)


def symlink_loop(folder, *classes):
    """Image folders, one per class, the first holding a link to itself named like an image."""
    for name in classes:
        images(os.path.join(folder, name), "a.jpg", "b.jpg")
    os.symlink("l.jpg", os.path.join(folder, classes[0], "l.jpg"))


def write(folder, name, data):
    with open(os.path.join(folder, name), "wb") as f:
        f.write(data)


# (command line after `python -m conversion.`, set-up of the case folder, exit code, what the
# first line of stderr says); "{export}" is the module's tiny export, "{cwd}" the case folder
CASES = [
    pytest.param(
        "convert ckpt --output out --formats keras",
        lambda cwd, export: checkpoint(cwd, **{"config.json": {"label2id": [0, 1]}}),
        2,
        "error: ckpt/config.json: BitConfig.label2id must be a dict of label: class id, got a list",
        id="convert-label2id-list",
    ),
    pytest.param(
        "convert ckpt --output out --formats keras",
        lambda cwd, export: checkpoint(cwd, **{"preprocessor_config.json": {"size": "big"}}),
        2,
        "error: ckpt/preprocessor_config.json: size must be an int, (height, width) or a dict",
        id="convert-preprocessor-size-text",
    ),
    pytest.param(
        "convert ckpt --output out --formats keras",
        lambda cwd, export: checkpoint(cwd, **{"preprocessor_config.json": {"image_mean": "0.5"}}),
        2,
        "error: ckpt/preprocessor_config.json: image_mean must be a number or 3 numbers (one per RGB channel), "
        "got '0.5'",
        id="convert-preprocessor-mean-text",
    ),
    pytest.param(
        "predict model.keras photo.jpg --preprocessor bad.json",
        lambda cwd, export: (
            shutil.copy(os.path.join(export, "digits.keras"), os.path.join(cwd, "model.keras")),
            images(cwd, "photo.jpg"),
            write(cwd, "bad.json", b'{"crop_size": [32, "32"]}'),
        ),
        2,
        "error: bad.json: crop_size must hold positive whole numbers of pixels, got '32'",
        id="predict-preprocessor-crop-text",
    ),
    pytest.param(
        "predict export photo.jpg --output preds.csv",
        lambda cwd, export: (damaged_export(cwd, export), images(cwd, "photo.jpg")),
        2,
        "error: export/serving/1/saved_model.pb is damaged, not a SavedModel graph",
        id="predict-damaged-saved-model",
    ),
    pytest.param(
        "batch_predict export photo.jpg --output preds/p",
        lambda cwd, export: (damaged_export(cwd, export), images(cwd, "photo.jpg")),
        2,
        "error: export/serving/1/saved_model.pb is damaged, not a SavedModel graph",
        id="batch-predict-damaged-saved-model",
    ),
    pytest.param(
        "neighbours features.tfrecord",
        lambda cwd, export: write(cwd, "features.tfrecord", b"not a TFRecord file at all"),
        2,
        "error: features.tfrecord is damaged, not a file of tf.train.Example records: corrupted record at 0",
        id="neighbours-damaged-tfrecord",
    ),
    pytest.param(
        "neighbours features.jsonl",
        lambda cwd, export: write(cwd, "features.jsonl", b'{"path": "a.jpg", "features": [1, 0]}\n[1, 0]\n'),
        2,
        "error: features.jsonl line 2 holds a JSON list, expected a record object",
        id="neighbours-jsonl-list",
    ),
    pytest.param(
        "neighbours features.jsonl",
        lambda cwd, export: write(cwd, "features.jsonl", b'{"path": "a.jpg", "features": [1, 0]}\n{"path": \n'),
        2,
        "error: features.jsonl line 2 is not a JSON record: Expecting value (column 10)",
        id="neighbours-jsonl-broken-line",
    ),
    pytest.param(
        "batch_predict {export} photos/* --output preds/p",
        lambda cwd, export: images(os.path.join(cwd, "photos"), CAFE + b".jpg"),
        2,
        "error: INPUT_GLOB photos/* matches photos/caf\\xe9.jpg, whose name is not UTF-8 text",
        id="batch-predict-non-utf8-name",
    ),
    pytest.param(
        "batch_predict {export} photo.jpg --output afile.txt/preds",
        lambda cwd, export: (images(cwd, "photo.jpg"), write(cwd, "afile.txt", b"mine\n")),
        2,
        "error: --output afile.txt/preds: {cwd}/afile.txt is a file, not a folder",
        id="batch-predict-output-below-a-file",
    ),
    pytest.param(
        "batch_predict {export} photos/l.jpg --output preds/p",
        lambda cwd, export: symlink_loop(os.path.join(cwd, "photos"), "."),
        2,
        "error: no images matched the INPUT_GLOB photos/l.jpg",
        id="batch-predict-symlink-loop",
    ),
    pytest.param(
        "predict {export} photos",
        lambda cwd, export: symlink_loop(os.path.join(cwd, "photos"), "."),
        1,
        "skipped: cannot read photos/l.jpg: Too many levels of symbolic links",
        id="predict-symlink-loop",
    ),
    pytest.param(
        "finetune " + CHECKPOINT + " --data photos --output run --steps 1 --batch-size 2",
        lambda cwd, export: symlink_loop(os.path.join(cwd, "photos"), "cat", "dog"),
        2,
        "error: cannot read image file 'photos/cat/l.jpg': Too many levels of symbolic links",
        id="finetune-symlink-loop",
    ),
]


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """A tiny export (SavedModel and .keras) of the embedded digits checkpoint."""
    root = tmp_path_factory.mktemp("bad-inputs") / "export"
    done = run(["convert", "--output", str(root), "--formats", "saved_model", "keras"], root.parent)
    assert done.returncode == 0, done.stderr
    return str(root)


def run(argv, cwd):
    # as a user's shell has it: without the log level conftest sets, so TensorFlow's own lines
    # are hidden by the command line, as they must be for its message to come first
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TF_CPP_MIN_LOG_LEVEL")}
    env.update(HF_HUB_OFFLINE="1")
    argv = [os.fsencode(a) for a in argv]
    return subprocess.run(
        [sys.executable, "-m", b"conversion." + argv[0], *argv[1:]],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        errors="backslashreplace",
        timeout=600,
    )


def tree(folder):
    """{relative path: bytes or "->target"} of everything below `folder`."""
    found = {}
    for path, folders, files in os.walk(os.fsencode(folder)):
        for name in files + [f for f in folders if os.path.islink(os.path.join(path, f))]:
            full = os.path.join(path, name)
            relative = os.path.relpath(full, os.fsencode(folder))
            if os.path.islink(full):
                found[relative] = b"->" + os.readlink(full)
            else:
                with open(full, "rb") as f:
                    found[relative] = f.read()
    return found


@pytest.fixture(scope="module")
def outcomes(export, tmp_path_factory):
    """{case id: (the finished process, the case folder before, after)}, the cases run two at a time."""

    def case(param):
        command, setup, _, _ = param.values
        cwd = str(tmp_path_factory.mktemp(param.id))
        setup(cwd, export)
        before = tree(cwd)
        argv = [a.replace("{export}", export) for a in command.split()]
        done = run(argv, cwd)
        return done, cwd, before, tree(cwd)

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        futures = {param.id: pool.submit(case, param) for param in CASES}
        return {name: future.result() for name, future in futures.items()}


@pytest.mark.parametrize("command, setup, code, message", CASES)
def test_one_line_and_the_documented_exit_code(command, setup, code, message, outcomes, request):
    done, cwd, before, after = outcomes[request.node.callspec.id]
    assert "Traceback" not in done.stderr, done.stderr
    assert done.returncode == code, done.stderr
    assert done.stderr.splitlines()[0].startswith(message.replace("{cwd}", cwd)), done.stderr
    if code == 2:  # refused: nothing written, nothing left behind
        assert after == before


def test_predict_writes_names_that_are_not_utf8_recoverably(export, tmp_path):
    """A CSV holds such a name as its own bytes, JSON lines as Python's surrogate escapes: both
    give the file back through os.fsencode."""
    images(tmp_path / "photos", CAFE + b".jpg")
    for output in ("preds.csv", "preds.jsonl"):
        done = run(["predict", export, "photos", "--output", output], tmp_path)
        assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    with open(tmp_path / "preds.csv", encoding="utf-8", errors="surrogateescape", newline="") as f:
        (row,) = list(csv.DictReader(f))
    (record,) = [json.loads(line) for line in (tmp_path / "preds.jsonl").read_text().splitlines()]
    for written in (row["path"], record["path"]):
        assert os.fsencode(written) == b"photos/" + CAFE + b".jpg"
        assert os.path.isfile(os.path.join(os.fsencode(tmp_path), os.fsencode(written)))


def test_convert_takes_a_checkpoint_folder_whose_name_is_not_utf8(tmp_path):
    """The transformers reference reads it through a UTF-8 named link; the artifact names keep
    the name's UTF-8 part."""
    checkpoint(tmp_path, CAFE)
    done = run(["convert", os.fsdecode(CAFE), "--output", "out", "--formats", "keras", "--num-images", "4"], tmp_path)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    assert json.loads((tmp_path / "out" / "report.json").read_text())["passed"]
    assert (tmp_path / "out" / "caf_.keras").is_file()
