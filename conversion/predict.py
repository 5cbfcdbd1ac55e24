"""Run an exported artifact on images: top-k labels, a predictions file, or an evaluation.

    python -m conversion.predict ARTIFACT PATH [PATH ...] [--top-k 5] [--batch-size 32]
           [--output preds.csv|preds.jsonl] [--evaluate [--confusion-matrix FILE]] [--json]

ARTIFACT: an export directory (saved_models/<name>: uses its newest SavedModel), a fine-tuning
output folder (uses best.keras), a `.keras` file (a tfbit model or your own Keras model built on
one), a SavedModel directory (serving/<version>) or a `.tflite` file. PATH: image files, folders
(searched recursively) or glob patterns. Images that cannot be read are reported by path and
skipped. Labels and preprocessing come from the config.json / preprocessor_config.json beside
the artifact; a `.keras` file without them uses its own labels (else LABEL_<i>, or --labels)
and its BitPreprocessing layer (else --preprocessor). CPU defaults (every core, oneDNN off,
XLA opt-in) are explained in `conversion/runtime.py`.

--evaluate: each PATH is a labelled folder, root/<label>/... (any depth below <label>); prints
the top-1 accuracy and writes a confusion-matrix PNG.
--output: a file name that is not UTF-8 is written recoverably, in CSV as its own bytes (read
the file with errors="surrogateescape"), in JSON lines as Python's surrogate escapes ("\\udce9");
os.fsencode of the value read back gives the name's bytes.
Exit codes: 0 every image predicted, 1 some images skipped, 2 bad arguments or no usable image.
"""

import csv
import dataclasses
import glob
import json
import os
import re
import sys
from typing import Callable

from conversion import cli, diskspace, environment

OUTPUT_SUFFIXES = (".csv", ".jsonl")


def export_root(artifact, required=True):
    """The export directory holding config.json for any artifact inside it; None when there is
    none and not `required` (a `.keras` file knows its own labels)."""
    path = os.path.abspath(artifact)
    for candidate in (
        path,
        os.path.dirname(path),
        os.path.dirname(os.path.dirname(path)),
        os.path.dirname(os.path.dirname(os.path.dirname(path))),
    ):
        if os.path.isfile(os.path.join(candidate, "config.json")):
            return candidate
    if not required:
        return None
    raise FileNotFoundError(f"no config.json found beside {artifact}: is it inside a tfbit export?")


def resolve_artifact(artifact):
    from conversion.publish import next_serving_version

    if not os.path.exists(artifact):
        raise FileNotFoundError(f"no artifact at {artifact}")
    if os.path.isdir(artifact) and not os.path.exists(os.path.join(artifact, "saved_model.pb")):
        newest = next_serving_version(artifact) - 1
        if newest:
            return os.path.join(artifact, "serving", str(newest))
        kept = sorted(glob.glob(os.path.join(artifact, "*.keras")))
        best = os.path.join(artifact, "best.keras")  # a fine-tuning output folder
        if kept:
            return best if best in kept else kept[0]
        raise FileNotFoundError(f"{artifact} holds no SavedModel, serving/<version> or .keras file")
    return artifact


def _images_in(folder):
    from tfbit.preprocessing.decode import IMAGE_EXTENSIONS

    return sorted(
        os.path.join(d, f) for d, _, files in os.walk(folder) for f in files if f.lower().endswith(IMAGE_EXTENSIONS)
    )


def expand_paths(paths):
    """Image files named by `paths`: files as given, folders recursively, glob patterns; each
    file once, in the order first named (a folder and a glob inside it may overlap)."""
    found = []
    for path in paths:
        if os.path.isdir(path):
            found += _images_in(path)
        elif os.path.exists(path):
            found.append(path)
        elif glob.has_magic(path):
            found += sorted(p for p in glob.glob(path, recursive=True) if os.path.isfile(p))
        else:
            found.append(path)  # reported as unreadable with the others
    return list(dict.fromkeys(os.path.normpath(p) for p in found))


def labelled_paths(roots, labels):
    """[(image path, true label)] of labelled folders root/<label>/...; ValueError naming a root
    that is not a folder or sub-folders that are not among `labels`."""
    found, unknown = [], []
    for root in roots:
        if not os.path.isdir(root):
            raise ValueError(f"--evaluate needs labelled folders (root/<label>/...): {root} is not a folder")
        for name in sorted(os.listdir(root)):
            if not os.path.isdir(os.path.join(root, name)):
                continue
            if name not in labels:
                unknown.append(os.path.join(root, name))
            found += [(path, name) for path in _images_in(os.path.join(root, name))]
    if unknown:
        shown = sorted(labels)[:10]
        raise ValueError(
            f"--evaluate: folder(s) {', '.join(unknown)} are not labels of the model "
            f"(its labels: {', '.join(shown)}{', ...' if len(labels) > len(shown) else ''})"
        )
    if not found:
        raise ValueError(f"--evaluate: no images in label sub-folders of {', '.join(roots)}")
    return found


class Classifier:
    """An exported artifact as `logits(paths) -> [(path, logits or None, error message)]`, one
    batch at a time: `.keras` and TFLite files on images preprocessed in Python, a SavedModel on
    encoded files (it decodes and preprocesses them itself, as under TF Serving)."""

    def __init__(self, artifact, threads=None, xla=False, labels=None, preprocessor=None):
        """`labels`: a labels file (one per line) replacing the export's; `preprocessor`: a
        preprocessor_config.json (or its folder) for a `.keras` file that has none beside it."""
        environment.require_tensorflow_backend("predict needs", "predict")
        from conversion import runners
        from tfbit.models import user_models
        from tfbit.models.config import BitConfig

        self.path = path = resolve_artifact(artifact)
        if xla and not path.endswith(".keras"):
            raise ValueError(
                f"--xla compiles .keras models only; {path} is a "
                f"{'TFLite file' if path.endswith('.tflite') else 'SavedModel'}"
            )
        runners.check_file(path)  # a damaged file is named as such, before what lies beside it
        root = export_root(path, required=not path.endswith(".keras"))
        own_processor = None
        if path.endswith(".keras"):
            own_processor, model = runners.load_keras(path)
            try:
                user_models.check_task(model, "classification", path)
            except ValueError:
                raise ValueError(
                    f"{path} has no logits output: predict needs a classification export "
                    f"(its outputs: {', '.join(user_models.output_shapes(model))})"
                ) from None
            self.run = runners.model_runner(model, jit_compile=xla)
        elif path.endswith(".tflite"):
            self.run = runners.tflite_runner(path, threads)
        else:
            self.run = runners.saved_model_runner(path, "serving_default")
        self.labels = user_models.read_labels(labels) if labels else None
        if root is not None and self.labels is None:
            self.labels = BitConfig.from_pretrained(root).id2label
        elif path.endswith(".keras"):  # the model's own labels, checked against its output
            self.labels = user_models.output_labels(model, self.labels)
        self.encoded = not path.endswith((".keras", ".tflite"))
        self.processor = None if self.encoded else self._processor(path, root, own_processor, preprocessor)
        # a `--tflite-input uint8` file takes the processor's crops unnormalized
        self.raw_crops = path.endswith(".tflite") and runners.tflite_takes_uint8(path)
        self.probabilities = False  # its output: logits until it shows probabilities (`_output`)

    @staticmethod
    def _processor(path, root, own, preprocessor):
        """The model's own BitPreprocessing layer, else --preprocessor, else the export's file."""
        from tfbit.preprocessing.processor import BitImageProcessor

        if own is not None:
            if preprocessor:
                raise ValueError(
                    f"{path} preprocesses its input itself (a BitPreprocessing layer): drop --preprocessor"
                )
            return own
        if preprocessor:
            return BitImageProcessor.from_pretrained(preprocessor)
        for folder in filter(None, (root, os.path.dirname(os.path.abspath(path)))):
            if os.path.isfile(os.path.join(folder, "preprocessor_config.json")):
                return BitImageProcessor.from_pretrained(folder)
        raise ValueError(
            f"{path} has no preprocessor_config.json beside it, so its image size and "
            "normalization are unknown: pass --preprocessor FILE (or start the model with a "
            "tfbit.BitPreprocessing layer)"
        )

    def logits(self, paths):
        """[(path, logits or None, why not)] of one batch of image files."""
        results, inputs = {}, {}
        for path in paths:
            try:
                inputs[path] = self._read(path)
            except (OSError, ValueError) as e:
                results[path] = (None, str(e))
        if inputs:
            results.update(zip(inputs, self._run(list(inputs.values()), list(inputs))))
        return [(path, *results[path]) for path in paths]

    def _read(self, path):
        from tfbit.preprocessing.decode import load_image, read_file

        if self.encoded:
            return read_file(path)
        from conversion import runners

        if self.raw_crops:
            return runners.raw_crops(self.processor, [load_image(path)])[0]
        return self.processor([load_image(path)])[0]

    def _run(self, inputs, paths):
        """(logits or None, why not) of each input; a SavedModel batch holding an image its
        decoder refuses is rerun image by image, so only that image is skipped."""
        import numpy as np
        import tensorflow as tf

        batch = np.array(inputs, dtype=object) if self.encoded else np.stack(inputs)
        try:
            with environment.cli_logs_filtered():  # LiteRT's XNNPACK notice at the first call
                return [(logits, "") for logits in self._output(self.run(batch))]
        except tf.errors.InvalidArgumentError as e:
            if len(inputs) > 1:
                return [out for x, p in zip(inputs, paths) for out in self._run([x], [p])]
            return [(None, f"cannot read {paths[0]} as an image: {decoder_message(e.message)}")]

    def _output(self, outputs):
        # a `--tflite-input uint8` classifier outputs probabilities itself: ranked as they are
        self.probabilities = "probabilities" in outputs and "logits" not in outputs
        if self.probabilities:
            return outputs["probabilities"]
        if "logits" not in outputs:  # a features or backbone export
            raise ValueError(f"{self.path} has no logits output: predict needs a classification export")
        return outputs["logits"]


def decoder_message(message):
    """The serving decoder's reason ("could not decode image: ...") out of TensorFlow's report:
    the graph's own check, else the message of the TensorFlow decoder that refused the data
    (the report's other lines are where in the graph it happened)."""
    found = re.search(r"tfbit: image \d+ of the batch: ([^\]]*)\]", message)
    if found:
        return found.group(1)
    lines = [line.strip() for line in message.strip().splitlines()]
    where = ("Graph execution error", "Detected at node", "<stack traces", "[[", "File ")
    reasons = [line for line in lines if line and not line.startswith(where) and not line.endswith(":")]
    return f"could not decode image: {reasons[0]}" if reasons else lines[0]


def ranked(scores, labels, k, probabilities=False):
    """The `k` most probable (label, probability) of one image: `scores` are its logits, or its
    probabilities when the model outputs them (`probabilities`)."""
    import numpy as np

    if not probabilities:
        scores = np.exp(scores - scores.max())
        scores = scores / scores.sum()
    best = np.argsort(-scores, kind="stable")[:k]
    return [(labels[int(i)], float(scores[i])) for i in best]


@dataclasses.dataclass
class Options:
    """How `predict` runs: its keyword arguments (see `predict`)."""

    top_k: int = 5
    threads: int | None = None
    xla: bool = False
    on_error: Callable | None = None
    batch_size: int = 32
    progress: Callable | None = None
    labels: str | None = None
    preprocessor: str | None = None

    def classifier(self, artifact):
        return Classifier(artifact, self.threads, self.xla, self.labels, self.preprocessor)


def predict(artifact, image_paths, **options):
    """[(image path, [(label, probability), ...]), ...] for each readable image.

    Args:
        artifact: see the module docstring.
        image_paths: image files, folders or globs (see `expand_paths`).
        **options: the fields of `Options`:
            top_k: the labels returned per image.
            threads: LiteRT's thread count (TensorFlow's is set by `conversion.runtime.set_threads`).
            xla: compile a `.keras` model with XLA (faster per image, ~20-40 s to compile R50x1).
            on_error: called with (path, message) for each image that cannot be read; by default
                the first one raises ValueError.
            batch_size: images per model call (TFLite files still run them one at a time).
            progress: called with the number of images done after each batch.
            labels: a labels file, one per line, replacing the export's (or a `.keras` model's).
            preprocessor: a preprocessor_config.json for a `.keras` file that has none beside it.
    """
    try:
        options = Options(**options)
    except TypeError as e:
        raise TypeError(f"predict() {str(e).removeprefix('Options.__init__() ')}") from None
    return list(_predictions(options.classifier(artifact), expand_paths(image_paths), options))


def _predictions(classifier, paths, options):
    batch_size = options.batch_size
    for start in range(0, len(paths), batch_size):
        for path, logits, message in classifier.logits(paths[start : start + batch_size]):
            if logits is None:
                if options.on_error is None:
                    raise ValueError(message)
                options.on_error(path, message)
            else:
                yield path, ranked(logits, classifier.labels, options.top_k, classifier.probabilities)
        if options.progress:
            options.progress(min(start + batch_size, len(paths)))


def write_predictions(path, results, truth=None):
    """`results` as CSV (path, label_1, score_1, ..., label_k, score_k) or JSON lines (path,
    labels, scores), with the true label when evaluating; written beside `path` and renamed
    into place once complete; names that are not UTF-8 as the module docstring says."""
    partial = f"{path}.partial-{os.getpid()}"
    try:
        with open(partial, "w", encoding="utf-8", errors="surrogateescape", newline="") as f:
            if path.endswith(".csv"):
                k = max((len(top) for _, top in results), default=0)
                writer = csv.writer(f)
                writer.writerow(
                    [
                        "path",
                        *(["true_label"] if truth else []),
                        *(f"{c}_{i}" for i in range(1, k + 1) for c in ("label", "score")),
                    ]
                )
                for image, top in results:
                    writer.writerow(
                        [
                            image,
                            *([truth[image]] if truth else []),
                            *(v for label, score in top for v in (label, f"{score:.6g}")),
                        ]
                    )
            else:
                for image, top in results:
                    record = {
                        "path": image,
                        **({"true_label": truth[image]} if truth else {}),
                        "labels": [label for label, _ in top],
                        "scores": [score for _, score in top],
                    }
                    f.write(json.dumps(record) + "\n")
        os.replace(partial, path)
    finally:
        if os.path.exists(partial):
            os.remove(partial)


def evaluate(results, truth, png):
    """Top-1 accuracy of `results` against `truth` ({path: label}); writes the confusion matrix
    (true labels in rows, predicted in columns, over the labels that occur) to `png`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    predicted = [top[0][0] for _, top in results]
    actual = [truth[path] for path, _ in results]
    accuracy = float(np.mean([p == a for p, a in zip(predicted, actual)]))
    labels = sorted(set(actual) | set(predicted), key=lambda name: (name not in actual, name))
    index = {name: i for i, name in enumerate(labels)}
    matrix = np.zeros((len(labels), len(labels)), int)
    for a, p in zip(actual, predicted):
        matrix[index[a], index[p]] += 1
    size = min(4 + 0.45 * len(labels), 30)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels, rotation=90)
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"accuracy {accuracy:.2%} on {len(actual)} images")
    if len(labels) <= 30:  # counts stay legible
        for (i, j), count in np.ndenumerate(matrix):
            if count:
                ax.text(j, i, count, ha="center", va="center", color="white" if count > matrix.max() / 2 else "black")
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return accuracy


def build_parser():
    parser = cli.parser("conversion.predict", __doc__)
    parser.add_argument("artifact")
    parser.add_argument("images", nargs="+", help="image files, folders (recursive) or glob patterns")
    parser.add_argument("--top-k", type=cli.positive_int, default=5)
    parser.add_argument("--batch-size", type=cli.positive_int, default=32, help="images per model call")
    parser.add_argument("--output", help="write the predictions to this .csv or .jsonl file (instead of printing them)")
    parser.add_argument(
        "--evaluate",
        action="store_true",
        help="PATHs are labelled folders root/<label>/...: print the accuracy and write a confusion matrix",
    )
    parser.add_argument(
        "--confusion-matrix",
        default="confusion_matrix.png",
        help="where --evaluate writes its PNG (default: confusion_matrix.png)",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    cli.add_threads(parser)
    parser.add_argument("--xla", action="store_true", help="compile a .keras model with XLA (for many images)")
    parser.add_argument(
        "--labels",
        help="labels file, one per line in the order of the model's outputs "
        "(default: the export's config.json, or a .keras model's own)",
    )
    parser.add_argument(
        "--preprocessor",
        help="preprocessor_config.json (or its folder) for a .keras file "
        "that has none beside it and no BitPreprocessing layer",
    )
    cli.add_verbose(parser)
    return parser


def _check_paths(args):
    """What can be refused before the slow start (TensorFlow's import): a missing or damaged
    artifact, outputs that cannot be written."""
    from conversion import runners

    if not os.path.exists(args.artifact):
        raise ValueError(f"no artifact at {args.artifact}")
    runners.check_file(resolve_artifact(args.artifact))
    files = [(args.output, "--output")] if args.output else []
    files += [(args.confusion_matrix, "--confusion-matrix")] if args.evaluate else []
    if args.output and not args.output.endswith(OUTPUT_SUFFIXES):
        raise ValueError(f"--output {args.output}: name a .csv or .jsonl file")
    for path, flag in files:
        folder = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(folder):
            raise ValueError(f"{flag} {path}: the folder {folder} does not exist")
        if os.path.isdir(path):
            raise ValueError(f"{flag} {path} is a folder: name a file")
        if not os.access(path if os.path.exists(path) else folder, os.W_OK):
            raise ValueError(f"{flag} {path}: cannot write there (read-only file or folder)")


def _show(args, results, truth, skipped):
    """Print or write the `results` as the arguments ask; `skipped`: how many images could not be read."""
    if args.output:
        write_predictions(args.output, results, truth)
        print(f"wrote {len(results)} predictions to {args.output}")
    elif args.json:
        print(
            json.dumps(
                [{"image": p, "top": [{"label": lb, "probability": s} for lb, s in top]} for p, top in results],
                indent=2,
            )
        )
    elif not args.evaluate:
        for image_path, top in results:
            print(image_path)
            for label, probability in top:
                print(f"  {probability:7.2%}  {label}")
    if args.evaluate:
        accuracy = evaluate(results, truth, args.confusion_matrix)
        correct = round(accuracy * len(results))
        print(
            f"accuracy: {accuracy:.2%} ({correct}/{len(results)} images"
            f"{f', {skipped} skipped' if skipped else ''}); confusion matrix: {args.confusion_matrix}"
        )


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        _check_paths(args)  # before the slow start
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    environment.configure(args.verbose)  # before anything else imports TensorFlow
    from conversion import runtime

    skipped = []

    def report(path, message):
        skipped.append(path)
        print(f"skipped: {message}", file=sys.stderr)

    options = Options(
        top_k=args.top_k,
        threads=runtime.set_threads(args.threads),
        xla=args.xla,
        on_error=report,
        batch_size=args.batch_size,
        labels=args.labels,
        preprocessor=args.preprocessor,
    )
    try:
        classifier = options.classifier(args.artifact)
        truth = dict(labelled_paths(args.images, set(classifier.labels.values()))) if args.evaluate else None
        paths = list(truth) if truth else expand_paths(args.images)
        options.progress = cli.Progress(len(paths), "images", single_step=len(paths) <= args.batch_size).update
        results = list(_predictions(classifier, paths, options))
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not results:
        print("error: none of the images could be read", file=sys.stderr)
        return 2
    try:
        _show(args, results, truth, len(skipped))
    except OSError as e:
        if not (reason := diskspace.out_of_space(e)):
            raise
        print(f"error: {reason}", file=sys.stderr)
        return 2
    return 1 if skipped else 0


if __name__ == "__main__":
    sys.exit(main())
