"""Turn any supported BiT checkpoint into a loaded tfbit model: `load_source(source)`.

Formats (`detect_format` tells them apart; `format=` overrides it):

* ``hf``   -- a transformers checkpoint directory (``config.json`` with ``model_type: bit``) or a
  hub repo ``owner/name``; mapped by `tfbit.hf_checkpoint.HF_TABLE`.
* ``timm`` -- a timm ``resnetv2_*_bit`` state dict (``.safetensors``, ``.pth``, ``.bin``), a timm
  hub snapshot directory, or a hub name ``timm/<name>`` / ``hf-hub:<owner>/<name>``.
* ``npz``  -- an original BiT release file (google-research/big_transfer), e.g. ``BiT-M-R50x1.npz``.

timm and npz files carry no config: the architecture is inferred from the weight shapes
(`infer_config`). They describe pre-activation BiT with symmetric padding, 32 GroupNorm groups
and weight standardization with eps 1e-8 -- timm's value for its BiT models *and* for the npz
files it loads, which is the parity target here; the original BiT code used 1e-10 (see
`tfbit.models.WS_EPS`). Pickled PyTorch files are only read with ``weights_only=True``.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import math
import os
import re
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from tfbit.checkpoint import TRANSFORMS, CheckpointError, assign_checkpoint, map_keys
from tfbit.config import BitConfig
from tfbit.hf_checkpoint import (load_pretrained, read_safetensors, read_torch_bin,
                                 resolve_checkpoint_dir, unused_weights)
from tfbit.image_processor import BitImageProcessor
from tfbit.models import BitBackbone, BitForImageClassification, BitModel, copy_weights

FORMATS = ("hf", "timm", "npz", "keras")
TASKS = ("classification", "features", "backbone")

_T = "stage{s}_unit{u}_"

_TIMM_UNIT = r"stages\.(?P<s>\d+)\.blocks\.(?P<u>\d+)\."
TIMM_TABLE = [  # timm resnetv2 *_bit state dict, index_base 0
    (r"stem\.conv\.weight", "stem_conv/kernel", "oihw_to_hwio"),
    (_TIMM_UNIT + r"(?P<c>conv[123])\.weight", _T + "{c}/kernel", "oihw_to_hwio"),
    (_TIMM_UNIT + r"(?P<n>norm[123])\.weight", _T + "{n}/gamma", None),
    (_TIMM_UNIT + r"(?P<n>norm[123])\.bias", _T + "{n}/beta", None),
    (_TIMM_UNIT + r"downsample\.conv\.weight", _T + "downsample_conv/kernel", "oihw_to_hwio"),
    (r"norm\.weight", "norm/gamma", None),
    (r"norm\.bias", "norm/beta", None),
    (r"head\.fc\.weight", "classifier/kernel", "oi11_to_linear"),
    (r"head\.fc\.bias", "classifier/bias", None),
]

# Some re-saved files drop the "resnet/" scope, so it is optional.
_NPZ_ROOT = r"(?:resnet/)?"
_NPZ_UNIT = _NPZ_ROOT + r"block(?P<s>\d+)/unit(?P<u>\d+)/"
NPZ_TABLE = [  # original BiT release .npz (kernels already HWIO), index_base 1 (unit01 -> 1)
    (_NPZ_ROOT + r"root_block/standardized_conv2d/kernel", "stem_conv/kernel", None),
    (_NPZ_UNIT + r"a/proj/standardized_conv2d/kernel", _T + "downsample_conv/kernel", None),
    *[row for sub, i in zip("abc", "123") for row in (
        (_NPZ_UNIT + sub + r"/standardized_conv2d/kernel", _T + f"conv{i}/kernel", None),
        (_NPZ_UNIT + sub + r"/group_norm/gamma", _T + f"norm{i}/gamma", None),
        (_NPZ_UNIT + sub + r"/group_norm/beta", _T + f"norm{i}/beta", None))],
    (_NPZ_ROOT + r"group_norm/gamma", "norm/gamma", None),
    (_NPZ_ROOT + r"group_norm/beta", "norm/beta", None),
    (_NPZ_ROOT + r"head/conv2d/kernel", "classifier/kernel", "conv1x1_to_linear"),
    (_NPZ_ROOT + r"head/conv2d/bias", "classifier/bias", None),
]

# timm's _cfg() for its BiT models: Inception mean/std (i.e. [-1, 1]), 224 crop of a 256 resize.
TIMM_BIT_DEFAULTS = dict(input_size=(3, 224, 224), crop_pct=0.875, interpolation="bilinear",
                         mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
_RESAMPLE = {"bilinear": 2, "bicubic": 3}  # PIL ids, the torchvision backend's two filters
_WEIGHT_FILES = (".safetensors", ".pth", ".pt", ".bin")
_GENERIC_STEMS = {"model", "pytorch_model", "weights", "checkpoint"}
_REPO_ID = re.compile(r"[\w.-]+/[\w.-]+")
_DEFAULT_CHECKPOINT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "default_checkpoint")
CIFAR10_LABELS = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                  "truck")


@dataclasses.dataclass
class LoadedSource:
    """A checkpoint loaded into tfbit.

    `torch_reference()` builds the PyTorch model the checkpoint came from, for verification:
    the transformers model of the task (hf), or a timm `ResNetV2` of the same architecture with
    the state dict loaded (timm) or filled by timm's own `.npz` loader (npz). timm references are
    headless (`num_classes=0`, output = pooled features) unless `model` is a classifier. It is
    None when torch or that library is not installed.
    """

    model: object
    config: BitConfig
    format: str
    name: str
    preprocessor: dict
    source_path: str
    torch_reference: Optional[Callable[[], object]] = None


# -- format detection ------------------------------------------------------------------------------

def detect_format(source, format=None):
    """'hf', 'timm' or 'npz' for a directory, weight file or hub name; `format` overrides."""
    return _detect(source, format)[0]


def _detect(source, format):
    """(format, the state dict if detection had to read it all -- a pickle -- else None)."""
    if format is not None:
        if format not in FORMATS:
            raise ValueError(f"format={format!r} is not one of {', '.join(FORMATS)}")
        return format, None
    path = os.fspath(source)
    if os.path.isdir(path):
        return _directory_format(path), None
    if os.path.isfile(path):
        return _file_format(path)
    if path.startswith(("hf-hub:", "timm/")):
        return "timm", None
    if _REPO_ID.fullmatch(path) and not path.startswith("."):
        return "hf", None
    raise FileNotFoundError(f"{path}: no such file or directory, and not a hub repo id "
                            "(owner/name, timm/<name> or hf-hub:<owner>/<name>)")


def _read_json(path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None


def _directory_format(path):
    file = os.path.join(path, "config.json")
    if not os.path.isfile(file):
        raise ValueError(f"{path} has no config.json: expected a transformers or timm checkpoint "
                         "directory (or pass the weight file itself)")
    config = _read_json(file)
    if config.get("model_type") == "bit":
        return "hf"
    if "architecture" in config:  # timm hub repos describe themselves this way
        return "timm"
    raise ValueError(f"{file} describes model_type={config.get('model_type')!r}, not a BiT checkpoint")


def _file_format(path):
    suffix = Path(path).suffix.lower()
    if suffix in (".npz", ".keras"):
        return suffix[1:], None
    if suffix not in _WEIGHT_FILES:
        raise ValueError(f"cannot tell the format of {path} from its extension: pass format= "
                         f"(one of {', '.join(FORMATS)})")
    if suffix == ".safetensors":
        tensors, keys = None, _safetensors_keys(path)  # the header is enough
    else:
        tensors = keys = read_state_dict(path)  # a pickle must be read whole: keep it
    if any(k.startswith(("stem.", "stages.")) for k in keys):
        return "timm", tensors
    if any(k.startswith(("bit.", "embedder.", "encoder.")) for k in keys):
        raise ValueError(f"{path} is a transformers BiT state dict, whose architecture lives in "
                         "config.json: pass the checkpoint directory holding both")
    raise ValueError(f"{path} is neither a timm ResNetV2-BiT nor a transformers BiT state dict "
                     f"(keys look like: {', '.join(sorted(keys)[:3])})")


def _safetensors_keys(path):
    from safetensors import SafetensorError, safe_open
    try:
        with safe_open(path, framework="numpy") as f:
            return list(f.keys())
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path} is not a readable safetensors file: {e}") from None


# -- reading ---------------------------------------------------------------------------------------

def read_state_dict(path):
    """{key: array} of a .safetensors or PyTorch pickle file (weights_only, no code executed)."""
    path = os.fspath(path)
    return read_safetensors(path) if path.endswith(".safetensors") else read_torch_bin(path)


def read_npz(path):
    """{key: array} of an original BiT .npz, refusing pickled objects."""
    path = os.fspath(path)
    try:
        archive = np.load(path, allow_pickle=False)
        if not isinstance(archive, np.lib.npyio.NpzFile):
            raise ValueError("it holds a single array, not a keyed archive")
        with archive:
            return {key: archive[key] for key in archive.files}
    except FileNotFoundError:
        raise
    except Exception as e:  # zipfile, zlib and numpy all raise their own types for a bad archive
        raise ValueError(f"{path} is not a readable .npz archive: {type(e).__name__}: {e}") from None


# -- architecture inference ------------------------------------------------------------------------

_UNIT_TARGET = re.compile(r"stage(\d+)_unit(\d+)_.+")


def infer_config(tensors, table, index_base=0, source="checkpoint", labels=None):
    """The pre-activation `BitConfig` whose weights have the shapes of `tensors` (mapped by
    `table`): depths, stem and stage widths, input channels and head size. Sizes are absolute
    (width_factor 1). No head gives num_labels 0. `labels` name the classes when they fit."""
    mapped, _ = map_keys(tensors, table, index_base)
    if not mapped:
        raise CheckpointError(f"{source} is not a BiT checkpoint of this format: none of its "
                              f"{len(tensors)} keys is a BiT weight (keys look like: "
                              f"{', '.join(sorted(tensors)[:3])})")
    shapes, bad = {}, []
    for key, (target, transform) in mapped.items():
        try:
            shapes[target] = (key, TRANSFORMS[transform](np.asarray(tensors[key])).shape)
        except ValueError:
            bad.append(f"{key}: shape {np.shape(tensors[key])} cannot be {target}")
    if bad:
        raise CheckpointError(f"{source} has wrongly shaped keys: " + "; ".join(bad))

    expected = {template: pattern for pattern, template, _ in table}

    def shape_of(target, ndim, what):
        if target not in shapes:
            hint = f"a key matching {expected[target]!r}" if target in expected else f"tfbit weight {target}"
            raise CheckpointError(f"{source}: cannot infer the architecture, there is no {what} ({hint})")
        key, shape = shapes[target]
        if len(shape) != ndim:
            raise CheckpointError(f"{source}: {key} has shape {shape}, expected a {ndim}-D {what}")
        return shape

    _, _, num_channels, stem = shape_of("stem_conv/kernel", 4, "stem convolution kernel")
    units = {}
    for target, (key, _) in shapes.items():
        m = _UNIT_TARGET.fullmatch(target)
        if m:
            units.setdefault(int(m[1]), {})[int(m[2])] = key
    stages = sorted(units)
    if not stages or stages != list(range(1, len(stages) + 1)):
        raise CheckpointError(f"{source}: stages {stages} are not numbered contiguously from 1 "
                              "(tfbit numbering): not a BiT ResNetV2")
    for s in stages:
        if sorted(units[s]) != list(range(1, len(units[s]) + 1)):
            keys = ", ".join(units[s][u] for u in sorted(units[s]))
            raise CheckpointError(f"{source}: the units of stage {s} are {sorted(units[s])} (tfbit "
                                  f"numbering), not contiguous: a unit is missing (keys: {keys})")
    hidden_sizes = [shape_of(f"stage{s}_unit1_conv3/kernel", 4, f"last conv of stage {s} unit 1")[-1]
                    for s in stages]
    num_labels = shape_of("classifier/kernel", 2, "classifier kernel")[-1] if "classifier/kernel" in shapes else 0
    known = labels is not None and len(labels) == num_labels > 0
    try:
        return BitConfig(num_channels=num_channels, embedding_size=stem, hidden_sizes=hidden_sizes,
                         depths=[len(units[s]) for s in stages], layer_type="preactivation",
                         global_padding=None, num_groups=32,
                         num_labels=None if known else num_labels,
                         id2label=dict(enumerate(labels)) if known else None)
    except ValueError as e:
        raise CheckpointError(f"{source}: the inferred architecture is not a valid BiT: {e}") from None


def known_labels(num_labels, name=""):
    """Class names of the standard BiT heads: ImageNet-1k (1000), ImageNet-21k (21843, Google's
    order) from timm's bundled WordNet lemmas when timm is installed, CIFAR-10 by file name."""
    if num_labels == 10 and "cifar10" in name.lower().replace("-", ""):
        return list(CIFAR10_LABELS)
    synsets = {1000: "imagenet_synsets.txt", 21843: "imagenet21k_goog_synsets.txt"}.get(num_labels)
    spec = importlib.util.find_spec("timm") if synsets else None  # data files only: no import
    if spec is None:
        return None
    info = Path(spec.submodule_search_locations[0], "data", "_info")
    lemmas = dict(line.split("\t", 1) for line in
                  (info / "imagenet_synset_to_lemma.txt").read_text("utf-8").splitlines())
    return [lemmas.get(s, s) for s in (info / synsets).read_text("utf-8").splitlines()]


# -- loading ---------------------------------------------------------------------------------------

def load_source(source, format=None, task="classification", config=None):
    """Load `source` (path or hub name) into a tfbit model; see `LoadedSource`.

    task: "classification" (`BitForImageClassification`; a headless checkpoint gives a
    `BitModel`), "features" (`BitModel`) or "backbone" (`BitBackbone` with every stage after
    the stem as out_features). `config` replaces the stored / inferred `BitConfig`.
    """
    if task not in TASKS:
        raise ValueError(f"task={task!r} is not one of {', '.join(TASKS)}")
    format, tensors = _detect(source, format)
    if format == "timm":
        return _load_timm(os.fspath(source), task, config, tensors)
    loader = {"hf": _load_hf, "npz": _load_npz, "keras": _load_keras}[format]
    return loader(os.fspath(source), task, config)


def _for_task(config, task):
    if task != "backbone":
        return config
    return BitConfig.from_dict(dict(config.to_dict(), out_features=config.stage_names[1:], out_indices=None))


def _model_class(config, task):
    if task == "backbone":
        return BitBackbone
    return BitForImageClassification if task == "classification" and config.num_labels else BitModel


def _available(*modules):
    return all(importlib.util.find_spec(m) is not None for m in ("torch", *modules))


def _default_name(path):
    path = Path(os.path.abspath(path))
    if os.path.exists(_DEFAULT_CHECKPOINT) and path.exists() and os.path.samefile(path, _DEFAULT_CHECKPOINT):
        return "digits"
    if path.is_dir():
        return path.name
    return path.parent.name if path.stem in _GENERIC_STEMS else path.stem


def _load_hf(source, task, config):
    directory = resolve_checkpoint_dir(source)
    name = _default_name(source) if os.path.exists(source) else source.rstrip("/").split("/")[-1]
    config = _for_task(config or BitConfig.from_pretrained(directory), task)
    cls = _model_class(config, task)
    model = load_pretrained(cls, directory, config=config)
    processor_file = os.path.join(directory, "preprocessor_config.json")
    preprocessor = _read_json(processor_file) if os.path.isfile(processor_file) else BitImageProcessor().to_dict()

    def reference():
        import transformers
        extra = {"out_features": config.out_features} if cls is BitBackbone else {}
        return getattr(transformers, cls.__name__).from_pretrained(directory, **extra).eval()

    return LoadedSource(model, config, "hf", name, preprocessor, directory,
                        reference if _available("transformers") else None)


def _load_keras(source, task, config):
    """A tfbit `.keras` file (e.g. a fine-tuned model); preprocessing from the JSON beside it."""
    import keras
    try:
        saved = keras.saving.load_model(source)
    except Exception as e:  # keras raises many types for a zip that is not a model
        raise ValueError(f"{source} is not a loadable .keras model: {type(e).__name__}: {e}") from None
    if not hasattr(saved, "config") or not isinstance(saved.config, BitConfig):
        raise ValueError(f"{source} holds a {type(saved).__name__}, not a tfbit BiT model")
    config = _for_task(config or saved.config, task)
    model = _model_class(config, task)(config, standardize_weights=saved.standardize_weights)
    if type(model) is type(saved) and model.config == saved.config:
        model = saved
    else:
        missing = copy_weights(saved, model)
        if missing:
            raise ValueError(f"{source} has no weights for {missing[0]} needed by task {task!r}")
    processor_file = os.path.join(os.path.dirname(os.path.abspath(source)), "preprocessor_config.json")
    preprocessor = _read_json(processor_file) if os.path.isfile(processor_file) else BitImageProcessor().to_dict()
    return LoadedSource(model, config, "keras", Path(source).stem, preprocessor, source, None)


def _load_weights(tensors, table, index_base, source, task, config, labels):
    config = _for_task(config or infer_config(tensors, table, index_base, source, labels), task)
    model = _model_class(config, task)(config)
    assign_checkpoint(model, tensors, table, source=source, index_base=index_base,
                      unused=unused_weights(model))
    return model, config


def timm_model(config, num_classes):
    """A timm ResNetV2 built like timm's `*_bit` models, with the architecture of `config`."""
    from timm.layers import StdConv2d
    from timm.models.resnetv2 import ResNetV2
    return ResNetV2(layers=config.depths, channels=config.stage_channels, stem_chs=config.embedding_size,
                    in_chans=config.num_channels, num_classes=num_classes, stem_type="fixed",
                    conv_layer=functools.partial(StdConv2d, eps=1e-8)).eval()


def _timm_files(source):
    """(weight file, timm config.json dict, default name) of a local or hub timm checkpoint."""
    if os.path.isdir(source):
        files = [os.path.join(source, f) for f in ("model.safetensors", "pytorch_model.bin")]
        weights = next((f for f in files if os.path.isfile(f)), None)
        if weights is None:
            raise FileNotFoundError(f"no model.safetensors or pytorch_model.bin in {source}")
        return weights, _timm_config(os.path.join(source, "config.json")), None
    if os.path.isfile(source):
        return source, _timm_config(os.path.join(os.path.dirname(os.path.abspath(source)), "config.json")), None
    repo = source.removeprefix("hf-hub:")
    import huggingface_hub
    from huggingface_hub.errors import EntryNotFoundError
    hub_errors = (EntryNotFoundError, OSError, ValueError)
    weights, errors = None, []
    for filename in ("model.safetensors", "pytorch_model.bin"):  # safetensors first: no pickle
        try:
            weights = huggingface_hub.hf_hub_download(repo, filename)
            break
        except hub_errors as e:
            errors.append(f"{filename}: {type(e).__name__}: {e}")
    if weights is None:
        raise FileNotFoundError(f"{source}: no timm weights could be fetched from the hub:\n  " + "\n  ".join(errors))
    try:
        config = huggingface_hub.hf_hub_download(repo, "config.json")
    except hub_errors:
        config = ""
    return weights, _timm_config(config), repo.split("/")[-1]


def _timm_config(path):
    config = _read_json(path) if os.path.isfile(path) else {}
    if "architecture" not in config:
        return {}
    arch = config["architecture"]
    if not arch.split(".")[0].endswith("_bit"):
        raise ValueError(f"{path}: timm architecture {arch!r} is not a BiT ResNetV2 (resnetv2_*_bit); "
                         "other timm ResNetV2 variants differ in stem, convolution or norm")
    return config


def _timm_labels(timm_config):
    names = timm_config.get("label_names")
    if not names:
        return None
    descriptions = timm_config.get("label_descriptions") or {}
    return [descriptions.get(n, n) for n in names]


def timm_preprocessor(pretrained_cfg=None):
    """HF preprocessor_config.json dict for timm's eval transform (resize to size / crop_pct,
    center crop, normalize). timm's 'squash'/'border' crop modes are not represented."""
    cfg = {**TIMM_BIT_DEFAULTS, **{k: v for k, v in (pretrained_cfg or {}).items() if v is not None}}
    _, h, w = cfg["input_size"]
    crop_pct = cfg["crop_pct"]
    size = {"shortest_edge": math.floor(h / crop_pct)} if h == w else \
        {"height": math.floor(h / crop_pct), "width": math.floor(w / crop_pct)}
    return BitImageProcessor(size=size, crop_size={"height": h, "width": w},
                             resample=_RESAMPLE.get(cfg["interpolation"], 2),
                             image_mean=cfg["mean"], image_std=cfg["std"]).to_dict()


def _load_timm(source, task, config, tensors=None):
    weights, timm_config, name = _timm_files(source)
    if name is None:  # a local file or folder; a cached hub snapshot is named by its commit
        tag = timm_config.get("pretrained_cfg", {}).get("tag")
        generic = os.path.isdir(source) or Path(source).stem in _GENERIC_STEMS
        name = f"{timm_config['architecture']}.{tag}" if tag and generic else _default_name(source)
    tensors = read_state_dict(weights) if tensors is None else tensors
    labels = _timm_labels(timm_config) or known_labels(np.size(tensors.get("head.fc.bias", ())), name)
    model, config = _load_weights(tensors, TIMM_TABLE, 0, weights, task, config, labels)

    def reference():
        import torch
        classes = config.num_labels if isinstance(model, BitForImageClassification) else 0
        state = {k: torch.from_numpy(np.asarray(v)) for k, v in read_state_dict(weights).items()
                 if classes or not k.startswith("head.")}
        reference_model = timm_model(config, classes)
        reference_model.load_state_dict(state)
        return reference_model.eval()

    return LoadedSource(model, config, "timm", name, timm_preprocessor(timm_config.get("pretrained_cfg")),
                        weights, reference if _available("timm") else None)


def _load_npz(source, task, config):
    tensors = read_npz(source)
    name = _default_name(source)
    prefix = "resnet/" if any(k.startswith("resnet/") for k in tensors) else ""
    labels = known_labels(np.size(tensors.get(prefix + "head/conv2d/bias", ())), name)
    model, config = _load_weights(tensors, NPZ_TABLE, 1, source, task, config, labels)

    def reference():
        from timm.models.resnetv2 import _load_weights as timm_load_npz
        classes = config.num_labels if isinstance(model, BitForImageClassification) else 0
        reference_model = timm_model(config, classes)
        timm_load_npz(reference_model, source, prefix)
        return reference_model.eval()

    # The original weights expect RGB in [-1, 1]; 224 is the default resolution whatever the file
    # (the BiT-M ImageNet fine-tunes were evaluated at 448/480: override size/crop_size for them).
    preprocessor = BitImageProcessor.original_bit().to_dict()
    return LoadedSource(model, config, "npz", name, preprocessor, source,
                        reference if _available("timm") else None)
