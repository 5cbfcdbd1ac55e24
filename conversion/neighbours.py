"""Nearest neighbours by cosine similarity over the feature records of `conversion.batch_predict`.

    python -m conversion.neighbours FEATURES [FEATURES ...] [--k 5] [--query PATH ...] [--json]

FEATURES: the --output PREFIX of a `batch_predict --task features` run (its record files
PREFIX-SSSSS-of-NNNNN.jsonl|.parquet|.tfrecord are read, not the errors file) or record files
themselves, on any Beam filesystem. Each query (default: every image) prints its k most similar
other images, most similar first. The search is brute force in numpy, exact and fine for some
ten thousand images; for millions of vectors the same records feed an approximate index
(FAISS, ScaNN) instead.
Exit codes: 0 done, 2 bad arguments (no records, a query that is not among them, ...).
"""

import json
import os
import re
import sys

from conversion import batch_predict, cli

SUFFIXES = (".jsonl", ".parquet", ".tfrecord")


def record_files(sources):
    """The record files named by each source: the file itself, or the shards of a prefix."""
    from apache_beam.io.filesystems import FileSystems

    found = []
    for source in sources:
        if source.endswith(SUFFIXES) and FileSystems.exists(source):
            found.append(source)
            continue
        shards = [
            m.path
            for suffix in SUFFIXES
            for m in FileSystems.match([f"{source}-?????-of-?????{suffix}"])[0].metadata_list
        ]
        if not shards:
            raise ValueError(
                f"{source}: neither a record file ({', '.join(SUFFIXES)}) nor the prefix "
                f"of batch_predict record files ({source}-SSSSS-of-NNNNN.jsonl, ...)"
            )
        found += sorted(shards)
    return found


def read_records(path, verbose=False):
    """[{"path", "features"}] of one record file, by its suffix."""
    from apache_beam.io.filesystems import FileSystems

    if path.endswith(".tfrecord"):
        return _tfrecord_records(path, verbose)
    with FileSystems.open(path) as f:
        if path.endswith(".parquet"):
            import pyarrow.parquet as pq

            return pq.read_table(f).to_pylist()
        return [_json_record(path, n, line) for n, line in enumerate(f.read().splitlines(), 1) if line.strip()]


def _json_record(path, number, line):
    """The object on line `number` of a JSON-lines file; ValueError naming the file and line."""
    try:
        record = json.loads(line)
    except ValueError as e:  # a JSONDecodeError or bytes that are not UTF-8
        where = f" (column {e.colno})" if isinstance(e, json.JSONDecodeError) else ""
        raise ValueError(f"{path} line {number} is not a JSON record: {getattr(e, 'msg', e)}{where}") from None
    if not isinstance(record, dict):
        raise ValueError(f"{path} line {number} holds a JSON {type(record).__name__}, expected a record object")
    return record


def _tfrecord_records(path, verbose=False):
    from conversion import environment

    environment.configure(verbose)  # TensorFlow's import-time lines hidden unless --verbose
    import tensorflow as tf
    from google.protobuf.message import DecodeError

    records = []
    try:
        for serialized in tf.data.TFRecordDataset(path).as_numpy_iterator():
            feature = tf.train.Example.FromString(serialized).features.feature
            records.append(
                {
                    # bytes as batch_predict wrote them: a file name need not be UTF-8
                    "path": os.fsdecode(feature["path"].bytes_list.value[0]),
                    **({"features": list(feature["features"].float_list.value)} if "features" in feature else {}),
                }
            )
    except (tf.errors.DataLossError, DecodeError, IndexError) as e:
        reason = str(e) or "an example without a path"
        if isinstance(e, tf.errors.OpError):  # the reason, without TensorFlow's function and op names
            reason = re.sub(r"\{\{.*?\}\}", "", e.message).split("[Op:")[0]
        raise ValueError(f"{path} is damaged, not a file of tf.train.Example records: {reason.strip()}") from None
    if not records and os.path.getsize(path):  # TensorFlow reads a cut-off first record as the end
        raise ValueError(
            f"{path} is damaged, not a file of tf.train.Example records: no complete record in "
            f"its {os.path.getsize(path)} B"
        )
    return records


def feature_matrix(files, verbose=False):
    """(paths sorted, float64 matrix of unit rows); ValueError naming a file without features."""
    import numpy as np

    rows, origin = {}, {}
    for path in files:
        for record in read_records(path, verbose):
            if "features" not in record or "path" not in record:
                raise ValueError(
                    f"{path} holds no feature vectors (fields: {', '.join(sorted(record))}): "
                    "write them with batch_predict --task features"
                )
            _check_length(path, record, rows)
            rows[record["path"]], origin[record["path"]] = record["features"], path
    if not rows:
        raise ValueError(f"no records in {', '.join(files)}")
    paths = sorted(rows)
    matrix = np.array([rows[p] for p in paths], dtype=np.float64)
    bad = [p for p, row in zip(paths, matrix) if not np.isfinite(row).all()]
    if bad:  # a NaN row would compare as -inf with every image, itself included
        more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
        raise ValueError(
            f"{origin[bad[0]]}: the feature vector of {bad[0]}{more} holds NaN or infinite values: rerun "
            "batch_predict on that image (a damaged export or image gives such features)"
        )
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    return paths, matrix / np.where(norms > 0, norms, 1.0)  # unit rows: cosine = dot product


def _check_length(path, record, rows):
    """ValueError naming a record whose feature vector is not a list as long as the others'."""
    features = record["features"]
    if not isinstance(features, (list, tuple)):
        raise ValueError(f"{path}: the features of {record['path']} are a {type(features).__name__}, not a list")
    if rows:
        first, expected = next(iter(rows.items()))
        if len(features) != len(expected):
            raise ValueError(
                f"{path}: the feature vector of {record['path']} has {len(features)} values, that of "
                f"{first} {len(expected)}: the records come from different models"
            )


def neighbours(paths, matrix, queries, k):
    """{query: [(path, cosine similarity), ...]}: the k most similar other images, best first."""
    import numpy as np

    index = {p: i for i, p in enumerate(paths)}
    found = {}
    for query in queries:
        i = index[query]
        similarity = matrix @ matrix[i]
        similarity[i] = -np.inf  # an image is not its own neighbour
        best = np.argsort(-similarity, kind="stable")[: min(k, len(paths) - 1)]
        found[query] = [(paths[j], float(similarity[j])) for j in best]
    return found


def _queries(requested, paths):
    """The records' paths of the requested queries (as written, or the same file's absolute path)."""
    if not requested:
        return paths
    known = set(paths)
    chosen = []
    for query in requested:
        match = query if query in known else os.path.abspath(query)
        if match not in known:
            raise ValueError(f"--query {query} is not among the {len(paths)} images of the records")
        chosen.append(match)
    return chosen


def build_parser():
    parser = cli.parser("conversion.neighbours", __doc__)
    parser.add_argument("features", nargs="+", metavar="FEATURES", help="batch_predict --output prefix or record files")
    parser.add_argument("--k", type=cli.positive_int, default=5, help="neighbours per query (default: 5)")
    parser.add_argument("--query", nargs="+", metavar="PATH", help="images to search for (default: every image)")
    parser.add_argument("--json", action="store_true", help='one JSON line per query: {"query", "neighbours"}')
    cli.add_verbose(parser)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    if not args.verbose:
        batch_predict.hide_beam_import_notices()
    try:
        paths, matrix = feature_matrix(record_files(args.features), args.verbose)
        found = neighbours(paths, matrix, _queries(args.query, paths), args.k)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for query, near in found.items():
        if args.json:
            print(json.dumps({"query": query, "neighbours": [{"path": p, "similarity": s} for p, s in near]}))
        else:
            print(query)
            for path, similarity in near:
                print(f"  {similarity:.4f}  {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
