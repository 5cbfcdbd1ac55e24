"""Batch inference as an Apache Beam pipeline: an exported SavedModel on every image a glob matches.

    python -m conversion.batch_predict ARTIFACT INPUT_GLOB [INPUT_GLOB ...] --output PREFIX
           [--task classification|features] [--normalize] [--format jsonl|parquet|tfrecord]
           [--batch-size 32] [--top-k 5] [--num-shards N] [Beam pipeline options ...]

ARTIFACT: an export directory written by `python -m conversion.convert` (its newest
serving/<version> SavedModel is used) or a SavedModel directory; labels come from the config.json
beside it. INPUT_GLOB: file patterns of any Beam filesystem (local, gs://, s3://, ...); a file
matched twice is predicted once. The SavedModel's `serving_default` signature decodes and
preprocesses the encoded files in its graph, exactly as under TF Serving.

Output files (Beam shards: SSSSS-of-NNNNN, e.g. PREFIX-00000-of-00001.jsonl):
  PREFIX-SSSSS-of-NNNNN.jsonl|.parquet|.tfrecord   one record per predicted image:
      classification: {"path", "labels": top-k labels, "scores": their probabilities}
      features:       {"path", "features": pooled feature vector (unit length with --normalize)}
      (TFRecord: tf.train.Example with the same names, strings as bytes_list, numbers as float_list)
  PREFIX-errors-SSSSS-of-NNNNN.jsonl   {"path", "error"} of each image that could not be read
Exit codes: 0 every image predicted, 1 some images skipped (see the errors file), 2 bad arguments
or no image could be read (as `conversion.predict`).

Other options are Beam's PipelineOptions (default --runner DirectRunner, in this process; a
misspelt option is dropped with Beam's "Discarding unparseable args" warning). Option names below
are checked against apache_beam/options/pipeline_options.py (Beam 2.77); these runners were not
run here:
  Dataflow:  --runner DataflowRunner --project P --region R --temp_location gs://B/tmp
             --sdk_container_image IMAGE   (tfbit[beam] installed and the export copied to the
             ARTIFACT path; or --setup_file ./setup.py / --requirements_file FILE to install
             tfbit on stock workers, which then still need the export at that path)
  Flink:     --runner FlinkRunner --flink_master HOST:8081 --environment_type LOOPBACK
             (or --runner PortableRunner --job_endpoint HOST:8099 for a running job server)
  Spark:     --runner SparkRunner --spark_master_url spark://HOST:7077 --environment_type LOOPBACK
ARTIFACT is resolved on the machine that launches the pipeline (config.json, the newest
version) and loaded by the workers from the same local path: with LOOPBACK the workers are this
process; otherwise the path must exist on every worker (a shared mount or the container image).
INPUT_GLOB and PREFIX may be on any filesystem the workers reach (gs://, s3://, hdfs://).
"""

import glob
import json
import logging
import os
import shutil
import sys
import time

from conversion import cli, diskspace

TASKS = ("classification", "features")
FORMATS = ("jsonl", "parquet", "tfrecord")
METRICS = "tfbit.batch_predict"
ERRORS = "errors"


# -- the model handler -----------------------------------------------------------------------


def _model_handler_class():
    """`SavedModelHandler`, defined once Beam is imported (so `--help` imports nothing heavy).

    Not Beam's `tensorflow_inference.TFModelHandlerTensor`: it loads with
    `tf.keras.models.load_model`, which in Keras 3 (TF 2.21's tf.keras) refuses SavedModel
    directories ("Keras 3 only supports V3 `.keras` files ..."), and its module imports
    tensorflow_hub, which tfbit does not install (both checked with Beam 2.77). Our SavedModel
    is a tf.Module with signatures, so `tf.saved_model.load` is the loader anyway.
    """
    from apache_beam.ml.inference.base import ModelHandler, PredictionResult

    class SavedModelHandler(ModelHandler):
        """Encoded image bytes -> the `serving_default` outputs `keep`, one dict per image, or
        the decoder's message (a str) for an image it cannot read."""

        def __init__(self, path, keep, batch_size):
            super().__init__(min_batch_size=batch_size, max_batch_size=batch_size)
            self.path, self.keep = path, tuple(keep)

        def load_model(self):
            import tensorflow as tf

            return tf.saved_model.load(self.path)  # the object keeps the signature's variables alive

        def run_inference(self, batch, model, inference_args=None):
            return [PredictionResult(x, out) for x, out in zip(batch, self._outputs(list(batch), model))]

        def _outputs(self, batch, model):
            # The serving graph fails a whole batch on one undecodable image: rerun that batch
            # image by image, as conversion.predict does, so only the bad image is lost.
            import tensorflow as tf

            from conversion.predict import decoder_message

            try:
                out = model.signatures["serving_default"](image_bytes=tf.constant(batch))
            except tf.errors.InvalidArgumentError as e:
                if len(batch) > 1:
                    return [o for x in batch for o in self._outputs([x], model)]
                return [decoder_message(e.message)]
            arrays = {name: out[name].numpy() for name in self.keep}
            return [{name: a[i] for name, a in arrays.items()} for i in range(len(batch))]

        def get_num_bytes(self, batch):
            return sum(len(x) for x in batch)  # Beam's default pickles the batch to measure it

    return SavedModelHandler


# -- pipeline steps --------------------------------------------------------------------------


def _shown(key):
    """A path key (bytes, as the file system has it) as text for a message."""
    return key.decode("utf-8", "backslashreplace")


def _read(key):
    """(path key, encoded bytes), or an error record for a file that cannot be read. Keys are the
    path's bytes: Beam's coders carry text as UTF-8 only, and a Linux file name need not be."""
    from apache_beam import pvalue
    from apache_beam.io.filesystem import CompressionTypes
    from apache_beam.io.filesystems import FileSystems

    path = os.fsdecode(key)
    if "://" in path or not os.path.isdir(path):  # a folder the glob matched is skipped, as by ReadMatches
        try:
            # image bytes as stored: AUTO would gunzip a file that happens to end in .gz
            with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
                yield key, f.read()
        except OSError as e:  # deleted since it was matched, no permission, ...
            yield pvalue.TaggedOutput(ERRORS, {"path": key, "error": f"cannot read {_shown(key)}: {e}"})


class _Records:
    """(path, PredictionResult) -> the output record, or an error record (see `_model_handler_class`)."""

    def __init__(self, task, labels, top_k, signature_k, normalize):
        self.task, self.labels, self.top_k = task, labels, top_k
        self.signature_k, self.normalize = signature_k, normalize

    def __call__(self, keyed):
        from apache_beam import pvalue

        path, result = keyed
        out = result.inference
        if isinstance(out, str):
            yield pvalue.TaggedOutput(ERRORS, {"path": path, "error": f"cannot read {_shown(path)} as an image: {out}"})
        elif self.task == "features":
            yield {"path": path, "features": _features(out["features"], self.normalize)}
        elif self.top_k == self.signature_k:
            yield {
                "path": path,
                "labels": [label.decode() for label in out["labels"]],
                "scores": out["scores"].tolist(),
            }
        else:
            best = (-out["probabilities"]).argsort(kind="stable")[: self.top_k]
            yield {
                "path": path,
                "labels": [self.labels[int(i)] for i in best],
                "scores": out["probabilities"][best].tolist(),
            }


def _features(vector, normalize):
    if normalize:
        norm = float((vector.astype("float64") ** 2).sum() ** 0.5)
        vector = vector / norm if norm else vector  # an all-zero vector has no direction to keep
    return vector.tolist()


def _counted(name):
    """A Map function counting its elements in the pipeline's metrics (read back by `main`)."""
    from apache_beam.metrics import Metrics

    counter = Metrics.counter(METRICS, name)

    def count(element):
        counter.inc()
        return element

    return count


def _parquet_schema(task):
    import pyarrow as pa

    if task == "features":
        return pa.schema([("path", pa.string()), ("features", pa.list_(pa.float32()))])
    return pa.schema([("path", pa.string()), ("labels", pa.list_(pa.string())), ("scores", pa.list_(pa.float32()))])


def _example(record):
    """A record as serialized tf.train.Example: strings as bytes_list, numbers as float_list."""
    import tensorflow as tf

    feature = {}
    for name, value in record.items():
        values = value if isinstance(value, list) else [value]
        if isinstance(values[0], (str, bytes)):
            encoded = [v if isinstance(v, bytes) else v.encode() for v in values]
            feature[name] = tf.train.Feature(bytes_list=tf.train.BytesList(value=encoded))
        else:
            feature[name] = tf.train.Feature(float_list=tf.train.FloatList(value=values))
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def json_line(record):
    """A record as a JSON line; a path that is not UTF-8 keeps its bytes as Python's surrogate
    escapes (\\udcXX), which `os.fsencode(json.loads(line)["path"])` turns back into the name."""
    return json.dumps({**record, "path": os.fsdecode(record["path"])})


def _write(records, output_format, prefix, task, num_shards):
    import apache_beam as beam

    suffix = f".{output_format}"
    if output_format == "parquet":  # names that are not UTF-8 are refused before (check_globs)
        records |= "Path as text" >> beam.Map(lambda r: {**r, "path": r["path"].decode("utf-8")})
        return records | beam.io.WriteToParquet(
            prefix, _parquet_schema(task), file_name_suffix=suffix, num_shards=num_shards
        )
    if output_format == "tfrecord":
        return (
            records
            | "To tf.train.Example" >> beam.Map(_example)
            | beam.io.WriteToTFRecord(prefix, file_name_suffix=suffix, num_shards=num_shards)
        )
    return (
        records
        | "To JSON" >> beam.Map(json_line)
        | beam.io.WriteToText(prefix, file_name_suffix=suffix, num_shards=num_shards)
    )


def build_pipeline(pipeline, globs, handler, records, args):
    """Match -> read -> RunInference (keyed by path, batched) -> records and error records -> files."""
    import apache_beam as beam
    from apache_beam.io.fileio import MatchFiles
    from apache_beam.ml.inference.base import KeyedModelHandler, RunInference

    matches = [pipeline | f"Match {i}" >> MatchFiles(pattern) for i, pattern in enumerate(globs)]
    files = (
        matches
        | "All matches" >> beam.Flatten()
        | "Path keys" >> beam.Map(lambda m: os.fsencode(m.path))
        | "Each once" >> beam.Distinct()
        | "Read" >> beam.FlatMap(_read).with_outputs(ERRORS, main="images")
    )
    predicted = (
        files.images
        | RunInference(KeyedModelHandler(handler), metrics_namespace=METRICS)
        | "Records" >> beam.FlatMap(records).with_outputs(ERRORS, main="records")
    )
    _write(
        predicted.records | "Count predicted" >> beam.Map(_counted("predicted")),
        args.format,
        args.output,
        args.task,
        args.num_shards,
    )
    links = pipeline | "Links leading nowhere" >> beam.Create(dead_links(globs))
    (
        (files.errors, predicted.errors, links)
        | "All errors" >> beam.Flatten()
        | "Count skipped" >> beam.Map(_counted("skipped"))
        | "Errors to JSON" >> beam.Map(json_line)
        | "Write errors"
        >> beam.io.WriteToText(f"{args.output}-errors", file_name_suffix=".jsonl", num_shards=args.num_shards)
    )


def dead_links(globs):
    """Error records of the symbolic links a local INPUT_GLOB matches that lead nowhere (a missing
    target, a loop): Beam's MatchFiles leaves them out without a word."""
    found = []
    for pattern in globs:
        if "://" in pattern:
            continue
        for path in sorted(glob.glob(pattern)):
            try:
                os.stat(path)
            except OSError as e:
                key = os.fsencode(path)
                found.append({"path": key, "error": f"cannot read {_shown(key)}: {e.strerror}"})
    return found


# -- checks before the pipeline starts ------------------------------------------------------


def saved_model_of(artifact):
    """(SavedModel directory, export root holding config.json); FileNotFoundError naming the problem."""
    from conversion.predict import export_root, resolve_artifact

    path = resolve_artifact(artifact)
    if not os.path.isfile(os.path.join(path, "saved_model.pb")):
        raise FileNotFoundError(
            f"{artifact} is neither a SavedModel nor an export holding one "
            "(serving/<version>): convert with --formats saved_model"
        )
    return path, export_root(path)


def check_globs(globs, output_format):
    """ValueError naming an INPUT_GLOB that matches no file (Beam's MatchFiles would yield
    nothing), or, for Parquet records, a file whose name is not UTF-8 (a string column cannot
    hold it; JSON lines and TFRecords keep its bytes)."""
    from apache_beam.io.filesystems import FileSystems

    for pattern, result in zip(globs, FileSystems.match(list(globs))):
        if not result.metadata_list:
            raise ValueError(f"no images matched the INPUT_GLOB {pattern}")
        for path in (m.path for m in result.metadata_list):
            if output_format == "parquet" and os.fsencode(path) != path.encode("utf-8", "replace"):
                pattern, path = (os.fsencode(p).decode("utf-8", "backslashreplace") for p in (pattern, path))
                raise ValueError(
                    f"INPUT_GLOB {pattern} matches {path}, whose name is not UTF-8 text, which a "
                    "Parquet string column cannot hold: use --format jsonl or tfrecord, or rename it"
                )


def check_tfrecord_writer():
    """ValueError when Beam's TFRecord writer lacks its CRC32C library: it would fail only after
    every image was predicted. Beam's own lookup is asked, so the check and the writer agree."""
    from apache_beam.io.tfrecordio import _default_crc32c_fn

    try:
        _default_crc32c_fn(b"")
    except RuntimeError:
        raise ValueError(
            "--format tfrecord needs a CRC32C library for Beam's TFRecord writer: "
            "pip install 'tfbit[beam]' (google-crc32c) or 'apache-beam[tfrecord]' (crcmod)"
        ) from None


def signature_outputs(saved_model):
    """{output name: static shape} of `serving_default`, read from saved_model.pb; ValueError
    naming a damaged export (`conversion.runners.check_saved_model`)."""
    from conversion.runners import check_saved_model

    signatures = check_saved_model(saved_model)
    if "serving_default" not in signatures:
        raise ValueError(f"{saved_model} has no serving_default signature: export it with python -m conversion.convert")
    signature = signatures["serving_default"]
    return {name: [d.size for d in t.tensor_shape.dim] for name, t in signature.outputs.items()}


def check_task(task, outputs, saved_model):
    """ValueError when the export does not have the outputs `task` needs; returns those outputs."""
    needed = ("features",) if task == "features" else ("labels", "scores", "probabilities")
    if all(name in outputs for name in needed):
        return needed
    other = "features" if "features" in outputs else "classification" if "logits" in outputs else None
    hint = f"run with --task {other}" if other else "batch_predict runs classification and features exports"
    raise ValueError(
        f"--task {task} needs the output(s) {', '.join(needed)}, but {saved_model} has "
        f"{', '.join(sorted(outputs))}: {hint}"
    )


# -- the command line ------------------------------------------------------------------------


def build_parser():
    parser = cli.parser("conversion.batch_predict", __doc__)
    parser.add_argument("artifact", help="export directory (saved_models/<name>) or SavedModel directory")
    parser.add_argument("globs", nargs="+", metavar="INPUT_GLOB", help="image file patterns (any Beam filesystem)")
    parser.add_argument("--output", required=True, metavar="PREFIX", help="output file prefix (see below)")
    parser.add_argument("--task", choices=TASKS, default="classification")
    parser.add_argument("--normalize", action="store_true", help="features of unit L2 norm (--task features)")
    parser.add_argument("--format", choices=FORMATS, default="jsonl", help="record files (default: jsonl)")
    parser.add_argument("--batch-size", type=cli.positive_int, default=32, help="images per model call")
    parser.add_argument("--top-k", type=cli.positive_int, default=5, help="labels per image (classification)")
    parser.add_argument(
        "--num-shards", type=cli.positive_int, default=0, help="files per output (default: Beam's choice)"
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="remove the files of an earlier run with the same --output first"
    )
    cli.add_verbose(parser)
    return parser


# What Beam logs when its modules are imported without optional extras, noise here: "apitools
# not found" (the gcp extra, not needed for local files) and, with crcmod (the tfrecord extra),
# that python-snappy or google-crc32c "is not as fast as it could be" (crcmod's C extension
# checksums at hundreds of MB/s, far beyond what the model predicts).
_BEAM_IMPORT_NOTICES = ("apitools not found", "Couldn't find python-snappy or google-crc32c")


class _HideBeamImportNotices(logging.Filter):
    def filter(self, record):
        return not record.getMessage().startswith(_BEAM_IMPORT_NOTICES)


def _beam_temp_folders(prefix):
    folder, name = os.path.split(os.path.abspath(prefix))
    return set(glob.glob(os.path.join(glob.escape(folder), f"beam-temp-{glob.escape(name)}-*")))


def _run(pipeline, prefix):
    """The finished pipeline's result; on a full disk an OSError saying so, after removing the
    temporary folders the run's writers had started (Beam leaves them on failure)."""
    before = _beam_temp_folders(prefix)
    logging.getLogger("apache_beam.runners.common").addFilter(_HideOutOfSpaceLogs())
    try:
        result = pipeline.run()
        result.wait_until_finish()
        return result
    except Exception as e:  # Beam re-raises a worker's error as its own type, the reason in the text
        if not (reason := diskspace.out_of_space(e)):
            raise
        for folder in _beam_temp_folders(prefix) - before:
            shutil.rmtree(folder, ignore_errors=True)
        raise OSError(f"{reason} while writing {prefix}-*") from None


class _HideOutOfSpaceLogs(logging.Filter):
    """Beam logs a worker's error with its traceback before re-raising it; a full disk gets one
    line instead (`_run`)."""

    def filter(self, record):
        return not diskspace.out_of_space_in(record.getMessage())


def hide_beam_import_notices():
    """Hidden like TensorFlow's log lines unless --verbose (see `_BEAM_IMPORT_NOTICES`)."""
    for name in ("", "apache_beam.io.tfrecordio"):  # a filter acts on its own logger's records only
        logging.getLogger(name).addFilter(_HideBeamImportNotices())


def _metric(result, name):
    """A counter's total or a distribution's sum in our namespace (committed where the runner has it)."""
    from apache_beam.metrics.metric import MetricsFilter

    found = result.metrics().query(MetricsFilter().with_namespace(METRICS).with_name(name))
    values = [
        m.committed if m.committed is not None else m.attempted for m in found["counters"] + found["distributions"]
    ]
    return sum(v if isinstance(v, int) else v.sum for v in values)


def summary(result, seconds):
    """(images predicted, images skipped, the line saying what was done). RunInference's own
    metrics give the time in model calls and in loading it, so the rate without start-up is known too."""
    predicted, skipped = _metric(result, "predicted"), _metric(result, "skipped")
    calls = _metric(result, "inference_batch_latency_micro_secs") / 1e6
    loading = _metric(result, "load_model_latency_milli_secs") / 1e3
    line = (
        f"predicted {predicted} images, skipped {skipped} in {seconds:.1f} s "
        f"({predicted / seconds:.1f} images/s); model calls {calls:.1f} s "
        f"({predicted / max(calls, 1e-9):.1f} images/s), model loading {loading:.1f} s"
    )
    return predicted, skipped, line


def earlier_shards(prefix):
    """The files an earlier run wrote with this output prefix (records of any format, errors)."""
    from apache_beam.io.filesystems import FileSystems

    patterns = [f"{prefix}-?????-of-?????.{f}" for f in FORMATS] + [f"{prefix}-{ERRORS}-?????-of-?????.jsonl"]
    return sorted(m.path for result in FileSystems.match(patterns) for m in result.metadata_list)


def check_prefix_folder(prefix):
    """ValueError when the folder of a local PREFIX cannot be written: Beam would fail only once
    it starts writing, with a traceback. Remote filesystems answer for themselves."""
    if "://" in prefix:
        return
    folder = diskspace.existing_ancestor(os.path.dirname(os.path.abspath(prefix)))  # Beam creates the rest
    if not os.path.isdir(folder):
        raise ValueError(f"--output {prefix}: {folder} is a file, not a folder")
    if not os.access(folder, os.W_OK):
        raise ValueError(f"--output {prefix}: cannot write in {folder} (read-only folder)")


def claim_prefix(prefix, overwrite):
    """A run owns its output prefix: shards of an earlier run (another --num-shards or --format
    would leave them beside the new ones, and `neighbours` would read both) are refused, or
    removed first with --overwrite."""
    from apache_beam.io.filesystems import FileSystems

    found = earlier_shards(prefix)
    if found and not overwrite:
        more = f" and {len(found) - 1} more" if len(found) > 1 else ""
        raise ValueError(
            f"--output {prefix}: an earlier run's files are there ({found[0]}{more}): pass --overwrite to "
            "remove them first, or choose another prefix"
        )
    if found:
        FileSystems.delete(found)


def _pipeline(args, beam_args):
    """The whole pipeline, built after every check that can fail (the cheap ones before TensorFlow
    is imported); FileNotFoundError/ValueError naming the problem."""
    from conversion import environment

    if args.normalize and args.task != "features":
        raise ValueError("--normalize scales feature vectors: it needs --task features")
    if args.format == "tfrecord":
        check_tfrecord_writer()
    saved_model, root = saved_model_of(args.artifact)
    check_globs(args.globs, args.format)
    check_prefix_folder(args.output)
    claim_prefix(args.output, args.overwrite)
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions

    pipeline = beam.Pipeline(options=PipelineOptions(beam_args))  # refuses an unknown --runner
    environment.configure(args.verbose)  # before anything imports TensorFlow
    from tfbit.models.config import BitConfig

    outputs = signature_outputs(saved_model)
    handler = _model_handler_class()(saved_model, check_task(args.task, outputs, saved_model), args.batch_size)
    labels = BitConfig.from_pretrained(root).id2label
    signature_k = outputs.get("scores", [None])[-1]
    build_pipeline(
        pipeline, args.globs, handler, _Records(args.task, labels, args.top_k, signature_k, args.normalize), args
    )
    return pipeline


def main(argv=None):
    args, beam_args = build_parser().parse_known_args(argv)
    if not args.verbose:
        hide_beam_import_notices()
    try:
        pipeline = _pipeline(args, beam_args)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    started = time.perf_counter()
    try:
        result = _run(pipeline, args.output)
    except OSError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    predicted, skipped, line = summary(result, time.perf_counter() - started)
    print(line)
    print(f"records: {args.output}-SSSSS-of-NNNNN.{args.format}; errors: {args.output}-errors-SSSSS-of-NNNNN.jsonl")
    if not predicted:
        print("error: none of the images could be read (see the errors file)", file=sys.stderr)
        return 2
    return 1 if skipped else 0


if __name__ == "__main__":
    sys.exit(main())
