"""tfbit: BiT (Big Transfer) ResNetV2 models as Keras 3 / TensorFlow, numerically identical to
Hugging Face transformers' BiT.

Importing tfbit imports Keras and registers every tfbit layer, model and schedule with it, so a
`.keras` file holding them loads with `keras.saving.load_model` after `import tfbit`. The command
lines (`conversion.*`, `tfbit-convert`, ...) import tfbit only after setting TensorFlow's
environment, which TensorFlow reads once, at import."""

__version__ = "0.1.0"

# `from tfbit import errors, filetypes` binds them also when a command line loaded them before tfbit
# (conversion/__init__.py), which leaves the package without the attribute
from tfbit import errors, filetypes
from tfbit.errors import (
    CheckpointError,
    CompletedRunError,
    ConfigError,
    DataError,
    FileError,
    ImageError,
    MissingFileError,
    ModelError,
    NonFiniteLossError,
    TfbitError,
)
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

__all__ = [
    "BitConfig",
    "BitModel",
    "BitForImageClassification",
    "BitBackbone",
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
    "errors",
    "filetypes",
    "TfbitError",
    "ConfigError",
    "CheckpointError",
    "ModelError",
    "ImageError",
    "DataError",
    "CompletedRunError",
    "NonFiniteLossError",
    "FileError",
    "MissingFileError",
]
