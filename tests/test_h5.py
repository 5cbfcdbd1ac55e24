"""The original BiT TF2 `.h5` files (`tfbit.weights.h5`): files built with h5py in the layout Keras
2's `save_weights` gives `bit_tf2.models.ResnetV2`, read as the `.npz` of the same weights is
(bitwise the same outputs) and as timm's `.npz` loader reads that; every refusal by its message,
and the converter on one as a user types it."""

import functools
import json
import os

import h5py
import numpy as np
import pytest
from conftest import assert_parity, load_source, random_images, run_convert, run_torch
from test_timm_parity import SMALL_NPZ, timm_from_npz, write_original_npz

from tfbit.weights import CheckpointError, detect_format

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
URL = "https://storage.googleapis.com/bit_models/"
CLASSES = 7

# A unit's variables in the order bit_tf2's BottleneckV2Unit creates them: its Sequentials a, b
# and c (GroupNorm gamma and beta, then the conv) and the projection, built last.
UNIT_WEIGHTS = (
    "a/group_norm/gamma",
    "a/group_norm/beta",
    "a/standardized_conv2d/kernel",
    "b/group_norm/gamma",
    "b/group_norm/beta",
    "b/standardized_conv2d/kernel",
    "c/group_norm/gamma",
    "c/group_norm/beta",
    "c/standardized_conv2d/kernel",
    "a/proj/standardized_conv2d/kernel",
)


def _sequential_scopes(layer, inner, repeat):
    """Each Sequential built as its own graph network: scopes start afresh in it, and a scope
    entered again gets Keras' suffix (the second block's unit01 is unit01_1)."""
    if layer == "root_block":
        return f"{inner}:0"
    if layer.startswith("block"):
        unit, rest = inner.split("/", 1)
        return f"{unit}{f'_{repeat}' if repeat else ''}/{rest}:0"
    return f"{layer}/{inner}:0"


# How the saving TensorFlow named the variables (tfbit/weights/h5.py): the model "resnet" called,
# the model built with model.build (no model scope), or Sequentials as graph networks.
NAMINGS = {
    "resnet scope": lambda layer, inner, repeat: f"resnet/{layer}/{inner}:0",
    "no model scope": lambda layer, inner, repeat: f"{layer}/{inner}:0",
    "sequential scopes": _sequential_scopes,
}


def keras2_layers(arrays, depths, naming="resnet scope", head=True):
    """{layer name: [(variable name, array)]} in model.layers order, from `.npz` arrays."""
    name = NAMINGS[naming]
    stem = arrays["resnet/root_block/standardized_conv2d/kernel"]
    layers = {"root_block": [(name("root_block", "standardized_conv2d/kernel", 0), stem)]}
    for b, depth in enumerate(depths, 1):
        layers[f"block{b}"] = [
            (name(f"block{b}", f"unit{u:02d}/{w}", sum(d >= u for d in depths[: b - 1])), arrays[key])
            for u in range(1, depth + 1)
            for w in UNIT_WEIGHTS
            if (key := f"resnet/block{b}/unit{u:02d}/{w}") in arrays
        ]
    layers["group_norm"] = [(name("group_norm", w, 0), arrays[f"resnet/group_norm/{w}"]) for w in ("gamma", "beta")]
    layers[f"re_lu_{3 * sum(depths)}"] = []  # auto-named after the units' ReLUs
    layers["global_average_pooling2d"] = []
    if head:
        kernel = arrays["resnet/head/conv2d/kernel"]
        layers["head/dense"] = [
            (name("head/dense", "kernel", 0), kernel.reshape(kernel.shape[-2:])),
            (name("head/dense", "bias", 0), arrays["resnet/head/conv2d/bias"]),
        ]
    return layers


def write_keras2_h5(path, layers):
    """What Keras 2's save_weights_to_hdf5_group writes (TF 2.x hdf5_format.py): layer_names,
    one group per layer in sorted order, its weight_names and a dataset at each name. Name lists
    are fixed-length byte strings, as h5py 2 stored Keras' lists (an empty one as floats)."""
    with h5py.File(path, "w") as f:
        f.attrs["layer_names"] = np.asarray([name.encode("utf8") for name in layers])
        f.attrs["backend"] = b"tensorflow"
        f.attrs["keras_version"] = b"2.3.0-tf"
        for layer in sorted(layers):
            group = f.create_group(layer)
            group.attrs["weight_names"] = np.asarray([name.encode("utf8") for name, _ in layers[layer]])
            for name, value in layers[layer]:
                group.create_dataset(name, data=value)
    return path


@pytest.fixture
def bit_files(tmp_path):
    """Factory: the same random small BiT as an original `.npz` and `.h5` -> (npz path, h5 path)."""

    def make(name="BiT-S-R14", naming="resnet scope", head=True, edit=None):
        arrays = write_original_npz(tmp_path / f"{name}.npz", **SMALL_NPZ, num_classes=CLASSES)
        if not head:
            np.savez(tmp_path / f"{name}.npz", **{k: v for k, v in arrays.items() if "/head/" not in k})
        layers = keras2_layers(arrays, SMALL_NPZ["depths"], naming, head)
        if edit is not None:
            edit(layers)
        return tmp_path / f"{name}.npz", write_keras2_h5(tmp_path / f"{name}.h5", layers)

    return make


def _output(model, x):
    out = model(x)
    return np.asarray(out["pooler_output"] if isinstance(out, dict) else out)


# -- reading ------------------------------------------------------------------------------------------


def test_h5_and_hdf5_files_are_detected_and_the_format_can_be_forced(bit_files, tmp_path):
    _, h5_path = bit_files()
    assert detect_format(h5_path) == "h5"
    hdf5 = tmp_path / "BiT-S-R14.hdf5"
    hdf5.write_bytes(h5_path.read_bytes())
    assert detect_format(hdf5) == "h5"
    renamed = tmp_path / "bit_weights.bin5"
    renamed.write_bytes(h5_path.read_bytes())
    with pytest.raises(ValueError, match="bit_weights.bin5.*pass the format.*npz, h5, savedmodel, keras"):
        detect_format(renamed)
    loaded = load_source(renamed, format="h5")
    assert loaded.format == "h5" and loaded.name == "bit_weights"


@pytest.mark.parametrize(
    "naming, head",
    [("resnet scope", True), ("no model scope", True), ("sequential scopes", True), ("resnet scope", False)],
)
def test_h5_computes_what_the_npz_and_timm_compute(naming, head, bit_files):
    npz_path, h5_path = bit_files(naming=naming, head=head)
    from_h5, from_npz = load_source(h5_path), load_source(npz_path)
    assert (from_h5.format, from_h5.name, from_h5.checkpoint.has_head) == ("h5", "BiT-S-R14", head)
    assert from_h5.config == from_npz.config and from_h5.preprocessor == from_npz.preprocessor
    assert from_h5.config.ws_eps == 1e-10 and from_h5.config.num_labels == (CLASSES if head else 0)
    x = random_images(2, 64, 64)
    np.testing.assert_array_equal(_output(from_h5.model, x), _output(from_npz.model, x))
    reference = timm_from_npz(npz_path, **SMALL_NPZ, num_classes=CLASSES if head else 0)
    delta = assert_parity(_output(from_h5.model, x), run_torch(reference, x), f"h5 ({naming}, head {head})")
    print(f"PARITY h5 {naming}, head {head} vs timm's npz loader: {delta:.3g} of the scale")


def test_r50x1_h5_with_its_release_name_matches_timm(tmp_path, torch_module):
    arrays = write_original_npz(tmp_path / "BiT-S-R50x1.npz", depths=(3, 4, 6, 3), num_classes=1000)
    h5_path = write_keras2_h5(tmp_path / "BiT-S-R50x1.h5", keras2_layers(arrays, (3, 4, 6, 3)))
    loaded = load_source(h5_path)
    assert loaded.config.depths == [3, 4, 6, 3] and loaded.config.embedding_size == 64
    assert loaded.config.num_labels == 1000 and loaded.config.id2label[0] == "tench, Tinca tinca"
    reference = timm_from_npz(tmp_path / "BiT-S-R50x1.npz", (3, 4, 6, 3), (64, 128, 256, 512), 64, 1000)
    x = random_images(1, 224, 224)
    delta = assert_parity(loaded.model(x), run_torch(reference, x), "h5 R50x1")
    print(f"PARITY h5 R50x1 vs timm's npz loader: {delta:.3g} of the scale")


# -- refusals -----------------------------------------------------------------------------------------


def _drop(layer, name):
    return lambda layers: layers.__setitem__(layer, [w for w in layers[layer] if w[0] != name])


def _reshape(layer, name, fn):
    return lambda layers: layers.__setitem__(layer, [(n, fn(v) if n == name else v) for n, v in layers[layer]])


def _copy(layer, name, new):
    return lambda layers: layers[layer].append((new, dict(layers[layer])[name]))


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            _drop("block2", "resnet/block2/unit02/b/group_norm/beta:0"),
            r"BiT-S-R14.h5 does not fit .*\n  missing weights \(1\):\n    stage2_unit2_norm2/beta\n",
        ),
        (
            _reshape("block3", "resnet/block3/unit01/b/standardized_conv2d/kernel:0", lambda a: a[..., :-8]),
            r"(?s)wrongly shaped keys \(1\):\n    resnet/block3/unit01/b/standardized_conv2d/kernel: shape "
            r"\(3, 3, 128, 120\) \(as stage3_unit1_conv2/kernel\), model expects \(3, 3, 128, 128\)\n",
        ),
        (
            _reshape("head/dense", "resnet/head/dense/kernel:0", lambda a: a[:-8]),
            r"(?s)wrongly shaped keys.*resnet/head/dense/kernel: shape \(1016, 7\) \(as classifier/kernel\), "
            r"model expects \(1024, 7\)",
        ),
        (
            _reshape("head/dense", "resnet/head/dense/kernel:0", lambda a: a[None, None]),  # the npz's 1x1 conv
            r"resnet/head/dense/kernel has shape \(1, 1, 1024, 7\), expected a 2-D classifier kernel; ",
        ),
        (
            _drop("root_block", "resnet/root_block/standardized_conv2d/kernel:0"),
            r"cannot infer the architecture, there is no stem convolution kernel.*; ",
        ),
        (
            _copy("block1", "resnet/block1/unit01/a/group_norm/gamma:0", "unit01_1/a/group_norm/gamma:0"),
            r"BiT-S-R14.h5: block1/resnet/block1/unit01/a/group_norm/gamma:0 and "
            r"block1/unit01_1/a/group_norm/gamma:0 are both resnet/block1/unit01/a/group_norm/gamma, which "
            r"tfbit cannot tell apart; ",
        ),
    ],
    ids=["missing weight", "wrong shape", "wrong head shape", "conv head", "no stem", "same weight twice"],
)
def test_broken_files_are_refused_by_key(edit, message, bit_files):
    _, path = bit_files(edit=edit)
    with pytest.raises(CheckpointError, match=message) as info:
        load_source(path)
    assert str(info.value).endswith(
        "the original BiT weights are also released as .npz files, which tfbit reads "
        "(BiT-M-R50x1.h5 -> BiT-M-R50x1.npz)"
    )


def _delete(name):
    def edit(path):
        with h5py.File(path, "a") as f:
            del f[name]

    return edit


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize(
    "damage, message",
    [
        (
            _delete("block4/resnet/block4/unit01/c/group_norm/beta:0"),
            "{path}: layer block4 lists weights it does not hold (resnet/block4/unit01/c/group_norm/beta:0): a "
            "truncated or edited file; ",
        ),
        (_delete("block4"), "{path} lists layer block4 but holds no group of that name; "),
        (_truncate, "{path} is not a readable HDF5 file: "),
    ],
    ids=["weight", "layer", "truncated"],
)
def test_damaged_files_are_refused(damage, message, bit_files):
    _, path = bit_files(name="BiT-M-R50x1")
    damage(path)
    with pytest.raises(CheckpointError) as info:
        load_source(path)
    assert str(info.value).startswith(message.format(path=path))
    assert str(info.value).endswith(
        f"BiT-M-R50x1.npz of the original release ({URL}BiT-M-R50x1.npz) holds the BiT-M-R50x1 weights, and tfbit "
        "reads it"
    )


def test_a_release_name_on_another_architecture_is_refused(bit_files):
    _, path = bit_files(name="BiT-S-R50x3")  # what BiT-S-R50x3.h5 was found to hold (issue #47)
    with pytest.raises(CheckpointError) as info:
        load_source(path)
    assert str(info.value) == (
        f"{path} holds a BiT of [1, 2, 1, 1] units per stage with a 32-wide stem, not the R50x3 its name says "
        f"([3, 4, 6, 3], 192); BiT-S-R50x3.npz of the original release ({URL}BiT-S-R50x3.npz) holds the "
        "BiT-S-R50x3 weights, and tfbit reads it"
    )


def _keras3_weights(path):
    import keras

    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    model.save_weights(path)


def _plain_hdf5(path):
    with h5py.File(path, "w") as f:
        f["images"] = np.zeros((2, 8, 8), "uint8")


def _other_keras2_model(path):
    write_keras2_h5(path, {"input_1": [], "dense": [("dense/kernel:0", np.zeros((4, 3), "float32"))]})


@pytest.mark.parametrize(
    "name, write, message",
    [
        (
            "mine.weights.h5",
            _keras3_weights,
            "mine.weights.h5 is an HDF5 file without the Keras 2 layer_names of the original BiT code (it holds "
            "layers, vars: the layout of a Keras 3 .weights.h5); the original BiT weights are also released as "
            ".npz files, which tfbit reads (BiT-M-R50x1.h5 -> BiT-M-R50x1.npz)",
        ),
        (
            "BiT-M-R50x1.hdf5",
            _plain_hdf5,
            "BiT-M-R50x1.hdf5 is an HDF5 file without the Keras 2 layer_names of the original BiT code (it holds "
            f"images); BiT-M-R50x1.npz of the original release ({URL}BiT-M-R50x1.npz) holds the BiT-M-R50x1 "
            "weights, and tfbit reads it",
        ),
        (
            "classifier.h5",
            _other_keras2_model,
            "classifier.h5 has the Keras 2 layer_names of another model (input_1, dense), not the original BiT "
            "code's root_block; the original BiT weights are also released as .npz files",
        ),
        (
            "BiT-S-R101x1.h5",
            lambda path: path.write_bytes(b"<html>404 Not Found</html>"),
            "BiT-S-R101x1.h5 is not a readable HDF5 file: ",
        ),
    ],
    ids=["keras 3 weights", "other hdf5", "other keras 2 model", "not hdf5"],
)
def test_files_that_are_not_the_original_layout_are_refused(name, write, message, tmp_path):
    write(tmp_path / name)
    with pytest.raises(CheckpointError) as info:
        load_source(tmp_path / name)
    assert f"{tmp_path / name}" in str(info.value) and message in str(info.value)


def test_an_h5_read_as_npz_is_named_hdf5(bit_files):
    _, path = bit_files()
    with pytest.raises(CheckpointError) as info:
        load_source(path, format="npz")
    assert str(info.value) == f"{path} is an HDF5 file, not an .npz archive: read it as format h5 (--source-format h5)"


# -- the converter, as typed ---------------------------------------------------------------------------


convert = functools.partial(run_convert, timeout=600)


def test_the_converter_exports_an_h5(bit_files, tmp_path):
    _, path = bit_files()
    done = convert(path, "--output", tmp_path / "out", "--formats", "keras", "--num-images", "4")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["passed"] and report["format"] == "h5" and report["reference"] == "pytorch"
    assert (tmp_path / "out" / "BiT-S-R14.keras").is_file()


def test_the_converter_refuses_a_keras3_weights_file_in_one_line(tmp_path):
    _keras3_weights(tmp_path / "model.weights.h5")
    done = convert(tmp_path / "model.weights.h5", "--output", tmp_path / "out")
    assert done.returncode == 2, done.stdout[-3000:] + done.stderr[-3000:]
    first = done.stderr.splitlines()[0] if done.stderr else ""
    expected = f"error: {tmp_path / 'model.weights.h5'} is an HDF5 file without the Keras 2 layer_names"
    assert first.startswith(expected) and done.stderr.strip() == first, done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "out").exists()
