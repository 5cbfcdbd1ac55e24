"""BiT preprocessing as TensorFlow ops, for serving graphs (SavedModel / TF Serving).

Same steps as :class:`tfbit.image_processor.BitImageProcessor` built from core TF ops only (no
``py_function``). ``tf.image.resize(antialias=True)`` uses Pillow's filters and support but float
weights; running its two passes separately and rounding each to uint8, as Pillow and torch do,
makes it agree with both to within one uint8 level on a small fraction of pixels.

JPEGs are decoded with the accurate IDCT, bit-identical to Pillow. Not reproduced: EXIF
orientation (TF decoders ignore it; transformers' path loader applies it). Alpha in encoded files
is dropped (``channels=3``), as transformers' path loader does.
"""

from __future__ import annotations

import tensorflow as tf

from tfbit.image_processor import BitImageProcessor

_MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"BM")
_METHODS = {2: "bilinear", 3: "bicubic"}


def _processor(processor):
    return processor if isinstance(processor, BitImageProcessor) else BitImageProcessor.from_dict(processor)


def decode_image_bytes(data):
    """Encoded JPEG/PNG/GIF/BMP string -> uint8 (H, W, 3); grayscale and alpha become RGB.

    Bytes of any other format raise ``InvalidArgumentError`` ("could not decode image ...")
    before the decoder runs, so serving clients get a clear message.
    """
    data = tf.convert_to_tensor(data, tf.string)
    known = tf.reduce_any(tf.stack([tf.strings.substr(data, 0, len(m)) == m for m in _MAGIC]))
    check = tf.debugging.Assert(known, ["tfbit: could not decode image: not JPEG, PNG, GIF or BMP data; "
                                        "first bytes:", tf.strings.substr(data, 0, 16)])
    with tf.control_dependencies([check]):
        # decode_image's JPEG default is libjpeg's fast integer IDCT, up to ~17 levels away from
        # Pillow's (and torchvision's) accurate one; INTEGER_ACCURATE decodes bit-identically.
        image = tf.cond(tf.strings.substr(data, 0, 3) == _MAGIC[0],
                        lambda: tf.io.decode_jpeg(data, channels=3, dct_method="INTEGER_ACCURATE"),
                        lambda: tf.io.decode_image(data, channels=3, expand_animations=False))
    image.set_shape([None, None, 3])
    return image


def _output_size(height, width, p):
    if "shortest_edge" not in p.size:
        return tf.constant(p.size["height"]), tf.constant(p.size["width"])
    target = p.size["shortest_edge"]
    short, long = tf.minimum(height, width), tf.maximum(height, width)
    # int(target * long / short) in float64, as Python computes it
    new_long = tf.cast(tf.cast(target * long, tf.float64) / tf.cast(short, tf.float64), tf.int32)
    portrait = width <= height
    return tf.where(portrait, new_long, target), tf.where(portrait, target, new_long)


def _resize(x, p, quantize):
    """x: float32 (N, H, W, C) of 0-255 values, all of one size."""
    height, width = tf.shape(x)[1], tf.shape(x)[2]
    new_h, new_w = _output_size(height, width, p)
    method = _METHODS[p.resample]
    if not quantize:
        return tf.image.resize(x, tf.stack([new_h, new_w]), method=method, antialias=True)
    # Horizontal then vertical pass, each rounded half up and clamped to uint8 like Pillow/torch.
    # A pass over an unchanged axis is an exact identity (cubic/triangle weights are 1, 0, 0).
    for size in ([height, new_w], [new_h, new_w]):
        x = tf.image.resize(x, tf.stack(size), method=method, antialias=True)
        x = tf.clip_by_value(tf.floor(x + 0.5), 0.0, 255.0)
    return x


def _center_crop(x, height, width, ceil_padding):
    pad_h = tf.maximum(height - tf.shape(x)[1], 0)
    pad_w = tf.maximum(width - tf.shape(x)[2], 0)
    top, left = (pad_h + int(ceil_padding)) // 2, (pad_w + int(ceil_padding)) // 2
    x = tf.pad(x, [[0, 0], [top, pad_h - top], [left, pad_w - left], [0, 0]])
    top, left = (tf.shape(x)[1] - height) // 2, (tf.shape(x)[2] - width) // 2
    return x[:, top:top + height, left:left + width, :]


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
    x = tf.cast(images, tf.float32)
    if p.do_resize:
        x = _resize(x, p, quantize=images.dtype == tf.uint8)
    if p.do_center_crop:
        x = _center_crop(x, p.crop_size["height"], p.crop_size["width"], p.backend == "pil")
    return _rescale_normalize(x, p)


def _output_spec(p):
    if p.do_center_crop:
        return tf.TensorSpec([p.crop_size["height"], p.crop_size["width"], 3], tf.float32)
    if p.do_resize and "height" in p.size:
        return tf.TensorSpec([p.size["height"], p.size["width"], 3], tf.float32)
    raise ValueError("images of different sizes need do_center_crop (or a fixed height/width size) "
                     "to be batched")


def preprocess_images(images, processor):
    """Preprocess uint8 images (or floats holding 0-255 values) into float32 NHWC.

    ``images``: (H, W, C), (N, H, W, C) of one size, or a ``tf.RaggedTensor`` (N, None, None, C)
    of different sizes; C in 1, 3, 4. ``processor``: a ``BitImageProcessor`` or its config dict.
    """
    p = _processor(processor)
    if isinstance(images, tf.RaggedTensor):
        return tf.map_fn(lambda im: _preprocess_batch(im.to_tensor()[None], p)[0], images,
                         fn_output_signature=_output_spec(p))
    images = tf.convert_to_tensor(images)
    if images.dtype.is_integer and images.dtype != tf.uint8:
        images = tf.saturate_cast(images, tf.uint8)
    if images.shape.rank not in (3, 4) or images.shape[-1] not in (1, 3, 4):
        raise ValueError("expected (H, W, C) or (N, H, W, C) images with C in 1, 3, 4; "
                         f"got shape {images.shape}")
    return _preprocess_batch(images[None] if images.shape.rank == 3 else images, p)


def preprocess_image_bytes(data, processor):
    """Batch of encoded images (tf.string, shape [N]) of any sizes -> float32 (N, h, w, 3).

    Graph-safe under ``tf.function(input_signature=[tf.TensorSpec([None], tf.string)])``.
    """
    p = _processor(processor)
    data = tf.reshape(tf.convert_to_tensor(data, tf.string), [-1])
    return tf.map_fn(lambda s: _preprocess_batch(decode_image_bytes(s)[None], p)[0], data,
                     fn_output_signature=_output_spec(p))
