"""The original BiT TF2 files (google-research/big_transfer, `bit_tf2`), e.g. `BiT-M-R50x1.h5`,
read with h5py alone.

They are Keras 2 `save_weights` of `bit_tf2.models.ResnetV2`: the root attribute `layer_names`
lists the model's layers (`root_block`, `block1`..., `group_norm`, a ReLU, the pooling,
`head/dense`), each layer's group lists its variables in its `weight_names` attribute and holds
one dataset per name. The names are those the saving TensorFlow gave the variables: scoped by the
model (`resnet/block1/unit01/a/group_norm/gamma:0`) when it was called, without that scope when
it was built with `model.build`, or with every Sequential's scopes started afresh and Keras' `_1`
suffixes on repeated ones (`unit01_1/a/group_norm/gamma:0`; the unscoped
`standardized_conv2d/kernel:0` of big_transfer issue #47). Each is translated to the key of the
same weight in the release's `.npz`, so that the `.npz`'s table, architecture inference, labels
and preprocessing apply; only the head differs, a Dense layer (kernel (C, N)) where the `.npz`
has a 1x1 convolution.
"""

import os
import re
from pathlib import Path

import numpy as np

from tfbit.filetypes import hdf5_without_layer_names, listing
from tfbit.models.presets import NPZ_ROOT
from tfbit.weights import npz
from tfbit.weights.checkpoint import Checkpoint, CheckpointError
from tfbit.weights.infer import infer_config
from tfbit.weights.labels import known_labels
from tfbit.weights.timm import default_name

SUFFIXES = (".h5", ".hdf5")
_SCOPE = "resnet/"  # the .npz's scope, given to every translated name whatever the file's was
_ROOT_BLOCK = "root_block"  # the first layer of every ResnetV2
# The .npz's rows for the body; the Dense head's kernel already is the classifier's (in, out).
TABLE = [row for row in npz.TABLE if not row[1].startswith("classifier/")] + [
    (_SCOPE + "head/dense/kernel", "classifier/kernel", None),
    (_SCOPE + "head/dense/bias", "classifier/bias", None),
]
_REPEATED = re.compile(r"_\d+$")  # Keras' suffix on a name scope entered again: unit01_1
_INDEX = re.compile(r":\d+$")  # TensorFlow's output index on a variable name: kernel:0
# The released files' names, and the units per stage of each depth (bit_tf2/models.py NUM_UNITS)
_RELEASE = re.compile(r"BiT-[SM]-R(\d+)x(\d+)")
_DEPTHS = {50: [3, 4, 6, 3], 101: [3, 4, 23, 3], 152: [3, 8, 36, 3]}


def _release_npz(path):
    """Where the original release also holds the weights of the .h5 `path`: its .npz twin."""
    stem = Path(path).stem
    if _RELEASE.fullmatch(stem):
        return f"{stem}.npz of the original release ({NPZ_ROOT}{stem}.npz) holds the {stem} weights, and tfbit reads it"
    return (
        "the original BiT weights are also released as .npz files, which tfbit reads "
        "(BiT-M-R50x1.h5 -> BiT-M-R50x1.npz)"
    )


def _with_release_npz(message, path):
    """`message` and where the same weights can be read instead; a listing stays a listing."""
    return f"{message}\n  {_release_npz(path)}" if "\n" in message else f"{message}; {_release_npz(path)}"


def is_hdf5(path):
    """Whether `path` is an HDF5 file, by its content whatever its name."""
    import h5py

    return os.path.isfile(path) and h5py.is_hdf5(path)


def _names(attrs, name):
    """A Keras 2 list attribute as strings; absent, it is empty (as Keras 2 reads it)."""
    return [n.decode("utf8") if isinstance(n, bytes) else str(n) for n in np.atleast_1d(attrs.get(name, []))]


def _not_bit(file, layers):
    """What an HDF5 file without the original code's layers holds instead."""
    if layers:
        return (
            f"has the Keras 2 layer_names of another model ({listing(layers)}), not the original BiT code's root_block"
        )
    return f"is {hdf5_without_layer_names(file)}"


def _npz_key(layer, weight):
    """The .npz key of variable `weight` saved in layer group `layer`: the name from the layer's
    own scope on (whatever scoped the layer, if anything), Keras' repeat suffixes dropped."""
    parts = [_REPEATED.sub("", part) for part in _INDEX.sub("", weight).split("/")]
    own = layer.split("/")
    start = next((i for i in range(len(parts) - len(own)) if parts[i : i + len(own)] == own), None)
    return _SCOPE + "/".join(own + parts if start is None else parts[start:])


def _layer_weights(file, layer, path):
    """[(name as saved, dataset)] of `layer`, refusing names the file does not hold."""
    import h5py

    group = file.get(layer)
    if not isinstance(group, h5py.Group):
        raise CheckpointError(_with_release_npz(f"{path} lists layer {layer} but holds no group of that name", path))
    weights = [(name, group.get(name)) for name in _names(group.attrs, "weight_names")]
    missing = [name for name, dataset in weights if not isinstance(dataset, h5py.Dataset)]
    if missing:
        message = (
            f"{path}: layer {layer} lists weights it does not hold ({listing(missing)}): a truncated or edited file"
        )
        raise CheckpointError(_with_release_npz(message, path))
    return weights


def read_tensors(path):
    """{.npz key: array} of an original BiT .h5, or a CheckpointError naming what the file is."""
    import h5py

    try:
        with h5py.File(path, "r") as file:
            return _read_layers(file, path)
    except FileNotFoundError:
        raise
    except OSError as e:  # HDF5's own errors, on opening or reading a damaged file
        raise CheckpointError(_with_release_npz(f"{path} is not a readable HDF5 file: {e}", path)) from None


def _read_layers(file, path):
    layers = _names(file.attrs, "layer_names")
    if _ROOT_BLOCK not in layers:
        raise CheckpointError(_with_release_npz(f"{path} {_not_bit(file, layers)}", path))
    tensors, saved_as = {}, {}
    for layer in layers:
        for name, dataset in _layer_weights(file, layer, path):
            key = _npz_key(layer, name)
            if key in tensors:
                message = f"{path}: {saved_as[key]} and {layer}/{name} are both {key}, which tfbit cannot tell apart"
                raise CheckpointError(_with_release_npz(message, path))
            tensors[key], saved_as[key] = np.asarray(dataset), f"{layer}/{name}"
    return tensors


def _check_release_name(path, config):
    """Refuse a file named as a release but holding another architecture, which its name would
    mislabel: some released BiT-S .h5 files do (big_transfer issue #47)."""
    match = _RELEASE.fullmatch(Path(path).stem)
    if not match or int(match[1]) not in _DEPTHS:
        return
    # bit_tf2's stem has 16 * filters_factor channels, and train.py's filters_factor is 4 * width
    expected = (_DEPTHS[int(match[1])], 64 * int(match[2]))
    if (list(config.depths), config.embedding_size) != expected:
        raise CheckpointError(
            f"{path} holds a BiT of {list(config.depths)} units per stage with a "
            f"{config.embedding_size}-wide stem, not the R{match[1]}x{match[2]} its name says "
            f"({expected[0]}, {expected[1]}); {_release_npz(path)}"
        )


class H5Checkpoint(Checkpoint):
    """A `Checkpoint` of an .h5 whose refusals to fit a model say where the same weights are."""

    def load_into(self, model):
        try:
            return super().load_into(model)
        except CheckpointError as e:
            raise CheckpointError(_with_release_npz(str(e), self.path)) from None


def read(path):
    """A `Checkpoint` (format "h5") of an original BiT .h5, with the .npz's conventions: weight
    standardization eps 1e-10 and the original evaluation preprocessing (`npz.read`)."""
    path = os.fspath(path)
    tensors = read_tensors(path)
    name = default_name(path)
    labels = known_labels(np.size(tensors.get(_SCOPE + "head/dense/bias", ())), name)
    try:
        config = infer_config(tensors, TABLE, 1, path, labels, ws_eps=npz.WS_EPS)
    except CheckpointError as e:
        raise CheckpointError(_with_release_npz(str(e), path)) from None
    _check_release_name(path, config)
    return H5Checkpoint("h5", name, path, config, tensors, TABLE, 1, npz.original_preprocessor().to_dict(), (path,))
