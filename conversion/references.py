"""The PyTorch models a checkpoint came from, to verify exports against the source itself.

transformers checkpoints are checked against transformers, timm state dicts against timm, and
original `.npz` (and `.h5`) files against a timm ResNetV2 filled by timm's own `.npz` loader but
with the original code's weight-standardization eps (1e-10), so that a conversion that used
timm's eps would fail. Requires torch and that library; `torch_reference` returns None without them.

A TF Hub / Kaggle SavedModel is its own reference (`saved_model_reference`): TensorFlow runs the
very module the user brought, on the same crops in the [0, 1] it takes.
"""

import contextlib
import functools
import importlib.util
import os
import tempfile

import numpy as np

from tfbit.models.bit import BitBackbone, BitForImageClassification
from tfbit.weights import npz
from tfbit.weights.readers import read_state_dict


def _available(*modules):
    return all(importlib.util.find_spec(m) is not None for m in ("torch", *modules))


def timm_model(config, num_classes):
    """A timm ResNetV2 built like timm's `*_bit` models, with the architecture of `config`."""
    from timm.layers import StdConv2d
    from timm.models.resnetv2 import ResNetV2

    return ResNetV2(
        layers=config.depths,
        channels=config.stage_channels,
        stem_chs=config.embedding_size,
        in_chans=config.num_channels,
        num_classes=num_classes,
        stem_type="fixed",
        conv_layer=functools.partial(StdConv2d, eps=config.ws_eps),
    ).eval()


@contextlib.contextmanager
def _utf8_path(path):
    """`path`, or a UTF-8 named symbolic link to it while in use: safetensors' reader refuses
    paths that are not UTF-8, which a folder name on Linux need not be."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        with tempfile.TemporaryDirectory(prefix="tfbit-reference-") as folder:
            link = os.path.join(folder, "checkpoint")
            os.symlink(os.path.abspath(path), link)
            yield link
        return
    yield path


def _transformers(checkpoint, model):
    import torch
    import transformers

    extra = {"out_features": model.config.out_features} if isinstance(model, BitBackbone) else {}
    # float32 whatever the stored dtype (a bfloat16 file included), as tfbit computes
    with _utf8_path(checkpoint.path) as path:
        reference = getattr(transformers, type(model).__name__).from_pretrained(path, **extra)
    return reference.to(torch.float32).eval()


def _timm(checkpoint, model):
    import torch

    classes = model.config.num_labels if isinstance(model, BitForImageClassification) else 0
    state = {
        k: torch.from_numpy(np.asarray(v))
        for k, v in read_state_dict(checkpoint.path).items()
        if classes or not k.startswith("head.")
    }
    reference = timm_model(model.config, classes)
    reference.load_state_dict(state)
    return reference.eval()


def _original(checkpoint, model, path=None):
    from timm.models.resnetv2 import _load_weights as timm_load_npz

    classes = model.config.num_labels if isinstance(model, BitForImageClassification) else 0
    reference = timm_model(model.config, classes)
    timm_load_npz(reference, path or checkpoint.path, npz.scope(checkpoint.tensors))
    return reference.eval()


def _original_h5(checkpoint, model):
    """An original `.h5` as the `.npz` of the same weights (its Dense head as the `.npz`'s 1x1
    convolution), filled into timm by timm's `.npz` loader as an `.npz` is."""
    tensors = dict(checkpoint.tensors)  # already under the .npz's keys (tfbit.weights.h5)
    for name in ("kernel", "bias"):
        if (dense := tensors.pop(f"resnet/head/dense/{name}", None)) is not None:
            tensors[f"resnet/head/conv2d/{name}"] = dense[None, None] if name == "kernel" else dense
    with tempfile.TemporaryDirectory(prefix="tfbit-reference-") as folder:
        path = os.path.join(folder, "weights.npz")
        np.savez(path, **tensors)
        return _original(checkpoint, model, path)


_BUILDERS = {
    "hf": (_transformers, "transformers"),
    "timm": (_timm, "timm"),
    "npz": (_original, "timm"),
    "h5": (_original_h5, "timm"),
}


def torch_reference(checkpoint, model):
    """The eval-mode PyTorch model computing what `model` (loaded from `checkpoint`) computes,
    or None when there is none (a `.keras` source, torch or the library not installed).
    timm references are headless (pooled features) unless `model` is a classifier."""
    builder, library = _BUILDERS.get(checkpoint.format, (None, None))
    if builder is None or not _available(library):
        return None
    return builder(checkpoint, model)


def saved_model_reference(checkpoint, model, processor):
    """`pixel_values -> outputs` of the SavedModel a "savedmodel" checkpoint was read from: its own
    `__call__` on the crops the preprocessed `pixel_values` came from, rescaled to [0, 1] (the
    processor's normalization undone, exact to a float32 rounding); None when its output is not
    what `model` computes (the logits of a classifier exported as features)."""
    import tensorflow as tf

    if not isinstance(model, BitForImageClassification) and checkpoint.has_head:
        return None
    module = tf.saved_model.load(checkpoint.path)
    call = _module_call(module, checkpoint.path)
    mean, std = np.asarray(processor.image_mean, np.float32), np.asarray(processor.image_std, np.float32)
    scale = (processor.rescale_factor if processor.do_rescale else 1.0) * 255.0

    def run(pixel_values):
        pixels = (pixel_values * std + mean if processor.do_normalize else pixel_values) / scale
        outputs = [_single(call(tf.constant(pixels[i : i + 16], tf.float32))) for i in range(0, len(pixels), 16)]
        return np.concatenate(outputs)

    return run


def _module_call(module, path):
    """The module's `__call__` as TF Hub's KerasLayer calls it (`training=False` when it takes
    that argument), else its serving signature."""
    if callable(module):

        def call(images):
            try:
                return module(images, training=False)
            except (TypeError, ValueError):  # a function traced without a training argument
                return module(images)

        return call
    signatures = getattr(module, "signatures", {})
    if "serving_default" in signatures:
        return signatures["serving_default"]
    raise ValueError(f"{path} has no __call__ nor a serving_default signature: tfbit cannot run it as the reference")


def _single(output):
    if isinstance(output, dict):
        if len(output) != 1:
            raise ValueError(f"the SavedModel returns {len(output)} outputs ({', '.join(output)}), not one")
        output = next(iter(output.values()))
    return np.asarray(output)
