"""TensorFlow decoder of encoded images (JPEG, PNG, GIF, BMP), for serving graphs.

Encoded images are read first by their header, with the rules of
``tfbit.preprocessing.decode.read_image_header`` (the Python loader ``load_image`` applies the same rules;
the constants and messages are that module's), then decoded with core TF ops only (no
``py_function``) to the pixels of transformers' path loader (PIL, ``ImageOps.exif_transpose``,
``convert("RGB")``). Measured with Pillow 13 and TF 2.21:

* JPEG: TF's accurate IDCT is bit-identical to Pillow's (baseline, progressive, 4:4:4 / 4:2:2 /
  4:2:0, grayscale). TF's decoders ignore EXIF; the graph reads the orientation (all 8 values) as
  PIL does from the first APP1 Exif segment (TIFF header II/MM, IFD0 tag 0x0112, its first value;
  SHORT, LONG or signed types stored in the entry, which is what cameras write), or, without such
  a tag, from the last XMP packet's ``tiff:Orientation``. CMYK JPEGs (4 components) are refused:
  TF converts them to RGB as trunc(c * k / 255) where PIL rounds, 1 level apart on ~30% of a
  photo's pixels (2 after resizing), and TF cannot return the CMYK values themselves.
* PNG: identical for 8-bit gray / gray+alpha / RGB / RGBA, palettes, 1-4-bit and 16-bit RGB(A) or
  gray+alpha (both keep the high byte); alpha is dropped. 16-bit grayscale differs: PIL opens it as
  ``I;16`` and ``convert("RGB")`` saturates, min(v, 255), where TF keeps the high byte; the graph
  decodes uint16 and saturates too. The orientation comes from the last eXIf chunk, before or after
  the image data, as in PIL; PIL also reads EXIF and XMP from text chunks ("Raw profile type exif",
  "XML:com.adobe.xmp"), which both tfbit paths ignore. PIL reads a PNG without its IEND chunk, TF's
  decoder does not: refused.
* GIF: the first frame, identical once the transparency flag of that frame is cleared in the bytes
  (TF paints transparent pixels black, PIL gives their palette colour). TF's decoder decodes every
  frame, sizing its canvas by the frames where PIL uses the logical screen: GIFs whose first frame
  does not fill the screen, or with a frame outside it, are refused, and all frames count towards
  ``max_pixels``. No orientation (PIL reads an XMP one from GIFs; tfbit does not).
* BMP: uncompressed 24-bit, 32-bit (BI_RGB, or BI_BITFIELDS in BGR order) and 8-bit palette images
  (TF's decoder returns the indices: the graph applies the palette, black past its end as in PIL),
  top-down or not, with bytes after the pixels (TF refuses those: they are cut off). 1/4/16-bit, RLE,
  other bit fields and OS/2 headers are refused.
* Other formats (WebP, TIFF, ...): refused, "not JPEG, PNG, GIF or BMP data".
* Truncated files: refused by the header rules (a JPEG without its end-of-image marker, a PNG
  without IEND, a GIF cut inside its blocks, a BMP shorter than its pixels), never filled with grey.
  TF's decoders refuse them too, without naming the image; PIL refuses all but a PNG without IEND
  and a GIF missing only its last block terminator.
* Decoded size: at most ``max_pixels`` (default ``decode.MAX_PIXELS`` = 2**26, where PIL
  alone allows 89.5 M), read from the header (SOF, IHDR, GIF image descriptors, BMP header).

A batch (``read_headers``, which ``tfbit.preprocessing.tf_processor.preprocess_image_bytes`` calls) fails as a
whole, with an ``InvalidArgumentError`` naming the first bad image by its 0-based index, bytes shown
in hex: "assertion failed: [tfbit: image 3 of the batch: could not decode image: not JPEG, PNG, GIF
or BMP data (12 bytes: 68 65 6c 6c 6f 2c 20 77)]". Damage inside compressed pixel data passes the
header rules; TF's decoder then fails the batch with its own message ("Invalid PNG data"), which
cannot name the image: a graph cannot catch an op's error (tf.data's ignore_errors could, but costs
20-250 ms per request), and PIL refuses such files as well.
"""

from __future__ import annotations

import tensorflow as tf

from tfbit.preprocessing import decode as spec

_RUNNING, _DONE, _TRUNCATED, _CORRUPT, _TOO_MANY, _UNSUPPORTED = range(6)  # header walks
_HEX = [f"{i:02x}" for i in range(256)]
_BYTES = [bytes([i]) for i in range(256)]
# An image's header: what is wrong with it ("" if nothing), index in FORMATS, sizes, EXIF
# orientation, a GIF's first graphic control extension (the flags byte, or -1) and the RGB colour
# that transformers turns white (or -1s).
_HEADER_SPEC = {
    "problem": tf.TensorSpec([], tf.string),
    "format": tf.TensorSpec([], tf.int32),
    **{k: tf.TensorSpec([], tf.int64) for k in ("width", "height", "frames", "pixels", "orientation", "gif_control")},
    "transparent": tf.TensorSpec([3], tf.int64),
}


def _format(template, *values):
    """``template.format(*values)`` on tensors (tf.strings.format would quote strings)."""
    parts = template.split("{}")
    values = [tf.convert_to_tensor(v) for v in values]
    values = [v if v.dtype == tf.string else tf.strings.as_string(v) for v in values]
    return tf.strings.join([x for pair in zip(parts, values + [""]) for x in pair])


def _read(u, pos, size=1, little=False):
    """Unsigned ``size``-byte integers at positions ``pos`` (int64, any shape) of the uint8 vector
    ``u``; bytes past either end read as 0, so headers can be parsed before their length is known."""
    index = tf.cast(pos, tf.int64)[..., None] + tf.range(size, dtype=tf.int64)
    n = tf.size(u, tf.int64)
    byte = tf.gather(u, tf.clip_by_value(index, 0, tf.maximum(n - 1, 0)))
    byte = tf.where((index >= 0) & (index < n), tf.cast(byte, tf.int64), 0)
    shift = tf.where(little, tf.range(size, dtype=tf.int64), tf.range(size - 1, -1, -1, dtype=tf.int64))
    return tf.reduce_sum(tf.bitwise.left_shift(byte, shift * 8), -1)


def _substr(data, pos, length):
    return tf.strings.substr(data, tf.cast(pos, tf.int64), tf.cast(length, tf.int64))


def _starts_with(u, pos, prefix, end):
    """Whether the bytes at ``pos`` (before ``end``) are ``prefix``."""
    expected = tf.constant(list(prefix), tf.int64)
    found = _read(u, pos + tf.range(len(prefix), dtype=tf.int64))
    return (pos + len(prefix) <= end) & tf.reduce_all(found == expected)


def _is_in(x, values):
    return tf.reduce_any(tf.equal(x[..., None], tf.constant(values, x.dtype)), -1)


def _walk(body, state):
    """Run ``body(state) -> (status, state)`` until it leaves _RUNNING, at most spec.MAX_BLOCKS
    times (then _TOO_MANY); returns (status, state)."""

    def step(i, status, state):
        status, state = body(state)
        return i + 1, tf.where((status == _RUNNING) & (i + 1 >= spec.MAX_BLOCKS), _TOO_MANY, status), state

    _, status, state = tf.while_loop(
        lambda i, status, state: status == _RUNNING, step, [tf.constant(0), tf.constant(_RUNNING), state]
    )
    return status, state


def _walk_problem(name, status, n, pos):
    """The message of a walk's final status (its own for _UNSUPPORTED)."""
    return tf.gather(
        tf.stack(
            [
                tf.constant(""),
                tf.constant(""),
                _format(spec.TRUNCATED, name, n),
                _format(spec.CORRUPT, name, pos),
                tf.constant(spec.TOO_MANY_BLOCKS.format(name, spec.MAX_BLOCKS)),
                tf.constant(""),
            ]
        ),
        status,
    )


def _exif_orientation(u, start, end):
    """(IFD0 has tag 0x0112, its first value or 0) of the TIFF structure in u[start:end], as
    decode._exif_orientation; reads the IFD's entries at once rather than one by one."""
    length = end - start
    little = (_read(u, start) == 0x49) & (_read(u, start + 1) == 0x49)
    big = (_read(u, start) == 0x4D) & (_read(u, start + 1) == 0x4D)
    ifd = _read(u, start + 4, 4, little)
    valid = (length >= 8) & (little | big) & (_read(u, start + 2, 2, little) == 42) & (ifd + 2 <= length)
    n_entries = tf.where(valid, tf.minimum(_read(u, start + ifd, 2, little), (length - ifd - 2) // 12), 0)
    entries = start + ifd + 2 + 12 * tf.range(n_entries)
    hits = _read(u, entries, 2, little) == 0x0112
    entry = tf.concat([tf.boolean_mask(entries, hits), [-1]], 0)[0]  # PIL keeps the first one
    kind, count = _read(u, entry + 2, 2, little), _read(u, entry + 4, 4, little)
    value = tf.constant(0, tf.int64)
    for size in (1, 2, 4):
        kinds = [k for k, s in spec.EXIF_INTEGERS.items() if s == size]
        inline = _is_in(kind, kinds) & (count >= 1) & (count <= 4 // size)
        value = tf.where(inline, _read(u, entry + 8, size, little), value)
    return tf.reduce_any(hits), value


def _xmp_orientation(data, start, end):
    """The digit after the first ``tiff:Orientation="`` or ``tiff:Orientation>`` in data[start:end]
    (PIL's regular expression), or 0."""
    xmp = _substr(data, start, end - start)
    heads = tf.strings.substr(tf.strings.split(xmp, sep=spec.XMP_ORIENTATION.decode())[1:], 0, 3)
    head = tf.cast(tf.io.decode_raw(heads, tf.uint8, fixed_length=3), tf.int64)
    digit = lambda c: (c >= ord("0")) & (c <= ord("9"))
    quoted = (head[:, 0] == ord("=")) & (head[:, 1] == ord('"')) & digit(head[:, 2])
    element = (head[:, 0] == ord(">")) & digit(head[:, 1])
    values = tf.boolean_mask(tf.where(quoted, head[:, 2], head[:, 1]) - ord("0"), quoted | element)
    return tf.concat([values, [0]], 0)[0]


def _color_table(flags):
    """Bytes of the GIF colour table announced by a flags byte."""
    size = 3 * tf.bitwise.left_shift(tf.constant(1, tf.int64), tf.bitwise.bitwise_and(flags, 7) + 1)
    return tf.where(tf.bitwise.bitwise_and(flags, 0x80) > 0, size, 0)


def _header(problem, width=0, height=0, frames=1, pixels=None, orientation=0, gif_control=-1, transparent=-1):
    width, height, frames = (tf.cast(v, tf.int64) for v in (width, height, frames))
    return {
        "problem": tf.convert_to_tensor(problem, tf.string),
        "width": width,
        "height": height,
        "frames": frames,
        "pixels": width * height if pixels is None else pixels,
        "orientation": tf.cast(orientation, tf.int64),
        "gif_control": tf.cast(gif_control, tf.int64),
        "transparent": tf.broadcast_to(tf.cast(transparent, tf.int64), [3]),
    }


def _jpeg_header(data, u):
    n = tf.size(u, tf.int64)

    def body(state):
        pos, width, height, components, exif_start, exif_end, xmp_start, xmp_end = state
        marker, end = _read(u, pos + 1), pos + 2 + _read(u, pos + 2, 2)
        status = tf.where(
            pos + 4 > n,
            _TRUNCATED,
            tf.where((_read(u, pos) != 0xFF) | (marker == 0xD9), _CORRUPT, tf.where(marker == 0xDA, _DONE, _RUNNING)),
        )  # SOS: entropy-coded data
        running = status == _RUNNING
        bare = (marker == 0xFF) | ((marker >= 0xD0) & (marker <= 0xD8)) | (marker == 0x01)  # no segment
        segment = running & ~bare
        sof = segment & _is_in(marker, spec.JPEG_SOF) & (width < 0)
        exif = (
            segment & (marker == 0xE1) & _starts_with(u, pos + 4, spec.EXIF_PREFIX, end) & (exif_start < 0)
        )  # PIL reads the first Exif segment ...
        xmp = segment & (marker == 0xE1) & _starts_with(u, pos + 4, spec.XMP_PREFIX, end)  # ... the last XMP
        next_pos = tf.where(marker == 0xFF, pos + 1, tf.where(bare, pos + 2, end))
        return status, (
            tf.where(running, next_pos, pos),
            tf.where(sof, _read(u, pos + 7, 2), width),
            tf.where(sof, _read(u, pos + 5, 2), height),
            tf.where(sof, _read(u, pos + 9), components),
            tf.where(exif, pos + 4 + len(spec.EXIF_PREFIX), exif_start),
            tf.where(exif, end, exif_end),
            tf.where(xmp, pos + 4 + len(spec.XMP_PREFIX), xmp_start),
            tf.where(xmp, end, xmp_end),
        )

    status, (pos, width, height, components, exif_start, exif_end, xmp_start, xmp_end) = _walk(
        body, (tf.constant(2, tf.int64),) + (tf.constant(-1, tf.int64),) * 7
    )
    scan = u[pos:]
    # Truncated entropy-coded data fails in both decoders; its end of image marker is missing.
    end_of_image = tf.reduce_any((scan[:-1] == 0xFF) & (scan[1:] == 0xD9))
    done = status == _DONE
    problem = tf.where(
        done & (width < 0),
        _format(spec.CORRUPT, "JPEG", pos),
        tf.where(
            done & (components == 4),
            spec.UNSUPPORTED_CMYK,
            tf.where(done & ~end_of_image, _format(spec.TRUNCATED, "JPEG", n), _walk_problem("JPEG", status, n, pos)),
        ),
    )
    present, orientation = _exif_orientation(u, exif_start, exif_end)
    orientation = tf.cond(
        ~present & (xmp_start >= 0), lambda: _xmp_orientation(data, xmp_start, xmp_end), lambda: orientation
    )  # PIL reads XMP only when EXIF has no orientation tag
    return _header(problem, width, height, orientation=orientation)


def _png_header(data, u):
    n = tf.size(u, tf.int64)
    width, height, depth, color_type = _read(u, 16, 4), _read(u, 20, 4), _read(u, 24), _read(u, 25)
    chunk = lambda name: int.from_bytes(name, "big")

    def body(state):
        pos, found = state[0], state[1:]
        end, kind = pos + 12 + _read(u, pos, 4), _read(u, pos + 4, 4)
        # also without IEND, which PIL accepts and TF's decoder does not
        status = tf.where(end > n, _TRUNCATED, tf.where(kind == chunk(b"IEND"), _DONE, _RUNNING))
        # (start, end) of the eXIf, PLTE and tRNS data; PIL reads eXIf anywhere, the last ones win
        found = [
            tf.where((end <= n) & (kind == chunk(name)), tf.stack([pos + 8, end - 4]), where)
            for name, where in zip((b"eXIf", b"PLTE", b"tRNS"), found)
        ]
        # encoders write equal IDAT chunks: up to 63 more are skipped per step
        step = end - pos
        later = end + step * tf.range(63, dtype=tf.int64)
        same = (later + step <= n) & (_read(u, later, 4) == _read(u, pos, 4)) & (_read(u, later + 4, 4) == kind)
        run = tf.where(kind == chunk(b"IDAT"), tf.reduce_sum(tf.math.cumprod(tf.cast(same, tf.int64))), 0)
        return status, (tf.where(status == _RUNNING, end + run * step, pos), *found)

    none = tf.constant([-1, -1], tf.int64)
    status, (pos, exif, palette, trns) = _walk(body, (tf.constant(8, tf.int64), none, none, none))
    (exif_start, exif_end), palette, (trns, trns_end) = tf.unstack(exif), palette[0], tf.unstack(trns)
    exif_start += len(spec.EXIF_PREFIX) * tf.cast(_starts_with(u, exif_start, spec.EXIF_PREFIX, exif_end), tf.int64)
    corrupt = (_read(u, 12, 4) != chunk(b"IHDR")) | (tf.maximum(width, height) >= 2**31)
    problem = tf.where(
        n < 33,
        _format(spec.TRUNCATED, "PNG", n),
        tf.where(corrupt, spec.CORRUPT.format("PNG", 12), _walk_problem("PNG", status, n, pos)),
    )
    # The colour PIL's convert("RGB") keeps as info["transparency"] (see tf_processor._whiten): a palette's one
    # fully transparent entry, or the tRNS colour of 2- to 8-bit gray and of RGB (its low bytes).
    alpha = _read(u, trns + tf.range(tf.maximum(trns_end - trns, 0)))
    single = (tf.reduce_sum(tf.cast(alpha == 0, tf.int64)) == 1) & tf.reduce_all((alpha == 0) | (alpha == 255))
    entry = palette + 3 * tf.concat([tf.where(alpha == 0)[:, 0], [0]], 0)[0]
    gray, rgb = _read(u, trns + tf.zeros(3, tf.int64), 2), _read(u, trns + 2 * tf.range(3, dtype=tf.int64), 2)
    transparent = tf.where(
        (color_type == 3) & single,
        _read(u, entry + tf.range(3, dtype=tf.int64)),
        tf.where(
            (color_type == 0) & _is_in(depth, (2, 4, 8)) & (trns_end - trns >= 2),
            gray % 256,
            tf.where((color_type == 2) & (trns_end - trns >= 6), rgb % 256, -1),
        ),
    )
    return _header(
        problem, width, height, orientation=_exif_orientation(u, exif_start, exif_end)[1], transparent=transparent
    )


def _gif_header(data, u):
    n = tf.size(u, tf.int64)
    screen_width, screen_height = _read(u, 6, 2, True), _read(u, 8, 2, True)
    zero, none = tf.constant(0, tf.int64), tf.constant(-1, tf.int64)
    status, (pos, _, frames, pixels, control, first) = _walk(
        _gif_step(u, n, screen_width, screen_height),
        (13 + _color_table(_read(u, 10)), tf.constant(False), zero, zero, none, none),
    )
    unsupported = _format(
        spec.UNSUPPORTED_GIF, frames, *(_read(u, pos + k, 2, True) for k in (5, 7, 1, 3)), screen_width, screen_height
    )
    problem = tf.where(
        n < 13,
        _format(spec.TRUNCATED, "GIF", n),
        tf.where(
            status == _UNSUPPORTED,
            unsupported,
            tf.where(
                (status == _DONE) & (frames == 0),
                _format(spec.CORRUPT, "GIF", pos),
                _walk_problem("GIF", status, n, pos),
            ),
        ),
    )
    transparent = _gif_transparent_colour(u, control, first)
    return _header(problem, screen_width, screen_height, frames, pixels, gif_control=control, transparent=transparent)


def _gif_step(u, n, screen_width, screen_height):
    """One step of `_walk` over a GIF's blocks; its state is (position, inside data sub-blocks,
    frames, pixels, the first frame's graphic control extension, its image descriptor)."""
    runs = 256 * tf.range(64, dtype=tf.int64)

    def body(state):
        pos, in_blocks, frames, pixels, control, first = state
        at_end, block = pos >= n, _read(u, pos)
        # a sub-block (or an extension's first one) followed by the terminator is read in one step
        last = (block > 0) & (_read(u, pos + 1 + block) == 0)
        size = _read(u, pos + 2)
        whole = (size > 0) & (_read(u, pos + 3 + size) == 0)
        # Data sub-blocks: encoders write 255-byte ones, skipped up to 64 per step.
        full = (pos + runs < n) & (_read(u, pos + runs) == 255)
        run = tf.reduce_sum(tf.math.cumprod(tf.cast(full, tf.int64)))
        extension, image = ~in_blocks & (block == 0x21), ~in_blocks & (block == 0x2C)
        left, top, width, height = (_read(u, pos + k, 2, True) for k in (1, 3, 5, 7))
        # TF's decoder sizes its canvas by the frames, PIL by the screen (and fills it differently)
        fits = tf.where(
            frames == 0,
            (left == 0) & (top == 0) & (width == screen_width) & (height == screen_height),
            (left + width <= screen_width) & (top + height <= screen_height),
        )
        status = tf.where(
            at_end,
            tf.where(in_blocks | (pos > n) | (frames == 0), _TRUNCATED, _DONE),  # no trailer is fine
            tf.where(
                in_blocks | extension,
                _RUNNING,
                tf.where(
                    block == 0x3B,
                    _DONE,
                    tf.where(image, tf.where((pos + 10 <= n) & ~fits, _UNSUPPORTED, _RUNNING), _CORRUPT),
                ),
            ),
        )
        running = status == _RUNNING
        # the first frame's graphic control extension (its transparency) and image descriptor
        is_control = running & extension & (_read(u, pos + 1) == 0xF9) & (_read(u, pos + 2) == 4) & (frames == 0)
        is_first = running & image & (frames == 0)
        image &= running
        next_pos = tf.where(
            in_blocks,
            tf.where(run > 0, pos + 256 * run, pos + 1 + block + tf.cast(last, tf.int64)),
            tf.where(extension, tf.where(whole, pos + 4 + size, pos + 2), pos + 11 + _color_table(_read(u, pos + 9))),
        )
        next_in_blocks = tf.where(in_blocks, (run > 0) | ((block > 0) & ~last), ~(extension & whole))
        return status, (
            tf.where(running, next_pos, pos),
            tf.where(running, next_in_blocks, in_blocks),
            frames + tf.cast(image, tf.int64),
            pixels + tf.where(image, width * height, 0),
            tf.where(is_control, pos + 3, control),
            tf.where(is_first, pos, first),
        )

    return body


def _gif_transparent_colour(u, control, first):
    """The first frame's transparent colour (RGB), or -1: PIL keeps the palette colour of the
    transparent index as info["transparency"] (see tf_processor._whiten)."""
    none = tf.constant(-1, tf.int64)
    table = tf.where(
        _read(u, first + 9) >= 0x80,
        first + 10,  # local colour table, else global
        tf.where(_read(u, 10) >= 0x80, tf.constant(13, tf.int64), none),
    )
    colour = _read(u, table + 3 * _read(u, control + 3) + tf.range(3, dtype=tf.int64))
    return tf.where((control >= 0) & (first >= 0) & (_read(u, control) % 2 == 1) & (table >= 0), colour, -1)


def _bmp_fields(u):
    """(pixel data offset, header size, bits per pixel, compression, width, signed height)."""
    signed = lambda v: tf.where(v >= 2**31, v - 2**32, v)
    return (
        _read(u, 10, 4, True),
        _read(u, 14, 4, True),
        _read(u, 28, 2, True),
        _read(u, 30, 4, True),
        signed(_read(u, 18, 4, True)),
        signed(_read(u, 22, 4, True)),
    )


def _bmp_size(offset, bits, width, height):
    return offset + (width * bits + 31) // 32 * 4 * tf.abs(height)


def _bmp_header(data, u):
    n = tf.size(u, tf.int64)
    offset, header, bits, compression, width, height = _bmp_fields(u)
    masks = _read(u, 54 + 4 * tf.range(3, dtype=tf.int64), 4, True)
    supported = (header >= 40) & (
        ((compression == 0) & _is_in(bits, (8, 24, 32)))
        | ((compression == 3) & (bits == 32) & tf.reduce_all(masks == spec.BMP_MASKS))
    )
    truncated = _format(spec.TRUNCATED, "BMP", n)
    problem = tf.where(
        n < 54,
        truncated,
        tf.where(
            ~supported,
            _format(spec.UNSUPPORTED_BMP, bits, compression, header),
            tf.where(_bmp_size(offset, bits, width, height) > n, truncated, ""),
        ),
    )
    return _header(problem, width, tf.abs(height), orientation=1)


def _not_an_image(data, u):
    head = tf.strings.reduce_join(tf.gather(_HEX, tf.cast(u[:8], tf.int32)), separator=" ")
    return _header(_format(spec.NOT_AN_IMAGE, tf.size(u), head))


def _inspect(data, max_pixels):
    """What ``decode.read_image_header`` reads and what decoding needs, as tensors (see _HEADER_SPEC)."""
    kind = tf.constant(len(spec.FORMATS))  # the last branch: not an image
    for k, magic in spec.MAGIC:
        kind = tf.where(tf.strings.substr(data, 0, len(magic)) == magic, k, kind)
    u = tf.io.decode_raw(data, tf.uint8)
    branches = [_jpeg_header, _png_header, _gif_header, _bmp_header, _not_an_image]
    h = tf.switch_case(kind, [lambda f=f: f(data, u) for f in branches])
    name = tf.gather(spec.FORMATS, tf.minimum(kind, len(spec.FORMATS) - 1))
    frames = tf.where(h["frames"] > 1, _format(", {} frames", h["frames"]), "")
    problem = tf.where(
        (h["problem"] == "") & ((h["width"] <= 0) | (h["height"] <= 0)),
        _format(spec.ZERO_SIZE, name, h["width"], h["height"]),
        h["problem"],
    )
    max_pixels = tf.constant(max_pixels, tf.int64)
    problem = tf.where(
        (problem == "") & (h["pixels"] > max_pixels),
        _format(spec.TOO_LARGE, h["width"], h["height"], frames, h["pixels"], max_pixels),
        problem,
    )
    orientation = tf.where((h["orientation"] >= 1) & (h["orientation"] <= 8), h["orientation"], 1)
    return {**h, "problem": problem, "format": kind, "orientation": orientation}


def _decode_png(data):
    # 16-bit grayscale (IHDR bit depth 16, colour type 0): PIL's I;16 -> RGB saturates at 255
    # where TF's 8-bit decoding keeps the high byte.
    gray16 = tf.strings.substr(data, 24, 2) == b"\x10\x00"
    saturated = lambda: tf.cast(tf.minimum(tf.io.decode_png(data, 1, tf.uint16), 255), tf.uint8)
    return tf.cond(gray16, lambda: tf.tile(saturated(), [1, 1, 3]), lambda: tf.io.decode_png(data, 3))


def _decode_gif(data, control):
    def opaque():  # TF paints transparent pixels black, PIL gives them their palette colour
        flags = tf.io.decode_raw(_substr(data, control, 1), tf.uint8)[0]
        rest = _substr(data, control + 1, tf.cast(tf.strings.length(data), tf.int64) - control - 1)
        return tf.strings.join(
            [_substr(data, 0, control), tf.gather(_BYTES, tf.bitwise.bitwise_and(tf.cast(flags, tf.int32), 0xFE)), rest]
        )

    data = tf.cond(control >= 0, opaque, lambda: data)
    return tf.io.decode_image(data, channels=3, expand_animations=False)  # the first frame


def _decode_bmp(data):
    u = tf.io.decode_raw(tf.strings.substr(data, 0, 54), tf.uint8)
    offset, header, bits, _, width, height = _bmp_fields(u)
    # TF's decoder refuses bytes after the pixels (PIL reads them)
    image = tf.io.decode_bmp(_substr(data, 0, _bmp_size(offset, bits, width, height)))

    def palette():  # TF's decoder returns the indices of 8-bit BMPs
        colors = _read(u, 46, 4, True)
        colors = tf.where((colors == 0) | (colors > 256), tf.constant(256, tf.int64), colors)
        table = tf.io.decode_raw(_substr(data, 14 + header, 4 * colors), tf.uint8)
        table = tf.reshape(table, [-1, 4])[:, 2::-1]  # BGRX -> RGB; black past its end, as in PIL
        table = tf.pad(table, [[0, 256 - tf.shape(table)[0]], [0, 0]])
        return tf.gather(table, tf.cast(image[..., 0], tf.int32))

    return tf.cond(bits == 8, palette, lambda: image[..., :3])


def _orient(image, orientation):
    """Apply an EXIF orientation as PIL's ImageOps.exif_transpose does."""
    for applies, turn in (
        (spec.TRANSPOSED, lambda: tf.transpose(image, [1, 0, 2])),
        (spec.FLIP_ROWS, lambda: tf.reverse(image, [0])),
        (spec.FLIP_COLUMNS, lambda: tf.reverse(image, [1])),
    ):
        image = tf.cond(_is_in(orientation, applies), turn, lambda: image)
    return image


def decode(data, header):
    """Decode encoded bytes whose header (``_inspect``, ``read_headers``) has no problem into upright
    uint8 (H, W, 3)."""
    branches = [
        lambda: tf.io.decode_jpeg(data, channels=3, dct_method="INTEGER_ACCURATE"),
        lambda: _decode_png(data),
        lambda: _decode_gif(data, header["gif_control"]),
        lambda: _decode_bmp(data),
    ]
    image = tf.switch_case(header["format"], branches)
    image.set_shape([None, None, 3])
    return _orient(image, header["orientation"])


def decode_image_bytes(data, max_pixels=spec.MAX_PIXELS):
    """One encoded JPEG/PNG/GIF/BMP image (a tf.string scalar) -> upright uint8 (H, W, 3), decoded as
    ``tfbit.preprocessing.decode.load_image`` decodes files (see the module docstring).

    Data the header rules refuse, or images of more than ``max_pixels`` decoded pixels, raise
    ``InvalidArgumentError`` ("tfbit: could not decode image: ...") before anything is decoded.
    """
    data = tf.convert_to_tensor(data, tf.string)
    header = _inspect(data, max_pixels)
    check = tf.debugging.Assert(header["problem"] == "", [tf.strings.join(["tfbit: ", header["problem"]])])
    with tf.control_dependencies([check]):
        return decode(tf.identity(data), header)


def read_headers(data, max_pixels=spec.MAX_PIXELS):
    """Headers (see _HEADER_SPEC) of a batch of encoded images (tf.string, shape [N]), available once
    every one has passed the header rules; otherwise the batch fails with an ``InvalidArgumentError``
    naming the first bad image (see the module docstring)."""
    headers = tf.map_fn(lambda s: _inspect(s, max_pixels), data, fn_output_signature=_HEADER_SPEC)
    problems = tf.concat([headers["problem"], [""]], 0)
    first = tf.argmax(problems != "")  # the "" appended keeps it defined for an empty batch
    check = tf.debugging.Assert(
        problems[first] == "", [_format("tfbit: image {} of the batch: {}", first, problems[first])]
    )
    with tf.control_dependencies([check]):
        return tf.nest.map_structure(tf.identity, headers)
