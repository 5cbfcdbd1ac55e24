"""Writing a tfbit model back as a transformers checkpoint (`save_pretrained`) or an original
BiT `.npz`.

The key of every weight comes from the format's reading table, run backwards: each row's
target template becomes a pattern over tfbit weight names, its source pattern a template of
checkpoint keys, and every key produced is read back through the table to the weight it came
from before anything is written. No second table exists to drift from the reader.
"""

import os
import re
import shutil
import tempfile

import numpy as np

from tfbit.errors import FileError
from tfbit.weights import hf, npz
from tfbit.weights.checkpoint import CheckpointError, map_keys
from tfbit.weights.readers import read_npz, read_safetensors

# The inverse of each `tfbit.weights.checkpoint.TRANSFORMS` entry: tfbit array -> checkpoint array.
INVERSE_TRANSFORMS = {
    None: lambda a: a,
    "oihw_to_hwio": lambda a: np.transpose(a, (3, 2, 0, 1)),
    "linear": lambda a: np.transpose(a),
    "conv1x1_to_linear": lambda a: a.reshape((1, 1) + a.shape),
    "oi11_to_linear": lambda a: np.transpose(a).reshape(a.shape[::-1] + (1, 1)),
}

# transformers' WeightStandardizedConv2d eps (hard-coded in modeling_bit.py).
HF_WS_EPS = 1e-8
_NUMBERED = ("s", "u")  # the stage and unit groups, renumbered by index_base


def _target_pattern(template):
    """`stage{s}_unit{u}_{c}/kernel` -> a regex over tfbit weight names with those groups."""
    parts = re.split(r"\{(\w+)\}", template)
    pattern = ""
    for i, part in enumerate(parts):
        if i % 2:
            pattern += rf"(?P<{part}>\d+)" if part in _NUMBERED else rf"(?P<{part}>[^/_]+)"
        else:
            pattern += re.escape(part)
    return re.compile(pattern)


def _source_template(pattern):
    """A table's source regex as a key template: named groups become fields, optional scopes
    such as `(?:resnet/)?` are written out (the released files have them), escapes undone."""
    template = re.sub(r"\(\?P<(\w+)>[^)]*\)", r"{\1}", pattern)
    template = re.sub(r"\(\?:([^)]*)\)\?", r"\1", template)
    return re.sub(r"\\(.)", r"\1", template)


def checkpoint_keys(names, table, index_base=0, digits=None):
    """{tfbit weight name: (checkpoint key, transform)} through `table` run backwards;
    `digits` zero-pads numbers ({"u": 2}: the original files' `unit01`).

    Raises CheckpointError naming the weights the table cannot write, or a key that the table
    would not read back as the same weight.
    """
    rows = [(_target_pattern(target), _source_template(source), transform) for source, target, transform in table]
    keys, unmapped = {}, []
    for name in names:
        for pattern, template, transform in rows:
            m = pattern.fullmatch(name)
            if m:
                fields = {
                    k: (f"{int(v) - 1 + index_base:0{(digits or {}).get(k, 1)}d}" if k in _NUMBERED else v)
                    for k, v in m.groupdict().items()
                }
                keys[name] = (template.format(**fields), transform)
                break
        else:
            unmapped.append(name)
    if unmapped:
        raise CheckpointError(f"no checkpoint key for tfbit weights: {', '.join(unmapped)}")
    mapped, _ = map_keys([key for key, _ in keys.values()], table, index_base)
    wrong = [
        f"{name} -> {key} -> {mapped.get(key, (None,))[0]}"
        for name, (key, _) in keys.items()
        if mapped.get(key, (None,))[0] != name
    ]
    if wrong:
        raise CheckpointError(f"the table does not read its own keys back: {'; '.join(wrong)}")
    return keys


def _kernel_for_eps(layer, kernel, eps):
    """A conv kernel (float64 HWIO) that weight standardization with `eps` turns into what
    `layer` convolves with (transformers always standardizes with 1e-8, the original code with
    1e-10).

    The layer's own eps: written as is. Another one: centred and scaled by
    sqrt(eps / layer eps), whose standardization with `eps` is exactly the layer's. The inference
    form (kernels standardized already, with an eps no longer known): each filter scaled by s
    with s^2 var + eps = s^2, so that standardizing it again gives it back (to float rounding).
    """
    if layer.standardize:
        if layer.eps == eps:
            return kernel
        return (kernel - kernel.mean(axis=(0, 1, 2))) * np.sqrt(eps / layer.eps)
    variance = kernel.var(axis=(0, 1, 2))
    return kernel * np.sqrt(eps / np.maximum(1.0 - variance, 1e-12))


def _state_dict(model, table, index_base, eps, digits=None):
    """{checkpoint key: float32 array} of `model` through `table`, kernels for `eps`."""
    import keras

    from tfbit.models.layers import WSConv2D

    arrays = {}
    for layer in model.layers:
        for variable in layer.weights:
            value = np.asarray(keras.ops.convert_to_numpy(variable), np.float64)
            if isinstance(layer, WSConv2D):
                value = _kernel_for_eps(layer, value, eps)
            arrays[variable.path] = value.astype(np.float32)
    return {
        key: np.ascontiguousarray(INVERSE_TRANSFORMS[transform](arrays[name]))
        for name, (key, transform) in checkpoint_keys(arrays, table, index_base, digits).items()
    }


def transformers_class(model):
    """The transformers class name a tfbit model is written for."""
    names = {"BitModel", "BitForImageClassification", "BitBackbone"}
    for cls in type(model).__mro__:
        if cls.__name__ in names:
            return cls.__name__
    raise TypeError(f"{type(model).__name__} is not a tfbit BiT model class")


def transformers_state_dict(model):
    """{transformers key: array} of `model`, named as its transformers class names its weights
    (base-model weights under "bit." except in `BitModel`)."""
    prefix = "" if transformers_class(model) == "BitModel" else "bit."
    return {
        (key if key.startswith("classifier.") else prefix + key): value
        for key, value in _state_dict(model, hf.TABLE, 0, HF_WS_EPS).items()
    }


def transformers_config(model):
    """config.json of `model` for transformers: stage widths written out (transformers sizes its
    final norm and head from the unscaled widths, so width_factor is folded into hidden_sizes)
    and the eps its weights are written for."""
    config = model.config.to_dict()
    config.update(
        hidden_sizes=list(model.config.stage_channels),
        width_factor=1,
        ws_eps=HF_WS_EPS,
        architectures=[transformers_class(model)],
    )
    return config


def _check_written(path, arrays, read):
    """Read the file back: the same keys and the same values, or nothing is published."""
    written = read(path)
    if set(written) != set(arrays) or any(not np.array_equal(written[k], v) for k, v in arrays.items()):
        raise FileError(f"{path} does not read back as written: disk full or a failing filesystem?")


def save_transformers(model, directory, preprocessor=None):
    """Write config.json + model.safetensors (+ preprocessor_config.json) of `model` into
    `directory`, as transformers' `save_pretrained` would.

    The files are written into a hidden folder beside `directory`, read back, and only then each
    moved into place with one rename (config.json last); other files in `directory` are kept.

    Args:
        model: a tfbit `BitModel`, `BitForImageClassification` or `BitBackbone`.
        directory: the checkpoint folder (created if needed).
        preprocessor: a `BitImageProcessor`, a preprocessor_config.json dict, or the path of a
            preprocessor_config.json file (or its folder) to write beside the weights.
    """
    import json

    from safetensors.numpy import save_file

    from tfbit.preprocessing.processor import BitImageProcessor

    directory = os.path.abspath(os.fspath(directory))
    if preprocessor is not None and not isinstance(preprocessor, BitImageProcessor):
        preprocessor = (
            BitImageProcessor.from_dict(preprocessor)
            if isinstance(preprocessor, dict)
            else BitImageProcessor.from_pretrained(preprocessor)
        )
    state_dict = transformers_state_dict(model)
    parent = os.path.dirname(directory)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(directory)}.partial-", dir=parent)
    try:
        weights = os.path.join(staging, "model.safetensors")
        save_file(state_dict, weights, metadata={"format": "pt"})
        _check_written(weights, state_dict, read_safetensors)
        names = ["model.safetensors"]
        if preprocessor is not None:
            preprocessor.save_pretrained(staging)
            names.append(hf.PREPROCESSOR_FILE)
        with open(os.path.join(staging, "config.json"), "w", encoding="utf-8") as f:
            f.write(json.dumps(transformers_config(model), indent=2, sort_keys=True) + "\n")
        names.append("config.json")
        os.makedirs(directory, exist_ok=True)
        for name in names:
            os.replace(os.path.join(staging, name), os.path.join(directory, name))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return directory


def save_original_npz(model, path):
    """Write `model` as an original BiT release `.npz` (`resnet/` scope, HWIO kernels, the head as
    a 1x1 conv, kernels for the original eps 1e-10), as `tfbit.weights.npz` and timm's `.npz`
    loader read it. Written beside `path` and renamed into place once read back."""
    path = os.path.abspath(os.fspath(path))
    arrays = _state_dict(model, npz.TABLE, 1, npz.WS_EPS, digits={"u": 2})
    handle, partial = tempfile.mkstemp(
        prefix=f".{os.path.basename(path)}.partial-", suffix=".npz", dir=os.path.dirname(path)
    )
    try:
        with os.fdopen(handle, "wb") as f:
            np.savez(f, **arrays)
        _check_written(partial, arrays, read_npz)
        os.replace(partial, path)
    finally:
        if os.path.exists(partial):
            os.remove(partial)
    return path
