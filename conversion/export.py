"""Artifact writers: `.keras`, SavedModel for TF Serving, TFLite. One export path for CLI and API.

Every exported graph is float32 and uses the folded inference model (kernels standardized once),
whatever precision policy the source model was built under.
"""

import os
import signal
import subprocess
import sys
import tempfile

import numpy as np
import tensorflow as tf

import tfbit
from conversion import processes, quantize, tflite_graph
from tfbit.errors import TfbitError
from tfbit.models import user_models
from tfbit.preprocessing import tf_processor
from tfbit.preprocessing.processor import BitImageProcessor

TFLITE_QUANTIZATIONS = ("fp32", "fp16", "dynamic_int8", "int8")


def float32_inference_model(model):
    """A float32, folded copy of `model`, a tfbit model or a user's model built on one (a
    mixed-precision model does not convert to builtins)."""
    return tfbit.inference_model(model, dtype_policy="float32")


# how a classifier's logits become probabilities: each class on its own for a multi-label head
# (transformers' problem_type, trained with a sigmoid loss), one distribution otherwise
ACTIVATIONS = {"softmax": tf.nn.softmax, "sigmoid": tf.math.sigmoid}


def activation_of(config):
    """ "sigmoid" for a multi-label classifier's config (BitConfig), else "softmax"."""
    problem_type = getattr(config, "problem_type", None) or config.extra.get("problem_type")
    return "sigmoid" if problem_type == "multi_label_classification" else "softmax"


def task_outputs(model, task, labels, top_k, forward=None, activation="softmax"):
    """fn(pixel_values) -> the output dict of a task's serving signature. `forward(x)` replaces
    `model(x, training=False)` (an XLA-compiled call of the same model); `activation` (a key of
    `ACTIVATIONS`) turns the logits into probabilities."""
    forward = forward or (lambda x: model(x, training=False))

    def named(pixel_values):
        return user_models.task_outputs(model, forward(pixel_values), task)

    if task != "classification":
        return named
    names = tf.constant([labels[i] for i in range(len(labels))])
    k = min(top_k, len(labels))

    def outputs(pixel_values):
        logits = named(pixel_values)["logits"]
        probabilities = ACTIVATIONS[activation](logits)
        top = tf.math.top_k(probabilities, k=k)
        return {
            "logits": logits,
            "probabilities": probabilities,
            "classes": top.indices,
            "scores": top.values,
            "labels": tf.gather(names, top.indices),
        }

    return outputs


def _save(model, path, endpoints):
    """SavedModel of `endpoints` ({name: (fn, input spec)}); the first is `serving_default`'s
    content when it is named so. Each variable is stored once. The functions hold no
    tensor-dependent Python control flow, so they are traced without AutoGraph, which would
    re-read their source (lambdas included) from disk.

    Not `keras.export.ExportArchive`: it stores every weight twice (keras-team/keras#23553),
    doubling the artifact and TF Serving's memory. The traced functions capture the raw
    tf.Variables, so tracking exactly those lets TF deduplicate them.
    """
    module = tf.Module()
    signatures = {}
    for name, (fn, spec) in endpoints.items():
        signatures[name] = tf.function(fn, input_signature=[spec], autograph=False).get_concrete_function()
        # the concrete function, not its tf.function, which saving would trace a second time
        # (the image-decoding graph alone takes seconds)
        setattr(module, name, signatures[name])
    # the weights, and an unfolded model's cached standardized kernels (tfbit.models.layers.WSConv2D)
    module.captured = list({id(v): v for c in signatures.values() for v in c.variables}.values())
    tf.saved_model.save(module, path, signatures=signatures)
    return path


def write_saved_model(model, task, processor, labels, path, top_k=5, xla=False):
    """SavedModel with `serving_default` (encoded images -> in-graph preprocessing -> outputs)
    and `pixel_values` (already preprocessed NHWC floats -> outputs).

    `xla=True` compiles the model's forward pass with XLA (decoding and the label lookup stay
    TF ops). TF Serving runs such a graph only with `--xla_cpu_compilation_enabled=true` and
    compiles it again for every new input shape (batch size, image size); benchmarks/RESULTS.md
    has the measurements.
    """
    # a model built for one image size (a user's keras.Input((224, 224, 3))) keeps it
    pixel_spec = tf.TensorSpec([None, *model.inputs[0].shape[1:]], tf.float32, name="pixel_values")
    forward = None
    if xla:
        forward = tf.function(lambda x: model(x, training=False), jit_compile=True, autograph=False)
    # Both signatures call one concrete function, so the model is traced once (R50x1: 12 s -> 9 s
    # against a shared tf.function, which re-traces on first call).
    outputs = tf.function(task_outputs(model, task, labels, top_k, forward), autograph=False).get_concrete_function(
        pixel_spec
    )
    return _save(
        model,
        path,
        {
            "serving_default": (
                lambda image_bytes: outputs(tf_processor.preprocess_image_bytes(image_bytes, processor)),
                tf.TensorSpec([None], tf.string, name="image_bytes"),
            ),
            "pixel_values": (lambda pixel_values: outputs(pixel_values), pixel_spec),
        },
    )


def _configure(converter, quantization):
    """Set every option a float quantization depends on, so one converter can serve them in turn
    (full int8 is LiteRT's quantizer's, from the fp32 file: `_int8_worker_main`)."""
    # Builtins only: a Flex op would fail on the phone, so it must fail here instead.
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    converter.optimizations = set() if quantization == "fp32" else {tf.lite.Optimize.DEFAULT}
    converter.target_spec.supported_types = {tf.float16} if quantization == "fp16" else set()
    return converter


def _converter(saved_model_dir):
    # The converter freezes Keras 3 variables and keeps signatures only on the SavedModel path.
    return tf.lite.TFLiteConverter.from_saved_model(saved_model_dir, signature_keys=["serving_default"])


class VariantError(TfbitError, RuntimeError):
    """One TFLite variant could not be produced; the others can."""


class _Int8Worker:
    """Full int8 in a child process: the float file of the int8 graph, quantized by LiteRT's
    quantizer (`conversion.quantize`, its `DEFAULT_RECIPE`) and run once. TFLite's converter runs
    on one core and holds the GIL, and int8 (a float conversion, then calibration) is the longest
    variant, so it overlaps the float ones; a LiteRT kernel that aborts on the int8 graph takes
    this process only. The child starts at once, importing TensorFlow while the graph is being
    saved, then reads the graph's path from its stdin."""

    def __init__(self, representative_images, workdir):
        calibration = os.path.join(workdir, "calibration.npy")
        np.save(calibration, np.asarray(representative_images))  # uint8 raw crops stay uint8
        self.output = os.path.join(workdir, "int8.tflite")
        self.log = open(os.path.join(workdir, "int8_worker.log"), "wb")
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = {
            **os.environ,
            "TF_CPP_MIN_LOG_LEVEL": "2",
            "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])),
        }
        self.process = subprocess.Popen(
            [sys.executable, "-m", "conversion.export", calibration, self.output, str(os.getpid())],
            stdin=subprocess.PIPE,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env=env,
        )

    def convert(self, saved_model_dir):
        try:
            self.process.stdin.write(saved_model_dir.encode() + b"\n")
        except BrokenPipeError:  # the child already died: `result` reports why, from its log
            pass
        self._close_stdin()

    def _close_stdin(self):
        try:
            self.process.stdin.close()
        except BrokenPipeError:  # flushing into a dead child
            pass

    def result(self):
        self.process.wait()
        self.log.close()
        code = self.process.returncode
        if code:
            with open(self.log.name, encoding="utf-8", errors="replace") as f:
                lines = [line for line in f.read().strip().splitlines() if not line.startswith("INFO: ")] or [
                    "(no output)"
                ]
            how = (
                f"exit code {code}"
                if code > 0
                else f"killed by signal {-code}" + (" (out of memory?)" if -code == signal.SIGKILL else "")
            )
            raise VariantError(f"TFLite int8 conversion failed ({how}): {lines[-1]}\n" + "\n".join(lines[-40:]))
        with open(self.output, "rb") as f:
            return f.read()

    def close(self):
        """After a failure elsewhere the child must not outlive its working directory."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self._close_stdin()
        self.log.close()


def tflite_models(
    model, task, image_size, quantizations, representative_images=None, input_processor=None, activation="softmax"
):
    """{quantization: builtin-ops-only TFLite flatbuffer}, each with a `serving_default` signature.

    Input `pixel_values` (dynamic batch, fixed image_size, preprocessed floats), or with
    `input_processor` (a BitImageProcessor) `image`: raw RGB uint8 crops [1, H, W, 3], rescaled
    and normalized inside as the processor does (`representative_images` are then raw uint8
    crops too); outputs `logits` (classification; with `input_processor` `probabilities`, by
    `activation`), `features`, or one tensor per backbone stage.
    The graph is saved once (raw input with full int8: twice, see `int8_graph`); the float
    variants share one converter while full int8 converts in parallel, in a child process that
    also runs the result once: a full int8 that cannot be produced or run is returned as a
    `VariantError` in place of its bytes. `model` is the folded inference model
    (`float32_inference_model`): an unfolded one computes its kernels at run time, which full
    int8 cannot quantize as weights.
    """
    _check_tflite_request(model, image_size, quantizations, representative_images)
    float_graph, int8_graph = _tflite_graphs(model, task, image_size, input_processor, activation)
    floats = [q for q in quantizations if q != "int8"]
    with tempfile.TemporaryDirectory() as workdir:
        worker = _Int8Worker(representative_images, workdir) if "int8" in quantizations else None
        try:
            graph = _save(model, os.path.join(workdir, "graph"), {"serving_default": float_graph})
            if worker:
                worker.convert(
                    graph
                    if int8_graph is float_graph
                    else _save(model, os.path.join(workdir, "int8_graph"), {"serving_default": int8_graph})
                )
            converter = _converter(graph)
            results = {q: _configure(converter, q).convert() for q in floats}
            if worker:
                try:
                    results["int8"] = worker.result()
                except VariantError as e:
                    results["int8"] = e
        finally:
            if worker:
                worker.close()
    return {q: results[q] for q in quantizations}


def _check_tflite_request(model, image_size, quantizations, representative_images):
    unknown = [q for q in quantizations if q not in TFLITE_QUANTIZATIONS]
    if unknown:
        raise ValueError(f"unknown TFLite quantization {unknown}; choose from {TFLITE_QUANTIZATIONS}")
    if "int8" in quantizations and (representative_images is None or not len(representative_images)):
        raise ValueError("full int8 quantization needs representative images")
    channels = model.inputs[0].shape[-1]
    if "int8" in quantizations and np.shape(representative_images)[1:] != (*image_size, channels):
        raise ValueError(
            f"representative images have shape {np.shape(representative_images)[1:]}; "
            f"the TFLite graph takes {(*image_size, channels)}"
        )


def _tflite_graphs(model, task, image_size, input_processor, activation="softmax"):
    """(float variants' graph, full int8's graph), each as (fn, input spec) for `_save`; one
    graph serves both unless the input is raw uint8 crops. A classifier taking raw crops outputs
    `probabilities` (`activation` of the logits), what a phone app shows and the Task Library
    reports as scores as they are; one taking preprocessed floats keeps `logits`."""
    key = "logits" if input_processor is None else "probabilities"
    outputs = task_outputs(model, task, {0: ""}, 1, activation=activation or "softmax")  # None: logits out

    def result(pixel_values):
        out = outputs(pixel_values)
        return {key: out[key]} if task == "classification" else out

    if input_processor is None:

        def serve(pixel_values):
            return result(pixel_values)

        graph = (serve, tf.TensorSpec([None, *image_size, model.inputs[0].shape[-1]], tf.float32, name="pixel_values"))
        return graph, graph
    normalize = BitImageProcessor.from_dict(
        input_processor.to_dict(), backend=input_processor.backend, do_resize=False, do_center_crop=False
    )

    def serve(image):
        return result(tf_processor.preprocess_images(image, normalize))

    # Full int8 quantizes a float input of 0-255 values into uint8 with the identity
    # (`conversion.quantize`): no float op is left for integer accelerators, unlike a uint8 -> float cast.
    return (
        (serve, tf.TensorSpec([1, *image_size, 3], tf.uint8, name="image")),
        (serve, tf.TensorSpec([1, *image_size, 3], tf.float32, name="image")),
    )


def tflite_bytes(model, task, image_size, quantization, representative_images=None):
    """One TFLite flatbuffer (see `tflite_models`); raises its `VariantError`."""
    result = tflite_models(model, task, image_size, (quantization,), representative_images)[quantization]
    if isinstance(result, VariantError):
        raise result
    return result


def _int8_worker_main(calibration, output, parent_pid):
    processes.die_with_parent(int(parent_pid))  # a converter killed with -9 takes its worker along
    try:
        quantize.quantizer_module()
    except quantize.QuantizerMissing as e:  # before the graph is converted: the fix, at once
        sys.exit(str(e))
    saved_model_dir = sys.stdin.readline().strip()
    if not saved_model_dir:
        sys.exit("no graph to convert: the parent process stopped before saving it")
    images = np.load(calibration)
    # Raw uint8 crops: the graph takes them as floats 0-255, the file as the uint8 pixels.
    flatbuffer = quantize.quantize(
        _configure(_converter(saved_model_dir), "fp32").convert(), images, uint8_input=images.dtype == np.uint8
    )
    # Integer accelerators take a graph only when every op is integer: an op the quantizer left
    # in float must fail the variant here, not reach the phone.
    left = tflite_graph.float_ops(flatbuffer)
    if left:
        sys.exit(f"full int8 left {len(left)} float ops (no int8 kernel for them): {', '.join(left[:5])}")
    # Some int8 graphs abort inside LiteRT's kernels (seen with 8-group GroupNorm at 224 px):
    # run it once here, where an abort costs this variant only, not the whole conversion.
    print("running the int8 file once in LiteRT (an abort here is a LiteRT kernel failure)", flush=True)
    from ai_edge_litert.interpreter import Interpreter

    runner = Interpreter(model_content=flatbuffer).get_signature_runner("serving_default")
    runner(**{name: images[:1] for name in runner.get_input_details()})
    with open(output, "wb") as f:
        f.write(flatbuffer)


if __name__ == "__main__":  # the child process of `_Int8Worker`
    _int8_worker_main(*sys.argv[1:])
