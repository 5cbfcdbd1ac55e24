"""Convert BiT weights (Hugging Face, timm, original .npz, tfbit .keras) into verified deployable
artifacts.

    python -m conversion.convert [SOURCE] [--output DIR] [--formats keras saved_model tflite]
                                 [--task classification|features|backbone] ...

Without SOURCE it converts the embedded digits checkpoint (the demo) and also prints each
artifact's accuracy on the held-out digits next to the accuracy transformers measured.

Steps: load the source -> gather real images -> export every artifact into a staging folder ->
verify each against the source -> publish the verified ones (see `conversion.publish`).
Exit codes: 0 every artifact verified; 1 some failed verification (the verified ones are
published, the others reported and left out); 2 bad arguments, source or output; 3 an internal
error (a bug: please report it with the traceback).
"""

import argparse
import dataclasses
import json
import os
import sys
import time
import traceback
from typing import Callable

import numpy as np

from tfbit import environment

DEFAULT_CHECKPOINT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "default_checkpoint")
DEFAULT_OUTPUT_ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "saved_models")
OUTPUT_FORMATS = ("keras", "saved_model", "tflite")
TFLITE_INPUTS = ("float32", "uint8")
EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INTERNAL = 1, 2, 3


class ConversionError(Exception):
    """A problem with the arguments, the source or the output location (exit code 2)."""


@dataclasses.dataclass
class Artifact:
    """One exported artifact: where it is (relative to the output folder), how to run it from
    disk, which inputs it takes ("pixels" or "encoded") and whether it must be lossless. Both
    SavedModel signatures are artifacts of one folder."""
    name: str
    path: str
    runner: Callable | None
    inputs: str = "pixels"
    lossless: bool = True
    error: str = ""  # why it could not be produced (then it has no runner)


def tflite_path(name, quantization, tflite_input="float32"):
    """A TFLite file's path in the output; files taking raw uint8 pixels end in `_uint8`."""
    return os.path.join("tflite", f"{name}_{quantization}{'_uint8' if tflite_input == 'uint8' else ''}.tflite")


def _log(message):
    print(message, flush=True)


# -- step 1: the source --------------------------------------------------------------------------

def load_source(source, task, source_format, preprocessor_path, log):
    import tfbit
    from tfbit.image_processor import BitImageProcessor
    try:
        model, checkpoint = tfbit.load_model(source, task=task, format=source_format)
    except (FileNotFoundError, ValueError, ImportError) as e:
        raise ConversionError(str(e)) from e
    if task == "classification" and not isinstance(model, tfbit.BitForImageClassification):
        raise ConversionError(f"{source} has no classification head: export it with --task features "
                              "or --task backbone")
    if preprocessor_path:
        try:
            processor = BitImageProcessor.from_pretrained(preprocessor_path)
        except (FileNotFoundError, ValueError, TypeError) as e:
            raise ConversionError(f"--preprocessor {preprocessor_path}: {e}") from e
    elif checkpoint.preprocessor is not None:
        processor = BitImageProcessor.from_dict(checkpoint.preprocessor)
    elif checkpoint.format == "keras":
        raise ConversionError(f"{source} has no preprocessor_config.json beside it, so the image size and "
                              "normalization it was trained with are unknown: put that file beside it "
                              "(tfbit.finetune writes one) or pass --preprocessor FILE")
    else:
        processor = BitImageProcessor()
        log("      warning: the checkpoint has no preprocessor_config.json: using transformers' "
            "BitImageProcessor defaults (224 px crop, CLIP mean/std); pass --preprocessor to override")
    return model, checkpoint, processor


# -- step 2: images ------------------------------------------------------------------------------

def gather_images(demo, images, num_images, calibration_images, label2id, need_calibration):
    """(verification images, calibration images or None)."""
    from conversion import images as real
    try:
        if demo:
            verification = real.digits_images("test")
            calibration = real.digits_images("train", calibration_images).images if need_calibration else None
            return verification, calibration
        if images:
            return real.folder_images(images, num_images, label2id, calibration_images if need_calibration else 0)
        verification = real.photo_images(num_images)
    except (FileNotFoundError, ValueError, ImportError) as e:
        raise ConversionError(str(e)) from e
    # 32 photos are too few to set some aside: calibrate on their mirror images
    calibration = real.mirrored(real.spread(verification.images, calibration_images)) if need_calibration else None
    return verification, calibration


# -- step 3: export ------------------------------------------------------------------------------

def export_artifacts(model, inference, processor, task, name, formats, quantizations, staging,
                     version, image_size, calibration, top_k, threads, log, tflite_input="float32",
                     saved_model_xla=False):
    """The artifacts of `model` (`inference`: its float32 folded form, which every graph is
    exported from) written into `staging`."""
    from conversion import export, runners, tflite_metadata
    artifacts = []
    model.config.save_pretrained(staging)
    processor.save_pretrained(staging)
    if "keras" in formats:
        log("      .keras")
        model.save(os.path.join(staging, f"{name}.keras"))
        # a mixed-precision model (a fine-tune) computes in float16/bfloat16: not float32 parity
        artifacts.append(Artifact("keras", f"{name}.keras", lambda p: runners.keras_runner(p, task=task),
                                  lossless=model.dtype_policy.name == "float32"))
    if "saved_model" in formats:
        log(f"      TF Serving SavedModel (version {version})")
        path = os.path.join("serving", str(version))
        export.write_saved_model(inference, task, processor.to_dict(), model.config.id2label,
                                 os.path.join(staging, path), top_k, xla=saved_model_xla)
        artifacts.append(Artifact("saved_model[pixel_values]", path,
                                  lambda p: runners.saved_model_runner(p, "pixel_values")))
        artifacts.append(Artifact("saved_model[image_bytes]", path,
                                  lambda p: runners.saved_model_runner(p, "serving_default"),
                                  inputs="encoded", lossless=False))
    if "tflite" in formats:
        raw = tflite_input == "uint8"  # raw RGB crops in, normalized inside
        log(f"      TFLite {', '.join(quantizations)}{' (raw uint8 input)' if raw else ''}")
        os.makedirs(os.path.join(staging, "tflite"))
        calib = None
        if calibration is not None:
            calib = runners.raw_crops(processor, calibration) if raw else processor(calibration)
        files = export.tflite_models(inference, task, image_size, quantizations, calib, processor if raw else None)
        labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
        for q, flatbuffer in files.items():
            path, artifact = tflite_path(name, q, tflite_input), f"tflite_{q}{'[uint8]' if raw else ''}"
            if isinstance(flatbuffer, export.VariantError):  # reported as a failed artifact
                artifacts.append(Artifact(artifact, path, None, lossless=False, error=str(flatbuffer)))
                continue
            if task == "classification":  # labels and normalization for the LiteRT support tooling
                flatbuffer = tflite_metadata.add_classifier_metadata(
                    flatbuffer, labels, *tflite_metadata.pixel_normalization(processor), name,
                    f"BiT image classifier ({q}) converted by tfbit")
            with open(os.path.join(staging, path), "wb") as f:
                f.write(flatbuffer)
            artifacts.append(Artifact(artifact, path, lambda p: runners.tflite_runner(p, threads),
                                      inputs="crops" if raw else "pixels", lossless=q == "fp32"))
    return artifacts


# -- step 4: verify ------------------------------------------------------------------------------

def reference_outputs(model, inference, checkpoint, task, pixel_values, log):
    """Reference outputs on the preprocessed images: the PyTorch source where possible, else
    the float32 inference form of the Keras model."""
    from conversion.references import torch_reference
    reference = torch_reference(checkpoint, model) if task == "classification" else None
    if reference is not None:
        import torch
        with torch.no_grad():
            out = reference(torch.from_numpy(np.ascontiguousarray(pixel_values.transpose(0, 3, 1, 2))))
        log(f"      reference: the PyTorch source model ({type(reference).__name__})")
        return {"logits": (out.logits if hasattr(out, "logits") else out).numpy()}, "pytorch"
    log("      reference: the Keras model (no PyTorch source for this task/source)")
    out = inference.predict(pixel_values, verbose=0, batch_size=16)
    if task == "features":
        out = {"features": out["pooler_output"]}
    return (out if isinstance(out, dict) else {"logits": out}), "keras"


def verify_artifacts(artifacts, staging, reference, pixel_values, images, crops=None):
    """`crops`: the raw uint8 crops of the images, for files taking them."""
    from conversion import verify
    inputs = {"pixels": pixel_values, "encoded": np.array(images.encoded, dtype=object), "crops": crops}
    rows = []
    for artifact in artifacts:
        if artifact.error:
            rows.append(verify.Row(artifact.name, artifact.path, 0, float("nan"), float("nan"), "could not be produced",
                                   None, None, None, float("nan"), False, artifact.error.splitlines()[0]))
            continue
        path = os.path.join(staging, artifact.path)
        row = verify.compare(artifact.name, path, artifact.runner(path), inputs[artifact.inputs], reference,
                             images.labels, lossless=artifact.lossless)
        rows.append(dataclasses.replace(row, path=artifact.path))
    return rows


# -- the pipeline --------------------------------------------------------------------------------

def convert(source=None, output=None, name=None, formats=OUTPUT_FORMATS, quantizations=None,
            task="classification", source_format=None, overwrite=False, images=None,
            num_images=32, top_k=5, calibration_images=16, threads=None, keep_failed=False,
            preprocessor=None, log=_log, tflite_input="float32", saved_model_xla=False):
    """Convert, export, verify, publish; returns the report dict.

    Args:
        source: anything `tfbit.load_model` loads; None converts the embedded digits demo.
        output: the output folder (default `saved_models/<name>`).
        formats: a subset of `OUTPUT_FORMATS`; quantizations: TFLite variants
            (`conversion.export.TFLITE_QUANTIZATIONS`).
        overwrite: replace artifacts tfbit wrote before in `output` (never other files).
        images: a folder of real images to verify and calibrate on (default: the shipped
            photos; the digits for the demo).
        keep_failed: publish artifacts that failed verification too (still reported).
        preprocessor: a preprocessor_config.json (or its folder) replacing the source's.
        tflite_input: "uint8" writes TFLite files taking raw RGB uint8 crops at batch 1, which
            normalize inside (`tflite/<name>_<q>_uint8.tflite`), instead of float pixel values.
        saved_model_xla: compile the SavedModel's forward pass with XLA (TF Serving then needs
            `--xla_cpu_compilation_enabled=true`; see `conversion.export.write_saved_model`).

    Raises ConversionError on bad input.
    """
    from conversion import export, publish

    try:
        environment.require_tensorflow_backend("exports need", "the converter")
    except ValueError as e:
        raise ConversionError(f"{e}; .keras files written under JAX or PyTorch convert as they are") from None
    quantizations = tuple(quantizations or export.TFLITE_QUANTIZATIONS)
    unknown = sorted(set(formats) - set(OUTPUT_FORMATS)) + sorted(set(quantizations) - set(export.TFLITE_QUANTIZATIONS))
    if unknown:
        raise ConversionError(f"unknown format(s) {unknown}: choose from {OUTPUT_FORMATS} and TFLite "
                              f"quantizations {export.TFLITE_QUANTIZATIONS}")
    if tflite_input not in TFLITE_INPUTS:
        raise ConversionError(f"unknown TFLite input {tflite_input!r}: choose from {TFLITE_INPUTS}")
    from tfbit.pretrained import TASKS
    if task not in TASKS:
        raise ConversionError(f"unknown task {task!r}: choose from {TASKS}")
    need_calibration = "tflite" in formats and "int8" in quantizations
    if need_calibration and calibration_images < 1:
        raise ConversionError(f"full int8 TFLite needs calibration images, got calibration_images={calibration_images}")
    if num_images < 1:
        raise ConversionError(f"verification needs at least one image, got num_images={num_images}")
    demo = source is None
    started = time.perf_counter()
    log(f"[1/5] loading {'the embedded digits checkpoint' if demo else source}")
    model, checkpoint, processor = load_source(DEFAULT_CHECKPOINT if demo else source, task, source_format,
                                               preprocessor, log)
    config = model.config
    name = name or ("digits" if demo else checkpoint.name)
    output = os.path.abspath(output or os.path.join(DEFAULT_OUTPUT_ROOT, name))
    log(f"      {checkpoint.format} checkpoint, {config.num_labels} labels, "
        f"{sum(int(np.prod(w.shape)) for w in model.weights) / 1e6:.1f} M parameters")
    real, calibration = gather_images(demo, images, num_images, calibration_images, config.label2id,
                                      need_calibration)
    try:
        pixel_values = processor(real.images)
    except ValueError as e:
        raise ConversionError(f"the images cannot be preprocessed: {e}") from e
    image_size = pixel_values.shape[1:3]

    try:
        with publish.OutputLock(output):
            return _export_verify_publish(model, checkpoint, processor, task, name, formats, quantizations,
                                          output, overwrite, keep_failed, image_size, calibration, top_k,
                                          threads, real, pixel_values, demo, source, started, log,
                                          tflite_input, saved_model_xla)
    except publish.OutputError as e:  # the output is locked, or publishing would lose a file
        raise ConversionError(str(e)) from e


def _export_verify_publish(model, checkpoint, processor, task, name, formats, quantizations, output,
                           overwrite, keep_failed, image_size, calibration, top_k, threads, real,
                           pixel_values, demo, source, started, log, tflite_input, saved_model_xla=False):
    from conversion import export, publish, runners, verify
    version = publish.next_serving_version(output)
    planned = ["config.json", "preprocessor_config.json", "report.json"]
    planned += [f"{name}.keras"] * ("keras" in formats) + [f"serving/{version}"] * ("saved_model" in formats)
    planned += [tflite_path(name, q, tflite_input) for q in quantizations if "tflite" in formats]
    # Refused before the slow export, not after it.
    publish.check_output(output, planned, source_paths=checkpoint.files, overwrite=overwrite)
    with publish.staging_dir(output) as staging:
        log(f"[2/5] exporting into {staging}")
        inference = export.float32_inference_model(model)
        artifacts = export_artifacts(model, inference, processor, task, name, formats, quantizations, staging,
                                     version, image_size, calibration, top_k, threads, log, tflite_input,
                                     saved_model_xla)
        export_seconds = time.perf_counter() - started
        log(f"[3/5] verifying {len(artifacts)} artifacts on {real.description}")
        reference, reference_kind = reference_outputs(model, inference, checkpoint, task, pixel_values, log)
        crops = runners.raw_crops(processor, real.images) if tflite_input == "uint8" and "tflite" in formats else None
        with environment.cli_logs_filtered():  # LiteRT's notice when it first runs a file
            rows = verify_artifacts(artifacts, staging, reference, pixel_values, real, crops)
        failed = {r.path for r in rows if not r.passed}
        missing = {a.path for a in artifacts if a.error}  # could not be produced: nothing to publish
        published = sorted({a.path for a in artifacts} - missing - (set() if keep_failed else failed))
        report = {
            "source": str(source or DEFAULT_CHECKPOINT), "format": checkpoint.format, "task": task,
            "name": name, "reference": reference_kind, "images": real.description,
            "num_images": len(real.encoded), "image_size": list(image_size),
            "serving_version": version if os.path.join("serving", str(version)) in published else None,
            "export_seconds": round(export_seconds, 1),
            "verification_seconds": round(time.perf_counter() - started - export_seconds, 1),
            "artifacts": [dataclasses.asdict(r) | {"published": r.path in published} for r in rows],
            "passed": not failed,
        }
        if demo:
            with open(os.path.join(DEFAULT_CHECKPOINT, "metrics.json"), encoding="utf-8") as f:
                report["transformers_accuracy"] = json.load(f)["heldout_accuracy_transformers"]
        with open(os.path.join(staging, "report.json"), "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
        log("\n" + verify.format_table(rows))
        if demo:
            log(f"\nheld-out digits accuracy measured by transformers (PyTorch): "
                f"{report['transformers_accuracy']:.2%}")
        log(f"\nloading + export {report['export_seconds']} s, verification {report['verification_seconds']} s")
        log(f"[4/5] publishing {len(published)} verified artifact{'s' if len(published) != 1 else ''} into {output}")
        written = ["config.json", "preprocessor_config.json", *published, "report.json"]
        publish.publish(staging, output, written, source_paths=checkpoint.files, overwrite=overwrite)
    if failed:
        log(f"[5/5] verification FAILED for {', '.join(r.artifact for r in rows if not r.passed)}: "
            + _failure_advice(failed, missing, keep_failed, formats, quantizations, name, output, tflite_input))
    else:
        log(f"[5/5] all artifacts verified -> {output}")
    return report


def _failure_advice(failed, missing, keep_failed, formats, quantizations, name, output, tflite_input="float32"):
    """What happened to the failed artifacts, and the flags that keep or skip them."""
    kept = failed - missing
    if keep_failed:
        return "; ".join(filter(None, ["published anyway (--keep-failed)" if kept else "",
                                       f"{', '.join(sorted(missing))} could not be produced" if missing else ""]))
    variants = [q for q in quantizations if tflite_path(name, q, tflite_input) not in failed]
    dropped = {"keras": f"{name}.keras" in failed, "tflite": not variants,
               "saved_model": any(p.startswith("serving") for p in failed)}
    keep = [f for f in formats if not dropped[f]]
    if not keep:
        return f"nothing verified: {output} holds only the config files and report.json"
    flags = [f"--formats {' '.join(keep)}"] if keep != list(formats) else []
    if "tflite" in keep and variants != list(quantizations):
        flags.append(f"--tflite {' '.join(variants)}")
    advice = f"left out; the verified artifacts are in {output}. "
    advice += "Publish the failed ones anyway with --keep-failed, or skip them" if kept else "Skip them"
    return advice + (f" with {' '.join(flags)}" if flags else "")


def main(argv=None):
    # The parser imports no TensorFlow (conversion.cli): --help answers at once.
    from conversion import cli
    from conversion.cli import SOURCE_FORMATS, TASKS, TFLITE_QUANTIZATIONS
    parser = argparse.ArgumentParser(
        prog="python -m conversion.convert", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="SOURCE: a Hugging Face hub id (google/bit-50) or checkpoint directory, a timm "
               "name (timm/resnetv2_50x1_bit.goog_in21k) or state-dict file (.safetensors/.pth/"
               ".bin), an original BiT .npz file, a tfbit .keras file, or a preset name (bit-m-r50x1, "
               "bit-s-r101x3, ...: tfbit.presets()). Omit it for the offline "
               "demo.\n\nExit codes: 0 all verified, 1 some artifacts failed verification (left out "
               "unless --keep-failed), 2 bad input, 3 internal error.")
    parser.add_argument("source", nargs="?", help="checkpoint to convert (default: embedded digits demo)")
    parser.add_argument("--source-format", choices=SOURCE_FORMATS, help="override format detection")
    parser.add_argument("--output", help="output directory (default: saved_models/<name>)")
    parser.add_argument("--name", help="artifact name (default: from the source)")
    parser.add_argument("--formats", nargs="+", default=list(OUTPUT_FORMATS), choices=OUTPUT_FORMATS)
    parser.add_argument("--tflite", nargs="+", default=list(TFLITE_QUANTIZATIONS), choices=TFLITE_QUANTIZATIONS,
                        dest="quantizations", help="TFLite variants to export")
    parser.add_argument("--tflite-input", choices=TFLITE_INPUTS, default="float32",
                        help="float32: preprocessed pixel values [N, H, W, 3] (default); uint8: raw RGB "
                             "crops [1, H, W, 3], normalized inside (files named <name>_<q>_uint8.tflite)")
    parser.add_argument("--task", default="classification", choices=TASKS,
                        help="classification (logits), features (pooled vector) or backbone (stage maps)")
    parser.add_argument("--images", help="folder of real images for verification/calibration "
                                         "(default: the photos shipped with tfbit)")
    parser.add_argument("--preprocessor", help="preprocessor_config.json (or its folder) to use instead "
                                               "of the source's")
    parser.add_argument("--num-images", type=cli.positive_int, default=32,
                        help="verification images (default 32)")
    parser.add_argument("--calibration-images", type=cli.positive_int, default=16,
                        help="images to calibrate full int8 TFLite on (default 16)")
    parser.add_argument("--top-k", type=cli.positive_int, default=5,
                        help="classes returned by the serving signature")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace artifacts a previous conversion wrote into the output (other files "
                             "and earlier serving versions are kept)")
    parser.add_argument("--keep-failed", action="store_true",
                        help="publish artifacts that fail verification too (they stay marked in report.json)")
    parser.add_argument("--saved-model-xla", action="store_true",
                        help="compile the SavedModel's forward pass with XLA; TF Serving must run with "
                             "--xla_cpu_compilation_enabled=true and compiles once per new batch/image size")
    parser.add_argument("--threads", type=cli.positive_int,
                        help="CPU threads (default: every available core; see tfbit/runtime.py)")
    cli.add_verbose(parser)
    args = parser.parse_args(argv)
    environment.configure(args.verbose)  # before anything else imports TensorFlow
    from conversion import processes
    from tfbit import runtime
    threads = runtime.set_threads(args.threads)
    try:
        with processes.termination_as_exit():  # SIGTERM runs the clean-up of a normal exit
            report = convert(args.source, args.output, args.name, args.formats, args.quantizations, args.task,
                             args.source_format, args.overwrite, args.images, args.num_images, args.top_k,
                             args.calibration_images, threads, args.keep_failed, args.preprocessor,
                             tflite_input=args.tflite_input, saved_model_xla=args.saved_model_xla)
    except ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("interrupted: nothing was published", file=sys.stderr)
        return 130
    except Exception:
        traceback.print_exc()
        print("internal error: this is a bug in tfbit (the traceback above says where); nothing was "
              "published", file=sys.stderr)
        return EXIT_INTERNAL
    return 0 if report["passed"] else EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
