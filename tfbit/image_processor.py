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
``load_image``, which applies the serving graph's rules to encoded files (formats, ``MAX_PIXELS``,
truncation, which EXIF orientation is read; see ``read_image_header`` and ``tfbit.image_ops``), so
that a file gives the same pixels, or the same error, in every tfbit artifact.
"""

from __future__ import annotations

import io
import json
import os
import re
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image

CONFIG_NAME = "preprocessor_config.json"
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
BACKENDS = ("torchvision", "pil")
FIELDS = ("do_resize", "size", "resample", "do_center_crop", "crop_size", "do_rescale",
          "rescale_factor", "do_normalize", "image_mean", "image_std", "do_convert_rgb")
# Bookkeeping keys transformers writes; they carry no preprocessing meaning.
_IGNORED_KEYS = {"image_processor_type", "processor_class", "feature_extractor_type"}


def _bicubic(x):
    # Keys a=-0.5 in Pillow's expression order, so the float64 weights match bit for bit.
    x = np.abs(x)
    return np.where(x < 1.0, (1.5 * x - 2.5) * x * x + 1,
                    np.where(x < 2.0, (((x - 5) * x + 8) * x - 4) * -0.5, 0.0))


def _triangle(x):
    return np.maximum(1.0 - np.abs(x), 0.0)


_FILTERS = {2: (_triangle, 1.0), 3: (_bicubic, 2.0)}  # PIL resample id -> (filter, radius)


def _resample_weights(in_size, out_size, resample, dtype):
    """Antialiased separable weights as computed by torch (and, in float64, by Pillow).

    Returns (first input index per output, weights[tap, output], fixed-point bits). uint8 images
    get float64 weights quantized to int16 with the largest precision (<= 22 bits) that keeps the
    biggest weight below 2**15; Pillow always uses 22 bits of int32, hence torch's off-by-one
    pixels. Float images get unquantized weights computed in the image's float type, like torch.
    """
    filt, radius = _FILTERS[resample]
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
                raise ValueError(f"pixel values must be in [0, 255], got [{image.min()}, {image.max()}]")
        elif image.min() >= 0 and image.max() <= 1:
            scaled = True
        else:
            raise ValueError(f"float pixel values must be in [0, 1] or integers in [0, 255], "
                             f"got [{image.min()}, {image.max()}]")
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
    return image[top:top + height, left:left + width]


def pil_to_rgb(image):
    """transformers' ``convert_to_rgb``: alpha (band or palette transparency) composited on white."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, image.convert("RGBA"))
    return np.asarray(image.convert("RGB"))


# ---- encoded files -----------------------------------------------------------------------------
# The rules below are the serving graph's (tfbit.image_ops), implemented a second time in TF ops:
# both paths accept the same files, refuse the rest with the same message and read the same
# size and EXIF orientation. tfbit.image_ops' docstring lists what each format does.

# Bound on decoded pixels, checked in the header before decoding. Pillow's own bound
# (Image.MAX_IMAGE_PIXELS, 89.5 M: a warning, an error at twice that) let a 10000 x 10000 PNG of
# 320 KB cost the serving graph 2.3 GB and seconds. The graph now needs 4.5-6.5 bytes a pixel (it
# resizes uint8 a strip at a time; an EXIF rotation copies the image once), this module ~13: a
# 64-megapixel JPEG took 0.3-0.4 GB and 0.7-1.8 s in the graph, 0.85 GB and 2.4-2.8 s here, on
# 2 shared cores. 2**26 (64 Mi, 8192 x 8192) admits 61-megapixel cameras and 50-megapixel phone modes.
MAX_PIXELS = 1 << 26
# Headers are walked a block at a time (JPEG segments, PNG chunks, GIF blocks; runs of equal IDAT
# chunks and of full GIF sub-blocks a step each): real files take a few steps, or about three a
# frame for GIFs; hostile ones could take one per few bytes, 50-100 us each in the graph. 4096 steps
# cost at most ~0.4 s, less than decoding a large photo, and allow GIFs of ~1300 frames.
MAX_BLOCKS = 1 << 12
FORMATS = ("JPEG", "PNG", "GIF", "BMP")
MAGIC = ((0, b"\xff\xd8\xff"), (1, b"\x89PNG\r\n\x1a\n"), (2, b"GIF87a"), (2, b"GIF89a"), (3, b"BM"))
# EXIF orientation -> transpose, then flip rows, then flip columns: the permutations of PIL's
# ImageOps.exif_transpose (2 FLIP_LEFT_RIGHT ... 5 TRANSPOSE, 6 ROTATE_270, 7 TRANSVERSE, 8 ROTATE_90).
TRANSPOSED, FLIP_ROWS, FLIP_COLUMNS = (5, 6, 7, 8), (3, 4, 7, 8), (2, 3, 6, 7)
JPEG_SOF = (0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF)
EXIF_PREFIX = b"Exif\x00\x00"
XMP_PREFIX = b"http://ns.adobe.com/xap/1.0/\x00"
XMP_ORIENTATION = b"tiff:Orientation"
# TIFF SHORT, LONG, SBYTE, SSHORT, SLONG -> bytes. PIL reads the orientation tag's first value of
# these, of floats, rationals and LONG8 too, and from outside the entry when it does not fit in
# it; tfbit reads these types from the entry only (orientations are one SHORT in practice).
EXIF_INTEGERS = {3: 2, 4: 4, 6: 1, 8: 2, 9: 4}
BMP_MASKS = (0xFF0000, 0xFF00, 0xFF)  # the only BI_BITFIELDS layout TF's decoder reads right
# Messages, filled in by str.format here and by image_ops._format in the graph; no quotes, which
# tf.debugging.Assert would print escaped.
NOT_AN_IMAGE = "could not decode image: not JPEG, PNG, GIF or BMP data ({} bytes: {})"
TRUNCATED = "could not decode image: truncated {} data ({} bytes)"
CORRUPT = "could not decode image: corrupt {} data at byte {}"
TOO_MANY_BLOCKS = "could not decode image: corrupt {} data: more than {} blocks"
ZERO_SIZE = "could not decode image: the {} header gives a size of {} x {}"
UNSUPPORTED_BMP = ("could not decode image: unsupported BMP ({}-bit, compression {}, {}-byte header); "
                   "tfbit reads uncompressed 8-, 24- and 32-bit BMPs")
# TF's decoder converts CMYK to RGB as trunc(c * k / 255), PIL rounds: 1 level apart on ~30% of
# the pixels of a photo with black ink, 2 after resizing.
UNSUPPORTED_CMYK = ("could not decode image: unsupported JPEG: CMYK (4 components), which the TF decoder "
                    "converts to RGB differently from PIL")
UNSUPPORTED_GIF = ("could not decode image: unsupported GIF: frame {} is {} x {} at ({}, {}) on a {} x {} "
                   "screen; the first frame must fill the screen and the others lie within it")
TOO_LARGE = "image too large: {} x {} pixels{} ({} pixels to decode), more than max_pixels={}"
UNDECODABLE = "could not decode image: corrupt or truncated {} data"


class ImageHeader(NamedTuple):
    format: str  # one of FORMATS
    width: int
    height: int
    frames: int  # GIF frames (TF's decoder decodes them all); 1 for the other formats
    pixels: int  # decoded pixels: width * height, summed over the frames of a GIF
    orientation: int  # EXIF orientation 1-8 (1 when absent or not read)


def _uint(data, pos, size, little=False):
    """Unsigned integer at data[pos:pos + size]; bytes past the end read as 0 (as in the graph)."""
    if little:
        return int.from_bytes(data[pos:pos + size], "little")
    return int.from_bytes(data[pos:pos + size].ljust(size, b"\x00"), "big")


def _exif_orientation(tiff):
    """(IFD0 has tag 0x0112, its first value or 0 when tfbit does not read it) of a TIFF structure."""
    little = tiff[:2] == b"II"
    if len(tiff) < 8 or tiff[:2] not in (b"II", b"MM") or _uint(tiff, 2, 2, little) != 42:
        return False, 0
    ifd = _uint(tiff, 4, 4, little)
    if ifd + 2 > len(tiff):
        return False, 0
    for entry in range(ifd + 2, ifd + 2 + 12 * min(_uint(tiff, ifd, 2, little), (len(tiff) - ifd - 2) // 12), 12):
        if _uint(tiff, entry, 2, little) == 0x0112:  # PIL keeps the first one
            size = EXIF_INTEGERS.get(_uint(tiff, entry + 2, 2, little))
            inline = size and 1 <= _uint(tiff, entry + 4, 4, little) <= 4 // size
            return True, _uint(tiff, entry + 8, size, little) if inline else 0
    return False, 0


def _jpeg_header(data):
    pos, size, components, exif, xmp = 2, None, 0, None, b""
    for _ in range(MAX_BLOCKS):
        if pos + 4 > len(data):
            raise ValueError(TRUNCATED.format("JPEG", len(data)))
        marker = data[pos + 1]
        if data[pos] != 0xFF or marker == 0xD9:
            raise ValueError(CORRUPT.format("JPEG", pos))
        if marker == 0xDA:  # start of scan: entropy-coded data follows
            break
        if marker == 0xFF or 0xD0 <= marker <= 0xD8 or marker == 0x01:  # fill byte, markers without a segment
            pos += 1 if marker == 0xFF else 2
            continue
        end = pos + 2 + _uint(data, pos + 2, 2)
        segment = data[pos + 4:end]
        if marker in JPEG_SOF and size is None:
            size, components = (_uint(data, pos + 7, 2), _uint(data, pos + 5, 2)), _uint(data, pos + 9, 1)
        if marker == 0xE1 and segment.startswith(EXIF_PREFIX) and exif is None:  # PIL reads the first Exif
            exif = segment[len(EXIF_PREFIX):]
        if marker == 0xE1 and segment.startswith(XMP_PREFIX):  # ... and the last XMP packet
            xmp = segment[len(XMP_PREFIX):]
        pos = end
    else:
        raise ValueError(TOO_MANY_BLOCKS.format("JPEG", MAX_BLOCKS))
    if size is None:
        raise ValueError(CORRUPT.format("JPEG", pos))
    if components == 4:
        raise ValueError(UNSUPPORTED_CMYK)
    if data.find(b"\xff\xd9", pos) < 0:  # no end of image marker: truncated entropy-coded data
        raise ValueError(TRUNCATED.format("JPEG", len(data)))
    present, orientation = _exif_orientation(exif or b"")
    if not present:  # PIL falls back to XMP only when EXIF has no orientation tag
        match = re.search(re.escape(XMP_ORIENTATION) + rb'(="|>)([0-9])', xmp)
        orientation = int(match[2]) if match else 0
    return (*size, 1, size[0] * size[1], orientation)


def _png_header(data):
    if len(data) < 33:
        raise ValueError(TRUNCATED.format("PNG", len(data)))
    width, height = _uint(data, 16, 4), _uint(data, 20, 4)
    if data[12:16] != b"IHDR" or max(width, height) >= 1 << 31:
        raise ValueError(CORRUPT.format("PNG", 12))
    pos, exif = 8, b""
    for _ in range(MAX_BLOCKS):
        end = pos + 12 + _uint(data, pos, 4)
        if end > len(data):  # also without IEND, which PIL accepts and TF's decoder does not
            raise ValueError(TRUNCATED.format("PNG", len(data)))
        kind = data[pos + 4:pos + 8]
        if kind == b"eXIf":  # PIL reads it before or after the image data; the last one wins
            exif = data[pos + 8:end - 4]
            exif = exif[len(EXIF_PREFIX):] if exif.startswith(EXIF_PREFIX) else exif
        if kind == b"IEND":
            return width, height, 1, width * height, _exif_orientation(exif)[1]
        if kind == b"IDAT":  # encoders write equal IDAT chunks: up to 63 more are skipped per step
            step, run = end - pos, 0
            while (run < 63 and end + (run + 1) * step <= len(data)
                   and data[end + run * step:end + run * step + 8] == data[pos:pos + 8]):
                run += 1
            end += run * step
        pos = end
    raise ValueError(TOO_MANY_BLOCKS.format("PNG", MAX_BLOCKS))


def _color_table(flags):
    return 3 << (flags & 7) + 1 if flags & 0x80 else 0


def _gif_header(data):
    if len(data) < 13:
        raise ValueError(TRUNCATED.format("GIF", len(data)))
    screen = _uint(data, 6, 2, True), _uint(data, 8, 2, True)
    pos, frames, pixels, in_blocks = 13 + _color_table(data[10]), 0, 0, False
    for _ in range(MAX_BLOCKS):
        if pos >= len(data):
            if in_blocks or pos > len(data) or not frames:
                raise ValueError(TRUNCATED.format("GIF", len(data)))
            break  # no trailer: PIL and TF's decoder read such files
        if in_blocks:  # data sub-blocks; encoders write 255-byte ones, skipped up to 64 per step
            run, size = 0, data[pos]
            while run < 64 and pos + 256 * run < len(data) and data[pos + 256 * run] == 255:
                run += 1
            if run:
                pos += 256 * run
            elif size and _uint(data, pos + 1 + size, 1) == 0:  # the last sub-block and the terminator
                pos, in_blocks = pos + 2 + size, False
            else:
                pos, in_blocks = pos + 1 + size, size > 0
        elif data[pos] == 0x3B:  # trailer
            break
        elif data[pos] == 0x21:  # extension: label, sub-blocks; one sub-block and the terminator at once
            size = _uint(data, pos + 2, 1)
            if size and _uint(data, pos + 3 + size, 1) == 0:
                pos += 4 + size
            else:
                pos, in_blocks = pos + 2, True
        elif data[pos] == 0x2C:  # image: descriptor, local colour table, LZW code size, sub-blocks
            left, top, width, height = (_uint(data, pos + k, 2, True) for k in (1, 3, 5, 7))
            # TF's decoder sizes its canvas by the frames, PIL by the screen (and fills it differently)
            fits = ((left, top, width, height) == (0, 0, *screen) if not frames
                    else left + width <= screen[0] and top + height <= screen[1])
            if pos + 10 <= len(data) and not fits:
                raise ValueError(UNSUPPORTED_GIF.format(frames, width, height, left, top, *screen))
            frames, pixels = frames + 1, pixels + width * height
            pos, in_blocks = pos + 11 + _color_table(_uint(data, pos + 9, 1)), True
        else:
            raise ValueError(CORRUPT.format("GIF", pos))
    else:
        raise ValueError(TOO_MANY_BLOCKS.format("GIF", MAX_BLOCKS))
    if not frames:
        raise ValueError(CORRUPT.format("GIF", pos))
    return (*screen, frames, pixels, 1)


def _bmp_header(data):
    if len(data) < 54:
        raise ValueError(TRUNCATED.format("BMP", len(data)))
    header, bits, compression = _uint(data, 14, 4, True), _uint(data, 28, 2, True), _uint(data, 30, 4, True)
    width, height = (int.from_bytes(data[k:k + 4], "little", signed=True) for k in (18, 22))
    masks = tuple(_uint(data, 54 + 4 * k, 4, True) for k in range(3))
    if header < 40 or not (compression == 0 and bits in (8, 24, 32)
                           or compression == 3 and bits == 32 and masks == BMP_MASKS):
        raise ValueError(UNSUPPORTED_BMP.format(bits, compression, header))
    if _uint(data, 10, 4, True) + (width * bits + 31) // 32 * 4 * abs(height) > len(data):
        raise ValueError(TRUNCATED.format("BMP", len(data)))
    return width, abs(height), 1, width * abs(height), 1


def read_image_header(data, max_pixels=MAX_PIXELS):
    """Format, size and EXIF orientation of encoded image bytes, read as the serving graph reads
    them; raises ``ValueError`` with the graph's message for data the graph refuses before
    decoding, including images of more than ``max_pixels`` decoded pixels."""
    kind = next((k for k, magic in MAGIC if data.startswith(magic)), None)
    if kind is None:
        raise ValueError(NOT_AN_IMAGE.format(len(data), data[:8].hex(" ")))
    width, height, frames, pixels, orientation = (_jpeg_header, _png_header, _gif_header, _bmp_header)[kind](data)
    if width <= 0 or height <= 0:
        raise ValueError(ZERO_SIZE.format(FORMATS[kind], width, height))
    if pixels > max_pixels:
        frames_text = f", {frames} frames" if frames > 1 else ""
        raise ValueError(TOO_LARGE.format(width, height, frames_text, pixels, max_pixels))
    return ImageHeader(FORMATS[kind], width, height, frames, pixels, orientation if 1 <= orientation <= 8 else 1)


def exif_transpose(image, orientation):
    """PIL image turned upright for an EXIF orientation, as ``ImageOps.exif_transpose`` does."""
    for applies, method in ((TRANSPOSED, Image.Transpose.TRANSPOSE), (FLIP_ROWS, Image.Transpose.FLIP_TOP_BOTTOM),
                            (FLIP_COLUMNS, Image.Transpose.FLIP_LEFT_RIGHT)):
        if orientation in applies:
            image = image.transpose(method)
    return image


def load_image(path, max_pixels=MAX_PIXELS):
    """Open an image file as transformers' ``load_image`` does (PIL, EXIF transpose, RGB), within
    the serving graph's rules: files it refuses (other formats, more than ``max_pixels`` decoded
    pixels, truncated data, ...) raise ``ValueError``, and the orientation is the EXIF tag it reads.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image file not found: {path}")
    with open(path, "rb") as f:
        data = f.read()
    try:
        header = read_image_header(data, max_pixels)
    except ValueError as err:
        raise ValueError(f"cannot read {path} as an image: {err}") from None
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()  # PIL decodes lazily: truncated data fails here
            return exif_transpose(image, header.orientation).convert("RGB")
    except (OSError, SyntaxError, ValueError) as err:
        raise ValueError(f"cannot read {path} as an image: {UNDECODABLE.format(header.format)} ({err})") from None


def _size_dict(value, name, square):
    if isinstance(value, int):
        return {"height": value, "width": value} if square else {"shortest_edge": value}
    if isinstance(value, (tuple, list)) and len(value) == 2:
        return {"height": int(value[0]), "width": int(value[1])}
    allowed = [{"height", "width"}] + ([] if square else [{"shortest_edge"}])
    if isinstance(value, dict) and set(value) in allowed:
        return {k: int(v) for k, v in value.items()}
    expected = "{'height', 'width'}" + ("" if square else " or {'shortest_edge'}")
    raise ValueError(f"{name} must be an int, (height, width) or a dict with keys {expected}; got {value!r}")


def _channel_stats(value, name):
    value = [float(v) for v in value] if np.ndim(value) else float(value)
    if np.ndim(value) and len(value) != 3:
        raise ValueError(f"{name} must be a float or 3 floats, got {value!r}")
    return value


class BitImageProcessor:
    """Preprocess images for BiT exactly like transformers' ``BitImageProcessor``.

    Keyword arguments and defaults are transformers' (OpenAI CLIP mean/std, 224 shortest edge,
    224x224 crop, bicubic). ``backend`` selects which transformers implementation to match (see
    the module docstring). Unknown keyword arguments (e.g. keys of another model's config) are
    kept in ``extra`` and written back by ``save_pretrained`` but otherwise ignored.

    ``processor(images)`` accepts a PIL image, a path, an HW / HWC array (uint8, or floats of
    0-255 pixel values), a NHWC array or a list of these, and returns float32 NHWC.
    """

    def __init__(self, do_resize=True, size=None, resample=3, do_center_crop=True, crop_size=None,
                 do_rescale=True, rescale_factor=1 / 255, do_normalize=True, image_mean=None,
                 image_std=None, do_convert_rgb=True, *, backend="torchvision", **extra):
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.backend = backend
        self.do_resize, self.do_center_crop = bool(do_resize), bool(do_center_crop)
        self.do_rescale, self.do_normalize = bool(do_rescale), bool(do_normalize)
        self.do_convert_rgb = bool(do_convert_rgb)
        self.size = _size_dict(224 if size is None else size, "size", square=False)
        self.crop_size = _size_dict(224 if crop_size is None else crop_size, "crop_size", square=True)
        self.resample = int(resample)
        if self.resample not in (_FILTERS if backend == "torchvision" else range(6)):
            raise ValueError(f"resample={self.resample} is not supported by the {backend} backend")
        self.rescale_factor = float(rescale_factor)
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
            raise FileNotFoundError(f"no {CONFIG_NAME} at {file}")
        with open(file, encoding="utf-8") as f:
            return cls.from_dict(json.load(f), **kwargs)

    def save_pretrained(self, directory):
        """Write a transformers-compatible ``preprocessor_config.json``; returns its path."""
        os.makedirs(directory, exist_ok=True)
        file = os.path.join(directory, CONFIG_NAME)
        with open(file, "w", encoding="utf-8") as f:
            f.write(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
        return file

    def __eq__(self, other):
        return (isinstance(other, BitImageProcessor)
                and (self.backend, self.to_dict()) == (other.backend, other.to_dict()))

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
            raise ValueError("no images given")
        out = [self.preprocess(image) for image in images]
        if len({x.shape for x in out}) > 1:
            raise ValueError(f"preprocessed images differ in shape {sorted({x.shape for x in out})}; "
                             "enable do_center_crop or resize to a fixed height and width")
        return np.stack(out)

    def preprocess(self, image):
        """One image -> float32 HWC array."""
        x = self._to_array(image)
        if self.do_resize:
            x = self.resize(x)
        if self.do_center_crop:
            x = center_crop(x, self.crop_size["height"], self.crop_size["width"], self.backend == "pil")
        return self._rescale_normalize(x)

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
            raise TypeError(f"unsupported image type {type(image).__name__}: expected a PIL image, "
                            "a path or a numpy array")
        if image.ndim == 2:
            image = image[..., None]
        if image.ndim != 3 or image.shape[-1] not in (1, 3, 4) or 0 in image.shape:
            raise ValueError(f"expected an (H, W) or channels-last (H, W, C) image with C in 1, 3, 4 "
                             f"(or an (N, H, W, C) batch); got shape {image.shape}")
        if image.dtype.kind in "iu" and image.dtype != np.uint8:
            if image.min() < 0 or image.max() > 255:
                raise ValueError(f"integer pixel values must be in [0, 255], "
                                 f"got [{image.min()}, {image.max()}]")
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
            raise ValueError(f"a float RGBA image must be in [0, 1] to composite its alpha, "
                             f"got [{x.min()}, {x.max()}]")
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
            raise ValueError(f"image_mean/image_std have {mean.size} values but the image has "
                             f"{x.shape[-1]} channels")
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
