"""Every use tfbit makes of Keras' and TensorFlow's private API, in one place: each with the
reason, checked on the versions in `CHECKED_ON`. `tests/test_private_api.py` fails, naming the
hook, when an installed release no longer has one; `tests/test_layout.py` keeps other modules
from reaching for private names.

Hooks tfbit subclasses override (their names are private, their call sites are Keras'/TF's):
- `keras.Model._maybe_symbolic_build(iterator=None, data_batch=None)`: `tfbit.models.multi_worker_fit`
  gives it the local replica's batch under MultiWorkerMirroredStrategy (keras-team/keras#20585).
- `keras.layers.Layer._trackable_children(save_type, **kwargs)` (TensorFlow's Trackable):
  `tfbit.models.layers.WSConv2D` adds its standardized-kernel cache, which `tf.saved_model.save`
  must reach but Keras does not track as weights.
"""

import keras

# Not public: whether variables are being read from and written to a StatelessScope (JAX's
# compiled functions, `stateless_call`), where a layer must not use its own variable state.
from keras.src.backend.common.stateless_scope import in_stateless_scope

CHECKED_ON = {"keras": "3.15.1", "tensorflow": "2.21.0"}
OVERRIDDEN = {
    "keras.Model": ("_maybe_symbolic_build", ("iterator", "data_batch")),
    "keras.layers.Layer": ("_trackable_children", ("save_type",)),
}

__all__ = [
    "in_stateless_scope",
    "conv_kernel",
    "watch_assignments",
    "tflite_schema",
    "tflite_flatbuffer_utils",
    "CHECKED_ON",
    "OVERRIDDEN",
]


def conv_kernel(layer):
    """The kernel variable a built Keras convolution stores (`_kernel`): its public `kernel`
    property may return a quantized view instead of the variable itself."""
    return layer._kernel


def watch_assignments(variable, watched_class):
    """Give a live `keras.Variable` the class `watched_class` (a subclass adding behaviour to
    `assign`, no state): Keras creates a layer's variables itself, with no hook to choose their
    class, and `keras.Variable` has no `__slots__`, so the instance keeps its state."""
    if type(variable) is not keras.Variable:
        raise TypeError(f"watch_assignments: {variable.path} is a {type(variable).__name__}, not a keras.Variable")
    variable.__class__ = watched_class
    return variable


def tflite_schema():
    """TFLite's model schema as generated Python classes (`tensorflow.lite.python.
    schema_py_generated`): TensorFlow ships no public reader of a `.tflite` file's tables, and the
    converter's exports must be inspected (float ops left in int8 graphs) and re-packed (metadata)."""
    from tensorflow.lite.python import schema_py_generated

    return schema_py_generated


def tflite_flatbuffer_utils():
    """`tensorflow.lite.tools.flatbuffer_utils`: reads a `.tflite` file into the schema's object
    API and writes it back, the round trip the metadata writer needs."""
    from tensorflow.lite.tools import flatbuffer_utils

    return flatbuffer_utils
