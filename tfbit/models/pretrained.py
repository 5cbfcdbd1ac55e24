"""`load_model`: any supported checkpoint or `.keras` file as the tfbit model of a task."""

import os

from tfbit.errors import CheckpointError, ConfigError, MissingFileError, ModelError
from tfbit.models import user_models
from tfbit.models.bit import BitBackbone, BitForImageClassification, BitModel, copy_weights
from tfbit.models.config import BitConfig
from tfbit.models.presets import is_preset
from tfbit.preprocessing.processor import read_config
from tfbit.weights import Checkpoint, detect_format, read_checkpoint, read_preset
from tfbit.weights.hf import PREPROCESSOR_FILE

TASKS = ("classification", "features", "backbone")


def _for_task(config, task, out_features=None):
    """The config of the task's model class: a backbone returns the stages `out_features`
    names, or the config's own (transformers' rule: the last stage unless it says otherwise)."""
    if task != "backbone" or out_features is None:
        return config
    return BitConfig.from_dict(dict(config.to_dict(), out_features=list(out_features), out_indices=None))


def _model_class(task, has_head):
    if task == "backbone":
        return BitBackbone
    return BitForImageClassification if task == "classification" and has_head else BitModel


def _read_keras(path):
    """A `.keras` model as a `Checkpoint` (its weights are a model already); the preprocessing
    is read from the `preprocessor_config.json` beside it, when there is one. A model a user
    built on tfbit keeps its own class; the checkpoint's config is its tfbit body's."""
    import keras

    if not os.path.isfile(path):
        raise MissingFileError(f"no .keras file at {path}")
    try:
        saved = keras.saving.load_model(path)
    except Exception as e:  # keras raises many types for a zip that is not a model
        unknown = _unknown_classes(path)
        if unknown:
            name, registered = unknown[0]
            raise CheckpointError(
                f"{path} uses the layer class {name} (registered as {registered!r}), which this process "
                "does not know: convert it from Python after importing the module that defines it "
                f"(conversion.convert.convert({path!r}, ...))"
            ) from None
        raise CheckpointError(f"{path} is not a loadable .keras model: {type(e).__name__}: {e}") from None
    if not isinstance(getattr(saved, "config", None), BitConfig):
        user_models.check_built_on_tfbit(saved, path)
    beside = os.path.join(os.path.dirname(os.path.abspath(path)), PREPROCESSOR_FILE)
    preprocessor = read_config(beside) if os.path.isfile(beside) else None
    files = (path, beside) if preprocessor else (path,)
    name = os.path.splitext(os.path.basename(path))[0]
    config = user_models.export_config(saved)
    return saved, Checkpoint("keras", name, path, config, {}, [], 0, preprocessor, files)


def _unknown_classes(path):
    """[(class name, registered name)] of the custom classes a `.keras` file's config names that
    no module imported here has registered with Keras (their code is not in the file)."""
    import json
    import zipfile

    import keras

    try:
        with zipfile.ZipFile(path) as archive:
            config = json.loads(archive.read("config.json"))
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return []
    found = []

    def visit(node):
        if isinstance(node, dict):
            registered = node.get("registered_name")
            if (
                isinstance(registered, str)
                and ">" in registered
                and keras.saving.get_registered_object(registered) is None
            ):
                found.append((node.get("class_name"), registered))
            for value in node.values():
                visit(value)
        elif isinstance(node, list):
            for value in node:
                visit(value)

    visit(config)
    return list(dict.fromkeys(found))


def _load_keras(path, task, config, out_features):
    saved, checkpoint = _read_keras(path)
    if not isinstance(getattr(saved, "config", None), BitConfig):  # a user's model: as it is
        if config is not None or out_features is not None:
            raise ModelError(
                f"{path} holds a {type(saved).__name__} built on tfbit: it is exported as it is, "
                "so a replacement config or out_features does not apply"
            )
        return saved, checkpoint
    config = _for_task(config or saved.config, task, out_features)
    has_head = isinstance(saved, BitForImageClassification)
    model = _model_class(task, has_head)(config, standardize_weights=saved.standardize_weights)
    if type(model) is type(saved) and model.config == saved.config:
        return saved, checkpoint
    missing = copy_weights(saved, model)
    if missing:
        raise CheckpointError(f"{path} has no weights for {missing[0]} needed by task {task!r}")
    return model, checkpoint


def load_model(source, task="classification", format=None, config=None, out_features=None):
    """(model, `Checkpoint`) for `source`, as the model class of `task`.

    Args:
        source: anything `tfbit.weights.read_checkpoint` reads, a tfbit `.keras` file, or a
            preset name (`tfbit.presets()`; a local path of the same name wins).
        task: "classification" (`BitForImageClassification`; a headless checkpoint gives a
            `BitModel`), "features" (`BitModel`) or "backbone" (`BitBackbone` returning the
            stages of the config's `out_features`: the last one unless the checkpoint says).
            A `.keras` file of a model a user built on tfbit loads as that model, whatever
            the task (`tfbit.models.user_models.check_task` tells which tasks its outputs fit).
        format: a `tfbit.weights.FORMATS` name to skip format detection.
        config: a `BitConfig` replacing the stored or inferred one.
        out_features: the stages a backbone returns (e.g. ["stage2", "stage4"]), replacing
            the config's.
    """
    if task not in TASKS:
        raise ConfigError(f"task={task!r} is not one of {', '.join(TASKS)}")
    source = os.fspath(source)
    if format is None and is_preset(source) and not os.path.exists(source):
        checkpoint = read_preset(source)
    elif detect_format(source, format) == "keras":
        return _load_keras(source, task, config, out_features)
    else:
        checkpoint = read_checkpoint(source, format)
    config = _for_task(config or checkpoint.config, task, out_features)
    model = _model_class(task, checkpoint.has_head and config.num_labels > 0)(config)
    return checkpoint.load_into(model), checkpoint
