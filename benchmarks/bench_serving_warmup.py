"""TF Serving's first request: the first call of a freshly loaded SavedModel, cold and after the
converter's warm-up records (serving/<version>/assets.extra/tf_serving_warmup_requests) have run;
and the steady latency per batch size that the converter's batching_parameters.txt is set from.

    python benchmarks/bench_serving_warmup.py [--models tiny r50x1] [--repeats 3]
                                              [--parts first-call batches] [--workdir DIR]

Models: `tiny`, the embedded digits checkpoint (`python -m conversion.convert`, 0.13 M
parameters, 32 px); `r50x1`, a full-size R50x1 at 224 px (benchmarks/realistic_model.py: random
body, head fitted to the photos; built and cached in saved_models/.cache on first use, ~2 min).
Both are exported by the converter (`--formats saved_model`), kit included, into --workdir.

first-call: every sample is a fresh process that loads the SavedModel and times, in order: the
load, the replay of the warm-up records (warm runs only: each record's request run through its
signature, as TF Serving does before it serves a version), the first `serving_default` request
(one encoded photo that is not among the warm-up's), the first `pixel_values` request (batch 1),
and the median of 5 more `serving_default` requests (the steady state). Two loaders:
- `session`: what TF Serving runs. Its C++ loader (LoadSavedModel) builds a Session on the
  MetaGraph; each request is a Session::Run feeding and fetching the signature's tensor names.
  Here: tf.compat.v1's loader into a tf.compat.v1.Session, the same DirectSession.
- `object`: tf.saved_model.load and a call of the signature's concrete function (Python users).
Cold and warm samples alternate, so both see the same background load.

batches: one process, session loader, warm-up replayed first; per batch size the median latency
of `pixel_values` and `serving_default` (encoded photos) and their images per second.

Needs tensorflow-serving-api (the `test` extra) to read the warm-up records with TF Serving's own
PredictionLog, and torch + transformers to build and verify the R50x1.
"""

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks import common  # noqa: E402

LOADERS = ("session", "object")
BATCHES = (1, 2, 4, 8, 16, 32)
STEADY_CALLS = 5


# ---- the child: one fresh process ------------------------------------------------------------


class SessionModel:
    """The SavedModel in a tf.compat.v1.Session, run by signature tensor names (as TF Serving)."""

    def __init__(self, path):
        import tensorflow as tf

        self.tf = tf
        self.graph = tf.Graph()
        config = tf.compat.v1.ConfigProto(intra_op_parallelism_threads=common.THREADS, inter_op_parallelism_threads=1)
        self.session = tf.compat.v1.Session(graph=self.graph, config=config)
        with self.graph.as_default():
            meta_graph = tf.compat.v1.saved_model.loader.load(self.session, ["serve"], path)
        self.signatures = meta_graph.signature_def

    def run(self, signature, inputs):
        sig = self.signatures[signature]
        fetches = {k: v.name for k, v in sig.outputs.items()}
        return self.session.run(fetches, {sig.inputs[k].name: v for k, v in inputs.items()})


class ObjectModel:
    """tf.saved_model.load and the signature's concrete function."""

    def __init__(self, path):
        tf = common.setup_tf()
        self.tf = tf
        self.loaded = tf.saved_model.load(path)

    def run(self, signature, inputs):
        out = self.loaded.signatures[signature](**{k: self.tf.constant(v) for k, v in inputs.items()})
        return {k: v.numpy() for k, v in out.items()}


def warmup_records(path):
    """[(signature, {input: array})] of the SavedModel's warm-up file, read with TF Serving's protos."""
    import tensorflow as tf
    from tensorflow_serving.apis import prediction_log_pb2

    from conversion import serving_kit

    records = []
    for raw in tf.compat.v1.io.tf_record_iterator(os.path.join(path, serving_kit.WARMUP_FILE)):
        request = prediction_log_pb2.PredictionLog.FromString(raw).predict_log.request
        inputs = {k: tf.make_ndarray(v) for k, v in request.inputs.items()}
        records.append((request.model_spec.signature_name or "serving_default", inputs))
    return records


def _timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _client_request(size=1, offset=1):
    """Encoded photos a client sends: `size` of them, starting at photo `offset` (photo 1 is not
    among the warm-up's, an even spread that starts at photo 0)."""
    from conversion import images

    paths = images.photo_paths()
    blobs = []
    for i in range(size):
        with open(paths[(offset + i) % len(paths)], "rb") as f:
            blobs.append(f.read())
    return np.array(blobs, dtype=object)


def child_first_call(loader, warm, path):
    """One sample: load, (replay the warm-up), first calls, steady state."""
    photo = {"image_bytes": _client_request()}
    result = {}
    start = time.perf_counter()
    model = (SessionModel if loader == "session" else ObjectModel)(path)
    result["load_s"] = time.perf_counter() - start
    records = warmup_records(path)  # read before timing: TF Serving's replay reads as it runs
    # one preprocessed photo (of the batch-8 record: the batch-1 record's photo is 0)
    pixels = {"pixel_values": next(i for s, i in reversed(records) if s == "pixel_values")["pixel_values"][1:2]}
    if warm:
        result["warmup_s"] = _timed(lambda: [model.run(s, i) for s, i in records])
        result["warmup_records"] = len(records)
    result["first_s"] = _timed(lambda: model.run("serving_default", photo))
    assert len(pixels["pixel_values"]) == 1
    result["first_pixels_s"] = _timed(lambda: model.run("pixel_values", pixels))
    steady = [_timed(lambda: model.run("serving_default", photo)) for _ in range(STEADY_CALLS)]
    result["steady_s"] = float(np.median(steady))
    outputs = model.run("serving_default", photo)
    assert all(np.all(np.isfinite(v)) for v in outputs.values() if v.dtype.kind == "f")
    return result


def child_batches(path, batches):
    """Median latency and img/s per batch size, both signatures, after the warm-up replay."""
    model = SessionModel(path)
    records = warmup_records(path)
    for signature, inputs in records:
        model.run(signature, inputs)
    pixel_rows = next(i for s, i in reversed(records) if s == "pixel_values")["pixel_values"]
    rows = {}
    for size in batches:
        pixels = {"pixel_values": np.resize(pixel_rows, (size, *pixel_rows.shape[1:]))}
        photos = {"image_bytes": _client_request(size, offset=0)}
        for signature, inputs in (("pixel_values", pixels), ("serving_default", photos)):
            model.run(signature, inputs)  # the first call of a new size is not timed
            calls = 3 if size >= 16 else 5
            latency = float(np.median([_timed(lambda: model.run(signature, inputs)) for _ in range(calls)]))
            rows[f"{signature}/{size}"] = {"latency_s": latency, "img_per_s": size / latency}
    return rows


# ---- the parent ---------------------------------------------------------------------------------


def export(model, workdir):
    """The converter's SavedModel (kit included) of `model`; reused when already in workdir."""
    from conversion import convert

    output = os.path.join(workdir, model)
    saved_model = os.path.join(output, "serving", "1")
    if os.path.exists(os.path.join(saved_model, "saved_model.pb")):
        return saved_model
    quiet = lambda message: None
    if model == "tiny":
        report = convert.convert(output=output, formats=("saved_model",), log=quiet)
    else:
        from benchmarks.realistic_model import realistic_checkpoint

        source = realistic_checkpoint(log=print)
        report = convert.convert(source, output=output, formats=("saved_model",), num_images=8, log=quiet)
    assert report["passed"], report
    return saved_model


def _child(args):
    code = [os.path.abspath(__file__), "--child", *args]
    return common.run_child(code, timeout=1800)


def first_call(saved_model, repeats, log=print):
    samples = {(loader, warm): [] for loader in LOADERS for warm in (False, True)}
    for repeat in range(repeats):
        for loader in LOADERS:
            for warm in (False, True):
                result = _child(["first-call", loader, str(int(warm)), saved_model])
                if "error" in result:
                    raise RuntimeError(result["error"])
                samples[loader, warm].append(result)
                log(f"    {loader:7s} {'warm' if warm else 'cold'} #{repeat + 1}: {json.dumps(result)}")
    rows = []
    for loader in LOADERS:
        cold, warm = samples[loader, False], samples[loader, True]
        med = lambda runs, key: common.median([r[key] for r in runs])
        rows.append(
            [
                loader,
                f"{med(cold, 'load_s'):.2f}",
                f"{med(warm, 'warmup_s'):.2f}",
                f"{1000 * med(cold, 'first_s'):.0f}",
                f"{1000 * med(warm, 'first_s'):.0f}",
                f"{med(cold, 'first_s') / med(warm, 'first_s'):.1f}x",
                f"{1000 * med(cold, 'first_pixels_s'):.0f} / {1000 * med(warm, 'first_pixels_s'):.0f}",
                f"{1000 * med(warm, 'steady_s'):.0f}",
            ]
        )
    header = [
        "loader",
        "load s",
        "warm-up replay s",
        "1st request cold ms",
        "1st request warmed ms",
        "cold / warmed",
        "1st pixel_values cold / warmed ms",
        "steady ms",
    ]
    return common.table(header, rows)


def batches(saved_model, sizes):
    result = _child(["batches", saved_model, *map(str, sizes)])
    if "error" in result:
        raise RuntimeError(result["error"])
    rows = []
    for size in sizes:
        row = [size]
        for signature in ("pixel_values", "serving_default"):
            r = result[f"{signature}/{size}"]
            row += [f"{1000 * r['latency_s']:.0f}", f"{r['img_per_s']:.1f}"]
        rows.append(row)
    header = ["batch", "pixel_values ms", "pixel_values img/s", "serving_default ms", "serving_default img/s"]
    return common.table(header, rows)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["tiny", "r50x1"], choices=["tiny", "r50x1"])
    parser.add_argument("--parts", nargs="+", default=["first-call", "batches"], choices=["first-call", "batches"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batches", nargs="+", type=int, default=list(BATCHES))
    parser.add_argument("--workdir", help="where the exports go (default: a temporary folder)")
    args = parser.parse_args(argv)
    os.environ.update(common.BASE_ENV)  # the exports run in this process
    workdir = args.workdir or tempfile.mkdtemp(prefix="bench_serving_warmup_")
    print(common.header("bench_serving_warmup.py", f"repeats {args.repeats}, workdir {workdir}"), flush=True)
    for model in args.models:
        start = time.perf_counter()
        saved_model = export(model, workdir)
        print(f"\n## {model}: {saved_model} (exported in {time.perf_counter() - start:.0f} s)", flush=True)
        if "first-call" in args.parts:
            print(first_call(saved_model, args.repeats), flush=True)
        if "batches" in args.parts:
            print(batches(saved_model, args.batches), flush=True)


def _child_main(argv):
    part, rest = argv[0], argv[1:]
    if part == "first-call":
        common.emit(child_first_call(rest[0], rest[1] == "1", rest[2]))
    else:
        common.emit(child_batches(rest[0], [int(b) for b in rest[1:]]))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        _child_main(sys.argv[2:])
    else:
        main()
