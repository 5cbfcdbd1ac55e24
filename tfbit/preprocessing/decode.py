"""Encoded image files on the Python side: the rules tfbit reads them by, and ``load_image``.

The serving graph applies the same rules in TF ops (``tfbit.preprocessing.tf_decode``, whose docstring lists
what each format does): both paths accept the same files, refuse the rest with the same message and
read the same size and EXIF orientation, so that a file gives the same pixels, or the same error, in
every tfbit artifact. The constants and message templates below are the ones both paths use.

``read_image_header`` applies the rules to encoded bytes; ``load_image`` opens a file as
transformers' ``load_image`` does (PIL, EXIF transpose, ``convert("RGB")``) within them.
"""

from __future__ import annotations

import io
import os
import re
import zlib
from typing import NamedTuple

from PIL import Image

from tfbit.errors import FileError, ImageError, MissingFileError

# Bound on decoded pixels, checked in the header before decoding. Pillow's own bound
# (Image.MAX_IMAGE_PIXELS, 89.5 M: a warning, an error at twice that) let a 10000 x 10000 PNG of
# 320 KB cost the serving graph 2.3 GB and seconds. The graph now needs 4.5-6.5 bytes a pixel (it
# resizes uint8 a strip at a time; an EXIF rotation copies the image once), the Python path ~13:
# a 64-megapixel JPEG took 0.3-0.4 GB and 0.7-1.8 s in the graph, 0.85 GB and 2.4-2.8 s in Python,
# on 2 shared cores. 2**26 (64 Mi, 8192 x 8192) admits 61-megapixel cameras and 50-megapixel phone modes.
MAX_PIXELS = 1 << 26
# Headers are walked a block at a time (JPEG segments, PNG chunks, GIF blocks; runs of equal IDAT
# chunks and of full GIF sub-blocks a step each): real files take a few steps, or about three a
# frame for GIFs; hostile ones could take one per few bytes, 50-100 us each in the graph. 4096 steps
# cost at most ~0.4 s, less than decoding a large photo, and allow GIFs of ~1300 frames.
MAX_BLOCKS = 1 << 12
FORMATS = ("JPEG", "PNG", "GIF", "BMP")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")  # the file names these formats go by
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
# Messages, filled in by str.format here and by tf_decode._format in the graph; no quotes, which
# tf.debugging.Assert would print escaped.
NOT_AN_IMAGE = "could not decode image: not JPEG, PNG, GIF or BMP data ({} bytes: {})"
TRUNCATED = "could not decode image: truncated {} data ({} bytes)"
CORRUPT = "could not decode image: corrupt {} data at byte {}"
TOO_MANY_BLOCKS = "could not decode image: corrupt {} data: more than {} blocks"
ZERO_SIZE = "could not decode image: the {} header gives a size of {} x {}"
UNSUPPORTED_BMP = (
    "could not decode image: unsupported BMP ({}-bit, compression {}, {}-byte header); "
    "tfbit reads uncompressed 8-, 24- and 32-bit BMPs"
)
# TF's decoder converts CMYK to RGB as trunc(c * k / 255), PIL rounds: 1 level apart on ~30% of
# the pixels of a photo with black ink, 2 after resizing.
UNSUPPORTED_CMYK = (
    "could not decode image: unsupported JPEG: CMYK (4 components), which the TF decoder "
    "converts to RGB differently from PIL"
)
UNSUPPORTED_GIF = (
    "could not decode image: unsupported GIF: frame {} is {} x {} at ({}, {}) on a {} x {} "
    "screen; the first frame must fill the screen and the others lie within it"
)
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
        return int.from_bytes(data[pos : pos + size], "little")
    return int.from_bytes(data[pos : pos + size].ljust(size, b"\x00"), "big")


def _exif_orientation(tiff):
    """(IFD0 has tag 0x0112, its first value or 0 when tfbit does not read it) of a TIFF structure."""
    little = tiff[:2] == b"II"
    if len(tiff) < 8 or tiff[:2] not in (b"II", b"MM") or _uint(tiff, 2, 2, little) != 42:
        return False, 0
    ifd = _uint(tiff, 4, 4, little)
    if ifd + 2 > len(tiff):
        return False, 0
    for entry in range(ifd + 2, ifd + 2 + 12 * min(_uint(tiff, ifd, 2, little), (len(tiff) - ifd - 2) // 12), 12):
        # The first tag, as Pillow >= 13 reads it (Pillow 12 takes the last of duplicate tags)
        if _uint(tiff, entry, 2, little) == 0x0112:
            size = EXIF_INTEGERS.get(_uint(tiff, entry + 2, 2, little))
            inline = size and 1 <= _uint(tiff, entry + 4, 4, little) <= 4 // size
            return True, _uint(tiff, entry + 8, size, little) if inline else 0
    return False, 0


def _jpeg_header(data):
    pos, size, components, exif, xmp = 2, None, 0, None, b""
    for _ in range(MAX_BLOCKS):
        if pos + 4 > len(data):
            raise ImageError(TRUNCATED.format("JPEG", len(data)))
        marker = data[pos + 1]
        if data[pos] != 0xFF or marker == 0xD9:
            raise ImageError(CORRUPT.format("JPEG", pos))
        if marker == 0xDA:  # start of scan: entropy-coded data follows
            break
        if marker == 0xFF or 0xD0 <= marker <= 0xD8 or marker == 0x01:  # fill byte, markers without a segment
            pos += 1 if marker == 0xFF else 2
            continue
        end = pos + 2 + _uint(data, pos + 2, 2)
        segment = data[pos + 4 : end]
        if marker in JPEG_SOF and size is None:
            size, components = (_uint(data, pos + 7, 2), _uint(data, pos + 5, 2)), _uint(data, pos + 9, 1)
        if marker == 0xE1 and segment.startswith(EXIF_PREFIX) and exif is None:  # PIL reads the first Exif
            exif = segment[len(EXIF_PREFIX) :]
        if marker == 0xE1 and segment.startswith(XMP_PREFIX):  # ... and the last XMP packet
            xmp = segment[len(XMP_PREFIX) :]
        pos = end
    else:
        raise ImageError(TOO_MANY_BLOCKS.format("JPEG", MAX_BLOCKS))
    if size is None:
        raise ImageError(CORRUPT.format("JPEG", pos))
    if components == 4:
        raise ImageError(UNSUPPORTED_CMYK)
    if data.find(b"\xff\xd9", pos) < 0:  # no end of image marker: truncated entropy-coded data
        raise ImageError(TRUNCATED.format("JPEG", len(data)))
    present, orientation = _exif_orientation(exif or b"")
    if not present:  # PIL falls back to XMP only when EXIF has no orientation tag
        match = re.search(re.escape(XMP_ORIENTATION) + rb'(="|>)([0-9])', xmp)
        orientation = int(match[2]) if match else 0
    return (*size, 1, size[0] * size[1], orientation)


def _png_header(data):
    if len(data) < 33:
        raise ImageError(TRUNCATED.format("PNG", len(data)))
    width, height = _uint(data, 16, 4), _uint(data, 20, 4)
    if data[12:16] != b"IHDR" or max(width, height) >= 1 << 31:
        raise ImageError(CORRUPT.format("PNG", 12))
    pos, exif = 8, b""
    for _ in range(MAX_BLOCKS):
        end = pos + 12 + _uint(data, pos, 4)
        if end > len(data):  # also without IEND, which PIL accepts and TF's decoder does not
            raise ImageError(TRUNCATED.format("PNG", len(data)))
        kind = data[pos + 4 : pos + 8]
        if kind == b"eXIf":  # PIL reads it before or after the image data; the last one wins
            exif = data[pos + 8 : end - 4]
            exif = exif[len(EXIF_PREFIX) :] if exif.startswith(EXIF_PREFIX) else exif
        if kind == b"IEND":
            return width, height, 1, width * height, _exif_orientation(exif)[1]
        if kind == b"IDAT":  # encoders write equal IDAT chunks: up to 63 more are skipped per step
            step, run = end - pos, 0
            while (
                run < 63
                and end + (run + 1) * step <= len(data)
                and data[end + run * step : end + run * step + 8] == data[pos : pos + 8]
            ):
                run += 1
            end += run * step
        pos = end
    raise ImageError(TOO_MANY_BLOCKS.format("PNG", MAX_BLOCKS))


def _color_table(flags):
    return 3 << (flags & 7) + 1 if flags & 0x80 else 0


def _gif_header(data):
    if len(data) < 13:
        raise ImageError(TRUNCATED.format("GIF", len(data)))
    screen = _uint(data, 6, 2, True), _uint(data, 8, 2, True)
    pos, frames, pixels, in_blocks = 13 + _color_table(data[10]), 0, 0, False
    for _ in range(MAX_BLOCKS):
        if pos >= len(data):
            if in_blocks or pos > len(data) or not frames:
                raise ImageError(TRUNCATED.format("GIF", len(data)))
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
            fits = (
                (left, top, width, height) == (0, 0, *screen)
                if not frames
                else left + width <= screen[0] and top + height <= screen[1]
            )
            if pos + 10 <= len(data) and not fits:
                raise ImageError(UNSUPPORTED_GIF.format(frames, width, height, left, top, *screen))
            frames, pixels = frames + 1, pixels + width * height
            pos, in_blocks = pos + 11 + _color_table(_uint(data, pos + 9, 1)), True
        else:
            raise ImageError(CORRUPT.format("GIF", pos))
    else:
        raise ImageError(TOO_MANY_BLOCKS.format("GIF", MAX_BLOCKS))
    if not frames:
        raise ImageError(CORRUPT.format("GIF", pos))
    return (*screen, frames, pixels, 1)


def _bmp_header(data):
    if len(data) < 54:
        raise ImageError(TRUNCATED.format("BMP", len(data)))
    header, bits, compression = _uint(data, 14, 4, True), _uint(data, 28, 2, True), _uint(data, 30, 4, True)
    width, height = (int.from_bytes(data[k : k + 4], "little", signed=True) for k in (18, 22))
    masks = tuple(_uint(data, 54 + 4 * k, 4, True) for k in range(3))
    if header < 40 or not (
        compression == 0 and bits in (8, 24, 32) or compression == 3 and bits == 32 and masks == BMP_MASKS
    ):
        raise ImageError(UNSUPPORTED_BMP.format(bits, compression, header))
    if _uint(data, 10, 4, True) + (width * bits + 31) // 32 * 4 * abs(height) > len(data):
        raise ImageError(TRUNCATED.format("BMP", len(data)))
    return width, abs(height), 1, width * abs(height), 1


def read_image_header(data, max_pixels=MAX_PIXELS):
    """Format, size and EXIF orientation of encoded image bytes, read as the serving graph reads
    them; raises ``ImageError`` with the graph's message for data the graph refuses before
    decoding, including images of more than ``max_pixels`` decoded pixels."""
    kind = next((k for k, magic in MAGIC if data.startswith(magic)), None)
    if kind is None:
        raise ImageError(NOT_AN_IMAGE.format(len(data), data[:8].hex(" ")))
    width, height, frames, pixels, orientation = (_jpeg_header, _png_header, _gif_header, _bmp_header)[kind](data)
    if width <= 0 or height <= 0:
        raise ImageError(ZERO_SIZE.format(FORMATS[kind], width, height))
    if pixels > max_pixels:
        frames_text = f", {frames} frames" if frames > 1 else ""
        raise ImageError(TOO_LARGE.format(width, height, frames_text, pixels, max_pixels))
    return ImageHeader(FORMATS[kind], width, height, frames, pixels, orientation if 1 <= orientation <= 8 else 1)


def exif_transpose(image, orientation):
    """PIL image turned upright for an EXIF orientation, as ``ImageOps.exif_transpose`` does."""
    for applies, method in (
        (TRANSPOSED, Image.Transpose.TRANSPOSE),
        (FLIP_ROWS, Image.Transpose.FLIP_TOP_BOTTOM),
        (FLIP_COLUMNS, Image.Transpose.FLIP_LEFT_RIGHT),
    ):
        if orientation in applies:
            image = image.transpose(method)
    return image


def read_file(path):
    """The bytes of an image file; a FileError (MissingFileError when missing) naming it with the
    system's reason when it cannot be read (missing, a folder, a symbolic link loop, no permission)."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise MissingFileError(f"image file not found: {path}") from None
    except OSError as e:
        raise FileError(f"cannot read {path}: {e.strerror}") from None


def _png_as_libpng_reads(data):
    """PNG bytes as the serving graph's decoder (libpng) reads them: a critical chunk whose CRC
    does not match makes the file unreadable; an ancillary one is dropped. PIL checks no CRC of
    the image data and refuses a file for a bad text chunk, so without this the `.keras` and
    TFLite paths would answer otherwise than the SavedModel about the same damaged file."""
    pos, kept = 8, [data[:8]]
    while pos + 12 <= len(data):
        end = pos + 12 + _uint(data, pos, 4)
        chunk = data[pos:end]
        if zlib.crc32(chunk[4:-4]) != _uint(chunk, len(chunk) - 4, 4):
            if not chunk[4] & 0x20:  # bit 5 of the first letter: clear (upper case) for critical chunks
                name = chunk[4:8].decode("latin-1")
                raise ImageError(f"{UNDECODABLE.format('PNG')} (chunk {name} at byte {pos} fails its CRC check)")
            chunk = b""
        kept.append(chunk)
        if data[pos + 4 : pos + 8] == b"IEND":
            break
        pos = end
    return b"".join(kept)


def load_image(path, max_pixels=MAX_PIXELS):
    """Open an image file as transformers' ``load_image`` does (PIL, EXIF transpose, RGB), within
    the serving graph's rules: files it refuses (other formats, more than ``max_pixels`` decoded
    pixels, truncated data, ...) raise ``ImageError``, and the orientation is the EXIF tag it reads.
    """
    path = os.fspath(path)
    data = read_file(path)
    try:
        header = read_image_header(data, max_pixels)
        data = _png_as_libpng_reads(data) if header.format == "PNG" else data
    except ValueError as err:
        raise ImageError(f"cannot read {path} as an image: {err}") from None
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()  # PIL decodes lazily: truncated data fails here
            return exif_transpose(image, header.orientation).convert("RGB")
    except (OSError, SyntaxError, ValueError) as err:
        raise ImageError(f"cannot read {path} as an image: {UNDECODABLE.format(header.format)} ({err})") from None
