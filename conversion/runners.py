"""Artifact runners: load an exported artifact from disk and give `run(inputs) -> {output: array}`.
Shared by verification (what is checked is what is deployed) and `predict`."""

import numpy as np


def keras_runner(path, jit_compile=False, task="classification"):
    """A `.keras` file, folded for inference and traced once (XLA-compiled on request); its
    outputs named as the exported task's (`features`: the pooled vector)."""
    import keras
    import tensorflow as tf

    import tfbit
    model = tfbit.fold_weight_standardization(keras.saving.load_model(path))
    call = tf.function(lambda x: model(x, training=False), jit_compile=jit_compile, autograph=False)

    def run(x):
        out = call(x)
        if task == "features":
            out = {"features": out["pooler_output"]}
        elif not isinstance(out, dict):
            out = {"logits": out}
        return {k: np.asarray(v) for k, v in out.items()}
    return run


def saved_model_runner(path, signature):
    """One signature of a SavedModel: `serving_default` takes encoded images, `pixel_values`
    preprocessed ones."""
    import tensorflow as tf
    fn = tf.saved_model.load(path).signatures[signature]
    key = "image_bytes" if signature == "serving_default" else "pixel_values"
    return lambda x: {k: v.numpy() for k, v in fn(**{key: tf.constant(x)}).items()}


def tflite_runner(path, num_threads=None):
    """A `.tflite` file in LiteRT, one image per call (mobile runtimes run batch 1)."""
    from ai_edge_litert.interpreter import Interpreter

    from tfbit.runtime import available_cores
    interpreter = Interpreter(model_path=path, num_threads=num_threads or available_cores())
    runner = interpreter.get_signature_runner("serving_default")
    (name, detail), = runner.get_input_details().items()
    expected = tuple(int(d) for d in detail["shape"][1:])

    def run(x):
        x = np.asarray(x)
        if x.ndim != 4 or x.shape[1:] != expected:
            raise ValueError(f"{path} takes a batch of {expected} {detail['dtype'].__name__} images "
                             f"(shape (N, {', '.join(map(str, expected))})), got shape {x.shape}")
        if x.dtype != detail["dtype"]:
            raise ValueError(f"{path} takes {detail['dtype'].__name__} input, got {x.dtype}: "
                             "preprocess the images (BitImageProcessor) first")
        return {k: np.concatenate([runner(**{name: x[i:i + 1]})[k] for i in range(len(x))])
                for k in runner.get_output_details()}
    return run
