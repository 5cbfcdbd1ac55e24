"""Named BiT checkpoints, as KerasHub presets: the original release's names (`bit-m-r50x1`),
its ImageNet-1k fine-tunes (`bit-m-r50x1-ilsvrc2012`) and the transformers hub ids
(`google/bit-50`), each with its architecture and where its weights come from.

Sources, each read by its own reader (`tfbit.weights`) with its own conventions:
- BiT-M and its fine-tunes: timm's copies on the Hugging Face hub (safetensors, with timm's
  label names and evaluation sizes; weight standardization eps 1e-8, as timm computes them);
- BiT-S (released only as `.npz`): the original files, downloaded once into `cache_dir()`
  (`$TFBIT_CACHE`, default `~/.cache/tfbit`), with the original conventions (eps 1e-10);
- transformers hub ids: the hub repo itself.
Hub files go through `huggingface_hub` and its cache (`HF_HUB_CACHE`, `HF_HUB_OFFLINE=1`).
"""

import dataclasses
import difflib
import os

from tfbit.errors import ConfigError, MissingFileError

CACHE_ENV = "TFBIT_CACHE"
NPZ_ROOT = "https://storage.googleapis.com/bit_models/"
_CACHE_SUBDIR = "bit_models"

# name -> (depths, width multiplier) of the released ResNet-v2 architectures
_ARCHITECTURES = {
    "r50x1": ((3, 4, 6, 3), 1),
    "r50x3": ((3, 4, 6, 3), 3),
    "r101x1": ((3, 4, 23, 3), 1),
    "r101x3": ((3, 4, 23, 3), 3),
    "r152x2": ((3, 8, 36, 3), 2),
    "r152x4": ((3, 8, 36, 3), 4),
}
_IMAGENET_1K, _IMAGENET_21K = 1000, 21843


@dataclasses.dataclass(frozen=True)
class Preset:
    """One named checkpoint.

    `format` is the reader of its source ("hf", "timm" or "npz"); `source` a transformers hub
    id, a timm hub name or the URL of an original `.npz`.
    """

    name: str
    description: str
    depths: tuple
    width: int
    num_labels: int
    format: str
    source: str

    @property
    def architecture(self):
        """The `BitConfig` fields of the model the weights fit (absolute widths, as inferred
        from the weights and as transformers can build them)."""
        w = self.width
        return dict(
            embedding_size=64 * w,
            hidden_sizes=[256 * w, 512 * w, 1024 * w, 2048 * w],
            depths=list(self.depths),
            layer_type="preactivation",
            global_padding=None,
            num_groups=32,
            width_factor=1,
            num_labels=self.num_labels,
            ws_eps=1e-10 if self.format == "npz" else 1e-8,
        )


def _table():
    names = {arch: arch.upper().replace("X", "x") for arch in _ARCHITECTURES}  # r50x1 -> R50x1
    table = [
        Preset(
            f"bit-s-{arch}",
            f"BiT-S {names[arch]}: pre-trained on ImageNet-1k (ILSVRC-2012), original .npz",
            depths,
            width,
            _IMAGENET_1K,
            "npz",
            f"{NPZ_ROOT}BiT-S-{names[arch]}.npz",
        )
        for arch, (depths, width) in _ARCHITECTURES.items()
    ]
    table += [
        Preset(
            f"bit-m-{arch}",
            f"BiT-M {names[arch]}: pre-trained on ImageNet-21k, timm's copy",
            depths,
            width,
            _IMAGENET_21K,
            "timm",
            f"timm/resnetv2_{arch[1:]}_bit.goog_in21k",
        )
        for arch, (depths, width) in _ARCHITECTURES.items()
    ]
    table += [
        Preset(
            f"bit-m-{arch}-ilsvrc2012",
            f"BiT-M {names[arch]} fine-tuned on ImageNet-1k, timm's copy",
            depths,
            width,
            _IMAGENET_1K,
            "timm",
            f"timm/resnetv2_{arch[1:]}_bit.goog_in21k_ft_in1k",
        )
        for arch, (depths, width) in _ARCHITECTURES.items()
    ]
    table.append(
        Preset(
            "google/bit-50",
            "transformers' BiT R50x1 (BiT-M fine-tuned on ImageNet-1k)",
            (3, 4, 6, 3),
            1,
            _IMAGENET_1K,
            "hf",
            "google/bit-50",
        )
    )
    return {preset.name: preset for preset in table}


PRESETS = _table()


def presets():
    """{name: `Preset`} of every named checkpoint."""
    return dict(PRESETS)


def is_preset(name):
    return isinstance(name, str) and name.lower() in PRESETS


def get(name):
    """The `Preset` called `name` (case-insensitive); ConfigError listing close matches."""
    if not isinstance(name, str):
        raise TypeError(f"a preset name is a string, got {type(name).__name__}")
    if name.lower() in PRESETS:
        return PRESETS[name.lower()]
    raise ConfigError(f"unknown preset {name!r} ({suggest(name)})")


def suggest(name):
    """The presets `name` may have meant, for error messages."""
    close = difflib.get_close_matches(name.lower(), PRESETS, n=5, cutoff=0.6)
    hint = f"close matches: {', '.join(close)}" if close else f"known presets: {', '.join(PRESETS)}"
    return hint + "; tfbit.presets() lists them all"


def cache_dir():
    """Where downloaded `.npz` files are kept: `$TFBIT_CACHE`, default `~/.cache/tfbit`."""
    return os.path.abspath(os.path.expanduser(os.environ.get(CACHE_ENV) or "~/.cache/tfbit"))


def cached_path(preset):
    """Where the download of an `.npz` preset is (or will be) kept."""
    return os.path.join(cache_dir(), _CACHE_SUBDIR, preset.source.rsplit("/", 1)[-1])


def fetch(preset):
    """What `tfbit.weights.read_checkpoint` reads for `preset`: the hub name, or the local copy
    of the `.npz`, downloaded on first use. The download goes to a `.partial` file renamed into
    place when complete, so an interrupted download is never taken for the file."""
    if preset.format != "npz":
        return preset.source
    path = cached_path(preset)
    if os.path.isfile(path):
        return path
    import keras

    # get_file falls back to /tmp/.keras for a folder it cannot write, which does not exist yet.
    os.makedirs(os.path.dirname(path), exist_ok=True)
    partial = os.path.basename(path) + ".partial"
    try:
        downloaded = keras.utils.get_file(
            partial, preset.source, cache_dir=cache_dir(), cache_subdir=_CACHE_SUBDIR, force_download=True
        )
    except Exception as e:  # urllib's errors arrive re-raised as plain Exception by get_file
        raise MissingFileError(
            f"preset {preset.name}: {preset.source} could not be downloaded "
            f"({type(e).__name__}: {e}); to work offline, put the file at {path}"
        ) from None
    os.replace(downloaded, path)
    return path
