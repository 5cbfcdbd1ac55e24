"""tfbit models as KerasHub presets: `save_to_preset(model, directory)` writes a folder that
`keras_hub.models.Backbone.from_preset` and `keras_hub.models.ImageClassifier.from_preset` load,
and that `keras_hub.upload_preset` publishes on Kaggle or the Hugging Face hub.

KerasHub finds a preset's classes by their registered names (`tfbit>TfbitBackbone`, ...), so the
loading process must `import tfbit.kerashub` first. `import tfbit` does not import this module:
keras_hub takes about a second to import, which every `import tfbit` would pay.

The image converter runs tfbit's own preprocessing (`tfbit.preprocessing.tf_processor`, as
`BitPreprocessing` does), so a preset's `predict` on uint8 images sees BitImageProcessor's pixels
bit for bit; keras_hub's stock ImageConverter crops before it resizes, and resizes in float: on
the shipped photos it is off by 0.026 on average, 1.9 at most, even when the resize equals the
crop (docs/kerashub.md, "Numerics").
"""

import os
import shutil
import tempfile

import keras
import keras_hub
import tensorflow as tf

from tfbit.errors import ConfigError, ModelError
from tfbit.models.bit import (
    BitBackbone,
    BitForImageClassification,
    BitModel,
    _as_config,
    _pixel_input,
    bit_features,
    copy_weights,
)
from tfbit.preprocessing import tf_processor
from tfbit.preprocessing.processor import BitImageProcessor

# the files a task preset holds beyond a backbone preset's (keras_hub's preset layout)
TASK_FILES = ("task.json", "task.weights.h5")
BACKBONE_FILES = ("config.json", "metadata.json", "model.weights.h5", "preprocessor.json", "image_converter.json")

_register = keras.saving.register_keras_serializable(package="tfbit")
# ImageConverter's resize and rescale settings, and the dtype, always float32 here
_STOCK_SETTINGS = (
    "image_size",
    "scale",
    "offset",
    "interpolation",
    "antialias",
    "crop_to_aspect_ratio",
    "pad_to_aspect_ratio",
    "bounding_box_format",
    "dtype",
)


@_register
class TfbitBackbone(keras_hub.models.Backbone):
    """The BiT body as a KerasHub backbone: pixel values (N, H, W, C) -> the last stage's feature
    map, after the final norm of a pre-activation model (`BitModel`'s `last_hidden_state`).

    Args:
        config: a `BitConfig` or its dict (None: transformers' bit-50).
        standardize_weights: False for the inference form (kernels stored standardized).
        final_norm: False ends at the last stage before the final norm, as a `BitBackbone` does.
        dtype: the precision policy the layers are built under (KerasHub passes the caller's).
    """

    def __init__(self, config=None, standardize_weights=True, final_norm=True, dtype=None, **kwargs):
        config = _as_config(config)
        previous = keras.config.dtype_policy()
        # tfbit's layers take the global policy; Backbone's own `dtype` reaches only the model
        if dtype is not None:
            keras.config.set_dtype_policy(keras.dtype_policies.get(dtype))
        try:
            pixel_values = _pixel_input(config)
            hidden_states, last = bit_features(config, pixel_values, standardize_weights)
        finally:
            keras.config.set_dtype_policy(previous)
        super().__init__(inputs=pixel_values, outputs=last if final_norm else hidden_states[-1], dtype=dtype, **kwargs)
        self.bit_config = config
        self.standardize_weights = standardize_weights
        self.final_norm = final_norm
        self.data_format = "channels_last"  # ImageClassifier pools over this, whatever Keras' default

    def get_config(self):
        return {
            **super().get_config(),
            "config": self.bit_config.to_dict(),
            "standardize_weights": self.standardize_weights,
            "final_norm": self.final_norm,
        }


def _processor(processor, backend=None):
    if isinstance(processor, BitImageProcessor):
        backend, processor = backend or processor.backend, processor.to_dict()
    if isinstance(processor, dict) or processor is None:
        return BitImageProcessor.from_dict(processor or {}, backend=backend or "torchvision")
    return BitImageProcessor.from_pretrained(processor, backend=backend or "torchvision")


@_register
class TfbitImageConverter(keras_hub.layers.ImageConverter):
    """BitImageProcessor as KerasHub's image converter: resize the shortest edge, center crop,
    rescale, normalize, with tfbit's TF ops (`tf_processor`), so uint8 images give the
    processor's pixels exactly. TensorFlow backend (as `BitPreprocessing`).

    Args:
        processor: a `BitImageProcessor`, its dict, a preprocessor_config.json path (or its
            folder), or None for transformers' defaults.
        backend: which transformers implementation the arithmetic follows ("torchvision" or
            "pil"); default: the processor's own, "torchvision" for a dict.

    Input: uint8 images (or floats holding 0-255 values): (N, H, W, C), a `tf.RaggedTensor`
    batch or a list of images of different sizes -> float32 (N, h, w, 3); one (H, W, C) image ->
    (h, w, 3). Floats are resized in float (TensorFlow's antialiased resize), as BitPreprocessing.
    """

    backbone_cls = TfbitBackbone

    def __init__(self, processor=None, backend=None, image_size=None, **kwargs):
        # float32 always, as BitPreprocessing: autocast would round 0-255 floats to float16 first
        super().__init__(**{**kwargs, "dtype": "float32", "autocast": False})
        self.processor = _processor(processor, backend)
        if image_size is not None:
            self.image_size = image_size

    @property
    def image_size(self):
        return self.processor.fixed_output_size

    @image_size.setter
    def image_size(self, value):
        # the base class' unused Resizing layer would otherwise take a size nothing applies
        if value is not None and tuple(value) != self.image_size:
            raise ConfigError(
                f"TfbitImageConverter's output size is its processor's crop size {self.image_size}, "
                f"not {tuple(value)}: build it from BitImageProcessor(size=..., crop_size=...)"
            )

    def call(self, images):
        if isinstance(images, (list, tuple)):  # images of different sizes: each on its own
            return tf.concat([tf_processor.preprocess_images(image, self.processor) for image in images], 0)
        out = tf_processor.preprocess_images(images, self.processor)  # always a batch
        return out if isinstance(images, tf.RaggedTensor) or len(images.shape) == 4 else out[0]

    def get_config(self):
        config = super().get_config()
        for key in _STOCK_SETTINGS:  # they describe nothing this converter does
            config.pop(key, None)
        return {**config, "processor": self.processor.to_dict(), "backend": self.processor.backend}


@_register
class TfbitImageClassifierPreprocessor(keras_hub.models.ImageClassifierPreprocessor):
    """KerasHub's image classifier preprocessing with `TfbitImageConverter`."""

    backbone_cls = TfbitBackbone
    image_converter_cls = TfbitImageConverter

    def call(self, x, y=None, sample_weight=None):
        # Not keras_hub's call, which first turns a list of images of different sizes into an
        # int32 tf.ragged.constant, element by element (seconds per photo), on which the
        # converter's uint8 arithmetic no longer runs; the converter takes lists itself.
        return keras.utils.pack_x_y_sample_weight(self.image_converter(x), y, sample_weight)


@_register
class TfbitImageClassifier(keras_hub.models.ImageClassifier):
    """KerasHub's ImageClassifier on a `TfbitBackbone`: average pooling then a linear head, the
    computation of `BitForImageClassification`; the head computes in float32 (`head_dtype`),
    as tfbit's does, whatever the policy."""

    backbone_cls = TfbitBackbone
    preprocessor_cls = TfbitImageClassifierPreprocessor

    def __init__(self, backbone, num_classes, preprocessor=None, head_dtype="float32", **kwargs):
        super().__init__(backbone, num_classes, preprocessor, head_dtype=head_dtype, **kwargs)

    def get_config(self):
        # ImageClassifier does not save head_dtype: a reloaded head would take the body's policy
        return {**super().get_config(), "head_dtype": self.output_dense.dtype_policy.name}


def check_exportable(model):
    """ModelError unless `model` is a tfbit model a preset can hold: a `BitModel`,
    `BitForImageClassification`, or `BitBackbone` whose stages reach the last one."""
    if not isinstance(model, (BitModel, BitForImageClassification, BitBackbone)):
        raise ModelError(
            f"a KerasHub preset is written from a tfbit BitModel, BitForImageClassification or "
            f"BitBackbone, got a {type(model).__name__}: save the tfbit model inside it instead"
        )
    last = model.config.stage_names[-1]
    if isinstance(model, BitBackbone) and last not in model.config.out_features:
        raise ModelError(
            f"{model.name} returns {model.config.out_features}, which stop before {last}: a KerasHub "
            f"backbone ends at the last stage, whose weights this BitBackbone does not hold; "
            f"build it with out_features including {last!r}"
        )


def preset_files(model):
    """The files `save_to_preset(model, ...)` writes (no sharding: bodies below 10 GB)."""
    check_exportable(model)
    return BACKBONE_FILES + (TASK_FILES if _has_head(model) else ())


def _has_head(model):
    return isinstance(model, BitForImageClassification) and model.config.num_labels > 0


def preset_backbone(model):
    """A `TfbitBackbone` holding the body weights of `model` (see `check_exportable`); a
    `BitBackbone`'s ends before the final norm, as its last feature map does."""
    check_exportable(model)
    backbone = TfbitBackbone(model.config, model.standardize_weights, final_norm=not isinstance(model, BitBackbone))
    copy_weights(model, backbone)  # same config, same layer names: none is missing
    return backbone


def save_to_preset(model, directory, processor=None):
    """Write `model` as a KerasHub preset folder; returns its path.

    A `BitForImageClassification` becomes a `TfbitImageClassifier` (task.json, its head in
    task.weights.h5); a `BitModel`, a `BitBackbone` or a classifier without a head
    (`num_labels=0`) a backbone preset, which `ImageClassifier.from_preset(directory,
    num_classes=N)` gives a new head. Both carry the preprocessing (preprocessor.json,
    image_converter.json). The files are written beside `directory` first and moved in once
    complete; task files of an earlier preset that this one lacks are removed, other files kept.

    Args:
        model: a tfbit `BitModel`, `BitForImageClassification` or `BitBackbone` (its
            out_features must include the last stage; the preset's backbone returns that one).
        directory: the preset folder (created if needed).
        processor: a `BitImageProcessor`, its dict, or a preprocessor_config.json path; None:
            transformers' defaults.
    """
    backbone = preset_backbone(model)
    preprocessor = TfbitImageClassifierPreprocessor(TfbitImageConverter(processor))
    directory = os.path.abspath(os.fspath(directory))
    os.makedirs(os.path.dirname(directory), exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(directory)}.partial-", dir=os.path.dirname(directory))
    try:
        if _has_head(model):
            task = TfbitImageClassifier(backbone, model.config.num_labels, preprocessor)
            task.output_dense.set_weights(model.get_layer("classifier").get_weights())
            task.save_to_preset(staging)
        else:
            backbone.save_to_preset(staging)
            preprocessor.save_to_preset(staging)
        _move_into(staging, directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return directory


def _move_into(staging, directory):
    os.makedirs(directory, exist_ok=True)
    written = set(os.listdir(staging))
    for name in set(TASK_FILES) - written:
        if os.path.isfile(os.path.join(directory, name)):
            os.remove(os.path.join(directory, name))
    # config.json last: loaders look for it first, so a preset half moved in is not taken for one
    for name in sorted(written, key=lambda name: name == "config.json"):
        os.replace(os.path.join(staging, name), os.path.join(directory, name))


__all__ = [
    "TfbitBackbone",
    "TfbitImageConverter",
    "TfbitImageClassifierPreprocessor",
    "TfbitImageClassifier",
    "check_exportable",
    "preset_files",
    "preset_backbone",
    "save_to_preset",
]
