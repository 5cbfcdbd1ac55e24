"""`finetune`: BiT-HyperRule transfer with plain `model.fit`, resumable, distributable.

Writes into `output_dir`: `best.keras` (best checkpoint), `metrics.json`, `training_curve.png`
(loss and learning rate per step, accuracy per epoch), `config.json` +
`preprocessor_config.json` (so the result converts like any checkpoint). While training,
`backup/` (Keras' BackupAndRestore) and `run/` (the run's journal and its best model so far)
hold everything a rerun of the same command needs to resume: the metrics and the best model
cover the whole run, however often it was interrupted. They are moved into place, replacing a
previous run's only then, and removed. Under a multi-worker strategy only the chief writes
these (`workers`).
"""

import contextlib
import dataclasses
import json
import math
import numbers
import os
import shutil
import sys
import time
import warnings
from collections.abc import Callable

import keras
import numpy as np
import tensorflow as tf

# NonFiniteLossError and CompletedRunError are defined in tfbit.errors, importable from here as before
from tfbit.errors import CompletedRunError, ConfigError, DataError, NonFiniteLossError
from tfbit.finetune import workers
from tfbit.finetune.data import Normalize, PipelineOptions, make_pipeline
from tfbit.finetune.hyperrule import hyperrule_plan, learning_shortfall, short_run_plan
from tfbit.finetune.transfer import with_new_head

SCHEDULES = ("hyperrule", "short")


class ShortScheduleWarning(UserWarning):
    """The schedule gives the model too little learning (`hyperrule.learning_shortfall`)."""


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


RUN_DIR = "run"  # the journal and best model of a run in progress


def _read_journal(path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        return {"history": [], "steps": {"step": [], "loss": [], "seconds": []}, "best": None}


def _write_json(path, value):
    partial = f"{path}.partial"
    with open(partial, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=2)
    os.replace(partial, path)


class _RunJournal(keras.callbacks.Callback):
    """The run's record across interruptions, in `path` (replaced at every epoch end): each
    epoch's logs, each step's loss and time, and the best monitored value so far (that of the
    best model, which `ModelCheckpoint` starts from on a resume). A resumed run drops what came
    after its restored step (those epochs run again) and continues the record."""

    def __init__(self, path, monitor, steps_per_epoch, step_log):
        super().__init__()
        self.path, self.monitor, self.steps_per_epoch, self.step_log = path, monitor, steps_per_epoch, step_log
        self.record = _read_journal(path)
        self._earlier_steps = None

    def on_epoch_begin(self, epoch, logs=None):
        if self._earlier_steps is not None:
            return
        # the first epoch of this process: BackupAndRestore has restored the step by now
        start = int(self.model.optimizer.iterations.numpy())
        self.record["history"] = self.record["history"][: start // self.steps_per_epoch]
        steps = self.record["steps"]
        kept = sum(1 for step in steps["step"] if step <= start)
        self._earlier_steps = {k: v[:kept] for k, v in steps.items()}

    def on_epoch_end(self, epoch, logs=None):
        logs = {k: float(v) for k, v in (logs or {}).items()}
        self.record["history"].append(logs)
        value = logs.get(self.monitor)
        if value is not None and (self.record["best"] is None or value > self.record["best"]):
            self.record["best"] = value
        this_run = {"step": self.step_log.steps, "loss": self.step_log.losses, "seconds": self.step_log.seconds}
        self.record["steps"] = {k: self._earlier_steps[k] + this_run[k] for k in this_run}
        _write_json(self.path, self.record)

    def history(self):
        """{metric: [value per epoch]} of the whole run."""
        names = dict.fromkeys(k for epoch in self.record["history"] for k in epoch)
        return {k: [epoch.get(k, math.nan) for epoch in self.record["history"]] for k in names}


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


class _StepLog(keras.callbacks.Callback):
    """The training loss and wall time of every optimizer step. Keras reports at each batch the
    mean loss of the epoch so far (batches of one size: the pipeline repeats and drops no
    remainder), so step b's own loss is (b + 1) * mean_b - b * mean_(b-1). A step's time runs
    from the previous step's end (or the epoch's start) and includes its input pipeline."""

    def __init__(self):
        super().__init__()
        self.steps, self.losses, self.seconds = [], [], []
        self._previous_mean = 0.0
        self._previous_end = None

    def on_epoch_begin(self, epoch, logs=None):
        self._previous_mean = 0.0
        self._previous_end = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        now = time.perf_counter()
        mean = float((logs or {}).get("loss", math.nan))
        self.steps.append(int(self.model.optimizer.iterations.numpy()))
        self.losses.append((batch + 1) * mean - batch * self._previous_mean)
        self.seconds.append(now - self._previous_end)
        self._previous_mean, self._previous_end = mean, now


@dataclasses.dataclass
class FinetuneResult:
    model: keras.Model
    plan: object
    history: dict
    metrics: dict
    output_dir: str


def load_model_source(source):
    """(a tfbit model, the image side it was trained at or None) from a model object, an exported
    `.keras` file or any converter source (the side from its preprocessor_config.json)."""
    if isinstance(source, keras.Model):
        return source, None
    from tfbit.models.pretrained import load_model
    from tfbit.preprocessing.processor import BitImageProcessor

    model, checkpoint = load_model(source, task="features")  # the body: the head is replaced anyway
    if checkpoint.preprocessor is None:
        return model, None
    processor = BitImageProcessor.from_dict(checkpoint.preprocessor)
    side = processor.crop_size["height"] if processor.do_center_crop else min(processor.output_size(1, 1))
    return model, side


def _plot(steps, history, plan, steps_per_epoch, path):
    """Loss per optimizer step (`steps`: {"step", "loss"} lists; validation per epoch, at the
    step it ended on), accuracy per epoch, and the learning rate of every step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (loss_ax, accuracy_ax, lr_ax) = plt.subplots(1, 3, figsize=(13, 3.6))
    numbers, losses = steps["step"], steps["loss"]
    loss_ax.plot(numbers, losses, linewidth=0.8, alpha=0.6 if len(numbers) > 20 else 1, label="loss")
    if len(numbers) > 20:  # a moving average shows the trend through the per-batch noise
        window = max(5, len(numbers) // 20)
        smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
        loss_ax.plot(numbers[window - 1 :], smooth, label=f"loss (mean of {window})")
    epochs = max((len(v) for v in history.values()), default=0)
    ends = [min((i + 1) * steps_per_epoch, plan.total_steps) for i in range(epochs)]
    for ax, keys in ((loss_ax, ["val_loss"]), (accuracy_ax, ["accuracy", "val_accuracy"])):
        for key in keys:
            if key in history and len(history[key]) == len(ends):
                ax.plot(ends, history[key], marker="o", label=f"{key} (epoch)")
    lr_ax.plot(np.arange(1, plan.total_steps + 1), plan.learning_rates(), label="learning_rate")
    for ax, title in ((loss_ax, "loss"), (accuracy_ax, "accuracy"), (lr_ax, "learning rate")):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


@dataclasses.dataclass(frozen=True)
class FinetuneOptions:
    """How `finetune` trains. `finetune` also takes each field as a keyword, which replaces that
    field of its `options`: `finetune(..., batch_size=32)` is
    `finetune(..., options=FinetuneOptions(batch_size=32))`.

    Args:
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
        strategy: a `tf.distribute` strategy to train under; default the current one. Under
            `MultiWorkerMirroredStrategy` (`workers.multi_worker_strategy()`) every worker
            calls `finetune` with the same arguments: each trains on its shard of `train`,
            evaluates all of `validation` (collectives need the same number of batches on
            every worker), and only the chief writes `output_dir`'s files; the others back up
            into `output_dir/.worker-<i>` (removed at the end) and return without writing.
        mixed_precision: "mixed_float16" or "mixed_bfloat16" to build the model under that
            dtype policy (weight standardization and logits stay float32).
        preprocess: maps float [0, 255] pixels to model input; default `Normalize()`.
        random_flip: random left-right flips; turn off where mirroring changes the class.
        seed: seed of shuffling, augmentation and MixUp.
        backup_every: back up every this many steps (default: at the end of each epoch).
        verbose: `model.fit`'s verbosity; "auto" is a progress bar on a terminal or in a
            notebook and one line per epoch otherwise (no carriage returns in log files).
        schedule: "hyperrule" (the paper's rule, `hyperrule_plan`) or "short" (`short_run_plan`:
            for runs of a few hundred steps or fewer; `steps` defaults to the rule's). A plan
            with less than a tenth of the full rule's learning warns (`ShortScheduleWarning`).
        overwrite: train again into an `output_dir` holding a completed run (its files are
            replaced only when the new run completes); without it that is refused
            (`CompletedRunError`), while an interrupted run resumes.
    """

    batch_size: int = 64
    epochs: int = 10
    steps: int | None = None
    plan_overrides: dict | None = None
    freeze_backbone: bool = False
    strategy: tf.distribute.Strategy | None = None
    mixed_precision: str | None = None
    preprocess: Callable | None = None
    random_flip: bool = True
    seed: int = 0
    backup_every: int | None = None
    verbose: int | str = "auto"
    schedule: str = "hyperrule"
    overwrite: bool = False

    def __post_init__(self):
        _check_positive_int("batch_size", self.batch_size)
        _check_positive_int("epochs", self.epochs)
        for name, value in (("steps", self.steps), ("backup_every", self.backup_every)):
            if value is not None:
                _check_positive_int(name, value)
        if self.strategy is not None and keras.backend.backend() != "tensorflow":
            raise ConfigError(
                f"strategy= takes a tf.distribute strategy, which only the TensorFlow backend trains "
                f"with (Keras runs on {keras.backend.backend()}): under JAX set a keras.distribution "
                "instead, e.g. keras.distribution.set_distribution(keras.distribution.DataParallel())"
            )
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")


def _with_overrides(options, overrides):
    """`options` (default `FinetuneOptions()`) with `finetune`'s keywords replacing its fields."""
    names = {field.name for field in dataclasses.fields(FinetuneOptions)}
    unknown = [name for name in overrides if name not in names]
    if unknown:  # worded as Python words it for a function's unknown keyword
        raise TypeError(f"finetune() got an unexpected keyword argument {unknown[0]!r}")
    if options is not None and not isinstance(options, FinetuneOptions):
        raise TypeError(
            f"finetune(): options must be a FinetuneOptions, got {type(options).__name__} "
            "(pass batch_size and the other options by keyword)"
        )
    return dataclasses.replace(FinetuneOptions() if options is None else options, **overrides)


@dataclasses.dataclass(frozen=True)
class _Run:
    """What the steps of one `finetune` call share once its model is built."""

    options: FinetuneOptions
    output_dir: str
    strategy: tf.distribute.Strategy
    worker: workers.Worker
    plan: object
    steps_per_epoch: int
    epochs: int
    pipeline: PipelineOptions

    @property
    def one_hot(self):
        return bool(self.plan.mixup_alpha)

    @property
    def scratch_dir(self):
        return self.worker.scratch_dir(self.output_dir)

    @property
    def run_dir(self):
        return os.path.join(self.output_dir, RUN_DIR)

    @property
    def best_path(self):
        """The best model so far, moved to `output_dir/best.keras` at the end."""
        return os.path.join(self.run_dir, "best.keras")

    def training_pipeline(self, dataset, batch):
        return make_pipeline(dataset, self.plan, batch, training=True, one_hot=self.one_hot, options=self.pipeline)

    def evaluation_pipeline(self, dataset, batch):
        return make_pipeline(dataset, self.plan, batch, one_hot=self.one_hot, options=self.pipeline)


@dataclasses.dataclass(frozen=True)
class _Callbacks:
    """The callbacks of `model.fit`, in order, and those whose records outlive it."""

    all: list
    nan_guard: _StopOnNonFiniteLoss
    resume: _ResumeLog
    step_log: _StepLog
    journal: _RunJournal | None  # the chief's only


def _plan(train, options, source_side=None):
    overrides = options.plan_overrides or {}
    if options.schedule == "short":
        total_steps = options.steps or hyperrule_plan(train.num_examples, train.image_size).total_steps
        return short_run_plan(
            train.num_examples, train.image_size, total_steps, options.batch_size, source_side, **overrides
        )
    plan = hyperrule_plan(train.num_examples, train.image_size, batch_size=options.batch_size, **overrides)
    return plan if options.steps is None else plan.scaled_to(options.steps)


def _check_positive_int(name, value):
    if not (isinstance(value, numbers.Integral) and not isinstance(value, bool) and value > 0):
        raise ConfigError(f"{name} must be a positive int, got {value!r}")


@contextlib.contextmanager
def _naming_undecodable_examples(*datasets):
    """A decoding failure inside tf.data names only the op: find and name the example."""
    try:
        yield
    except (tf.errors.InvalidArgumentError, tf.errors.NotFoundError):
        for dataset in datasets:
            if dataset is not None:
                dataset.verify()  # raises ImageError naming the example that does not decode
        raise


def finetune(source, train, output_dir, validation=None, options=None, **overrides):
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
        options: how to train, a `FinetuneOptions`; default its defaults.
        **overrides: `FinetuneOptions` fields replacing those of `options` (`batch_size=32`).

    Returns:
        A `FinetuneResult` with the best model, the plan, the Keras history and the metrics
        written to `metrics.json`; on a worker that is not the chief, with the last model
        and `output_dir` None (it writes nothing).
    """
    options = _with_overrides(options, overrides)
    validation = _checked_data(train, validation)
    strategy = options.strategy or tf.distribute.get_strategy()
    worker = workers.worker_of(strategy)
    _refuse_completed_run(output_dir, options.overwrite)
    if train.num_examples < worker.count:
        raise DataError(f"{train.num_examples} training examples cannot be shared by {worker.count} workers")
    plan = _checked_plan(train, options, worker.count)  # before the slow load
    os.makedirs(worker.scratch_dir(output_dir), exist_ok=True)
    steps_per_epoch = math.ceil(plan.total_steps / options.epochs)
    epochs = math.ceil(plan.total_steps / steps_per_epoch)
    pipeline = PipelineOptions(
        preprocess=options.preprocess or Normalize(), random_flip=options.random_flip, seed=options.seed
    )
    model, plan = _build_model(source, train, plan, options, strategy)
    shortfall = learning_shortfall(plan)  # after the load: a bad checkpoint is the first thing said
    if shortfall:
        warnings.warn(shortfall, ShortScheduleWarning, stacklevel=2)  # at finetune's caller
    run = _Run(options, output_dir, strategy, worker, plan, steps_per_epoch, epochs, pipeline)
    train_ds, val_ds = _pipelines(run, train, validation)
    callbacks = _callbacks(run, monitor="val_accuracy" if val_ds is not None else "accuracy")
    history = _fit(run, model, (train_ds, val_ds), callbacks, (train, validation))
    metrics = _metrics(run, model, history, callbacks)
    if not worker.is_chief:
        shutil.rmtree(run.scratch_dir, ignore_errors=True)
        return FinetuneResult(model, plan, history.history, metrics, None)
    best = _write_outputs(run, validation, metrics)
    return FinetuneResult(best, plan, metrics["history"], metrics, output_dir)


def _checked_data(train, validation):
    """`validation` labelled by the training classes (which must be at least 2), or None."""
    if train.num_classes < 2:
        raise DataError(
            f"the training data has {train.num_classes} class {list(train.class_names)}: "
            "a classifier needs at least 2 classes to tell apart"
        )
    if validation is None:
        return None
    try:
        return validation.relabeled(train.class_names)
    except ValueError as e:
        raise DataError(f"validation data: {e} of the training data") from None


def _refuse_completed_run(output_dir, overwrite):
    in_progress = os.path.isdir(os.path.join(output_dir, RUN_DIR)) or os.path.isdir(os.path.join(output_dir, "backup"))
    if os.path.exists(os.path.join(output_dir, "metrics.json")) and not in_progress and not overwrite:
        raise CompletedRunError(
            f"{output_dir} holds a completed fine-tune (metrics.json, best.keras): pass overwrite=True "
            "(--overwrite) to train again, which replaces them once the new run completes, or choose another output"
        )


def _checked_plan(train, options, machines):
    """The plan of `train` and `options`, refused when one machine's share of a batch cannot fit
    in its memory (a mistyped `--batch-size` would otherwise spend minutes building a pipeline
    that cannot run)."""
    plan = _plan(train, options)
    share = math.ceil(plan.batch_size / machines)
    pixels = share * plan.crop_size**2 * 3 * 4  # the float32 input batch alone
    memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    if pixels > memory:
        raise ConfigError(
            f"batch_size {plan.batch_size}: one batch of {plan.crop_size}x{plan.crop_size} training images is "
            f"{pixels / 2**30:.1f} GiB of float32 pixels{' per machine' if machines > 1 else ''}, more than "
            f"this machine's {memory / 2**30:.1f} GiB of memory"
        )
    return plan


def _build_model(source, train, plan, options, strategy):
    """(`source`'s body with a new head for `train`'s classes, compiled under `strategy`, the plan):
    the short schedule's plan follows the resolution the source was trained at."""
    previous_policy = keras.config.dtype_policy()
    if options.mixed_precision:
        keras.config.set_dtype_policy(options.mixed_precision)
    try:
        donor, source_side = load_model_source(source)
        if options.schedule == "short" and source_side:
            plan = _plan(train, options, source_side)
        with strategy.scope():
            model = with_new_head(donor, id2label=train.id2label, freeze_backbone=options.freeze_backbone)
            one_hot = bool(plan.mixup_alpha)
            loss = (
                keras.losses.CategoricalCrossentropy(from_logits=True)
                if one_hot
                else keras.losses.SparseCategoricalCrossentropy(from_logits=True)
            )
            accuracy = (
                keras.metrics.CategoricalAccuracy("accuracy")
                if one_hot
                else keras.metrics.SparseCategoricalAccuracy("accuracy")
            )
            model.compile(optimizer=plan.optimizer(), loss=loss, metrics=[accuracy])
    finally:
        keras.config.set_dtype_policy(previous_policy)
    return model, plan


def _pipelines(run, train, validation):
    """The (training, validation or None) datasets of `fit`: under several workers each trains on
    its shard of `train`, and evaluates all of `validation` (collectives need the same number of
    batches on every worker)."""
    batch_size = run.options.batch_size
    train_ds = workers.distribute(run.strategy, run.training_pipeline, train, batch_size, shard=True)
    if validation is None:
        return train_ds, None
    return train_ds, workers.distribute(run.strategy, run.evaluation_pipeline, validation, batch_size, shard=False)


def _callbacks(run, monitor):
    """The callbacks that make the run resumable, guarded and recorded (`monitor` picks the best)."""
    backup_dir = os.path.join(run.scratch_dir, "backup")
    if not run.worker.is_chief:
        workers.take_chief_backup(os.path.join(run.output_dir, "backup"), backup_dir)
    nan_guard, resume, step_log = _StopOnNonFiniteLoss(), _ResumeLog(), _StepLog()
    journal = None
    if run.worker.is_chief:
        os.makedirs(run.run_dir, exist_ok=True)
        journal = _RunJournal(os.path.join(run.run_dir, "journal.json"), monitor, run.steps_per_epoch, step_log)
    # Callbacks run in this order at each hook. At an epoch's end the best model and the journal
    # are written before the backup: a kill in between leaves a journal ahead of the backup,
    # whose extra epoch the resumed run drops and runs again, never one behind it.
    callbacks = [_LearningRateLog()]  # the epoch's logs get the learning rate before they are recorded
    if run.worker.is_chief:
        # the best of earlier, interrupted parts of the run is the one to beat
        best_so_far = journal.record["best"] if os.path.exists(run.best_path) else None
        checkpoint = keras.callbacks.ModelCheckpoint(
            run.best_path, monitor=monitor, mode="max", save_best_only=True, initial_value_threshold=best_so_far
        )
        callbacks += [checkpoint, journal]  # the journal records the best after the checkpoint
    callbacks += [
        # double_checkpoint: a kill while the backup is being written leaves the previous one.
        # Epoch-end backups (written after on_epoch_end) resume at the next epoch; batch-level
        # ones restart the interrupted epoch, which _StopAtStep keeps within the plan.
        keras.callbacks.BackupAndRestore(
            backup_dir, save_freq=run.options.backup_every or "epoch", double_checkpoint=True
        ),
        resume,  # after BackupAndRestore, which restores the step in its on_train_begin
        nan_guard,
        _StopAtStep(run.plan.total_steps),
        step_log,
    ]
    return _Callbacks(callbacks, nan_guard, resume, step_log, journal)


def _fit(run, model, datasets, callbacks, examples):
    """`model.fit` on the (training, validation) `datasets`; a decoding failure names its example
    among the `examples` they were made from."""
    train_ds, val_ds = datasets
    verbose = run.options.verbose
    if verbose == "auto":  # Keras draws its bar with \r and ANSI codes on any Linux stdout, files too
        verbose = 1 if sys.stdout.isatty() or "ipykernel" in sys.modules else 2
    with _naming_undecodable_examples(*examples):
        history = model.fit(
            train_ds,
            epochs=run.epochs,
            steps_per_epoch=run.steps_per_epoch,
            validation_data=val_ds,
            callbacks=callbacks.all,
            verbose=verbose,
            shuffle=False,
        )
    if callbacks.nan_guard.failure:
        raise NonFiniteLossError(
            f"{callbacks.nan_guard.failure}; training stopped. Lower the learning rate "
            "(plan_overrides={'base_lr': ...}) or check the input data"
        )
    return history


def _metrics(run, model, history, callbacks):
    """What `metrics.json` records, the chief's journal covering every part of an interrupted run."""
    journal, step_log = callbacks.journal, callbacks.step_log
    return {
        "plan": run.plan.to_dict(),
        "steps_per_epoch": run.steps_per_epoch,
        "epochs": run.epochs,
        "history": journal.history()
        if journal
        else {k: [float(v) for v in vals] for k, vals in history.history.items()},
        "num_replicas": _num_replicas(run.strategy),
        "num_workers": run.worker.count,
        "resumed_from_step": callbacks.resume.start_step,
        "final_step": int(model.optimizer.iterations.numpy()),
        "schedule": run.options.schedule,
        "total_learning": run.plan.total_learning(),
        "steps": journal.record["steps"]
        if journal
        else {"step": step_log.steps, "loss": step_log.losses, "seconds": step_log.seconds},
    }


def _write_outputs(run, validation, metrics):
    """The chief's files (see the module), `metrics` completed with the best model's validation
    results; returns the best model."""
    best_path = os.path.join(run.output_dir, "best.keras")
    os.replace(run.best_path, best_path)
    best = keras.saving.load_model(best_path)
    if validation is not None:
        # the best model outside the strategy: evaluated here, on the chief's own pipeline
        val_ds = run.evaluation_pipeline(validation, run.options.batch_size)
        with _naming_undecodable_examples(validation):
            results = best.evaluate(val_ds, verbose=0, return_dict=True)
        metrics["validation"] = {k: float(v) for k, v in results.items()}
    with open(os.path.join(run.output_dir, "metrics.json"), "w", encoding="utf-8") as f:
        json.dump(metrics, f, indent=2)
    best.config.save_pretrained(run.output_dir)
    _write_preprocessor(run.output_dir, run.plan.crop_size, run.pipeline.preprocess)
    curve = os.path.join(run.output_dir, "training_curve.png")
    _plot(metrics["steps"], metrics["history"], run.plan, run.steps_per_epoch, curve)
    shutil.rmtree(run.run_dir, ignore_errors=True)  # the run is complete: nothing to resume
    return best


def _num_replicas(strategy):
    """Replicas the global batch is split across: the batch axis of a keras.distribution (JAX),
    else the tf.distribute strategy's."""
    distribution = keras.distribution.distribution()
    if distribution is None:
        return strategy.num_replicas_in_sync
    mesh = distribution.device_mesh
    return mesh.shape[mesh.axis_names.index(distribution.batch_dim_name)]


def _write_preprocessor(output_dir, crop_size, preprocess):
    """The evaluation preprocessing as an HF preprocessor_config.json (resize straight to crop)."""
    from tfbit.preprocessing.processor import BitImageProcessor

    mean = getattr(preprocess, "mean", 0.5)
    std = getattr(preprocess, "std", 0.5)
    BitImageProcessor(
        size={"height": crop_size, "width": crop_size},
        do_center_crop=False,
        image_mean=list(np.broadcast_to(mean, 3).astype(float)),
        image_std=list(np.broadcast_to(std, 3).astype(float)),
        resample=2,
    ).save_pretrained(output_dir)
