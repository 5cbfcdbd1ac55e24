"""`finetune`: BiT-HyperRule transfer with plain `model.fit`, resumable, distributable.

Writes into `output_dir`: `best.keras` (best checkpoint), `metrics.json`, `training_curve.png`
(loss, accuracy, learning rate), `config.json` + `preprocessor_config.json` (so the result
converts like any checkpoint), and `backup/` while training (removed when training completes;
rerunning the same command after a crash resumes from it).
"""

import dataclasses
import json
import math
import os

import keras
import numpy as np

from tfbit.finetune.data import Normalize, make_pipeline
from tfbit.finetune.hyperrule import hyperrule_plan
from tfbit.finetune.transfer import with_new_head


class NonFiniteLossError(FloatingPointError):
    pass


class _StopOnNonFiniteLoss(keras.callbacks.Callback):
    """Stops at the first NaN/inf loss and remembers where, so `finetune` can say so."""

    def __init__(self):
        super().__init__()
        self.failure = None

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            step = int(self.model.optimizer.iterations.numpy())
            self.failure = f"training loss became {loss} at step {step}"
            self.model.stop_training = True


class _ResumeLog(keras.callbacks.Callback):
    """Records the optimizer step training starts from (non-zero after BackupAndRestore)."""

    start_step = 0

    def on_train_begin(self, logs=None):
        self.start_step = int(self.model.optimizer.iterations.numpy())


class _LearningRateLog(keras.callbacks.Callback):
    def on_epoch_end(self, epoch, logs=None):
        optimizer = self.model.optimizer
        lr = optimizer.learning_rate
        logs["learning_rate"] = float(keras.ops.convert_to_numpy(lr))


@dataclasses.dataclass
class FinetuneResult:
    model: keras.Model
    plan: object
    history: dict
    metrics: dict
    output_dir: str


def load_model_source(source):
    """A tfbit model from a model object, an exported `.keras` file or any converter source."""
    if isinstance(source, keras.Model):
        return source
    if str(source).endswith(".keras"):
        if not os.path.isfile(source):
            raise FileNotFoundError(f"no .keras file at {source}")
        import tfbit  # noqa: F401  (registers the layers for deserialization)
        return keras.saving.load_model(source)
    from conversion.sources import load_source
    return load_source(source).model


def _plot(history, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = [("loss", ["loss", "val_loss"]), ("accuracy", ["accuracy", "val_accuracy"]),
              ("learning rate", ["learning_rate"])]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, (title, keys) in zip(axes, panels):
        for key in keys:
            if key in history:
                ax.plot(np.arange(1, len(history[key]) + 1), history[key], marker="o", label=key)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def finetune(source, train, output_dir, validation=None, *, batch_size=64, epochs=10,
             plan_overrides=None, freeze_backbone=False, strategy=None, mixed_precision=None,
             preprocess=None, random_flip=True, seed=0, backup_every=None, verbose="auto"):
    """Fine-tune `source` on `train` (an `ImageDataset`) with BiT-HyperRule.

    batch_size is the global batch (split across a strategy's replicas); the HyperRule learning
    rate is scaled to it. The plan's total steps are spread over `epochs` Keras epochs, so the
    progress bar, validation and checkpoints happen `epochs` times. `plan_overrides` replaces any
    field of the plan (e.g. `total_steps`, `base_lr`, `mixup_alpha`, `crop_size`).
    """
    os.makedirs(output_dir, exist_ok=True)
    plan = hyperrule_plan(train.num_examples, train.image_size, batch_size=batch_size,
                          **(plan_overrides or {}))
    steps_per_epoch = max(1, plan.total_steps // epochs)
    preprocess = preprocess or Normalize()
    strategy = strategy or __import__("tensorflow").distribute.get_strategy()
    previous_policy = keras.config.dtype_policy()
    if mixed_precision:
        keras.config.set_dtype_policy(mixed_precision)
    try:
        donor = load_model_source(source)
        with strategy.scope():
            model = with_new_head(donor, id2label=train.id2label, freeze_backbone=freeze_backbone)
            one_hot = bool(plan.mixup_alpha)
            loss = (keras.losses.CategoricalCrossentropy(from_logits=True) if one_hot
                    else keras.losses.SparseCategoricalCrossentropy(from_logits=True))
            accuracy = keras.metrics.CategoricalAccuracy("accuracy") if one_hot \
                else keras.metrics.SparseCategoricalAccuracy("accuracy")
            model.compile(optimizer=plan.optimizer(), loss=loss, metrics=[accuracy])
    finally:
        keras.config.set_dtype_policy(previous_policy)

    train_ds = make_pipeline(train, plan, batch_size, training=True, num_classes=train.num_classes,
                             seed=seed, one_hot=one_hot, preprocess=preprocess, random_flip=random_flip)
    val_ds = None
    if validation is not None:
        val_ds = make_pipeline(validation, plan, batch_size, training=False, preprocess=preprocess,
                               one_hot=one_hot, num_classes=train.num_classes)
    best_path = os.path.join(output_dir, "best.keras")
    monitor = "val_accuracy" if val_ds is not None else "accuracy"
    nan_guard, resume = _StopOnNonFiniteLoss(), _ResumeLog()
    callbacks = [
        # double_checkpoint: a kill while the backup is being written leaves the previous one
        keras.callbacks.BackupAndRestore(os.path.join(output_dir, "backup"),
                                         save_freq=backup_every or steps_per_epoch, double_checkpoint=True),
        resume,  # after BackupAndRestore, which restores the step in its on_train_begin
        nan_guard,
        _LearningRateLog(),
        keras.callbacks.ModelCheckpoint(best_path, monitor=monitor, mode="max", save_best_only=True),
    ]
    history = model.fit(train_ds, epochs=epochs, steps_per_epoch=steps_per_epoch,
                        validation_data=val_ds, callbacks=callbacks, verbose=verbose, shuffle=False)
    if nan_guard.failure:
        raise NonFiniteLossError(f"{nan_guard.failure}; training stopped. Lower the learning rate "
                                 "(plan_overrides={'base_lr': ...}) or check the input data")
    best = keras.saving.load_model(best_path)
    metrics = {"plan": plan.to_dict(), "steps_per_epoch": steps_per_epoch, "epochs": epochs,
               "history": {k: [float(v) for v in vals] for k, vals in history.history.items()},
               "num_replicas": strategy.num_replicas_in_sync, "resumed_from_step": resume.start_step,
               "final_step": int(model.optimizer.iterations.numpy())}
    if val_ds is not None:
        results = best.evaluate(val_ds, verbose=0, return_dict=True)
        metrics["validation"] = {k: float(v) for k, v in results.items()}
    with open(os.path.join(output_dir, "metrics.json"), "w", encoding="utf-8") as f:
        json.dump(metrics, f, indent=2)
    best.config.save_pretrained(output_dir)
    _write_preprocessor(output_dir, plan.crop_size, preprocess)
    _plot(history.history, os.path.join(output_dir, "training_curve.png"))
    return FinetuneResult(best, plan, history.history, metrics, output_dir)


def _write_preprocessor(output_dir, crop_size, preprocess):
    """The evaluation preprocessing as an HF preprocessor_config.json (resize straight to crop)."""
    from tfbit.image_processor import BitImageProcessor
    mean = getattr(preprocess, "mean", 0.5)
    std = getattr(preprocess, "std", 0.5)
    BitImageProcessor(size={"height": crop_size, "width": crop_size}, do_center_crop=False,
                      image_mean=list(np.broadcast_to(mean, 3).astype(float)),
                      image_std=list(np.broadcast_to(std, 3).astype(float)),
                      resample=2).save_pretrained(output_dir)
