"""Encoded images: the serving graph (tfbit.preprocessing.tf_decode, tfbit.preprocessing.tf_processor)
against the Python loader (tfbit.preprocessing.decode.load_image) and transformers' load_image.

Every file both paths accept decodes to the same pixels as transformers' load_image (PIL, EXIF
transpose, convert("RGB")); every file they refuse is refused by both, with the same message, the
graph naming the image's index in the batch. Files are written with PIL (and TF for 16-bit PNGs)
from scikit-image's photographs: resampling differences show on natural content, not on noise.
"""

import io
import json
import re
import struct
import subprocess
import sys
import textwrap
import zlib
from types import SimpleNamespace

import numpy as np
import PIL
import pytest
from PIL import Image

from tfbit.preprocessing.decode import MAX_PIXELS, load_image, read_image_header
from tfbit.preprocessing.processor import BitImageProcessor, pil_to_rgb

skdata = pytest.importorskip("skimage.data")
tf = pytest.importorskip("tensorflow")

# The graph resizes in BitImageProcessor's own fixed-point arithmetic (tfbit/preprocessing/tf_processor.py), so on
# the same decoded pixels only the float32 normalization may round differently.
PIXEL_TOL = 1e-6

CAT, COFFEE, ASTRONAUT, CAMERA = skdata.chelsea(), skdata.coffee(), skdata.astronaut(), skdata.camera()


@pytest.fixture(scope="module")
def graph():
    """The graph functions, each traced once for the module."""
    from tfbit.preprocessing import tf_decode, tf_processor

    batch = [tf.TensorSpec([None], tf.string)]
    processor = BitImageProcessor()
    return SimpleNamespace(
        ops=tf_processor,
        preprocess=tf.function(
            lambda s: tf_processor.preprocess_image_bytes(s, processor), input_signature=batch, autograph=False
        ),
        decode=tf.function(
            lambda s: tf_decode.decode_image_bytes(s),
            input_signature=[tf.TensorSpec([], tf.string)],
            autograph=False,
        ),
        headers=tf.function(
            lambda s: tf.map_fn(
                lambda x: tf_decode._inspect(x, MAX_PIXELS), s, fn_output_signature=tf_decode._HEADER_SPEC
            ),
            input_signature=batch,
            autograph=False,
        ),
    )


@pytest.fixture(scope="module")
def hf_load():
    return pytest.importorskip("transformers.image_utils").load_image


def _encode(image, fmt, **options):
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def _files(tmp_path, blobs):
    """name -> bytes  =>  name -> path of a file holding them."""
    paths = {}
    for i, (name, data) in enumerate(blobs.items()):
        paths[name] = tmp_path / f"{i}.img"
        paths[name].write_bytes(data)
    return paths


def _assert_preprocessed_close(graph, paths, preprocessed=None):
    """The serving graph on the bytes == the graph's array preprocessing of the pixels BitImageProcessor
    takes from load_image's PIL image (a transparency colour composited on white, as transformers does),
    and BitImageProcessor's result."""
    if preprocessed is None:
        preprocessed = graph.preprocess(tf.constant([p.read_bytes() for p in paths.values()])).numpy()
    processor = BitImageProcessor()
    for (name, path), pixels in zip(paths.items(), preprocessed):
        image = pil_to_rgb(load_image(path))
        # the same float32 arithmetic, traced or eager (a few ulps apart)
        np.testing.assert_allclose(
            pixels, graph.ops.preprocess_images(image, processor)[0], rtol=0, atol=1e-6, err_msg=name
        )
        np.testing.assert_allclose(pixels, processor(load_image(path))[0], rtol=0, atol=PIXEL_TOL, err_msg=name)


def _assert_same_pixels(graph, hf_load, paths):
    """load_image == transformers' load_image == the graph's decoding, exactly."""
    for name, path in paths.items():
        ours = np.asarray(load_image(path))
        np.testing.assert_array_equal(ours, np.asarray(hf_load(str(path))), err_msg=name)
        np.testing.assert_array_equal(graph.decode(path.read_bytes()).numpy(), ours, err_msg=name)


# ---- EXIF orientation ---------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_all_exif_orientations(graph, hf_load, tmp_path, fmt):
    blobs = {}
    for orientation in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = orientation
        blobs[orientation] = _encode(Image.fromarray(CAT), fmt, exif=exif)
    paths = _files(tmp_path, blobs)
    assert [read_image_header(data).orientation for data in blobs.values()] == list(range(1, 9))
    _assert_same_pixels(graph, hf_load, paths)
    pictures = {(x.shape, x.tobytes()) for x in (np.asarray(load_image(p)) for p in paths.values())}
    assert len(pictures) == 8
    _assert_preprocessed_close(graph, paths)


def _tiff(*entries, little=True):
    """A TIFF header and IFD0 holding (tag, type, count, 4-byte value field) entries."""
    order = "<" if little else ">"
    ifd = struct.pack(order + "H", len(entries)) + b"".join(
        struct.pack(order + "HHI", tag, kind, count) + value for tag, kind, count, value in entries
    )
    return (b"II*\x00" if little else b"MM\x00*") + struct.pack(order + "I", 8) + ifd + b"\x00" * 4


def _orientation(value, kind=3, count=1, little=True):
    packed = struct.pack(("<" if little else ">") + {1: "B", 3: "H", 4: "I"}[kind], value)
    return 0x0112, kind, count, packed.ljust(4, b"\x00")


def _app1(payload):
    return b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload


def _exif(*entries, little=True):
    return _app1(b"Exif\x00\x00" + _tiff(*entries, little=little))


def _xmp(text):
    return _app1(b"http://ns.adobe.com/xap/1.0/\x00" + text.encode())


def test_exif_and_xmp_variants(graph, hf_load, tmp_path):
    """JPEG metadata read as PIL reads it; the expected orientation is written out so that the
    comparison with transformers cannot pass by ignoring the metadata."""
    make_tag = (0x010F, 2, 4, b"Cam\x00")
    cases = {
        "big-endian EXIF": (6, [_exif(_orientation(6, little=False), little=False)]),
        "LONG value": (8, [_exif(_orientation(8, kind=4))]),
        "BYTE value: ignored": (1, [_exif(_orientation(3, kind=1))]),
        "two values: the first": (6, [_exif(_orientation(6, count=2))]),
        "value 9: ignored": (1, [_exif(_orientation(9))]),
        "first of two tags": (2, [_exif(_orientation(2), _orientation(7))]),
        "first EXIF segment": (3, [_exif(_orientation(3)), _exif(_orientation(6))]),
        "IFD cut short": (5, [_app1(b"Exif\x00\x00" + _tiff(_orientation(5), make_tag)[: 8 + 2 + 12 + 6])]),
        "XMP attribute": (6, [_xmp('<x:xmpmeta><rdf:Description tiff:Orientation="6"/></x:xmpmeta>')]),
        "XMP element": (8, [_xmp("<rdf:Description><tiff:Orientation>8</tiff:Orientation></rdf:Description>")]),
        "second XMP match": (5, [_xmp('tiff:Orientation tiff:Orientation="5"')]),
        "EXIF tag before XMP": (1, [_exif(_orientation(1)), _xmp('tiff:Orientation="6"')]),
        "XMP without EXIF tag": (5, [_exif(make_tag), _xmp('tiff:Orientation="5"')]),
        "last XMP packet": (2, [_xmp('tiff:Orientation="6"'), _xmp('tiff:Orientation="2"')]),
    }
    jpeg = _encode(Image.fromarray(CAT), "JPEG")
    blobs = {name: jpeg[:2] + b"".join(segments) + jpeg[2:] for name, (_, segments) in cases.items()}
    for name, data in blobs.items():
        assert read_image_header(data).orientation == cases[name][0], name
    if int(PIL.__version__.split(".")[0]) < 13:
        # Pillow 12 (what pip picks beside apache-beam) takes the last of duplicate tags, 13 the
        # first, as tfbit does: the one case where the reference depends on the Pillow release.
        assert Image.open(io.BytesIO(blobs.pop("first of two tags"))).getexif()[0x0112] == 7
    _assert_same_pixels(graph, hf_load, _files(tmp_path, blobs))


# ---- formats ------------------------------------------------------------------------------------


def _bmp(rows, width, height, bits, compression=0, palette=b"", colors=0, masks=b""):
    """An uncompressed BMP (40-byte header) of bottom-up rows already padded to 4 bytes."""
    offset = 14 + 40 + len(masks) + len(palette)
    header = struct.pack("<IiiHHIIiiII", 40, width, height, 1, bits, compression, len(rows), 2835, 2835, colors, 0)
    return b"BM" + struct.pack("<IHHI", offset + len(rows), 0, 0, offset) + header + masks + palette + rows


def _rechunked_png(png, size):
    """The PNG with its image data in IDAT chunks of ``size`` bytes."""
    pos, chunks, idat = 8, [], b""
    while pos < len(png):
        length, kind = struct.unpack(">I4s", png[pos : pos + 8])
        if kind == b"IDAT":
            idat += png[pos + 8 : pos + 8 + length]
        else:
            chunks.append((kind, png[pos + 8 : pos + 8 + length]))
        pos += 12 + length
    chunks[-1:-1] = [(b"IDAT", idat[i : i + size]) for i in range(0, len(idat), size)]
    return png[:8] + b"".join(
        struct.pack(">I", len(d)) + k + d + struct.pack(">I", zlib.crc32(k + d)) for k, d in chunks
    )


def _rows(pixels, row_bytes):
    return b"".join(row.tobytes().ljust(row_bytes, b"\x00") for row in pixels[::-1])


def _format_cases():
    cat_alpha = np.dstack([CAT, np.linspace(0, 255, CAT.shape[1]).astype(np.uint8)[None].repeat(CAT.shape[0], 0)])
    small = Image.fromarray(ASTRONAUT[::4, ::4]).convert("P")
    frames = [Image.fromarray(np.roll(ASTRONAUT[::4, ::4], 40 * k, 1)).convert("P") for k in range(3)]
    animated = io.BytesIO()
    frames[0].save(animated, "GIF", save_all=True, append_images=frames[1:], duration=100)
    thumbnails = [Image.fromarray(np.roll(CAT[::16, ::16], k, 1)).convert("P") for k in range(1000)]
    long_animation = io.BytesIO()
    thumbnails[0].save(long_animation, "GIF", save_all=True, append_images=thumbnails[1:])
    coffee_p = Image.fromarray(COFFEE).convert("P", colors=16)
    indices = np.asarray(coffee_p)[:200, :301].copy()
    indices[:50, :50] = 250  # past the end of the 16-colour palette: black in PIL
    palette = b"".join(bytes([b, g, r, 0]) for r, g, b in np.reshape(coffee_p.getpalette()[:48], (16, 3)))
    bgra = np.dstack([COFFEE[..., ::-1], np.full(COFFEE.shape[:2], 9, np.uint8)])
    top_down = _bmp(_rows(CAT[::-1, :, ::-1], (CAT.shape[1] * 3 + 3) // 4 * 4), CAT.shape[1], CAT.shape[0], 24)
    top_down = top_down[:22] + struct.pack("<i", -CAT.shape[0]) + top_down[26:]
    rgb16 = ASTRONAUT.astype(np.uint16) * 257 + np.arange(512, dtype=np.uint16)[None, :, None] % 200
    return {
        "JPEG 4:2:0": _encode(Image.fromarray(ASTRONAUT), "JPEG", quality=90),
        "JPEG 4:4:4 progressive": _encode(Image.fromarray(COFFEE), "JPEG", subsampling=0, progressive=True),
        "JPEG grayscale": _encode(Image.fromarray(CAMERA), "JPEG"),
        "JPEG with trailing bytes": _encode(Image.fromarray(CAT), "JPEG") + b"vendor trailer\xff\xd8",
        "PNG RGB": _encode(Image.fromarray(COFFEE), "PNG"),
        "PNG in 64-byte IDAT chunks": _rechunked_png(_encode(Image.fromarray(COFFEE), "PNG"), 64),
        "PNG RGBA (alpha dropped)": _encode(Image.fromarray(cat_alpha), "PNG"),
        "PNG LA": _encode(Image.fromarray(cat_alpha[..., [1, 3]]), "PNG"),
        "PNG palette": _encode(Image.fromarray(COFFEE).convert("P"), "PNG"),
        "PNG palette + tRNS": _encode(coffee_p, "PNG", transparency=int(np.asarray(coffee_p)[0, 0])),
        "PNG 4-bit palette + tRNS": _encode(coffee_p, "PNG", bits=4, transparency=int(np.asarray(coffee_p)[5, 0])),
        "PNG palette + alpha table": _encode(coffee_p, "PNG", transparency=bytes(range(0, 200, 10))),
        "PNG RGB + tRNS": _encode(Image.fromarray(COFFEE), "PNG", transparency=tuple(map(int, COFFEE[0, 0]))),
        "PNG gray + tRNS": _encode(Image.fromarray(CAMERA), "PNG", transparency=int(CAMERA[0, 0])),
        "PNG 1-bit": _encode(Image.fromarray(CAMERA).convert("1"), "PNG"),
        "PNG 16-bit gray (I;16)": _encode(Image.fromarray(CAMERA.astype(np.uint16) * 3), "PNG"),
        "PNG 16-bit RGB": tf.io.encode_png(rgb16).numpy(),
        "PNG 16-bit RGBA": tf.io.encode_png(np.dstack([rgb16, rgb16[..., :1]])).numpy(),
        "PNG 16-bit gray + alpha": tf.io.encode_png(rgb16[..., :2]).numpy(),
        "GIF": _encode(Image.fromarray(COFFEE).convert("P"), "GIF"),
        "GIF interlaced": _encode(Image.fromarray(CAT).convert("P"), "GIF", interlace=True),
        "GIF transparent first frame": _encode(small, "GIF", transparency=int(np.asarray(small)[0, 0])),
        "GIF animated": animated.getvalue(),
        "GIF of 1000 frames": long_animation.getvalue(),
        "BMP 24-bit": _encode(Image.fromarray(ASTRONAUT), "BMP"),
        "BMP 24-bit top-down": top_down,
        "BMP 8-bit palette": _encode(Image.fromarray(COFFEE).convert("P"), "BMP"),
        "BMP 8-bit gray": _encode(Image.fromarray(CAMERA), "BMP"),
        "BMP short palette, trailing bytes": _bmp(_rows(indices, 304), 301, 200, 8, palette=palette, colors=16)
        + b"\x00\x00",
        "BMP 32-bit": _bmp(_rows(bgra, 2400), 600, 400, 32),
        "BMP 32-bit BI_BITFIELDS": _bmp(
            _rows(bgra, 2400), 600, 400, 32, compression=3, masks=struct.pack("<III", 0xFF0000, 0xFF00, 0xFF)
        ),
    }


def test_formats_decode_as_transformers(graph, hf_load, tmp_path):
    blobs = _format_cases()
    gif = blobs["GIF transparent first frame"]
    pil = Image.open(io.BytesIO(gif))
    assert "transparency" in pil.info  # which TF's own decoding paints black:
    assert not np.array_equal(tf.io.decode_gif(gif)[0].numpy(), np.asarray(pil.convert("RGB")))
    assert Image.open(io.BytesIO(blobs["PNG 16-bit gray (I;16)"])).mode == "I;16"
    paths = _files(tmp_path, blobs)
    _assert_same_pixels(graph, hf_load, paths)
    whitened = [
        name
        for name, path in paths.items()
        if not np.array_equal(pil_to_rgb(load_image(path)), np.asarray(load_image(path)))
    ]
    assert whitened == [
        "PNG palette + tRNS",
        "PNG 4-bit palette + tRNS",
        "PNG RGB + tRNS",
        "PNG gray + tRNS",
        "GIF transparent first frame",
    ]
    _assert_preprocessed_close(graph, paths)


# ---- refusals -----------------------------------------------------------------------------------


def _gif_with_screen(gif, width, height):
    return gif[:6] + struct.pack("<HH", width, height) + gif[10:]


def _refused_cases():
    jpeg = _encode(Image.fromarray(CAT), "JPEG")
    progressive = _encode(Image.fromarray(CAT), "JPEG", progressive=True)
    png = _encode(Image.fromarray(CAT), "PNG")
    gif = _encode(Image.fromarray(CAT).convert("P"), "GIF")
    frames = [Image.fromarray(np.roll(CAT, 60 * k, 1)).convert("P") for k in range(3)]
    animated = io.BytesIO()
    frames[0].save(animated, "GIF", save_all=True, append_images=frames[1:])
    animated = animated.getvalue()
    last = animated.rindex(b"\x21\xf9\x04") + 8  # the last frame's descriptor, after its control extension
    bmp = _encode(Image.fromarray(CAT), "BMP")
    bmp8 = _encode(Image.fromarray(CAT).convert("P"), "BMP")
    os2 = b"BM" + struct.pack("<IHHI", 26 + 192, 0, 0, 26) + struct.pack("<IHHHH", 12, 8, 8, 1, 24) + bytes(192)
    huge = _encode(Image.new("1", (10000, 10000)), "PNG")  # 10000 x 10000 in 15 KB
    n = len
    return {
        "empty": (b"", "could not decode image: not JPEG, PNG, GIF or BMP data (0 bytes: )"),
        "text": (b"<html>404</html>", "not JPEG, PNG, GIF or BMP data (16 bytes: 3c 68 74 6d 6c 3e 34 30)"),
        "bytes that are not UTF-8": (b"\xff\xfe\x80\x00\n\xc3(", "(7 bytes: ff fe 80 00 0a c3 28)"),
        "WebP": (_encode(Image.fromarray(CAT), "WEBP"), "not JPEG, PNG, GIF or BMP data"),
        "TIFF": (_encode(Image.fromarray(CAT), "TIFF"), "not JPEG, PNG, GIF or BMP data"),
        "JPEG cut in its header": (jpeg[:300], "truncated JPEG data (300 bytes)"),
        "JPEG cut in its image data": (jpeg[: n(jpeg) // 2], f"truncated JPEG data ({n(jpeg) // 2} bytes)"),
        "JPEG without its end": (jpeg[:-2], f"truncated JPEG data ({n(jpeg) - 2} bytes)"),
        "progressive JPEG cut": (progressive[:-900], f"truncated JPEG data ({n(progressive) - 900} bytes)"),
        "JPEG without SOF": (jpeg[:2] + jpeg[jpeg.index(b"\xff\xda") :], "corrupt JPEG data at byte 2"),
        "JPEG CMYK": (
            _encode(Image.fromarray(np.dstack([255 - CAT, CAT.min(-1)]), "CMYK"), "JPEG"),
            "unsupported JPEG: CMYK (4 components), which the TF decoder converts to RGB differently",
        ),
        "JPEG of 5000 empty segments": (
            jpeg[:2] + b"\xff\xfe\x00\x02" * 5000 + jpeg[2:],
            "corrupt JPEG data: more than 4096 blocks",
        ),
        "PNG cut": (png[: n(png) // 2], f"truncated PNG data ({n(png) // 2} bytes)"),
        "PNG without IEND": (png[:-12], f"truncated PNG data ({n(png) - 12} bytes)"),
        "GIF cut": (gif[:-2], f"truncated GIF data ({n(gif) - 2} bytes)"),
        "GIF cut in frame 2": (animated[:-500], f"truncated GIF data ({n(animated) - 500} bytes)"),
        "GIF first frame smaller than the screen": (
            _gif_with_screen(gif, 460, 300),
            "unsupported GIF: frame 0 is 451 x 300 at (0, 0) on a 460 x 300 screen; the first frame must fill",
        ),
        "GIF frame outside the screen": (
            animated[: last + 1] + struct.pack("<H", 5) + animated[last + 3 :],
            "unsupported GIF: frame 2 is 451 x 300 at (5, 0) on a 451 x 300 screen",
        ),
        "BMP cut": (bmp[:-100], f"truncated BMP data ({n(bmp) - 100} bytes)"),
        "BMP 4-bit": (bmp8[:28] + b"\x04" + bmp8[29:], "unsupported BMP (4-bit, compression 0, 40-byte header)"),
        "BMP RLE8": (bmp8[:30] + b"\x01" + bmp8[31:], "unsupported BMP (8-bit, compression 1, 40-byte header)"),
        "BMP 16-bit": (bmp[:28] + b"\x10" + bmp[29:], "unsupported BMP (16-bit, compression 0, 40-byte header)"),
        "BMP 1-bit": (_encode(Image.fromarray(CAMERA).convert("1"), "BMP"), "unsupported BMP (1-bit,"),
        "BMP OS/2 header": (os2, "unsupported BMP (0-bit, compression 0, 12-byte header)"),
        "BMP bit fields in RGB order": (
            _bmp(b"\x00" * 8, 1, 2, 32, compression=3, masks=struct.pack("<III", 0xFF, 0xFF00, 0xFF0000)),
            "unsupported BMP (32-bit, compression 3, 40-byte header)",
        ),
        "PNG of 10000 x 10000 pixels": (
            huge,
            f"image too large: 10000 x 10000 pixels (100000000 pixels to decode), more than max_pixels={MAX_PIXELS}",
        ),
    }


def test_refused_by_both_with_the_same_message(graph, tmp_path):
    good = _encode(Image.fromarray(COFFEE), "JPEG")
    for name, (data, message) in _refused_cases().items():
        path = tmp_path / "image"
        path.write_bytes(data)
        with pytest.raises(ValueError, match=re.escape(message)) as python:
            load_image(path)
        text = str(python.value).removeprefix(f"cannot read {path} as an image: ")
        with pytest.raises(tf.errors.InvalidArgumentError) as served:
            graph.preprocess(tf.constant([good, good, data, good]))
        first = next(line for line in str(served.value).splitlines() if "tfbit" in line)
        assert f"assertion failed: [tfbit: image 2 of the batch: {text}]" in first, name


def test_max_pixels_argument(graph, tmp_path):
    """A bound of one's own, in both paths; a GIF counts every frame, as TF's decoder decodes them all."""
    bound = 100_000
    frames = [Image.fromarray(np.roll(CAT[::2, ::2], 30 * k, 1)).convert("P") for k in range(3)]  # 226 x 150
    animated = io.BytesIO()
    frames[0].save(animated, "GIF", save_all=True, append_images=frames[1:])
    cases = {
        "photo": (_encode(Image.fromarray(CAT), "JPEG"), "451 x 300 pixels (135300 pixels"),
        "animation": (animated.getvalue(), "226 x 150 pixels, 3 frames (101700 pixels"),
    }
    serve = tf.function(
        lambda s: graph.ops.preprocess_image_bytes(s, BitImageProcessor(), max_pixels=bound),
        input_signature=[tf.TensorSpec([None], tf.string)],
        autograph=False,
    )
    for name, (data, size) in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        load_image(path, max_pixels=2 * bound)
        message = f"image too large: {size} to decode), more than max_pixels={bound}"
        with pytest.raises(ValueError, match=re.escape(message)):
            load_image(path, max_pixels=bound)
        with pytest.raises(tf.errors.InvalidArgumentError, match=re.escape(f"image 0 of the batch: {message}")):
            serve(tf.constant([data]))


def test_corrupt_image_data_refused_by_both_decoders(graph, tmp_path):
    """Damage inside compressed pixel data passes the header rules: PIL's and TF's decoders refuse it,
    but TF's error comes from the decoder op and cannot name the image."""
    png = bytearray(_encode(Image.fromarray(COFFEE), "PNG"))
    png[len(png) // 2 : len(png) // 2 + 64] = bytes(64)
    path = tmp_path / "corrupt.png"
    path.write_bytes(png)
    read_image_header(bytes(png))
    with pytest.raises(ValueError, match=re.escape("could not decode image: corrupt or truncated PNG data (")):
        load_image(path)
    with pytest.raises(tf.errors.InvalidArgumentError, match="Invalid PNG data"):
        graph.preprocess(tf.constant([bytes(png)]))


def test_header_rules_agree_on_damaged_files(graph):
    """read_image_header (Python) and the graph's header reading give the same verdict, message,
    size and orientation on hundreds of cut and mutated files."""
    exif = Image.Exif()
    exif[0x0112] = 6
    frames = [Image.fromarray(np.roll(ASTRONAUT[::8, ::8], 8 * k, 1)).convert("P") for k in range(3)]
    animated = io.BytesIO()
    frames[0].save(animated, "GIF", save_all=True, append_images=frames[1:], transparency=0)
    bases = [
        _encode(Image.fromarray(CAT[:64, :80]), "JPEG", exif=exif),
        _encode(Image.fromarray(CAT[:64, :80]), "PNG", exif=exif),
        animated.getvalue(),
        _encode(Image.fromarray(CAT[:64, :80]).convert("P"), "BMP"),
    ]
    rng = np.random.default_rng(0)
    variants = []
    for base in bases:
        variants += [base] + [base[:cut] for cut in sorted(set(rng.integers(0, len(base), 40)) | set(range(0, 40, 3)))]
        for _ in range(60):
            mutated = bytearray(base)
            region = min(len(base), 160) if rng.random() < 0.5 else len(base)  # headers, or anywhere
            for pos in rng.integers(0, region, rng.integers(1, 4)):
                mutated[pos] = rng.choice([0, 1, 4, 0x21, 0x2C, 0x3B, 0xD9, 0xDA, 0xE1, 0xFF, rng.integers(256)])
            variants.append(bytes(mutated))
    headers = {k: v.numpy() for k, v in graph.headers(tf.constant(variants)).items()}
    verdicts = set()
    for i, data in enumerate(variants):
        try:
            h = read_image_header(data)
            expected = ("", h.width, h.height, h.orientation)
        except ValueError as err:
            expected = (str(err),)
        problem = headers["problem"][i].decode()
        got = (problem,) if problem else ("", headers["width"][i], headers["height"][i], headers["orientation"][i])
        assert got == expected, (i, data[:24])
        verdicts.add(expected[0].split(" data")[0])
    assert len(verdicts) >= 5  # the variants reach accepted, truncated, corrupt, unsupported ... files


# ---- TF Serving ---------------------------------------------------------------------------------


def test_saved_model_in_a_fresh_process(graph, tmp_path):
    """What TF Serving runs: the SavedModel reloaded by a process in which tfbit cannot be imported."""
    processor = BitImageProcessor()
    module = tf.Module()
    module.serve = tf.function(
        lambda image_bytes: graph.ops.preprocess_image_bytes(image_bytes, processor),
        input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")],
        autograph=False,
    )
    signature = module.serve.get_concrete_function()
    function_ops = {n.op for f in signature.graph.as_graph_def().library.function for n in f.node_def}
    assert not ({n.op for n in signature.graph.as_graph_def().node} | function_ops) & {"PyFunc", "EagerPyFunc"}
    tf.saved_model.save(module, str(tmp_path / "model"), signatures={"serving_default": signature})

    exif = Image.Exif()
    exif[0x0112] = 6
    blobs = {
        "rotated.jpg": _encode(Image.fromarray(CAT), "JPEG", exif=exif),
        "16-bit.png": _encode(Image.fromarray(CAMERA.astype(np.uint16) * 3), "PNG"),
        "palette.bmp": _encode(Image.fromarray(COFFEE).convert("P"), "BMP"),
        "transparent.gif": _format_cases()["GIF transparent first frame"],
    }
    paths = {name: tmp_path / name for name in blobs}
    for name, data in blobs.items():
        paths[name].write_bytes(data)
    script = textwrap.dedent(f"""
        import json, sys
        import numpy as np
        sys.modules["tfbit"] = None  # the SavedModel must run without tfbit
        import tensorflow as tf
        serve = tf.saved_model.load({str(tmp_path / "model")!r}).signatures["serving_default"]
        files = [open(p, "rb").read() for p in {[str(p) for p in paths.values()]!r}]
        (pixels,) = serve(image_bytes=tf.constant(files)).values()
        np.save({str(tmp_path / "pixels.npy")!r}, pixels.numpy())
        try:
            serve(image_bytes=tf.constant([files[0], b"GIF89a\\x01"]))
        except tf.errors.InvalidArgumentError as err:
            print(json.dumps(str(err)))
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    _assert_preprocessed_close(graph, paths, np.load(tmp_path / "pixels.npy"))
    error = json.loads(run.stdout.strip().splitlines()[-1])
    assert (
        "assertion failed: [tfbit: image 1 of the batch: could not decode image: truncated GIF data (7 bytes)]" in error
    )
