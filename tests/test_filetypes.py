"""A model file or folder of a kind no tfbit reader takes is named for what it is, with what tfbit
reads, before TensorFlow loads: each file built by the library that writes it, each command line
run as typed in a fresh process."""

import os
import shutil
import subprocess
import sys

import pytest

from tfbit.filetypes import READS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PHOTO = os.path.join(ROOT, "conversion", "photos", "coffee.jpg")


def _tiny_keras():
    import keras

    inputs = keras.Input((4,))
    return keras.Model(inputs, keras.layers.Dense(2)(inputs))


def _tflite(path):
    import tensorflow as tf

    with open(path, "wb") as f:
        f.write(tf.lite.TFLiteConverter.from_keras_model(_tiny_keras()).convert())


def _saved_model(path, name=None):
    import tensorflow as tf

    module = tf.Module()
    module.v = tf.Variable(1.0, name=name)
    tf.saved_model.save(module, path)


def _hub_module(path):
    """A TF1 Hub module's layout (hub.Module): the module descriptor beside a SavedModel."""
    _saved_model(path)
    with open(os.path.join(path, "tfhub_module.pb"), "wb") as f:
        f.write(b"\x08\x03")  # ModuleDef {format: 3}


def _torchscript(path):
    import torch

    torch.jit.save(torch.jit.script(torch.nn.Linear(4, 2)), path)


def _keras3_weights(path):
    _tiny_keras().save_weights(path)


def _other_hdf5(path):
    import h5py
    import numpy as np

    with h5py.File(path, "w") as f:
        f["table"] = np.arange(6)


def _write(data):
    def build(path):
        with open(path, "wb") as f:
            f.write(data)

    return build


# (name as typed, build(path), what the message calls it)
KINDS = [
    ("model.tflite", _tflite, "a TFLite model (an export, not a checkpoint"),
    ("photo.jpg", lambda path: shutil.copy(PHOTO, path), "a JPEG image, not a checkpoint"),
    ("exported", _saved_model, "a TensorFlow SavedModel without BiT variables (its variables: Variable)"),
    ("module", _hub_module, "a TF1 Hub module (hub.Module, TensorFlow 1 format)"),
    ("scripted.pt", _torchscript, "a TorchScript program (torch.jit.save)"),
    ("model.onnx", _write(b"\x08\x07\x12\x07pytorch"), "an ONNX model"),
    ("model.weights.h5", _keras3_weights, "an HDF5 file without the Keras 2 layer_names of the original BiT code"),
    ("table.h5", _other_hdf5, "an HDF5 file without the Keras 2 layer_names of the original BiT code (it holds table)"),
    ("model.safetensors", _write(b""), "an empty file"),
]
COMMANDS = {
    "convert": "conversion.convert {} --output out",
    "finetune": "conversion.finetune {} --data data --output run --steps 1",
}


@pytest.fixture(scope="module")
def kinds(tmp_path_factory):
    folder = tmp_path_factory.mktemp("kinds")
    for name, build, _ in KINDS:
        build(str(folder / name))
    return folder


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("name, kind", [(name, kind) for name, _, kind in KINDS], ids=[k[0] for k in KINDS])
def test_each_command_line_names_the_kind_before_tensorflow_loads(kinds, name, kind, command):
    cwd = kinds / f"{command}-{name}"
    cwd.mkdir()
    os.symlink(kinds / name, cwd / name)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", *COMMANDS[command].format(name).split()],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    imported = [line.split("|")[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")]
    said = [line for line in done.stderr.splitlines() if not line.startswith("import time:")]
    assert done.returncode == 2, done.stderr[-3000:]
    assert said == [f"error: {name} is {kind}" + said[0].split(kind, 1)[1]] and said[0].endswith(f": {READS}"), said
    assert "tensorflow" not in imported and "keras" not in imported
    assert sorted(os.listdir(cwd)) == [name]  # nothing written


def test_the_python_api_raises_the_same_message(kinds):
    """tfbit.load_model and conversion.convert.convert name each kind as the command lines do
    (an .h5 with the .npz of the same weights, tests/test_h5.py)."""
    import tfbit
    from conversion import convert

    for name, _, kind in KINDS:
        with pytest.raises(tfbit.CheckpointError) as info:
            tfbit.load_model(str(kinds / name))
        assert str(info.value).startswith(f"{kinds / name} is {kind}"), str(info.value)
        assert name.endswith(".h5") or str(info.value).endswith(f": {READS}")
    with pytest.raises(convert.ConversionError, match=r"model\.tflite is a TFLite model .*: tfbit reads"):
        convert.convert(str(kinds / "model.tflite"), output=str(kinds / "api-out"))
    assert not (kinds / "api-out").exists()


def test_the_kinds_tfbit_reads_pass(tmp_path):
    """Every kind a reader takes, and a path that does not exist (the loaders name it), pass: a
    SavedModel holding a BiT's stem under any prefix included (its reader checks the rest)."""
    import numpy as np

    from tfbit.filetypes import unreadable_kind

    np.savez(tmp_path / "weights.npz", a=np.zeros(2))
    shutil.copytree(os.path.join(ROOT, "conversion", "default_checkpoint"), tmp_path / "checkpoint")
    _saved_model(str(tmp_path / "hub"), "resnet/root_block/standardized_conv2d/kernel")
    _saved_model(str(tmp_path / "wrapped"), "keras_layer/resnet/root_block/standardized_conv2d/kernel")
    paths = ["weights.npz", "checkpoint", "checkpoint/model.safetensors", "missing.pth", "hub", "wrapped"]
    for path in paths + ["google/bit-50", "https://tfhub.dev/google/bit/m-r50x1/1"]:
        assert unreadable_kind(str(tmp_path / path) if path in paths else path) is None, path


def test_a_damaged_saved_model_is_left_to_its_reader(tmp_path):
    """A saved_model.pb that cannot be parsed here is not named from its bytes: loading it does."""
    from tfbit.filetypes import saved_model_variable_names, unreadable_kind

    _saved_model(str(tmp_path / "cut"))
    pb = tmp_path / "cut" / "saved_model.pb"
    pb.write_bytes(pb.read_bytes()[: pb.stat().st_size // 2])
    assert saved_model_variable_names(str(tmp_path / "cut")) is None and unreadable_kind(str(tmp_path / "cut")) is None
