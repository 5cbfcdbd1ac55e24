"""Hugging Face transformers BiT checkpoints: a directory with config.json (+ weights,
preprocessor_config.json) or a hub repo id."""

import os

from tfbit.errors import CheckpointError, MissingFileError
from tfbit.models.config import BitConfig, read_json
from tfbit.weights import hub
from tfbit.weights.readers import read_safetensors, read_torch_bin

_UNIT = r"encoder\.stages\.(?P<s>\d+)\.layers\.(?P<u>\d+)\."
_T = "stage{s}_unit{u}_"

# HF key (after the optional "bit." prefix) -> tfbit weight; index_base 0
TABLE = [
    (r"embedder\.convolution\.weight", "stem_conv/kernel", "oihw_to_hwio"),
    (r"embedder\.norm\.weight", "stem_norm/gamma", None),
    (r"embedder\.norm\.bias", "stem_norm/beta", None),
    (_UNIT + r"(?P<c>conv[123])\.weight", _T + "{c}/kernel", "oihw_to_hwio"),
    (_UNIT + r"(?P<n>norm[123])\.weight", _T + "{n}/gamma", None),
    (_UNIT + r"(?P<n>norm[123])\.bias", _T + "{n}/beta", None),
    (_UNIT + r"downsample\.conv\.weight", _T + "downsample_conv/kernel", "oihw_to_hwio"),
    (_UNIT + r"downsample\.norm\.weight", _T + "downsample_norm/gamma", None),
    (_UNIT + r"downsample\.norm\.bias", _T + "downsample_norm/beta", None),
    (r"norm\.weight", "norm/gamma", None),
    (r"norm\.bias", "norm/beta", None),
    (r"classifier\.1\.weight", "classifier/kernel", "linear"),
    (r"classifier\.1\.bias", "classifier/bias", None),
]

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
PREPROCESSOR_FILE = "preprocessor_config.json"


def checkpoint_dir(path_or_repo_id):
    """The local checkpoint directory, downloaded from the hub for a repo id."""
    path = os.fspath(path_or_repo_id)
    if os.path.isdir(path):
        return path
    if os.path.exists(path):
        raise CheckpointError(f"{path} is a file; expected a checkpoint directory with config.json")
    if not hub.is_repo_id(path):
        raise MissingFileError(f"no checkpoint directory {path}")
    return hub.snapshot(path)


def read_config(directory):
    file = os.path.join(directory, "config.json")
    if not os.path.isfile(file):
        raise MissingFileError(f"no config.json in {directory}")
    return BitConfig.from_json_file(file)


def read_tensors(directory):
    """{key: array} of model.safetensors (+ shards) or pytorch_model.bin, "bit." prefix removed."""
    present = [f for f in WEIGHT_FILES if os.path.exists(os.path.join(directory, f))]
    if not present:
        raise MissingFileError(f"no weights in {directory}: expected one of {', '.join(WEIGHT_FILES)}")
    first = os.path.join(directory, present[0])
    if first.endswith(".index.json"):
        tensors = {}
        for shard in sorted(set(read_json(first).get("weight_map", {}).values())):
            tensors.update(read_safetensors(os.path.join(directory, shard)))
    else:
        tensors = read_safetensors(first) if first.endswith(".safetensors") else read_torch_bin(first)
    return {k.removeprefix("bit."): v for k, v in tensors.items()}


def read_preprocessor(directory):
    """preprocessor_config.json as a dict, or None when the checkpoint has none."""
    from tfbit.preprocessing.processor import read_config

    file = os.path.join(directory, PREPROCESSOR_FILE)
    return read_config(file) if os.path.isfile(file) else None
