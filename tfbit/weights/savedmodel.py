"""TF Hub / Kaggle Models BiT SavedModels (TF2 `saved_model_2` format), e.g.
`https://tfhub.dev/google/bit/m-r50x1/1`: a local folder, or a handle resolved through the
kagglehub / tensorflow_hub caches (`tfbit.weights.tfhub`).

Their variables carry the names the original code gave them, the `.npz` keys
(`resnet/block1/unit01/a/group_norm/gamma`), possibly under a prefix of the model that exported
them: so the variables ARE an `.npz` and the `.npz`'s table, architecture inference, labels and
weight-standardization eps apply. A Dense head (`head/dense/kernel`, (C, N)) is kept as the
`.npz`'s 1x1 convolution. Feature-vector modules have no head and become a features model.

Values are read from the checkpoint in `variables/` (TensorFlow's checkpoint reader), by the
name each variable had when saved, which its object graph records beside each value's key:
the functions in saved_model.pb are never loaded, so reading a R152x4 takes seconds.

The modules take float RGB in [0, 1] and convert it to [-1, 1] themselves; the checkpoint's
preprocessing (`npz.original_preprocessor`: rescale 1/255, mean = std = 0.5) is exactly that.
"""

import os

import numpy as np

from tfbit.errors import CheckpointError
from tfbit.filetypes import BIT_STEM, READS, check_source, listing, proto_fields
from tfbit.weights import npz, tfhub
from tfbit.weights.checkpoint import Checkpoint
from tfbit.weights.infer import infer_config
from tfbit.weights.labels import known_labels

FILES = ("saved_model.pb", "saved_model.pbtxt")
_OBJECT_GRAPH = "_CHECKPOINTABLE_OBJECT_GRAPH"  # the checkpoint's own key of its object graph
# TrackableObjectGraph.nodes, TrackableObject.attributes and SerializedTensor's name, full_name
# and checkpoint_key (tensorflow/core/protobuf/trackable_object_graph.proto)
_NODES, _ATTRIBUTES, _NAME, _FULL_NAME, _KEY = 1, 2, 1, 2, 3
_DENSE_HEAD = "resnet/head/dense/"  # the original TF2 code's head, a Dense layer
_CONV_HEAD = "resnet/head/conv2d/"


def is_saved_model(path):
    return os.path.isdir(path) and any(os.path.isfile(os.path.join(path, f)) for f in FILES)


def _string(field):
    return bytes(field[0]).decode("utf8") if field else ""


def read_variables(path):
    """{name the variable had when saved: array} of a SavedModel folder's checkpoint."""
    import tensorflow as tf

    prefix = os.path.join(path, "variables", "variables")
    try:
        reader = tf.train.load_checkpoint(prefix)
        graph = memoryview(reader.get_tensor(_OBJECT_GRAPH))
    except (tf.errors.OpError, ValueError) as e:
        raise CheckpointError(
            f"{path} is a SavedModel folder without a readable variables checkpoint "
            f"(variables/variables.index): {type(e).__name__}: {str(e).splitlines()[0]}"
        ) from None
    keys = {}
    for node in proto_fields(graph, _NODES):
        for attribute in proto_fields(node, _ATTRIBUTES):
            if _string(proto_fields(attribute, _NAME)) == "VARIABLE_VALUE":
                name = _string(proto_fields(attribute, _FULL_NAME))
                keys[name or _string(proto_fields(attribute, _KEY))] = _string(proto_fields(attribute, _KEY))
    return {name: np.asarray(reader.get_tensor(key)) for name, key in keys.items()}


def npz_keys(variables, path):
    """{`.npz` key: array} of the variables of the BiT a SavedModel holds, its prefix replaced by
    the `.npz`'s scope; variables outside the BiT keep their names (its loading lists them)."""
    prefixes = sorted({m["prefix"] for name in variables if (m := BIT_STEM.fullmatch(name))})
    if not prefixes:
        held = f"its variables: {listing(sorted(variables))}" if variables else "it holds no variables"
        raise CheckpointError(f"{path} is a TensorFlow SavedModel without BiT variables ({held}): {READS}")
    if len(prefixes) > 1:
        raise CheckpointError(
            f"{path} holds {len(prefixes)} BiT networks (under {', '.join(p or '(no prefix)' for p in prefixes)}), "
            "where tfbit converts one"
        )
    tensors = {}
    for name, value in variables.items():
        key = "resnet/" + name[len(prefixes[0]) :] if name.startswith(prefixes[0]) else name
        if key.startswith(_DENSE_HEAD) and value.ndim == 2:
            key, value = _CONV_HEAD + "kernel", value[None, None]
        elif key.startswith(_DENSE_HEAD):
            key = _CONV_HEAD + key[len(_DENSE_HEAD) :]
        tensors[key] = value
    return tensors


def _name(path):
    """A folder's name; for a cache's version folder (`.../m-r50x1/1`), the name above it."""
    path = os.path.abspath(path)
    base = os.path.basename(path)
    return os.path.basename(os.path.dirname(path)) if base.isdigit() else base


def read(source):
    """A `Checkpoint` (format "savedmodel") of a SavedModel folder or a TF Hub / Kaggle handle,
    with the `.npz`'s conventions: weight-standardization eps 1e-10, the original evaluation
    preprocessing (`npz.read`)."""
    source = os.fspath(source)
    if os.path.isdir(source):
        path, name = source, _name(source)
    elif tfhub.is_handle(source):
        path, name = tfhub.resolve(source)
    else:
        raise CheckpointError(f"{source} is neither a SavedModel folder nor a TF Hub / Kaggle Models handle")
    check_source(path)  # a downloaded TF1 Hub module, or a SavedModel of another model, named as one
    if not is_saved_model(path):
        raise CheckpointError(f"{path} has no saved_model.pb: not a SavedModel folder")
    tensors = npz_keys(read_variables(path), path)
    labels = known_labels(np.size(tensors.get(_CONV_HEAD + "bias", ())), name)
    config = infer_config(tensors, npz.TABLE, 1, path, labels, ws_eps=npz.WS_EPS)
    files = tuple(os.path.join(folder, f) for folder, _, names in os.walk(path) for f in names)
    preprocessor = npz.original_preprocessor().to_dict()
    return Checkpoint("savedmodel", name, path, config, tensors, npz.TABLE, 1, preprocessor, files)
