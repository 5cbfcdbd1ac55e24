"""Presets as users type them: `tfbit.presets()`, `BitConfig.from_preset`, `from_preset` of each
model class and `python -m conversion.convert <preset>`, in fresh processes resolving against
local caches in their real layouts (huggingface_hub's cache with HF_HUB_OFFLINE=1, the `.npz`
download cache under $TFBIT_CACHE); nothing is patched. The preset architectures are checked
against timm's own model definitions, timm presets against timm's pretrained cfgs, VTAB class
counts against tensorflow_datasets; one full-size R50x1 path, because a preset refuses weights
of another architecture. The label names tfbit ships are checked against timm's files, and read
in an interpreter where timm cannot be imported."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import random_images
from test_hub import write_hub_cache

import tfbit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ORIGINAL = [f"bit-{s}-{a}" for s in "sm" for a in ("r50x1", "r50x3", "r101x1", "r101x3", "r152x2", "r152x4")]


def run(args, hub_cache, tfbit_cache, timeout=900):
    """A fresh interpreter in the user's environment, offline, seeing only the test's caches."""
    env = {
        **os.environ,
        "HF_HUB_CACHE": str(hub_cache),
        "HF_HUB_OFFLINE": "1",
        "TFBIT_CACHE": str(tfbit_cache),
        "TF_CPP_MIN_LOG_LEVEL": "2",
    }
    env.pop("PYTHONPATH", None)
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_the_release_names_fine_tunes_and_hub_ids_are_listed():
    presets = tfbit.presets()
    assert set(ORIGINAL) <= set(presets) and "google/bit-50" in presets
    assert {f"{n}-ilsvrc2012" for n in ORIGINAL if n.startswith("bit-m")} <= set(presets)
    # 6 BiT-S, BiT-M and its ImageNet-1k fine-tunes from timm and as .npz (6 x 4), google/bit-50,
    # 7 of the distillation release, CIFAR-10, 5 x 19 x 3 VTAB-1k runs, 25 TF Hub modules
    assert len(presets) == 6 + 24 + 1 + 7 + 1 + 285 + 25 == 349
    assert presets["bit-s-r101x3"].source == "https://storage.googleapis.com/bit_models/BiT-S-R101x3.npz"
    assert presets["bit-m-r152x2"].source == "timm/resnetv2_152x2_bit.goog_in21k"
    assert presets["bit-m-r50x1-ilsvrc2012"].source == "timm/resnetv2_50x1_bit.goog_in21k_ft_in1k"
    assert presets["google/bit-50"].format == "hf"


def _sizes():
    return sorted({p.size for p in tfbit.presets().values()})


@pytest.mark.parametrize("size", _sizes())
def test_preset_architectures_are_timms(size, torch_module):
    """Each architecture against timm's definition of the same model (built on the meta device:
    shapes only); every preset of that size has it, eps by its source's convention."""
    import timm

    with torch_module.device("meta"):
        reference = timm.create_model(f"resnetv2_{size[1:]}_bit", pretrained=False, num_classes=0)
    for name, preset in tfbit.presets(size=size).items():
        config = tfbit.BitConfig.from_preset(name)
        assert config.embedding_size == reference.stem.conv.weight.shape[0], name
        assert config.depths == [len(stage.blocks) for stage in reference.stages], name
        assert config.stage_channels == [stage.blocks[-1].conv3.weight.shape[0] for stage in reference.stages], name
        assert config.num_labels == preset.num_labels, name
        assert config.ws_eps == (1e-8 if preset.format in ("timm", "hf") else 1e-10), name


@pytest.mark.parametrize("name", list(tfbit.presets(format="timm")))
def test_timm_presets_carry_timms_pretrained_cfg(name):
    """Head size, evaluation size, resize and normalization as timm's pretrained cfg of the tag
    (timm/models/resnetv2.py), the reference a timm user evaluates with."""
    import timm

    preset = tfbit.presets()[name]
    cfg = timm.models.get_pretrained_cfg(preset.source.removeprefix("timm/"))
    pre = preset.preprocessing
    assert cfg.hf_hub_id == preset.source and cfg.num_classes == preset.num_labels
    assert tuple(cfg.input_size) == (3, preset.resolution, preset.resolution) and pre["size"] == preset.resolution
    assert (cfg.crop_pct, cfg.interpolation) == (pre["crop_pct"], pre["interpolation"])
    assert (tuple(cfg.mean), tuple(cfg.std)) == (pre["mean"], pre["std"]) == ((0.5,) * 3, (0.5,) * 3)
    assert pre["resize"] == "center-crop" and pre["input_range"] == (-1.0, 1.0)


R = "https://storage.googleapis.com/bit_models/"
H = r"https://tfhub\.dev/google/bit/"
T = r"timm/resnetv2_{n}_bit\.goog_"
SIZE = r"r(?:50|101|152)x[1-4]"
K1, K21, W, C = "imagenet-1k", "imagenet-21k", "whole-image", "center-crop"
# name pattern -> (format, source pattern, num_labels, label set, resolutions, resize, input range low)
FAMILIES = {
    rf"bit-s-({SIZE})": ("npz", R + r"BiT-S-{S}\.npz", 1000, K1, 224, W, -1),
    rf"bit-m-({SIZE})": ("timm", T + "in21k", 21843, K21, 224, C, -1),
    rf"bit-m-({SIZE})-npz": ("npz", R + r"BiT-M-{S}\.npz", 21843, K21, 224, W, -1),
    rf"bit-m-({SIZE})-ilsvrc2012": ("timm", T + "in21k_ft_in1k", 1000, K1, (448, 480), C, -1),
    rf"bit-m-({SIZE})-ilsvrc2012-npz": ("npz", R + r"BiT-M-{S}-ILSVRC2012\.npz", 1000, K1, 480, W, -1),
    r"bit-m-(r50x1)-cifar10": ("npz", R + r"BiT-M-R50x1-CIFAR10\.npz", 10, "cifar10", 128, W, -1),
    r"bit-distilled-(r50x1)-224": ("timm", T + "distilled_in1k", 1000, K1, 224, C, -1),
    r"bit-distilled-(r50x1)-224-npz": ("npz", R + r"distill/R50x1_224\.npz", 1000, K1, 224, W, -1),
    r"bit-distilled-(r50x1)-160": ("npz", R + r"distill/R50x1_160\.npz", 1000, K1, 160, W, -1),
    r"bit-teacher-(r152x2)-224": ("timm", T + "teacher_in21k_ft_in1k", 1000, K1, 224, C, -1),
    r"bit-teacher-(r152x2)-384": ("timm", T + "teacher_in21k_ft_in1k_384", 1000, K1, 384, C, -1),
    r"bit-teacher-(r152x2)-224-npz": ("npz", R + r"distill/R152x2_T_224\.npz", 1000, K1, 224, W, -1),
    r"bit-teacher-(r152x2)-384-npz": ("npz", R + r"distill/R152x2_T_384\.npz", 1000, K1, 384, W, -1),
    rf"bit-m-({SIZE})-vtab-([a-z0-9_-]+)-run([012])": (
        "npz",
        R + r"vtab/BiT-M-{S}-run\d-[a-z0-9_-]+\.npz",
        None,
        None,
        (128, 480),
        W,
        -1,
    ),
    rf"bit-[sm]-({SIZE})-tfhub-feature-vector": ("savedmodel", H + r"[sm]-{s}/1", 0, "", 224, W, 0),
    rf"bit-s-({SIZE})-tfhub-ilsvrc2012": ("savedmodel", H + r"s-{s}/ilsvrc2012_classification/1", 1000, K1, 224, W, 0),
    rf"bit-m-({SIZE})-tfhub-ilsvrc2012": ("savedmodel", H + r"m-{s}/ilsvrc2012_classification/1", 1000, K1, 480, W, 0),
    rf"bit-m-({SIZE})-tfhub-imagenet21k": (
        "savedmodel",
        H + r"m-{s}/imagenet21k_classification/1",
        21843,
        K21,
        224,
        W,
        0,
    ),
    r"google/bit-50": ("hf", r"google/bit-50", 1000, K1, 448, C, -1),
}


def test_every_preset_is_of_one_family_with_its_source_head_resolution_and_preprocessing():
    """Each name fits exactly one documented pattern, which fixes its reader, source URL form
    (the release's file names, timm's tags, TF Hub's handles), head, label set, evaluation size
    and preprocessing."""
    import re

    for name, preset in tfbit.presets().items():
        fits = [(p, m) for p in FAMILIES if (m := re.fullmatch(p, name))]
        assert len(fits) == 1, (name, fits)
        pattern, match = fits[0]
        fmt, source, num_labels, labels, resolution, resize, low = FAMILIES[pattern]
        size = match.group(1) if match.groups() else "r50x1"
        title = size.upper().replace("X", "x")
        source = source.replace("{S}", title).replace("{s}", size).replace("{n}", size[1:])
        assert preset.size == size and preset.format == fmt and re.fullmatch(source, preset.source), name
        assert num_labels is None or preset.num_labels == num_labels, name
        assert labels is None or preset.labels == labels, name
        assert resolution is None or preset.resolution in (
            resolution if isinstance(resolution, tuple) else (resolution,)
        )
        pre = preset.preprocessing
        assert (pre["resize"], pre["input_range"], pre["mean"], pre["std"]) == (
            resize,
            (low, 1.0),
            (0.5,) * 3,
            (0.5,) * 3,
        )
        assert preset.family and name.startswith(preset.family) or name == "google/bit-50"
        assert preset.description


def test_release_file_names_resolutions_and_the_cache_layout():
    presets = tfbit.presets()
    vtab = presets["bit-m-r101x3-vtab-oxford_iiit_pet-run2"]
    assert vtab.source == R + "vtab/BiT-M-R101x3-run2-oxford_iiit_pet.npz" and vtab.num_labels == 37
    assert vtab.labels == "vtab-oxford_iiit_pet" and vtab.label_names[0] == "Abyssinian"
    assert (
        presets["bit-teacher-r152x2-384-npz"].resolution == 384
        and presets["bit-teacher-r152x2-224-npz"].resolution == 224
    )
    assert [presets[f"bit-m-{s}-ilsvrc2012"].resolution for s in ("r50x1", "r152x2", "r152x4")] == [448, 448, 480]
    from tfbit.models.presets import cached_path, fetch

    cache = os.path.join(os.path.expanduser("~"), ".cache", "tfbit", "bit_models")
    if os.environ.get("TFBIT_CACHE"):
        cache = os.path.join(os.path.abspath(os.environ["TFBIT_CACHE"]), "bit_models")
    assert cached_path(vtab) == os.path.join(cache, "vtab", "BiT-M-R101x3-run2-oxford_iiit_pet.npz")
    assert cached_path(presets["bit-distilled-r50x1-160"]) == os.path.join(cache, "distill", "R50x1_160.npz")
    assert cached_path(presets["bit-s-r50x1"]) == os.path.join(cache, "BiT-S-R50x1.npz")
    hub = presets["bit-m-r50x3-tfhub-feature-vector"]
    assert fetch(hub) == "https://tfhub.dev/google/bit/m-r50x3/1" == hub.source  # the reader resolves handles
    assert hub.architecture["num_labels"] == 0 and hub.label_names is None


# VTAB task -> (tfds dataset, its label feature, VTAB's regrouped count or None). The regroupings
# are google-research/task_adaptation's (scripts/run_all_tasks.sh: dSprites x position and
# orientation in 16 classes); CLEVR and KITTI labels are VTAB's own (data/clevr.py count_all 8,
# closest_object_distance 6; data/kitti.py closest_vehicle_distance 4): no tfds feature has them.
TFDS = {
    "caltech101": ("caltech101", "label", None),
    "cifar100": ("cifar100", "label", None),
    "dtd": ("dtd", "label", None),
    "oxford_flowers102": ("oxford_flowers102", "label", None),
    "oxford_iiit_pet": ("oxford_iiit_pet", "label", None),
    "sun397": ("sun397", "label", None),
    "svhn": ("svhn_cropped", "label", None),
    "patch_camelyon": ("patch_camelyon", "label", None),
    "eurosat": ("eurosat", "label", None),
    "resisc45": ("resisc45", "label", None),
    "diabetic_retinopathy": ("diabetic_retinopathy_detection", "label", None),
    "clevr-count": ("clevr", None, 8),
    "clevr-distance": ("clevr", None, 6),
    "dmlab": ("dmlab", "label", None),
    "dsprites-xpos": ("dsprites", "label_x_position", 16),
    "dsprites-orientation": ("dsprites", "label_orientation", 16),
    "kitti-distance": ("kitti", None, 4),
    "smallnorb-azimuth": ("smallnorb", "label_azimuth", None),
    "smallnorb-elevation": ("smallnorb", "label_elevation", None),
}


def test_vtab_class_counts_and_resolutions_follow_tfds_and_the_hyperrule(tmp_path):
    """Class counts from tfds' own dataset definitions (a tfbit dependency; builders' info needs
    no download), image sizes from tfds' image features, the resolution from BiT-HyperRule."""
    import tensorflow_datasets as tfds

    from tfbit.models.presets import VTAB_TASKS, hyperrule_resolution

    assert list(TFDS) == list(VTAB_TASKS)
    low_res = set()
    for task, (dataset, feature, regrouped) in TFDS.items():
        info = tfds.builder(dataset, data_dir=str(tmp_path)).info
        classes, image_size = VTAB_TASKS[task]
        if feature is not None:
            assert regrouped is not None or info.features[feature].num_classes == classes, task
            assert regrouped is None or info.features[feature].num_classes > regrouped == classes, task
        else:
            assert classes == regrouped, task
        shape = info.features["image"].shape[:2]
        assert (None if None in shape else shape) == image_size, task
        if hyperrule_resolution(image_size) == 128:
            low_res.add(task)
        runs = tfbit.presets(task=f"vtab-{task}")
        assert len(runs) == 15 and {p.num_labels for p in runs.values()} == {classes}, task
        assert {p.resolution for p in runs.values()} == {hyperrule_resolution(image_size)}, task
    # 96x96 (patch_camelyon, smallnorb) is not below the rule's 96*96 area: 480 px
    assert low_res == {"cifar100", "svhn", "eurosat", "dsprites-xpos", "dsprites-orientation"}


def test_presets_filter_by_family_size_task_and_format():
    everything = tfbit.presets()
    assert tfbit.presets(family=None, size=None, task=None, format=None) == everything
    vtab = tfbit.presets(family="bit-m", size="r50x1", task="vtab")
    assert len(vtab) == 19 * 3 and all(n.startswith("bit-m-r50x1-vtab-") for n in vtab)
    assert list(tfbit.presets(family="bit-distilled")) == [
        "bit-distilled-r50x1-224",
        "bit-distilled-r50x1-224-npz",
        "bit-distilled-r50x1-160",
    ]
    assert set(tfbit.presets(family="bit-teacher")) == {
        f"bit-teacher-r152x2-{px}{s}" for px in (224, 384) for s in ("", "-npz")
    }
    assert set(tfbit.presets(size="r152x2", task="ilsvrc2012")) == {
        "bit-s-r152x2",
        "bit-m-r152x2-ilsvrc2012",
        "bit-m-r152x2-ilsvrc2012-npz",
        *tfbit.presets(family="bit-teacher"),
    }
    hub = tfbit.presets(format="savedmodel")
    assert len(hub) == 25 and all(p.source.startswith("https://tfhub.dev/google/bit/") for p in hub.values())
    assert (
        len(tfbit.presets(task="feature-vector")) == 10
        and len(tfbit.presets(task="imagenet21k", format="savedmodel")) == 5
    )
    assert tfbit.presets(family="BiT-M", task="vtab-oxford-iiit-pet") == tfbit.presets(task="vtab-oxford_iiit_pet")
    assert len(tfbit.presets(task="vtab-oxford_iiit_pet")) == 15
    assert tfbit.presets(family="bit-s", task="vtab") == {}


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(family="bit-l"), "presets(): unknown family 'bit-l': one of bit-s, bit-m, bit-distilled, bit-teacher"),
        (dict(size="r50"), "presets(): unknown size 'r50': one of r50x1, r50x3, r101x1, r101x3, r152x2, r152x4"),
        (dict(task="vtab-flowers"), "presets(): unknown task 'vtab-flowers': one of ilsvrc2012, imagenet21k, cifar10, "
         "feature-vector, vtab, vtab-caltech101, vtab-cifar100, vtab-dtd, vtab-oxford_flowers102,"),
        (dict(format="onnx"), "presets(): unknown format 'onnx': one of npz, timm, hf, savedmodel"),
        (dict(size=50), "presets(): unknown size 50: one of r50x1"),
    ],
)  # fmt: skip
def test_presets_refuse_an_unknown_filter_value_naming_the_allowed_ones(kwargs, message):
    with pytest.raises(tfbit.ConfigError) as raised:
        tfbit.presets(**kwargs)
    assert str(raised.value).startswith(message)


def test_every_name_is_unique_lower_case_and_round_trips_through_get():
    from tfbit.models.presets import get, is_preset

    names = list(tfbit.presets())
    assert len({n.replace("_", "-") for n in names}) == len(names)
    for name, preset in tfbit.presets().items():
        assert name == name.lower() and preset.name == name
        assert get(name) is preset and get(name.upper()) is preset and get(name.replace("_", "-")) is preset
        assert is_preset(name) and tfbit.BitConfig.from_preset(name).num_labels == preset.num_labels
    assert not is_preset("bit-m-r50x1-vtab-dtd") and not is_preset(None)


def test_unknown_preset_names_close_matches():
    with pytest.raises(ValueError, match=r"unknown preset 'bit-m-r50' \(close matches: bit-m-r50x\d"):
        tfbit.BitConfig.from_preset("bit-m-r50")
    with pytest.raises(ValueError, match=r"unknown preset 'resnet50' \(known presets: bit-s-<size>, bit-m-<size>"):
        tfbit.BitModel.from_preset("resnet50")
    with pytest.raises(tfbit.ConfigError) as raised:
        tfbit.BitModel.from_preset("bit-m-r50x1-vtab-flowers-run0")
    assert "bit-m-r50x1-vtab-oxford_flowers102-run0" in str(raised.value)
    with pytest.raises(tfbit.ConfigError) as raised:
        tfbit.BitModel.from_preset("bit-m-r50x1-feature-vector")
    assert "close matches: bit-m-r50x1-tfhub-feature-vector," in str(raised.value)


def test_patterns_of_the_error_message_cover_every_preset():
    """The patterns `suggest` lists when nothing is close name every preset and nothing else."""
    import re

    from tfbit.models.presets import PATTERNS

    def regex(pattern):
        pattern = pattern.replace("<size>", SIZE).replace("<task>", "[a-z0-9_-]+")
        pattern = re.sub(r"<([^>]+)>", lambda m: "(?:" + m.group(1) + ")", pattern)
        return pattern.replace("[-npz]", "(?:-npz)?")

    for name in tfbit.presets():
        assert sum(bool(re.fullmatch(regex(p), name)) for p in PATTERNS) == 1, name


# --- label names shipped with tfbit (tfbit/weights/label_data), timm as the control ---


def _timm_info():
    import importlib.util
    from pathlib import Path

    return Path(importlib.util.find_spec("timm").submodule_search_locations[0], "data", "_info")


def test_shipped_label_names_are_timms():
    from tfbit.weights.labels import label_names, wordnet_ids

    info = _timm_info()
    lemmas = dict(
        line.split("\t", 1) for line in (info / "imagenet_synset_to_lemma.txt").read_text("utf-8").splitlines()
    )
    for label_set, file, count in [
        ("imagenet-1k", "imagenet_synsets.txt", 1000),
        ("imagenet-21k", "imagenet21k_goog_synsets.txt", 21843),
    ]:
        synsets = (info / file).read_text("utf-8").splitlines()
        assert wordnet_ids(label_set) == synsets and len(synsets) == count
        assert label_names(label_set) == [lemmas[s] for s in synsets]
    assert label_names("imagenet-1k")[:2] == ["tench, Tinca tinca", "goldfish, Carassius auratus"]
    assert wordnet_ids("imagenet-21k")[0] == "n00004475" and label_names("imagenet-21k")[0] == "organism, being"


def test_shipped_label_files_are_what_the_tool_writes(tmp_path):
    """tools/make_label_data.py rebuilds the shipped files byte for byte from the installed timm,
    with the licence notice beside them."""
    done = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "make_label_data.py"), "--output", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    shipped = os.path.join(ROOT, "tfbit", "weights", "label_data")
    assert (
        sorted(os.listdir(shipped))
        == sorted(os.listdir(tmp_path))
        == [
            "NOTICE.md",
            "imagenet-1k.tsv.gz",
            "imagenet-21k.tsv.gz",
            "vtab.json",
        ]
    )
    for name in os.listdir(shipped):
        assert (tmp_path / name).read_bytes() == open(os.path.join(shipped, name), "rb").read(), name
    notice = (tmp_path / "NOTICE.md").read_text()
    assert "Apache License 2.0" in notice and "WordNet 3.0 Copyright 2006 by Princeton University" in notice
    assert "tensorflow_datasets" in notice and "google-research/task_adaptation" in notice


def test_known_labels_by_head_size_and_presets_label_names():
    from tfbit.weights.labels import CIFAR10_LABELS, known_labels, label_names

    assert known_labels(1000) == label_names("imagenet-1k") and len(known_labels(21843)) == 21843
    assert known_labels(10, "BiT-M-R50x1-CIFAR10") == list(CIFAR10_LABELS) == label_names("cifar10")
    assert known_labels(10, "BiT-M-R50x1-run0-svhn") is None and known_labels(0) is None and known_labels(37) is None
    presets = tfbit.presets()
    assert presets["bit-m-r50x1-tfhub-imagenet21k"].label_names == label_names("imagenet-21k")
    assert presets["bit-distilled-r50x1-160"].label_names == label_names("imagenet-1k")
    assert presets["bit-m-r50x1-cifar10"].label_names == list(CIFAR10_LABELS)


def test_unknown_label_sets_are_named():
    from tfbit.weights.labels import label_names, wordnet_ids

    with pytest.raises(
        tfbit.ConfigError, match="unknown label set 'imagenet-22k': one of imagenet-1k, imagenet-21k, cifar10"
    ):
        label_names("imagenet-22k")
    with pytest.raises(tfbit.ConfigError, match="unknown label set 'cifar10': one of imagenet-1k, imagenet-21k$"):
        wordnet_ids("cifar10")
    with pytest.raises(
        tfbit.ConfigError,
        match="unknown label set 'vtab-dmlab': one of imagenet-1k, imagenet-21k, cifar10, vtab-<task> with <task> "
        "one of caltech101, cifar100, .*, smallnorb-elevation$",
    ):
        label_names("vtab-dmlab")


# VTAB tasks whose names are tfds' ClassLabel names: (tfds dataset, its label feature), the control
# read through tfds' own API (builder info, no download) rather than the files the tool reads
TFDS_NAMED = {
    "caltech101": ("caltech101", "label"),
    "dtd": ("dtd", "label"),
    "oxford_flowers102": ("oxford_flowers102", "label"),
    "oxford_iiit_pet": ("oxford_iiit_pet", "label"),
    "sun397": ("sun397", "label"),
    "eurosat": ("eurosat", "label"),
    "resisc45": ("resisc45", "label"),
}


def test_vtab_label_names_follow_tfds_and_task_adaptation(tmp_path):
    """Every VTAB task but dmlab has names, as many as its head has classes, unique, in every
    preset of the task; tfds-named tasks equal tfds' ClassLabel names; the derived ones follow
    task_adaptation's rules (tfbit/weights/label_data/NOTICE.md)."""
    import tensorflow_datasets as tfds

    from tfbit.models.presets import VTAB_TASKS
    from tfbit.weights.labels import LABEL_SETS, label_names

    for task, (classes, _) in VTAB_TASKS.items():
        runs = tfbit.presets(task=f"vtab-{task}").values()
        if task == "dmlab":  # no source states its class order
            assert "vtab-dmlab" not in LABEL_SETS and {p.label_names for p in runs} == {None}
            continue
        names = label_names(f"vtab-{task}")
        assert LABEL_SETS[f"vtab-{task}"] == len(names) == len(set(names)) == classes, task
        assert all(p.label_names == names for p in runs), task
    for task, (dataset, feature) in TFDS_NAMED.items():
        assert label_names(f"vtab-{task}") == tfds.builder(dataset, data_dir=str(tmp_path)).info.features[feature].names
    assert label_names("vtab-oxford_iiit_pet")[:2] == ["Abyssinian", "american_bulldog"]
    assert label_names("vtab-sun397")[0] == "/a/abbey" and label_names("vtab-caltech101")[4] == "background_google"
    cifar100 = label_names("vtab-cifar100")  # the archive's fine_label_names.txt is alphabetical
    assert cifar100 == sorted(cifar100) and cifar100[:2] == ["apple", "aquarium_fish"] and "crab" in cifar100
    assert label_names("vtab-svhn") == [str(d) for d in range(10)]
    assert label_names("vtab-diabetic_retinopathy")[::4] == ["No DR", "Proliferative DR"]
    assert label_names("vtab-patch_camelyon") == ["no metastatic tissue", "metastatic tissue"]
    assert label_names("vtab-clevr-count")[::7] == ["3 objects", "10 objects"]
    assert label_names("vtab-clevr-distance")[::5] == ["closest object depth 0-8", "closest object depth 10-100"]
    assert label_names("vtab-kitti-distance")[::3] == ["closest vehicle up to 8 m", "no vehicle"]
    assert label_names("vtab-smallnorb-azimuth")[:2] == ["0\u00b0", "20\u00b0"]
    assert label_names("vtab-smallnorb-elevation")[::8] == ["30\u00b0", "70\u00b0"]
    # dsprites.py: class floor(v / (values / 16)) of tfds value v
    for task, what, values in (("dsprites-xpos", "x positions", 32), ("dsprites-orientation", "orientations", 40)):
        groups = [[v for v in range(values) if v * 16 // values == c] for c in range(16)]
        assert label_names(f"vtab-{task}") == [f"{what} {g[0]}-{g[-1]} of 0-{values - 1}" for g in groups]


NO_TIMM_RUN = """
import sys

class NoTimm:  # the user's world: timm is not installed
    def find_spec(self, name, path=None, target=None):
        if name == "timm" or name.startswith("timm."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)

sys.meta_path.insert(0, NoTimm())
try:
    import timm
except ModuleNotFoundError as e:
    print("blocked:", e)
import tfbit
from tfbit.weights import read_checkpoint
for path in sys.argv[1:]:
    config = read_checkpoint(path).config
    print(config.num_labels, config.id2label[0], "|", config.id2label[config.num_labels - 1])
"""


def test_label_names_without_timm(tmp_path):
    """A fresh interpreter where timm cannot be imported names the classes of .npz heads."""
    from tfbit.weights.writers import save_original_npz

    paths = []
    small = dict(embedding_size=32, hidden_sizes=[128] * 4, depths=[1] * 4)  # .npz files have 32 groups
    for num_labels in (1000, 21843):
        model = tfbit.BitForImageClassification(tfbit.BitConfig(**small, num_labels=num_labels))
        paths.append(str(tmp_path / f"head{num_labels}.npz"))
        save_original_npz(model, paths[-1])
    done = run(["-c", NO_TIMM_RUN, *paths], tmp_path / "hub", tmp_path / "tfbit")
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line for line in done.stdout.splitlines() if line[:1] in "b12"]
    assert lines == [
        "blocked: No module named 'timm'",
        "1000 tench, Tinca tinca | toilet tissue, toilet paper, bathroom tissue",
        "21843 organism, being | knothole",
    ]


DOWNLOAD_RUN = """
import sys, numpy as np
from tfbit.models.presets import Preset, cached_path, fetch
source, missing = sys.argv[1:]
preset = Preset("test", "", (1,), 1, 1, "npz", source)
path = fetch(preset)
print(path == cached_path(preset), np.load(path)["x"].tolist(), path)
try:
    fetch(Preset("gone", "", (1,), 1, 1, "npz", missing))
except FileNotFoundError as e:
    print(e)
"""


def test_npz_download_goes_through_a_partial_file_into_the_cache(tmp_path):
    """The real download code (keras.utils.get_file) on file:// URLs, into $TFBIT_CACHE."""
    np.savez(tmp_path / "BiT-S-R50x1.npz", x=np.ones(3, "float32"))
    done = run(
        ["-c", DOWNLOAD_RUN, (tmp_path / "BiT-S-R50x1.npz").as_uri(), (tmp_path / "BiT-S-R50x3.npz").as_uri()],
        tmp_path / "hub",
        tmp_path / "cache",
    )
    assert done.returncode == 0, done.stderr
    lines = [
        line for line in done.stdout.splitlines() if line.startswith(("True", "False", "preset"))
    ]  # no progress bars
    assert lines[0] == f"True [1.0, 1.0, 1.0] {tmp_path / 'cache' / 'bit_models' / 'BiT-S-R50x1.npz'}"
    assert lines[1].startswith(f"preset gone: {(tmp_path / 'BiT-S-R50x3.npz').as_uri()} could not be downloaded")
    assert lines[1].endswith(
        f"to work offline, put the file at {tmp_path / 'cache' / 'bit_models' / 'BiT-S-R50x3.npz'}"
    )
    assert os.listdir(tmp_path / "cache" / "bit_models") == ["BiT-S-R50x1.npz"]  # no partial file left


@pytest.fixture(scope="module")
def caches(tmp_path_factory, torch_module):
    """Full-size R50x1 weights in each preset source's real layout: google/bit-50 (written by
    transformers) and timm's BiT-M ImageNet-1k fine-tune (timm's state dict, its hub config) in a
    hub cache; BiT-S-R50x1.npz (original layout, written by tfbit) in the download cache.
    Returns the caches and the PyTorch models the presets must compute."""
    import timm
    import transformers
    from safetensors.torch import save_file

    from tfbit.weights.writers import save_original_npz

    tmp = tmp_path_factory.mktemp("presets")
    hub, download = tmp / "hub", tmp / "tfbit"
    torch_module.manual_seed(0)
    hf_model = transformers.BitForImageClassification(transformers.BitConfig(num_labels=1000)).eval()
    hf_model.save_pretrained(tmp / "hf")
    write_hub_cache(hub, "google/bit-50", {f: tmp / "hf" / f for f in ("config.json", "model.safetensors")})
    timm_model = timm.create_model("resnetv2_50x1_bit", pretrained=False, num_classes=1000).eval()
    save_file({k: v.contiguous() for k, v in timm_model.state_dict().items()}, tmp / "timm.safetensors")
    (tmp / "timm_config.json").write_text(
        json.dumps(
            {
                "architecture": "resnetv2_50x1_bit",
                "num_classes": 1000,
                "pretrained_cfg": {"input_size": [3, 448, 448], "crop_pct": 1.0},
            }
        )
    )
    write_hub_cache(
        hub,
        "timm/resnetv2_50x1_bit.goog_in21k_ft_in1k",
        {"model.safetensors": tmp / "timm.safetensors", "config.json": tmp / "timm_config.json"},
    )
    # the BiT-S file: timm's weights written in the original layout, for the original eps
    (download / "bit_models").mkdir(parents=True)
    tfbit_model = tfbit.BitForImageClassification.from_pretrained(tmp / "timm.safetensors")
    save_original_npz(tfbit_model, download / "bit_models" / "BiT-S-R50x1.npz")
    return hub, download, {"google/bit-50": hf_model, "bit-m-r50x1-ilsvrc2012": timm_model, "bit-s-r50x1": timm_model}


PRESET_RUN = """
import sys, numpy as np, tfbit
x, out = np.load(sys.argv[1]), {}
for name in ("bit-s-r50x1", "google/bit-50", "bit-m-r50x1-ilsvrc2012"):  # the last one is kept
    model = tfbit.BitForImageClassification.from_preset(name)
    out[name] = np.asarray(model(x))
    out[name + "/eps"] = model.config.ws_eps
features = tfbit.BitModel.from_preset("bit-s-r50x1")
out["features"] = np.asarray(features(x)["pooler_output"])
new = tfbit.BitForImageClassification.from_preset("bit-m-r50x1-ilsvrc2012", num_labels=5)
out["new_head"] = np.asarray(new(x))
out["new_labels"] = np.array(new.config.id2label[4])
out["same_body"] = all(np.array_equal(a, b) for a, b in zip(new.get_weights()[:-2], model.get_weights()[:-2]))
np.savez(sys.argv[2], **out)
"""


def test_from_preset_loads_each_source_from_its_cache(caches, tmp_path, torch_module):
    from conftest import assert_parity, run_torch

    hub, download, references = caches
    x = random_images(1, 64, 64)
    np.save(tmp_path / "x.npy", x)
    done = run(["-c", PRESET_RUN, str(tmp_path / "x.npy"), str(tmp_path / "out.npz")], hub, download)
    assert done.returncode == 0, done.stderr[-3000:]
    out = np.load(tmp_path / "out.npz")
    for name, reference in references.items():
        logits = run_torch(reference, x)
        assert_parity(out[name], getattr(logits, "logits", logits), name)
    assert out["bit-s-r50x1/eps"] == 1e-10 and out["google/bit-50/eps"] == 1e-8  # each source's convention
    timm_model = references["bit-s-r50x1"]
    with torch_module.no_grad():
        nchw = torch_module.from_numpy(x.transpose(0, 3, 1, 2).copy())
        pooled = timm_model.forward_head(timm_model.forward_features(nchw), pre_logits=True)
    assert_parity(out["features"], pooled, "features")
    assert out["new_head"].shape == (1, 5) and str(out["new_labels"]) == "LABEL_4" and out["same_body"]


def test_original_files_are_evaluated_at_the_presets_resolution(caches, tmp_path, monkeypatch):
    """The .npz says nothing of its evaluation size: the distilled 160 px student (same
    architecture as BiT-S R50x1, so its cached file can be the same weights) is read with a 160 px
    whole-image resize, BiT-S with the pre-training 224."""
    import shutil

    from tfbit.weights import read_preset

    _, download, _ = caches
    cache = tmp_path / "cache"
    (cache / "bit_models" / "distill").mkdir(parents=True)
    shutil.copy(download / "bit_models" / "BiT-S-R50x1.npz", cache / "bit_models" / "BiT-S-R50x1.npz")
    shutil.copy(download / "bit_models" / "BiT-S-R50x1.npz", cache / "bit_models" / "distill" / "R50x1_160.npz")
    monkeypatch.setenv("TFBIT_CACHE", str(cache))
    for name, size in (("bit-distilled-r50x1-160", 160), ("bit-s-r50x1", 224)):
        processor = read_preset(name).preprocessor
        assert processor["size"] == {"height": size, "width": size} and not processor["do_center_crop"], name


def test_vtab_presets_read_from_the_cache_are_named_by_their_task(tmp_path, monkeypatch):
    """A VTAB .npz names no class and its head's size does not tell the task (SVHN and EuroSAT
    both have 10): the preset gives the config its task's names, dmlab keeps LABEL_<i>. One
    full-size R50x1 file per head size, cached under each preset's path."""
    from tfbit.models.presets import cached_path
    from tfbit.models.presets import get as get_preset
    from tfbit.weights import read_preset
    from tfbit.weights.labels import label_names
    from tfbit.weights.writers import save_original_npz

    monkeypatch.setenv("TFBIT_CACHE", str(tmp_path / "cache"))
    tasks = {10: ("svhn", "eurosat"), 6: ("clevr-distance", "dmlab")}
    for num_labels, names in tasks.items():
        presets = [get_preset(f"bit-m-r50x1-vtab-{task}-run1") for task in names]
        model = tfbit.BitForImageClassification(tfbit.BitConfig(**presets[0].architecture))
        for preset in presets:
            os.makedirs(os.path.dirname(cached_path(preset)), exist_ok=True)
        save_original_npz(model, cached_path(presets[0]))
        os.link(cached_path(presets[0]), cached_path(presets[1]))
    for task in ("svhn", "eurosat", "clevr-distance"):
        config = read_preset(f"bit-m-r50x1-vtab-{task}-run1").config
        assert config.id2label == dict(enumerate(label_names(f"vtab-{task}"))), task
        assert config.label2id == {name: i for i, name in config.id2label.items()}, task
    assert read_preset("bit-m-r50x1-vtab-dmlab-run1").config.id2label == {i: f"LABEL_{i}" for i in range(6)}
    assert read_preset("bit-m-r50x1-vtab-eurosat-run1").config.id2label[9] == "SeaLake"
    model = tfbit.BitForImageClassification.from_preset("bit-m-r50x1-vtab-clevr-distance-run1")
    assert model.config.id2label[5] == "closest object depth 10-100"  # what predict prints


def test_timm_reads_the_npz_tfbit_wrote(caches, torch_module):
    """The original-layout writer against the peer reader: timm's own .npz loader, into a timm
    ResNetV2 with the original eps, computes what the timm model the weights came from computes."""
    from conftest import assert_parity, run_torch
    from timm.models.resnetv2 import _load_weights

    from conversion.references import timm_model

    _, download, references = caches
    reference = timm_model(tfbit.BitConfig.from_preset("bit-s-r50x1"), 1000)
    _load_weights(reference, str(download / "bit_models" / "BiT-S-R50x1.npz"))
    x = random_images(1, 64, 64, seed=3)
    assert_parity(run_torch(reference, x).numpy(), run_torch(references["bit-s-r50x1"], x), "timm on tfbit's .npz")


def test_convert_cli_accepts_a_preset_name(caches, tmp_path):
    hub, download, _ = caches
    done = run(
        [
            "-m",
            "conversion.convert",
            "bit-s-r50x1",
            "--output",
            str(tmp_path / "out"),
            "--formats",
            "keras",
            "--num-images",
            "2",
        ],
        hub,
        download,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["passed"] and report["format"] == "npz" and (tmp_path / "out" / "bit-s-r50x1.keras").exists()


def test_weights_of_another_architecture_are_refused(tmp_path, torch_module):
    """A cached repo of the preset's name holding something else is named, with what differs."""
    import functools

    from safetensors.torch import save_file
    from timm.layers import StdConv2d
    from timm.models.resnetv2 import ResNetV2

    small = ResNetV2(
        layers=[1, 1, 1, 1],
        channels=(128, 256, 512, 1024),
        stem_chs=32,
        stem_type="fixed",
        conv_layer=functools.partial(StdConv2d, eps=1e-8),
        num_classes=3,
    )
    save_file({k: v.contiguous() for k, v in small.state_dict().items()}, tmp_path / "model.safetensors")
    write_hub_cache(
        tmp_path / "hub", "timm/resnetv2_101x1_bit.goog_in21k", {"model.safetensors": tmp_path / "model.safetensors"}
    )
    done = run(["-c", "import tfbit; tfbit.BitModel.from_preset('bit-m-r101x1')"], tmp_path / "hub", tmp_path / "tfbit")
    assert done.returncode == 1
    assert (
        "CheckpointError:" in done.stderr
        and "is not preset bit-m-r101x1: embedding_size 32 (expected 64)" in done.stderr
    )
    assert (
        "depths [1, 1, 1, 1] (expected [3, 4, 23, 3])" in done.stderr and "num_labels 3 (expected 21843)" in done.stderr
    )


def test_load_weights_false_downloads_nothing(tmp_path):
    code = (
        "import tfbit\n"
        "m = tfbit.BitForImageClassification.from_preset('bit-s-r50x1', load_weights=False, num_labels=10)\n"
        "print(type(m).__name__, m.config.num_labels, m.config.ws_eps, m.output_shape)\n"
    )
    done = run(["-c", code], tmp_path / "hub", tmp_path / "tfbit")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["BitForImageClassification", "10", "1e-10", "(None,", "10)"]
    assert not (tmp_path / "tfbit").exists() and not (tmp_path / "hub").exists()


def test_convert_cli_names_close_matches_of_an_unknown_preset(tmp_path):
    done = run(
        ["-m", "conversion.convert", "bit-m-r50x", "--output", str(tmp_path / "out")],
        tmp_path / "hub",
        tmp_path / "tfbit",
    )
    assert done.returncode == 2
    assert "bit-m-r50x: no such file or directory, and not a hub repo id" in done.stderr
    assert "nor a preset (close matches: bit-m-r50x" in done.stderr
