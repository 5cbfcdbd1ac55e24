"""Numerical parity with Hugging Face transformers' BiT on the same weights and inputs."""

import pytest
from conftest import SMALL, assert_parity, random_images, run_torch

import tfbit

HYBRID = dict(SMALL, layer_type="bottleneck", global_padding="SAME", embedding_dynamic_padding=True)

CONFIGS = {
    "preactivation": dict(SMALL),
    "hybrid_vit_bottleneck_same_dynamic": HYBRID,
    "preactivation_same_padding": dict(SMALL, global_padding="same"),
    "preactivation_dynamic_stem_pool": dict(SMALL, embedding_dynamic_padding=True),
    "output_stride_16": dict(SMALL, output_stride=16),
    "output_stride_8": dict(SMALL, output_stride=8),
    "bottleneck_output_stride_8": dict(HYBRID, output_stride=8),
    "num_channels_1": dict(SMALL, num_channels=1),
    "drop_path_inference": dict(SMALL, drop_path_rate=0.3),
    "gelu": dict(SMALL, hidden_act="gelu"),
}


def _compare_model(path, hf_model, config, x, name):
    """Classifier logits, pooler output, last hidden state and every hidden state."""
    ref = run_torch(hf_model, x, output_hidden_states=True)
    logits = tfbit.BitForImageClassification.from_pretrained(path)(x)
    deltas = [assert_parity(logits, ref.logits, f"{name} logits")]
    body = tfbit.BitModel.from_pretrained(path, output_hidden_states=True)(x)
    hf_body = run_torch(hf_model.bit, x, output_hidden_states=True)
    deltas.append(assert_parity(body["pooler_output"], hf_body.pooler_output, f"{name} pooler_output"))
    deltas.append(assert_parity(body["last_hidden_state"], hf_body.last_hidden_state, f"{name} last_hidden_state"))
    assert len(body["hidden_states"]) == len(hf_body.hidden_states) == len(config["depths"]) + 1
    for i, (a, r) in enumerate(zip(body["hidden_states"], hf_body.hidden_states)):
        deltas.append(assert_parity(a, r, f"{name} hidden_states[{i}]"))
    print(f"PARITY {name}: max |delta| / max(1, max |reference|) = {max(deltas):.3g} (contract: 1e-4)")


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_small_configs_match_transformers(name, hf_checkpoint):
    config = CONFIGS[name]
    path, hf_model = hf_checkpoint(**config)
    x = random_images(2, 64, 64, config.get("num_channels", 3))
    _compare_model(path, hf_model, config, x, name)


@pytest.mark.parametrize(
    "name", ["preactivation", "hybrid_vit_bottleneck_same_dynamic", "preactivation_dynamic_stem_pool"]
)
def test_odd_non_square_input_matches_transformers(name, hf_checkpoint):
    path, hf_model = hf_checkpoint(**CONFIGS[name])
    _compare_model(path, hf_model, CONFIGS[name], random_images(1, 75, 53), f"{name} 75x53")


@pytest.mark.parametrize("out_indices", [[0, 2, 4], [1, 2, 3, 4], [-1]])
def test_backbone_feature_maps_match_transformers(out_indices, hf_checkpoint):
    config = dict(HYBRID, out_indices=out_indices)
    path, hf_model = hf_checkpoint("BitBackbone", **config)
    x = random_images(2, 65, 63)
    ref = run_torch(hf_model, x).feature_maps
    backbone = tfbit.BitBackbone.from_pretrained(path)
    maps = backbone(x)
    assert list(maps) == backbone.out_features == hf_model.out_features
    assert backbone.channels == hf_model.channels
    for name, r in zip(backbone.out_features, ref):
        assert_parity(maps[name], r, f"backbone {name}")


def test_backbone_from_classification_checkpoint(hf_checkpoint):
    """HF's documented case: a classifier checkpoint loads into a backbone, head ignored."""
    path, hf_model = hf_checkpoint(**dict(SMALL))
    x = random_images(1, 64, 64)
    hidden = run_torch(hf_model.bit, x, output_hidden_states=True).hidden_states
    config = tfbit.BitConfig.from_pretrained(path)
    config = tfbit.BitConfig.from_dict(dict(config.to_dict(), out_features=["stem", "stage2"], out_indices=None))
    maps = tfbit.BitBackbone.from_pretrained(path, config=config)(x)
    assert_parity(maps["stem"], hidden[0], "stem")
    assert_parity(maps["stage2"], hidden[2], "stage2")


def test_width_factor_2_stage_maps_match_transformers(hf_checkpoint):
    """HF sizes its final norm and head from the unscaled width, so with width_factor != 1 only
    the bottleneck variant (which has no final norm) runs in HF at all; the wide
    pre-activation model is checked against timm in test_timm_parity."""
    config = dict(HYBRID, width_factor=2, out_indices=[1, 2, 3, 4])
    path, hf_model = hf_checkpoint("BitBackbone", **config)
    x = random_images(1, 64, 64)
    ref = run_torch(hf_model, x).feature_maps
    maps = tfbit.BitBackbone.from_pretrained(path)(x)
    for name, r in zip(hf_model.out_features, ref):
        assert_parity(maps[name], r, f"width 2 {name}")


def test_bit50_full_size_matches_transformers(hf_checkpoint):
    """The one full-size R50x1 path: the bit-50 default configuration with a 1000-class head."""
    path, hf_model = hf_checkpoint(num_labels=1000)
    x = random_images(1, 224, 224)
    _compare_model(path, hf_model, {"depths": [3, 4, 6, 3]}, x, "bit-50")


def test_pytorch_bin_checkpoint_loads(hf_checkpoint, torch_module):
    path, hf_model = hf_checkpoint(**dict(SMALL))
    state = {k: v for k, v in hf_model.state_dict().items()}
    (path / "model.safetensors").unlink()
    torch_module.save(state, path / "pytorch_model.bin")
    x = random_images(1, 64, 64)
    assert_parity(tfbit.BitForImageClassification.from_pretrained(path)(x), run_torch(hf_model, x).logits)
