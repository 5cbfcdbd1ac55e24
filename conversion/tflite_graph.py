"""What a TFLite flatbuffer computes in: the float ops left inside an integer-quantized graph.

Phones' integer accelerators (NNAPI, Hexagon, Edge TPU-class) take a graph only when every op
is integer; float input/output is allowed at the edges (one QUANTIZE after each input, one
DEQUANTIZE before each output), so those are not counted.
"""

from tfbit.private_api import tflite_flatbuffer_utils, tflite_schema

schema, flatbuffer_utils = tflite_schema(), tflite_flatbuffer_utils()

_FLOAT_TYPES = {schema.TensorType.FLOAT16, schema.TensorType.FLOAT32, schema.TensorType.FLOAT64}
_OP_NAMES = {code: name for name, code in vars(schema.BuiltinOperator).items() if not name.startswith("_")}


def _op_name(model, op):
    code = model.operatorCodes[op.opcodeIndex]
    return _OP_NAMES.get(max(code.builtinCode, code.deprecatedBuiltinCode), "CUSTOM")


def float_ops(flatbuffer):
    """['OP(tensor, ...)', ...]: every op of every subgraph that reads or writes a float tensor,
    except the QUANTIZE of a graph input and the DEQUANTIZE of a graph output."""
    model = flatbuffer_utils.read_model_from_bytearray(bytearray(flatbuffer))
    found = []
    for subgraph in model.subgraphs:
        inputs, outputs = set(subgraph.inputs), set(subgraph.outputs)
        for op in subgraph.operators:
            name = _op_name(model, op)
            ins, outs = [t for t in op.inputs if t >= 0], [t for t in op.outputs if t >= 0]
            floats = [t for t in ins + outs if subgraph.tensors[t].type in _FLOAT_TYPES]
            at_edge = (name == "QUANTIZE" and set(ins) <= inputs) or (name == "DEQUANTIZE" and set(outs) <= outputs)
            if floats and not at_edge:
                tensor_names = ", ".join(subgraph.tensors[t].name.decode() for t in floats)
                found.append(f"{name}({tensor_names})")
    return found
