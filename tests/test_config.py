"""BitConfig speaks transformers' config.json: same fields, defaults, validation, round trips."""

import json

import pytest

from tfbit import BitConfig

FIELDS = [
    "num_channels",
    "embedding_size",
    "hidden_sizes",
    "depths",
    "layer_type",
    "hidden_act",
    "global_padding",
    "num_groups",
    "drop_path_rate",
    "embedding_dynamic_padding",
    "output_stride",
    "width_factor",
    "out_features",
    "out_indices",
    "stage_names",
]


def test_defaults_equal_transformers():
    transformers = pytest.importorskip("transformers")
    ours, theirs = BitConfig().to_dict(), transformers.BitConfig().to_dict()
    for field in FIELDS:
        assert ours[field] == theirs[field], field
    assert BitConfig().num_labels == transformers.BitConfig().num_labels == 2


def test_reads_transformers_config_json_and_keeps_unknown_keys(tmp_path):
    transformers = pytest.importorskip("transformers")
    hf = transformers.BitConfig(
        layer_type="bottleneck",
        global_padding="same",
        out_indices=[1, 3],
        id2label={0: "cat", 1: "dog", 2: "fish"},
        depths=[2, 2, 2],
        hidden_sizes=[128, 256, 512],
    )
    hf.save_pretrained(tmp_path)
    config = BitConfig.from_pretrained(tmp_path)
    assert config.global_padding == "SAME"
    assert config.out_features == ["stage1", "stage3"] and config.out_indices == [1, 3]
    assert config.id2label == {0: "cat", 1: "dog", 2: "fish"} and config.label2id["dog"] == 1
    assert config.num_labels == 3
    assert config.extra["transformers_version"] == transformers.__version__
    config.save_pretrained(tmp_path / "back")
    again = transformers.BitConfig.from_pretrained(tmp_path / "back")
    for field in FIELDS:
        assert getattr(again, field) == getattr(hf, field), field
    assert again.id2label == hf.id2label


def test_json_round_trip(tmp_path):
    config = BitConfig(width_factor=3, out_features=["stem", "stage4"], num_labels=10)
    config.to_json_file(tmp_path / "c.json")
    assert BitConfig.from_json_file(tmp_path / "c.json") == config
    assert BitConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize("padding", [None, "same", "SAME", "Valid"])
def test_global_padding_is_case_insensitive(padding):
    assert BitConfig(global_padding=padding).global_padding == (padding.upper() if padding else None)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(layer_type="basic"), "layer_type='basic' is not one of preactivation, bottleneck"),
        (dict(global_padding="reflect"), "global_padding='reflect' is not supported"),
        (dict(hidden_act="mish2"), "hidden_act='mish2'"),
        (dict(depths=[3, 4]), "hidden_sizes (4 stages) and BitConfig.depths (2 stages)"),
        (dict(depths=[]), "depths must be a non-empty list"),
        (dict(num_channels=0), "num_channels must be a positive integer"),
        (dict(embedding_size=2.5), "embedding_size must be a positive integer"),
        (dict(num_groups=7), "num_groups=7 does not divide the embedding_size (64)"),
        (dict(drop_path_rate=1.5), "drop_path_rate must be in [0, 1)"),
        (dict(output_stride=4), "output_stride must be 8, 16 or 32"),
        (dict(embedding_dynamic_padding="yes"), "embedding_dynamic_padding must be a bool"),
        (dict(width_factor=0), "width_factor must be a positive integer"),
        (dict(out_features=["stage9"]), "out_features must be a subset of stage_names"),
        (dict(out_features=["stage2", "stage1"]), "out_features must be in the order of stage_names"),
        (dict(out_features="stage1"), "out_features must be a list"),
        (dict(out_indices=[1, 1]), "out_indices must not contain duplicates"),
        (dict(out_indices=[7]), "out_indices must be valid indices"),
        (dict(out_indices=[3, 1]), "out_indices must be in the order of stage_names"),
        (dict(out_features=["stage1"], out_indices=[2]), "must name the same stages"),
        (dict(num_labels=-1), "num_labels must be a non-negative integer"),
        (dict(id2label={0: "a", 2: "b"}), "id2label keys must be 0..N-1"),
        (dict(id2label={0: "a"}, num_labels=3), "num_labels=3 does not match the 1 entries"),
    ],
)
def test_invalid_values_name_the_field(kwargs, message):
    with pytest.raises(ValueError) as info:
        BitConfig(**kwargs)
    assert message in str(info.value)


def test_out_indices_align_like_transformers():
    config = BitConfig(
        out_indices=[
            -1,
        ]
    )
    assert config.out_features == ["stage4"]
    assert BitConfig(out_features=["stem", "stage2"]).out_indices == [0, 2]
    assert BitConfig().out_features == ["stage4"] and BitConfig().out_indices == [4]
    assert BitConfig(depths=[1, 1], hidden_sizes=[128, 256]).stage_names == ["stem", "stage1", "stage2"]


def test_width_factor_scales_every_stage():
    config = BitConfig(width_factor=3)
    assert config.stage_channels == [768, 1536, 3072, 6144]
    assert config.mid_channels == [192, 384, 768, 1536]


def test_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json in"):
        BitConfig.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json is not valid JSON"):
        BitConfig.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "vit", "hidden_size": 768}))
    with pytest.raises(ValueError, match="model_type='vit', expected 'bit'"):
        BitConfig.from_pretrained(tmp_path)
