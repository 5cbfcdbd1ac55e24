"""Presets as users type them: `tfbit.presets()`, `BitConfig.from_preset`, `from_preset` of each
model class and `python -m conversion.convert <preset>`, in fresh processes resolving against
local caches in their real layouts (huggingface_hub's cache with HF_HUB_OFFLINE=1, the `.npz`
download cache under $TFBIT_CACHE); nothing is patched. The preset architectures are checked
against timm's own model definitions; one full-size R50x1 path, because a preset refuses weights
of another architecture."""

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
    assert len(presets) == 19
    assert presets["bit-s-r101x3"].source == "https://storage.googleapis.com/bit_models/BiT-S-R101x3.npz"
    assert presets["bit-m-r152x2"].source == "timm/resnetv2_152x2_bit.goog_in21k"
    assert presets["bit-m-r50x1-ilsvrc2012"].source == "timm/resnetv2_50x1_bit.goog_in21k_ft_in1k"
    assert presets["google/bit-50"].format == "hf"


@pytest.mark.parametrize("name", [n for n in tfbit.presets() if n != "google/bit-50"])
def test_preset_architecture_is_timms(name, torch_module):
    """Each architecture against timm's definition of the same model (built on the meta device:
    shapes only) and timm's record of the head size of its hub weights."""
    import timm

    preset = tfbit.presets()[name]
    config = tfbit.BitConfig.from_preset(name)
    timm_name = f"resnetv2_{name.split('-')[2][1:]}_bit"
    with torch_module.device("meta"):
        reference = timm.create_model(timm_name, pretrained=False, num_classes=config.num_labels)
    assert config.embedding_size == reference.stem.conv.weight.shape[0]
    assert config.depths == [len(stage.blocks) for stage in reference.stages]
    assert config.stage_channels == [stage.blocks[-1].conv3.weight.shape[0] for stage in reference.stages]
    assert config.ws_eps == (1e-10 if preset.format == "npz" else 1e-8)
    if preset.format == "timm":
        cfg = timm.models.get_pretrained_cfg(preset.source.removeprefix("timm/"))
        assert cfg.hf_hub_id == preset.source and cfg.num_classes == config.num_labels


def test_hub_id_preset_is_the_transformers_default_architecture():
    import transformers

    config, reference = tfbit.BitConfig.from_preset("google/bit-50"), transformers.BitConfig()
    assert (config.embedding_size, config.hidden_sizes, config.depths, config.layer_type, config.global_padding) == (
        reference.embedding_size,
        reference.hidden_sizes,
        reference.depths,
        reference.layer_type,
        reference.global_padding,
    )
    assert tfbit.BitConfig.from_preset("BiT-M-R50x1", num_labels=3).num_labels == 3  # case-insensitive


def test_unknown_preset_names_close_matches():
    with pytest.raises(ValueError, match=r"unknown preset 'bit-m-r50' \(close matches: bit-m-r50x\d"):
        tfbit.BitConfig.from_preset("bit-m-r50")
    with pytest.raises(ValueError, match="unknown preset 'resnet50' .*known presets: bit-s-r50x1"):
        tfbit.BitModel.from_preset("resnet50")


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
