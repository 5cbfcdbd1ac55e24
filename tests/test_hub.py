"""Hub ids as users type them, in fresh processes: `from_pretrained`, the converter and the
fine-tuning CLI resolve transformers and timm hub names through huggingface_hub's real cache
layout with HF_HUB_OFFLINE=1 (the test writes the cache; nothing is patched)."""

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import SMALL
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def write_hub_cache(cache, repo, files):
    """`repo` at one commit in huggingface_hub's layout: blobs named by their sha256, snapshot
    entries as relative symlinks to them, refs/main naming the commit."""
    root = cache / ("models--" + repo.replace("/", "--"))
    snapshot = root / "snapshots" / COMMIT
    (root / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / "main").write_text(COMMIT)
    for name, source in files.items():
        data = source.read_bytes()
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        os.symlink(os.path.relpath(blob, snapshot), snapshot / name)
    return snapshot


def run(args, cache, timeout=600):
    """A fresh interpreter in the user's environment: offline, with only the test's cache."""
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "TF_CPP_MIN_LOG_LEVEL": "2"}
    env.pop("PYTHONPATH", None)
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def write_timm_repo(cache, repo, folder, num_classes, side, label_names=None, seed=0):
    """`repo` in `cache` as timm publishes a BiT tag (model.safetensors and timm's config.json):
    a small random timm ResNetV2 with BiT's stem and weight standardization."""
    import functools

    import torch
    from safetensors.torch import save_file
    from timm.layers import StdConv2d
    from timm.models.resnetv2 import ResNetV2

    torch.manual_seed(seed)
    model = ResNetV2(
        layers=[1, 1, 1, 1],
        channels=(128, 256, 512, 1024),
        stem_chs=32,
        stem_type="fixed",
        conv_layer=functools.partial(StdConv2d, eps=1e-8),
        num_classes=num_classes,
    )
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "model.safetensors")
    config = {"architecture": "resnetv2_50x1_bit", "num_classes": num_classes}
    if label_names:
        config["label_names"] = label_names
    config["pretrained_cfg"] = {"input_size": [3, side, side], "crop_pct": 1.0}
    (folder / "timm_config.json").write_text(json.dumps(config))
    files = {"model.safetensors": folder / "model.safetensors", "config.json": folder / "timm_config.json"}
    return write_hub_cache(cache, repo, files)


@pytest.fixture
def hub_cache(tmp_path, hf_checkpoint, torch_module):
    """google/bit-tiny (transformers) and timm/resnetv2_tiny_bit.test in a local hub cache."""
    hf_dir, _ = hf_checkpoint(**SMALL)
    (hf_dir / "preprocessor_config.json").write_text(
        json.dumps(
            {
                "image_processor_type": "BitImageProcessor",
                "size": {"shortest_edge": 40},
                "crop_size": {"height": 32, "width": 32},
                "image_mean": [0.5] * 3,
                "image_std": [0.5] * 3,
            }
        )
    )
    cache = tmp_path / "hub"
    write_hub_cache(
        cache,
        "google/bit-tiny",
        {f: hf_dir / f for f in ("config.json", "model.safetensors", "preprocessor_config.json")},
    )
    write_timm_repo(
        cache, "timm/resnetv2_tiny_bit.test", tmp_path, num_classes=3, side=32, label_names=["cat", "dog", "eel"]
    )
    return cache


def test_from_pretrained_with_hub_ids_in_a_fresh_process(hub_cache):
    code = (
        "import numpy as np, tfbit\n"
        "m = tfbit.BitForImageClassification.from_pretrained('google/bit-tiny')\n"
        "t = tfbit.BitForImageClassification.from_pretrained('timm/resnetv2_tiny_bit.test')\n"
        "x = np.zeros((1, 32, 32, 3), 'float32')\n"
        "print(m(x).shape, t(x).shape, t.config.id2label[2])\n"
    )
    done = run(["-c", code], hub_cache)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[-1] == "eel" and "(1, 7)" in done.stdout and "(1, 3)" in done.stdout


def test_missing_hub_id_offline_is_one_clear_line(hub_cache):
    done = run(["-c", "import tfbit; tfbit.BitModel.from_pretrained('google/not-cached')"], hub_cache)
    assert done.returncode == 1
    assert (
        "tfbit.errors.MissingFileError: google/not-cached is neither a local directory nor a reachable "
        "Hugging Face hub repo" in done.stderr
    )


@pytest.mark.parametrize("repo", ["google/bit-tiny", "timm/resnetv2_tiny_bit.test"])
def test_convert_cli_with_a_hub_id(repo, hub_cache, tmp_path):
    output = tmp_path / "out"
    done = run(
        [
            "-m",
            "conversion.convert",
            repo,
            "--output",
            str(output),
            "--formats",
            "keras",
            "saved_model",
            "--num-images",
            "4",
        ],
        hub_cache,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads((output / "report.json").read_text())
    assert report["passed"] and report["reference"] == "pytorch"
    assert (output / "serving/1/saved_model.pb").exists()


def test_finetune_cli_with_a_hub_id(hub_cache, tmp_path):
    rng = np.random.RandomState(0)
    for label in ("a", "b"):
        (tmp_path / "data" / label).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.randint(0, 255, (40, 40, 3), np.uint8)).save(tmp_path / "data" / label / f"{i}.png")
    done = run(
        [
            "-m",
            "conversion.finetune",
            "google/bit-tiny",
            "--data",
            str(tmp_path / "data"),
            "--output",
            str(tmp_path / "run"),
            "--steps",
            "2",
            "--epochs",
            "1",
            "--batch-size",
            "4",
        ],
        hub_cache,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "run" / "best.keras").exists()
