"""Numerical parity with timm on timm state dicts and on original BiT `.npz` files (timm's own
`_load_weights` is the reference loader for the latter). Also the check of tfbit's width_factor,
which transformers cannot build for pre-activation models."""

import functools

import numpy as np
import pytest
from conftest import assert_parity, load_source, perturb_, random_images, run_torch

import tfbit
from conversion.references import torch_reference

timm = pytest.importorskip("timm")
from timm.layers import StdConv2d  # noqa: E402
from timm.models.resnetv2 import ResNetV2, _load_weights  # noqa: E402

BIT_CONV = functools.partial(StdConv2d, eps=1e-8)  # what timm's *_bit models use
ORIGINAL_CONV = functools.partial(StdConv2d, eps=1e-10)  # the original BiT code's standardization
SMALL_NPZ = dict(depths=(1, 2, 1, 1), widths=(32, 64, 128, 256), stem=32)


def write_original_npz(path, depths, widths=(64, 128, 256, 512), stem=64, num_classes=1000, prefix="resnet/", seed=0):
    """Random weights in the layout of the original BiT release: HWIO kernels, `unitNN` units,
    projection on unit01 of every block, head stored as a 1x1 conv. Returns the arrays."""
    rng = np.random.RandomState(seed)
    arrays = {}

    def conv(scope, k, cin, cout):
        std = np.sqrt(2.0 / (k * k * cin))  # He scale, like trained kernels
        arrays[f"{scope}standardized_conv2d/kernel"] = rng.normal(0, std, (k, k, cin, cout)).astype("float32")

    def norm(scope, c):
        arrays[f"{scope}group_norm/gamma"] = (1 + 0.2 * rng.randn(c)).astype("float32")
        arrays[f"{scope}group_norm/beta"] = (0.2 * rng.randn(c)).astype("float32")

    conv(f"{prefix}root_block/", 7, 3, stem)
    cin = stem
    for b, (depth, mid) in enumerate(zip(depths, widths), 1):
        for u in range(1, depth + 1):
            unit = f"{prefix}block{b}/unit{u:02d}/"
            if u == 1:
                conv(unit + "a/proj/", 1, cin, 4 * mid)
            norm(unit + "a/", cin)
            conv(unit + "a/", 1, cin, mid)
            norm(unit + "b/", mid)
            conv(unit + "b/", 3, mid, mid)
            norm(unit + "c/", mid)
            conv(unit + "c/", 1, mid, 4 * mid)
            cin = 4 * mid
    norm(prefix, cin)
    arrays[f"{prefix}head/conv2d/kernel"] = rng.normal(0, 0.05, (1, 1, cin, num_classes)).astype("float32")
    arrays[f"{prefix}head/conv2d/bias"] = (0.1 * rng.randn(num_classes)).astype("float32")
    assert len(arrays) == 9 * sum(depths) + 9  # the documented key count of a release file
    np.savez(path, **arrays)
    return arrays


def timm_from_npz(path, depths, widths, stem, num_classes, prefix="resnet/"):
    model = ResNetV2(
        layers=list(depths),
        channels=[4 * w for w in widths],
        stem_chs=stem,
        num_classes=num_classes,
        stem_type="fixed",
        conv_layer=ORIGINAL_CONV,
    ).eval()
    _load_weights(model, str(path), prefix)
    return model


def _check(loaded, reference, x, what):
    """tfbit vs the independently built timm model, and the source's own torch_reference."""
    ref = run_torch(reference, x)
    delta = assert_parity(loaded.model(x), ref, what)
    assert np.array_equal(run_torch(torch_reference(loaded.checkpoint, loaded.model), x).numpy(), ref.numpy())
    print(f"PARITY {what}: max |delta| {delta:.3g} (max |ref| {float(np.abs(ref.numpy()).max()):.3g})")
    return delta


@pytest.fixture(scope="module")
def timm_r50(torch_module):
    torch_module.manual_seed(0)
    return perturb_(timm.create_model("resnetv2_50x1_bit", num_classes=10))


def save_timm(model, path):
    import torch
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, path) if str(path).endswith(".safetensors") else torch.save(state, path)
    return path


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_resnetv2_50x1_bit_state_dict_matches_timm(suffix, timm_r50, tmp_path):
    path = save_timm(timm_r50, tmp_path / f"r50{suffix}")
    loaded = load_source(path)
    assert loaded.format == "timm" and isinstance(loaded.model, tfbit.BitForImageClassification)
    assert loaded.config.depths == [3, 4, 6, 3] and loaded.config.hidden_sizes == [256, 512, 1024, 2048]
    assert loaded.config.embedding_size == 64 and loaded.config.num_labels == 10
    _check(loaded, timm_r50, random_images(1, 224, 224), f"timm resnetv2_50x1_bit {suffix}")


@pytest.fixture(scope="module")
def timm_wide(torch_module):
    torch_module.manual_seed(1)
    model = ResNetV2(
        layers=[1, 1, 1, 1],
        channels=(64, 128, 256, 512),
        width_factor=2,
        stem_type="fixed",
        conv_layer=BIT_CONV,
        num_classes=5,
    )
    return perturb_(model, seed=1)


def test_width_factor_2_matches_timm(timm_wide, tmp_path):
    """tfbit's width_factor scales stem-less stage and bottleneck widths like timm/BiT: the same
    weights load into an explicit width_factor=2 config and into the inferred absolute one."""
    path = save_timm(timm_wide, tmp_path / "wide.safetensors")
    x = random_images(2, 64, 64)
    inferred = load_source(path)
    assert inferred.config.hidden_sizes == [128, 256, 512, 1024] and inferred.config.embedding_size == 128
    _check(inferred, timm_wide, x, "timm width 2 (inferred absolute widths)")
    config = tfbit.BitConfig(
        width_factor=2, embedding_size=128, hidden_sizes=[64, 128, 256, 512], depths=[1, 1, 1, 1], num_labels=5
    )
    explicit = load_source(path, config=config)
    assert explicit.model.config.width_factor == 2
    _check(explicit, timm_wide, x, "timm width 2 (width_factor=2 config)")


def test_features_and_backbone_match_timm(timm_wide, tmp_path):
    import torch

    path = save_timm(timm_wide, tmp_path / "wide.safetensors")
    x = random_images(1, 64, 64)
    features = load_source(path, task="features")
    assert isinstance(features.model, tfbit.BitModel)
    with torch.no_grad():
        xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
        pooled = timm_wide.forward_head(timm_wide.forward_features(xt), pre_logits=True)
        stages, h = [], timm_wide.stem(xt)
        for stage in timm_wide.stages:
            h = stage(h)
            stages.append(h)
    delta = assert_parity(features.model(x)["pooler_output"], pooled, "pooled features")
    assert np.array_equal(run_torch(torch_reference(features.checkpoint, features.model), x).numpy(), pooled.numpy())
    backbone = load_source(path, task="backbone", out_features=["stage1", "stage2", "stage3", "stage4"])
    maps = backbone.model(x)
    assert list(maps) == ["stage1", "stage2", "stage3", "stage4"]
    for (name, value), ref in zip(maps.items(), stages):
        delta = max(delta, assert_parity(value, ref, f"backbone {name}"))
    scale = max(float(np.abs(r.numpy()).max()) for r in [pooled, *stages])
    print(f"PARITY timm features + backbone: max |delta| {delta:.3g} (max |ref| {scale:.3g})")


@pytest.mark.parametrize("prefix", ["resnet/", ""])
def test_small_original_npz_matches_timm_loader(prefix, tmp_path):
    path = tmp_path / "BiT-S-R14x05.npz"
    write_original_npz(path, **SMALL_NPZ, num_classes=7, prefix=prefix)
    loaded = load_source(path)
    assert loaded.format == "npz"
    assert (loaded.config.depths, loaded.config.hidden_sizes) == ([1, 2, 1, 1], [128, 256, 512, 1024])
    reference = timm_from_npz(path, **SMALL_NPZ, num_classes=7, prefix=prefix)
    _check(loaded, reference, random_images(2, 64, 64), f"npz small (prefix {prefix!r})")


def test_r50x1_original_npz_matches_timm_loader(tmp_path, torch_module):
    path = tmp_path / "BiT-M-R50x1-ILSVRC2012.npz"
    arrays = write_original_npz(path, depths=(3, 4, 6, 3), num_classes=1000)
    assert len(arrays) == 153
    loaded = load_source(path)
    assert loaded.config.num_labels == 1000
    reference = timm_from_npz(path, depths=(3, 4, 6, 3), widths=(64, 128, 256, 512), stem=64, num_classes=1000)
    _check(loaded, reference, random_images(1, 224, 224), "npz R50x1")


def test_original_npz_is_standardized_with_the_original_eps(tmp_path):
    """A filter of tiny variance (~1e-9) is where 1e-10 and timm's 1e-8 part ways: the
    conversion must follow the original code, and its .keras file must keep that."""
    path = tmp_path / "BiT-S-R14.npz"
    arrays = write_original_npz(path, **SMALL_NPZ, num_classes=7)
    kernel = arrays["resnet/block1/unit01/c/standardized_conv2d/kernel"]  # feeds the residual sum, no norm
    kernel[..., 0] = 0.01 + 3e-5 * np.random.RandomState(1).randn(*kernel.shape[:3])
    np.savez(path, **arrays)
    loaded = load_source(path)
    assert loaded.config.ws_eps == 1e-10
    x = random_images(2, 64, 64)
    original = timm_from_npz(path, **SMALL_NPZ, num_classes=7)
    assert_parity(loaded.model(x), run_torch(original, x), "npz, original eps")
    timm_eps = ResNetV2(
        layers=[1, 2, 1, 1],
        channels=[128, 256, 512, 1024],
        stem_chs=32,
        num_classes=7,
        stem_type="fixed",
        conv_layer=BIT_CONV,
    ).eval()
    _load_weights(timm_eps, str(path), "resnet/")
    with pytest.raises(AssertionError, match="max .delta"):
        assert_parity(loaded.model(x), run_torch(timm_eps, x), "npz vs timm's eps")
    loaded.model.save(tmp_path / "m.keras")
    import keras

    restored = keras.saving.load_model(tmp_path / "m.keras")
    assert restored.config.ws_eps == 1e-10
    np.testing.assert_array_equal(restored(x), loaded.model(x))
