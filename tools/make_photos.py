"""Rebuild conversion/photos/: the real colour photographs the converter verifies and calibrates on.

    python tools/make_photos.py [--scipy-wheel PATH] [--output conversion/photos]

Dev-only (not shipped). Every photo comes from a package on PyPI whose files carry a license that
allows redistribution; conversion/photos/README.md (written by this script) lists origin package
and version, original file, author and license of each output file.

Needs scikit-image, matplotlib (the `test` extra) and scikit-learn installed and the scipy 1.9.3
wheel (its `scipy/misc/face.dat` is the raccoon photo, dropped from later scipy releases): pass
`--scipy-wheel`, or the script runs `pip download scipy==1.9.3 --no-deps` into a temporary folder.

There are only 12 license-clean photos in those packages (11 colour, 1 grayscale), so the other
20 files are VIEWS: different crops of the larger photos, each a framing a photographer could
have chosen (a face, a detail, a quadrant at full resolution), non-overlapping within a photo.
Outputs: baseline JPEG quality 90 (no EXIF, no ICC profile), at most 512 px on the long side
(crops are never upscaled, so several have odd sizes); a few PNGs, one of them grayscale and one
RGBA (fully opaque, so every decoder of the project gives the same RGB).
"""

import argparse
import bz2
import glob
import importlib.metadata
import io
import os
import subprocess
import sys
import tempfile
import zipfile

import numpy as np
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUTPUT = os.path.join(ROOT, "conversion", "photos")
LONG_SIDE = 512
JPEG_QUALITY = 90
SCIPY_VERSION = "1.9.3"

CC0 = "CC0 1.0 (https://creativecommons.org/publicdomain/zero/1.0/)"
CC_BY_2 = "CC BY 2.0 (https://creativecommons.org/licenses/by/2.0/)"

# name -> (package, file inside the package, author / origin, license as the package states it)
SOURCES = {
    "astronaut": (
        "scikit-image",
        "skimage/data/astronaut.png",
        "NASA (Eileen Collins portrait; NASA Great Images database)",
        "Public domain (NASA; 'No known copyright restrictions, released into the public domain')",
    ),
    "chelsea": ("scikit-image", "skimage/data/chelsea.png", "Stefan van der Walt", f"{CC0} by the photographer"),
    "coffee": (
        "scikit-image",
        "skimage/data/coffee.png",
        "Rachel Michetti (courtesy of Pikolo Espresso Bar)",
        f"{CC0} by the photographer",
    ),
    "rocket": (
        "scikit-image",
        "skimage/data/rocket.jpg",
        "SpaceX (DSCOVR launch on Falcon 9)",
        "Public domain (released into the public domain by SpaceX, 2015)",
    ),
    "hubble_deep_field": (
        "scikit-image",
        "skimage/data/hubble_deep_field.jpg",
        "NASA (Hubble eXtreme Deep Field, HubbleSite 2012-37)",
        "Public domain (NASA media guidelines)",
    ),
    "retina": (
        "scikit-image",
        "skimage/data/retina.jpg",
        "Mikael Häggström (Wikimedia Commons: Fundus photograph of normal left eye)",
        f"{CC0}",
    ),
    "immunohistochemistry": (
        "scikit-image",
        "skimage/data/ihc.png",
        "Center for Microscopy And Molecular Imaging (CMMI)",
        "No known copyright restrictions (as stated by scikit-image)",
    ),
    "camera": (
        "scikit-image",
        "skimage/data/camera.png",
        "Lav Varshney (grayscale 'cameraman' photo)",
        f"{CC0} by the photographer",
    ),
    "grace_hopper": (
        "matplotlib",
        "matplotlib/mpl-data/sample_data/grace_hopper.jpg",
        "U.S. Navy (official portrait of Grace M. Hopper in uniform)",
        "Public domain (work of the U.S. federal government; matplotlib ships it without a license note)",
    ),
    "china": (
        "scikit-learn",
        "sklearn/datasets/images/china.jpg",
        "danielbuechele (Flickr photo 6061409035; retrieved by Robert Layton, 2011)",
        CC_BY_2,
    ),
    "flower": (
        "scikit-learn",
        "sklearn/datasets/images/flower.jpg",
        "vultilion (Flickr photo 6056698931; retrieved by Robert Layton, 2011; scikit-learn's "
        "README also names danielbuechele in its attribution line)",
        CC_BY_2,
    ),
    "raccoon": (
        "scipy",
        "scipy/misc/face.dat",
        "raccoon-procyon-lotor.jpg from public-domain-image.com (as stated by scipy.misc.face)",
        "Public domain (as stated by scipy)",
    ),
}

# output file -> (source, crop box (left, top, right, bottom) in source pixels or None, format).
# Formats: "jpeg", "png" (RGB), "png-gray" (the source's single channel), "png-rgba" (opaque alpha).
VIEWS = {
    # the 12 photos, whole
    "astronaut.jpg": ("astronaut", None, "jpeg"),
    "chelsea.jpg": ("chelsea", None, "jpeg"),
    "coffee.jpg": ("coffee", None, "jpeg"),
    "rocket.jpg": ("rocket", None, "jpeg"),
    "hubble_deep_field.jpg": ("hubble_deep_field", None, "jpeg"),
    "retina.jpg": ("retina", None, "jpeg"),
    "immunohistochemistry.jpg": ("immunohistochemistry", None, "jpeg"),
    "camera.png": ("camera", None, "png-gray"),
    "grace_hopper.jpg": ("grace_hopper", None, "jpeg"),
    "china.jpg": ("china", None, "jpeg"),
    "flower.jpg": ("flower", None, "jpeg"),
    "raccoon.jpg": ("raccoon", None, "jpeg"),
    # 20 views: crops of the photos above, non-overlapping within each photo
    "astronaut_face.jpg": ("astronaut", (140, 0, 340, 215), "jpeg"),
    "astronaut_shuttle.png": ("astronaut", (345, 0, 470, 290), "png"),
    "astronaut_helmet.jpg": ("astronaut", (270, 330, 512, 512), "jpeg"),
    "chelsea_eyes.jpg": ("chelsea", (140, 60, 380, 175), "jpeg"),
    "coffee_cup.jpg": ("coffee", (150, 15, 430, 295), "jpeg"),
    "coffee_table.jpg": ("coffee", (440, 0, 600, 250), "jpeg"),
    "rocket_launchpad.jpg": ("rocket", (230, 100, 380, 427), "jpeg"),
    "rocket_tower.jpg": ("rocket", (0, 0, 140, 427), "jpeg"),
    "hubble_deep_field_north_west.jpg": ("hubble_deep_field", (0, 0, 500, 436), "jpeg"),
    "hubble_deep_field_south_east.jpg": ("hubble_deep_field", (500, 436, 1000, 872), "jpeg"),
    "retina_optic_disc.jpg": ("retina", (60, 420, 560, 920), "jpeg"),
    "retina_macula.jpg": ("retina", (580, 480, 1080, 880), "jpeg"),
    "immunohistochemistry_gland.png": ("immunohistochemistry", (256, 256, 512, 512), "png"),
    "grace_hopper_face.jpg": ("grace_hopper", (165, 105, 395, 355), "jpeg"),
    "grace_hopper_ribbons.jpg": ("grace_hopper", (235, 420, 475, 600), "jpeg"),
    "china_pagoda.jpg": ("china", (30, 10, 370, 427), "jpeg"),
    "china_lake.jpg": ("china", (370, 110, 640, 260), "jpeg"),
    "flower_dahlia.png": ("flower", (180, 60, 430, 310), "png-rgba"),
    "raccoon_eyes.jpg": ("raccoon", (415, 200, 800, 520), "jpeg"),
    "raccoon_leaves.jpg": ("raccoon", (0, 450, 410, 768), "jpeg"),
}


def _package_file(package, relative):
    dist = importlib.metadata.distribution(package)
    path = dist.locate_file(relative)
    if not os.path.isfile(path):
        raise SystemExit(f"{relative} is not in the installed {package} {dist.version}")
    return str(path), dist.version


def _scipy_face(wheel):
    if wheel is None:
        folder = tempfile.mkdtemp(prefix="scipy-wheel-")
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                f"scipy=={SCIPY_VERSION}",
                "--no-deps",
                "--only-binary=:all:",
                "--python-version",
                "3.11",
                "-d",
                folder,
                "--quiet",
            ],
            check=True,
        )
        wheel = glob.glob(os.path.join(folder, "scipy-*.whl"))[0]
    with zipfile.ZipFile(wheel) as z:
        raw = bz2.decompress(z.read("scipy/misc/face.dat"))
    return Image.fromarray(np.frombuffer(raw, np.uint8).reshape(768, 1024, 3)), SCIPY_VERSION


def load_sources(scipy_wheel=None):
    """name -> (PIL image as the package ships it, package version)."""
    images = {}
    for name, (package, relative, _, _) in SOURCES.items():
        if package == "scipy":
            images[name] = _scipy_face(scipy_wheel)
            continue
        path, version = _package_file(package, relative)
        with Image.open(path) as image:
            image.load()
            images[name] = (image.copy(), version)
    return images


def render(image, box, kind):
    """Crop, shrink to LONG_SIDE (never enlarge) and encode; returns the file's bytes."""
    image = Image.fromarray(np.asarray(image.convert("L" if kind == "png-gray" else "RGB")))  # drops ICC/comments
    if box is not None:
        image = image.crop(box)
    scale = LONG_SIDE / max(image.size)
    if scale < 1:
        image = image.resize((round(image.width * scale), round(image.height * scale)), Image.LANCZOS)
    if kind == "png-rgba":
        image = image.convert("RGBA")  # alpha 255 everywhere
    buffer = io.BytesIO()
    if kind == "jpeg":
        image.save(buffer, "JPEG", quality=JPEG_QUALITY, optimize=True)  # baseline, no EXIF/ICC
    else:
        image.save(buffer, "PNG", optimize=True)
    return buffer.getvalue(), image.size


def readme(rows, sources, total):
    lines = [
        "# Photos for verification and calibration",
        "",
        "Real photographs that `python -m conversion.convert` verifies exported artifacts on, and",
        "calibrates full-int8 TFLite on, when no `--images` folder is given. Generated by",
        "`tools/make_photos.py` (re-run it to rebuild this folder and this file).",
        "",
        f"{len(sources)} distinct photographs could be found on PyPI with a license that allows",
        "redistribution: 11 in colour and one grayscale (`camera.png`, kept to exercise the",
        f"grayscale path). The other {len(rows) - len(sources)} files are *views*: different crops of the larger",
        "photos, each a realistic framing (a face, a detail, a full-resolution quadrant), not",
        "overlapping any other view of the same photo, though each lies inside its whole photo.",
        f"So the {len(rows)} files are {len(rows)} distinct images but not {len(rows)} independent photographs.",
        "",
        f"Encoding: baseline JPEG quality {JPEG_QUALITY}, at most {LONG_SIDE} px on the long side (crops",
        "are not enlarged), no EXIF or ICC profile; PNG for `camera.png` (grayscale),",
        "`flower_dahlia.png` (RGBA, alpha 255 everywhere) and two RGB crops.",
        f"Total size: {total / 1e6:.2f} MB.",
        "",
        "## Files",
        "",
        "| file | size (w×h) | source photo | crop box (l, t, r, b) in the source |",
        "| --- | --- | --- | --- |",
    ]
    for name, size, source, box in rows:
        lines.append(f"| `{name}` | {size[0]}×{size[1]} | {source} | {'whole photo' if box is None else box} |")
    lines += [
        "",
        "## Sources and licenses",
        "",
        "| source photo | package (version) | original file | author / origin | license |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, (package, relative, author, license_) in SOURCES.items():
        lines.append(f"| {name} | {package} ({sources[name][1]}) | `{relative}` | {author} | {license_} |")
    lines += [
        "",
        "The packages themselves are BSD-3-Clause (scikit-image, scikit-learn, scipy) and the",
        "Matplotlib license (matplotlib); the licenses above are those their documentation gives for",
        "these images (scikit-image: the docstrings of `skimage.data`; scikit-learn:",
        "`sklearn/datasets/images/README.txt`; scipy: the docstring of `scipy.misc.face`).",
        "matplotlib states no license for `grace_hopper.jpg` (it replaced `lena` in its sample data);",
        "it is the U.S. Navy's official portrait of Grace Hopper, a work of the U.S. federal",
        "government and so in the public domain. The weakest statement is scikit-image's \"no known",
        'copyright restrictions" for the immunohistochemistry slide (2 files); drop',
        "`immunohistochemistry*.*` if that is not enough for a redistribution.",
        "",
        "`china.jpg`, `china_pagoda.jpg`, `china_lake.jpg`, `flower.jpg` and `flower_dahlia.png` are",
        "adaptations (resized or cropped, re-encoded) of photos licensed under CC BY 2.0",
        "(https://creativecommons.org/licenses/by/2.0/): china by danielbuechele",
        "(https://www.flickr.com/photos/danielbuechele/6061409035/), flower by vultilion",
        "(https://www.flickr.com/photos/vultilion/6056698931/). Every other file is an adaptation of a",
        "public-domain or CC0 photo (immunohistochemistry: no known copyright restrictions).",
        "",
    ]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scipy-wheel", help=f"path to scipy-{SCIPY_VERSION} wheel (default: pip download it)")
    parser.add_argument("--output", default=OUTPUT)
    args = parser.parse_args(argv)
    sources = load_sources(args.scipy_wheel)
    os.makedirs(args.output, exist_ok=True)
    for old in glob.glob(os.path.join(args.output, "*.jpg")) + glob.glob(os.path.join(args.output, "*.png")):
        os.remove(old)
    rows, total = [], 0
    for name, (source, box, kind) in sorted(VIEWS.items()):
        data, size = render(sources[source][0], box, kind)
        with open(os.path.join(args.output, name), "wb") as f:
            f.write(data)
        rows.append((name, size, source, box))
        total += len(data)
        print(f"{name:40s} {size[0]:4d}x{size[1]:<4d} {len(data) / 1e3:7.1f} kB")
    with open(os.path.join(args.output, "README.md"), "w", encoding="utf-8") as f:
        f.write(readme(rows, sources, total))
    print(f"{len(rows)} files, {total / 1e6:.2f} MB -> {args.output}")


if __name__ == "__main__":
    main()
