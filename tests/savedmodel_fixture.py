"""BiT SavedModels in the layout of the TF Hub / Kaggle BiT modules, written by a BiT of raw
TensorFlow ops that follows the original `bit_tf2` code (google-research/big_transfer), not
tfbit's layers, so that a test comparing tfbit with one compares two implementations.

The module is a "reusable SavedModel" (TF Hub's `saved_model_2` API): `__call__(images)` on float
RGB in [0, 1], converted to [-1, 1] inside, and the lists `variables`, `trainable_variables`,
`regularization_losses`. Each variable is named as the original code named it: an `.npz` key
(`resnet/root_block/standardized_conv2d/kernel`), under `prefix`.
"""

import os
import shutil

import numpy as np

GROUPS, GN_EPS, WS_EPS = 32, 1e-5, 1e-10


def _pad(x, kernel_size):
    """bit_tf2's explicit symmetric padding before a VALID convolution."""
    import tensorflow as tf

    total = kernel_size - 1
    begin = total // 2
    return tf.pad(x, [[0, 0], [begin, total - begin], [begin, total - begin], [0, 0]])


def _standardized_conv(x, kernel, stride=1):
    import tensorflow as tf

    mean, var = tf.nn.moments(kernel, axes=[0, 1, 2], keepdims=True)
    kernel = (kernel - mean) / tf.sqrt(var + WS_EPS)
    return tf.nn.conv2d(_pad(x, kernel.shape[0]), kernel, stride, "VALID")


def _group_norm_relu(x, gamma, beta):
    import tensorflow as tf

    shape = tf.shape(x)
    channels = x.shape[-1]
    grouped = tf.reshape(x, [shape[0], shape[1], shape[2], GROUPS, channels // GROUPS])
    mean, var = tf.nn.moments(grouped, axes=[1, 2, 4], keepdims=True)
    grouped = (grouped - mean) * tf.math.rsqrt(var + GN_EPS)
    return tf.nn.relu(tf.reshape(grouped, shape) * gamma + beta)


def _unit(x, v, scope, stride):
    """A pre-activation bottleneck: the projection (unit01) takes the pre-activated input."""
    out = _group_norm_relu(x, v[scope + "a/group_norm/gamma"], v[scope + "a/group_norm/beta"])
    proj = scope + "a/proj/standardized_conv2d/kernel"
    shortcut = _standardized_conv(out, v[proj], stride) if proj in v else x
    out = _standardized_conv(out, v[scope + "a/standardized_conv2d/kernel"])
    out = _group_norm_relu(out, v[scope + "b/group_norm/gamma"], v[scope + "b/group_norm/beta"])
    out = _standardized_conv(out, v[scope + "b/standardized_conv2d/kernel"], stride)
    out = _group_norm_relu(out, v[scope + "c/group_norm/gamma"], v[scope + "c/group_norm/beta"])
    return _standardized_conv(out, v[scope + "c/standardized_conv2d/kernel"]) + shortcut


def bit_forward(images, v, depths, head):
    """The original BiT on `images` in [0, 1]; `v`: {`.npz` key: tensor}."""
    import tensorflow as tf

    x = images * 2.0 - 1.0  # what the TF Hub modules do with their [0, 1] input
    x = _standardized_conv(x, v["resnet/root_block/standardized_conv2d/kernel"], 2)
    x = tf.nn.max_pool2d(tf.pad(x, [[0, 0], [1, 1], [1, 1], [0, 0]]), 3, 2, "VALID")
    for b, depth in enumerate(depths, 1):
        for u in range(1, depth + 1):
            x = _unit(x, v, f"resnet/block{b}/unit{u:02d}/", 2 if b > 1 and u == 1 else 1)
    x = tf.reduce_mean(_group_norm_relu(x, v["resnet/group_norm/gamma"], v["resnet/group_norm/beta"]), [1, 2])
    if not head:
        return x
    if "resnet/head/dense/kernel" in v:  # the original TF2 code's Dense head
        return tf.matmul(x, v["resnet/head/dense/kernel"]) + v["resnet/head/dense/bias"]
    kernel = v["resnet/head/conv2d/kernel"]
    return tf.matmul(x, tf.reshape(kernel, kernel.shape[-2:])) + v["resnet/head/conv2d/bias"]


def dense_head(arrays):
    """`arrays` with the head as the original TF2 code's Dense layer (kernel (C, N))."""
    arrays = dict(arrays)
    kernel, bias = arrays.pop("resnet/head/conv2d/kernel"), arrays.pop("resnet/head/conv2d/bias")
    return arrays | {"resnet/head/dense/kernel": kernel[0, 0], "resnet/head/dense/bias": bias}


def write_bit_saved_model(path, arrays, depths, head=True, prefix="", extra=None):
    """A BiT SavedModel of the `.npz` `arrays` at `path`; `extra`: {name: array} of more variables."""
    import tensorflow as tf

    keys = [k for k in arrays if head or "/head/" not in k]
    variables = {k: tf.Variable(arrays[k], name=prefix + k) for k in keys}
    others = [tf.Variable(value, name=name) for name, value in (extra or {}).items()]
    module = _hub_module_class()()
    module.variables = list(variables.values()) + others
    module.trainable_variables = list(module.variables)
    module.regularization_losses = []
    module.__call__ = tf.function(
        lambda images: bit_forward(images, variables, depths, head),
        input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32)],
    )
    tf.saved_model.save(module, os.fspath(path))
    return path


def _hub_module_class():
    """A tf.Module whose `variables` are a saved list, as TF Hub's reusable SavedModels have
    (tf.train.Checkpoint would also save its own save_counter variable)."""
    import tensorflow as tf

    class HubModule(tf.Module):
        variables = trainable_variables = None  # instance attributes here, not tf.Module's properties

    return HubModule


def call_saved_model(path, images):
    """What a user of the SavedModel at `path` gets for `images` in [0, 1]."""
    import tensorflow as tf

    return tf.saved_model.load(os.fspath(path))(tf.constant(images, tf.float32)).numpy()


def kagglehub_cache(root, saved_model, handle):
    """A kagglehub cache at `root` holding `saved_model` as `handle` (owner/model/framework/
    variation/version), in the layout kagglehub/cache.py writes: the files under
    models/<handle>/ and the completion marker <version>.complete beside them."""
    folder = os.path.join(root, "models", *handle.split("/"))
    shutil.copytree(saved_model, folder)
    open(f"{folder}.complete", "w").close()
    return folder


def random_images01(n, size, seed=0):
    return np.random.RandomState(seed).uniform(0, 1, (n, size, size, 3)).astype("float32")
