"""The model code: configuration, layers, the three BiT models, named checkpoints (`presets`)
and loading."""

from tfbit.models.bit import BitBackbone, BitForImageClassification, BitModel
from tfbit.models.config import BitConfig
from tfbit.models.inference import fold_weight_standardization, inference_model
from tfbit.models.layers import DropPath, GroupNormActivation, StemMaxPool, WSConv2D
from tfbit.models.pretrained import load_model

__all__ = [
    "BitBackbone",
    "BitConfig",
    "BitForImageClassification",
    "BitModel",
    "DropPath",
    "GroupNormActivation",
    "StemMaxPool",
    "WSConv2D",
    "fold_weight_standardization",
    "inference_model",
    "load_model",
]
