"""Hugging Face BiT checkpoints: find (local or hub), read (safetensors / .bin) and map them."""

import json
import os
import re

from tfbit.checkpoint import assign_checkpoint
from tfbit.config import BitConfig

_UNIT = r"encoder\.stages\.(?P<s>\d+)\.layers\.(?P<u>\d+)\."
_T = "stage{s}_unit{u}_"

# HF key (after the optional "bit." prefix) -> tfbit weight
HF_TABLE = [
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
_REPO_ID = re.compile(r"[\w.-]+(/[\w.-]+)?")


def resolve_checkpoint_dir(path_or_repo_id):
    """A local checkpoint directory, downloading a hub repo through huggingface_hub if needed.

    The hub client honours its cache and HF_HUB_OFFLINE=1; only config/weight files are fetched
    (safetensors preferred over the pickle-based .bin).
    """
    path = os.fspath(path_or_repo_id)
    if os.path.isdir(path):
        return path
    if os.path.exists(path):
        raise ValueError(f"{path} is a file; expected a checkpoint directory with config.json")
    if not _REPO_ID.fullmatch(path) or path.startswith((".", "/")):
        raise FileNotFoundError(f"no checkpoint directory {path}")
    import huggingface_hub
    from huggingface_hub.utils import HfHubHTTPError
    try:
        files = set(huggingface_hub.list_repo_files(path)) if not huggingface_hub.constants.HF_HUB_OFFLINE else None
        patterns = ["*.json"]
        if files is None or any(f.endswith(".safetensors") for f in files):
            patterns.append("*.safetensors")
        if files is None or not any(f.endswith(".safetensors") for f in files):
            patterns.append("pytorch_model.bin")
        return huggingface_hub.snapshot_download(path, allow_patterns=patterns)
    except (HfHubHTTPError, OSError, ValueError) as e:
        raise FileNotFoundError(f"{path} is neither a local directory nor a reachable Hugging Face "
                                f"hub repo ({type(e).__name__}: {e})") from e


def read_weights(directory):
    """{key: numpy array} from model.safetensors (+ shards) or pytorch_model.bin."""
    present = [f for f in WEIGHT_FILES if os.path.exists(os.path.join(directory, f))]
    if not present:
        raise FileNotFoundError(f"no weights in {directory}: expected one of {', '.join(WEIGHT_FILES)}")
    first = os.path.join(directory, present[0])
    if first.endswith(".index.json"):
        with open(first, encoding="utf-8") as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        tensors = {}
        for shard in shards:
            tensors.update(read_safetensors(os.path.join(directory, shard)))
        return tensors
    return read_safetensors(first) if first.endswith(".safetensors") else read_torch_bin(first)


def read_safetensors(path):
    from safetensors import SafetensorError
    from safetensors.numpy import load_file
    try:
        return load_file(path)
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path} is not a readable safetensors file: {e}") from None
    except TypeError as e:  # numpy has no bfloat16
        raise ValueError(f"{path} holds a dtype numpy cannot read ({e}); re-save it in float32") from None


def read_torch_bin(path):
    """Read a PyTorch state dict without executing pickled code (weights_only=True)."""
    try:
        import torch
    except ImportError:
        raise ImportError(f"{path} is a PyTorch pickle: install torch to read it, "
                          "or convert the checkpoint to model.safetensors") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for corrupt or unsafe pickles
        raise ValueError(f"{path} is not a loadable PyTorch state dict: {type(e).__name__}: {e}") from None
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict")
    not_tensors = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise ValueError(f"{path} is not a flat state dict: {', '.join(map(str, not_tensors[:5]))} "
                         "are not tensors (a training checkpoint? save its model state_dict instead)")
    return {k: v.float().numpy() if v.is_floating_point() else v.numpy() for k, v in state.items()}


def strip_prefix(tensors):
    return {k[4:] if k.startswith("bit.") else k: v for k, v in tensors.items()}


def unused_weights(model):
    """Which mapped weights a model may lack: heads and stages a backbone does not compute."""
    from tfbit.models import BitBackbone, BitForImageClassification
    if isinstance(model, BitForImageClassification):
        return lambda target: False
    if isinstance(model, BitBackbone):
        last = max(model.config.out_indices)
        def unused(target):
            m = re.match(r"stage(\d+)_", target)
            return target.startswith(("classifier/", "norm/")) or (m is not None and int(m.group(1)) > last) \
                or (last == 0 and target.startswith("stage"))
        return unused
    return lambda target: target.startswith("classifier/")


def load_pretrained(cls, path_or_repo_id, config=None, **kwargs):
    directory = resolve_checkpoint_dir(path_or_repo_id)
    if config is None:
        config = BitConfig.from_pretrained(directory)
    tensors = strip_prefix(read_weights(directory))
    model = cls(config, **kwargs)
    return assign_checkpoint(model, tensors, HF_TABLE, source=directory, unused=unused_weights(model))
