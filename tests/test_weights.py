"""`tfbit.weights` and `tfbit.load_model`: format detection, default names, preprocessors, the
HF and timm paths and every way a checkpoint can be wrong. Parity with timm itself is in
test_timm_parity; hub ids in a fresh process in test_hub."""

import json

import numpy as np
import pytest
from conftest import SMALL, assert_parity, load_source, perturb_, random_images, run_torch

import tfbit
from conversion.references import torch_reference
from tfbit.preprocessing.processor import BitImageProcessor
from tfbit.weights import CheckpointError, detect_format, npz, timm
from tfbit.weights.infer import infer_config
from tfbit.weights.readers import read_npz

NPZ_TABLE, TIMM_TABLE = npz.TABLE, timm.TABLE
from test_timm_parity import BIT_CONV, SMALL_NPZ, write_original_npz  # noqa: E402

NPZ_UNITS = sum(SMALL_NPZ["depths"])


@pytest.fixture
def timm_small(tmp_path, torch_module):
    """Factory: a small random timm BiT ResNetV2 saved as `name` -> (path, model)."""
    from safetensors.torch import save_file
    from timm.models.resnetv2 import ResNetV2

    def make(name="tiny.safetensors", num_classes=7, state=None):
        torch_module.manual_seed(0)
        model = perturb_(
            ResNetV2(
                layers=[1, 1, 1, 1],
                channels=(128, 256, 512, 1024),
                stem_chs=32,
                stem_type="fixed",
                conv_layer=BIT_CONV,
                num_classes=num_classes,
            )
        )
        state = {k: v.contiguous() for k, v in model.state_dict().items()} if state is None else state
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(state, path) if name.endswith(".safetensors") else torch_module.save(state, path)
        return path, model

    return make


@pytest.fixture
def small_npz(tmp_path):
    def make(name="BiT-S-R14.npz", edit=None, **kwargs):
        path = tmp_path / name
        arrays = write_original_npz(path, **{**SMALL_NPZ, "num_classes": 7, **kwargs})
        if edit is not None:
            edit(arrays)
            np.savez(path, **arrays)
        return path

    return make


# -- detection, names, preprocessors -------------------------------------------------------------


def test_detect_format_of_files_directories_and_hub_names(hf_checkpoint, timm_small, small_npz):
    hf_dir, _ = hf_checkpoint(**SMALL)
    assert detect_format(hf_dir) == "hf"
    assert detect_format(small_npz()) == "npz"
    assert detect_format(timm_small("a.safetensors")[0]) == "timm"
    assert detect_format(timm_small("b.pth")[0]) == "timm"
    assert detect_format(timm_small("c.bin")[0]) == "timm"
    assert detect_format("timm/resnetv2_50x1_bit.goog_in21k") == "timm"
    assert detect_format("hf-hub:timm/resnetv2_50x1_bit.goog_in21k") == "timm"
    assert detect_format("google/bit-50") == "hf"
    with pytest.raises(FileNotFoundError, match="no such file"):
        detect_format("./missing.npz")


def test_format_override(small_npz, tmp_path):
    path = small_npz()
    renamed = tmp_path / "my_bit.bitnpz"
    renamed.write_bytes(path.read_bytes())
    with pytest.raises(ValueError, match="my_bit.bitnpz.*pass the format"):
        detect_format(renamed)
    assert detect_format(renamed, format="npz") == "npz"
    loaded = load_source(renamed, format="npz")
    assert loaded.format == "npz" and loaded.name == "my_bit"
    with pytest.raises(ValueError, match="format='onnx' is not one of"):
        load_source(path, format="onnx")
    with pytest.raises(ValueError, match=f"{path.name}.*not a loadable PyTorch state dict"):
        load_source(path, format="timm")  # an npz is not a torch pickle


def test_default_names(hf_checkpoint, timm_small, small_npz):
    hf_dir, _ = hf_checkpoint(subdir="my-bit", **SMALL)
    assert load_source(hf_dir).name == "my-bit"
    assert load_source(small_npz("BiT-M-R50x1.npz")).name == "BiT-M-R50x1"
    assert load_source(timm_small("tiny_bit.pth")[0]).name == "tiny_bit"
    generic, _ = timm_small("exported/model.safetensors")
    assert load_source(generic).name == "exported"  # "model" says nothing: use the folder


def test_preprocessor_dicts(hf_checkpoint, timm_small, small_npz):
    original = load_source(small_npz()).preprocessor  # the original code's evaluation
    assert (original["image_mean"], original["image_std"], original["rescale_factor"]) == (
        [0.5] * 3,
        [0.5] * 3,
        1 / 255,
    )
    assert original["size"] == {"height": 224, "width": 224} and not original["do_center_crop"]
    assert original["resample"] == 2  # bilinear
    timm = load_source(timm_small()[0]).preprocessor  # timm's BiT defaults: 224 of 256, bilinear
    assert (timm["image_mean"], timm["image_std"]) == ([0.5] * 3, [0.5] * 3)
    assert timm["size"] == {"shortest_edge": 256} and timm["crop_size"] == {"height": 224, "width": 224}
    assert timm["resample"] == 2
    hf_dir, _ = hf_checkpoint(**SMALL)
    assert load_source(hf_dir).preprocessor is None  # the converter then warns and uses defaults
    BitImageProcessor.original_bit(size=96, crop_size=96).save_pretrained(hf_dir)
    saved = json.loads((hf_dir / "preprocessor_config.json").read_text())
    assert load_source(hf_dir).preprocessor == saved


def test_hf_directory_source_matches_its_reference(hf_checkpoint):
    hf_dir, hf_model = hf_checkpoint(**SMALL)
    x = random_images(2, 64, 64)
    loaded = load_source(hf_dir)
    assert loaded.format == "hf" and loaded.path == str(hf_dir)
    assert loaded.config == tfbit.BitConfig.from_pretrained(hf_dir)
    ref = run_torch(hf_model, x).logits
    delta = assert_parity(loaded.model(x), ref, "hf source")
    assert np.array_equal(run_torch(torch_reference(loaded.checkpoint, loaded.model), x).logits.numpy(), ref.numpy())
    assert isinstance(load_source(hf_dir, task="features").model, tfbit.BitModel)
    assert load_source(hf_dir, task="backbone").model.out_features == ["stage4"]  # transformers' default
    backbone = load_source(hf_dir, task="backbone", out_features=["stage1", "stage2", "stage3", "stage4"])
    assert backbone.model.out_features == ["stage1", "stage2", "stage3", "stage4"]
    maps = run_torch(torch_reference(backbone.checkpoint, backbone.model), x).feature_maps
    for (name, value), r in zip(backbone.model(x).items(), maps):
        delta = max(delta, assert_parity(value, r, f"hf backbone {name}"))
    print(f"PARITY hf directory source: max |delta| {delta:.3g}")


def test_timm_snapshot_folder_brings_labels_and_preprocessing(tmp_path, timm_small):
    weights, model = timm_small("snapshot/model.safetensors", num_classes=3)
    (tmp_path / "snapshot" / "config.json").write_text(
        json.dumps(
            {
                "architecture": "resnetv2_50x1_bit",
                "num_classes": 3,
                "label_names": ["cat", "dog", "eel"],
                "pretrained_cfg": {
                    "tag": "goog_in21k_ft_in1k",
                    "input_size": [3, 448, 448],
                    "crop_pct": 1.0,
                    "interpolation": "bicubic",
                    "mean": [0.5] * 3,
                    "std": [0.5] * 3,
                },
            }
        )
    )
    loaded = load_source(tmp_path / "snapshot")
    assert (loaded.format, loaded.name) == ("timm", "resnetv2_50x1_bit.goog_in21k_ft_in1k")
    assert loaded.config.id2label == {0: "cat", 1: "dog", 2: "eel"}
    pre = loaded.preprocessor
    assert pre["size"] == {"shortest_edge": 448} and pre["crop_size"] == {"height": 448, "width": 448}
    assert pre["resample"] == 3
    x = random_images(1, 64, 64)
    print(
        f"PARITY timm snapshot source: max |delta| "
        f"{assert_parity(loaded.model(x), run_torch(model, x), 'timm snapshot'):.3g}"
    )


def test_known_and_default_labels(small_npz, timm_small):
    pytest.importorskip("timm")
    imagenet = load_source(small_npz(num_classes=1000)).config
    assert imagenet.num_labels == 1000 and imagenet.id2label[0] == "tench, Tinca tinca"
    assert load_source(small_npz("BiT-M-R50x1-CIFAR10.npz", num_classes=10)).config.id2label[9] == "truck"
    assert load_source(timm_small()[0]).config.id2label[6] == "LABEL_6"


def test_headless_checkpoint_gives_a_feature_model(timm_small):
    path, model = timm_small(num_classes=0)
    loaded = load_source(path)
    assert isinstance(loaded.model, tfbit.BitModel) and loaded.config.num_labels == 0
    x = random_images(1, 64, 64)
    assert_parity(loaded.model(x)["pooler_output"], run_torch(model, x), "headless")


# -- errors -----------------------------------------------------------------------------------------


def test_infer_config_reports_unknown_architectures(small_npz):
    vit = {"cls_token": np.zeros((1, 1, 8)), "patch_embed.proj.weight": np.zeros((8, 3, 16, 16))}
    with pytest.raises(CheckpointError, match="vit.safetensors is not a BiT checkpoint.*cls_token"):
        infer_config(vit, TIMM_TABLE, 0, "vit.safetensors")
    stemless = {"stages.0.blocks.0.conv1.weight": np.zeros((32, 64, 1, 1))}
    with pytest.raises(CheckpointError, match="no stem convolution kernel"):
        infer_config(stemless, TIMM_TABLE, 0, "x.pth")
    arrays = read_npz(small_npz())
    gapped = {k.replace("block2/unit02", "block2/unit03"): v for k, v in arrays.items()}
    with pytest.raises(CheckpointError, match=r"units of stage 2 are \[1, 3\].*block2/unit03"):
        infer_config(gapped, NPZ_TABLE, 1, "gapped.npz")


def test_unknown_state_dicts_are_refused(tmp_path, timm_small, small_npz, hf_checkpoint):
    from safetensors.numpy import save_file

    vit = tmp_path / "vit.safetensors"
    save_file(
        {"cls_token": np.zeros((1, 1, 8), "float32"), "blocks.0.attn.qkv.weight": np.zeros((24, 8), "float32")}, vit
    )
    with pytest.raises(ValueError, match="vit.safetensors is neither a timm ResNetV2-BiT nor"):
        load_source(vit)
    with pytest.raises(CheckpointError, match="vit.safetensors is not a BiT checkpoint"):
        load_source(vit, format="timm")
    unrelated = tmp_path / "ViT-B_16.npz"
    np.savez(unrelated, **{"Transformer/encoderblock_0/LayerNorm_0/scale": np.ones(8, "float32")})
    with pytest.raises(CheckpointError, match="ViT-B_16.npz is not a BiT checkpoint.*Transformer/"):
        load_source(unrelated)
    _, hf_model = hf_checkpoint(**SMALL)
    hf_file = tmp_path / "hf_state.safetensors"
    save_file({k: v.numpy() for k, v in hf_model.state_dict().items()}, hf_file)
    with pytest.raises(ValueError, match="hf_state.safetensors is a transformers BiT state dict.*config.json"):
        load_source(hf_file)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty has no config.json"):
        load_source(tmp_path / "empty")
    timm_small("snap/model.safetensors")
    (tmp_path / "snap" / "config.json").write_text(json.dumps({"architecture": "resnetv2_50"}))
    with pytest.raises(ValueError, match="resnetv2_50' is not a BiT ResNetV2"):
        load_source(tmp_path / "snap")


def _drop(key):
    return lambda arrays: arrays.pop(key)


def _set(key, fn):
    return lambda arrays: arrays.__setitem__(key, fn(arrays[key]))


@pytest.mark.parametrize(
    "edit, message",
    [
        (_drop("resnet/block2/unit02/b/group_norm/beta"), r"missing weights \(1\):\n\s+stage2_unit2_norm2/beta"),
        (
            _set("resnet/block3/unit01/b/standardized_conv2d/kernel", lambda a: a[:, :, :, :-8]),
            r"(?s)wrongly shaped keys.*resnet/block3/unit01/b/standardized_conv2d/kernel: shape \(3, 3, 128, 120\)",
        ),
        (
            _set("resnet/block1/unit01/a/group_norm/gamma", lambda a: np.full_like(a, np.nan)),
            r"(?s)bad values.*resnet/block1/unit01/a/group_norm/gamma: contains NaN",
        ),
        (
            _set("resnet/root_block/standardized_conv2d/kernel", lambda a: a[0]),
            r"standardized_conv2d/kernel has shape \(7, 3, 32\), expected a 4-D stem",
        ),
    ],
)
def test_npz_checkpoint_errors_name_file_and_key(edit, message, small_npz):
    path = small_npz("broken.npz", edit=edit)
    with pytest.raises(CheckpointError, match=message) as info:
        load_source(path)
    assert "broken.npz" in str(info.value)


def test_timm_nan_weights_are_refused(timm_small, torch_module):
    _, model = timm_small()
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    state["norm.weight"] = torch_module.full_like(state["norm.weight"], float("nan"))
    path, _ = timm_small("nan.pth", state=state)
    with pytest.raises(CheckpointError, match="(?s)nan.pth.*norm.weight: contains NaN"):
        load_source(path)


@pytest.mark.parametrize("name", ["tiny.safetensors", "BiT.npz"])
def test_truncated_files_are_refused(name, tmp_path, timm_small, small_npz):
    path = timm_small(name)[0] if name.endswith(".safetensors") else small_npz(name)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=f"{name} is not a readable"):
        load_source(path)


def test_pickle_with_code_is_not_executed(tmp_path, torch_module):
    marker = tmp_path / "executed"

    class Payload:
        def __reduce__(self):
            return open, (str(marker), "w")

    path = tmp_path / "evil.pth"
    torch_module.save({"stem.conv.weight": Payload()}, path)
    with pytest.raises(ValueError, match="evil.pth is not a loadable PyTorch state dict"):
        load_source(path)
    with pytest.raises(ValueError, match="evil.pth is not a loadable PyTorch state dict"):
        load_source(path, format="timm")
    assert not marker.exists()


def test_nested_training_checkpoint_is_refused(tmp_path, torch_module):
    path = tmp_path / "train.pth"
    torch_module.save({"state_dict": {"stem.conv.weight": torch_module.zeros(64, 3, 7, 7)}, "epoch": 3}, path)
    with pytest.raises(ValueError, match=r"train.pth is not a flat state dict: state_dict, epoch are not tensors"):
        load_source(path, format="timm")


def test_invalid_task():
    with pytest.raises(ValueError, match="task='detection' is not one of"):
        tfbit.load_model("google/bit-50", task="detection")
