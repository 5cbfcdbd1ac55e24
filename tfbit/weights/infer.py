"""The architecture of a config-less checkpoint (timm state dict, original .npz), from the
shapes of its weights."""

import re

import numpy as np

from tfbit.models.config import BitConfig
from tfbit.weights.checkpoint import TRANSFORMS, CheckpointError, map_keys

_UNIT_TARGET = re.compile(r"stage(\d+)_unit(\d+)_.+")


def infer_config(tensors, table, index_base=0, source="checkpoint", labels=None, **fields):
    """The pre-activation `BitConfig` whose weights have the shapes of `tensors` (mapped by
    `table`).

    Args:
        tensors: `{key: array}` of the checkpoint.
        table: its mapping table (see `tfbit.weights.checkpoint`).
        index_base: the checkpoint's first stage/unit number.
        source: what to name in error messages.
        labels: class names, used when their count matches the head.
        **fields: further `BitConfig` fields the format implies (e.g. `ws_eps`).

    Depths, stem and stage widths, input channels and head size come from the shapes; sizes
    are absolute (width_factor 1); no head gives num_labels 0.
    """
    shapes = _target_shapes(tensors, table, index_base, source)
    shape_of = _shape_reader(shapes, table, source)
    _, _, num_channels, stem = shape_of("stem_conv/kernel", 4, "stem convolution kernel")
    units = _units_by_stage(shapes, source)
    stages = sorted(units)
    hidden_sizes = [shape_of(f"stage{s}_unit1_conv3/kernel", 4, f"last conv of stage {s} unit 1")[-1] for s in stages]
    num_labels = shape_of("classifier/kernel", 2, "classifier kernel")[-1] if "classifier/kernel" in shapes else 0
    known = labels is not None and len(labels) == num_labels > 0
    try:
        return BitConfig(
            num_channels=num_channels,
            embedding_size=stem,
            hidden_sizes=hidden_sizes,
            depths=[len(units[s]) for s in stages],
            layer_type="preactivation",
            global_padding=None,
            num_groups=32,
            num_labels=None if known else num_labels,
            id2label=dict(enumerate(labels)) if known else None,
            **fields,
        )
    except ValueError as e:
        raise CheckpointError(f"{source}: the inferred architecture is not a valid BiT: {e}") from None


def _target_shapes(tensors, table, index_base, source):
    """{tfbit weight: (checkpoint key, shape in tfbit's layout)} of every mapped key."""
    mapped, _ = map_keys(tensors, table, index_base)
    if not mapped:
        raise CheckpointError(
            f"{source} is not a BiT checkpoint of this format: none of its "
            f"{len(tensors)} keys is a BiT weight (keys look like: "
            f"{', '.join(sorted(tensors)[:3])})"
        )
    shapes, bad = {}, []
    for key, (target, transform) in mapped.items():
        try:
            shapes[target] = (key, TRANSFORMS[transform](np.asarray(tensors[key])).shape)
        except ValueError:
            bad.append(f"{key}: shape {np.shape(tensors[key])} cannot be {target}")
    if bad:
        raise CheckpointError(f"{source} has wrongly shaped keys: " + "; ".join(bad))
    return shapes


def _shape_reader(shapes, table, source):
    """`shape_of(target, ndim, what)`: the shape of a weight the architecture needs, or an
    error naming the checkpoint key pattern that would have held it."""
    expected = {template: pattern for pattern, template, _ in table}

    def shape_of(target, ndim, what):
        if target not in shapes:
            hint = f"a key matching {expected[target]!r}" if target in expected else f"tfbit weight {target}"
            raise CheckpointError(f"{source}: cannot infer the architecture, there is no {what} ({hint})")
        key, shape = shapes[target]
        if len(shape) != ndim:
            raise CheckpointError(f"{source}: {key} has shape {shape}, expected a {ndim}-D {what}")
        return shape

    return shape_of


def _units_by_stage(shapes, source):
    """{stage: {unit: checkpoint key}}, both numbered contiguously from 1 (tfbit numbering)."""
    units = {}
    for target, (key, _) in shapes.items():
        m = _UNIT_TARGET.fullmatch(target)
        if m:
            units.setdefault(int(m[1]), {})[int(m[2])] = key
    stages = sorted(units)
    if not stages or stages != list(range(1, len(stages) + 1)):
        raise CheckpointError(
            f"{source}: stages {stages} are not numbered contiguously from 1 (tfbit numbering): not a BiT ResNetV2"
        )
    for s in stages:
        if sorted(units[s]) != list(range(1, len(units[s]) + 1)):
            keys = ", ".join(units[s][u] for u in sorted(units[s]))
            raise CheckpointError(
                f"{source}: the units of stage {s} are {sorted(units[s])} (tfbit "
                f"numbering), not contiguous: a unit is missing (keys: {keys})"
            )
    return units
