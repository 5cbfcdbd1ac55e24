"""TFLite metadata for image classifiers: the labels and the normalization, where the LiteRT
support library and Task Library (`ImageClassifier`) read them.

The format is TFLite's metadata schema (`metadata_schema.fbs` of tflite-support, file identifier
"M001"): a `ModelMetadata` flatbuffer stored in a model buffer named "TFLITE_METADATA", and the
label file appended to the model as a zip archive (a TFLite file stays loadable with trailing
bytes). No maintained writer installs beside TensorFlow 2.21: tflite-support 0.4.4 needs
protobuf < 4 and mediapipe >= 0.10.30 ships its writer without the native module it imports
(0.10.21 needs numpy < 2). So the few tables used here are written with the `flatbuffers`
builder, field slots as numbered in that schema, into a model read and re-packed with the
runtime's model schema (`tfbit.private_api.tflite_flatbuffer_utils`, as `conversion/tflite_graph.py`).
"""

import io
import zipfile

import flatbuffers
import numpy as np

METADATA_NAME = "TFLITE_METADATA"
FILE_IDENTIFIER = b"M001"
LABELS_FILE = "labels.txt"
MIN_PARSER_VERSION = "1.0.0"  # every table and field used here is in the schema's first version
# enum and union values of metadata_schema.fbs
_TENSOR_AXIS_LABELS = 2
_RGB = 1
_FEATURE_PROPERTIES, _IMAGE_PROPERTIES = 1, 2
_NORMALIZATION_OPTIONS = 1


def _strings(builder, values):
    return [builder.CreateString(v) for v in values]


def _vector(builder, offsets):
    builder.StartVector(4, len(offsets), 4)
    for offset in reversed(offsets):
        builder.PrependUOffsetTRelative(offset)
    return builder.EndVector()


def _floats(builder, values):
    return builder.CreateNumpyVector(np.asarray(values, np.float32))


def _table(builder, fields):
    """fields: [(slot, kind, value)], kind 'offset', 'byte' or 'uint'."""
    builder.StartObject(max([slot + 1 for slot, _, _ in fields], default=0))
    for slot, kind, value in fields:
        if kind == "offset":
            builder.PrependUOffsetTRelativeSlot(slot, value, 0)
        elif kind == "byte":
            builder.PrependInt8Slot(slot, value, 0)
        else:
            builder.PrependUint32Slot(slot, value, 0)
    return builder.EndObject()


# what the output holds, by the activation the model applies (None: none, logits)
OUTPUTS = {
    None: ("logits", "Logits of the classes, not probabilities (softmax gives them)."),
    "softmax": ("probabilities", "Probabilities of the classes (softmax of the logits): they sum to 1."),
    "sigmoid": (
        "probabilities",
        "Probability of each class on its own (sigmoid of the logits, a multi-label head): they need not sum to 1.",
    ),
}


def _output_metadata(b, activation, labels):
    """The output's TensorMetadata. Probabilities get the value range [0, 1] as `stats`, as
    tflite-support's own classifier writer records them (`ClassificationTensorMd`): the schema
    has no other field for it, and the Task Library reports the output as its scores unchanged
    (no ScoreCalibration here: that would apply a sigmoid on top)."""
    name, description = OUTPUTS[activation]
    features = _table(b, [])
    content = _table(b, [(0, "byte", _FEATURE_PROPERTIES), (1, "offset", features)])
    fields = [(0, "offset", b.CreateString(name)), (1, "offset", b.CreateString(description)), (3, "offset", content)]
    if activation is not None:
        fields.append((5, "offset", _table(b, [(0, "offset", _floats(b, [1.0])), (1, "offset", _floats(b, [0.0]))])))
    return _table(b, fields + [(6, "offset", _vector(b, [labels]))])


def _model_metadata(name, description, input_description, activation, normalization, size):
    """`activation`: what the output holds (a key of `OUTPUTS`); `normalization`: (mean, std) of
    the input; `size`: its (height, width)."""
    (mean, std), (height, width) = normalization, size
    b = flatbuffers.Builder(1024)
    labels = _table(
        b,
        [
            (0, "offset", b.CreateString(LABELS_FILE)),
            (1, "offset", b.CreateString("Labels of the output's classes, one a line, in index order.")),
            (2, "byte", _TENSOR_AXIS_LABELS),
        ],
    )
    size = _table(b, [(0, "uint", width), (1, "uint", height)])  # ImageSize
    image = _table(b, [(0, "byte", _RGB), (1, "offset", size)])  # ImageProperties
    image_content = _table(b, [(0, "byte", _IMAGE_PROPERTIES), (1, "offset", image)])
    normalization = _table(b, [(0, "offset", _floats(b, mean)), (1, "offset", _floats(b, std))])
    unit = _table(b, [(0, "byte", _NORMALIZATION_OPTIONS), (1, "offset", normalization)])  # ProcessUnit
    names = _strings(b, ["image", input_description])
    tensor_in = _table(
        b,
        [
            (0, "offset", names[0]),
            (1, "offset", names[1]),
            (3, "offset", image_content),
            (4, "offset", _vector(b, [unit])),
        ],
    )
    tensor_out = _output_metadata(b, activation, labels)
    subgraph = _table(b, [(2, "offset", _vector(b, [tensor_in])), (3, "offset", _vector(b, [tensor_out]))])
    text = _strings(b, [name, description, MIN_PARSER_VERSION])
    root = _table(
        b,
        [(0, "offset", text[0]), (1, "offset", text[1]), (3, "offset", _vector(b, [subgraph])), (7, "offset", text[2])],
    )
    b.Finish(root, file_identifier=FILE_IDENTIFIER)
    return bytes(b.Output())


def add_classifier_metadata(flatbuffer, labels, mean, std, name, description, activation=None):
    """`flatbuffer` (a one-signature image classifier) with metadata and `labels.txt` attached.

    Args:
        labels: the class names in index order.
        mean, std: per-channel (or single) normalization on the 0-255 pixel scale: the model's
            float input is (pixel - mean) / std. For a uint8-input model the model applies it
            itself and the support library feeds raw pixels (it normalizes float inputs only).
        activation: None when the output is logits; "softmax" or "sigmoid" when the model
            turns them into probabilities itself.
    """
    from tfbit.private_api import tflite_flatbuffer_utils, tflite_schema

    schema, flatbuffer_utils = tflite_schema(), tflite_flatbuffer_utils()

    model = flatbuffer_utils.read_model_from_bytearray(bytearray(flatbuffer))
    subgraph = model.subgraphs[0]
    (tensor_in,), (tensor_out,) = subgraph.inputs, subgraph.outputs
    input_tensor, output_tensor = subgraph.tensors[tensor_in], subgraph.tensors[tensor_out]
    if output_tensor.shape[-1] != len(labels):
        raise ValueError(f"the model has {output_tensor.shape[-1]} outputs but {len(labels)} labels were given")
    if any("\n" in label for label in labels):
        raise ValueError("a label contains a line break: labels.txt holds one label a line")
    _, height, width, _ = input_tensor.shape
    pixels = (
        "uint8 RGB pixels (normalized inside the model)"
        if input_tensor.type == schema.TensorType.UINT8
        else "float32 RGB pixels normalized as (pixel - mean) / std"
    )
    metadata = _model_metadata(
        name, description, f"{height}x{width} {pixels}", activation, (mean, std), (int(height), int(width))
    )
    buffer = schema.BufferT()
    buffer.data = np.frombuffer(metadata, np.uint8)
    model.buffers.append(buffer)
    entry = schema.MetadataT()
    entry.name, entry.buffer = METADATA_NAME, len(model.buffers) - 1
    model.metadata = [m for m in (model.metadata or []) if m.name != METADATA_NAME.encode()] + [entry]
    out = io.BytesIO(bytes(flatbuffer_utils.convert_object_to_bytearray(model)))
    out.seek(0, io.SEEK_END)
    with zipfile.ZipFile(out, "a") as archive:  # appended: the zip holds the associated files
        archive.writestr(LABELS_FILE, "".join(f"{label}\n" for label in labels))
    return out.getvalue()


# -- reading back ---------------------------------------------------------------------------------


def _field(table, slot):
    """Absolute position of an offset field's target, or None."""
    offset = table.Offset(4 + 2 * slot)
    return table.Indirect(table.Pos + offset) if offset else None


def _scalar(table, slot, kind):
    offset = table.Offset(4 + 2 * slot)
    return table.Get(kind, table.Pos + offset) if offset else 0


def _sub_table(table, slot):
    from flatbuffers.table import Table

    position = _field(table, slot)
    return None if position is None else Table(table.Bytes, position)


def _string(table, slot):
    offset = table.Offset(4 + 2 * slot)
    return table.String(table.Pos + offset).decode() if offset else None


def _tables(table, slot):
    from flatbuffers.table import Table

    offset = table.Offset(4 + 2 * slot)
    if not offset:
        return []
    start = table.Vector(offset)
    return [Table(table.Bytes, table.Indirect(start + 4 * i)) for i in range(table.VectorLen(offset))]


def _float_vector(table, slot):
    offset = table.Offset(4 + 2 * slot)
    return [] if not offset else list(table.GetVectorAsNumpy(flatbuffers.number_types.Float32Flags, offset))


def read_classifier_metadata(data):
    """{name, description, min_parser_version, input/output tensor names, output_description,
    output_range ((min, max) of probabilities, else None), mean, std, image_size, labels} from a
    `.tflite` file's bytes (or path); None when it has no metadata."""
    from flatbuffers import number_types as types
    from flatbuffers.table import Table

    from tfbit.private_api import tflite_schema

    schema = tflite_schema()

    if not isinstance(data, (bytes, bytearray)):
        with open(data, "rb") as f:
            data = f.read()
    model = schema.Model.GetRootAs(data, 0)
    entries = [model.Metadata(i) for i in range(model.MetadataLength())]
    entry = next((m for m in entries if m.Name() == METADATA_NAME.encode()), None)
    if entry is None:
        return None
    buffer = model.Buffers(entry.Buffer()).DataAsNumpy().tobytes()
    if buffer[4:8] != FILE_IDENTIFIER:
        raise ValueError(f"{METADATA_NAME} is not a TFLite metadata flatbuffer (identifier {buffer[4:8]!r})")
    root = Table(buffer, flatbuffers.encode.Get(flatbuffers.packer.uoffset, buffer, 0))
    (subgraph,) = _tables(root, 3)
    (tensor_in,) = _tables(subgraph, 2)
    (tensor_out,) = _tables(subgraph, 3)
    (unit,) = _tables(tensor_in, 4)
    if _scalar(unit, 0, types.Uint8Flags) != _NORMALIZATION_OPTIONS:
        raise ValueError("the input's process unit is not NormalizationOptions")
    normalization = _sub_table(unit, 1)
    size = _sub_table(_sub_table(_sub_table(tensor_in, 3), 1), 1)
    stats = _sub_table(tensor_out, 5)
    files = {_string(f, 0): _scalar(f, 2, types.Int8Flags) for f in _tables(tensor_out, 6)}
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        packed = {n: archive.read(n).decode() for n in archive.namelist()}
    return {
        "name": _string(root, 0),
        "description": _string(root, 1),
        "min_parser_version": _string(root, 7),
        "input": _string(tensor_in, 0),
        "output": _string(tensor_out, 0),
        "output_description": _string(tensor_out, 1),
        "output_range": None if stats is None else (*_float_vector(stats, 1), *_float_vector(stats, 0)),
        "mean": _float_vector(normalization, 0),
        "std": _float_vector(normalization, 1),
        "image_size": (_scalar(size, 1, types.Uint32Flags), _scalar(size, 0, types.Uint32Flags)),
        "label_files": files,
        "labels": packed[LABELS_FILE].splitlines(),
    }


def pixel_normalization(processor):
    """(mean, std), 3 values each, on the 0-255 pixel scale: the processor's rescale and
    normalize as one `(pixel - mean) / std`, the form the metadata schema holds."""
    scale = processor.rescale_factor if processor.do_rescale else 1.0
    mean = np.broadcast_to(processor.image_mean if processor.do_normalize else 0.0, 3)
    std = np.broadcast_to(processor.image_std if processor.do_normalize else 1.0, 3)
    return [float(m / scale) for m in mean], [float(s / scale) for s in std]
