"""Artifact runners: load an exported artifact from disk and give `run(inputs) -> {output: array}`.
Shared by verification (what is checked is what is deployed) and `predict`."""

import os
import zipfile

import numpy as np


def check_file(path):
    """ValueError naming a `.keras` or `.tflite` file that is not one (Keras reports a damaged
    `.keras` file as "File not found", LiteRT a damaged `.tflite` with a native traceback)."""
    if not os.path.isfile(path):
        return  # the loaders name a missing file
    if path.endswith(".keras") and not zipfile.is_zipfile(path):
        raise ValueError(f"{path} is damaged, not a .keras file (a zip archive of the model): save the model again")
    if path.endswith(".tflite"):
        with open(path, "rb") as f:
            identifier = f.read(8)[4:]
        if identifier != b"TFL3":  # the FlatBuffer file identifier of every TFLite model
            raise ValueError(f"{path} is damaged, not a TFLite model (no TFL3 identifier): convert the model again")


def load_keras(path):
    """(the processor of its BitPreprocessing layer or None, the model from pixel values on,
    folded for inference) of a `.keras` file: a tfbit model or one a user built on tfbit."""
    import keras

    import tfbit
    from tfbit.models import user_models

    check_file(path)
    try:
        loaded = keras.saving.load_model(path)
    except (zipfile.BadZipFile, KeyError) as e:  # a cut-off archive, or one without the model
        raise ValueError(f"{path} is damaged, not a complete .keras file ({e}): save the model again") from None
    processor, model = user_models.split_preprocessing(loaded)
    return processor, tfbit.fold_weight_standardization(model)


def model_runner(model, jit_compile=False, task="classification"):
    """A Keras model (pixel values -> outputs) traced once (XLA-compiled on request), its
    outputs named as the exported task's (`tfbit.models.user_models.task_outputs`)."""
    import tensorflow as tf

    from tfbit.models import user_models

    call = tf.function(lambda x: model(x, training=False), jit_compile=jit_compile, autograph=False)

    def run(x):
        return {k: np.asarray(v) for k, v in user_models.task_outputs(model, call(x), task).items()}

    return run


def keras_runner(path, jit_compile=False, task="classification"):
    """A `.keras` file (see `load_keras`) as a runner on pixel values."""
    return model_runner(load_keras(path)[1], jit_compile, task)


def saved_model_signatures(folder):
    """The signatures of a SavedModel folder, read from its saved_model.pb without loading the
    variables; ValueError naming a damaged file (TensorFlow's own report is a traceback)."""
    from google.protobuf.message import DecodeError
    from tensorflow.core.protobuf import saved_model_pb2

    file = os.path.join(folder, "saved_model.pb")
    try:
        with open(file, "rb") as f:
            return saved_model_pb2.SavedModel.FromString(f.read()).meta_graphs[0].signature_def
    except (DecodeError, IndexError) as e:
        raise ValueError(
            f"{file} is damaged, not a SavedModel graph ({e or 'it holds none'}): export the model again"
        ) from None


def check_saved_model(folder):
    """The signatures of a SavedModel folder, whose graph (`saved_model_signatures`) and every
    variable are read without building the model; ValueError naming a damaged one. batch_predict
    checks before starting its pipeline, whose workers would report it as a traceback."""
    import tensorflow as tf

    signatures = saved_model_signatures(folder)
    try:
        reader = tf.train.load_checkpoint(os.path.join(folder, "variables", "variables"))
        for name in reader.get_variable_to_shape_map():
            reader.get_tensor(name)
    except (OSError, ValueError, tf.errors.OpError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{folder} is a damaged SavedModel export ({reason}): export the model again") from None
    return signatures


def load_saved_model(folder):
    """`tf.saved_model.load` of a SavedModel folder; ValueError naming a damaged export."""
    import tensorflow as tf

    saved_model_signatures(folder)
    try:
        return tf.saved_model.load(folder)
    except (OSError, tf.errors.OpError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{folder} is a damaged SavedModel export ({reason}): export the model again") from None


def saved_model_runner(saved_model, signature):
    """One signature of a SavedModel (its folder, or what `tf.saved_model.load` returned for it):
    `serving_default` takes encoded images, `pixel_values` preprocessed ones."""
    import tensorflow as tf

    if isinstance(saved_model, (str, os.PathLike)):
        saved_model = load_saved_model(os.fspath(saved_model))
    fn = saved_model.signatures[signature]
    key = "image_bytes" if signature == "serving_default" else "pixel_values"
    return lambda x: {k: v.numpy() for k, v in fn(**{key: tf.constant(x)}).items()}


def tflite_runner(path, num_threads=None):
    """A `.tflite` file in LiteRT, one image per call (mobile runtimes run batch 1)."""
    from ai_edge_litert.interpreter import Interpreter

    from conversion.runtime import available_cores

    check_file(path)
    interpreter = Interpreter(model_path=path, num_threads=num_threads or available_cores())
    runner = interpreter.get_signature_runner("serving_default")
    ((name, detail),) = runner.get_input_details().items()
    expected = tuple(int(d) for d in detail["shape"][1:])

    def run(x):
        x = np.asarray(x)
        if x.ndim != 4 or x.shape[1:] != expected:
            raise ValueError(
                f"{path} takes a batch of {expected} {detail['dtype'].__name__} images "
                f"(shape (N, {', '.join(map(str, expected))})), got shape {x.shape}"
            )
        if x.dtype != detail["dtype"]:
            raise ValueError(_dtype_message(path, detail["dtype"], x.dtype, expected))
        return {
            k: np.concatenate([runner(**{name: x[i : i + 1]})[k] for i in range(len(x))])
            for k in runner.get_output_details()
        }

    return run


def _dtype_message(path, expected, got, shape):
    if expected == np.uint8:
        return (
            f"{path} takes raw uint8 RGB pixels (images resized and center-cropped to "
            f"{shape[0]}x{shape[1]}, not normalized: the file normalizes them), got {got}: "
            "conversion.runners.raw_crops(processor, images) gives them"
        )
    return (
        f"{path} takes float32 input, got {got}: preprocess the images (BitImageProcessor) first, "
        "raw pixels give wrong answers; or use a file converted with --tflite-input uint8, which "
        "takes raw uint8 pixels"
    )


def raw_crops(processor, images):
    """What a `--tflite-input uint8` file takes: the processor's resized, center-cropped RGB as
    uint8 (N, H, W, 3), without rescaling or normalization (the file does those)."""
    crops = processor(images, do_rescale=False, do_normalize=False)
    return np.clip(np.rint(crops), 0, 255).astype(np.uint8)  # exact for uint8 images


def tflite_takes_uint8(path):
    """Whether a `.tflite` file takes raw uint8 pixels (`convert --tflite-input uint8`)."""
    from ai_edge_litert.interpreter import Interpreter

    check_file(path)
    (detail,) = Interpreter(model_path=path).get_signature_runner("serving_default").get_input_details().values()
    return detail["dtype"] == np.uint8
