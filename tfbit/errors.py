"""The exceptions tfbit raises for input it refuses, with the messages the command lines print
(`error: <message>`, exit code 2; README "Exit codes and errors").

Every class derives from `TfbitError` and from the built-in exception tfbit raised before it had
its own (ValueError, FileNotFoundError, OSError, FloatingPointError), so `except ValueError`
still catches a bad config.json. Wrong argument types in a Python call (a programming error,
not bad input) stay `TypeError`. The command lines add their own: `conversion.convert.ConversionError`,
`conversion.publish.OutputError`, `conversion.diskspace.InsufficientSpace` and
`conversion.export.VariantError` derive from `TfbitError` too.

This module imports nothing: the command lines load it before TensorFlow (`conversion/__init__.py`).
"""


class TfbitError(Exception):
    """Base of every exception tfbit raises for input, files or settings it refuses."""


class ConfigError(TfbitError, ValueError):
    """A setting is invalid: a `config.json` or `preprocessor_config.json` (not JSON, or a field
    of the wrong kind or range), a `BitConfig` or `BitImageProcessor` argument, a task, format or
    preset name, a `--labels` file, or a fine-tuning option or `TF_CONFIG` that cannot work."""


class CheckpointError(TfbitError, ValueError):
    """A checkpoint or `.keras` file cannot be read, is not a BiT checkpoint, or does not fit the
    model (missing, unexpected, wrongly shaped or non-float keys: the message names every one)."""


class ModelError(TfbitError, ValueError):
    """A Keras model or layer cannot be used as asked: a model with no tfbit layer inside, not one
    image input, outputs that do not fit the task, a layer whose config does not rebuild it."""


class ImageError(TfbitError, ValueError):
    """An image cannot be read or preprocessed: not a JPEG/PNG/GIF/BMP, damaged or truncated
    data, too many pixels, or an array of the wrong shape or value range. The message names the
    file and gives the serving graph's own reason."""


class DataError(TfbitError, ValueError):
    """Fine-tuning data that cannot train a classifier: an image folder without class folders or
    images, fewer than 2 classes, arrays and labels that do not match, a tfds dataset without the
    feature, validation classes that the training data lacks."""


class CompletedRunError(TfbitError, ValueError):
    """The fine-tuning output folder holds a completed run, which a new run would replace; pass
    `overwrite=True` (`--overwrite`) or choose another output."""


class NonFiniteLossError(TfbitError, FloatingPointError):
    """Fine-tuning stopped because the training loss became NaN or infinite (the message gives
    the step)."""


class FileError(TfbitError, OSError):
    """A file cannot be read or written (no permission, a symbolic link loop, a write that does
    not read back); the message names it with the system's reason."""


class MissingFileError(FileError, FileNotFoundError):
    """A file, folder, hub repo or preset download tfbit needs is not there (or not reachable
    offline); the message names what was looked for."""


__all__ = [
    "TfbitError",
    "ConfigError",
    "CheckpointError",
    "ModelError",
    "ImageError",
    "DataError",
    "CompletedRunError",
    "NonFiniteLossError",
    "FileError",
    "MissingFileError",
]
