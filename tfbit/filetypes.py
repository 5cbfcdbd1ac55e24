"""What a source file or folder is, told from its first bytes and names before TensorFlow loads:
the command lines refuse a model file of another kind in well under a second, naming the kind
and what tfbit reads, where loading it would spend seconds importing TensorFlow first.

Imports only the standard library, `tfbit.errors` and (for HDF5 files) h5py: conversion/__init__
loads it on its own, as it does `tfbit.errors`. A SavedModel's variable names are read from its
saved_model.pb with a protocol-buffer reader of a dozen lines, since the generated TensorFlow
classes would import TensorFlow itself.
"""

import os
import re
import zipfile

from tfbit.errors import CheckpointError

READS = (
    "tfbit reads a transformers or timm checkpoint (folder, hub id or .safetensors/.pth/.bin state "
    "dict), an original BiT .npz or .h5 file, a TF Hub / Kaggle BiT SavedModel (folder or handle), a tfbit "
    ".keras file, or a preset name"
)
_IMAGES = {b"\xff\xd8\xff": "JPEG", b"\x89PNG": "PNG", b"GIF8": "GIF", b"BM": "BMP"}
_HDF5 = b"\x89HDF\r\n\x1a\n"


def check_source(path):
    """Raises CheckpointError naming `path`'s kind when it is a model file or folder of a kind
    no tfbit reader takes; returns quietly for anything a reader may take (or that does not exist:
    the loaders name what is missing)."""
    kind = unreadable_kind(os.fspath(path))
    if kind:
        raise CheckpointError(f"{path} is {kind}: {READS}")


def unreadable_kind(path):
    """A description of `path` when no tfbit reader takes it, else None."""
    if os.path.isdir(path):
        return _folder_kind(path)
    if not os.path.isfile(path):
        return None
    if os.path.getsize(path) == 0:
        return "an empty file"
    with open(path, "rb") as f:
        head = f.read(16)
    if head[4:8] == b"TFL3":  # the FlatBuffer identifier of every TFLite model
        return "a TFLite model (an export, not a checkpoint: convert the checkpoint it was made from)"
    for magic, name in _IMAGES.items():
        if head.startswith(magic):
            return f"a {name} image, not a checkpoint (the checkpoint comes first; predict takes images)"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "a WebP image, not a checkpoint (the checkpoint comes first; predict takes images)"
    if path.lower().endswith(".onnx"):
        return "an ONNX model"
    if head.startswith(_HDF5):
        return _hdf5_kind(path)
    if head.startswith(b"PK\x03\x04") and not path.lower().endswith((".keras", ".npz")):
        return _zip_kind(path)
    return None


def _folder_kind(path):
    names = set(os.listdir(path))
    if "tfhub_module.pb" in names:
        return "a TF1 Hub module (hub.Module, TensorFlow 1 format)"
    if names & {"saved_model.pb", "saved_model.pbtxt"}:
        return _saved_model_kind(path)
    return None


# The stem every BiT has, under whatever prefix the exporting model gave it (`tfbit.weights.savedmodel`)
BIT_STEM = re.compile(r"(?P<prefix>(?:.*/)?)root_block/standardized_conv2d/kernel(?::\d+)?")
# Field numbers of TensorFlow's protos: SavedModel.meta_graphs, MetaGraphDef.object_graph_def,
# SavedObjectGraph.nodes, SavedObject.variable and SavedVariable.name (tensorflow/core/protobuf)
_META_GRAPHS, _OBJECT_GRAPH, _NODES, _VARIABLE, _VARIABLE_NAME = 2, 7, 1, 7, 6


def _saved_model_kind(path):
    """A SavedModel is read when a variable is named as a BiT's stem; one whose names cannot be
    read here (a text saved_model.pbtxt, a damaged file) is left to the reader, which loads it."""
    names = saved_model_variable_names(path)
    if names is None or any(BIT_STEM.fullmatch(name) for name in names):
        return None
    held = f"its variables: {listing(names)}" if names else "it holds no variables"
    return f"a TensorFlow SavedModel without BiT variables ({held})"


def saved_model_variable_names(path):
    """The names of the variables a SavedModel folder's saved_model.pb records (without `:0`),
    or None when that file cannot be read without TensorFlow."""
    try:
        with open(os.path.join(path, "saved_model.pb"), "rb") as f:
            data = memoryview(f.read())
        return [
            bytes(name).decode("utf8")
            for meta in proto_fields(data, _META_GRAPHS)
            for graph in proto_fields(meta, _OBJECT_GRAPH)
            for node in proto_fields(graph, _NODES)
            for variable in proto_fields(node, _VARIABLE)
            for name in proto_fields(variable, _VARIABLE_NAME)
        ]
    except (OSError, ValueError, IndexError):  # missing, text or damaged: the reader names it
        return None


def proto_fields(data, number):
    """The values of field `number` in a serialized protocol buffer message: ints for varints,
    memoryviews for length-delimited fields (messages, strings)."""
    values, position, end = [], 0, len(data)
    while position < end:
        key, position = _varint(data, position)
        wire = key & 7
        if wire == 0:
            value, position = _varint(data, position)
        elif wire == 2:
            length, position = _varint(data, position)
            value, position = data[position : position + length], position + length
        elif wire in (1, 5):  # fixed 64 and 32 bits: no field read here has them
            value, position = None, position + (8 if wire == 1 else 4)
        else:
            raise ValueError(f"protocol buffer wire type {wire}: not a message")
        if key >> 3 == number and value is not None:
            values.append(value)
    if position != end:
        raise ValueError("a truncated protocol buffer")
    return values


def _varint(data, position):
    value = shift = 0
    while True:
        byte = data[position]
        value, position, shift = value | (byte & 0x7F) << shift, position + 1, shift + 7
        if byte < 0x80:
            return value, position


def _hdf5_kind(path):
    """Keras 2's `save_weights` files (the original TF2 BiT code's) name their layers at the root;
    Keras 3's `.weights.h5` and other HDF5 files do not (`tfbit.weights.h5` reads the former)."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            return None if "layer_names" in f.attrs else hdf5_without_layer_names(f)
    except OSError:
        return None  # a damaged file: the reader names what is wrong with it


def hdf5_without_layer_names(file):
    """What an open HDF5 file without Keras 2's `layer_names` holds instead."""
    entries = sorted(file)
    keras3 = {"layers", "vars"} <= set(entries)
    return (
        "an HDF5 file without the Keras 2 layer_names of the original BiT code (it holds "
        f"{listing(entries) or 'nothing'}{': the layout of a Keras 3 .weights.h5' if keras3 else ''})"
    )


def listing(names, shown=6):
    """The first `shown` of `names`, and how many there are in all when there are more."""
    names = list(names)
    return ", ".join(names[:shown]) + (f", ... ({len(names)} in all)" if len(names) > shown else "")


def _zip_kind(path):
    """PyTorch's zip format holds `<name>/data.pkl`; TorchScript adds the program's code."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except zipfile.BadZipFile:
        return None
    if any("/code/" in name or name.endswith("/constants.pkl") for name in names):
        return "a TorchScript program (torch.jit.save): save the model's state_dict() with torch.save instead"
    return None
