"""BiT image preprocessing in NumPy + PIL, numerically identical to transformers' ``BitImageProcessor``.

Pipeline: convert to RGB -> resize the shortest edge (bicubic) -> center crop -> rescale (1/255)
-> normalize (mean/std). Output is float32 NHWC (transformers returns NCHW).

transformers 5 ships two implementations of this processor and they do not agree bit for bit:

* ``transformers.BitImageProcessor`` (what ``AutoImageProcessor`` picks when torchvision is
  installed) resizes uint8 images with torch's antialiased bicubic kernel. That kernel is a port of
  Pillow-SIMD: Pillow's filter and support, but 16-bit fixed-point weights instead of Pillow's
  22-bit ones, so ~0.3% of the values land one uint8 level (0.015 after normalization) away
  from Pillow's. It also fuses rescale+normalize and pads oversized crops differently.
* ``transformers.BitImageProcessorPil`` (transformers 4's ``BitImageProcessor``) calls Pillow.

``backend="torchvision"`` (default) reproduces the first one: its resize kernel is
re-implemented here in NumPy integer arithmetic. ``backend="pil"`` reproduces the second one by
calling Pillow itself, because Pillow's own result changes between releases (Pillow 13 runs the
vertical pass first for some shapes, e.g. tall images, which moves ~15% of the values by up to
~9 levels). Like transformers, the backend is chosen at load time and is not written to
``preprocessor_config.json``.

Inputs follow transformers' conventions: float arrays hold 0-255 pixel values (with
``do_rescale=True``), paths are EXIF-transposed and converted with ``convert("RGB")`` (which drops
alpha, unlike PIL images and arrays, whose alpha is composited on white). Paths are read by
``tfbit.preprocessing.decode.load_image``, which applies the serving graph's rules to encoded files
(formats, ``MAX_PIXELS``, truncation, which EXIF orientation is read), so that a file gives the same
pixels, or the same error, in every tfbit artifact.
"""

from __future__ import annotations

import json
import numbers
import os
from pathlib import Path

import numpy as np
from PIL import Image

from tfbit.errors import ConfigError, ImageError, MissingFileError
from tfbit.preprocessing.decode import load_image

CONFIG_NAME = "preprocessor_config.json"
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
BACKENDS = ("torchvision", "pil")
FIELDS = (
    "do_resize",
    "size",
    "resample",
    "do_center_crop",
    "crop_size",
    "do_rescale",
    "rescale_factor",
    "do_normalize",
    "image_mean",
    "image_std",
    "do_convert_rgb",
)
# Bookkeeping keys transformers writes; they carry no preprocessing meaning.
_IGNORED_KEYS = {"image_processor_type", "processor_class", "feature_extractor_type"}


def _bicubic(x):
    # Keys a=-0.5 in Pillow's expression order, so the float64 weights match bit for bit.
    x = np.abs(x)
    return np.where(x < 1.0, (1.5 * x - 2.5) * x * x + 1, np.where(x < 2.0, (((x - 5) * x + 8) * x - 4) * -0.5, 0.0))


def _triangle(x):
    return np.maximum(1.0 - np.abs(x), 0.0)


FILTERS = {2: (_triangle, 1.0), 3: (_bicubic, 2.0)}  # PIL resample id -> (filter, radius)


def _resample_weights(in_size, out_size, resample, dtype):
    """Antialiased separable weights as computed by torch (and, in float64, by Pillow).

    Returns (first input index per output, weights[tap, output], fixed-point bits). uint8 images
    get float64 weights quantized to int16 with the largest precision (<= 22 bits) that keeps the
    biggest weight below 2**15; Pillow always uses 22 bits of int32, hence torch's off-by-one
    pixels. Float images get unquantized weights computed in the image's float type, like torch.
    """
    filt, radius = FILTERS[resample]
    real = np.float32 if dtype == np.float32 else np.float64
    scale = real(in_size) / real(out_size)
    filter_scale = max(scale, real(1.0))
    support = real(radius) * filter_scale
    center = scale * (np.arange(out_size, dtype=real) + real(0.5))
    first = np.maximum((center - support + real(0.5)).astype(np.int64), 0)
    count = np.minimum((center + support + real(0.5)).astype(np.int64), in_size) - first
    weights = np.zeros((int(np.ceil(support)) * 2 + 1, out_size), real)
    total = np.zeros(out_size, real)
    for j in range(len(weights)):  # sequential sum, like C, so rounding ties break identically
        offset = ((first + j).astype(real) - center + real(0.5)) * (real(1.0) / filter_scale)
        weights[j] = np.where(j < count, filt(offset.astype(np.float64)), 0.0)
        total += weights[j]
    weights /= np.where(total == 0, real(1.0), total)
    if dtype != np.uint8:
        return first, weights, 0
    bits = 0
    while bits < 22 and int(0.5 + weights.max() * (1 << (bits + 1))) < (1 << 15):
        bits += 1
    fixed = np.trunc(weights * (1 << bits) + np.where(weights < 0, -0.5, 0.5)).astype(np.int32)
    return first, fixed, bits


def _resample_rows(x, out_size, resample):
    """Resample axis 0: uint8 in fixed point (round half up, clamp), floats without clamping."""
    first, weights, bits = _resample_weights(x.shape[0], out_size, resample, x.dtype)
    acc = np.full((out_size,) + x.shape[1:], (1 << bits) >> 1, np.int32 if bits else weights.dtype)
    tmp = np.empty_like(acc)
    column = (out_size,) + (1,) * (x.ndim - 1)
    for j, w in enumerate(weights):
        acc += np.multiply(x[np.minimum(first + j, x.shape[0] - 1)], w.reshape(column), out=tmp)
    return np.clip(acc >> bits, 0, 255).astype(np.uint8) if bits else acc


def torchvision_resize(image, height, width, resample=3):
    """torchvision ``resize(antialias=True)`` of an HWC array: horizontal pass, then vertical."""
    x = image
    if width != x.shape[1]:
        x = _resample_rows(np.ascontiguousarray(x.transpose(1, 0, 2)), width, resample).transpose(1, 0, 2)
    if height != x.shape[0]:
        x = _resample_rows(x, height, resample)
    return x


def _pil_resize(image, height, width, resample):
    """transformers' PIL path: via uint8, floats in [0, 1] scaled by 255 and back (truncating)."""
    scaled = False
    if image.dtype != np.uint8:
        if np.allclose(image, image.astype(int)):
            if image.min() < 0 or image.max() > 255:
                raise ImageError(f"pixel values must be in [0, 255], got [{image.min()}, {image.max()}]")
        elif image.min() >= 0 and image.max() <= 1:
            scaled = True
        else:
            raise ImageError(
                f"float pixel values must be in [0, 1] or integers in [0, 255], got [{image.min()}, {image.max()}]"
            )
    pixels = (image.astype(np.float64) * 255 if scaled else image).astype(np.uint8)
    pil = Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels)
    out = np.asarray(pil.resize((width, height), resample=resample)).reshape(height, width, -1)
    return (out.astype(np.float64) * (1 / 255)).astype(np.float32) if scaled else out


def center_crop(image, height, width, ceil_padding=True):
    """Center crop an HWC array, zero-padding when the crop is larger than the image.

    transformers' NumPy path puts the odd padding pixel at the top/left (ceil), torchvision at
    the bottom/right (floor).
    """
    pad_h, pad_w = max(height - image.shape[0], 0), max(width - image.shape[1], 0)
    if pad_h or pad_w:
        top, left = (pad_h + ceil_padding) // 2, (pad_w + ceil_padding) // 2
        image = np.pad(image, ((top, pad_h - top), (left, pad_w - left), (0, 0)))
    top, left = (image.shape[0] - height) // 2, (image.shape[1] - width) // 2
    return image[top : top + height, left : left + width]


def pil_to_rgb(image):
    """transformers' ``convert_to_rgb``: alpha (band or palette transparency) composited on white."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, image.convert("RGBA"))
    return np.asarray(image.convert("RGB"))


def _is_number(value):
    return isinstance(value, (numbers.Real, np.number)) and not isinstance(value, (bool, np.bool_))


def _pixels(name, value):
    if not _is_number(value) or int(value) != value or value < 1:
        raise ConfigError(f"{name} must hold positive whole numbers of pixels, got {value!r}")
    return int(value)


def _size_dict(value, name, square):
    if _is_number(value):
        value = _pixels(name, value)
        return {"height": value, "width": value} if square else {"shortest_edge": value}
    if isinstance(value, (tuple, list)) and len(value) == 2:
        return {"height": _pixels(name, value[0]), "width": _pixels(name, value[1])}
    allowed = [{"height", "width"}] + ([] if square else [{"shortest_edge"}])
    if isinstance(value, dict) and set(value) in allowed:
        return {k: _pixels(name, v) for k, v in value.items()}
    expected = "{'height', 'width'}" + ("" if square else " or {'shortest_edge'}")
    raise ConfigError(f"{name} must be an int, (height, width) or a dict with keys {expected}; got {value!r}")


def _channel_stats(value, name):
    value = value.tolist() if isinstance(value, np.ndarray) else value
    if isinstance(value, (list, tuple)) and len(value) == 3 and all(map(_is_number, value)):
        return [float(v) for v in value]
    if _is_number(value):
        return float(value)
    raise ConfigError(f"{name} must be a number or 3 numbers (one per RGB channel), got {value!r}")


def _number(name, value):
    if not _is_number(value):
        raise ConfigError(f"{name} must be a number, got {value!r}")
    return value


def _flag(name, value):
    # bool() would take the JSON string "false" for true
    if not isinstance(value, (bool, np.bool_)) and value not in (0, 1):
        raise ConfigError(f"{name} must be true or false, got {value!r}")
    return bool(value)


def read_config(file):
    """The settings of a preprocessor_config.json, checked: a value of the wrong type is an
    error naming the file, the key and what it must be (ConfigError)."""
    from tfbit.models.config import read_json

    config = read_json(file)
    try:
        BitImageProcessor.from_dict(config)
    except ValueError as e:
        raise ConfigError(f"{file}: {e}") from None
    return config


class BitImageProcessor:
    """Preprocess images for BiT exactly like transformers' ``BitImageProcessor``.

    Keyword arguments and defaults are transformers' (OpenAI CLIP mean/std, 224 shortest edge,
    224x224 crop, bicubic). ``backend`` selects which transformers implementation to match (see
    the module docstring). Unknown keyword arguments (e.g. keys of another model's config) are
    kept in ``extra`` and written back by ``save_pretrained`` but otherwise ignored.

    ``processor(images)`` accepts a PIL image, a path, an HW / HWC array (uint8, or floats of
    0-255 pixel values), a NHWC array or a list of these, and returns float32 NHWC.
    """

    def __init__(
        self,
        do_resize=True,
        size=None,
        resample=3,
        do_center_crop=True,
        crop_size=None,
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=None,
        image_std=None,
        do_convert_rgb=True,
        *,
        backend="torchvision",
        **extra,
    ):
        if backend not in BACKENDS:
            raise ConfigError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.backend = backend
        self.do_resize, self.do_center_crop = _flag("do_resize", do_resize), _flag("do_center_crop", do_center_crop)
        self.do_rescale, self.do_normalize = _flag("do_rescale", do_rescale), _flag("do_normalize", do_normalize)
        self.do_convert_rgb = _flag("do_convert_rgb", do_convert_rgb)
        self.size = _size_dict(224 if size is None else size, "size", square=False)
        self.crop_size = _size_dict(224 if crop_size is None else crop_size, "crop_size", square=True)
        self.resample = _number("resample", resample)
        if self.resample not in (FILTERS if backend == "torchvision" else range(6)):
            raise ConfigError(f"resample={self.resample!r} is not supported by the {backend} backend")
        self.resample = int(self.resample)
        self.rescale_factor = float(_number("rescale_factor", rescale_factor))
        self.image_mean = _channel_stats(OPENAI_CLIP_MEAN if image_mean is None else image_mean, "image_mean")
        self.image_std = _channel_stats(OPENAI_CLIP_STD if image_std is None else image_std, "image_std")
        self.extra = {k: v for k, v in extra.items() if k not in _IGNORED_KEYS}

    @classmethod
    def original_bit(cls, **kwargs):
        """Preprocessing of the original BiT weights (google-research/big_transfer, timm).

        Pixels are mapped to [-1, 1]: rescale 1/255 then mean = std = 0.5, i.e. ``x / 127.5 - 1``.
        Resolution and filter depend on the checkpoint (timm evaluates the ImageNet-21k ->
        ImageNet-1k BiT-M models at 448 with bilinear resize and no crop margin:
        ``original_bit(size=448, crop_size=448, resample=2)``); pass them as keyword arguments.
        """
        return cls(**{"image_mean": (0.5, 0.5, 0.5), "image_std": (0.5, 0.5, 0.5), **kwargs})

    # ---- configuration -------------------------------------------------------------------------

    def to_dict(self):
        config = {name: getattr(self, name) for name in FIELDS}
        config = json.loads(json.dumps(config))  # deep copy with JSON types
        return {**self.extra, **config, "image_processor_type": "BitImageProcessor"}

    @classmethod
    def from_dict(cls, config, **kwargs):
        # transformers writes null for "use the default"
        return cls(**{k: v for k, v in {**config, **kwargs}.items() if v is not None})

    @classmethod
    def from_pretrained(cls, path, **kwargs):
        """Load ``preprocessor_config.json`` from a directory (or the file itself)."""
        path = Path(path)
        file = path / CONFIG_NAME if path.is_dir() else path
        if not file.is_file():
            raise MissingFileError(f"no {CONFIG_NAME} at {file}")
        return cls.from_dict(read_config(file), **kwargs)

    def save_pretrained(self, directory):
        """Write a transformers-compatible ``preprocessor_config.json``; returns its path."""
        os.makedirs(directory, exist_ok=True)
        file = os.path.join(directory, CONFIG_NAME)
        with open(file, "w", encoding="utf-8") as f:
            f.write(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
        return file

    def __eq__(self, other):
        return isinstance(other, BitImageProcessor) and (self.backend, self.to_dict()) == (
            other.backend,
            other.to_dict(),
        )

    def __repr__(self):
        return f"BitImageProcessor(backend={self.backend!r}, {json.dumps(self.to_dict(), sort_keys=True)})"

    # ---- processing ----------------------------------------------------------------------------

    def __call__(self, images, **overrides):
        """Preprocess one image or a batch into a float32 NHWC array; keyword arguments override
        the configuration for this call."""
        if overrides:
            return self.from_dict(self.to_dict(), backend=self.backend, **overrides)(images)
        if isinstance(images, np.ndarray) and images.ndim == 4:
            images = list(images)
        elif not isinstance(images, (list, tuple)):
            images = [images]
        if not images:
            raise ImageError("no images given")
        out = [self.preprocess(image) for image in images]
        if len({x.shape for x in out}) > 1:
            raise ImageError(
                f"preprocessed images differ in shape {sorted({x.shape for x in out})}; "
                "enable do_center_crop or resize to a fixed height and width"
            )
        return np.stack(out)

    def preprocess(self, image):
        """One image -> float32 HWC array."""
        x = self._to_array(image)
        if self.do_resize:
            x = self.resize(x)
        if self.do_center_crop:
            x = center_crop(x, self.crop_size["height"], self.crop_size["width"], self.backend == "pil")
        return self._rescale_normalize(x)

    @property
    def fixed_output_size(self):
        """The (height, width) of every preprocessed image whatever its size, or None when the
        resized shortest edge leaves it to each image's aspect ratio (no center crop)."""
        if self.do_center_crop:
            return self.crop_size["height"], self.crop_size["width"]
        if self.do_resize and "height" in self.size:
            return self.size["height"], self.size["width"]
        return None

    def output_size(self, height, width):
        """Resized (height, width): shortest edge to ``size``, long edge truncated like transformers."""
        if "shortest_edge" not in self.size:
            return self.size["height"], self.size["width"]
        target = self.size["shortest_edge"]
        short, long = (width, height) if width <= height else (height, width)
        new_long = int(target * long / short)
        return (new_long, target) if width <= height else (target, new_long)

    def resize(self, image):
        height, width = self.output_size(*image.shape[:2])
        if self.backend == "pil":
            return _pil_resize(image, height, width, self.resample)
        return torchvision_resize(image, height, width, self.resample)

    def _to_array(self, image):
        if isinstance(image, (str, os.PathLike)):
            image = load_image(image)
        if isinstance(image, Image.Image):
            x = pil_to_rgb(image) if self.do_convert_rgb else np.asarray(image)
            return x[..., None] if x.ndim == 2 else x
        if not isinstance(image, np.ndarray):
            raise TypeError(
                f"unsupported image type {type(image).__name__}: expected a PIL image, a path or a numpy array"
            )
        if image.ndim == 2:
            image = image[..., None]
        if image.ndim != 3 or image.shape[-1] not in (1, 3, 4) or 0 in image.shape:
            raise ImageError(
                f"expected an (H, W) or channels-last (H, W, C) image with C in 1, 3, 4 "
                f"(or an (N, H, W, C) batch); got shape {image.shape}"
            )
        if image.dtype.kind in "iu" and image.dtype != np.uint8:
            if image.min() < 0 or image.max() > 255:
                raise ImageError(f"integer pixel values must be in [0, 255], got [{image.min()}, {image.max()}]")
            image = image.astype(np.uint8)
        elif image.dtype.kind not in "uf":
            raise TypeError(f"unsupported image dtype {image.dtype}: expected uint8 or float")
        return self._array_to_rgb(image) if self.do_convert_rgb else image

    def _array_to_rgb(self, x):
        if x.shape[-1] == 1:
            return np.repeat(x, 3, axis=-1)
        if x.shape[-1] == 3:
            return x
        is_float = x.dtype.kind == "f"
        if is_float and (x.min() < 0 or x.max() > 1):
            raise ImageError(f"a float RGBA image must be in [0, 1] to composite its alpha, got [{x.min()}, {x.max()}]")
        if self.backend == "pil":  # float64 blend, rounded back to the input dtype
            white = 1.0 if is_float else 255
            alpha = x[..., 3:] / white
            rgb = alpha * x[..., :3] + (1 - alpha) * white
            return rgb.astype(x.dtype) if is_float else np.round(rgb).astype(x.dtype)
        # torchvision: float32 blend in [0, 1]; back to uint8 by truncating x * 255.999
        f = x.astype(np.float32) if is_float else x.astype(np.float32) * np.float32(1 / 255)
        rgb = f[..., :3] * f[..., 3:] + (1 - f[..., 3:])
        return rgb.astype(x.dtype) if is_float else (rgb * np.float32(255.999)).astype(np.uint8)

    def _rescale_normalize(self, x):
        mean, std = np.float32(self.image_mean), np.float32(self.image_std)
        if self.do_normalize and mean.size > 1 and x.shape[-1] != mean.size:
            raise ImageError(f"image_mean/image_std have {mean.size} values but the image has {x.shape[-1]} channels")
        if self.backend == "pil":
            if self.do_rescale:
                x = (x.astype(np.float64) * self.rescale_factor).astype(np.float32)
            if self.do_normalize:
                x = x if x.dtype.kind == "f" else x.astype(np.float32)
                x = (x - mean.astype(x.dtype)) / std.astype(x.dtype)
            return x.astype(np.float32)
        # torchvision fuses the two steps: (x - mean / factor) / (std / factor) in float32
        if self.do_normalize:
            if self.do_rescale:
                inverse = np.float32(1.0 / self.rescale_factor)
                mean, std = mean * inverse, std * inverse
            return (x.astype(np.float32) - mean) / std
        if self.do_rescale:  # uint8 * python float is float32 in torch, float64 in NumPy
            x = x * (self.rescale_factor if x.dtype.kind == "f" else np.float32(self.rescale_factor))
        return x.astype(np.float32)
