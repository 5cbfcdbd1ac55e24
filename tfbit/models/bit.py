"""BiT as functional Keras models: `BitModel`, `BitForImageClassification`, `BitBackbone`.

The graph is built from the config by `bit_features`; the three classes only choose outputs,
like KerasHub backbones. Layer names (`stem_conv`, `stage2_unit1_conv2`, `norm`, ...) are the
weight names of `.keras` files and SavedModels and the targets of the checkpoint mappings.
"""

import re
from typing import NamedTuple

import keras

from tfbit.errors import ConfigError
from tfbit.models.config import BitConfig
from tfbit.models.layers import DropPath, GroupNormActivation, StemMaxPool, WSConv2D, conv_padding
from tfbit.models.multi_worker_fit import MultiWorkerFit

GN_EPS = 1e-5  # GroupNorm eps of every BiT implementation


class _Layers:
    """Layer factory of one model: its config, and whether its convs standardize their kernels
    (False for the inference form, whose kernels are stored already standardized)."""

    def __init__(self, config, standardize_weights):
        self.config = config
        self.standardize_weights = standardize_weights

    def conv(self, filters, kernel_size, name, stride=1, dilation=1):
        return WSConv2D(
            filters,
            kernel_size,
            strides=stride,
            dilation_rate=dilation,
            eps=self.config.ws_eps,
            padding=conv_padding(self.config.global_padding, kernel_size, stride, dilation),
            standardize=self.standardize_weights,
            name=name,
        )

    def norm(self, name, activation=True):
        return GroupNormActivation(
            self.config.num_groups, GN_EPS, self.config.hidden_act if activation else None, name=name
        )


def _stem(make, x):
    config = make.config
    x = make.conv(config.embedding_size, 7, "stem_conv", stride=2)(x)
    if config.global_padding != "SAME":
        x = keras.layers.ZeroPadding2D(1, name="stem_pad")(x)
    if config.layer_type == "bottleneck":
        x = make.norm("stem_norm")(x)
    return StemMaxPool(config.embedding_dynamic_padding, name="stem_pool")(x)


class _Unit(NamedTuple):
    """One residual unit of a stage: its layer-name prefix and shape."""

    name: str
    out_channels: int
    mid_channels: int
    stride: int
    first: bool  # the stage's first unit: its shortcut is a projection
    drop_rate: float
    dilation: int


def _preactivation_unit(make, x, unit):
    """Pre-activation bottleneck (BiT): GN+act before each conv; the projection sees the
    pre-activated input. HF does not dilate this unit's 3x3 conv, so neither do we."""
    name = unit.name
    preact = make.norm(f"{name}_norm1")(x)
    shortcut = make.conv(unit.out_channels, 1, f"{name}_downsample_conv", unit.stride)(preact) if unit.first else x
    h = make.conv(unit.mid_channels, 1, f"{name}_conv1")(preact)
    h = make.conv(unit.mid_channels, 3, f"{name}_conv2", unit.stride)(make.norm(f"{name}_norm2")(h))
    h = make.conv(unit.out_channels, 1, f"{name}_conv3")(make.norm(f"{name}_norm3")(h))
    if unit.drop_rate:
        h = DropPath(unit.drop_rate, name=f"{name}_drop_path")(h)
    return keras.layers.Add(name=f"{name}_add")([h, shortcut])


def _bottleneck_unit(make, x, unit):
    """Non-pre-activation bottleneck (the hybrid-ViT variant): GN after each conv, act after add."""
    name = unit.name
    shortcut = x
    if unit.first:
        shortcut = make.conv(unit.out_channels, 1, f"{name}_downsample_conv", unit.stride)(x)
        shortcut = make.norm(f"{name}_downsample_norm", activation=False)(shortcut)
    h = make.norm(f"{name}_norm1")(make.conv(unit.mid_channels, 1, f"{name}_conv1")(x))
    h = make.conv(unit.mid_channels, 3, f"{name}_conv2", unit.stride, unit.dilation)(h)
    h = make.norm(f"{name}_norm2")(h)
    h = make.norm(f"{name}_norm3", activation=False)(make.conv(unit.out_channels, 1, f"{name}_conv3")(h))
    if unit.drop_rate:
        h = DropPath(unit.drop_rate, name=f"{name}_drop_path")(h)
    h = keras.layers.Add(name=f"{name}_add")([h, shortcut])
    return keras.layers.Activation(make.config.hidden_act, name=f"{name}_out")(h)


def bit_features(config, pixel_values, standardize_weights=True):
    """Build the BiT graph on `pixel_values` (`standardize_weights=False`: the inference form).

    Returns (hidden_states, last_hidden_state): the stem output and every stage output (HF's
    `hidden_states`, without the final norm) and the encoder output after the final norm of
    the pre-activation model.
    """
    if config.global_padding == "VALID":
        # HF accepts the value but no BiT runs with it: the padded-free 3x3 conv shrinks the
        # residual branch while the shortcut keeps its size, so every residual add fails.
        raise ConfigError(
            "BitConfig.global_padding='VALID' cannot build a BiT model: unpadded 3x3 "
            "convolutions shrink the residual branch but not the shortcut (transformers' "
            "BitModel fails the same way at its first residual add); use None or 'SAME'"
        )
    make = _Layers(config, standardize_weights)
    x = _stem(make, pixel_values)
    hidden_states = [x]
    plan = zip(config.stage_channels, config.mid_channels, config.depths, config.stage_plan())
    for s, (out_ch, mid_ch, depth, (stride, dilation, first_dilation, rates)) in enumerate(plan, 1):
        for u in range(depth):
            first = u == 0
            unit = _Unit(
                f"stage{s}_unit{u + 1}",
                out_ch,
                mid_ch,
                stride if first else 1,
                first,
                rates[u],
                first_dilation if first else dilation,
            )
            x = (_preactivation_unit if config.layer_type == "preactivation" else _bottleneck_unit)(make, x, unit)
        hidden_states.append(x)
    if config.layer_type == "preactivation":
        x = make.norm("norm")(x)
    return hidden_states, x


def _pixel_input(config):
    return keras.Input((None, None, config.num_channels), name="pixel_values")


def _as_config(config):
    return BitConfig.from_dict(config) if isinstance(config, dict) else config or BitConfig()


class _BitBase(MultiWorkerFit, keras.Model):
    """Shared construction protocol: a functional model built from a `BitConfig`; trains with
    `fit` under any strategy, multi-worker included (`tfbit.models.multi_worker_fit`).

    `standardize_weights=False` builds the inference form: its conv kernels hold already
    standardized weights (see `tfbit.fold_weight_standardization`), so no call recomputes them.
    """

    def __init__(self, inputs, outputs, config, standardize_weights, name, trainable):
        # Explicit arguments only: the Functional base class would silently swallow unknown
        # keywords (`include_top=False` keeping the head), Python now names them in a TypeError.
        super().__init__(inputs=inputs, outputs=outputs, name=name)
        # Keras' `trainable` setter, not the constructor argument: only the setter reaches the
        # layers, and a model nested in another lists its layers' weights, not its own flag.
        self.trainable = trainable
        self.config = config
        self.standardize_weights = standardize_weights

    def freeze_stages(self, through):
        """Freeze the stem and every stage up to `through`; later stages, the final norm and the
        head stay as they are (BiT fine-tunes often train only the top stages).

        Args:
            through: a stage name ("stem", "stage1", ..., as `config.stage_names`) or its index
                (0 is the stem, as in `out_indices`).

        Returns the names of the layers now frozen. `model.trainable = True` unfreezes every
        layer again, as in Keras. The frozen layers are part of `get_config`, so a `.keras` file
        reloads with the same layers frozen (and its optimizer state for the others).
        """
        names = list(self.config.stage_names)
        if isinstance(through, str):
            if through not in names:
                raise ConfigError(
                    f"freeze_stages: {through!r} is not a stage of this model: choose from {', '.join(names)}"
                )
            last = names.index(through)
        else:
            last = int(through)
            if not 0 <= last < len(names):
                raise ConfigError(f"freeze_stages: stage index {through} is out of range: 0 (stem) to {len(names) - 1}")
        stages = ("stem_",) + tuple(f"stage{i}_" for i in range(1, last + 1))
        frozen = [layer for layer in self.layers if layer.weights and layer.name.startswith(stages)]
        for layer in frozen:
            layer.trainable = False
        return [layer.name for layer in frozen]

    def frozen_layers(self):
        """Names of the layers frozen inside a trainable model (empty when the whole model is
        frozen or trainable)."""
        if not self.trainable:
            return []
        return [layer.name for layer in self.layers if layer.weights and not layer.trainable]

    def get_config(self):
        config = {
            "config": self.config.to_dict(),
            "standardize_weights": self.standardize_weights,
            "name": self.name,
            "trainable": self.trainable,
            "dtype_policy": self.dtype_policy.name,
        }
        frozen = self.frozen_layers()
        return {**config, "frozen_layers": frozen} if frozen else config

    @classmethod
    def from_config(cls, config):
        """Rebuild under the precision policy the model was built with (a mixed-precision
        fine-tune reloads as one, with its loss-scaling optimizer state), with the layers that
        were frozen frozen again."""
        config = dict(config)
        policy = config.pop("dtype_policy", None)
        frozen = config.pop("frozen_layers", ())
        previous = keras.config.dtype_policy()
        if policy is not None:
            keras.config.set_dtype_policy(policy)
        try:
            model = cls(**config)
        finally:
            keras.config.set_dtype_policy(previous)
        for name in frozen:
            model.get_layer(name).trainable = False
        return model

    @classmethod
    def from_pretrained(cls, source, config=None, **kwargs):
        """This model with the weights of a checkpoint.

        Args:
            source: a transformers checkpoint directory or hub repo id (`google/bit-50`), a timm
                state dict or hub name (`timm/resnetv2_50x1_bit.goog_in21k`), or an original
                BiT `.npz` file (see `tfbit.weights`).
            config: a `BitConfig` replacing the checkpoint's (stored or inferred) one.
            **kwargs: further arguments of the model class.
        """
        from tfbit.weights import read_checkpoint

        checkpoint = read_checkpoint(source)
        return checkpoint.load_into(cls(config or checkpoint.config, **kwargs))

    @classmethod
    def from_preset(cls, preset, num_labels=None, load_weights=True, **kwargs):
        """This model for a named checkpoint (`tfbit.presets()`), as KerasHub's `from_preset`.

        Args:
            preset: a preset name (`bit-m-r50x1`, `bit-s-r101x3`, `google/bit-50`, ...).
            num_labels: a new head of this many labels (LABEL_<i>), freshly initialized; the
                body keeps the preset's weights. None keeps the preset's head and labels.
            load_weights: False builds the preset's architecture without downloading anything.
            **kwargs: further arguments of the model class.
        """
        from tfbit.weights import read_preset

        labels = {} if num_labels is None else {"num_labels": num_labels, "id2label": None, "label2id": None}
        if not load_weights:
            return cls(BitConfig.from_preset(preset, **labels), **kwargs)
        checkpoint = read_preset(preset)
        model = cls(BitConfig.from_dict({**checkpoint.config.to_dict(), **labels}), **kwargs)
        if labels and isinstance(model, BitForImageClassification):
            body = checkpoint.load_into(BitModel(checkpoint.config))
            copy_weights(body, model, skip=("classifier",))
            return model
        return checkpoint.load_into(model)

    def save_pretrained(self, directory, preprocessor=None):
        """Write this model as a transformers checkpoint: config.json + model.safetensors
        (+ preprocessor_config.json), which transformers' class of the same name loads with
        `from_pretrained` (see `tfbit.weights.writers.save_transformers`).

        Args:
            directory: the checkpoint folder; files are moved in only once complete.
            preprocessor: a `BitImageProcessor`, its dict, or a preprocessor_config.json path.
        """
        from tfbit.weights.writers import save_transformers

        return save_transformers(self, directory, preprocessor)

    def checkpoint_skips(self, weight):
        """Whether a checkpoint weight (tfbit name) is one this model legitimately lacks."""
        return weight.startswith("classifier/")


@keras.saving.register_keras_serializable(package="tfbit")
class BitModel(_BitBase):
    """BiT body: `last_hidden_state` (NHWC), `pooler_output` (N, C) and, when
    `output_hidden_states=True`, `hidden_states` (stem + every stage, as HF)."""

    def __init__(
        self, config=None, output_hidden_states=False, standardize_weights=True, name="bit_model", trainable=True
    ):
        config = _as_config(config)
        pixel_values = _pixel_input(config)
        hidden_states, last = bit_features(config, pixel_values, standardize_weights)
        outputs = {"last_hidden_state": last, "pooler_output": keras.layers.GlobalAveragePooling2D(name="pooler")(last)}
        if output_hidden_states:
            outputs["hidden_states"] = tuple(hidden_states)
        super().__init__(pixel_values, outputs, config, standardize_weights, name, trainable)
        self.output_hidden_states = output_hidden_states

    def get_config(self):
        return {**super().get_config(), "output_hidden_states": self.output_hidden_states}


@keras.saving.register_keras_serializable(package="tfbit")
class BitForImageClassification(_BitBase):
    """BiT with its linear head: logits (N, num_labels), float32 under any precision policy."""

    def __init__(self, config=None, standardize_weights=True, name="bit_for_image_classification", trainable=True):
        config = _as_config(config)
        pixel_values = _pixel_input(config)
        _, last = bit_features(config, pixel_values, standardize_weights)
        pooled = keras.layers.GlobalAveragePooling2D(name="pooler")(last)
        if config.num_labels:
            logits = keras.layers.Dense(config.num_labels, dtype="float32", name="classifier")(pooled)
        else:
            logits = keras.layers.Activation("linear", dtype="float32", name="classifier")(pooled)
        super().__init__(pixel_values, logits, config, standardize_weights, name, trainable)

    def checkpoint_skips(self, weight):
        return False


@keras.saving.register_keras_serializable(package="tfbit")
class BitBackbone(_BitBase):
    """Feature maps `{stage_name: NHWC tensor}` of `config.out_features`, as HF's BitBackbone
    (the last stage is taken before the final norm, as HF does)."""

    def __init__(self, config=None, standardize_weights=True, name="bit_backbone", trainable=True):
        config = _as_config(config)
        pixel_values = _pixel_input(config)
        hidden_states, _ = bit_features(config, pixel_values, standardize_weights)
        outputs = {config.stage_names[i]: hidden_states[i] for i in config.out_indices}
        super().__init__(pixel_values, outputs, config, standardize_weights, name, trainable)
        all_channels = [config.embedding_size] + config.stage_channels
        self.stage_names = list(config.stage_names)
        self.out_features = list(config.out_features)
        self.channels = [all_channels[i] for i in config.out_indices]

    def checkpoint_skips(self, weight):
        """Besides the head: the final norm and the stages after the last one returned."""
        last = max(self.config.out_indices)
        stage = re.match(r"stage(\d+)_", weight)
        return weight.startswith(("classifier/", "norm/")) or (stage is not None and int(stage[1]) > last)


def copy_weights(donor, target, skip=()):
    """Give each layer of `target` that has weights those of `donor`'s layer of the same name
    (layer names are the weight map), except the names in `skip`. Returns the names `donor`
    lacks, for the caller to report."""
    layers = {layer.name: layer for layer in donor.layers}
    missing = []
    for layer in target.layers:
        if not layer.weights or layer.name in skip:
            continue
        if layer.name not in layers:
            missing.append(layer.name)
            continue
        source = layers[layer.name]
        layer.set_weights(source.get_weights())
    return missing
