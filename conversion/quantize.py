"""Full integer TFLite through LiteRT's own quantizer (PyPI `ai-edge-quantizer`): a float
`.tflite` and calibration images in, an all-integer `.tflite` out.

The TFLite converter's post-training quantization is deprecated in LiteRT's documentation in
favour of this quantizer, which also takes per-op recipes: int16 activations on chosen ops,
int8 elsewhere. `RECIPES` names the ones `benchmarks/bench_int8.py` measures; `DEFAULT_RECIPE`
is the one `conversion.export` publishes as `int8` (benchmarks/RESULTS.md, issue 23).
"""

import re
import warnings

import numpy as np

from tfbit.errors import TfbitError
from tfbit.private_api import tflite_flatbuffer_utils, tflite_schema

# The quantizer's scope of an op is its output tensor names, each followed by `;`, as tfbit's
# layers name them in a converted graph: `.../stage1_unit1_norm1_1/Mean_2;`, `.../stage1_unit1_add_1/Add;`.
# GroupNorm's statistics: the means, deviations, squares, variance + eps and rsqrt, and the
# scale/offset built from them; not the two full-size ops that apply them (`mul_4`, and the
# ADD with the activation fused, `.../Relu;.../add_2`).
GROUPNORM_STATISTICS = r"norm\w*/(Mean(_\d+)?|sub(_[12])?|mul(_[123])?|add(_1)?|Rsqrt|Reshape(_\d+)?);$"
RESIDUAL_ADDS = r"_add(_\d+)?/Add;$"
# The global pooling and the ops writing the graph's outputs (the logits): their int8 step is
# what separates near-tied classes. `OUTPUTS` is replaced by the output tensors' names.
OUTPUTS = "OUTPUTS"
HEAD = (r"pooler\w*/Mean;$", OUTPUTS)

# {name: ((scope regex, op type or "*", activation bits), ...)} applied in order over int8
# activations for every op (later entries win where they match); weights are int8 per channel.
RECIPES = {
    "static_wi8_ai8": (),
    "static_wi8_ai16": ((".*", "*", 16),),
    "a16_residual": ((RESIDUAL_ADDS, "*", 16),),
    "a16_head": tuple((r, "*", 16) for r in HEAD),
    "a16_groupnorm_statistics": ((GROUPNORM_STATISTICS, "*", 16),),
    "a16_groupnorm_statistics_residual": ((GROUPNORM_STATISTICS, "*", 16), (RESIDUAL_ADDS, "*", 16)),
    "a16_groupnorm_statistics_residual_head": (
        (GROUPNORM_STATISTICS, "*", 16),
        (RESIDUAL_ADDS, "*", 16),
        *((r, "*", 16) for r in HEAD),
    ),
    "a16_all_but_conv": ((".*", "*", 16), (".*", "CONV_2D", 8)),
}
# int8 tensors only (what every integer accelerator takes), ~3x the fp32 file; the int16
# recipes win a few near-ties but run below the fp32 file's speed (LiteRT's XNNPACK takes no
# int16 op): benchmarks/RESULTS.md, 2026-12-07
DEFAULT_RECIPE = "static_wi8_ai8"
# images per calibration step: a batch's ranges are its min and max (memory: every intermediate
# tensor of the batch is kept)
CALIBRATION_BATCH = 4

_FLOAT_AT_THE_EDGES = ("INPUT", "OUTPUT")


class QuantizerMissing(TfbitError, ImportError):
    """`ai-edge-quantizer` is not installed."""


def quantizer_module():
    try:
        from ai_edge_quantizer import quantizer
    except ImportError as e:
        raise QuantizerMissing(
            f"full int8 TFLite needs LiteRT's quantizer: pip install ai-edge-quantizer ({e})"
        ) from None
    return quantizer


def quantizer_for(float_flatbuffer, recipe=DEFAULT_RECIPE):
    """An `ai_edge_quantizer.Quantizer` of `float_flatbuffer` set up with `RECIPES[recipe]`."""
    if recipe not in RECIPES:
        raise ValueError(f"unknown quantization recipe {recipe!r}; choose from {sorted(RECIPES)}")
    quantizer = quantizer_module()
    from ai_edge_quantizer import algorithm_manager, qtyping

    q = quantizer.Quantizer(bytearray(float_flatbuffer))
    every_op = qtyping.TFLOperationName.ALL_SUPPORTED
    q.add_static_config(".*", every_op, activation_num_bits=8, weight_num_bits=8)
    outputs = "|".join(re.escape(name) for name in _output_names(float_flatbuffer))
    for regex, op, bits in RECIPES[recipe]:
        regex = f"^({outputs});$" if regex == OUTPUTS else regex
        q.add_static_config(regex, qtyping.TFLOperationName(op), activation_num_bits=bits, weight_num_bits=8)
    # Input and output stay float, quantized at the edges (one QUANTIZE, one DEQUANTIZE) as
    # the converter's int8 files were: callers feed what the float file takes. The quantizer
    # applies the last scope that matches, so this one ("^", every op) comes last.
    for edge in _FLOAT_AT_THE_EDGES:
        q.update_quantization_recipe(
            "^", qtyping.TFLOperationName(edge), algorithm_key=algorithm_manager.AlgorithmName.NO_QUANTIZE
        )
    return q


def quantize(float_flatbuffer, calibration, recipe=DEFAULT_RECIPE, uint8_input=False, threads=2):
    """The all-integer flatbuffer (bytes) of `float_flatbuffer` (one `serving_default` signature,
    one input), calibrated on `calibration` (an array of inputs, one per image).

    `uint8_input`: the float file's input takes raw pixels 0-255 as floats; the result takes them
    as uint8, quantized as the pixel itself (scale 1, zero point 0), which needs calibration to
    see both 0 and 255 (two pixels are set so).
    """
    data = np.asarray(calibration).astype(np.float32)
    if uint8_input:
        data = data.copy()
        data[0, 0, 0], data[0, -1, -1] = 0, 255
    q = quantizer_for(float_flatbuffer, recipe)
    ((name, detail),) = _signature_inputs(float_flatbuffer).items()
    batch = CALIBRATION_BATCH if detail["shape_signature"][0] == -1 else 1  # the raw-crop graphs take one image
    result = {}
    with warnings.catch_warnings():
        # LiteRT warns that keeping every intermediate tensor is for debugging: calibration and
        # its check read every one of them (their ranges), by design
        warnings.filterwarnings("ignore", message=".*experimental_preserve_all_tensors")
        for start in range(0, len(data), batch):
            calibrated = q.calibrate({"serving_default": [{name: data[start : start + batch]}]}, num_threads=threads)
            result = _min_max(result, calibrated)
        flatbuffer = bytes(q.quantize(result, enable_progress_report=False).quantized_model)
    return _uint8_input(flatbuffer) if uint8_input else flatbuffer


def _min_max(ranges, more):
    """Ranges over both sets of images. The quantizer merges its calibration steps by a moving
    average (0.95 on what it has seen), which leaves a range to the first images and clips the
    others; the TFLite converter takes the min and max over every image, as this does."""
    from ai_edge_quantizer.utils import qsv_utils

    return {name: qsv_utils.min_max_update(ranges.get(name, {}), qsv) if qsv else qsv for name, qsv in more.items()}


def _signature_inputs(flatbuffer):
    from ai_edge_litert.interpreter import Interpreter

    return Interpreter(model_content=bytes(flatbuffer)).get_signature_runner().get_input_details()


def _output_names(flatbuffer):
    model = tflite_flatbuffer_utils().read_model_from_bytearray(bytearray(flatbuffer))
    subgraph = model.subgraphs[0]
    return [subgraph.tensors[i].name.decode() for i in subgraph.outputs]


def _uint8_input(flatbuffer):
    """The file with its float input made uint8 (scale 1, zero point 0): its QUANTIZE then
    requantizes uint8 into the int8 the first op takes, exactly when that int8's scale is 1
    (zero point -128), which calibration over 0..255 gives."""
    schema, utils = tflite_schema(), tflite_flatbuffer_utils()
    model = utils.read_model_from_bytearray(bytearray(flatbuffer))
    subgraph = model.subgraphs[0]
    (index,) = subgraph.inputs
    tensor = subgraph.tensors[index]
    consumer = next(op for op in subgraph.operators if index in op.inputs)
    quantized = subgraph.tensors[consumer.outputs[0]].quantization
    if quantized is None or not np.allclose(quantized.scale, 1.0) or list(quantized.zeroPoint) != [-128]:
        raise TfbitError(f"the uint8 input's QUANTIZE does not map pixels exactly: {quantized and quantized.scale}")
    tensor.type = schema.TensorType.UINT8
    tensor.quantization = schema.QuantizationParametersT()
    tensor.quantization.scale, tensor.quantization.zeroPoint = [1.0], [0]
    return bytes(utils.convert_object_to_bytearray(model))
