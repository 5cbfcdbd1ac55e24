"""tfbit: BiT (Big Transfer) ResNetV2 models as Keras 3 / TensorFlow, numerically identical to
Hugging Face transformers' BiT.

Importing tfbit imports Keras and registers every tfbit layer, model and schedule with it, so a
`.keras` file holding them loads with `keras.saving.load_model` after `import tfbit`. The command
lines (`conversion.*`, `tfbit-convert`, ...) import tfbit only after setting TensorFlow's
environment, which TensorFlow reads once, at import."""

__version__ = "0.1.0"

from tfbit.finetune.schedules import BiTSchedule
from tfbit.models import (
    BitBackbone,
    BitConfig,
    BitForImageClassification,
    BitModel,
    DropPath,
    GroupNormActivation,
    StemMaxPool,
    WSConv2D,
    fold_weight_standardization,
    inference_model,
    load_model,
)
from tfbit.models.presets import presets
from tfbit.preprocessing import BitImageProcessor, BitPreprocessing
from tfbit.weights.checkpoint import CheckpointError

__all__ = [
    "BitConfig",
    "BitModel",
    "BitForImageClassification",
    "BitBackbone",
    "CheckpointError",
    "fold_weight_standardization",
    "inference_model",
    "load_model",
    "presets",
    "WSConv2D",
    "GroupNormActivation",
    "StemMaxPool",
    "DropPath",
    "BiTSchedule",
    "BitImageProcessor",
    "BitPreprocessing",
]
