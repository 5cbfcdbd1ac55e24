"""Named BiT checkpoints, as KerasHub presets: the whole original release (google-research/
big_transfer) and its TF Hub modules, each with its architecture, source, label set, evaluation
resolution and preprocessing. `presets(family=, size=, task=, format=)` lists them.

Names: `<family>-<size>[-<task>][-<source>]`, lower-case, e.g. `bit-m-r50x1`,
`bit-m-r50x1-ilsvrc2012`, `bit-m-r50x1-vtab-dtd-run0`, `bit-m-r50x1-tfhub-feature-vector`;
families `bit-s`, `bit-m`, `bit-distilled` (the distilled R50x1 students) and `bit-teacher` (their
R152x2 teachers), plus the transformers hub id `google/bit-50` (family `bit-m`).

One source per preset, read by its own reader (`tfbit.weights`) with its own conventions:
- weights timm keeps on the Hugging Face hub (BiT-M, its ImageNet-1k fine-tunes, the distilled
  R50x1 at 224 px, the teachers): timm's copy under the plain name (safetensors, no pickle, timm's
  evaluation sizes, weight standardization eps 1e-8 as timm computes it), and the original `.npz`
  under the same name + `-npz` (the original conventions: eps 1e-10, the whole image resized);
- release files timm has no copy of (BiT-S, the distilled R50x1 at 160 px, the CIFAR-10 and VTAB-1k
  fine-tunes): the original `.npz`, downloaded once into `cache_dir()` (`$TFBIT_CACHE`, default
  `~/.cache/tfbit`);
- TF Hub modules (`-tfhub-<kind>`): the tfhub.dev handle, found in the kagglehub / tensorflow_hub
  cache or downloaded by the "savedmodel" reader; eps 1e-10 (the original TF2 code's);
- transformers hub ids: the hub repo itself.
Hub files go through `huggingface_hub` and its cache (`HF_HUB_CACHE`, `HF_HUB_OFFLINE=1`).

Resolutions (`Preset.resolution`, the evaluation size):
- timm's copies: the `input_size` of timm's pretrained cfg for the tag (timm/models/resnetv2.py,
  timm 1.0: 224 for `goog_in21k`, the distilled model and the 224 teacher; 448 for the
  `goog_in21k_ft_in1k` fine-tunes but 480 for R152x4; 384 for the 384 teacher), with its
  `crop_pct` and interpolation; `google/bit-50`: its preprocessor_config.json (448, no margin);
- pre-trained upstream weights (BiT-S, BiT-M, feature vectors): 224, their pre-training size;
- the original fine-tunes (ILSVRC-2012, CIFAR-10, VTAB-1k): BiT-HyperRule as the release's code
  states it (big_transfer/bit_hyperrule.py, `get_resolution`: images of area < 96×96 are trained
  at 128 px crops, all others at 480; bit_pytorch/train.py evaluates by resizing the whole image
  to that crop size). So 480 for ILSVRC-2012 and the VTAB tasks with larger images (including
  patch_camelyon's and smallnorb's 96×96: not below the threshold), 128 for CIFAR, SVHN, EuroSAT
  and dSprites (the release states no other size for its VTAB runs);
- distilled students: 224 and 160, teachers 224 and 384 (the release's file names and README);
- TF Hub modules: those of the weights they hold (224; BiT-M's ILSVRC-2012 classifier, the
  fine-tune, 480).
"""

import dataclasses
import difflib
import itertools
import os

from tfbit.errors import ConfigError, MissingFileError

CACHE_ENV = "TFBIT_CACHE"
NPZ_ROOT = "https://storage.googleapis.com/bit_models/"
TFHUB_ROOT = "https://tfhub.dev/google/bit/"
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
_TFHUB_SIZES = ("r50x1", "r50x3", "r101x1", "r101x3", "r152x4")  # TF Hub has no R152x2
_VTAB_SIZES = ("r50x1", "r101x1", "r50x3", "r101x3", "r152x4")  # the README's pattern
_IMAGENET_1K, _IMAGENET_21K = 1000, 21843

# The 19 VTAB-1k tasks as the release spells them: (classes, (height, width) of the images, None
# when they vary). Classes: the tfds ClassLabel of each dataset (tfds 4.9: caltech101 counts its
# background class; svhn is tfds' svhn_cropped, diabetic_retinopathy diabetic_retinopathy_detection
# in VTAB's btgraham-300 config), except where VTAB derives its own labels (google-research/
# task_adaptation, data/clevr.py, kitti.py, and scripts/run_all_tasks.sh for dSprites' 32 x
# positions and 40 orientations regrouped into 16 classes). Sizes: tfds' image features; the
# varying ones are all above 96×96 (Caltech 200-300 px edges, DTD 300-640, CLEVR 480×320, KITTI
# 1242×375, btgraham-300 ~540).
VTAB_TASKS = {
    "caltech101": (102, None),
    "cifar100": (100, (32, 32)),
    "dtd": (47, None),
    "oxford_flowers102": (102, None),
    "oxford_iiit_pet": (37, None),
    "sun397": (397, None),
    "svhn": (10, (32, 32)),
    "patch_camelyon": (2, (96, 96)),
    "eurosat": (10, (64, 64)),
    "resisc45": (45, (256, 256)),
    "diabetic_retinopathy": (5, None),
    "clevr-count": (8, None),
    "clevr-distance": (6, None),
    "dmlab": (6, (360, 480)),
    "dsprites-xpos": (16, (64, 64)),
    "dsprites-orientation": (16, (64, 64)),
    "kitti-distance": (4, None),
    "smallnorb-azimuth": (18, (96, 96)),
    "smallnorb-elevation": (9, (96, 96)),
}
VTAB_RUNS = (0, 1, 2)
FAMILIES = ("bit-s", "bit-m", "bit-distilled", "bit-teacher")
# task -> the label set of its head (the rest: "vtab-<task>")
_LABEL_SETS = {"ilsvrc2012": "imagenet-1k", "imagenet21k": "imagenet-21k", "cifar10": "cifar10", "feature-vector": ""}
_ORIGINAL_FORMATS = ("npz", "h5", "savedmodel")  # the original code's eps and evaluation resize


def hyperrule_resolution(image_size):
    """BiT-HyperRule's evaluation size for images of `image_size` (height, width; None: large)."""
    return 128 if image_size is not None and image_size[0] * image_size[1] < 96 * 96 else 480


@dataclasses.dataclass(frozen=True)
class Preset:
    """One named checkpoint.

    `format` is the reader of its source ("hf", "timm", "npz" or "savedmodel"); `source` a
    transformers hub id, a timm hub name, the URL of an original `.npz` or a TF Hub handle.
    `task` is what the head was trained for: "ilsvrc2012", "imagenet21k", "cifar10",
    "vtab-<task>" or "feature-vector" (no head); `resolution` the evaluation size, `crop_pct` and
    `interpolation` the resize (timm's conventions; 1.0 for a whole-image resize).
    """

    name: str
    description: str
    depths: tuple
    width: int
    num_labels: int
    format: str
    source: str
    family: str = ""
    task: str = ""
    resolution: int = 224
    crop_pct: float = 1.0
    interpolation: str = "bilinear"

    @property
    def size(self):
        """The architecture's name ("r50x1"), "" for one outside the release."""
        return next((k for k, v in _ARCHITECTURES.items() if v == (tuple(self.depths), self.width)), "")

    @property
    def labels(self):
        """The label set of the head: "imagenet-1k", "imagenet-21k", "cifar10", "vtab-<task>"
        (`num_labels` classes) or "" (no head)."""
        return _LABEL_SETS.get(self.task, self.task)

    @property
    def label_names(self):
        """The class names of the head when tfbit ships them (ImageNet-1k, -21k, CIFAR-10, the
        VTAB-1k tasks but dmlab, whose class order no source states), else None."""
        from tfbit.weights.labels import LABEL_SETS, label_names

        return label_names(self.labels) if self.labels in LABEL_SETS else None

    @property
    def preprocessing(self):
        """How images are prepared for the weights, in `BitImageProcessor`'s terms: RGB / 255,
        normalized by `mean` and `std` (mean = std = 0.5: [-1, 1]), `size` px, either the whole
        image resized (`resize` "whole-image", the original code's evaluation) or the shorter side
        resized to size / crop_pct and center-cropped ("center-crop", timm's and transformers').
        `input_range` is what the source's own model takes: a TF Hub module takes [0, 1] and
        scales to [-1, 1] inside, so the converted model's preprocessing is the same."""
        original = self.format in _ORIGINAL_FORMATS
        return dict(
            size=self.resolution,
            resize="whole-image" if original else "center-crop",
            crop_pct=self.crop_pct,
            interpolation=self.interpolation,
            mean=(0.5, 0.5, 0.5),
            std=(0.5, 0.5, 0.5),
            input_range=(0.0, 1.0) if self.format == "savedmodel" else (-1.0, 1.0),
        )

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
            ws_eps=1e-10 if self.format in _ORIGINAL_FORMATS else 1e-8,
        )


def _title(size):
    return size.upper().replace("X", "x")  # r50x1 -> R50x1


def _preset(name, description, size, head, source, **fields):
    """A Preset of a released architecture; `head` is (num_labels, task), `source` (format, source)."""
    depths, width = _ARCHITECTURES[size]
    return Preset(name, description, depths, width, head[0], *source, task=head[1], **fields)


def _copies(name, description, size, head, timm_tag, npz_file, timm_fields, **fields):
    """The presets of one released file: timm's hub copy under `name` (with `timm_fields`, timm's
    resize) and the original `.npz` under `name`-npz; the `.npz` alone under `name` when timm
    keeps no copy (`timm_tag` None)."""
    npz_name = f"{name}-npz" if timm_tag else name
    table = [_preset(npz_name, f"{description}, original .npz", size, head, ("npz", NPZ_ROOT + npz_file), **fields)]
    if timm_tag:
        timm = {**fields, **timm_fields}
        table.insert(0, _preset(name, f"{description}, timm's copy", size, head, ("timm", f"timm/{timm_tag}"), **timm))
    return table


_IN1K, _IN21K = (_IMAGENET_1K, "ilsvrc2012"), (_IMAGENET_21K, "imagenet21k")
# timm's pretrained cfgs (timm/models/resnetv2.py): crop_pct and interpolation of its BiT tags
_TIMM_224, _TIMM_FULL = dict(crop_pct=0.875), dict(crop_pct=1.0)
_BICUBIC_224, _BICUBIC_FULL = dict(crop_pct=0.875, interpolation="bicubic"), dict(interpolation="bicubic")


def _upstream():
    """BiT-S and BiT-M as pre-trained, and the BiT-M ImageNet-1k fine-tunes."""
    table = []
    for size in _ARCHITECTURES:
        timm_name, arch, m = f"resnetv2_{size[1:]}_bit", _title(size), dict(family="bit-m")
        fine_tuned = _TIMM_FULL | dict(resolution=480 if size == "r152x4" else 448)
        table += [
            *_copies(f"bit-s-{size}", f"BiT-S {arch}: pre-trained on ImageNet-1k (ILSVRC-2012)", size, _IN1K,
                     None, f"BiT-S-{arch}.npz", {}, family="bit-s"),
            *_copies(f"bit-m-{size}", f"BiT-M {arch}: pre-trained on ImageNet-21k", size, _IN21K,
                     f"{timm_name}.goog_in21k", f"BiT-M-{arch}.npz", _TIMM_224, **m),
            *_copies(f"bit-m-{size}-ilsvrc2012", f"BiT-M {arch} fine-tuned on ImageNet-1k", size, _IN1K,
                     f"{timm_name}.goog_in21k_ft_in1k", f"BiT-M-{arch}-ILSVRC2012.npz", fine_tuned,
                     resolution=480, **m),
        ]  # fmt: skip
    return table


def _distillation():
    """The distilled R50x1 students and their R152x2 teachers (Beyer et al. 2021, the release's
    `distill/` folder); timm keeps all but the 160 px student."""
    student = "BiT R50x1 distilled from BiT-M-R152x2 (ImageNet-1k, {} px)"
    teacher = "BiT-M R152x2, teacher of the distilled R50x1 (ImageNet-1k, {} px)"
    tag = "resnetv2_152x2_bit.goog_teacher_in21k_ft_in1k"
    s, t = dict(family="bit-distilled"), dict(family="bit-teacher")
    return [
        *_copies("bit-distilled-r50x1-224", student.format(224), "r50x1", _IN1K,
                 "resnetv2_50x1_bit.goog_distilled_in1k", "distill/R50x1_224.npz", _BICUBIC_224, **s),
        *_copies("bit-distilled-r50x1-160", student.format(160), "r50x1", _IN1K,
                 None, "distill/R50x1_160.npz", {}, resolution=160, **s),
        *_copies("bit-teacher-r152x2-224", teacher.format(224), "r152x2", _IN1K,
                 tag, "distill/R152x2_T_224.npz", _BICUBIC_224, **t),
        *_copies("bit-teacher-r152x2-384", teacher.format(384), "r152x2", _IN1K,
                 f"{tag}_384", "distill/R152x2_T_384.npz", _BICUBIC_FULL, resolution=384, **t),
    ]  # fmt: skip


def _fine_tunes():
    """The original CIFAR-10 and VTAB-1k fine-tunes of BiT-M (`.npz` only)."""
    cifar = _copies("bit-m-r50x1-cifar10", "BiT-M R50x1 fine-tuned on CIFAR-10", "r50x1", (10, "cifar10"), None,
                    "BiT-M-R50x1-CIFAR10.npz", {}, family="bit-m",
                    resolution=hyperrule_resolution((32, 32)))  # fmt: skip
    vtab = [
        _preset(
            f"bit-m-{size}-vtab-{task}-run{run}",
            f"BiT-M {_title(size)} fine-tuned on VTAB-1k {task} ({classes} classes), run {run}, original .npz",
            size,
            (classes, f"vtab-{task}"),
            ("npz", f"{NPZ_ROOT}vtab/BiT-M-{_title(size)}-run{run}-{task}.npz"),
            family="bit-m",
            resolution=hyperrule_resolution(image_size),
        )
        for size in _VTAB_SIZES
        for task, (classes, image_size) in VTAB_TASKS.items()
        for run in VTAB_RUNS
    ]
    return cifar + vtab


# TF Hub module kind -> (path under the size's handle, head, resolution for BiT-S, for BiT-M)
_TFHUB_KINDS = {
    "feature-vector": ("", (0, "feature-vector"), 224, 224),
    "ilsvrc2012": ("ilsvrc2012_classification/", _IN1K, 224, 480),
    "imagenet21k": ("imagenet21k_classification/", _IN21K, None, 224),
}


def _tfhub():
    """A preset per TF Hub module, `https://tfhub.dev/google/bit/<s|m>-<size>/[<kind>/]1`: the
    upstream weights (feature vectors, BiT-S's ImageNet-1k head, BiT-M's ImageNet-21k head) at
    224, BiT-M's ImageNet-1k fine-tune at its HyperRule 480."""
    table = []
    for family, kind, size in itertools.product(("bit-s", "bit-m"), _TFHUB_KINDS, _TFHUB_SIZES):
        path, head, *resolutions = _TFHUB_KINDS[kind]
        resolution = resolutions[family == "bit-m"]
        if resolution is None:  # BiT-S has no ImageNet-21k head
            continue
        what = f"{family.replace('bit', 'BiT').upper()} {_title(size)} TF Hub module"
        handle = f"{TFHUB_ROOT}{family[-1]}-{size}/{path}1"
        table.append(
            _preset(
                f"{family}-{size}-tfhub-{kind}",
                f"{what} ({kind})",
                size,
                head,
                ("savedmodel", handle),
                family=family,
                resolution=resolution,
            )
        )
    return table


def _table():
    hf = Preset("google/bit-50", "transformers' BiT R50x1 (BiT-M fine-tuned on ImageNet-1k)", (3, 4, 6, 3), 1,
                _IMAGENET_1K, "hf", "google/bit-50", family="bit-m", task="ilsvrc2012", resolution=448)  # fmt: skip
    table = [*_upstream(), hf, *_distillation(), *_fine_tunes(), *_tfhub()]
    return {preset.name: preset for preset in table}


PRESETS = _table()
# "-" and "_" both accepted: the VTAB task names mix them (oxford_iiit_pet, clevr-count).
_CANONICAL = {name.replace("_", "-"): name for name in PRESETS}  # names are lower-case


def _canonical(text):
    return text.lower().replace("_", "-")


def _choices():
    return dict(
        family=FAMILIES,
        size=tuple(_ARCHITECTURES),
        task=tuple(dict.fromkeys([*_LABEL_SETS, "vtab", *(f"vtab-{t}" for t in VTAB_TASKS)])),
        format=tuple(dict.fromkeys(p.format for p in PRESETS.values())),
    )


def _choice(key, value):
    """The allowed `key` value `value` means (case-insensitive, "_" or "-"); ConfigError otherwise."""
    allowed = _choices()[key]
    found = [a for a in allowed if isinstance(value, str) and _canonical(a) == _canonical(value)]
    if not found:
        raise ConfigError(f"presets(): unknown {key} {value!r}: one of {', '.join(allowed)}")
    return found[0]


def _matches(preset, key, value):
    if key == "task" and value == "vtab":
        return preset.task.startswith("vtab-")
    return getattr(preset, key) == value


def presets(family=None, size=None, task=None, format=None):
    """{name: `Preset`} of the named checkpoints, all of them by default, else those of `family`
    ("bit-s", "bit-m", "bit-distilled", "bit-teacher"), `size` ("r50x1" ... "r152x4"), `task`
    ("ilsvrc2012", "imagenet21k", "cifar10", "feature-vector", "vtab" or "vtab-<task>") and
    `format` ("timm", "npz", "hf", "savedmodel"); ConfigError naming a value none has."""
    given = dict(family=family, size=size, task=task, format=format)
    wanted = {key: _choice(key, value) for key, value in given.items() if value is not None}
    return {n: p for n, p in PRESETS.items() if all(_matches(p, k, v) for k, v in wanted.items())}


def _lookup(name):
    return _CANONICAL.get(_canonical(name))


def is_preset(name):
    return isinstance(name, str) and _lookup(name) is not None


def get(name):
    """The `Preset` called `name` (case-insensitive, "_" or "-"); ConfigError listing close matches."""
    if not isinstance(name, str):
        raise TypeError(f"a preset name is a string, got {type(name).__name__}")
    if _lookup(name) is not None:
        return PRESETS[_lookup(name)]
    raise ConfigError(f"unknown preset {name!r} ({suggest(name)})")


# What `suggest` names when nothing is close: every preset, as patterns.
PATTERNS = (
    "bit-s-<size>",
    "bit-m-<size>[-npz]",
    "bit-m-<size>-ilsvrc2012[-npz]",
    "bit-m-r50x1-cifar10",
    "bit-m-<size>-vtab-<task>-run<0|1|2>",
    "bit-distilled-r50x1-224[-npz]",
    "bit-distilled-r50x1-160",
    "bit-teacher-r152x2-<224|384>[-npz]",
    "bit-<s|m>-<size>-tfhub-<feature-vector|ilsvrc2012>",
    "bit-m-<size>-tfhub-imagenet21k",
    "google/bit-50",
)


def suggest(name):
    """The presets `name` may have meant, for error messages: the closest names, else the patterns."""
    close = difflib.get_close_matches(_canonical(name), _CANONICAL, n=5, cutoff=0.6)
    if close:
        return f"close matches: {', '.join(_CANONICAL[c] for c in close)}; tfbit.presets() lists them all"
    return f"known presets: {', '.join(PATTERNS)}; tfbit.presets(family=, size=, task=) lists them"


def cache_dir():
    """Where downloaded `.npz` files are kept: `$TFBIT_CACHE`, default `~/.cache/tfbit`."""
    return os.path.abspath(os.path.expanduser(os.environ.get(CACHE_ENV) or "~/.cache/tfbit"))


def cached_path(preset):
    """Where the download of an `.npz` preset is (or will be) kept: under the release's own path
    (`bit_models/vtab/...`, `bit_models/distill/...`), so files of the same name never collide."""
    relative = preset.source.removeprefix(NPZ_ROOT) if preset.source.startswith(NPZ_ROOT) else None
    return os.path.join(cache_dir(), _CACHE_SUBDIR, *(relative or preset.source.rsplit("/", 1)[-1]).split("/"))


def fetch(preset):
    """What `tfbit.weights.read_checkpoint` reads for `preset`: the hub name or TF Hub handle, or
    the local copy of the `.npz`, downloaded on first use. The download goes to a `.partial` file
    renamed into place when complete, so an interrupted download is never taken for the file."""
    if preset.format != "npz":
        return preset.source
    path = cached_path(preset)
    if os.path.isfile(path):
        return path
    import keras

    # get_file falls back to /tmp/.keras for a folder it cannot write, which does not exist yet.
    os.makedirs(os.path.dirname(path), exist_ok=True)
    partial = os.path.basename(path) + ".partial"
    subdir = os.path.relpath(os.path.dirname(path), cache_dir())
    try:
        downloaded = keras.utils.get_file(
            partial, preset.source, cache_dir=cache_dir(), cache_subdir=subdir, force_download=True
        )
    except Exception as e:  # urllib's errors arrive re-raised as plain Exception by get_file
        raise MissingFileError(
            f"preset {preset.name}: {preset.source} could not be downloaded "
            f"({type(e).__name__}: {e}); to work offline, put the file at {path}"
        ) from None
    os.replace(downloaded, path)
    return path
