"""Fine-tuning recipe (BiT-HyperRule), MixUp and tf.data input pipelines."""

from tfbit.finetune.data import (
    IMAGE_EXTENSIONS,
    ImageDataset,
    Normalize,
    PipelineOptions,
    from_arrays,
    from_image_folder,
    from_tfds,
    make_pipeline,
)
from tfbit.finetune.hyperrule import BiTSchedule, HyperRulePlan, hyperrule_plan
from tfbit.finetune.mixup import MixUp, mixup, sample_mixup_lambda

__all__ = [
    "IMAGE_EXTENSIONS",
    "BiTSchedule",
    "HyperRulePlan",
    "ImageDataset",
    "MixUp",
    "Normalize",
    "PipelineOptions",
    "from_arrays",
    "from_image_folder",
    "from_tfds",
    "hyperrule_plan",
    "make_pipeline",
    "mixup",
    "sample_mixup_lambda",
]
