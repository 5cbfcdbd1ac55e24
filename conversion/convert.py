"""Convert BiT weights (Hugging Face, timm, original .npz, tfbit .keras) into verified deployable
artifacts.

    python -m conversion.convert [SOURCE] [--output DIR] [--formats keras saved_model tflite keras_hub]
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
import functools
import json
import os
import signal
import sys
import time
import traceback
from typing import Callable

import numpy as np

from conversion import diskspace, environment
from tfbit.errors import TfbitError
from tfbit.filetypes import check_source

DEFAULT_CHECKPOINT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "default_checkpoint")
# relative to the working directory: the repository's saved_models/ when run from its root, as
# the README does, and never inside site-packages for a pip-installed tfbit
DEFAULT_OUTPUT_ROOT = "saved_models"
DEFAULT_FORMATS = ("keras", "saved_model", "tflite")
# keras_hub: a KerasHub preset folder (tfbit.kerashub); opt-in, as it needs the keras-hub extra
OUTPUT_FORMATS = DEFAULT_FORMATS + ("keras_hub",)
KERAS_HUB = "keras_hub"  # the preset's folder in the output: its config.json is not the export's
TFLITE_INPUTS = ("float32", "uint8")
EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INTERNAL = 1, 2, 3


class ConversionError(TfbitError):
    """A problem with the arguments, the source or the output location (exit code 2)."""


@dataclasses.dataclass
class Artifact:
    """One exported artifact: where it is (relative to the output folder), how to run it from
    disk, which inputs it takes ("pixels", "encoded" or the decoded "images") and whether it must
    be lossless. Both SavedModel signatures are artifacts of one folder."""

    name: str
    path: str
    runner: Callable | None
    inputs: str = "pixels"
    lossless: bool = True
    error: str = ""  # why it could not be produced (then it has no runner)
    activation: str | None = None  # it outputs probabilities, this function of the logits


def tflite_path(name, quantization, tflite_input="float32"):
    """A TFLite file's path in the output; files taking raw uint8 pixels end in `_uint8`."""
    return os.path.join("tflite", f"{name}_{quantization}{'_uint8' if tflite_input == 'uint8' else ''}.tflite")


@dataclasses.dataclass
class Request:
    """What to convert and how: `convert`'s keyword arguments, checked once (see `convert`)."""

    source: str | None = None
    output: str | None = None
    name: str | None = None
    formats: tuple = DEFAULT_FORMATS
    quantizations: tuple | None = None
    task: str = "classification"
    source_format: str | None = None
    overwrite: bool = False
    images: str | None = None
    num_images: int = 32
    top_k: int = 5
    calibration_images: int = 16
    threads: int | None = None
    keep_failed: bool = False
    preprocessor: str | None = None
    labels: str | None = None
    out_features: tuple | None = None
    tflite_input: str = "float32"
    saved_model_xla: bool = False

    @property
    def demo(self):
        return self.source is None

    @property
    def need_calibration(self):
        return "tflite" in self.formats and "int8" in self.quantizations

    def check(self):
        """Fill the defaults that depend on others; ConversionError on a bad value."""
        from conversion.export import TFLITE_QUANTIZATIONS
        from tfbit.models.pretrained import TASKS

        self.formats = tuple(self.formats)
        self.quantizations = tuple(self.quantizations or TFLITE_QUANTIZATIONS)
        unknown = sorted(set(self.formats) - set(OUTPUT_FORMATS)) + sorted(
            set(self.quantizations) - set(TFLITE_QUANTIZATIONS)
        )
        if unknown:
            raise ConversionError(
                f"unknown format(s) {unknown}: choose from {OUTPUT_FORMATS} and TFLite "
                f"quantizations {TFLITE_QUANTIZATIONS}"
            )
        if "keras_hub" in self.formats:
            try:
                import keras_hub  # noqa: F401
            except ImportError as e:
                raise ConversionError(
                    f"--formats keras_hub needs KerasHub ({e}): pip install 'tfbit[keras-hub]'"
                ) from None
        if self.tflite_input not in TFLITE_INPUTS:
            raise ConversionError(f"unknown TFLite input {self.tflite_input!r}: choose from {TFLITE_INPUTS}")
        if self.task not in TASKS:
            raise ConversionError(f"unknown task {self.task!r}: choose from {TASKS}")
        if self.need_calibration and self.calibration_images < 1:
            raise ConversionError(
                f"full int8 TFLite needs calibration images, got calibration_images={self.calibration_images}"
            )
        if self.num_images < 1:
            raise ConversionError(f"verification needs at least one image, got num_images={self.num_images}")
        return self


def _log(message):
    print(message, flush=True)


# -- step 1: the source --------------------------------------------------------------------------


@dataclasses.dataclass
class Source:
    """The model to export, loaded once: tfbit's own class, or a model a user built on tfbit."""

    model: object  # as loaded: what the `.keras` artifact holds
    pixel_model: object  # pixel values -> outputs: `model` without its BitPreprocessing layer
    checkpoint: object
    processor: object
    config: object  # the export's config.json: the body's architecture, the output's labels
    task: str

    @property
    def user_model(self):
        from tfbit.models.config import BitConfig

        return not isinstance(getattr(self.model, "config", None), BitConfig)


def load_source(request, log):
    import tfbit
    from tfbit.models import user_models
    from tfbit.preprocessing.processor import BitImageProcessor

    source = DEFAULT_CHECKPOINT if request.demo else request.source
    task, preprocessor_path, labels_path, out_features = (
        request.task,
        request.preprocessor,
        request.labels,
        request.out_features,
    )
    if out_features and task != "backbone":
        raise ConversionError("--out-features chooses the stages of a backbone: add --task backbone")
    try:
        model, checkpoint = tfbit.load_model(source, task=task, format=request.source_format, out_features=out_features)
        own_processor, pixel_model = user_models.split_preprocessing(model)
        id2label = user_models.read_labels(labels_path) if labels_path else None
        if id2label and task != "classification":
            raise ValueError(f"--labels names a classifier's classes; task {task!r} has none")
        if isinstance(getattr(model, "config", None), tfbit.BitConfig):
            if task == "classification" and not isinstance(model, tfbit.BitForImageClassification):
                raise ValueError(
                    f"{source} has no classification head: export it with --task features or --task backbone"
                )
        else:
            user_models.check_task(pixel_model, task, source)
        labels = user_models.output_labels(pixel_model, id2label) if task == "classification" else None
        config = user_models.export_config(pixel_model, labels)
    except (FileNotFoundError, ValueError, ImportError) as e:
        raise ConversionError(str(e)) from e
    if own_processor is not None:
        if preprocessor_path:
            raise ConversionError(
                f"{source} preprocesses its input itself (a BitPreprocessing layer), which "
                "the exports take over: drop --preprocessor"
            )
        processor = own_processor
    elif preprocessor_path:
        try:
            processor = BitImageProcessor.from_pretrained(preprocessor_path)
        except (FileNotFoundError, ValueError, TypeError) as e:
            raise ConversionError(f"--preprocessor {preprocessor_path}: {e}") from e
    elif checkpoint.preprocessor is not None:
        processor = BitImageProcessor.from_dict(checkpoint.preprocessor)
    elif checkpoint.format == "keras":
        raise ConversionError(
            f"{source} has no preprocessor_config.json beside it, so the image size and "
            "normalization it was trained with are unknown: put that file beside it "
            "(conversion.finetune writes one), pass --preprocessor FILE, or start the model "
            "with a tfbit.BitPreprocessing layer"
        )
    else:
        processor = BitImageProcessor()
        log(
            "      warning: the checkpoint has no preprocessor_config.json: using transformers' "
            "BitImageProcessor defaults (224 px crop, CLIP mean/std); pass --preprocessor to override"
        )
    return Source(model, pixel_model, checkpoint, processor, config, task)


# -- step 2: images ------------------------------------------------------------------------------


def gather_images(request, label2id):
    """(verification images, calibration images or None)."""
    from conversion import images as real

    calibration_images = request.calibration_images if request.need_calibration else 0
    try:
        if request.images:  # also for the demo: a user's folder is never ignored
            return real.folder_images(request.images, request.num_images, label2id, calibration_images)
        if request.demo:
            verification = real.digits_images("test")
            calibration = real.digits_images("train", calibration_images).images if calibration_images else None
            return verification, calibration
        verification = real.photo_images(request.num_images)
    except (FileNotFoundError, ValueError, ImportError) as e:
        raise ConversionError(str(e)) from e
    # 32 photos are too few to set some aside: calibrate on their mirror images
    return verification, (
        real.mirrored(real.spread(verification.images, calibration_images)) if calibration_images else None
    )


@dataclasses.dataclass
class Images:
    """The real images of a conversion."""

    real: object  # conversion.images.RealImages: the verification images
    pixel_values: np.ndarray  # `real` preprocessed: what the source and most artifacts take
    calibration: object  # what full int8 TFLite calibrates on, or None

    @property
    def size(self):
        return self.pixel_values.shape[1:3]


def preprocessed_images(request, source):
    """The real images, preprocessed to the size the source takes (else ConversionError)."""
    real, calibration = gather_images(request, source.config.label2id)
    try:
        pixel_values = source.processor(real.images)
    except ValueError as e:
        raise ConversionError(f"the images cannot be preprocessed: {e}") from e
    images = Images(real, pixel_values, calibration)
    expected = tuple(source.pixel_model.inputs[0].shape[1:3])
    if any(want is not None and want != got for want, got in zip(expected, images.size)):
        raise ConversionError(
            f"{request.source} takes {expected[0]}x{expected[1]} images, but its preprocessing "
            f"gives {images.size[0]}x{images.size[1]}: pass the preprocessor_config.json it was "
            "trained with (--preprocessor)"
        )
    return images


# -- step 3: export ------------------------------------------------------------------------------


def export_artifacts(source, request, inference, staging, version, images, log):
    """The artifacts of `source` (`inference`: its float32 folded pixel model, which every graph
    is exported from) written into `staging`."""
    from conversion import serving_kit

    source.config.save_pretrained(staging)
    source.processor.save_pretrained(staging)
    artifacts = []
    if "keras" in request.formats:
        artifacts += _keras_artifacts(source, request, staging, log)
    if "saved_model" in request.formats:
        artifacts += _saved_model_artifacts(source, request, inference, staging, version, log)
        serving_kit.write(staging, version, request.name, source.processor)  # warm-up, models.config, batching
    if "tflite" in request.formats:
        artifacts += _tflite_artifacts(source, request, inference, staging, images, log)
    if "keras_hub" in request.formats:
        artifacts += _keras_hub_artifacts(source, staging, log)
    return artifacts


def _keras_artifacts(source, request, staging, log):
    from conversion import runners
    from tfbit.models import user_models

    log("      .keras")
    path = f"{request.name}.keras"
    source.model.save(os.path.join(staging, path))
    # a mixed-precision model (a fine-tune) computes in float16/bfloat16: not float32 parity
    lossless = user_models.computes_in_float32(source.model)
    return [Artifact("keras", path, lambda p: runners.keras_runner(p, task=source.task), lossless=lossless)]


def _saved_model_artifacts(source, request, inference, staging, version, log):
    import tensorflow as tf

    from conversion import export, runners

    log(f"      TF Serving SavedModel (version {version})")
    path = os.path.join("serving", str(version))
    export.write_saved_model(
        inference,
        source.task,
        source.processor.to_dict(),
        source.config.id2label,
        os.path.join(staging, path),
        request.top_k,
        xla=request.saved_model_xla,
    )
    load = functools.cache(tf.saved_model.load)  # both signatures are checked on one load (seconds each)
    return [
        Artifact("saved_model[pixel_values]", path, lambda p: runners.saved_model_runner(load(p), "pixel_values")),
        Artifact(
            "saved_model[image_bytes]",
            path,
            lambda p: runners.saved_model_runner(load(p), "serving_default"),
            inputs="encoded",
            lossless=False,
        ),
    ]


def _keras_hub_artifacts(source, staging, log):
    from tfbit import kerashub

    log("      KerasHub preset")
    kerashub.save_to_preset(source.pixel_model, os.path.join(staging, KERAS_HUB), source.processor)
    # verified from the decoded images: the preset's own preprocessing is part of what it computes
    return [Artifact("keras_hub", KERAS_HUB, lambda p: _keras_hub_runner(p, source), inputs="images")]


def _keras_hub_runner(path, source):
    """The preset as keras_hub loads it, preprocessor included: decoded images -> outputs."""
    import keras
    import keras_hub

    from conversion import runners
    from tfbit import kerashub  # also registers the classes the preset names

    if os.path.isfile(os.path.join(path, "task.json")):
        model = keras_hub.models.ImageClassifier.from_preset(path)
        preprocessor = model.preprocessor  # loaded with the task: reading it again would repeat the work
    else:
        preprocessor = kerashub.TfbitImageClassifierPreprocessor.from_preset(path)
        backbone = keras_hub.models.Backbone.from_preset(path)
        if source.task == "backbone":
            output = {source.pixel_model.out_features[-1]: backbone.output}
        else:  # the pooled features (or the identity head of a classifier without labels)
            output = keras.layers.GlobalAveragePooling2D()(backbone.output)
        model = keras.Model(backbone.input, output)
    run = runners.model_runner(model, task=source.task)
    return lambda images: run(preprocessor([np.asarray(image) for image in images]))


def _tflite_artifacts(source, request, inference, staging, images, log):
    from conversion import export, runners, tflite_metadata

    processor, config, name = source.processor, source.config, request.name
    raw = request.tflite_input == "uint8"  # raw RGB crops in, normalized inside
    log(f"      TFLite {', '.join(request.quantizations)}{' (raw uint8 input)' if raw else ''}")
    os.makedirs(os.path.join(staging, "tflite"))
    calib = None
    if images.calibration is not None:
        calib = runners.raw_crops(processor, images.calibration) if raw else processor(images.calibration)
    # a classifier taking raw crops outputs probabilities (the mobile app's scores)
    activation = export.activation_of(config) if raw and source.task == "classification" else None
    files = export.tflite_models(
        inference, source.task, images.size, request.quantizations, calib, processor if raw else None, activation
    )
    labels = [config.id2label[i] for i in range(config.num_labels)]
    artifacts = []
    for q, flatbuffer in files.items():
        path, artifact = tflite_path(name, q, request.tflite_input), f"tflite_{q}{'[uint8]' if raw else ''}"
        if isinstance(flatbuffer, export.VariantError):  # reported as a failed artifact
            artifacts.append(Artifact(artifact, path, None, lossless=False, error=str(flatbuffer)))
            continue
        if source.task == "classification":  # labels and normalization for the LiteRT support tooling
            flatbuffer = tflite_metadata.add_classifier_metadata(
                flatbuffer,
                labels,
                *tflite_metadata.pixel_normalization(processor),
                name,
                f"BiT image classifier ({q}) converted by tfbit",
                activation,
            )
        with open(os.path.join(staging, path), "wb") as f:
            f.write(flatbuffer)
        artifacts.append(
            Artifact(
                artifact,
                path,
                lambda p: runners.tflite_runner(p, request.threads),
                inputs="crops" if raw else "pixels",
                lossless=q == "fp32",
                activation=activation,
            )
        )
    return artifacts


# -- step 4: verify ------------------------------------------------------------------------------


def reference_outputs(source, pixel_values, log):
    """Reference outputs on the preprocessed images: the PyTorch source where possible, else
    the Keras model itself (in float32: a mixed-precision model is rebuilt in float32)."""
    import tfbit
    from conversion.references import torch_reference
    from tfbit.models import user_models

    reference = None
    if source.checkpoint.format == "savedmodel" and source.task != "backbone" and not source.user_model:
        outputs = _saved_model_outputs(source, pixel_values, log)
        if outputs is not None:
            return outputs, "savedmodel"
    # timm and .npz references are headless: logits or pooled features, no stage maps
    backbone_maps = source.task == "backbone" and source.checkpoint.format == "hf"
    if (source.task == "classification" or backbone_maps) and not source.user_model:
        reference = torch_reference(source.checkpoint, source.model)
    if reference is not None:
        import torch

        with torch.no_grad():
            out = reference(torch.from_numpy(np.ascontiguousarray(pixel_values.transpose(0, 3, 1, 2))))
        log(f"      reference: the PyTorch source model ({type(reference).__name__})")
        if backbone_maps:
            maps = zip(source.model.out_features, out.feature_maps)
            return {name: m.numpy().transpose(0, 2, 3, 1) for name, m in maps}, "pytorch"
        return {"logits": (out.logits if hasattr(out, "logits") else out).numpy()}, "pytorch"
    what = "your Keras model" if source.user_model else "the Keras model"
    log(f"      reference: {what} (no PyTorch source for this task/source)")
    model = source.pixel_model
    if not user_models.computes_in_float32(model):
        model = tfbit.inference_model(model, dtype_policy="float32", fold=False)
    out = user_models.task_outputs(model, model.predict(pixel_values, verbose=0, batch_size=16), source.task)
    return {k: np.asarray(v) for k, v in out.items()}, "keras"


def _saved_model_outputs(source, pixel_values, log):
    """The outputs of the TF Hub / Kaggle SavedModel the source was read from, by its own call."""
    from conversion.references import saved_model_reference

    try:
        run = saved_model_reference(source.checkpoint, source.model, source.processor)
    except ValueError as e:
        raise ConversionError(str(e)) from e
    if run is None:
        return None
    log(f"      reference: the SavedModel's own call ({source.checkpoint.path})")
    return {"logits" if source.task == "classification" else "features": run(pixel_values)}


def verify_artifacts(artifacts, staging, reference, pixel_values, images, crops=None):
    """`crops`: the raw uint8 crops of the images, for files taking them."""
    from conversion import verify

    encoded = np.array(images.encoded, dtype=object)
    inputs = {"pixels": pixel_values, "encoded": encoded, "crops": crops, "images": images.images}
    rows = []
    for artifact in artifacts:
        if artifact.error:
            rows.append(
                verify.Row(
                    artifact.name,
                    artifact.path,
                    0,
                    float("nan"),
                    float("nan"),
                    "could not be produced",
                    None,
                    None,
                    None,
                    float("nan"),
                    False,
                    artifact.error.splitlines()[0],
                )
            )
            continue
        path = os.path.join(staging, artifact.path)
        judge = verify.compare
        if artifact.activation:  # probabilities out: against the reference logits put through it
            judge = functools.partial(verify.compare_probabilities, activation=artifact.activation)
        row = judge(
            artifact.name,
            path,
            artifact.runner(path),
            inputs[artifact.inputs],
            reference,
            images.labels,
            lossless=artifact.lossless,
        )
        rows.append(dataclasses.replace(row, path=artifact.path))
    return rows


@dataclasses.dataclass
class Outcome:
    """What verification found, and so what is published."""

    rows: list  # conversion.verify.Row of each artifact
    reference: str  # what the artifacts were compared with: "pytorch", "savedmodel" or "keras"
    failed: set  # paths of the artifacts that failed
    missing: set  # paths of the artifacts that could not be produced: nothing to publish
    published: list  # paths to publish


def verify_conversion(source, request, artifacts, staging, images, log):
    """Each artifact checked against the source's outputs on the real images."""
    from conversion import runners

    log(f"[3/5] verifying {len(artifacts)} artifacts on {images.real.description}")
    reference, reference_kind = reference_outputs(source, images.pixel_values, log)
    uint8 = request.tflite_input == "uint8" and "tflite" in request.formats
    crops = runners.raw_crops(source.processor, images.real.images) if uint8 else None
    with environment.cli_logs_filtered():  # LiteRT's notice when it first runs a file
        rows = verify_artifacts(artifacts, staging, reference, images.pixel_values, images.real, crops)
    failed = {r.path for r in rows if not r.passed}
    missing = {a.path for a in artifacts if a.error}
    published = sorted({a.path for a in artifacts} - missing - (set() if request.keep_failed else failed))
    return Outcome(rows, reference_kind, failed, missing, published)


# -- the pipeline --------------------------------------------------------------------------------


def convert(source=None, output=None, *, log=_log, **options):
    """Convert, export, verify, publish; returns the report dict.

    Args:
        source: anything `tfbit.load_model` loads (a checkpoint, a preset, a tfbit `.keras`
            file, or the `.keras` file of a model you built on tfbit); None converts the
            embedded digits demo.
        output: the output folder (default `saved_models/<name>`).
        **options: the fields of `Request`:
            formats: a subset of `OUTPUT_FORMATS`; quantizations: TFLite variants
                (`conversion.export.TFLITE_QUANTIZATIONS`).
            task: "classification", "features" or "backbone"; out_features: a backbone's
                stages (default: the checkpoint's `out_features`).
            overwrite: replace artifacts tfbit wrote before in `output` (never other files).
            images: a folder of real images to verify and calibrate on (default: the shipped
                photos; the digits for the demo); num_images, calibration_images: how many.
            keep_failed: publish artifacts that failed verification too (still reported).
            preprocessor: a preprocessor_config.json (or its folder) replacing the source's.
            labels: a text file of the classifier's labels, one per line, replacing the model's.
            tflite_input: "uint8" writes TFLite files taking raw RGB uint8 crops at batch 1,
                which normalize inside (`tflite/<name>_<q>_uint8.tflite`); a classifier's
                outputs probabilities (softmax; sigmoid for a multi-label head).
            saved_model_xla: compile the SavedModel's forward pass with XLA (TF Serving then
                needs `--xla_cpu_compilation_enabled=true`; see `conversion.export.write_saved_model`).
            top_k, threads, source_format, name: see `python -m conversion.convert --help`.

    Raises ConversionError on bad input.
    """
    try:
        request = Request(source=source, output=output, **options)
    except TypeError as e:
        raise TypeError(f"convert() {str(e).removeprefix('Request.__init__() ')}") from None
    return run(request, log)


def run(request, log=_log):
    """`convert` of a `Request` (which the command line builds from its arguments)."""
    from conversion import publish

    try:
        environment.require_tensorflow_backend("exports need", "the converter")
    except ValueError as e:
        raise ConversionError(f"{e}; .keras files written under JAX or PyTorch convert as they are") from None
    request.check()
    started = time.perf_counter()
    log(f"[1/5] loading {'the embedded digits checkpoint' if request.demo else request.source}")
    loaded = load_source(request, log)
    if "keras_hub" in request.formats:
        _check_keras_hub_source(loaded)
    request.name = text_name(request.name or ("digits" if request.demo else loaded.checkpoint.name))
    request.output = os.path.abspath(request.output or os.path.join(DEFAULT_OUTPUT_ROOT, request.name))
    kind = (
        f"your {type(loaded.model).__name__} built on tfbit"
        if loaded.user_model
        else f"{loaded.checkpoint.format} checkpoint"
    )
    weights = sum(int(np.prod(w.shape)) for w in loaded.model.weights)
    log(
        f"      {kind}, {loaded.config.num_labels if request.task == 'classification' else 'no'} labels, "
        f"{weights / 1e6:.1f} M parameters"
    )
    _check_space(request, weights)
    images = preprocessed_images(request, loaded)
    try:
        with publish.OutputLock(request.output):
            return _export_verify_publish(loaded, request, images, started, log)
    except publish.OutputError as e:  # the output is locked, or publishing would lose a file
        raise ConversionError(str(e)) from e


def _check_source_kind(request):
    """Refuses a model file of a kind no reader takes in well under a second, before the command
    line loads TensorFlow; `run` needs no such check: loading the source names the same kinds."""
    if request.source and not request.demo:
        try:
            check_source(request.source)
        except TfbitError as e:
            raise ConversionError(str(e)) from None


def _check_keras_hub_source(source):
    """Refuses, before any export, a source that no KerasHub preset can hold or verify."""
    from tfbit import kerashub

    model = source.pixel_model
    try:
        kerashub.check_exportable(model)
    except TfbitError as e:
        raise ConversionError(f"--formats keras_hub: {e}") from None
    last = model.config.stage_names[-1]
    if source.task == "backbone" and model.config.out_features != [last]:
        raise ConversionError(
            f"--formats keras_hub: a KerasHub backbone returns one feature map, the last stage's, "
            f"not {model.config.out_features}: pass --out-features {last}, or convert the others without keras_hub"
        )


def _check_no_stale_task(output, source):
    """Publishing replaces files, never deletes them: a backbone preset over an earlier
    classifier's would keep its task.json, which keras_hub would then load as this preset's."""
    from tfbit import kerashub

    planned = kerashub.preset_files(source.pixel_model)
    stale = [f for f in kerashub.TASK_FILES if f not in planned and os.path.isfile(os.path.join(output, KERAS_HUB, f))]
    if stale:
        raise ConversionError(
            f"{os.path.join(output, KERAS_HUB)} holds {' and '.join(stale)} of an earlier classifier preset, "
            "which this one (no classification head) would not replace: remove them, or choose another --output"
        )


# bytes per weight each artifact stores at the least: float32 files hold every weight in 4 bytes,
# fp16 in 2, the int8 ones in 1 (dynamic-range int8 keeps small tensors in float)
_BYTES_PER_WEIGHT = {"keras": 4, "saved_model": 4, "keras_hub": 4, "fp32": 4, "fp16": 2, "dynamic_int8": 1, "int8": 1}


def _check_space(request, weights):
    """Refuses an output whose file system cannot hold the export of a model with `weights`
    values before exporting for minutes. Half the estimate: a converter that deduplicates equal
    constants stores less."""
    kinds = [f for f in request.formats if f != "tflite"] + list(request.quantizations) * ("tflite" in request.formats)
    try:
        diskspace.check_writable(request.output)  # a read-only place first: more space would not help
        diskspace.check_free_space(request.output, weights * sum(map(_BYTES_PER_WEIGHT.get, kinds)) // 2, "the export")
    except (ValueError, diskspace.InsufficientSpace) as e:
        raise ConversionError(str(e)) from None


def text_name(name):
    """`name` with each byte that is not UTF-8 (a Linux folder name may hold any) as "_": the
    name goes into TFLite metadata, which holds UTF-8 text only."""
    return os.fsencode(name).decode("utf-8", "replace").replace("\ufffd", "_")


def _planned_files(request, version, source):
    from conversion import serving_kit

    name = request.name
    planned = ["config.json", "preprocessor_config.json", "report.json"]
    planned += [f"{name}.keras"] * ("keras" in request.formats)
    planned += [f"serving/{version}", *serving_kit.CONFIG_FILES] * ("saved_model" in request.formats)
    planned += [
        tflite_path(name, q, request.tflite_input) for q in request.quantizations if "tflite" in request.formats
    ]
    return planned + (_keras_hub_files(source) if "keras_hub" in request.formats else [])


def _keras_hub_files(source):
    """The preset's files: published one by one, so that files a user added to its folder (a
    model card) stay, as everywhere in the output."""
    from tfbit import kerashub

    return [f"{KERAS_HUB}/{file}" for file in kerashub.preset_files(source.pixel_model)]


def _report(loaded, request, images, version, outcome, export_seconds, started):
    report = {
        "source": str(request.source or DEFAULT_CHECKPOINT),
        "format": loaded.checkpoint.format,
        "model": type(loaded.model).__name__,
        "task": request.task,
        "name": request.name,
        "reference": outcome.reference,
        "images": images.real.description,
        "num_images": len(images.real.encoded),
        "image_size": list(images.size),
        "serving_version": version if os.path.join("serving", str(version)) in outcome.published else None,
        "export_seconds": round(export_seconds, 1),
        "verification_seconds": round(time.perf_counter() - started - export_seconds, 1),
        "artifacts": [dataclasses.asdict(r) | {"published": r.path in outcome.published} for r in outcome.rows],
        "passed": not outcome.failed,
    }
    if request.demo:
        with open(os.path.join(DEFAULT_CHECKPOINT, "metrics.json"), encoding="utf-8") as f:
            report["transformers_accuracy"] = json.load(f)["heldout_accuracy_transformers"]
    return report


def _export_verify_publish(loaded, request, images, started, log):
    from conversion import export, processes, publish, serving_kit, verify

    output = request.output
    version = publish.next_serving_version(output)
    if "keras_hub" in request.formats:
        _check_no_stale_task(output, loaded)
    # Refused before the slow export, not after it.
    publish.check_output(
        output,
        _planned_files(request, version, loaded),
        source_paths=loaded.checkpoint.files,
        overwrite=request.overwrite,
    )
    with publish.staging_dir(output) as staging:
        log(f"[2/5] exporting into {staging}")
        inference = export.float32_inference_model(loaded.pixel_model)
        artifacts = export_artifacts(loaded, request, inference, staging, version, images, log)
        processes.raise_if_received()  # a signal whose exception the export swallowed
        export_seconds = time.perf_counter() - started
        outcome = verify_conversion(loaded, request, artifacts, staging, images, log)
        report = _report(loaded, request, images, version, outcome, export_seconds, started)
        with open(os.path.join(staging, "report.json"), "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
        log("\n" + verify.format_table(outcome.rows))
        if request.demo:
            log(f"\nheld-out digits accuracy measured by transformers (PyTorch): {report['transformers_accuracy']:.2%}")
        log(f"\nloading + export {report['export_seconds']} s, verification {report['verification_seconds']} s")
        published = outcome.published
        log(f"[4/5] publishing {len(published)} verified artifact{'s' if len(published) != 1 else ''} into {output}")
        files = [p for p in published if p != KERAS_HUB] + (_keras_hub_files(loaded) if KERAS_HUB in published else [])
        written = ["config.json", "preprocessor_config.json", *files, "report.json"]
        written[-1:-1] = serving_kit.files_to_publish(published, version)  # after the version they name
        publish.publish(staging, output, written, source_paths=loaded.checkpoint.files, overwrite=request.overwrite)
    if outcome.failed:
        log(
            f"[5/5] verification FAILED for {', '.join(r.artifact for r in outcome.rows if not r.passed)}: "
            + _failure_advice(request, outcome)
        )
    else:
        log(f"[5/5] all artifacts verified -> {output}")
    return report


def _failure_advice(request, outcome):
    """What happened to the failed artifacts, and the flags that keep or skip them."""
    failed, missing = outcome.failed, outcome.missing
    formats, quantizations, name, output = request.formats, request.quantizations, request.name, request.output
    tflite_input, keep_failed = request.tflite_input, request.keep_failed
    kept = failed - missing
    if keep_failed:
        return "; ".join(
            filter(
                None,
                [
                    "published anyway (--keep-failed)" if kept else "",
                    f"{', '.join(sorted(missing))} could not be produced" if missing else "",
                ],
            )
        )
    variants = [q for q in quantizations if tflite_path(name, q, tflite_input) not in failed]
    dropped = {
        "keras": f"{name}.keras" in failed,
        "tflite": not variants,
        "saved_model": any(p.startswith("serving") for p in failed),
        "keras_hub": KERAS_HUB in failed,
    }
    keep = [f for f in formats if not dropped[f]]
    if not keep:
        return f"nothing verified: {output} holds only the config files and report.json"
    flags = [f"--formats {' '.join(keep)}"] if keep != list(formats) else []
    if "tflite" in keep and variants != list(quantizations):
        flags.append(f"--tflite {' '.join(variants)}")
    advice = f"left out; the verified artifacts are in {output}. "
    if not (request.images or request.demo) and set(quantizations) - {"fp32"} - set(variants):
        # a head confident on its own domain can sit on near-ties on photos of another
        advice += (
            "The lossy variants were verified on tfbit's shipped photos: verify them on photos "
            "of your model's own domain with --images DIR first. "
        )
    advice += "Publish the failed ones anyway with --keep-failed, or skip them" if kept else "Skip them"
    return advice + (f" with {' '.join(flags)}" if flags else "")


def build_parser():
    # The parser imports no TensorFlow (conversion.cli): --help answers at once.
    from conversion import cli
    from conversion.cli import SOURCE_FORMATS

    parser = argparse.ArgumentParser(
        prog=cli.program("conversion.convert"),
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="SOURCE: a Hugging Face hub id (google/bit-50) or checkpoint directory, a timm "
        "name (timm/resnetv2_50x1_bit.goog_in21k) or state-dict file (.safetensors/.pth/"
        ".bin), an original BiT .npz or .h5 file, a TF Hub / Kaggle BiT SavedModel folder or handle "
        "(https://tfhub.dev/google/bit/m-r50x1/1, google/bit/tensorFlow2/m-r50x1/1), a .keras file "
        "(a tfbit model, or your own Keras model "
        "built on one), or a preset name (bit-m-r50x1, "
        "bit-s-r101x3, ...: tfbit.presets()). Omit it for the offline "
        "demo.\n\nExit codes: 0 all verified, 1 some artifacts failed verification (left out "
        "unless --keep-failed), 2 bad input, 3 internal error.",
    )
    parser.add_argument("source", nargs="?", help="checkpoint to convert (default: embedded digits demo)")
    parser.add_argument("--source-format", choices=SOURCE_FORMATS, help="override format detection")
    parser.add_argument("--output", help="output directory (default: saved_models/<name>)")
    parser.add_argument("--name", help="artifact name (default: from the source)")
    _add_artifact_arguments(parser)
    _add_input_arguments(parser)
    _add_run_arguments(parser)
    cli.add_verbose(parser)
    return parser


def _add_artifact_arguments(parser):
    from conversion.cli import TASKS, TFLITE_QUANTIZATIONS

    parser.add_argument(
        "--formats",
        nargs="+",
        default=list(DEFAULT_FORMATS),
        choices=OUTPUT_FORMATS,
        help="artifacts to write (default: keras saved_model tflite); keras_hub: a KerasHub preset "
        "folder, keras_hub/ (needs pip install 'tfbit[keras-hub]')",
    )
    parser.add_argument(
        "--tflite",
        nargs="+",
        default=list(TFLITE_QUANTIZATIONS),
        choices=TFLITE_QUANTIZATIONS,
        dest="quantizations",
        help="TFLite variants to export",
    )
    parser.add_argument(
        "--tflite-input",
        choices=TFLITE_INPUTS,
        default="float32",
        help="float32: preprocessed pixel values [N, H, W, 3] in, logits out (default); uint8: raw RGB "
        "crops [1, H, W, 3], normalized inside, probabilities out (files named <name>_<q>_uint8.tflite)",
    )
    parser.add_argument(
        "--task",
        default="classification",
        choices=TASKS,
        help="classification (logits), features (pooled vector) or backbone (stage maps)",
    )


def _add_input_arguments(parser):
    parser.add_argument(
        "--images", help="folder of real images for verification/calibration (default: the photos shipped with tfbit)"
    )
    parser.add_argument(
        "--preprocessor", help="preprocessor_config.json (or its folder) to use instead of the source's"
    )
    parser.add_argument(
        "--labels",
        help="text file of the classifier's labels, one per line, in the order of "
        "its outputs (default: the model's own, else LABEL_<i>)",
    )
    parser.add_argument(
        "--out-features",
        nargs="+",
        metavar="STAGE",
        help="with --task backbone: the stages to export, e.g. stage2 stage4 (default: the "
        "checkpoint's out_features, as transformers' BitBackbone returns)",
    )


def _add_run_arguments(parser):
    from conversion import cli

    parser.add_argument("--num-images", type=cli.positive_int, default=32, help="verification images (default 32)")
    parser.add_argument(
        "--calibration-images",
        type=cli.positive_int,
        default=16,
        help="images to calibrate full int8 TFLite on (default 16)",
    )
    parser.add_argument("--top-k", type=cli.positive_int, default=5, help="classes returned by the serving signature")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace artifacts a previous conversion wrote into the output (other files "
        "and earlier serving versions are kept)",
    )
    parser.add_argument(
        "--keep-failed",
        action="store_true",
        help="publish artifacts that fail verification too (they stay marked in report.json)",
    )
    parser.add_argument(
        "--saved-model-xla",
        action="store_true",
        help="compile the SavedModel's forward pass with XLA; TF Serving must run with "
        "--xla_cpu_compilation_enabled=true and compiles once per new batch/image size",
    )
    cli.add_threads(parser)


def main(argv=None):
    args = build_parser().parse_args(argv)
    # every option but --verbose is stored under the name of its Request field
    request = Request(**{field.name: getattr(args, field.name) for field in dataclasses.fields(Request)})
    try:
        _check_source_kind(request)  # in well under a second, before TensorFlow loads
    except ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    environment.configure(args.verbose)  # before anything else imports TensorFlow
    from conversion import processes, runtime

    request.threads = runtime.set_threads(args.threads)
    try:
        with processes.termination_as_exit():  # SIGTERM runs the clean-up of a normal exit
            report = run(request)
    except ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("interrupted: nothing was published", file=sys.stderr)
        return 130
    except SystemExit:
        if processes.received:  # SIGTERM or SIGHUP (tfbit.processes.termination_as_exit)
            print(f"terminated by {signal.Signals(processes.received[0]).name}: nothing was published", file=sys.stderr)
        raise
    except Exception as e:
        if reason := diskspace.out_of_space(e):
            print(f"error: {reason}: nothing was published", file=sys.stderr)
            return EXIT_BAD_INPUT
        traceback.print_exc()
        print(
            "internal error: this is a bug in tfbit (the traceback above says where); nothing was published",
            file=sys.stderr,
        )
        return EXIT_INTERNAL
    return 0 if report["passed"] else EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
