"""Artifact writers: `.keras`, SavedModel for TF Serving, TFLite. One export path for CLI and API.

Every exported graph is float32 and uses the folded inference model (kernels standardized once),
whatever precision policy the source model was built under.
"""

import os
import tempfile

import keras
import numpy as np
import tensorflow as tf

import tfbit
from tfbit import image_ops

TFLITE_QUANTIZATIONS = ("fp32", "fp16", "dynamic_int8", "int8")
TASKS = ("classification", "features", "backbone")


def float32_inference_model(model):
    """A float32, folded copy of `model` (a mixed-precision model does not convert to builtins)."""
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("float32")
    try:
        clone = type(model).from_config(model.get_config())
    finally:
        keras.config.set_dtype_policy(previous)
    for layer in model.layers:
        clone.get_layer(layer.name).set_weights(layer.get_weights())
    return tfbit.fold_weight_standardization(clone)


def task_outputs(model, task, labels, top_k):
    """fn(pixel_values) -> the output dict of a task's serving signature."""
    if task == "classification":
        names = tf.constant([labels[i] for i in range(len(labels))])
        k = min(top_k, len(labels))

        def outputs(pixel_values):
            logits = model(pixel_values, training=False)
            probabilities = tf.nn.softmax(logits)
            top = tf.math.top_k(probabilities, k=k)
            return {"logits": logits, "probabilities": probabilities,
                    "classes": top.indices, "scores": top.values,
                    "labels": tf.gather(names, top.indices)}
        return outputs
    if task == "features":
        return lambda pixel_values: {"features": model(pixel_values, training=False)["pooler_output"]}
    return lambda pixel_values: dict(model(pixel_values, training=False))


def _save(model, path, endpoints):
    """SavedModel of `endpoints` ({name: (fn, input spec)}); the first is `serving_default`'s
    content when it is named so. Each variable is stored once.

    Not `keras.export.ExportArchive`: it stores every weight twice (keras-team/keras#23553),
    doubling the artifact and TF Serving's memory. The traced functions capture the raw
    tf.Variables, so tracking exactly those lets TF deduplicate them.
    """
    module = tf.Module()
    module.weights = [v.value for v in model.weights]
    signatures = {}
    for name, (fn, spec) in endpoints.items():
        function = tf.function(fn, input_signature=[spec])
        setattr(module, name, function)
        signatures[name] = function.get_concrete_function()
    tf.saved_model.save(module, path, signatures=signatures)
    return path


def write_saved_model(model, task, processor, labels, path, top_k=5):
    """SavedModel with `serving_default` (encoded images -> in-graph preprocessing -> outputs)
    and `pixel_values` (already preprocessed NHWC floats -> outputs)."""
    outputs = task_outputs(model, task, labels, top_k)
    channels = model.inputs[0].shape[-1]
    return _save(model, path, {
        "serving_default": (lambda image_bytes: outputs(image_ops.preprocess_image_bytes(image_bytes, processor)),
                            tf.TensorSpec([None], tf.string, name="image_bytes")),
        "pixel_values": (outputs, tf.TensorSpec([None, None, None, channels], tf.float32, name="pixel_values")),
    })


def tflite_models(model, task, image_size, quantizations, representative_images=None):
    """Yield (quantization, builtin-ops-only TFLite flatbuffer) with a `serving_default` signature.

    Input `pixel_values` (dynamic batch, fixed image_size, preprocessed floats); outputs
    `logits` (classification), `features`, or one tensor per backbone stage. The graph is
    saved once and converted once per quantization.
    """
    unknown = [q for q in quantizations if q not in TFLITE_QUANTIZATIONS]
    if unknown:
        raise ValueError(f"unknown TFLite quantization {unknown}; choose from {TFLITE_QUANTIZATIONS}")
    if "int8" in quantizations and (representative_images is None or not len(representative_images)):
        raise ValueError("full int8 quantization needs representative images")
    channels = model.inputs[0].shape[-1]
    spec = tf.TensorSpec([None, *image_size, channels], tf.float32, name="pixel_values")
    outputs = task_outputs(model, task, {0: ""}, 1)

    def serve(pixel_values):
        out = outputs(pixel_values)
        return {"logits": out["logits"]} if task == "classification" else out

    # The converter freezes Keras 3 variables and keeps signatures only on the SavedModel path.
    with tempfile.TemporaryDirectory() as staging:
        _save(model, staging, {"serving_default": (serve, spec)})
        for quantization in quantizations:
            converter = tf.lite.TFLiteConverter.from_saved_model(staging, signature_keys=["serving_default"])
            # Builtins only: a Flex op would fail on the phone, so it must fail here instead.
            converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
            if quantization != "fp32":
                converter.optimizations = [tf.lite.Optimize.DEFAULT]
            if quantization == "fp16":
                converter.target_spec.supported_types = [tf.float16]
            if quantization == "int8":
                data = np.asarray(representative_images, np.float32)
                converter.representative_dataset = lambda: ([x[None]] for x in data)
                # GroupNorm's statistics have no int8 kernels: those ops stay float (builtin)
                # while every convolution and elementwise op runs in int8.
                converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8,
                                                       tf.lite.OpsSet.TFLITE_BUILTINS]
            yield quantization, converter.convert()


def tflite_bytes(model, task, image_size, quantization, representative_images=None):
    """One TFLite flatbuffer (see `tflite_models`)."""
    return next(tflite_models(model, task, image_size, (quantization,), representative_images))[1]


def next_serving_version(serving_dir):
    """Versions are integers; a new export never reuses one (TF Serving serves the highest)."""
    if not os.path.isdir(serving_dir):
        return 1
    versions = [int(d) for d in os.listdir(serving_dir) if d.isdigit()]
    return max(versions, default=0) + 1
