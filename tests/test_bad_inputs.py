"""A corpus of bad inputs (issue 25): each command line as a user types it, in a fresh process
in a folder of its own, must answer in one line with its documented exit code (docs/conversion.md,
docs/scaling.md): no traceback, the first line of stderr naming the file or argument, and
nothing written where it failed.

Two parts: CASES, written by hand, pin exact messages; the generated corpus builds damaged
images, checkpoints, exports and record files (DAMAGED) and runs every command line that takes
that kind of input (SLOTS) on each. The processes run two at a time (each spends ~5 s importing
TensorFlow); each test reads its own case's outcome.
"""

import concurrent.futures
import csv
import glob
import io
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
        "batch_predict {export} photos/* --output preds/p --format parquet",
        lambda cwd, export: images(os.path.join(cwd, "photos"), CAFE + b".jpg"),
        2,
        "error: INPUT_GLOB photos/* matches photos/caf\\xe9.jpg, whose name is not UTF-8 text, which a "
        "Parquet string column cannot hold",
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
]


# -- the generated corpus ------------------------------------------------------------------------


def _put(path, data):
    with open(path, "wb") as f:
        f.write(data)


def _photo_head():
    with open(PHOTO, "rb") as f:
        data = f.read()
    return data[: len(data) // 3]


def _png_with_bad_crc():
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(buffer, "PNG")
    data = bytearray(buffer.getvalue())
    data[data.index(b"IDAT") + 4] ^= 0xFF  # the first data byte: the chunk's CRC no longer matches
    return bytes(data)


def _checkpoint_with(change):
    def build(path, export):
        shutil.copytree(CHECKPOINT, path)
        change(path)

    return build


def _file(name, data):
    return _checkpoint_with(lambda path: _put(os.path.join(path, name), data))


def _cut(name):
    def cut(path):
        with open(os.path.join(path, name), "rb") as f:
            data = f.read()
        _put(os.path.join(path, name), data[: len(data) // 2])

    return cut


def _wider(path):
    """The same stages at twice the width: every weight has another shape than the file's."""
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    config["hidden_sizes"] = [2 * width for width in config["hidden_sizes"]]
    _put(os.path.join(path, "config.json"), json.dumps(config).encode())


def _export_with(change):
    def build(path, export):
        shutil.copytree(export, path)
        change(os.path.join(path, "serving", "1"))

    return build


def _keras_head(path, export):
    with open(os.path.join(export, "digits.keras"), "rb") as f:
        _put(path, f.read()[:5000])


# What can be wrong with each kind of input: {name as typed: build(path, the module's export)}.
DAMAGED = {
    "image": {
        "empty.jpg": lambda path, export: _put(path, b""),
        "text.jpg": lambda path, export: _put(path, b"not an image\n"),
        "truncated.jpg": lambda path, export: _put(path, _photo_head()),
        "bad-crc.png": lambda path, export: _put(path, _png_with_bad_crc()),
        "dangling.jpg": lambda path, export: os.symlink("missing.jpg", path),
        "loop.jpg": lambda path, export: os.symlink("loop.jpg", path),
    },
    "checkpoint": {
        "empty-folder": lambda path, export: os.mkdir(path),
        "config-not-json": _file("config.json", b"{not json"),
        "config-a-list": _file("config.json", b"[1, 2]"),
        "weights-missing": _checkpoint_with(lambda path: os.remove(os.path.join(path, "model.safetensors"))),
        "weights-cut-off": _checkpoint_with(_cut("model.safetensors")),
        "weights-garbage": _file("model.safetensors", b"garbage" * 10),
        "weights-of-other-shapes": _checkpoint_with(_wider),
        "preprocessor-not-json": _file("preprocessor_config.json", b"{"),
    },
    "export": {
        "empty-folder": lambda path, export: os.mkdir(path),
        "garbage.keras": lambda path, export: _put(path, b"garbage"),
        "cut-off.keras": _keras_head,
        "garbage.tflite": lambda path, export: _put(path, b"garbage" * 20),
        "empty.tflite": lambda path, export: _put(path, b""),
        "graph-cut-off": _export_with(_cut("saved_model.pb")),
        "variables-missing": _export_with(lambda version: shutil.rmtree(os.path.join(version, "variables"))),
    },
    "records": {
        "empty.tfrecord": lambda path, export: _put(path, b""),
        "one-byte.tfrecord": lambda path, export: _put(path, b"x"),
        "garbage.tfrecord": lambda path, export: _put(path, b"not a TFRecord file at all"),
        "empty.jsonl": lambda path, export: _put(path, b""),
        "nan.jsonl": lambda path, export: _put(
            path, b'{"path": "a.jpg", "features": [1, 0]}\n{"path": "b.jpg", "features": [NaN, 0]}\n'
        ),
        "ragged.jsonl": lambda path, export: _put(
            path, b'{"path": "a.jpg", "features": [1, 0]}\n{"path": "b.jpg", "features": [1, 0, 2]}\n'
        ),
        "no-features.jsonl": lambda path, export: _put(path, b'{"path": "a.jpg"}\n'),
    },
}
STEP = "--steps 1 --batch-size 2"
# Every command line and argument that takes a kind of input: (id, kind, command line, the folder
# the damaged item goes in, whether all items go in one run). "{}" is the damaged item as typed,
# "{all}" all of them; the commands that skip unreadable images (exit 1) get them all at once,
# the others (exit 2) one per process.
SLOTS = [
    ("convert", "checkpoint", "convert {} --output out --formats keras", "", False),
    ("finetune", "checkpoint", f"finetune {{}} --data data --output run {STEP}", "", False),
    ("convert-images", "image", "convert --output out --formats keras --images photos", "photos", False),
    ("finetune-data", "image", f"finetune {CHECKPOINT} --data data --output run {STEP}", "data/cat", False),
    ("predict", "export", "predict {} photo.jpg", "", False),
    ("batch-predict", "export", "batch_predict {} photo.jpg --output preds/p", "", False),
    ("neighbours", "records", "neighbours {}", "", False),
    ("predict-images", "image", "predict {export} photos/good.jpg {all}", "photos", True),
    ("batch-predict-images", "image", "batch_predict {export} photos/* --output preds/p", "photos", True),
]


def _world(cwd):
    """What every case folder holds besides the damaged items: photos and a two-class image folder."""
    images(cwd, "photo.jpg")
    images(os.path.join(cwd, "photos"), "good.jpg")
    for label in ("cat", "dog"):
        images(os.path.join(cwd, "data", label), "a.jpg", "b.jpg")


def _corpus():
    """pytest params (command line, {damaged item as typed: build}, expected exit code)."""
    params = []
    for slot, kind, command, folder, together in SLOTS:
        items = {os.path.join(folder, name): build for name, build in DAMAGED[kind].items()}
        if together:
            params.append(pytest.param(command.replace("{all}", " ".join(items)), items, 1, id=slot))
            continue
        for (item, build), name in zip(items.items(), DAMAGED[kind]):
            params.append(pytest.param(command.replace("{}", item), {item: build}, 2, id=f"{slot}-{name}"))
    return params


CORPUS = _corpus()


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
    """{(part, case id): (the finished process, the case folder before, after)}, two at a time."""

    def case(command, setup, name):
        cwd = str(tmp_path_factory.mktemp(name))
        setup(cwd)
        before = tree(cwd)
        done = run([a.replace("{export}", export) for a in command.split()], cwd)
        return done, cwd, before, tree(cwd)

    def damaged(items):
        def setup(cwd):
            _world(cwd)
            for item, build in items.items():
                build(os.path.join(cwd, item), export)

        return setup

    runs = {("cases", p.id): (p.values[0], lambda cwd, p=p: p.values[1](cwd, export), p.id) for p in CASES}
    runs.update({("corpus", p.id): (p.values[0], damaged(p.values[1]), p.id) for p in CORPUS})
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        futures = {key: pool.submit(case, *arguments) for key, arguments in runs.items()}
        return {key: future.result() for key, future in futures.items()}


@pytest.mark.parametrize("command, setup, code, message", CASES)
def test_one_line_and_the_documented_exit_code(command, setup, code, message, outcomes, request):
    done, cwd, before, after = outcomes["cases", request.node.callspec.id]
    assert "Traceback" not in done.stderr, done.stderr
    assert done.returncode == code, done.stderr
    assert done.stderr.splitlines()[0].startswith(message.replace("{cwd}", cwd)), done.stderr
    if code == 2:  # refused: nothing written, nothing left behind
        assert after == before


@pytest.mark.parametrize("command, items, code", CORPUS)
def test_each_damaged_input_is_named_on_every_command_line(command, items, code, outcomes, request):
    """Refused (exit 2): one error on stderr, its first line `error: ` naming the item, nothing
    written. Skipped (exit 1, the commands that predict many images): each damaged image named,
    by predict on stderr, by batch_predict in its errors file, the good image predicted."""
    done, cwd, before, after = outcomes["corpus", request.node.callspec.id]
    assert "Traceback" not in done.stderr, done.stderr
    assert done.returncode == code, done.stderr
    lines = done.stderr.splitlines()
    if code == 2:
        (item,) = items
        assert lines[0].startswith("error: ") and item in lines[0], done.stderr
        assert all(line.startswith("  ") for line in lines[1:]), done.stderr  # a list of its keys, say
        assert after == before
    elif command.startswith("batch_predict"):
        errors = [json.loads(line) for f in glob.glob(f"{cwd}/preds/p-errors-*") for line in open(f)]
        assert sorted(e["path"] for e in errors) == sorted(items), errors
        assert all(e["error"].startswith(f"cannot read {e['path']}") for e in errors), errors
        records = [json.loads(line) for f in glob.glob(f"{cwd}/preds/p-0*") for line in open(f)]
        assert [r["path"] for r in records] == ["photos/good.jpg"]
    else:
        skipped = [line for line in lines if line.startswith("skipped: ")]
        assert len(skipped) == len(lines) == len(items), done.stderr
        assert all(item in line for item, line in zip(items, skipped)), done.stderr
        assert done.stdout.startswith("photos/good.jpg"), done.stdout


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


def test_batch_predict_writes_names_that_are_not_utf8_recoverably(export, tmp_path):
    """JSON lines (records and errors) hold such a name as Python's surrogate escapes, TFRecords
    as its bytes: both give the file back through os.fsencode."""
    images(tmp_path / "photos", CAFE + b".jpg", "good.jpg")
    _put(os.path.join(os.fsencode(tmp_path), b"photos", CAFE + b"-bad.jpg"), b"not an image")
    for output_format in ("jsonl", "tfrecord"):
        done = run(
            ["batch_predict", export, "photos/*", "--output", f"{output_format}/p", "--format", output_format], tmp_path
        )
        assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    (records,) = glob.glob(f"{tmp_path}/jsonl/p-0*")
    (errors,) = glob.glob(f"{tmp_path}/jsonl/p-errors-*")
    written = [json.loads(line)["path"] for f in (records, errors) for line in open(f)]
    assert sorted(os.fsencode(w) for w in written) == [
        b"photos/" + CAFE + b"-bad.jpg",
        b"photos/" + CAFE + b".jpg",
        b"photos/good.jpg",
    ]
    import tensorflow as tf

    (tfrecords,) = glob.glob(f"{tmp_path}/tfrecord/p-0*")
    paths = [
        tf.train.Example.FromString(r).features.feature["path"].bytes_list.value[0]
        for r in tf.data.TFRecordDataset(tfrecords).as_numpy_iterator()
    ]
    assert sorted(paths) == [b"photos/" + CAFE + b".jpg", b"photos/good.jpg"]


def test_convert_takes_a_checkpoint_folder_whose_name_is_not_utf8(tmp_path):
    """The transformers reference reads it through a UTF-8 named link; the artifact names keep
    the name's UTF-8 part."""
    checkpoint(tmp_path, CAFE)
    done = run(["convert", os.fsdecode(CAFE), "--output", "out", "--formats", "keras", "--num-images", "4"], tmp_path)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    assert json.loads((tmp_path / "out" / "report.json").read_text())["passed"]
    assert (tmp_path / "out" / "caf_.keras").is_file()
