"""The real photographs shipped in conversion/photos/: present, packaged, colour, licensed."""

import fnmatch
import os
import shutil
import subprocess
import sys
import zipfile

import numpy as np
import pytest
from PIL import Image

from conversion import images as photos

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(photos.PHOTOS_DIR, "README.md")
GRAYSCALE_SOURCES = {"camera.png"}  # kept on purpose: exercises the grayscale -> RGB path


@pytest.fixture(scope="module")
def loaded():
    real = photos.photo_images()
    return photos.photo_paths(), real.encoded, [np.asarray(image) for image in real.images]


def test_photo_set():
    paths = photos.photo_paths()
    names = [os.path.basename(p) for p in paths]
    assert len(paths) == 32 and names == sorted(names) and len(set(names)) == 32
    assert all(os.path.isabs(p) and os.path.isfile(p) for p in paths)
    assert sum(n.endswith(".jpg") for n in names) > len(names) // 2  # mostly plain JPEG
    total = sum(os.path.getsize(p) for p in paths)
    assert total < 3 * 1024 * 1024, f"{total / 1e6:.2f} MB"
    modes = {n: Image.open(p).mode for n, p in zip(names, paths)}
    assert {modes[n] for n in GRAYSCALE_SOURCES} == {"L"}
    assert "RGBA" in modes.values()  # one RGBA PNG exercises alpha handling
    # photo_paths() lists only images; the README is shipped beside them
    assert sorted(os.listdir(photos.PHOTOS_DIR)) == sorted(names + ["README.md"])


def test_photo_images(loaded):
    paths, encoded, arrays = loaded
    assert len(encoded) == len(arrays) == 32 and photos.photo_images().labels is None
    for p, data in zip(paths, encoded):
        with open(p, "rb") as f:
            assert f.read() == data
    limited = photos.photo_images(limit=3)  # taken evenly: first, middle, last
    assert limited.encoded == [encoded[0], encoded[16], encoded[31]]
    np.testing.assert_array_equal(np.asarray(limited.images[2]), arrays[31])


def test_each_is_a_photo(loaded):
    paths, _, arrays = loaded
    shapes = set()
    for path, a in zip(paths, arrays):
        name = os.path.basename(path)
        assert a.dtype == np.uint8 and a.ndim == 3 and a.shape[2] == 3, name
        assert 96 <= min(a.shape[:2]) and max(a.shape[:2]) <= 512, f"{name}: {a.shape}"
        assert a.std() > 20 and len(np.unique(a)) > 100, f"{name} is near-constant"
        # share of clearly coloured pixels (the deep field is mostly black sky: ~2%)
        colour = (a.max(2).astype(np.int16) - a.min(2) > 30).mean()
        if name in GRAYSCALE_SOURCES:
            assert colour == 0, name
        else:
            assert colour > 0.01, f"{name} has no colour"
        shapes.add(a.shape[:2])
    assert len(shapes) >= 15  # odd sizes and aspect ratios, not one canonical size
    assert any(h > 2 * w for h, w in shapes) and any(w > 2 * h for h, w in shapes)
    # distinct images: no file is another one re-encoded or resized (the closest pair, the deep
    # field and its south-east quadrant, both mostly black sky, differ by ~7.6 levels per pixel)
    small = np.stack(
        [np.asarray(Image.fromarray(a).resize((16, 16), Image.BILINEAR), np.float32) for a in arrays]
    ).reshape(len(arrays), -1)
    distances = np.abs(small[:, None] - small[None]).mean(-1) + np.eye(len(arrays)) * 1e9
    assert distances.min() > 4


def test_every_file_has_origin_and_license():
    with open(README, encoding="utf-8") as f:
        text = f.read()
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 3:
            rows.setdefault(cells[0].strip("`"), cells)
    sources = {}
    for name in (os.path.basename(p) for p in photos.photo_paths()):
        assert name in rows, f"{name} is not listed in {README}"
        sources[name] = rows[name][2]
    for source in set(sources.values()):
        package, original, author, license_ = rows[source][1:5]
        assert package.split(" (")[0] in {"scikit-image", "matplotlib", "scikit-learn", "scipy"}
        assert "(" in package and original.strip("`") and author, source  # version, file, author
        assert any(word in license_ for word in ("CC0", "CC BY", "Public domain", "No known copyright")), source


def test_package_data_glob_covers_the_photos():
    setupcfg = pytest.importorskip("setuptools.config.setupcfg")
    package_data = setupcfg.read_configuration(os.path.join(ROOT, "setup.cfg"))["options"]["package_data"]
    patterns = package_data["conversion"]
    conversion_dir = os.path.dirname(photos.PHOTOS_DIR)
    for path in photos.photo_paths() + [README]:
        relative = os.path.relpath(path, conversion_dir)
        assert any(fnmatch.fnmatch(relative, p) for p in patterns), relative


def test_wheel_ships_the_photos(tmp_path):
    """Build the wheel from a copy of the sources (the work tree stays clean) and list it."""
    pytest.importorskip("wheel")
    src = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in ("tfbit", "conversion"):
        shutil.copytree(os.path.join(ROOT, name), src / name, ignore=ignore)
    for name in ("setup.cfg", "setup.py", "README.md"):
        shutil.copy(os.path.join(ROOT, name), src / name)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--quiet",
            str(src),
            "-w",
            str(tmp_path / "dist"),
        ],
        check=True,
        cwd=tmp_path,
        timeout=300,
    )
    (wheel,) = (tmp_path / "dist").glob("tfbit-*.whl")
    with zipfile.ZipFile(wheel) as z:
        shipped = {n for n in z.namelist() if n.startswith("conversion/photos/")}
    expected = {f"conversion/photos/{os.path.basename(p)}" for p in photos.photo_paths() + [README]}
    assert shipped == expected
