"""Readers of checkpoint files into flat `{key: numpy array}` dicts. No torch needed except to
read PyTorch pickles, which are only ever loaded with `weights_only=True` (no code executed)."""

import json
import os
import struct

import numpy as np

from tfbit.errors import CheckpointError

# safetensors dtype -> numpy; BF16 has no numpy type and is widened to float32 exactly.
_SAFETENSORS_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


def read_safetensors(path):
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        tensors = load_file(path)
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file: {e}") from None
    except TypeError:  # numpy has no bfloat16 (unless ml_dtypes is loaded): read the layout ourselves
        return _read_safetensors_widening_bf16(path)
    # With ml_dtypes loaded (TensorFlow loads it) bfloat16 arrives as its own type: widen it,
    # exactly, to what transformers computes with in float32.
    return {k: v.astype(np.float32) if v.dtype.name == "bfloat16" else v for k, v in tensors.items()}


def _read_safetensors_widening_bf16(path):
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
        data = f.read()
    tensors = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        start, end = info["data_offsets"]
        raw = data[start:end]
        if info["dtype"] == "BF16":  # the upper half of a float32: widening is exact
            array = (np.frombuffer(raw, "<u2").astype(np.uint32) << 16).view(np.float32)
        elif info["dtype"] in _SAFETENSORS_DTYPES:
            array = np.frombuffer(raw, np.dtype(_SAFETENSORS_DTYPES[info["dtype"]]).newbyteorder("<"))
        else:
            raise CheckpointError(f"{path}: {key} has dtype {info['dtype']}, which tfbit cannot read")
        tensors[key] = array.reshape(info["shape"]).copy()
    return tensors


def safetensors_keys(path):
    """Keys of a safetensors file from its header alone."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="numpy") as f:
            return list(f.keys())
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file: {e}") from None


def read_torch_bin(path):
    """A PyTorch state dict, read without executing pickled code (weights_only=True)."""
    try:
        import torch
    except ImportError:
        raise ImportError(
            f"{path} is a PyTorch pickle: install torch to read it, or convert the checkpoint to model.safetensors"
        ) from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for corrupt or unsafe pickles
        raise CheckpointError(f"{path} is not a loadable PyTorch state dict: {type(e).__name__}: {e}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds a {type(state).__name__}, not a state dict")
    not_tensors = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise CheckpointError(
            f"{path} is not a flat state dict: {', '.join(map(str, not_tensors[:5]))} "
            "are not tensors (a training checkpoint? save its model state_dict instead)"
        )
    return {k: v.float().numpy() if v.is_floating_point() else v.numpy() for k, v in state.items()}


def read_state_dict(path):
    """{key: array} of a .safetensors or PyTorch pickle file."""
    path = os.fspath(path)
    return read_safetensors(path) if path.endswith(".safetensors") else read_torch_bin(path)


def read_npz(path):
    """{key: array} of an original BiT .npz, refusing pickled objects."""
    path = os.fspath(path)
    try:
        archive = np.load(path, allow_pickle=False)
        if not isinstance(archive, np.lib.npyio.NpzFile):
            # caught below, which names its type in the message: "...: ValueError: it holds ..."
            raise ValueError("it holds a single array, not a keyed archive")
        with archive:
            return {key: archive[key] for key in archive.files}
    except FileNotFoundError:
        raise
    except Exception as e:  # zipfile, zlib and numpy all raise their own types for a bad archive
        raise CheckpointError(f"{path} is not a readable .npz archive: {type(e).__name__}: {e}") from None
