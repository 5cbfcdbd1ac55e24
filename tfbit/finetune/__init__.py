"""Fine-tuning recipe (BiT-HyperRule), MixUp and tf.data input pipelines."""

from tfbit import api as _api

import_api = _api.expose(
    globals(),
    {
        **dict.fromkeys(
            [
                "IMAGE_EXTENSIONS",
                "ImageDataset",
                "Normalize",
                "PipelineOptions",
                "from_arrays",
                "from_image_folder",
                "from_tfds",
                "make_pipeline",
            ],
            "tfbit.finetune.data",
        ),
        **dict.fromkeys(["BiTSchedule", "HyperRulePlan", "hyperrule_plan"], "tfbit.finetune.hyperrule"),
        **dict.fromkeys(["MixUp", "mixup", "sample_mixup_lambda"], "tfbit.finetune.mixup"),
    },
)
if not _api.deferred():
    import_api()
