"""Fine-tuning: the recipe (BiT-HyperRule and its schedule), MixUp, tf.data input pipelines,
the trainer and multi-worker runs."""

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
from tfbit.finetune.hyperrule import HyperRulePlan, hyperrule_plan
from tfbit.finetune.mixup import MixUp, mixup, sample_mixup_lambda
from tfbit.finetune.schedules import BiTSchedule
from tfbit.finetune.trainer import FinetuneOptions, finetune

__all__ = [
    "IMAGE_EXTENSIONS",
    "ImageDataset",
    "Normalize",
    "PipelineOptions",
    "from_arrays",
    "from_image_folder",
    "from_tfds",
    "make_pipeline",
    "HyperRulePlan",
    "hyperrule_plan",
    "MixUp",
    "mixup",
    "sample_mixup_lambda",
    "BiTSchedule",
    "FinetuneOptions",
    "finetune",
]
