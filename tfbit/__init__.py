"""tfbit: BiT (Big Transfer) ResNetV2 models as Keras 3 / TensorFlow, numerically identical to
Hugging Face transformers' BiT."""

from tfbit.checkpoint import CheckpointError
from tfbit.config import BitConfig
from tfbit.layers import DropPath, GroupNormActivation, StemMaxPool, WSConv2D
from tfbit.models import BitBackbone, BitForImageClassification, BitModel, fold_weight_standardization

__version__ = "0.1.0"

__all__ = ["BitConfig", "BitModel", "BitForImageClassification", "BitBackbone", "CheckpointError", "fold_weight_standardization",
           "WSConv2D", "GroupNormActivation", "StemMaxPool", "DropPath"]
