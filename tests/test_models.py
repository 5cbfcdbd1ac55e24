"""Model construction, serialization, layers and every error a user can hit when loading."""

import json

import keras
import numpy as np
import pytest
from conftest import SMALL, random_images

import tfbit

TINY = dict(embedding_size=16, hidden_sizes=[32, 64], depths=[1, 1], num_groups=8, num_labels=3)


@pytest.fixture
def tiny():
    return tfbit.BitConfig(**TINY)


def test_model_outputs_and_shapes(tiny):
    out = tfbit.BitModel(tiny, output_hidden_states=True)(random_images(2, 40, 56))
    assert out["last_hidden_state"].shape == (2, 5, 7, 64)
    assert out["pooler_output"].shape == (2, 64)
    assert [tuple(h.shape) for h in out["hidden_states"]] == [(2, 10, 14, 16), (2, 10, 14, 32), (2, 5, 7, 64)]
    assert "hidden_states" not in tfbit.BitModel(tiny)(random_images(1, 32, 32))
    assert tfbit.BitForImageClassification(tiny)(random_images(2, 33, 47)).shape == (2, 3)
    backbone = tfbit.BitBackbone(tfbit.BitConfig(**TINY, out_indices=[0, 1, 2]))
    assert backbone.channels == [16, 32, 64] and backbone.stage_names == ["stem", "stage1", "stage2"]


def test_layer_names_are_readable_weight_names(tiny):
    names = [w.path for w in tfbit.BitForImageClassification(tiny).weights]
    assert names[:3] == ["stem_conv/kernel", "stage1_unit1_norm1/gamma", "stage1_unit1_norm1/beta"]
    assert "stage2_unit1_downsample_conv/kernel" in names and names[-2:] == ["classifier/kernel", "classifier/bias"]


@pytest.mark.parametrize("cls", [tfbit.BitModel, tfbit.BitForImageClassification, tfbit.BitBackbone])
def test_keras_file_round_trip_is_exact(cls, tiny, tmp_path):
    model = cls(tiny)
    for w in model.weights:  # non-trivial weights, norms included
        w.assign(np.random.RandomState(len(w.path)).normal(size=w.shape).astype("float32"))
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    assert type(loaded) is cls and loaded.config == model.config
    x = random_images(2, 37, 41)
    for a, b in zip(keras.tree.flatten(model(x)), keras.tree.flatten(loaded(x))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize(
    "layer",
    [
        tfbit.WSConv2D(8, 3, strides=2, padding=1, eps=1e-10, standardize=False, name="c"),
        tfbit.GroupNormActivation(4, 1e-5, "gelu", name="g"),
        tfbit.StemMaxPool(True, name="p"),
        tfbit.DropPath(0.2, seed=3, name="d"),
    ],
)
def test_layer_config_is_complete(layer):
    """Every constructor argument is in get_config (a field missing there would be missing
    from the clone too, so comparing configs alone could not notice it)."""
    import inspect

    arguments = set(inspect.signature(type(layer).__init__).parameters) - {"self", "kwargs"}
    config = layer.get_config()
    assert arguments <= set(config), arguments - set(config)
    clone = layer.__class__.from_config(config)
    assert clone.get_config() == config


def test_weight_standardization_is_per_filter_and_float32():
    conv = tfbit.WSConv2D(4, 3, eps=1e-8)
    conv.build((None, 8, 8, 2))
    conv.kernel.assign(np.random.RandomState(0).normal(3, 5, conv.kernel.shape).astype("float32"))
    k = np.asarray(conv.standardized_kernel())
    np.testing.assert_allclose(k.mean(axis=(0, 1, 2)), 0, atol=1e-6)
    np.testing.assert_allclose(k.var(axis=(0, 1, 2)), 1, atol=1e-5)
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        half = tfbit.WSConv2D(4, 3, eps=1e-8)
        half.build((None, 8, 8, 2))
        half.kernel.assign(np.ones(half.kernel.shape, "float32"))  # constant filter: var 0
        y = half(np.ones((1, 8, 8, 2), "float16"))
        assert y.dtype == "float16" and np.isfinite(np.asarray(y, "float32")).all()
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_drop_path_is_active_only_in_training():
    layer = tfbit.DropPath(0.5, seed=0)
    x = np.ones((64, 2, 2, 1), "float32")
    np.testing.assert_array_equal(layer(x, training=False), x)
    y = np.asarray(layer(x, training=True))[:, 0, 0, 0]
    assert set(np.unique(y)) == {0.0, 2.0} and 10 < (y == 0).sum() < 54


def test_classifier_logits_are_float32_under_mixed_precision(tiny):
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        logits = tfbit.BitForImageClassification(tiny)(random_images(1, 32, 32))
        assert logits.dtype == "float32"
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_mixed_precision_model_reloads_under_its_policy(tiny, tmp_path):
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = tfbit.BitForImageClassification(tiny)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    model.save(tmp_path / "m.keras")
    restored = keras.saving.load_model(tmp_path / "m.keras")  # under the float32 global policy
    assert restored.dtype_policy.name == "mixed_float16"
    assert restored.get_layer("stage1_unit1_conv1").compute_dtype == "float16"
    assert keras.config.dtype_policy().name == "float32"  # the global policy is left alone
    x = random_images(1, 32, 32)
    np.testing.assert_array_equal(restored(x), model(x))


@pytest.mark.parametrize("cls", [tfbit.BitModel, tfbit.BitForImageClassification, tfbit.BitBackbone])
def test_clone_recipe_keeps_class_config_and_weights(cls, tiny):
    """keras.models.clone_model rebuilds a plain Functional (it clones layer by layer), so the
    README's recipe is from_config + set_weights."""
    model = cls(tiny, trainable=False)
    for w in model.weights:
        w.assign(np.random.RandomState(len(w.path)).normal(size=w.shape).astype("float32"))
    clone = type(model).from_config(model.get_config())
    clone.set_weights(model.get_weights())
    assert type(clone) is cls and clone.config == model.config and clone.trainable is False
    x = random_images(1, 32, 32)
    for a, b in zip(keras.tree.flatten(model(x)), keras.tree.flatten(clone(x))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# -- bad input ------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [tfbit.BitModel, tfbit.BitForImageClassification, tfbit.BitBackbone])
def test_unknown_keyword_arguments_are_named(cls, tiny, tmp_path):
    """The Functional base class would take any keyword; the model classes name what they do
    not know, also through from_pretrained and from_preset."""
    with pytest.raises(TypeError, match=f"{cls.__name__}.__init__.. got an unexpected keyword argument 'include_top'"):
        cls(tiny, include_top=False)
    tfbit.BitForImageClassification(tiny).save_pretrained(tmp_path)
    with pytest.raises(TypeError, match="unexpected keyword argument 'weights'"):
        cls.from_pretrained(tmp_path, weights="imagenet")
    with pytest.raises(TypeError, match="unexpected keyword argument 'num_classes'"):
        cls.from_preset("bit-s-r50x1", load_weights=False, num_classes=10)


def test_wrong_channels_and_rank_are_rejected(tiny):
    model = tfbit.BitForImageClassification(tiny)
    with pytest.raises(ValueError, match="expected axis -1 of input shape to have value 3"):
        model(np.zeros((1, 32, 32, 1), "float32"))
    with pytest.raises(ValueError, match=r"Expected shape \(None, None, None, 3\)"):
        model.predict(np.zeros((32, 32, 3), "float32"), verbose=0)
    with pytest.raises(ValueError, match=r"expected shape=\(None, None, None, 3\), found shape=\(1, 3, 32, 32\)"):
        model(np.zeros((1, 3, 32, 32), "float32"))


def test_valid_padding_is_refused_at_build_time():
    config = tfbit.BitConfig(**TINY, global_padding="valid")
    with pytest.raises(ValueError, match="global_padding='VALID' cannot build a BiT model"):
        tfbit.BitModel(config)


def test_missing_config_and_weights(tmp_path, tiny):
    with pytest.raises(FileNotFoundError, match="nowhere: no such file or directory, and not a hub repo id"):
        tfbit.BitModel.from_pretrained(str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="has no config.json: expected a transformers or timm checkpoint"):
        tfbit.BitModel.from_pretrained(tmp_path)
    tiny.save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="no weights in .*expected one of model.safetensors"):
        tfbit.BitModel.from_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b'\x10\x00\x00\x00\x00\x00\x00\x00{"a":')
    with pytest.raises(ValueError, match="model.safetensors is not a readable safetensors file"):
        tfbit.BitModel.from_pretrained(tmp_path)


def test_a_file_is_not_a_checkpoint_directory(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="weights.bin is not a loadable PyTorch state dict"):
        tfbit.BitModel.from_pretrained(tmp_path / "weights.bin")


def test_vit_checkpoint_is_named_as_not_bit(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.ViTConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37, image_size=32, patch_size=8
    )
    transformers.ViTModel(config).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="config.json describes model_type='vit', not a BiT checkpoint"):
        tfbit.BitModel.from_pretrained(tmp_path)
    # and with a BiT config.json beside foreign weights, the weights are named as foreign
    (tmp_path / "config.json").write_text(json.dumps(tfbit.BitConfig(**TINY).to_dict()))
    with pytest.raises(tfbit.CheckpointError, match="is not a BiT checkpoint: none of its .* keys"):
        tfbit.BitModel.from_pretrained(tmp_path)


def test_checkpoint_problems_name_every_key(tmp_path, hf_checkpoint):
    from safetensors.numpy import load_file, save_file

    path, _ = hf_checkpoint(**dict(SMALL))
    tensors = load_file(path / "model.safetensors")
    del tensors["bit.encoder.stages.1.layers.0.conv2.weight"]
    tensors["bit.encoder.stages.0.layers.0.conv1.weight"] = tensors["bit.encoder.stages.0.layers.0.conv1.weight"][:4]
    tensors["bit.encoder.stages.2.layers.0.norm1.weight"][0] = np.nan
    tensors["bit.encoder.stages.2.layers.0.norm2.bias"] = tensors["bit.encoder.stages.2.layers.0.norm2.bias"].astype(
        "int64"
    )
    tensors["bit.extra.weight"] = np.zeros(3, "float32")
    tensors["bit.encoder.stages.9.layers.0.conv1.weight"] = np.zeros((8, 8, 1, 1), "float32")
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(tfbit.CheckpointError) as info:
        tfbit.BitForImageClassification.from_pretrained(path)
    message = str(info.value)
    for expected in [
        "unexpected keys (2)",
        "extra.weight",
        "encoder.stages.9.layers.0.conv1.weight (-> stage10_unit1_conv1/kernel",
        "missing weights (1)",  # not the keys listed below as wrongly shaped or bad
        "stage2_unit1_conv2/kernel",
        "stage1_unit1_conv1/kernel",
        "wrongly shaped keys (1)",
        "encoder.stages.0.layers.0.conv1.weight: shape (1, 1, 16, 4) (as stage1_unit1_conv1/kernel), "
        "model expects (1, 1, 16, 8)",
        "bad values (2)",
        "encoder.stages.2.layers.0.norm1.weight: contains NaN",
        "norm2.bias: dtype int64",
    ]:
        assert expected in message, expected


def test_checkpoint_from_another_config_is_rejected(hf_checkpoint):
    path, _ = hf_checkpoint(**dict(SMALL))
    config = tfbit.BitConfig.from_dict(dict(tfbit.BitConfig.from_pretrained(path).to_dict(), depths=[1, 1, 1, 1]))
    with pytest.raises(
        tfbit.CheckpointError, match=r"unexpected keys \(\d+\)(.|\n)*stage2_unit2_conv1/kernel, not in this model"
    ):
        tfbit.BitModel.from_pretrained(path, config=config)


def test_hub_repo_id_without_network_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="google/bit-50 is neither a local directory nor a reachable"):
        tfbit.BitModel.from_pretrained("google/bit-50")


@pytest.mark.parametrize("cls", [tfbit.BitModel, tfbit.BitForImageClassification, tfbit.BitBackbone])
def test_folded_inference_model_computes_the_same(cls, tiny, tmp_path):
    model = cls(tiny)
    for w in model.weights:
        w.assign(np.random.RandomState(len(w.path)).normal(1, 1, size=w.shape).astype("float32"))
    folded = tfbit.fold_weight_standardization(model)
    assert not folded.standardize_weights and not folded.get_layer("stem_conv").standardize
    x = random_images(2, 45, 39)
    for a, b in zip(keras.tree.flatten(model(x)), keras.tree.flatten(folded(x))):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=0, atol=1e-4 * max(1, np.abs(a).max()))
    folded.save(tmp_path / "folded.keras")
    assert not keras.saving.load_model(tmp_path / "folded.keras").standardize_weights
    assert tfbit.fold_weight_standardization(folded) is folded
