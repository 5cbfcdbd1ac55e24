"""Run an exported artifact on images and print the top-5 labels.

    python -m conversion.predict ARTIFACT PATH [PATH ...] [--top-k 5] [--json] [--threads N] [--xla]

ARTIFACT: an export directory (saved_models/<name>: uses its newest SavedModel), a fine-tuning
output folder (uses best.keras), a `.keras` file, a SavedModel directory (serving/<version>) or
a `.tflite` file. PATH: image files, folders (searched recursively) or glob patterns. Images
that cannot be read are reported by path and skipped. Labels and preprocessing come from the
config.json / preprocessor_config.json beside the artifact. CPU defaults (every core, oneDNN
off, XLA opt-in) are explained in `tfbit/runtime.py`.
Exit codes: 0 every image predicted, 1 some images skipped, 2 bad arguments or no usable image.
"""

import argparse
import glob
import json
import os
import sys

import numpy as np

from tfbit.image_files import IMAGE_EXTENSIONS


def _export_root(artifact):
    """The export directory holding config.json for any artifact inside it."""
    path = os.path.abspath(artifact)
    for candidate in (path, os.path.dirname(path), os.path.dirname(os.path.dirname(path)),
                      os.path.dirname(os.path.dirname(os.path.dirname(path)))):
        if os.path.isfile(os.path.join(candidate, "config.json")):
            return candidate
    raise FileNotFoundError(f"no config.json found beside {artifact}: is it inside a tfbit export?")


def _resolve(artifact):
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


def expand_paths(paths):
    """Image files named by `paths`: files as given, folders recursively, glob patterns."""
    found = []
    for path in paths:
        if os.path.isdir(path):
            found += sorted(os.path.join(d, f) for d, _, files in os.walk(path) for f in files
                            if f.lower().endswith(IMAGE_EXTENSIONS))
        elif os.path.exists(path):
            found.append(path)
        elif glob.has_magic(path):
            found += sorted(p for p in glob.glob(path, recursive=True) if os.path.isfile(p))
        else:
            found.append(path)  # reported as unreadable with the others
    return found


def predict(artifact, image_paths, top_k=5, threads=None, xla=False, on_error=None):
    """[(image path, [(label, probability), ...]), ...] for each readable image.

    Args:
        artifact: see the module docstring.
        image_paths: image files, folders or globs (see `expand_paths`).
        threads: LiteRT's thread count (TensorFlow's is set by `tfbit.runtime.set_threads`).
        xla: compile a `.keras` model with XLA (faster per image, ~20-40 s to compile R50x1).
        on_error: called with (path, message) for each image that cannot be read; by default
            the first one raises ValueError.
    """
    from conversion import runners
    from tfbit.config import BitConfig
    from tfbit.image_files import load_image
    from tfbit.image_processor import BitImageProcessor

    path = _resolve(artifact)
    if xla and not path.endswith(".keras"):
        raise ValueError(f"--xla compiles .keras models only; {path} is a "
                         f"{'TFLite file' if path.endswith('.tflite') else 'SavedModel'}")
    root = _export_root(path)
    config = BitConfig.from_pretrained(root)
    if path.endswith(".keras"):
        run = runners.keras_runner(path, jit_compile=xla)
    elif path.endswith(".tflite"):
        run = runners.tflite_runner(path, threads)
    else:
        run = runners.saved_model_runner(path, "serving_default")
    processor = BitImageProcessor.from_pretrained(root) if path.endswith((".keras", ".tflite")) else None

    def fail(image_path, message):
        if on_error is None:
            raise ValueError(message)
        on_error(image_path, message)

    results = []
    for image_path in expand_paths(image_paths):
        try:
            if processor is not None:
                logits = run(processor([load_image(image_path)]))["logits"][0]
            else:  # the SavedModel decodes and preprocesses itself, as under TF Serving
                logits = _run_encoded(run, image_path)
        except (FileNotFoundError, IsADirectoryError, ValueError) as e:
            fail(image_path, str(e))
            continue
        except KeyError:  # a features or backbone export
            raise ValueError(f"{path} has no logits output: predict needs a classification export") from None
        probabilities = np.exp(logits - logits.max())
        probabilities /= probabilities.sum()
        best = np.argsort(-probabilities)[:top_k]
        results.append((image_path, [(config.id2label[int(i)], float(probabilities[i])) for i in best]))
    return results


def _run_encoded(run, image_path):
    import tensorflow as tf
    if not os.path.isfile(image_path):
        raise FileNotFoundError(f"image file not found: {image_path}")
    with open(image_path, "rb") as f:
        data = f.read()
    try:
        return run(np.array([data], dtype=object))["logits"][0]
    except tf.errors.InvalidArgumentError as e:
        raise ValueError(f"cannot read {image_path} as an image: {e.message.strip().splitlines()[0]}") from None


def main(argv=None):
    from conversion import environment
    environment.inference_defaults()  # before anything imports TensorFlow
    from tfbit import runtime
    parser = argparse.ArgumentParser(prog="python -m conversion.predict", description=__doc__.split("\n\n")[0])
    parser.add_argument("artifact")
    parser.add_argument("images", nargs="+", help="image files, folders (recursive) or glob patterns")
    parser.add_argument("--top-k", type=runtime.positive_int, default=5)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--threads", type=runtime.positive_int, help="CPU threads (default: every available core)")
    parser.add_argument("--xla", action="store_true", help="compile a .keras model with XLA (for many images)")
    args = parser.parse_args(argv)
    threads = runtime.set_threads(args.threads)
    skipped = []

    def report(path, message):
        skipped.append(path)
        print(f"skipped: {message}", file=sys.stderr)

    try:
        results = predict(args.artifact, args.images, args.top_k, threads, args.xla, on_error=report)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not results:
        print("error: none of the images could be read", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps([{"image": p, "top": [{"label": l, "probability": s} for l, s in top]}
                          for p, top in results], indent=2))
    else:
        for image_path, top in results:
            print(image_path)
            for label, probability in top:
                print(f"  {probability:7.2%}  {label}")
    return 1 if skipped else 0


if __name__ == "__main__":
    sys.exit(main())
