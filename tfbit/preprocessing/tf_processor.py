"""BiT preprocessing as TensorFlow ops, for serving graphs (SavedModel / TF Serving).

Same steps as :class:`tfbit.preprocessing.processor.BitImageProcessor` built from core TF ops only (no
``py_function``). uint8 images are resized in the processor's own integer arithmetic: the
weights Pillow or torch compute in float64, quantized to fixed point (22 bits of int32 for
Pillow, int16 with up to 22 bits for torch), two passes (horizontal first, except where Pillow 13
goes vertical first), each rounded half up and clamped to uint8; so the pixels equal the
processor's bit for bit.
``tf.image.resize(antialias=True)`` has the same filters and support but float32 weights, which
left up to two uint8 levels of difference; it still resizes float images, where the processor
uses unquantized weights too.

``preprocess_image_bytes`` takes encoded images: ``tfbit.preprocessing.tf_decode`` checks their headers and
decodes them to the pixels of ``load_image``'s PIL image (its docstring lists the formats, what each
does and the errors), then this module does what the processor does with that PIL image: a
transparency colour kept by ``convert("RGB")`` becomes white (see ``_whiten``).
"""

from __future__ import annotations

import PIL
import tensorflow as tf

from tfbit.errors import ConfigError, ImageError
from tfbit.preprocessing import tf_decode
from tfbit.preprocessing.decode import MAX_PIXELS
from tfbit.preprocessing.processor import FILTERS, BitImageProcessor

_METHODS = {2: "bilinear", 3: "bicubic"}
_PIL_BITS = 22  # Pillow's PRECISION_BITS: 32 - 8 - 2
# Pillow 13 runs the vertical pass first when the height shrinks by more than twice as many
# pixels as the width (Resample.c); earlier Pillow and torch always go horizontal first. The
# pil backend matches the Pillow installed where the graph is built (rounded passes do not
# commute: the two orders differ by up to ~9 levels).
_PILLOW_ORDERS_BY_SHAPE = int(PIL.__version__.split(".")[0]) >= 13


def _processor(processor):
    return processor if isinstance(processor, BitImageProcessor) else BitImageProcessor.from_dict(processor)


def _output_size(height, width, p):
    if "shortest_edge" not in p.size:
        return tf.constant(p.size["height"]), tf.constant(p.size["width"])
    target = p.size["shortest_edge"]
    short, long = tf.minimum(height, width), tf.maximum(height, width)
    # int(target * long / short) in float64, as Python computes it
    new_long = tf.cast(tf.cast(target * long, tf.float64) / tf.cast(short, tf.float64), tf.int32)
    portrait = width <= height
    return tf.where(portrait, new_long, target), tf.where(portrait, target, new_long)


def _filter(x, resample):
    """Pillow's triangle (2) and Keys a=-0.5 cubic (3) in its expression order, float64."""
    x = tf.abs(x)
    if resample == 2:
        return tf.maximum(1.0 - x, 0.0)
    return tf.where(
        x < 1.0, (1.5 * x - 2.5) * x * x + 1, tf.where(x < 2.0, (((x - 5) * x + 8) * x - 4) * -0.5, tf.zeros_like(x))
    )


def _power_of_two(bits):
    return tf.pow(tf.constant(2.0, tf.float64), tf.cast(bits, tf.float64))


def _fixed_point_weights(in_size, out_size, resample, backend):
    """What Pillow's precompute_coeffs + normalize_coeffs_8bpc and torch's uint8 antialias kernel
    compute, as `tfbit.preprocessing.processor._resample_weights` does in NumPy: input index and int32
    weight of every tap, (out_size, taps), and the fixed-point bits."""
    radius = FILTERS[resample][1]
    scale = tf.cast(in_size, tf.float64) / tf.cast(out_size, tf.float64)
    filter_scale = tf.maximum(scale, 1.0)
    support = radius * filter_scale
    center = scale * (tf.range(out_size, dtype=tf.float64) + 0.5)
    first = tf.maximum(tf.cast(center - support + 0.5, tf.int32), 0)  # C's (int): toward zero
    count = tf.minimum(tf.cast(center + support + 0.5, tf.int32), in_size) - first
    taps = tf.range(tf.cast(tf.math.ceil(support), tf.int32) * 2 + 1)
    index = first[:, None] + taps
    offset = (tf.cast(index, tf.float64) - center[:, None] + 0.5) * (1.0 / filter_scale)
    weights = tf.where(taps < count[:, None], _filter(offset, resample), tf.zeros_like(offset))
    # summed tap by tap, as C does (a CPU cumsum runs in order), so that rounding ties break identically
    total = tf.math.cumsum(weights, axis=1)[:, -1]
    weights /= tf.where(total == 0.0, tf.ones_like(total), total)[:, None]
    if backend == "pil":
        bits = tf.constant(_PIL_BITS)
    else:  # the most bits (<= 22) that keep torch's largest int16 weight below 2**15
        candidates = tf.range(_PIL_BITS + 1)
        fits = tf.cast(0.5 + tf.reduce_max(weights) * _power_of_two(candidates), tf.int64) < 2**15
        bits = tf.reduce_max(tf.where(fits, candidates, 0))
    scaled = weights * _power_of_two(bits)
    fixed = tf.cast(tf.where(weights < 0, scaled - 0.5, scaled + 0.5), tf.int32)  # truncation
    return tf.minimum(index, in_size - 1), fixed, bits


def _resize_axis_fixed(x, axis, size, resample, backend):
    """One pass over axis 1 (vertical) or 2 (horizontal) of uint8 (N, H, W, C) in the processor's
    integer arithmetic, one tap at a time: the int32 sum is as large as the output, where
    gathering every tap at once would take ~0.6 GB for a 12-megapixel photo."""
    index, weights, bits = _fixed_point_weights(tf.shape(x)[axis], size, resample, backend)
    shape = tf.tensor_scatter_nd_update(tf.shape(x), [[axis]], [size])
    weights = tf.reshape(weights, tf.stack([size, -1] + [1] * (3 - axis)))  # (size, taps, 1[, 1])

    def tap(j, acc):
        return j + 1, acc + tf.cast(tf.gather(x, index[:, j], axis=axis), tf.int32) * weights[:, j]

    start = tf.fill(shape, tf.bitwise.left_shift(1, bits) // 2)  # rounds half up
    _, acc = tf.while_loop(lambda j, _: j < tf.shape(index)[1], tap, [tf.constant(0), start])
    return tf.cast(tf.clip_by_value(tf.bitwise.right_shift(acc, bits), 0, 255), tf.uint8)


def _resize(x, p):
    """x: uint8 or float32 (N, H, W, C) of 0-255 values, all of one size -> float32."""
    height, width = tf.shape(x)[1], tf.shape(x)[2]
    new_h, new_w = _output_size(height, width, p)
    if x.dtype != tf.uint8:
        return tf.image.resize(x, tf.stack([new_h, new_w]), method=_METHODS[p.resample], antialias=True)

    def horizontal(x):
        return _resize_axis_fixed(x, 2, new_w, p.resample, p.backend)

    def vertical(x):
        return _resize_axis_fixed(x, 1, new_h, p.resample, p.backend)

    # A pass over an unchanged axis is an exact identity, so both always run.
    if p.backend == "pil" and _PILLOW_ORDERS_BY_SHAPE:
        shrink_h, shrink_w = height - new_h, width - new_w
        x = tf.cond(
            (shrink_h > 0) & (shrink_h > 2 * shrink_w), lambda: horizontal(vertical(x)), lambda: vertical(horizontal(x))
        )
    else:
        x = vertical(horizontal(x))
    return tf.cast(x, tf.float32)


def center_crop(x, height, width, ceil_padding):
    pad_h = tf.maximum(height - tf.shape(x)[1], 0)
    pad_w = tf.maximum(width - tf.shape(x)[2], 0)
    top, left = (pad_h + int(ceil_padding)) // 2, (pad_w + int(ceil_padding)) // 2
    x = tf.pad(x, [[0, 0], [top, pad_h - top], [left, pad_w - left], [0, 0]])
    top, left = (tf.shape(x)[1] - height) // 2, (tf.shape(x)[2] - width) // 2
    return x[:, top : top + height, left : left + width, :]


def _to_rgb(x, p):
    channels = x.shape[-1]
    if channels == 1:
        return tf.tile(x, [1, 1, 1, 3])
    if channels != 4:
        return x
    if x.dtype != tf.uint8:
        return x[..., :3] * x[..., 3:] + (1.0 - x[..., 3:])
    f = tf.cast(x, tf.float32)
    if p.backend == "pil":  # blend on the 0-255 scale, round half to even
        alpha = f[..., 3:] / 255.0
        return tf.cast(tf.round(alpha * f[..., :3] + (1.0 - alpha) * 255.0), tf.uint8)
    f = f * (1 / 255)  # torchvision: blend on [0, 1], back by truncating x * 255.999
    return tf.cast(tf.floor((f[..., :3] * f[..., 3:] + (1.0 - f[..., 3:])) * 255.999), tf.uint8)


def _rescale_normalize(x, p):
    mean, std = tf.constant(p.image_mean, tf.float32), tf.constant(p.image_std, tf.float32)
    if p.do_normalize and p.do_rescale and p.backend == "torchvision":  # fused, as torchvision
        factor = tf.constant(1.0 / p.rescale_factor, tf.float32)
        return (x - mean * factor) / (std * factor)
    if p.do_rescale:
        x = x * p.rescale_factor
    return (x - mean) / std if p.do_normalize else x


def _preprocess_batch(images, p):
    """(N, H, W, C) images of one size -> float32 (N, h, w, 3)."""
    if p.do_convert_rgb:
        images = _to_rgb(images, p)
    x = images if images.dtype == tf.uint8 else tf.cast(images, tf.float32)
    if p.do_resize:
        x = _resize(x, p)
    if p.do_center_crop:
        x = center_crop(x, p.crop_size["height"], p.crop_size["width"], p.backend == "pil")
    return _rescale_normalize(tf.cast(x, tf.float32), p)


def _output_spec(p):
    if p.do_center_crop:
        return tf.TensorSpec([p.crop_size["height"], p.crop_size["width"], 3], tf.float32)
    if p.do_resize and "height" in p.size:
        return tf.TensorSpec([p.size["height"], p.size["width"], 3], tf.float32)
    raise ConfigError("images of different sizes need do_center_crop (or a fixed height/width size) to be batched")


def preprocess_images(images, processor):
    """Preprocess uint8 images (or floats holding 0-255 values) into float32 NHWC.

    ``images``: (H, W, C), (N, H, W, C) of one size, or a ``tf.RaggedTensor`` (N, None, None, C)
    of different sizes; C in 1, 3, 4. ``processor``: a ``BitImageProcessor`` or its config dict.
    """
    p = _processor(processor)
    if isinstance(images, tf.RaggedTensor):
        return tf.map_fn(
            lambda im: _preprocess_batch(im.to_tensor()[None], p)[0], images, fn_output_signature=_output_spec(p)
        )
    images = tf.convert_to_tensor(images)
    if images.dtype.is_integer and images.dtype != tf.uint8:
        images = tf.saturate_cast(images, tf.uint8)
    if images.shape.rank not in (3, 4) or images.shape[-1] not in (1, 3, 4):
        raise ImageError(f"expected (H, W, C) or (N, H, W, C) images with C in 1, 3, 4; got shape {images.shape}")
    return _preprocess_batch(images[None] if images.shape.rank == 3 else images, p)


def _whiten(image, colour):
    """Pixels of ``colour`` (the transparency PIL keeps through load_image's convert("RGB")) become
    white, as transformers' convert_to_rgb composites such an image on white; -1s: no colour."""

    def white():
        return tf.where(
            tf.reduce_all(image == tf.cast(colour, tf.uint8), -1, keepdims=True), tf.constant(255, tf.uint8), image
        )

    return tf.cond(colour[0] >= 0, white, lambda: image)


def _decoded_rgb(data, header, p):
    """What BitImageProcessor takes from load_image's PIL image: its pixels, a transparency colour
    made white when it converts to RGB."""
    image = tf_decode.decode(data, header)
    return _whiten(image, header["transparent"]) if p.do_convert_rgb else image


def preprocess_image_bytes(data, processor, max_pixels=MAX_PIXELS):
    """Batch of encoded images (tf.string, shape [N]) of any sizes -> float32 (N, h, w, 3).

    Graph-safe under ``tf.function(input_signature=[tf.TensorSpec([None], tf.string)])``. Every
    header is checked before anything is decoded, and a bad image fails the batch with an
    ``InvalidArgumentError`` naming it (see ``tfbit.preprocessing.tf_decode``). ``max_pixels`` bounds each
    image's decoded pixels (all frames of a GIF).
    """
    p = _processor(processor)
    data = tf.reshape(tf.convert_to_tensor(data, tf.string), [-1])
    headers = tf_decode.read_headers(data, max_pixels)
    return tf.map_fn(
        lambda args: _preprocess_batch(_decoded_rgb(*args, p)[None], p)[0],
        (data, headers),
        fn_output_signature=_output_spec(p),
    )
