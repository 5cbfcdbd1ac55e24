"""The mobile file as an Android app runs it: the LiteRT Task Library's `ImageClassifier`
(tflite-support 0.4.4, the library the Android Task Library wraps, in its own venv built by
`make install-test`: it needs protobuf 3) on real photos, through docs/mobile.md's recipe as
typed, answers as `predict` does on the same file.

The Task Library squashes whatever region it is given to the model's input size with its own
bilinear resize; the recipe gives it the centered square of the upright frame, whose squash is
the processor's shortest-edge resize + center crop up to resampling. The classifier is a small
BiT whose head is fitted to the shipped photos (class i = photo i, as
benchmarks/realistic_model.py fits the full-size one), so its answers are not near-ties and an
agreement means the same preprocessing, not chance."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import SMALL, perturb_

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASKLIB_PYTHON = os.path.join(ROOT, ".venv-tasklib", "bin", "python")
MOBILE_PAGE = os.path.join(ROOT, "docs", "mobile.md")
PHOTOS = os.path.join(ROOT, "conversion", "photos")
# the Task Library links libusb-1.0.so.0: the Makefile puts PyPI's copy there (no system package needed)
LIBUSB = os.path.join(ROOT, ".venv-tasklib", "libusb")
ENV = {
    **os.environ,
    "TF_CPP_MIN_LOG_LEVEL": "3",
    "LD_LIBRARY_PATH": os.pathsep.join(filter(None, [LIBUSB, os.environ.get("LD_LIBRARY_PATH")])),
}
AUGMENTATIONS = 8  # views per photo the head is fitted on besides the photo itself
# EXIF orientation -> the transpose that stores a photo so that a viewer shows it upright
STORED_AS = {3: "ROTATE_180", 6: "ROTATE_90", 8: "ROTATE_270"}


@pytest.fixture(scope="module")
def tasklib():
    if not os.path.isfile(TASKLIB_PYTHON):
        if os.environ.get("TFBIT_ALLOW_MISSING"):
            pytest.skip("no .venv-tasklib (TFBIT_ALLOW_MISSING=1)")
        pytest.fail("the Task Library venv .venv-tasklib is missing: `make install-test` builds it")
    return TASKLIB_PYTHON


def _augment(image, rng):
    """A random crop (40-100 % of the area, any aspect 3/4-4/3), flip and brightness change."""
    from PIL import Image, ImageEnhance

    w, h = image.size
    area, ratio = rng.uniform(0.4, 1.0) * w * h, np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
    cw, ch = min(w, int(np.sqrt(area * ratio))), min(h, int(np.sqrt(area / ratio)))
    x, y = rng.randint(0, w - cw + 1), rng.randint(0, h - ch + 1)
    image = image.crop((x, y, x + cw, y + ch))
    if rng.rand() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return ImageEnhance.Brightness(image).enhance(rng.uniform(0.8, 1.2))


def _fit_head(features, targets, classes, l2=1e-3):
    """L2-regularized multinomial logistic regression (L-BFGS, float64) on standardized features:
    (weight (classes, features), bias) on the raw ones."""
    import torch

    mean, scale = features.mean(0), features.std(0) + 1e-6
    x, y = torch.from_numpy((features - mean) / scale), torch.from_numpy(targets)
    w = torch.zeros(features.shape[1], classes, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(classes, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([w, b], max_iter=500, line_search_fn="strong_wolfe")

    def loss():
        optimizer.zero_grad()
        value = torch.nn.functional.cross_entropy(x @ w + b, y) + l2 * (w**2).sum()
        value.backward()
        return value

    optimizer.step(loss)
    weight = w.detach().numpy() / scale[:, None]
    return weight.T, b.detach().numpy() - mean @ weight


@pytest.fixture(scope="module")
def confident_checkpoint(tmp_path_factory, torch_module):
    """A small BiT (transformers) whose head tells the shipped photos apart, with google/bit-50's
    preprocessing (bilinear shortest-edge resize to 224, center crop, mean = std = 0.5)."""
    import transformers
    from PIL import Image, ImageOps

    from conversion.images import photo_paths

    paths = photo_paths()
    names = [os.path.splitext(os.path.basename(p))[0] for p in paths]
    torch_module.manual_seed(0)
    config = transformers.BitConfig(**{**SMALL, "num_labels": len(names)}, id2label=dict(enumerate(names)))
    model = perturb_(transformers.BitForImageClassification(config))
    processor = transformers.BitImageProcessor(
        size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}, resample=2, image_mean=0.5, image_std=0.5
    )
    photos = [ImageOps.exif_transpose(Image.open(p)).convert("RGB") for p in paths]
    rng = np.random.RandomState(0)
    views = photos + [_augment(photo, rng) for _ in range(AUGMENTATIONS) for photo in photos]
    with torch_module.no_grad():
        pixels = processor(views, return_tensors="pt")["pixel_values"]
        features = np.concatenate(
            [model.bit(pixels[i : i + 32]).pooler_output.flatten(1).double().numpy() for i in range(0, len(views), 32)]
        )
    weight, bias = _fit_head(features, np.tile(np.arange(len(photos)), AUGMENTATIONS + 1), len(photos))
    with torch_module.no_grad():
        model.classifier[1].weight.copy_(torch_module.from_numpy(weight))
        model.classifier[1].bias.copy_(torch_module.from_numpy(bias))
    path = tmp_path_factory.mktemp("confident") / "photos-bit"
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def mobile_export(confident_checkpoint, tmp_path_factory):
    """fp32 and fp16 uint8 files of the confident classifier, converted as a user types it."""
    output = tmp_path_factory.mktemp("export") / "photos-bit"
    command = [sys.executable, "-m", "conversion.convert", str(confident_checkpoint), "--output", str(output)]
    options = ["--formats", "tflite", "--tflite-input", "uint8", "--tflite", "fp32", "fp16", "--images", PHOTOS]
    done = subprocess.run(command + options, capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return output


@pytest.fixture(scope="module")
def gallery(tmp_path_factory):
    """The shipped photos (aspect ratios 0.33-2.1, a grayscale and a transparent one), copies
    stored sideways and upside down with the EXIF orientation that shows them upright, and a
    photo fading to transparent, as a phone's gallery holds them."""
    from PIL import Image

    folder = tmp_path_factory.mktemp("gallery")
    for name in os.listdir(PHOTOS):
        if name.endswith((".jpg", ".png")):
            shutil.copy(os.path.join(PHOTOS, name), folder)
    for name, orientation in [("rocket.jpg", 6), ("chelsea.jpg", 8), ("coffee.jpg", 3), ("rocket_tower.jpg", 6)]:
        exif = Image.Exif()
        exif[0x0112] = orientation
        stored = Image.open(folder / name).transpose(getattr(Image.Transpose, STORED_AS[orientation]))
        stored.save(folder / f"exif{orientation}_{name}", exif=exif, quality=95)
    coffee = Image.open(folder / "coffee.jpg").convert("RGBA")
    coffee.putalpha(Image.linear_gradient("L").resize(coffee.size))
    coffee.save(folder / "transparent_coffee.png")
    return sorted(str(p) for p in folder.iterdir())


def _mobile_block(marker):
    import re

    blocks = re.findall(r"```python\n(.*?)```", open(MOBILE_PAGE, encoding="utf-8").read(), re.S)
    found = [b for b in blocks if marker in b]
    assert len(found) == 1, f"docs/mobile.md has {len(found)} python blocks with {marker!r}"
    return found[0]


def _run_per_image(python, snippet, paths, cwd):
    """`snippet` (a docs block reading "photo.jpg") run as typed once per image, in one process:
    the words it prints for each."""
    (cwd / "snippet.py").write_text(snippet)
    each = "import sys\nfor name in sys.argv[2:]:\n    exec(open(sys.argv[1]).read().replace('photo.jpg', name), {})\n"
    done = subprocess.run(
        [python, "-c", each, "snippet.py", *paths], capture_output=True, text=True, cwd=cwd, env=ENV, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return [line.split() for line in done.stdout.splitlines() if line.strip()]


def _predict(model, paths):
    """{path: (top label, its probability, the second's)} of `conversion.predict --json`."""
    command = [sys.executable, "-m", "conversion.predict", str(model), *paths, "--top-k", "2", "--json"]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(done.stdout[done.stdout.index("[") :])
    return {r["image"]: (r["top"][0]["label"], r["top"][0]["probability"], r["top"][1]["probability"]) for r in rows}


@pytest.mark.parametrize("quantization", ["fp32", "fp16"])
def test_task_library_recipe_answers_as_predict(tasklib, mobile_export, gallery, quantization, tmp_path):
    """docs/mobile.md's Task Library block, as typed, one image at a time: the same top-1 as
    `predict` on >= 99 % of the images (so on every one of these 37), none of them a near tie."""
    model = mobile_export / "tflite" / f"photos-bit_{quantization}_uint8.tflite"
    snippet = _mobile_block("ImageClassifier.create_from_file")
    snippet = snippet.replace("saved_models/digits/tflite/digits_fp32_uint8.tflite", str(model))
    assert snippet.count('"photo.jpg"') == 1 and "tfbit" not in snippet and "conversion" not in snippet
    answers = _run_per_image(tasklib, snippet, gallery, tmp_path)
    expected = _predict(model, gallery)
    assert len(answers) == len(gallery) == 37
    margins = {path: top - second for path, (_, top, second) in expected.items()}
    assert min(margins.values()) > 0.2, margins  # confident: an agreement is not a coin toss
    agree = [path for path, (label, _) in zip(gallery, answers) if expected[path][0] == label]
    assert len(agree) >= 0.99 * len(gallery), sorted(set(gallery) - set(agree))
    print(f"TASK LIBRARY {quantization}: top-1 as predict on {len(agree)}/{len(gallery)} images")


# (the arrays stay referenced while classifying: a TensorImage points into its array without
# keeping it alive, so one made from a temporary array reads freed memory)
CHECKS = """
import json, sys
import numpy as np
from PIL import Image
from tflite_support.task import vision

classifier = vision.ImageClassifier.create_from_file(sys.argv[1])
out = {}
for path in sys.argv[2:]:
    image = Image.open(path)
    as_given, rgb = np.asarray(image), np.asarray(image.convert("RGB"))
    try:
        classifier.classify(vision.TensorImage.create_from_array(as_given))
        outcome = "classified"
    except ValueError as e:
        outcome = str(e)
    categories = classifier.classify(vision.TensorImage.create_from_array(rgb)).classifications[0].categories
    out[path] = {"as_given": outcome, "best": categories[0].category_name, "scores": [c.score for c in categories]}
print(json.dumps(out))
"""


def test_scores_are_probabilities_and_grayscale_needs_rgb(tasklib, mobile_export, gallery):
    """What the Task Library reports of the fp32 file: every class, with probabilities in
    [0, 1] that sum to 1. A grayscale frame as given fails inside the library; converted to RGB
    as docs/mobile.md says, it is classified, and RGB frames need nothing more."""
    model = mobile_export / "tflite" / "photos-bit_fp32_uint8.tflite"
    gray = next(p for p in gallery if p.endswith("camera.png"))  # the shipped grayscale photo
    colour = next(p for p in gallery if p.endswith("chelsea.jpg"))
    done = subprocess.run(
        [tasklib, "-c", CHECKS, str(model), gray, colour], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    assert results[gray]["as_given"] == "Grayscale format does not convert to other formats."
    assert results[colour]["as_given"] == "classified"
    for result in results.values():
        assert len(result["scores"]) == 32 and abs(sum(result["scores"]) - 1) < 1e-5
        assert all(0 <= s <= 1 for s in result["scores"])
    assert results[gray]["best"] == "camera" and results[colour]["best"] == "chelsea"


def test_litert_snippet_is_the_processor(mobile_export, gallery, tmp_path):
    """docs/mobile.md's LiteRT example (a raw image file, no tfbit code) run as written, one
    image at a time, answers as `predict` on the same file: it resizes (the long edge truncated),
    crops, turns by EXIF and drops transparency as tfbit's processor does (up to the rounding of
    a pixel here and there, which moves no answer of a confident classifier)."""
    snippet = _mobile_block("digits_int8_uint8.tflite").replace("digits_int8_uint8", "photos-bit_fp32_uint8")
    assert "tfbit" not in snippet and "conversion" not in snippet and snippet.count('"photo.jpg"') == 1
    shutil.copytree(mobile_export, tmp_path / "saved_models" / "digits")
    answers = _run_per_image(sys.executable, snippet, gallery, tmp_path)
    expected = _predict(mobile_export / "tflite" / "photos-bit_fp32_uint8.tflite", gallery)
    assert len(answers) == len(gallery) == 37
    assert {path: answer[0] for path, answer in zip(gallery, answers)} == {p: e[0] for p, e in expected.items()}
