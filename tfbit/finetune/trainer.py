"""`finetune`: BiT-HyperRule transfer with plain `model.fit`, resumable, distributable.

Writes into `output_dir`: `best.keras` (best checkpoint), `metrics.json`, `training_curve.png`
(loss, accuracy, learning rate), `config.json` + `preprocessor_config.json` (so the result
converts like any checkpoint), and `backup/` while training (removed when training completes;
rerunning the same command after a crash resumes from it).
"""

import contextlib
import dataclasses
import json
import math
import numbers
import os

import keras
import numpy as np
import tensorflow as tf

from tfbit.finetune.data import Normalize, PipelineOptions, make_pipeline
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


class _StopAtStep(keras.callbacks.Callback):
    """Ends training once the optimizer has made `total_steps` steps.

    Epochs have one length in Keras, so the last one is cut short when `epochs` does not
    divide the plan; and a resumed run restarts its interrupted epoch from the first batch
    with the optimizer step restored, which would otherwise run that epoch's finished batches
    again on top of the plan.
    """

    def __init__(self, total_steps):
        super().__init__()
        self.total_steps = total_steps

    def on_train_batch_end(self, batch, logs=None):
        if int(self.model.optimizer.iterations.numpy()) >= self.total_steps:
            self.model.stop_training = True


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
    from tfbit.pretrained import load_model
    return load_model(source, task="features")[0]  # the body: the head is replaced anyway


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


def _check_positive_int(name, value):
    if not (isinstance(value, numbers.Integral) and not isinstance(value, bool) and value > 0):
        raise ValueError(f"{name} must be a positive int, got {value!r}")


@contextlib.contextmanager
def _naming_undecodable_examples(*datasets):
    """A decoding failure inside tf.data names only the op: find and name the example."""
    try:
        yield
    except (tf.errors.InvalidArgumentError, tf.errors.NotFoundError):
        for dataset in datasets:
            if dataset is not None:
                dataset.verify()  # raises ValueError naming the example that does not decode
        raise


def finetune(source, train, output_dir, validation=None, *, batch_size=64, epochs=10, steps=None,
             plan_overrides=None, freeze_backbone=False, strategy=None, mixed_precision=None,
             preprocess=None, random_flip=True, seed=0, backup_every=None, verbose="auto"):
    """Fine-tunes `source` on `train` with BiT-HyperRule and plain `model.fit`.

    The run makes exactly the plan's `total_steps` optimizer steps, also when it resumes
    from `output_dir/backup` after an interruption.

    Args:
        source: a Keras model, a `.keras` file, or any source the converter loads; its body
            gets a new zero-initialized head for the training classes.
        train: the training `ImageDataset`, with at least 2 classes.
        output_dir: where the checkpoint, metrics and configs are written (see the module).
        validation: an optional `ImageDataset` whose classes are training classes, matched by
            name (it may hold a subset of them); it selects the best checkpoint.
        batch_size: the global batch (split across a strategy's replicas); the HyperRule
            learning rate is scaled to it.
        epochs: Keras epochs the plan's steps are split into (progress, validation and the
            best checkpoint happen at the end of each): ceil(total_steps / epochs) steps each,
            the last one shorter. `metrics.json` records the epochs run, fewer when rounding
            leaves the last ones empty (e.g. more epochs than steps).
        steps: train for this many steps instead of the HyperRule's, with the schedule scaled
            to keep its shape (`HyperRulePlan.scaled_to`).
        plan_overrides: `HyperRulePlan` fields replacing the rule's (e.g. `base_lr`,
            `mixup_alpha`, `crop_size`), applied before `steps`.
        freeze_backbone: train the new head only.
        strategy: a `tf.distribute` strategy to train under; default the current one.
        mixed_precision: "mixed_float16" or "mixed_bfloat16" to build the model under that
            dtype policy (weight standardization and logits stay float32).
        preprocess: maps float [0, 255] pixels to model input; default `Normalize()`.
        random_flip: random left-right flips; turn off where mirroring changes the class.
        seed: seed of shuffling, augmentation and MixUp.
        backup_every: back up every this many steps (default: at the end of each epoch).
        verbose: `model.fit`'s verbosity.

    Returns:
        A `FinetuneResult` with the best model, the plan, the Keras history and the metrics
        written to `metrics.json`.
    """
    _check_positive_int("batch_size", batch_size)
    _check_positive_int("epochs", epochs)
    for name, value in (("steps", steps), ("backup_every", backup_every)):
        if value is not None:
            _check_positive_int(name, value)
    if train.num_classes < 2:
        raise ValueError(f"the training data has {train.num_classes} class {list(train.class_names)}: "
                         "a classifier needs at least 2 classes to tell apart")
    if validation is not None:
        try:
            validation = validation.relabeled(train.class_names)
        except ValueError as e:
            raise ValueError(f"validation data: {e} of the training data") from None
    os.makedirs(output_dir, exist_ok=True)
    plan = hyperrule_plan(train.num_examples, train.image_size, batch_size=batch_size,
                          **(plan_overrides or {}))
    if steps is not None:
        plan = plan.scaled_to(steps)
    steps_per_epoch = math.ceil(plan.total_steps / epochs)
    epochs = math.ceil(plan.total_steps / steps_per_epoch)
    options = PipelineOptions(preprocess=preprocess or Normalize(), random_flip=random_flip, seed=seed)
    strategy = strategy or tf.distribute.get_strategy()
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

    train_ds = make_pipeline(train, plan, batch_size, training=True, one_hot=one_hot, options=options)
    val_ds = None
    if validation is not None:
        val_ds = make_pipeline(validation, plan, batch_size, one_hot=one_hot, options=options)
    best_path = os.path.join(output_dir, "best.keras")
    monitor = "val_accuracy" if val_ds is not None else "accuracy"
    nan_guard, resume = _StopOnNonFiniteLoss(), _ResumeLog()
    callbacks = [
        # double_checkpoint: a kill while the backup is being written leaves the previous one.
        # Epoch-end backups (written after on_epoch_end) resume at the next epoch; batch-level
        # ones restart the interrupted epoch, which _StopAtStep keeps within the plan.
        keras.callbacks.BackupAndRestore(os.path.join(output_dir, "backup"),
                                         save_freq=backup_every or "epoch", double_checkpoint=True),
        resume,  # after BackupAndRestore, which restores the step in its on_train_begin
        nan_guard,
        _StopAtStep(plan.total_steps),
        _LearningRateLog(),
        keras.callbacks.ModelCheckpoint(best_path, monitor=monitor, mode="max", save_best_only=True),
    ]
    with _naming_undecodable_examples(train, validation):
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
        with _naming_undecodable_examples(validation):
            results = best.evaluate(val_ds, verbose=0, return_dict=True)
        metrics["validation"] = {k: float(v) for k, v in results.items()}
    with open(os.path.join(output_dir, "metrics.json"), "w", encoding="utf-8") as f:
        json.dump(metrics, f, indent=2)
    best.config.save_pretrained(output_dir)
    _write_preprocessor(output_dir, plan.crop_size, options.preprocess)
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
