"""tfbit: BiT (Big Transfer) ResNetV2 models as Keras 3 / TensorFlow, numerically identical to
Hugging Face transformers' BiT."""

from tfbit import api as _api

__version__ = "0.1.0"

import_api = _api.expose(
    globals(),
    {
        "BitConfig": "tfbit.config",
        "BitModel": "tfbit.models",
        "BitForImageClassification": "tfbit.models",
        "BitBackbone": "tfbit.models",
        "CheckpointError": "tfbit.weights.checkpoint",
        "fold_weight_standardization": "tfbit.inference",
        "inference_model": "tfbit.inference",
        "load_model": "tfbit.pretrained",
        "presets": "tfbit.presets",
        "WSConv2D": "tfbit.layers",
        "GroupNormActivation": "tfbit.layers",
        "StemMaxPool": "tfbit.layers",
        "DropPath": "tfbit.layers",
        "BiTSchedule": "tfbit.schedules",
        "BitPreprocessing": "tfbit.preprocessing_layer",
    },
)
if not _api.deferred():
    import_api()
