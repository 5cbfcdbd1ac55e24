"""Every checkpoint format tfbit reads, and nothing else: readers, one mapping table per format,
format detection, architecture inference and labels. No model is built here and torch is only
needed to read PyTorch pickles.

Formats (`detect_format` tells them apart):

* ``hf``    -- a transformers checkpoint directory (``config.json`` with ``model_type: bit``) or a
  hub repo ``owner/name`` (`tfbit.weights.hf`).
* ``timm``  -- a timm ``resnetv2_*_bit`` state dict, timm hub snapshot directory, or hub name
  ``timm/<name>`` / ``hf-hub:<owner>/<name>`` (`tfbit.weights.timm`).
* ``npz``   -- an original BiT release file, e.g. ``BiT-M-R50x1.npz`` (`tfbit.weights.npz`).
* ``h5``    -- an original BiT TF2 file, e.g. ``BiT-M-R50x1.h5`` (``.h5`` or ``.hdf5``): the Keras 2
  ``save_weights`` of the original code's model, read with h5py (`tfbit.weights.h5`).
* ``savedmodel`` -- a TF Hub / Kaggle Models BiT SavedModel: its folder, or a handle
  (``https://tfhub.dev/google/bit/m-r50x1/1``, ``google/bit/tensorFlow2/m-r50x1/1``, a Kaggle URL)
  found in the kagglehub or tensorflow_hub cache, else downloaded (`tfbit.weights.savedmodel`).
* ``keras`` -- a tfbit ``.keras`` file; a whole model, loaded by `tfbit.models.pretrained`.
"""

import dataclasses
import os
from pathlib import Path

from tfbit.errors import ConfigError, MissingFileError
from tfbit.filetypes import check_source
from tfbit.models.config import BitConfig, read_json
from tfbit.models.presets import fetch, suggest
from tfbit.models.presets import get as get_preset
from tfbit.weights import h5, hf, hub, npz, savedmodel, tfhub, timm
from tfbit.weights.checkpoint import Checkpoint, CheckpointError
from tfbit.weights.readers import read_state_dict, safetensors_keys

FORMATS = ("hf", "timm", "npz", "h5", "savedmodel", "keras")
_STATE_DICT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")


def detect_format(source, format=None):
    """'hf', 'timm', 'npz', 'h5', 'savedmodel' or 'keras' for a directory, file or hub name; `format` overrides."""
    return _detect(os.fspath(source), format)[0]


def _detect(path, format):
    """(format, the state dict when detection had to read it whole -- a pickle -- else None)."""
    if format is not None:
        if format not in FORMATS:
            raise ConfigError(f"format={format!r} is not one of {', '.join(FORMATS)}")
        return format, None
    if os.path.isdir(path):
        return _directory_format(path), None
    if os.path.isfile(path):
        return _file_format(path)
    if tfhub.is_handle(path):
        return "savedmodel", None
    if timm.is_hub_name(path):
        return "timm", None
    if hub.is_repo_id(path):
        return "hf", None
    raise MissingFileError(
        f"{path}: no such file or directory, and not a hub repo id "
        f"(owner/name, timm/<name> or hf-hub:<owner>/<name>), a TF Hub / Kaggle Models handle "
        f"(https://tfhub.dev/google/bit/m-r50x1/1, google/bit/tensorFlow2/m-r50x1/1) nor a preset ({suggest(path)})"
    )


def _directory_format(path):
    check_source(path)  # a SavedModel without BiT variables or a TF1 Hub module folder is named as one
    if savedmodel.is_saved_model(path):
        return "savedmodel"
    file = os.path.join(path, "config.json")
    if not os.path.isfile(file):
        raise CheckpointError(
            f"{path} has no config.json: expected a transformers or timm checkpoint "
            "directory (or pass the weight file itself)"
        )
    config = read_json(file)
    if config.get("model_type") == "bit":
        return "hf"
    if "architecture" in config:  # timm hub repos describe themselves this way
        return "timm"
    raise CheckpointError(f"{file} describes model_type={config.get('model_type')!r}, not a BiT checkpoint")


def _file_format(path):
    suffix = Path(path).suffix.lower()
    if suffix in h5.SUFFIXES:
        return "h5", None  # its reader names an HDF5 file of another layout, and the .npz to read instead
    check_source(path)  # a TFLite, ONNX, TorchScript or image file is named as one
    if suffix in (".npz", ".keras"):
        return suffix[1:], None
    if suffix not in _STATE_DICT_SUFFIXES:
        raise CheckpointError(
            f"cannot tell the format of {path} from its extension: pass the format (one of {', '.join(FORMATS)})"
        )
    if suffix == ".safetensors":
        tensors, keys = None, safetensors_keys(path)  # the header is enough
    else:
        tensors = keys = read_state_dict(path)  # a pickle must be read whole: keep it
    if any(k.startswith(("stem.", "stages.")) for k in keys):
        return "timm", tensors
    if any(k.startswith(("bit.", "embedder.", "encoder.")) for k in keys):
        raise CheckpointError(
            f"{path} is a transformers BiT state dict, whose architecture lives in "
            "config.json: pass the checkpoint directory holding both"
        )
    raise CheckpointError(
        f"{path} is neither a timm ResNetV2-BiT nor a transformers BiT state dict "
        f"(keys look like: {', '.join(sorted(keys)[:3])})"
    )


def _read_hf(source):
    directory = hf.checkpoint_dir(source)
    name = os.path.basename(os.path.abspath(source)) if os.path.exists(source) else source.rstrip("/").split("/")[-1]
    files = tuple(os.path.join(directory, f) for f in os.listdir(directory))
    return Checkpoint(
        "hf",
        name,
        directory,
        hf.read_config(directory),
        hf.read_tensors(directory),
        hf.TABLE,
        0,
        hf.read_preprocessor(directory),
        files,
    )


def read_checkpoint(source, format=None):
    """A `Checkpoint` of any supported source except `.keras` files (whole models).

    Args:
        source: a path (directory, weight file, `.npz`, `.h5`, SavedModel folder), a hub name or a
            TF Hub / Kaggle Models handle.
        format: one of `FORMATS` to skip detection.
    """
    source = os.fspath(source)
    format, tensors = _detect(source, format)
    if format == "keras":
        raise CheckpointError(
            f"{source} is a .keras model, not a checkpoint: load it with keras.saving.load_model or tfbit.load_model"
        )
    if format == "timm":
        return timm.read(source, tensors)
    if format == "npz" and h5.is_hdf5(source):  # numpy would call it pickled data
        raise CheckpointError(
            f"{source} is an HDF5 file, not an .npz archive: read it as format h5 (--source-format h5)"
        )
    return {"hf": _read_hf, "npz": npz.read, "h5": h5.read, "savedmodel": savedmodel.read}[format](source)


# What a preset's checkpoint must agree on with the preset (padding and eps follow the source).
_PRESET_FIELDS = ("num_channels", "embedding_size", "stage_channels", "depths", "layer_type", "num_labels")


def _with_preset_labels(checkpoint, preset):
    """The preset's class names in place of the LABEL_<i> a file without names gets: a head's size
    tells ImageNet apart, not one VTAB task's from another's (a 10-class head is SVHN or EuroSAT)."""
    names = preset.label_names
    config = checkpoint.config
    if names is None or config.id2label != {i: f"LABEL_{i}" for i in range(config.num_labels)}:
        return checkpoint
    fields = {**config.to_dict(), "id2label": dict(enumerate(names))}
    del fields["label2id"]  # derived from the new names
    return dataclasses.replace(checkpoint, config=BitConfig.from_dict(fields))


def read_preset(name):
    """A `Checkpoint` of a named preset (`tfbit.models.presets`): its source fetched (hub or cached
    download) and read, refused when its architecture is not the preset's, named after it
    (`bit-m-r50x1`; a hub id preset by its repo name, `bit-50`, as the hub source would be)."""
    preset = get_preset(name)
    checkpoint = read_checkpoint(fetch(preset), preset.format)
    expected = BitConfig(**preset.architecture)
    wrong = [
        f"{field} {getattr(checkpoint.config, field)} (expected {getattr(expected, field)})"
        for field in _PRESET_FIELDS
        if getattr(checkpoint.config, field) != getattr(expected, field)
    ]
    if wrong:
        raise CheckpointError(f"{checkpoint.path} is not preset {preset.name}: " + ", ".join(wrong))
    checkpoint = _with_preset_labels(checkpoint, preset)
    name = preset.name.rsplit("/", 1)[-1]
    if preset.format in ("npz", "savedmodel"):
        # the files say nothing of their evaluation size: the reader assumes the pre-training 224,
        # the preset knows the fine-tune's (480 ILSVRC-2012, 128 CIFAR-10, 160 distilled, ...)
        preprocessor = npz.original_preprocessor(preset.resolution).to_dict()
        return dataclasses.replace(checkpoint, name=name, preprocessor=preprocessor)
    return dataclasses.replace(checkpoint, name=name)


__all__ = ["FORMATS", "Checkpoint", "CheckpointError", "detect_format", "read_checkpoint", "read_preset"]
