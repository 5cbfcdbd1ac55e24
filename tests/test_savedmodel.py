"""TF Hub / Kaggle Models BiT SavedModels (`tfbit.weights.savedmodel`, `tfbit.weights.tfhub`):
SavedModels in TF Hub's layout written by an independent BiT of raw TensorFlow ops
(tests/savedmodel_fixture.py), read from a folder or a handle in the kagglehub / tensorflow_hub
caches built in their real layouts, compared with the SavedModel's own call; every refusal by its
message, and the converter as a user types it, verifying every export against the SavedModel."""

import hashlib
import json
import os
import shutil
import types

import numpy as np
import pytest
from conftest import assert_parity, load_source
from conftest import run_convert as convert
from savedmodel_fixture import call_saved_model, dense_head, kagglehub_cache, random_images01, write_bit_saved_model
from test_timm_parity import SMALL_NPZ, write_original_npz

from tfbit.errors import MissingFileError
from tfbit.weights import CheckpointError, detect_format, tfhub

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES = 7
DEPTHS = SMALL_NPZ["depths"]
TFHUB = "https://tfhub.dev/google/bit/m-r50x1/1"
KAGGLE = "google/bit/tensorFlow2/m-r50x1/1"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """The same random small BiT as SavedModels: with its head, without (a feature vector), and
    under a prefix with the original TF2 code's Dense head."""
    root = tmp_path_factory.mktemp("savedmodels")
    arrays = write_original_npz(root / "weights.npz", **SMALL_NPZ, num_classes=CLASSES)
    return types.SimpleNamespace(
        root=root,
        arrays=arrays,
        head=write_bit_saved_model(root / "bit-head", arrays, DEPTHS),
        features=write_bit_saved_model(root / "bit-features", arrays, DEPTHS, head=False),
        prefixed=write_bit_saved_model(root / "bit-prefixed", dense_head(arrays), DEPTHS, prefix="keras_layer/"),
    )


def _output(model, x):
    out = model(x)
    return np.asarray(out["pooler_output"] if isinstance(out, dict) else out)


# -- reading ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("which, head", [("head", True), ("features", False), ("prefixed", True)])
def test_a_folder_computes_what_the_savedmodel_computes(saved, which, head):
    path = getattr(saved, which)
    loaded = load_source(path)
    assert (loaded.format, loaded.name, loaded.checkpoint.has_head) == ("savedmodel", f"bit-{which}", head)
    assert loaded.config.depths == list(DEPTHS) and loaded.config.ws_eps == 1e-10
    assert loaded.config.num_labels == (CLASSES if head else 0)
    # the module's [0, 1] input convention: rescale 1/255, then mean = std = 0.5
    processor = loaded.preprocessor
    assert (processor["rescale_factor"], processor["image_mean"], processor["image_std"]) == (
        1 / 255,
        [0.5] * 3,
        [0.5] * 3,
    )
    x = random_images01(2, 64)
    delta = assert_parity(_output(loaded.model, x * 2 - 1), call_saved_model(path, x), f"savedmodel {which}")
    print(f"PARITY savedmodel {which} vs the SavedModel's own call: {delta:.3g} of the scale")


def test_the_preprocessing_gives_the_model_what_a_user_gives_the_module(saved):
    """A photo resized to 224 (bilinear) and divided by 255 into the module, as its users feed it,
    computes what the converted model computes on the checkpoint's preprocessing of it."""
    from PIL import Image

    from tfbit.preprocessing.processor import BitImageProcessor

    photo = Image.open(os.path.join(ROOT, "conversion", "photos", "astronaut.jpg")).convert("RGB")
    by_user = np.asarray(photo.resize((224, 224), Image.BILINEAR), np.float32)[None] / 255
    loaded = load_source(saved.head)
    pixel_values = BitImageProcessor.from_dict(loaded.preprocessor)(photo)
    np.testing.assert_allclose(pixel_values * 0.5 + 0.5, by_user, atol=1e-6)
    assert_parity(loaded.model(pixel_values), call_saved_model(saved.head, by_user), "preprocessing")


def test_from_pretrained_reads_a_folder(saved):
    import tfbit

    model = tfbit.BitForImageClassification.from_pretrained(str(saved.head))
    x = random_images01(1, 64, seed=1)
    assert_parity(model(x * 2 - 1), call_saved_model(saved.head, x), "from_pretrained")


def test_folders_and_handles_are_detected(saved):
    assert detect_format(saved.head) == "savedmodel"
    for handle in (TFHUB, KAGGLE, "https://www.kaggle.com/models/google/bit/TensorFlow2/m-r50x1/1"):
        assert detect_format(handle) == "savedmodel", handle


@pytest.mark.parametrize(
    "text, handle",
    [
        (TFHUB, KAGGLE),
        (
            "https://tfhub.dev/google/bit/m-r50x1/ilsvrc2012_classification/1",
            "google/bit/tensorFlow2/m-r50x1-ilsvrc2012-classification/1",
        ),
        (
            "tfhub.dev/google/bit/s-r101x3/imagenet21k_classification/1/",
            "google/bit/tensorFlow2/s-r101x3-imagenet21k-classification/1",
        ),
        (KAGGLE, KAGGLE),
        ("google/bit/TensorFlow2/m-r50x1", "google/bit/TensorFlow2/m-r50x1"),
        ("https://www.kaggle.com/models/google/bit/TensorFlow2/m-r152x4/1", "google/bit/TensorFlow2/m-r152x4/1"),
        (
            "https://www.kaggle.com/models/google/bit/frameworks/tensorFlow2/variations/m-r50x1/versions/1?tfhub-redirect=true",
            "google/bit/tensorFlow2/m-r50x1/1",
        ),
        ("google/bit-50", None),
        ("timm/resnetv2_50x1_bit.goog_in21k", None),
        ("google/bit/pyTorch/m-r50x1/1", None),
        ("https://tfhub.dev/google/bit/m-r50x1", None),
    ],
)
def test_handles_name_their_kaggle_model(text, handle):
    parsed = tfhub.kaggle_handle(text)
    assert (str(parsed) if parsed else None) == handle


# -- refusals -----------------------------------------------------------------------------------------


def _without(key):
    return lambda arrays: {k: v for k, v in arrays.items() if k != key}


def _reshaped(key):
    return lambda arrays: arrays | {key: arrays[key][..., :-8]}


@pytest.mark.parametrize(
    "edit, extra, message",
    [
        (
            _without("resnet/block2/unit02/b/group_norm/beta"),
            None,
            r"bit does not fit .*\n  missing weights \(1\):\n    stage2_unit2_norm2/beta$",
        ),
        (
            _reshaped("resnet/block3/unit01/b/standardized_conv2d/kernel"),
            None,
            r"(?s)wrongly shaped keys \(1\):\n    resnet/block3/unit01/b/standardized_conv2d/kernel: shape "
            r"\(3, 3, 128, 120\) \(as stage3_unit1_conv2/kernel\), model expects \(3, 3, 128, 128\)",
        ),
        (
            None,
            {"classifier/dense/kernel": np.zeros((CLASSES, 3), "float32")},
            r"unexpected keys \(1\):\n    classifier/dense/kernel$",
        ),
        (
            None,
            {"other/root_block/standardized_conv2d/kernel": np.zeros((7, 7, 3, 32), "float32")},
            r"/bit holds 2 BiT networks \(under other/, resnet/\), where tfbit converts one$",
        ),
    ],
    ids=["missing weight", "wrong shape", "a variable outside the BiT", "two BiTs"],
)
def test_savedmodels_of_another_layout_are_refused_by_name(saved, tmp_path, edit, extra, message):
    if extra:
        path = write_bit_saved_model(tmp_path / "bit", saved.arrays, DEPTHS, extra=extra)
    else:
        path = _written_without_tracing(tmp_path / "bit", edit(saved.arrays))
    with pytest.raises(CheckpointError, match=message):
        load_source(path)


def _written_without_tracing(path, arrays):
    """A SavedModel holding `arrays` as named variables and no function: what the reader reads
    (the BiT's call would not trace on weights of the wrong shapes)."""
    import tensorflow as tf

    module = tf.Module()
    module.weights_ = [tf.Variable(value, name=name) for name, value in arrays.items()]
    tf.saved_model.save(module, os.fspath(path))
    return path


def test_a_savedmodel_without_bit_variables_is_refused_by_the_reader(tmp_path):
    """Read as format savedmodel, it is named as the file-type check names it, and so are the
    variables the checkpoint holds when saved_model.pb records no names."""
    from tfbit.filetypes import READS
    from tfbit.weights import savedmodel

    path = _written_without_tracing(tmp_path / "classifier", {"dense/kernel": np.zeros((4, 2), "float32")})
    expected = f"{path} is a TensorFlow SavedModel without BiT variables (its variables: dense/kernel): {READS}"
    with pytest.raises(CheckpointError) as info:
        load_source(path, format="savedmodel")
    assert str(info.value) == expected
    with pytest.raises(CheckpointError) as info:
        savedmodel.npz_keys(savedmodel.read_variables(str(path)), path)
    assert str(info.value) == expected


def test_a_savedmodel_without_its_variables_is_refused(saved, tmp_path):
    shutil.copytree(saved.head, tmp_path / "bit")
    shutil.rmtree(tmp_path / "bit" / "variables")
    with pytest.raises(CheckpointError) as info:
        load_source(tmp_path / "bit", format="savedmodel")
    assert str(info.value).startswith(
        f"{tmp_path / 'bit'} is a SavedModel folder without a readable variables checkpoint "
        "(variables/variables.index): "
    )


# -- handles, through the caches ------------------------------------------------------------------------


def test_a_handle_resolves_through_the_kagglehub_cache(saved, tmp_path, monkeypatch):
    """Every form of the handle finds the cache kagglehub writes; kagglehub itself finds the same
    folder there (its layout, not ours), and the newest complete version serves a handle without one."""
    import kagglehub

    monkeypatch.setenv("KAGGLEHUB_CACHE", str(tmp_path / "kagglehub"))
    monkeypatch.setenv("TFHUB_CACHE_DIR", str(tmp_path / "tfhub"))
    folder = kagglehub_cache(tmp_path / "kagglehub", saved.features, KAGGLE)
    newer = kagglehub_cache(tmp_path / "kagglehub", saved.features, KAGGLE[:-1] + "2")
    shutil.copytree(saved.features, newer[:-1] + "3")  # a download that never completed: no marker
    assert kagglehub.model_download(KAGGLE) == folder
    for text in (TFHUB, KAGGLE, "https://www.kaggle.com/models/google/bit/TensorFlow2/m-r50x1/1"):
        assert tfhub.resolve(text) == (folder, "bit-m-r50x1"), text
    assert tfhub.resolve("google/bit/tensorFlow2/m-r50x1") == (newer, "bit-m-r50x1")
    loaded = load_source(TFHUB)
    assert (loaded.format, loaded.name, loaded.path, loaded.checkpoint.has_head) == (
        "savedmodel",
        "bit-m-r50x1",
        folder,
        False,
    )


def test_a_tfhub_preset_is_the_full_size_module_in_the_kagglehub_cache(tmp_path, monkeypatch):
    """`bit-m-r50x1-tfhub-feature-vector` names its module's handle: a full-size headless R50x1 in
    kagglehub's cache passes the preset's architecture check, is evaluated at the preset's 224 and
    computes the module's features; the ILSVRC-2012 preset of the same cache is refused, naming the
    head it lacks."""
    import tfbit
    from tfbit.weights import read_preset

    monkeypatch.setenv("KAGGLEHUB_CACHE", str(tmp_path / "kagglehub"))
    monkeypatch.setenv("TFHUB_CACHE_DIR", str(tmp_path / "tfhub"))
    arrays = write_original_npz(tmp_path / "r50x1.npz", (3, 4, 6, 3))
    module = write_bit_saved_model(tmp_path / "module", arrays, (3, 4, 6, 3), head=False)
    kagglehub_cache(tmp_path / "kagglehub", module, KAGGLE)
    checkpoint = read_preset("bit-m-r50x1-tfhub-feature-vector")
    assert (checkpoint.format, checkpoint.name, checkpoint.preprocessor["size"]) == (
        "savedmodel",
        "bit-m-r50x1-tfhub-feature-vector",
        {"height": 224, "width": 224},
    )
    model = tfbit.BitModel.from_preset("bit-m-r50x1-tfhub-feature-vector")
    x = random_images01(1, 64, seed=2)
    assert_parity(_output(model, x * 2 - 1), call_saved_model(module, x), "tfhub preset")
    kagglehub_cache(tmp_path / "kagglehub", module, "google/bit/tensorFlow2/m-r50x1-ilsvrc2012-classification/1")
    with pytest.raises(
        CheckpointError, match="is not preset bit-m-r50x1-tfhub-ilsvrc2012: num_labels 0 .expected 1000."
    ):
        read_preset("bit-m-r50x1-tfhub-ilsvrc2012")


def test_every_source_of_the_docs_block_is_read(saved, tmp_path, monkeypatch):
    """docs/conversion.md's TF Hub block as typed: each SOURCE is read as a BiT SavedModel, its module
    in kagglehub's cache under the Kaggle handle the source names (the folder of the last line in a
    home folder, expanded as the shell would). The converter itself runs on a handle below."""
    import re

    page = open(os.path.join(ROOT, "docs", "conversion.md"), encoding="utf-8").read()
    (body,) = re.findall(r"```bash\n(python -m conversion.convert https://tfhub.dev/.*?)```", page, re.S)
    monkeypatch.setenv("KAGGLEHUB_CACHE", str(tmp_path / "kagglehub"))
    monkeypatch.setenv("TFHUB_CACHE_DIR", str(tmp_path / "tfhub"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    sources = [line.split()[3] for line in body.splitlines()]
    assert len(sources) == 5 and sources[-1].startswith("~/"), sources
    for source in sources:
        if source.startswith("~/"):
            shutil.copytree(saved.features, os.path.expanduser(source))
        else:
            kagglehub_cache(tmp_path / "kagglehub", saved.features, str(tfhub.kaggle_handle(source)))
        loaded = load_source(os.path.expanduser(source))
        assert (loaded.format, loaded.config.depths) == ("savedmodel", list(DEPTHS)), source


def test_a_tfhub_handle_resolves_through_tensorflow_hubs_cache(saved, tmp_path, monkeypatch):
    """tensorflow_hub caches a module in a folder named by the sha1 of the handle as typed; an
    ILSVRC-2012 head has the ImageNet-1k names."""
    monkeypatch.setenv("KAGGLEHUB_CACHE", str(tmp_path / "kagglehub"))
    monkeypatch.setenv("TFHUB_CACHE_DIR", str(tmp_path / "tfhub"))
    handle = "https://tfhub.dev/google/bit/m-r50x1/ilsvrc2012_classification/1"
    folder = tmp_path / "tfhub" / hashlib.sha1(handle.encode("utf8")).hexdigest()
    arrays = write_original_npz(tmp_path / "in1k.npz", **SMALL_NPZ, num_classes=1000)
    write_bit_saved_model(folder, arrays, DEPTHS)
    assert tfhub.resolve(handle) == (str(folder), "bit-m-r50x1-ilsvrc2012-classification")
    loaded = load_source(handle)
    assert loaded.name == "bit-m-r50x1-ilsvrc2012-classification" and loaded.config.num_labels == 1000
    assert loaded.config.id2label[0] == "tench, Tinca tinca"


def test_a_tf1_hub_module_in_a_cache_is_named(tmp_path, monkeypatch):
    """A handle whose cached download is a TF1 Hub module (hub.Module format) is named as one."""
    import tensorflow as tf

    monkeypatch.setenv("KAGGLEHUB_CACHE", str(tmp_path / "kagglehub"))
    module = tf.Module()
    module.v = tf.Variable(1.0)
    tf.saved_model.save(module, str(tmp_path / "module"))
    (tmp_path / "module" / "tfhub_module.pb").write_bytes(b"\x08\x03")
    folder = kagglehub_cache(tmp_path / "kagglehub", tmp_path / "module", KAGGLE)
    with pytest.raises(CheckpointError) as info:
        load_source(TFHUB)
    assert str(info.value).startswith(f"{folder} is a TF1 Hub module (hub.Module, TensorFlow 1 format): ")


def test_a_handle_in_no_cache_is_downloaded_by_kagglehub_and_its_failure_named(tmp_path, monkeypatch):
    """kagglehub's own download runs; offline (its API endpoint refusing connections) it fails, named."""
    monkeypatch.setenv("KAGGLEHUB_CACHE", str(tmp_path / "kagglehub"))
    monkeypatch.setenv("TFHUB_CACHE_DIR", str(tmp_path / "tfhub"))
    monkeypatch.setenv("KAGGLE_API_ENVIRONMENT", "LOCALHOST")
    with pytest.raises(MissingFileError) as info:
        load_source(TFHUB)
    message = str(info.value)
    assert message.startswith(
        f"{TFHUB} is not in the kagglehub cache ({tmp_path / 'kagglehub'}) nor tensorflow_hub's "
        f"({tmp_path / 'tfhub'}), "
        f"and kagglehub could not download {KAGGLE} (ConnectionError: "
    )
    assert message.endswith("check the handle and the network, or download the SavedModel and pass its folder")


# -- the converter, as typed ---------------------------------------------------------------------------


def _report(output):
    return json.loads((output / "report.json").read_text())


def test_the_converter_verifies_every_export_against_the_savedmodel(saved, tmp_path):
    done = convert(saved.head, "--output", tmp_path / "out", "--num-images", "4", "--tflite", "fp32", "fp16")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"reference: the SavedModel's own call ({saved.head})" in done.stdout
    report = _report(tmp_path / "out")
    assert (report["format"], report["reference"], report["passed"]) == ("savedmodel", "savedmodel", True)
    verified = {a["artifact"]: a["passed"] and a["published"] for a in report["artifacts"]}
    assert verified == dict.fromkeys(
        ["keras", "saved_model[pixel_values]", "saved_model[image_bytes]", "tflite_fp32", "tflite_fp16"], True
    )


def test_the_converter_reads_a_feature_vector_handle_from_the_kagglehub_cache(saved, tmp_path):
    kagglehub_cache(tmp_path / "kagglehub", saved.features, KAGGLE)
    offline = {"KAGGLEHUB_CACHE": str(tmp_path / "kagglehub"), "KAGGLE_API_ENVIRONMENT": "LOCALHOST"}
    done = convert(
        TFHUB,
        "--output",
        tmp_path / "out",
        "--formats",
        "keras",
        "--task",
        "features",
        "--num-images",
        "4",
        env=offline,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = _report(tmp_path / "out")
    assert (report["name"], report["format"], report["reference"], report["passed"]) == (
        "bit-m-r50x1",
        "savedmodel",
        "savedmodel",
        True,
    )
    assert (tmp_path / "out" / "bit-m-r50x1.keras").is_file()
