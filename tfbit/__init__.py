"""tfbit: BiT (Big Transfer) ResNetV2 models as Keras 3 / TensorFlow, numerically identical to
Hugging Face transformers' BiT."""

from tfbit.weights.checkpoint import CheckpointError
from tfbit.config import BitConfig
from tfbit.layers import DropPath, GroupNormActivation, StemMaxPool, WSConv2D
from tfbit.models import BitBackbone, BitForImageClassification, BitModel, fold_weight_standardization
from tfbit.schedules import BiTSchedule
from tfbit.pretrained import load_model
from tfbit.presets import presets
from tfbit.preprocessing_layer import BitPreprocessing

__version__ = "0.1.0"

__all__ = ["BitConfig", "BitModel", "BitForImageClassification", "BitBackbone", "CheckpointError", "fold_weight_standardization", "load_model", "presets",
           "WSConv2D", "GroupNormActivation", "StemMaxPool", "DropPath", "BiTSchedule", "BitPreprocessing"]
