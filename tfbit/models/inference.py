"""Inference forms of any Keras model holding tfbit layers: kernels standardized once (the
folded form every export uses) and/or every layer rebuilt under another precision policy.

It works on tfbit's own models and on a model a user built around them (a Functional or
Sequential model with a tfbit model or tfbit layers inside, nested at any depth), because the
copy is rebuilt from the model's serialized config, which is what a `.keras` file holds.
"""

import copy

import keras
import numpy as np

from tfbit.errors import ModelError
from tfbit.models.layers import WSConv2D


def standardizing_convs(model):
    """The `WSConv2D` layers of `model` that standardize their kernel at run time, at any depth
    of nested models."""
    found = []

    def visit(layer):
        if isinstance(layer, WSConv2D) and layer.standardize:
            found.append(layer)
        if isinstance(layer, keras.Model):
            for inner in layer.layers:
                visit(inner)

    visit(model)
    return found


def _edit(config, fold, dtype_policy):
    """Turn a serialized model into its inference form, in place."""
    if isinstance(config, list):
        for item in config:
            _edit(item, fold, dtype_policy)
        return
    if not isinstance(config, dict):
        return
    inner = config.get("config")
    if isinstance(inner, dict):
        tfbit_class = str(config.get("registered_name") or "").startswith("tfbit>")
        if fold and tfbit_class and "standardize" in inner:  # WSConv2D
            inner["standardize"] = False
        if fold and tfbit_class and "standardize_weights" in inner:  # tfbit's models
            inner["standardize_weights"] = False
        if dtype_policy and tfbit_class and "dtype_policy" in inner:  # tfbit's models
            inner["dtype_policy"] = dtype_policy
        if dtype_policy and config.get("class_name") == "DTypePolicy" and "name" in inner:  # any layer
            inner["name"] = dtype_policy
    for value in config.values():
        _edit(value, fold, dtype_policy)


def inference_model(model, dtype_policy=None, fold=True):
    """A copy of `model` computing the same function, in inference form.

    Args:
        model: any Keras model holding tfbit layers (or none: then only `dtype_policy` applies).
        dtype_policy: rebuild every layer under this policy (exports use "float32": a
            mixed-precision model does not convert to TFLite builtins); None keeps each layer's.
        fold: store each `WSConv2D` kernel standardized, so no call recomputes it (what
            `fold_weight_standardization` does). Training the result would train the
            standardized kernels directly: fine-tune the original model instead.

    Returns `model` itself when there is nothing to change. Raises ModelError naming the layer
    when the model cannot be rebuilt from its config (a custom layer that is not registered
    for serialization, or whose `get_config` is incomplete).
    """
    convs = {id(layer.kernel): layer for layer in standardizing_convs(model)} if fold else {}
    if not convs and dtype_policy is None:
        return model
    config = copy.deepcopy(keras.saving.serialize_keras_object(model))
    _edit(config, fold, dtype_policy)
    try:
        clone = keras.saving.deserialize_keras_object(config)
    except (TypeError, ValueError, KeyError) as e:
        raise ModelError(
            f"{model.name} ({type(model).__name__}) cannot be rebuilt from its config for "
            f"export: {e}. A custom layer must be registered with "
            "@keras.saving.register_keras_serializable() and return every constructor "
            "argument from get_config()"
        ) from None
    if [tuple(w.shape) for w in clone.weights] != [tuple(w.shape) for w in model.weights]:
        raise ModelError(
            f"{model.name} ({type(model).__name__}) rebuilt from its config has other weights "
            f"({len(clone.weights)}) than the model ({len(model.weights)}): a layer's "
            "get_config does not describe it completely"
        )
    for source, target in zip(model.weights, clone.weights):
        conv = convs.get(id(source))
        value = conv.standardized_kernel() if conv is not None else source
        target.assign(np.asarray(keras.ops.convert_to_numpy(value)).astype(target.dtype))
    return clone


def fold_weight_standardization(model):
    """The same model in inference form: kernels standardized once, plain convs at run time.

    The result computes the same function as `model` (to float32 rounding) with plain kernels:
    what exports use. `model` may be a tfbit model or any Keras model built with tfbit layers.
    `model` itself infers as fast (its WSConv2D layers cache their standardized kernels between
    weight changes) but holds each kernel twice. Training the result would train the
    standardized kernels directly, so fine-tune the original model instead.
    """
    return inference_model(model, fold=True)
