"""`load_model`: any supported checkpoint or `.keras` file as the tfbit model of a task."""

import os

from tfbit.config import BitConfig, read_json
from tfbit.models import BitBackbone, BitForImageClassification, BitModel, copy_weights
from tfbit.presets import is_preset
from tfbit.weights import Checkpoint, detect_format, read_checkpoint, read_preset
from tfbit.weights.hf import PREPROCESSOR_FILE

TASKS = ("classification", "features", "backbone")


def _for_task(config, task):
    if task != "backbone":
        return config
    return BitConfig.from_dict(dict(config.to_dict(), out_features=config.stage_names[1:], out_indices=None))


def _model_class(task, has_head):
    if task == "backbone":
        return BitBackbone
    return BitForImageClassification if task == "classification" and has_head else BitModel


def _read_keras(path):
    """A `.keras` model as a `Checkpoint` (its weights are a model already); the preprocessing
    is read from the `preprocessor_config.json` beside it, when there is one."""
    import keras
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no .keras file at {path}")
    try:
        saved = keras.saving.load_model(path)
    except Exception as e:  # keras raises many types for a zip that is not a model
        raise ValueError(f"{path} is not a loadable .keras model: {type(e).__name__}: {e}") from None
    if not isinstance(getattr(saved, "config", None), BitConfig):
        raise ValueError(f"{path} holds a {type(saved).__name__}, not a tfbit BiT model")
    beside = os.path.join(os.path.dirname(os.path.abspath(path)), PREPROCESSOR_FILE)
    preprocessor = read_json(beside) if os.path.isfile(beside) else None
    files = (path, beside) if preprocessor else (path,)
    name = os.path.splitext(os.path.basename(path))[0]
    return saved, Checkpoint("keras", name, path, saved.config, {}, [], 0, preprocessor, files)


def _load_keras(path, task, config):
    saved, checkpoint = _read_keras(path)
    config = _for_task(config or saved.config, task)
    has_head = isinstance(saved, BitForImageClassification)
    model = _model_class(task, has_head)(config, standardize_weights=saved.standardize_weights)
    if type(model) is type(saved) and model.config == saved.config:
        return saved, checkpoint
    missing = copy_weights(saved, model)
    if missing:
        raise ValueError(f"{path} has no weights for {missing[0]} needed by task {task!r}")
    return model, checkpoint


def load_model(source, task="classification", format=None, config=None):
    """(model, `Checkpoint`) for `source`, as the model class of `task`.

    Args:
        source: anything `tfbit.weights.read_checkpoint` reads, a tfbit `.keras` file, or a
            preset name (`tfbit.presets()`; a local path of the same name wins).
        task: "classification" (`BitForImageClassification`; a headless checkpoint gives a
            `BitModel`), "features" (`BitModel`) or "backbone" (`BitBackbone` returning every
            stage after the stem).
        format: a `tfbit.weights.FORMATS` name to skip format detection.
        config: a `BitConfig` replacing the stored or inferred one.
    """
    if task not in TASKS:
        raise ValueError(f"task={task!r} is not one of {', '.join(TASKS)}")
    source = os.fspath(source)
    if format is None and is_preset(source) and not os.path.exists(source):
        checkpoint = read_preset(source)
    elif detect_format(source, format) == "keras":
        return _load_keras(source, task, config)
    else:
        checkpoint = read_checkpoint(source, format)
    config = _for_task(config or checkpoint.config, task)
    model = _model_class(task, checkpoint.has_head and config.num_labels > 0)(config)
    return checkpoint.load_into(model), checkpoint
