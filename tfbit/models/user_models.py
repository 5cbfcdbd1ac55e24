"""Models users build on tfbit, as tfbit's exports see them: a tfbit model or tfbit layers
inside the user's own Functional or Sequential model (their head, Dropout, `BitPreprocessing`,
Rescaling, ...), one image input, one or more outputs. tfbit's own model classes are the
simplest such models, so every function here takes them too.

- `split_preprocessing`: a `BitPreprocessing` layer right after the input becomes the
  export's preprocessing (the serving graph's, the converter's and predict's); the rest of the
  model takes pixel values, as every exported graph does.
- `task_outputs`: a model's outputs named as an export task names them (`logits`,
  `features`, or one per output for `backbone`), checked by `check_task` with a message
  that says which task fits instead.
- `bit_body` and `output_labels`: the tfbit model inside, whose config describes the body,
  and the labels of a classifier's output.
"""

import keras

from tfbit.errors import ConfigError, ModelError
from tfbit.models.config import BitConfig

TASKS = ("classification", "features", "backbone")


def _nested_layers(model):
    for layer in model.layers:
        yield layer
        if isinstance(layer, keras.Model):
            yield from _nested_layers(layer)


def is_tfbit(layer):
    return (keras.saving.get_registered_name(type(layer)) or "").startswith("tfbit>")


def bit_body(model):
    """`model` itself when it is a tfbit model, else the first tfbit model inside it (at any
    depth), or None when it holds tfbit layers only."""
    if isinstance(getattr(model, "config", None), BitConfig):
        return model
    return next(
        (layer for layer in _nested_layers(model) if isinstance(getattr(layer, "config", None), BitConfig)), None
    )


def check_built_on_tfbit(model, what):
    """ModelError unless `model` is or holds a tfbit model or layer, and has one image input."""
    if not (is_tfbit(model) or any(is_tfbit(layer) for layer in _nested_layers(model))):
        raise ModelError(
            f"{what} holds a {type(model).__name__} with no tfbit model or layer inside: tfbit "
            "converts BiT models and Keras models built on them"
        )
    if len(model.inputs) != 1 or len(model.inputs[0].shape) != 4:
        shapes = [tuple(i.shape) for i in model.inputs]
        raise ModelError(
            f"{what}: the model takes {len(shapes)} input(s) {shapes}; tfbit exports models "
            "with one image input (batch, height, width, channels)"
        )


def split_preprocessing(model):
    """(BitImageProcessor or None, the model from pixel values on).

    A `BitPreprocessing` layer applied to the model's input is the export's preprocessing; the
    model returned starts at its output (float32 pixel values of the processor's crop size).
    Anywhere else it cannot be taken out: ModelError naming the layer.
    """
    from tfbit.preprocessing.layer import BitPreprocessing

    found = [layer for layer in _nested_layers(model) if isinstance(layer, BitPreprocessing)]
    if not found:
        return None, model
    layer = found[0]
    first = isinstance(model, keras.Sequential) and model.layers[0] is layer
    if len(found) > 1 or layer not in model.layers or not (first or layer.input is model.inputs[0]):
        raise ModelError(
            f"BitPreprocessing layer {layer.name!r} of {model.name} is not applied to the "
            "model's input: exports move the preprocessing into the serving graph only when "
            "one BitPreprocessing layer takes the model's input directly"
        )
    pixels = layer.compute_output_shape(tuple(model.inputs[0].shape))
    if first:  # a reloaded Sequential's layers have more than one graph node: rebuild it
        return layer.processor, keras.Sequential([keras.Input(pixels[1:]), *model.layers[1:]], name=model.name)
    outputs = model.outputs[0] if len(model.outputs) == 1 else model.output
    return layer.processor, keras.Model(layer.output, outputs, name=model.name)


def computes_in_float32(model):
    """Whether every layer computes in float32 (not a mixed-precision model, whose exports can
    only be close to it, not equal)."""
    return all(layer.compute_dtype == "float32" for layer in [model, *_nested_layers(model)])


def _output_names(model):
    if len(model.outputs) > 1 and isinstance(model.output, dict):
        return sorted(model.output)  # the order Keras flattens a dict of outputs in
    names = list(getattr(model, "output_names", None) or [])
    if len(set(names)) != len(names) or len(names) != len(model.outputs):
        names = [f"output_{i}" for i in range(len(model.outputs))]
    return names


def output_shapes(model):
    """["name (shape)", ...] of the model's outputs, for messages."""
    return [f"{name} {tuple(t.shape)}" for name, t in zip(_output_names(model), model.outputs)]


def check_task(model, task, what):
    """ModelError unless `task` fits the outputs of `model` (pixel values -> outputs); ConfigError
    for an unknown task."""
    if task not in TASKS:
        raise ConfigError(f"task={task!r} is not one of {', '.join(TASKS)}")
    outputs = model.output if len(model.outputs) > 1 else model.outputs[0]
    if task == "backbone":
        return
    if isinstance(outputs, dict) and task == "features" and "pooler_output" in outputs:
        return
    if len(model.outputs) == 1 and len(model.outputs[0].shape) == 2:
        return
    single = "one (batch, classes) output" if task == "classification" else "one (batch, features) output"
    raise ModelError(
        f"{what} has the outputs {', '.join(output_shapes(model))}: task {task!r} needs {single}; "
        "task 'backbone' exports every output under its name"
    )


def task_outputs(model, outputs, task):
    """`outputs` (what calling `model` returned) as the export of `task` names them:
    {"logits"}, {"features"} or {name: tensor} for every output (`backbone`)."""
    if isinstance(outputs, (list, tuple)) and len(outputs) == 1:
        outputs = outputs[0]
    if task == "backbone":
        if isinstance(outputs, dict):
            return dict(outputs)
        if isinstance(outputs, (list, tuple)):
            return dict(zip(_output_names(model), outputs))
        return {_output_names(model)[0]: outputs}
    if isinstance(outputs, dict):
        outputs = outputs["pooler_output"] if "pooler_output" in outputs else next(iter(outputs.values()))
    return {"logits" if task == "classification" else "features": outputs}


def output_labels(model, id2label=None):
    """{id: label} of a classifier's output: `id2label` when given (its size must match), else
    those of the tfbit classifier inside when its head has as many classes (a model wrapping
    it), else LABEL_<i> (a body's config names the classes of a head the model does not use)."""
    from tfbit.models.bit import BitForImageClassification

    width = model.outputs[0].shape[-1]
    if id2label is not None:
        if len(id2label) != width:
            raise ConfigError(f"{len(id2label)} labels given, but the model's output has {width} classes")
        return dict(id2label)
    body = bit_body(model)
    if isinstance(body, BitForImageClassification) and body.config.num_labels == width:
        return dict(body.config.id2label)
    return {i: f"LABEL_{i}" for i in range(width)}


def export_config(model, id2label=None):
    """The config.json of an export: the tfbit body's architecture (transformers' defaults when
    the model holds tfbit layers only) with the labels of the model's output."""
    body = bit_body(model)
    config = body.config.to_dict() if body is not None else BitConfig().to_dict()
    if id2label is None:
        return BitConfig.from_dict(config)
    return BitConfig.from_dict(
        {**config, "id2label": {int(i): v for i, v in id2label.items()}, "label2id": None, "num_labels": None}
    )


def read_labels(path):
    """{id: label} of a labels file: one label per line, in the order of the output's classes."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = [line.rstrip("\r\n") for line in f]
    except OSError as e:
        raise ConfigError(f"--labels {path}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"--labels {path}: not UTF-8 text (one label per line)") from None
    while lines and not lines[-1].strip():
        lines.pop()
    empty = [i + 1 for i, line in enumerate(lines) if not line.strip()]
    if not lines or empty:
        raise ConfigError(
            f"--labels {path}: "
            + (f"line {empty[0]} is empty" if empty else "the file is empty")
            + " (one label per line)"
        )
    return dict(enumerate(lines))
