"""BiT preprocessing as TensorFlow ops, for serving graphs (SavedModel / TF Serving).

Same steps as :class:`tfbit.image_processor.BitImageProcessor` built from core TF ops only (no
``py_function``). ``tf.image.resize(antialias=True)`` uses Pillow's filters and support but float
weights; running its two passes separately and rounding each to uint8, as Pillow and torch do,
makes it agree with both to within one uint8 level on under 1% of the values of downscaled photos.
A one-level difference after the first pass can become two after the second (its negative lobes):
upscaled images (e.g. 128-pixel GIFs) and sharp JPEG-compressed edges show two on up to ~2.5%.

``preprocess_image_bytes`` takes encoded images: ``tfbit.image_decode`` checks their headers and
decodes them to the pixels of ``load_image``'s PIL image (its docstring lists the formats, what each
does and the errors), then this module does what the processor does with that PIL image: a
transparency colour kept by ``convert("RGB")`` becomes white (see ``_whiten``).
"""

from __future__ import annotations

import tensorflow as tf

from tfbit import image_decode
from tfbit.image_files import MAX_PIXELS
from tfbit.image_processor import BitImageProcessor

_METHODS = {2: "bilinear", 3: "bicubic"}
_STRIP_ROWS = 256


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


def _resize_width(x, width, method):
    """Horizontal pass over uint8 (N, H, W, C), a strip of rows at a time: ScaleAndTranslate
    converts its whole input to float32 (12 bytes a pixel, 0.8 GB for 64 megapixels); a strip is
    a few MB. Rows are resized independently, so the result is the same."""
    height = tf.shape(x)[1]

    def strip(start, strips):
        rows = tf.minimum(_STRIP_ROWS, height - start)
        out = tf.image.resize(x[:, start:start + rows], tf.stack([rows, width]), method=method, antialias=True)
        return start + _STRIP_ROWS, strips.write(start // _STRIP_ROWS, tf.transpose(out, [1, 0, 2, 3]))

    strips = tf.TensorArray(tf.float32, size=0, dynamic_size=True, infer_shape=False)
    _, strips = tf.while_loop(lambda start, _: start < height, strip, [tf.constant(0), strips])
    return tf.transpose(strips.concat(), [1, 0, 2, 3])


def _resize(x, p):
    """x: uint8 or float32 (N, H, W, C) of 0-255 values, all of one size -> float32."""
    height, width = tf.shape(x)[1], tf.shape(x)[2]
    new_h, new_w = _output_size(height, width, p)
    method = _METHODS[p.resample]
    if x.dtype != tf.uint8:
        return tf.image.resize(x, tf.stack([new_h, new_w]), method=method, antialias=True)
    # Horizontal then vertical pass, each rounded half up and clamped to uint8 like Pillow/torch.
    # A pass over an unchanged axis is an exact identity (cubic/triangle weights are 1, 0, 0).
    x = tf.clip_by_value(tf.floor(_resize_width(x, new_w, method) + 0.5), 0.0, 255.0)
    x = tf.image.resize(x, tf.stack([new_h, new_w]), method=method, antialias=True)
    return tf.clip_by_value(tf.floor(x + 0.5), 0.0, 255.0)


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
    x = images if images.dtype == tf.uint8 else tf.cast(images, tf.float32)
    if p.do_resize:
        x = _resize(x, p)
    if p.do_center_crop:
        x = _center_crop(x, p.crop_size["height"], p.crop_size["width"], p.backend == "pil")
    return _rescale_normalize(tf.cast(x, tf.float32), p)


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


def _whiten(image, colour):
    """Pixels of ``colour`` (the transparency PIL keeps through load_image's convert("RGB")) become
    white, as transformers' convert_to_rgb composites such an image on white; -1s: no colour."""
    def white():
        return tf.where(tf.reduce_all(image == tf.cast(colour, tf.uint8), -1, keepdims=True),
                        tf.constant(255, tf.uint8), image)

    return tf.cond(colour[0] >= 0, white, lambda: image)


def _decoded_rgb(data, header, p):
    """What BitImageProcessor takes from load_image's PIL image: its pixels, a transparency colour
    made white when it converts to RGB."""
    image = image_decode.decode(data, header)
    return _whiten(image, header["transparent"]) if p.do_convert_rgb else image


def preprocess_image_bytes(data, processor, max_pixels=MAX_PIXELS):
    """Batch of encoded images (tf.string, shape [N]) of any sizes -> float32 (N, h, w, 3).

    Graph-safe under ``tf.function(input_signature=[tf.TensorSpec([None], tf.string)])``. Every
    header is checked before anything is decoded, and a bad image fails the batch with an
    ``InvalidArgumentError`` naming it (see ``tfbit.image_decode``). ``max_pixels`` bounds each
    image's decoded pixels (all frames of a GIF).
    """
    p = _processor(processor)
    data = tf.reshape(tf.convert_to_tensor(data, tf.string), [-1])
    headers = image_decode.read_headers(data, max_pixels)
    return tf.map_fn(lambda args: _preprocess_batch(_decoded_rgb(*args, p)[None], p)[0], (data, headers),
                     fn_output_signature=_output_spec(p))
