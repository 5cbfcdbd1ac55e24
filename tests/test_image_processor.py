"""tfbit.preprocessing.processor against transformers' BitImageProcessor, and its TF twin
tfbit.preprocessing.tf_processor against both.

Photographs come from scikit-image. Run with ``-s`` to see the measured differences. Encoded files
(formats, EXIF orientation, refusals, the SavedModel) are tested in tests/test_serving_images.py.
"""

import io
import json

import numpy as np
import PIL
import pytest
from PIL import Image

from tfbit.preprocessing.processor import BitImageProcessor

skdata = pytest.importorskip("skimage.data")

# uint8 pipelines are reproduced operation by operation, so outputs are expected bit-identical;
# 1e-6 is ~4 float32 ulps at the largest normalized values (~2.2).
TOL = 1e-6
# torch resizes float32 images with float32 weights and its own summation order; the 0-255
# intermediate values then differ by float32 rounding (ulp 1.5e-5 at 255, ~10 taps x 2 passes),
# i.e. <= ~5e-4 pixel levels = 7e-6 after dividing by 255 * min(std) (measured 2.2e-6).
FLOAT32_RESIZE_TOL = 1e-5
# One uint8 level after normalization: how far the two backends' fixed-point roundings (and
# float images resized by TF against the processor) may land apart.
ONE_LEVEL = 1 / 255 / min(0.26862954, 0.26130258, 0.27577711) + 1e-6
MAX_FRACTION = 0.01  # measured 0.0-0.5% of values differ by that one level
# The TF ops resize uint8 images in the processor's own fixed-point arithmetic: equal pixels, and
# the float32 normalization a few ulps apart at most.
PIXEL_TOL = 1e-6
BACKENDS = ["torchvision", "pil"]


def _photos():
    cat, coffee = skdata.chelsea(), skdata.coffee()
    alpha = np.linspace(0, 255, cat.shape[1]).astype(np.uint8)[None].repeat(cat.shape[0], 0)
    rgba = np.dstack([cat, alpha])
    palette_t = Image.fromarray(coffee).convert("P")
    palette_t.info["transparency"] = 0
    return {
        "astronaut": Image.fromarray(skdata.astronaut()),
        "chelsea": Image.fromarray(cat),
        "coffee": Image.fromarray(coffee),
        "camera(L)": Image.fromarray(skdata.camera()),
        "RGBA": Image.fromarray(rgba),
        "LA": Image.fromarray(rgba[..., [0, 3]]),
        "P": Image.fromarray(coffee).convert("P"),
        "P+transparency": palette_t,
        "CMYK": Image.fromarray(skdata.astronaut()).convert("CMYK"),
        "I;16": Image.fromarray(skdata.camera().astype(np.uint16) * 200),
        "I": Image.fromarray(skdata.camera().astype(np.int32) * 3),
        "F": Image.fromarray(skdata.camera().astype(np.float32) / 2),
        "1": Image.fromarray(skdata.camera()).convert("1"),
        "odd 301x451": Image.fromarray(np.pad(cat, ((0, 1), (0, 0), (0, 0)), mode="edge")),
        "odd 225x1001": Image.fromarray(np.tile(coffee, (1, 2, 1))[:225, :1001]),
        # Pillow 13 resizes this one vertical pass first
        "tall 1001x225": Image.fromarray(np.tile(coffee, (3, 1, 1))[:1001, :225]),
        "tiny 8x5 upscaled": Image.fromarray(skdata.astronaut()[::64, ::103]),
        "array uint8": skdata.astronaut(),
        "array HxWx1": skdata.camera()[..., None],
        "array RGBA": rgba,
        "array float64 0-255": cat.astype(np.float64),
        "array float32 [0,1] RGBA": rgba.astype(np.float32) / 255,
    }


PHOTOS = _photos()


@pytest.fixture(scope="module")
def hf():
    """backend -> factory of the matching transformers processor."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("torchvision")
    from transformers.models.bit.image_processing_pil_bit import BitImageProcessorPil

    transformers.utils.logging.set_verbosity_error()
    return {"torchvision": transformers.BitImageProcessor, "pil": BitImageProcessorPil}


def hf_pixels(processor, images):
    return np.asarray(processor(images, return_tensors="np")["pixel_values"]).transpose(0, 2, 3, 1)


def report(what, ours, ref):
    delta = np.abs(np.asarray(ours, np.float64) - ref)
    print(f"\n{what:55s} max {delta.max():.3g}  mean {delta.mean():.3g}  differing {np.mean(delta > 1e-5):.3%}", end="")
    return delta


# ---- NumPy processor == transformers -----------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(PHOTOS))
def test_matches_transformers(hf, backend, name):
    ours = BitImageProcessor(backend=backend)(PHOTOS[name])
    ref = hf_pixels(hf[backend](), PHOTOS[name])
    assert ours.shape == ref.shape == (1, 224, 224, 3) and ours.dtype == np.float32
    assert report(f"numpy[{backend}] vs HF: {name}", ours, ref).max() <= TOL


@pytest.mark.parametrize("backend", BACKENDS)
def test_float32_array_matches_transformers(hf, backend):
    image = skdata.coffee().astype(np.float32)
    delta = report(
        f"numpy[{backend}] vs HF: float32 0-255 array",
        BitImageProcessor(backend=backend)(image),
        hf_pixels(hf[backend](), image),
    )
    assert delta.max() <= (FLOAT32_RESIZE_TOL if backend == "torchvision" else TOL)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "config",
    [
        dict(size={"shortest_edge": 101}),  # crop larger than the image, odd padding (ceil vs floor)
        dict(size={"shortest_edge": 256}, crop_size={"height": 231, "width": 199}),  # odd crop margins
        dict(size={"height": 160, "width": 120}, do_center_crop=False, resample=2),
        dict(do_resize=False, crop_size={"height": 333, "width": 480}),
        dict(do_rescale=False),
        dict(do_normalize=False),
        dict(
            image_mean=[0.5, 0.5, 0.5],
            image_std=[0.5, 0.5, 0.5],
            size={"shortest_edge": 448},
            crop_size={"height": 448, "width": 448},
            resample=2,
        ),
    ],
)
def test_configs_match_transformers(hf, backend, config):
    images = [PHOTOS["chelsea"], PHOTOS["odd 225x1001"], skdata.coffee()]
    ours = BitImageProcessor(backend=backend, **config)(images)
    ref = hf_pixels(hf[backend](**config), images)
    assert ours.shape == ref.shape
    assert report(f"numpy[{backend}] vs HF: {config}", ours, ref).max() <= TOL


@pytest.mark.parametrize("backend", BACKENDS)
def test_paths_match_transformers(hf, backend, tmp_path):
    cat = skdata.chelsea()
    rgba = np.dstack([cat, np.full(cat.shape[:2], 100, np.uint8)])
    rotated = Image.fromarray(cat)
    exif = rotated.getexif()
    exif[0x0112] = 6  # EXIF orientation: rotate 90 degrees
    files = {
        "photo.jpg": (Image.fromarray(cat), {"quality": 90}),
        "exif.jpg": (rotated, {"exif": exif}),
        "alpha.png": (Image.fromarray(rgba), {}),
        "gray.png": (Image.fromarray(skdata.camera()), {}),
        "palette.gif": (Image.fromarray(skdata.coffee()).convert("P"), {}),
    }
    for name, (image, options) in files.items():
        image.save(tmp_path / name, **options)
    paths = [str(tmp_path / name) for name in files]
    ours = BitImageProcessor(backend=backend)(paths)
    delta = report(f"numpy[{backend}] vs HF: files {list(files)}", ours, hf_pixels(hf[backend](), paths))
    assert delta.max() <= TOL
    assert not np.array_equal(ours[1], ours[0])  # the EXIF rotation was applied


def test_torchvision_resize_kernel_is_exact():
    """Random sizes, channels and both supported filters against torchvision itself."""
    torch = pytest.importorskip("torch")
    tvf = pytest.importorskip("torchvision.transforms.v2.functional")
    from tfbit.preprocessing.processor import torchvision_resize

    rng = np.random.default_rng(0)
    modes = {2: tvf.InterpolationMode.BILINEAR, 3: tvf.InterpolationMode.BICUBIC}
    for _ in range(60):
        image = rng.integers(0, 256, (*rng.integers(1, 120, 2), rng.choice([1, 3, 4])), dtype=np.uint8)
        height, width, resample = *(int(v) for v in rng.integers(1, 250, 2)), int(rng.choice([2, 3]))
        ref = (
            tvf.resize(
                torch.from_numpy(image).permute(2, 0, 1).contiguous(),
                [height, width],
                interpolation=modes[resample],
                antialias=True,
            )
            .permute(1, 2, 0)
            .numpy()
        )
        np.testing.assert_array_equal(torchvision_resize(image, height, width, resample), ref)


def test_backends_differ_only_by_fixed_point_rounding():
    tv, pil = (BitImageProcessor(backend=b)(PHOTOS["astronaut"]) for b in BACKENDS)
    delta = report("numpy torchvision vs pil backend: astronaut", tv, pil)
    assert 0 < delta.max() <= ONE_LEVEL and np.mean(delta > 1e-5) < MAX_FRACTION


def test_batches_and_overrides():
    p = BitImageProcessor()
    images = [PHOTOS["astronaut"], skdata.coffee(), PHOTOS["camera(L)"]]
    batch = p(images)
    assert batch.shape == (3, 224, 224, 3) and batch.dtype == np.float32
    np.testing.assert_array_equal(batch[1], p(skdata.coffee())[0])
    np.testing.assert_array_equal(p(np.stack([skdata.astronaut()] * 2)), p([PHOTOS["astronaut"]] * 2))
    np.testing.assert_array_equal(p(skdata.camera()), p(PHOTOS["camera(L)"]))  # 2-D = grayscale
    assert p(images[0], crop_size=100).shape == (1, 100, 100, 3)
    assert p.crop_size == {"height": 224, "width": 224}  # the override did not stick


def test_original_bit_scales_to_minus_one_one():
    p = BitImageProcessor.original_bit()
    assert p.image_mean == p.image_std == [0.5, 0.5, 0.5] and p.rescale_factor == 1 / 255
    image = np.zeros((300, 300, 3), np.uint8)
    image[:, 150:] = 255
    out = p(image, do_resize=False, do_center_crop=False)[0]
    assert out[:, :150].max() == -1.0 and out[:, 150:].min() == 1.0
    scalar_stats = BitImageProcessor(image_mean=0.5, image_std=0.5)
    np.testing.assert_allclose(p(skdata.coffee()), scalar_stats(skdata.coffee()))


# ---- configuration ----------------------------------------------------------------------------


def test_defaults_equal_transformers(hf):
    ref = hf["torchvision"]().to_dict()
    ours = BitImageProcessor().to_dict()
    assert json.loads(json.dumps({k: ref[k] for k in ours})) == ours


def test_config_round_trip_with_transformers(hf, tmp_path):
    ours = BitImageProcessor(
        size=256, crop_size=(240, 200), resample=2, image_mean=[0.1, 0.2, 0.3], image_std=0.4, do_convert_rgb=False
    )
    saved = json.loads(open(ours.save_pretrained(tmp_path / "ours")).read())
    assert saved["image_processor_type"] == "BitImageProcessor" and saved["size"] == {"shortest_edge": 256}
    for backend in BACKENDS:  # transformers reads our file, the same numbers come out
        theirs = hf[backend].from_pretrained(tmp_path / "ours")
        image = skdata.chelsea()
        ours_reloaded = BitImageProcessor(backend=backend, **saved)
        assert np.abs(ours_reloaded(image) - hf_pixels(theirs, image)).max() <= TOL
    # ... and we read transformers' file
    hf["torchvision"](
        size={"shortest_edge": 320}, crop_size={"height": 300, "width": 288}, image_mean=[0.5, 0.5, 0.5]
    ).save_pretrained(tmp_path / "hf")
    loaded = BitImageProcessor.from_pretrained(tmp_path / "hf")
    assert loaded.size == {"shortest_edge": 320} and loaded.crop_size == {"height": 300, "width": 288}
    assert loaded.image_mean == [0.5] * 3 and loaded.resample == 3
    assert BitImageProcessor.from_pretrained(tmp_path / "ours") == ours
    assert BitImageProcessor.from_pretrained(tmp_path / "ours" / "preprocessor_config.json") == ours


def test_unknown_keys_kept_and_ignored(tmp_path):
    config = {**BitImageProcessor().to_dict(), "do_pad": True, "processor_class": "X", "custom": [1, 2]}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(config))
    p = BitImageProcessor.from_pretrained(tmp_path)
    assert p.extra == {"do_pad": True, "custom": [1, 2]}
    np.testing.assert_array_equal(p(skdata.coffee()), BitImageProcessor()(skdata.coffee()))
    assert json.loads(open(p.save_pretrained(tmp_path / "again")).read())["custom"] == [1, 2]


def test_missing_config_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "preprocessor_config.json")):
        BitImageProcessor.from_pretrained(tmp_path)


# ---- errors -----------------------------------------------------------------------------------


def test_error_messages(tmp_path):
    p = BitImageProcessor()
    not_image = tmp_path / "notes.jpg"
    not_image.write_text("not an image")
    with pytest.raises(ValueError, match=f"cannot read {not_image} as an image"):
        p(str(not_image))
    with pytest.raises(FileNotFoundError, match="missing.png"):
        p(tmp_path / "missing.png")
    for shape in [(5,), (2, 3, 4, 5, 3), (32, 32, 2), (3, 32, 32), (0, 4, 3)]:
        with pytest.raises(ValueError, match=f"got shape {shape}".replace("(", r"\(").replace(")", r"\)")):
            p(np.zeros(shape, np.uint8))
    for bad in [42, {"image": 1}, None]:
        with pytest.raises(TypeError, match="unsupported image type"):
            p(bad)
    with pytest.raises(TypeError, match="unsupported image dtype complex128"):
        p(np.zeros((8, 8, 3), complex))
    with pytest.raises(ValueError, match=r"integer pixel values must be in \[0, 255\]"):
        p(np.full((8, 8, 3), 300, np.int32))
    with pytest.raises(ValueError, match=r"float RGBA image must be in \[0, 1\]"):
        p(np.full((8, 8, 4), 2.0))
    with pytest.raises(ValueError, match="float pixel values must be in"):
        BitImageProcessor(backend="pil")(np.full((8, 8, 3), 2.5))
    with pytest.raises(ValueError, match="no images"):
        p([])
    with pytest.raises(ValueError, match="differ in shape"):
        p([skdata.coffee(), skdata.astronaut()], do_center_crop=False)
    with pytest.raises(ValueError, match="backend must be one of"):
        BitImageProcessor(backend="cv2")
    with pytest.raises(ValueError, match="size must be"):
        BitImageProcessor(size={"longest_edge": 5})
    with pytest.raises(ValueError, match="resample=1 is not supported"):
        BitImageProcessor(resample=1)
    with pytest.raises(ValueError, match="image_mean must be"):
        BitImageProcessor(image_mean=[0.5, 0.5])
    with pytest.raises(ValueError, match="3 values but the image has 4 channels"):
        p(skdata.astronaut()[..., [0, 1, 2, 0]], do_convert_rgb=False)


# ---- TensorFlow ops ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tf_ops():
    tf = pytest.importorskip("tensorflow")
    from tfbit.preprocessing import tf_processor

    return tf, tf_processor


def _encode(image, fmt, **options):
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


TF_PHOTOS = ["astronaut", "chelsea", "coffee", "camera(L)", "odd 225x1001", "tall 1001x225"]


def _assert_same_pixels(ours, ref):
    np.testing.assert_allclose(ours, ref, rtol=0, atol=PIXEL_TOL)


def test_tf_images_close_to_numpy(tf_ops, hf):
    tf, ops = tf_ops
    p = BitImageProcessor()
    for name in TF_PHOTOS:
        image = np.asarray(PHOTOS[name])
        image = image[..., None] if image.ndim == 2 else image
        ours = ops.preprocess_images(image, p).numpy()
        assert ours.shape == (1, 224, 224, 3) and ours.dtype == np.float32
        _assert_same_pixels(ours, p(image))
        _assert_same_pixels(ours, hf_pixels(hf["torchvision"](), PHOTOS[name]))  # what users compare with


def test_tf_equals_pil_in_its_own_pass_order(tf_ops):
    """Against the installed Pillow's full resize. Rounded passes do not commute (the two orders
    differ by up to ~9 levels here), and Pillow >= 13 goes vertical first when the height shrinks
    by more than twice as many pixels as the width (the tall image): image_ops follows it."""
    tf, ops = tf_ops
    p = BitImageProcessor(backend="pil")
    pillow_13 = int(PIL.__version__.split(".")[0]) >= 13
    for name in TF_PHOTOS:
        image = np.asarray(PHOTOS[name].convert("RGB"))
        (height, width), (in_h, in_w) = p.output_size(*image.shape[:2]), image.shape[:2]
        pil = Image.fromarray(image)
        orders = {
            "horizontal first": pil.resize((width, in_h), 3).resize((width, height), 3),
            "vertical first": pil.resize((in_w, height), 3).resize((width, height), 3),
        }
        full = np.asarray(pil.resize((width, height), 3))
        used = {k for k, v in orders.items() if np.array_equal(np.asarray(v), full)}
        vertical_first = pillow_13 and in_h - height > max(0, 2 * (in_w - width))
        assert ("vertical first" if vertical_first else "horizontal first") in used, (name, used)
        print(f"\nPillow {PIL.__version__} resizes {name} {' = '.join(sorted(used))}", end="")
        _assert_same_pixels(ops.preprocess_images(image, p).numpy(), p(image))


def test_tf_fixed_point_against_tf_image_resize(tf_ops):
    """Why image_ops resizes in fixed point: TensorFlow's own resize is levels off."""
    tf, ops = tf_ops
    p = BitImageProcessor(backend="pil", do_center_crop=False, do_normalize=False, do_rescale=False)
    image = skdata.astronaut()
    ref = p(image)[0]
    errors = {
        f"tf.image.resize antialias={aa}": np.abs(tf.image.resize(image, ref.shape[:2], "bicubic", antialias=aa) - ref)
        for aa in (False, True)
    }
    errors["image_ops (fixed point)"] = np.abs(ops.preprocess_images(image, p)[0] - ref)
    for name, e in errors.items():
        print(f"\n{name:32s} vs PIL (uint8 levels): max {e.max():.3g} mean {e.mean():.3g}", end="")
    assert (
        errors["image_ops (fixed point)"].max()
        == 0
        < errors["tf.image.resize antialias=True"].max()
        < errors["tf.image.resize antialias=False"].max()
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_tf_without_resize_matches_numpy(tf_ops, backend):
    """Crop (with odd padding), rescale and normalize are the same float32 arithmetic."""
    tf, ops = tf_ops
    for config in [
        dict(do_resize=False, crop_size={"height": 331, "width": 500}),
        dict(do_resize=False, do_normalize=False),
        dict(do_resize=False, do_rescale=False),
    ]:
        p = BitImageProcessor(backend=backend, **config)
        for image in [skdata.chelsea(), skdata.camera()[..., None], PHOTOS["array RGBA"]]:
            assert np.abs(ops.preprocess_images(image, p).numpy() - p(image)).max() <= TOL


def test_tf_ragged_float_and_dict_config(tf_ops):
    tf, ops = tf_ops
    p = BitImageProcessor()
    images = [skdata.astronaut(), skdata.coffee()]
    ragged = ops.preprocess_images(tf.ragged.stack(images), p.to_dict()).numpy()
    np.testing.assert_array_equal(ragged[1], ops.preprocess_images(images[1], p).numpy()[0])
    floats = ops.preprocess_images(skdata.coffee().astype(np.float32), p).numpy()
    assert np.abs(floats - p(skdata.coffee().astype(np.float32))).max() <= ONE_LEVEL
    with pytest.raises(ValueError, match=r"got shape \(32, 32\)"):
        ops.preprocess_images(np.zeros((32, 32), np.uint8), p)


def test_tf_bytes_in_serving_function(tf_ops, tmp_path):
    tf, ops = tf_ops
    p = BitImageProcessor()
    cat = skdata.chelsea()
    images = [
        Image.fromarray(skdata.astronaut()),
        Image.fromarray(cat),
        Image.fromarray(skdata.camera()),
        Image.fromarray(np.dstack([cat, np.full(cat.shape[:2], 90, np.uint8)])),
        Image.fromarray(skdata.coffee()).convert("P"),
    ]
    blobs = [
        _encode(images[0], "JPEG", quality=92),
        _encode(images[1], "BMP"),
        _encode(images[2], "PNG"),
        _encode(images[3], "PNG"),
        _encode(images[4], "GIF"),
    ]

    module = tf.Module()
    module.serve = tf.function(
        lambda s: ops.preprocess_image_bytes(s, p), input_signature=[tf.TensorSpec([None], tf.string)]
    )
    graph = module.serve.get_concrete_function().graph.as_graph_def()
    op_types = {n.op for n in graph.node} | {n.op for f in graph.library.function for n in f.node_def}
    assert not op_types & {"PyFunc", "EagerPyFunc", "PyFuncStateless"}
    tf.saved_model.save(module, str(tmp_path / "serving"))
    out = tf.saved_model.load(str(tmp_path / "serving")).serve(tf.constant(blobs)).numpy()
    assert out.shape == (5, 224, 224, 3) and out.dtype == np.float32
    for name, blob, pixels in zip(["jpeg", "bmp", "gray png", "rgba png", "gif"], blobs, out):
        # the reference decodes like transformers' path loader: PIL, convert("RGB") (alpha dropped)
        ref = p(np.asarray(Image.open(io.BytesIO(blob)).convert("RGB")))[0]
        delta = report(f"TF bytes vs numpy: {name}", pixels, ref)
        assert delta.max() <= PIXEL_TOL
