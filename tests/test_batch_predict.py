"""`python -m conversion.batch_predict` (Apache Beam, DirectRunner) and `python -m
conversion.neighbours` as typed, in fresh processes, on a small classifier exported by the
converter CLI as a classification and a features SavedModel: the shipped photos plus two bad
files, every output format, the errors file, and every argument error's message."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import SMALL
from test_predict_cli import error_line
from test_quiet_cli import imported_modules

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PHOTOS = os.path.join(ROOT, "conversion", "photos")
# JPEGs and PNGs (grayscale, RGBA, RGB), odd sizes; the duplicate's original is the first one
GOOD = [
    "coffee.jpg",
    "camera.png",
    "chelsea.jpg",
    "astronaut_shuttle.png",
    "flower_dahlia.png",
    "grace_hopper_face.jpg",
    "rocket.jpg",
    "retina_macula.jpg",
]
DUPLICATE = "zz_copy_of_coffee.jpg"
LABELS = ["cat", "dog", "eel", "fox", "gnu", "hen", "owl"]

pytest.importorskip("apache_beam")


def cli(*args):
    """As the user types it: without the test run's TF_CPP_MIN_LOG_LEVEL, so the CLI's quiet default holds."""
    env = {**{k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", *map(str, args)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """{task: export directory} of one small random classifier with named labels."""
    import tfbit
    from tfbit.preprocessing.processor import BitImageProcessor

    root = tmp_path_factory.mktemp("exports")
    model = tfbit.BitForImageClassification(tfbit.BitConfig(**SMALL, id2label=dict(enumerate(LABELS))))
    model.save_pretrained(
        root / "ckpt", BitImageProcessor(size={"shortest_edge": 40}, crop_size={"height": 32, "width": 32})
    )
    for task, formats in [("classification", ["saved_model"]), ("features", ["keras", "saved_model"])]:
        done = cli(
            "conversion.convert",
            root / "ckpt",
            "--output",
            root / task,
            "--task",
            task,
            "--formats",
            *formats,
            "--num-images",
            "4",
        )
        assert done.returncode == 0, done.stdout + done.stderr
    return {task: root / task for task in ("classification", "features")}


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """good/: photos and an exact duplicate under another name; bad/: a text file named .jpg
    and a truncated JPEG."""
    root = tmp_path_factory.mktemp("images")
    (root / "good").mkdir()
    (root / "bad").mkdir()
    for name in GOOD:
        (root / "good" / name).write_bytes(open(os.path.join(PHOTOS, name), "rb").read())
    (root / "good" / DUPLICATE).write_bytes((root / "good" / GOOD[0]).read_bytes())
    (root / "bad" / "notes.jpg").write_text("not an image, only text")
    (root / "bad" / "truncated.jpg").write_bytes((root / "good" / "rocket.jpg").read_bytes()[:2000])
    return root


def good_paths(images):
    return sorted(str(images / "good" / name) for name in GOOD + [DUPLICATE])


def shards(prefix, suffix):
    found = sorted(prefix.parent.glob(f"{prefix.name}-?????-of-?????{suffix}"))
    assert found, f"no {prefix}-*{suffix}"
    return found


def read_jsonl(prefix, suffix=".jsonl"):
    return sorted(
        (json.loads(line) for path in shards(prefix, suffix) for line in path.read_text().splitlines()),
        key=lambda r: r["path"],
    )


def read_parquet(prefix):
    import pyarrow.parquet as pq

    return sorted(
        (r for path in shards(prefix, ".parquet") for r in pq.read_table(path).to_pylist()), key=lambda r: r["path"]
    )


def read_tfrecord(prefix):
    import tensorflow as tf

    records = []
    for serialized in tf.data.TFRecordDataset([str(p) for p in shards(prefix, ".tfrecord")]).as_numpy_iterator():
        feature = tf.train.Example.FromString(serialized).features.feature
        records.append(
            {
                "path": feature["path"].bytes_list.value[0].decode(),
                "features": list(feature["features"].float_list.value),
            }
        )
    return sorted(records, key=lambda r: r["path"])


@pytest.fixture(scope="module")
def predicted(exports, images, tmp_path_factory):
    """conversion.predict on the good images, every label ranked: {path: (labels, scores)}."""
    out = tmp_path_factory.mktemp("predict") / "preds.jsonl"
    done = cli(
        "conversion.predict", exports["classification"], images / "good", "--top-k", len(LABELS), "--output", out
    )
    assert done.returncode == 0, done.stderr
    return {r["path"]: (r["labels"], r["scores"]) for r in map(json.loads, out.read_text().splitlines())}


def assert_same_as_predict(records, predicted, k):
    assert [r["path"] for r in records] == sorted(predicted)
    for record in records:
        labels, scores = predicted[record["path"]]
        assert record["labels"] == labels[:k], record["path"]
        np.testing.assert_allclose(record["scores"], scores[:k], atol=1e-5, err_msg=record["path"])


def test_classification_equals_predict_and_bad_images_are_reported(exports, images, predicted, tmp_path):
    """Batches of 4 hold a bad image: it is rerun image by image, only the bad ones are lost."""
    prefix = tmp_path / "out" / "preds"
    done = cli(
        "conversion.batch_predict",
        exports["classification"],
        f"{images}/good/*",
        f"{images}/bad/*",
        f"{images}/good/coffee.jpg",
        "--output",
        prefix,
        "--batch-size",
        "4",
    )
    assert done.returncode == 1, done.stderr  # some images skipped
    assert done.stderr == ""
    assert done.stdout.startswith("predicted 9 images, skipped 2 in ") and "images/s); model calls " in done.stdout
    assert f"records: {prefix}-SSSSS-of-NNNNN.jsonl; errors: {prefix}-errors-SSSSS-of-NNNNN.jsonl" in done.stdout
    assert_same_as_predict(read_jsonl(prefix), predicted, 5)  # coffee.jpg, matched twice, once
    errors = {r["path"]: r["error"] for r in read_jsonl(tmp_path / "out" / "preds-errors")}
    bad = images / "bad"
    assert errors == {
        str(bad / "notes.jpg"): f"cannot read {bad / 'notes.jpg'} as an image: could not decode image: "
        "not JPEG, PNG, GIF or BMP data (23 bytes: 6e 6f 74 20 61 6e 20 69)",
        str(bad / "truncated.jpg"): f"cannot read {bad / 'truncated.jpg'} as an image: could not decode "
        "image: truncated JPEG data (2000 bytes)",
    }


def test_no_readable_image_exits_2_like_predict(exports, images, tmp_path):
    done = cli("conversion.batch_predict", exports["classification"], f"{images}/bad/*", "--output", tmp_path / "p")
    assert done.returncode == 2, done.stderr
    assert done.stdout.startswith("predicted 0 images, skipped 2 in ")
    assert "error: none of the images could be read (see the errors file)" in done.stderr


def test_top_k_other_than_the_exports_in_parquet(exports, images, predicted, tmp_path):
    """The export ranks 5 labels; --top-k 3 ranks its probabilities instead."""
    done = cli(
        "conversion.batch_predict",
        exports["classification"],
        f"{images}/good/*",
        "--output",
        tmp_path / "p",
        "--top-k",
        "3",
        "--format",
        "parquet",
    )
    assert done.returncode == 0 and done.stderr == "", done.stderr
    assert done.stdout.startswith("predicted 9 images, skipped 0 in ")
    assert_same_as_predict(read_parquet(tmp_path / "p"), predicted, 3)
    assert read_jsonl(tmp_path / "p-errors") == []  # an empty errors file: nothing skipped


def keras_features(export, paths):
    """The export's .keras pooled output, on the serving graph's own preprocessing of the files."""
    import tensorflow as tf

    from conversion import runners
    from tfbit.preprocessing import tf_processor
    from tfbit.preprocessing.processor import BitImageProcessor

    processor = BitImageProcessor.from_pretrained(export).to_dict()
    pixel_values = tf_processor.preprocess_image_bytes(tf.constant([open(p, "rb").read() for p in paths]), processor)
    return runners.keras_runner(str(next(export.glob("*.keras"))), task="features")(pixel_values)["features"]


@pytest.fixture(scope="module")
def features(exports, images, tmp_path_factory):
    """Feature records in every format: raw as JSON lines, unit vectors as Parquet and TFRecord."""
    out = tmp_path_factory.mktemp("features")
    runs = {
        "raw": ["--format", "jsonl"],
        "parquet": ["--normalize", "--format", "parquet"],
        "tfrecord": ["--normalize", "--format", "tfrecord", "--num-shards", "2"],
    }
    for name, options in runs.items():
        done = cli(
            "conversion.batch_predict",
            exports["features"],
            f"{images}/good/*",
            "--task",
            "features",
            "--output",
            out / name,
            "--batch-size",
            "3",
            *options,
        )
        assert done.returncode == 0 and done.stderr == "", done.stderr
    assert len(shards(out / "tfrecord", ".tfrecord")) == 2
    return out


def test_features_equal_the_keras_models_and_normalize_to_unit_length(exports, images, features):
    raw = read_jsonl(features / "raw")
    assert [r["path"] for r in raw] == good_paths(images)
    vectors = np.array([r["features"] for r in raw])
    reference = keras_features(exports["features"], good_paths(images))
    assert vectors.shape == (9, SMALL["hidden_sizes"][-1])
    np.testing.assert_allclose(vectors, reference, atol=1e-4 * np.abs(reference).max())
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    for name, records in [
        ("parquet", read_parquet(features / "parquet")),
        ("tfrecord", read_tfrecord(features / "tfrecord")),
    ]:
        assert [r["path"] for r in records] == good_paths(images), name
        normalized = np.array([r["features"] for r in records])
        np.testing.assert_allclose(np.linalg.norm(normalized, axis=1), 1, atol=1e-6, err_msg=name)
        np.testing.assert_allclose(normalized, unit, atol=1e-6, err_msg=name)


def brute_force(records):
    """{query: {other path: cosine similarity}} of every pair of records."""
    paths = [r["path"] for r in records]
    x = np.array([r["features"] for r in records], np.float64)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    similarity = x @ x.T
    return {q: {p: similarity[i, j] for j, p in enumerate(paths) if j != i} for i, q in enumerate(paths)}


@pytest.mark.parametrize("source", ["raw", "parquet", "tfrecord"])
def test_neighbours_find_the_duplicate_and_equal_brute_force(source, features, images):
    """The duplicate and its original tie as anyone's neighbours (their features may differ in the
    last bit between batches), so each rank is checked by its similarity, then the path's."""
    expected = brute_force(read_jsonl(features / "raw"))
    done = cli("conversion.neighbours", features / source, "--k", "3", "--json")
    assert done.returncode == 0 and done.stderr == "", done.stderr
    found = {
        r["query"]: [(n["path"], n["similarity"]) for n in r["neighbours"]]
        for r in map(json.loads, done.stdout.splitlines())
    }
    assert sorted(found) == good_paths(images)
    original, copy = str(images / "good" / GOOD[0]), str(images / "good" / DUPLICATE)
    assert found[original][0][0] == copy and found[copy][0][0] == original
    assert found[original][0][1] == pytest.approx(1.0, abs=1e-6)
    for query, near in found.items():
        best = sorted(expected[query].values(), reverse=True)[:3]
        np.testing.assert_allclose([s for _, s in near], best, atol=1e-6, err_msg=query)
        np.testing.assert_allclose([expected[query][p] for p, _ in near], best, atol=1e-6, err_msg=query)
        assert len({p for p, _ in near}) == 3


def test_neighbours_of_chosen_queries_as_text(features, images):
    query = images / "good" / DUPLICATE
    shard = shards(features / "parquet", ".parquet")[0]
    done = cli("conversion.neighbours", shard, "--query", query, "--k", "1")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [str(query), f"  1.0000  {images / 'good' / GOOD[0]}"]


def test_neighbours_argument_errors(features, tmp_path, exports, images):
    done = cli("conversion.neighbours", tmp_path / "nothing")
    assert done.returncode == 2
    assert f"{tmp_path / 'nothing'}: neither a record file (.jsonl, .parquet, .tfrecord) nor the prefix" in error_line(
        done
    )
    done = cli("conversion.neighbours", features / "raw", "--query", tmp_path / "elsewhere.jpg")
    assert done.returncode == 2
    assert f"--query {tmp_path / 'elsewhere.jpg'} is not among the 9 images of the records" in error_line(done)
    labels = tmp_path / "labels.jsonl"
    labels.write_text(json.dumps({"path": "a.jpg", "labels": ["cat"], "scores": [1.0]}) + "\n")
    done = cli("conversion.neighbours", labels)
    assert done.returncode == 2
    assert (
        f"{labels} holds no feature vectors (fields: labels, path, scores): write them with batch_predict "
        "--task features"
    ) in error_line(done)
    broken = tmp_path / "nan.jsonl"  # one NaN vector would find itself as its own neighbour
    broken.write_text(
        "".join(
            json.dumps({"path": p, "features": f}) + "\n"
            for p, f in [("a.jpg", [1.0, 0.0]), ("b.jpg", [float("nan"), 1.0]), ("c.jpg", [0.0, 1.0])]
        )
    )
    done = cli("conversion.neighbours", broken)
    assert done.returncode == 2 and not done.stdout
    assert "the feature vector of b.jpg holds NaN or infinite values" in error_line(done)


@pytest.mark.parametrize(
    "args, message",
    [
        (["{missing}", "{images}/good/*"], "no artifact at {missing}"),
        (
            ["{keras}", "{images}/good/*"],
            "{keras} is neither a SavedModel nor an export holding one "
            "(serving/<version>): convert with --formats saved_model",
        ),
        (
            ["{classification}", "{images}/good/*", "{images}/none/*.jpg"],
            "no images matched the INPUT_GLOB {images}/none/*.jpg",
        ),
        (
            ["{classification}", "{images}/good/*", "--normalize"],
            "--normalize scales feature vectors: it needs --task features",
        ),
        (
            ["{classification}", "{images}/good/*", "--task", "features"],
            "--task features needs the output(s) features, but {classification}/serving/1 has classes, labels, logits, "
            "probabilities, scores: run with --task classification",
        ),
        (
            ["{features}", "{images}/good/*"],
            "--task classification needs the output(s) labels, scores, probabilities, but {features}/serving/1 has "
            "features: run with --task features",
        ),
        (
            ["{classification}", "{images}/good/*", "--runner", "NoSuchRunner"],
            "Unexpected pipeline runner: NoSuchRunner. Valid values are DataflowRunner",
        ),
    ],
)
def test_argument_errors_name_the_problem(args, message, exports, images, tmp_path):
    names = {
        "missing": tmp_path / "missing",
        "images": images,
        "keras": next(exports["features"].glob("*.keras")),
        **exports,
    }
    done = cli("conversion.batch_predict", *(a.format(**names) for a in args), "--output", tmp_path / "o")
    assert done.returncode == 2
    assert message.format(**names) in error_line(done)
    assert not (tmp_path / "o-00000-of-00001.jsonl").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--format", "csv"], "argument --format: invalid choice: 'csv' (choose from 'jsonl', 'parquet', 'tfrecord')"),
        (
            ["--task", "backbone"],
            "argument --task: invalid choice: 'backbone' (choose from 'classification', 'features')",
        ),
        (["--batch-size", "0"], "argument --batch-size: must be at least 1, got 0"),
        (["--top-k", "x"], "argument --top-k: must be a whole number, got 'x'"),
    ],
)
def test_bad_options_are_refused_by_argparse(args, message, tmp_path):
    done = cli("conversion.batch_predict", tmp_path, "*.jpg", "--output", tmp_path / "o", *args)
    assert done.returncode == 2 and message in done.stderr, done.stderr


def test_output_prefix_is_required(tmp_path):
    done = cli("conversion.batch_predict", tmp_path, "*.jpg")
    assert done.returncode == 2 and "the following arguments are required: --output" in done.stderr


def test_tfrecord_without_a_crc32c_library_is_refused_before_predicting(exports, images, tmp_path):
    """As on an install without apache-beam[tfrecord]: the CRC32C packages Beam looks for are made
    unimportable (python-snappy, the third, is no tfbit dependency; hiding it would break fastavro)."""
    code = (
        "import sys\nsys.modules.update(crcmod=None, google_crc32c=None)\n"
        "from conversion.batch_predict import main\nsys.exit(main(sys.argv[1:]))"
    )
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            code,
            str(exports["features"]),
            f"{images}/good/*",
            "--task",
            "features",
            "--format",
            "tfrecord",
            "--output",
            str(tmp_path / "o"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 2
    assert (
        "--format tfrecord needs a CRC32C library for Beam's TFRecord writer: pip install "
        "'tfbit[beam]' (google-crc32c) or 'apache-beam[tfrecord]' (crcmod)"
    ) in error_line(done)


@pytest.mark.parametrize("module", ["conversion.batch_predict", "conversion.neighbours"])
def test_help_imports_no_tensorflow(module):
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", module, "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "--verbose" in done.stdout
    assert not {"tensorflow", "keras", "apache_beam"} & imported_modules(done.stderr)


def test_a_run_owns_its_output_prefix(exports, images, tmp_path):
    """A rerun into the same prefix with another --num-shards is refused (its shards would sit
    beside the old ones and neighbours would read both); --overwrite removes the old ones."""
    prefix = tmp_path / "feats"
    args = ("conversion.batch_predict", exports["features"], f"{images}/good/*", "--task", "features")
    assert cli(*args, "--output", prefix, "--num-shards", "3").returncode == 0
    old = sorted(p.name for p in tmp_path.iterdir())
    done = cli(*args, "--output", prefix, "--num-shards", "2")
    assert done.returncode == 2
    assert f"--output {prefix}: an earlier run's files are there ({prefix}-00000-of-00003.jsonl" in error_line(done)
    assert sorted(p.name for p in tmp_path.iterdir()) == old
    done = cli(*args, "--output", prefix, "--num-shards", "2", "--overwrite")
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "feats-00000-of-00002.jsonl",
        "feats-00001-of-00002.jsonl",
        "feats-errors-00000-of-00002.jsonl",
        "feats-errors-00001-of-00002.jsonl",
    ]
    done = cli("conversion.neighbours", prefix, "--json", "--k", "1")
    assert done.returncode == 0 and len(done.stdout.splitlines()) == len(GOOD) + 1  # each image once
