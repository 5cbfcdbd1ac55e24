"""Transfer a pretrained BiT to new labels: new zero-initialized head, optional frozen body, HF loss."""

import keras

from tfbit.errors import ConfigError, ModelError
from tfbit.models.bit import BitForImageClassification, copy_weights
from tfbit.models.config import BitConfig


def with_new_head(model, num_labels=None, id2label=None, freeze_backbone=False):
    """A `BitForImageClassification` with `model`'s body and a fresh head for new labels.

    The head starts at zero, as in the BiT paper (the first steps then only see the body's
    features, and any number of classes starts from uniform predictions). Build it inside a
    `tf.distribute` strategy scope to train it distributed.

    Args:
        model: any tfbit model holding the whole body (classifier, `BitModel`, or a
            `BitBackbone` of the same config).
        num_labels: number of new labels, named "LABEL_<i>"; used when `id2label` is None.
        id2label: {id: name} of the new labels.
        freeze_backbone: make every layer but the head non-trainable.
    """
    if id2label is None:
        if num_labels is None:
            raise ConfigError("with_new_head needs num_labels or id2label")
        id2label = {i: f"LABEL_{i}" for i in range(num_labels)}
    config = BitConfig.from_dict(
        {**model.config.to_dict(), "id2label": dict(id2label), "label2id": None, "num_labels": None}
    )
    if config.num_labels < 1:
        raise ConfigError(f"a classifier needs at least one label, got {config.num_labels}")
    new = BitForImageClassification(config, standardize_weights=model.standardize_weights)
    missing = copy_weights(model, new, skip=("classifier",))
    if missing:
        raise ModelError(
            f"{model.name} has no layer {missing[0]!r}: it does not hold the whole "
            "BiT body (a backbone built with fewer out_features?)"
        )
    head = new.get_layer("classifier")
    for weight in (head.kernel, head.bias):
        # from shape and dtype: the JAX backend cannot take a Keras Variable as an array
        weight.assign(keras.ops.zeros(weight.shape, weight.dtype))
    for layer in new.layers:
        if layer is not head:
            layer.trainable = not freeze_backbone
    return new


def classification_loss(labels, logits, num_labels=None, problem_type=None):
    """The loss transformers' BitForImageClassification computes when given labels.

    Args:
        labels: integer class ids, float multi-hot vectors, or regression targets.
        logits: the model's (batch, num_labels) output.
        num_labels: defaults to the width of `logits`.
        problem_type: "regression", "single_label_classification" or
            "multi_label_classification" (as in HF configs); by default chosen like HF:
            regression for one label, single-label for integer labels, multi-label (sigmoid
            cross-entropy) for float labels.
    """
    num_labels = num_labels or logits.shape[-1]
    if problem_type is None:
        if num_labels == 1:
            problem_type = "regression"
        elif "int" in str(keras.ops.dtype(labels)):
            problem_type = "single_label_classification"
        else:
            problem_type = "multi_label_classification"
    if problem_type == "regression":
        return keras.ops.mean(
            keras.ops.square(
                keras.ops.reshape(logits, (-1,)) - keras.ops.cast(keras.ops.reshape(labels, (-1,)), logits.dtype)
            )
        )
    if problem_type == "single_label_classification":
        return keras.ops.mean(keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True))
    if problem_type == "multi_label_classification":
        return keras.ops.mean(
            keras.ops.binary_crossentropy(keras.ops.cast(labels, logits.dtype), logits, from_logits=True)
        )
    raise ConfigError(
        f"unknown problem_type {problem_type!r}: use regression, single_label_classification "
        "or multi_label_classification"
    )
