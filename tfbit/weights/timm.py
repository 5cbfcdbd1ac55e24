"""timm `resnetv2_*_bit` checkpoints: a state dict file (.safetensors/.pth/.bin), a timm hub
snapshot directory, or a hub name `timm/<name>` / `hf-hub:<owner>/<name>`."""

import math
import os
from pathlib import Path

import numpy as np

from tfbit.errors import CheckpointError, MissingFileError
from tfbit.models.config import read_json
from tfbit.preprocessing.processor import BitImageProcessor
from tfbit.weights import hub
from tfbit.weights.checkpoint import Checkpoint
from tfbit.weights.infer import infer_config
from tfbit.weights.labels import known_labels
from tfbit.weights.readers import read_state_dict

_T = "stage{s}_unit{u}_"
_UNIT = r"stages\.(?P<s>\d+)\.blocks\.(?P<u>\d+)\."
TABLE = [  # index_base 0
    (r"stem\.conv\.weight", "stem_conv/kernel", "oihw_to_hwio"),
    (_UNIT + r"(?P<c>conv[123])\.weight", _T + "{c}/kernel", "oihw_to_hwio"),
    (_UNIT + r"(?P<n>norm[123])\.weight", _T + "{n}/gamma", None),
    (_UNIT + r"(?P<n>norm[123])\.bias", _T + "{n}/beta", None),
    (_UNIT + r"downsample\.conv\.weight", _T + "downsample_conv/kernel", "oihw_to_hwio"),
    (r"norm\.weight", "norm/gamma", None),
    (r"norm\.bias", "norm/beta", None),
    (r"head\.fc\.weight", "classifier/kernel", "oi11_to_linear"),
    (r"head\.fc\.bias", "classifier/bias", None),
]

# timm's StdConv2d eps for its BiT models (timm/models/resnetv2.py).
WS_EPS = 1e-8
# timm's _cfg() for its BiT models: Inception mean/std (i.e. [-1, 1]), 224 crop of a 256 resize.
DEFAULTS = dict(
    input_size=(3, 224, 224), crop_pct=0.875, interpolation="bilinear", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)
)
_RESAMPLE = {"bilinear": 2, "bicubic": 3}  # PIL ids, the torchvision backend's two filters
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
GENERIC_STEMS = {"model", "pytorch_model", "weights", "checkpoint"}


def is_hub_name(text):
    return text.startswith(("hf-hub:", "timm/"))


def _files(source):
    """(weight file, timm config.json dict, name from the hub or None)."""
    if os.path.isdir(source):
        weights = next((os.path.join(source, f) for f in WEIGHT_FILES if os.path.isfile(os.path.join(source, f))), None)
        if weights is None:
            raise MissingFileError(f"no {' or '.join(WEIGHT_FILES)} in {source}")
        return weights, _config(os.path.join(source, "config.json")), None
    if os.path.isfile(source):
        return source, _config(os.path.join(os.path.dirname(os.path.abspath(source)), "config.json")), None
    repo = source.removeprefix("hf-hub:")
    weights = hub.download(repo, WEIGHT_FILES)  # safetensors first: no pickle
    config = os.path.join(os.path.dirname(weights), "config.json")
    if not os.path.isfile(config):
        try:
            config = hub.download(repo, ("config.json",))
        except FileNotFoundError:
            config = ""
    return weights, _config(config), repo.split("/")[-1]


def _config(path):
    config = read_json(path) if os.path.isfile(path) else {}
    if "architecture" not in config:
        return {}
    arch = config["architecture"]
    if not arch.split(".")[0].endswith("_bit"):
        raise CheckpointError(
            f"{path}: timm architecture {arch!r} is not a BiT ResNetV2 (resnetv2_*_bit); "
            "other timm ResNetV2 variants differ in stem, convolution or norm"
        )
    return config


def _labels(timm_config):
    names = timm_config.get("label_names")
    if not names:
        return None
    descriptions = timm_config.get("label_descriptions") or {}
    return [descriptions.get(n, n) for n in names]


def preprocessor(pretrained_cfg=None):
    """preprocessor_config.json dict of timm's eval transform (resize to size / crop_pct, center
    crop, normalize). timm's 'squash'/'border' crop modes are not represented."""
    cfg = {**DEFAULTS, **{k: v for k, v in (pretrained_cfg or {}).items() if v is not None}}
    _, h, w = cfg["input_size"]
    crop_pct = cfg["crop_pct"]
    size = (
        {"shortest_edge": math.floor(h / crop_pct)}
        if h == w
        else {"height": math.floor(h / crop_pct), "width": math.floor(w / crop_pct)}
    )
    return BitImageProcessor(
        size=size,
        crop_size={"height": h, "width": w},
        resample=_RESAMPLE.get(cfg["interpolation"], 2),
        image_mean=cfg["mean"],
        image_std=cfg["std"],
    ).to_dict()


def default_name(path):
    path = Path(os.path.abspath(path))
    if path.is_dir():
        return path.name
    return path.parent.name if path.stem in GENERIC_STEMS else path.stem


def read(source, tensors=None):
    """A `Checkpoint` of a timm source; `tensors` when the caller already read the file."""
    source = os.fspath(source)
    weights, timm_config, name = _files(source)
    if name is None:  # a local file or folder; a cached hub snapshot is named by its commit
        tag = timm_config.get("pretrained_cfg", {}).get("tag")
        generic = os.path.isdir(source) or Path(source).stem in GENERIC_STEMS
        name = f"{timm_config['architecture']}.{tag}" if tag and generic else default_name(source)
    tensors = read_state_dict(weights) if tensors is None else tensors
    labels = _labels(timm_config) or known_labels(np.size(tensors.get("head.fc.bias", ())), name)
    config = infer_config(tensors, TABLE, 0, weights, labels, ws_eps=WS_EPS)
    files = (weights,) + ((os.path.join(os.path.dirname(weights), "config.json"),) if timm_config else ())
    return Checkpoint(
        "timm", name, weights, config, tensors, TABLE, 0, preprocessor(timm_config.get("pretrained_cfg")), files
    )
