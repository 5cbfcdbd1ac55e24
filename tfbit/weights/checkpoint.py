"""Assign a foreign checkpoint (a flat {key: array} dict) to a tfbit model through a mapping table.

A table is a list of `(source_regex, target_template, transform)`: the regex matches a whole
source key, its named groups `s` (stage) and `u` (unit) are converted to tfbit's 1-based
numbering, and the template names the Keras weight (`stage{s}_unit{u}_conv1/kernel`).
Every key is either used or reported, every model weight is either filled or reported.
"""

import dataclasses
import re

import numpy as np

# defined in tfbit.errors, importable from here as before (tfbit.weights.checkpoint.CheckpointError)
from tfbit.errors import CheckpointError

TRANSFORMS = {
    None: lambda a: a,
    "oihw_to_hwio": lambda a: np.transpose(a, (2, 3, 1, 0)),  # torch conv kernel
    "linear": lambda a: np.transpose(a),  # torch Linear (out, in)
    "conv1x1_to_linear": lambda a: a.reshape(a.shape[-2:]),  # (1, 1, in, out) head
    "oi11_to_linear": lambda a: np.transpose(a.reshape(a.shape[:2])),  # (out, in, 1, 1) head
}

_LIST_LIMIT = 8


def _listing(title, items):
    items = list(items)
    shown = "\n".join(f"    {item}" for item in items[:_LIST_LIMIT])
    more = f"\n    ... and {len(items) - _LIST_LIMIT} more" if len(items) > _LIST_LIMIT else ""
    return f"  {title} ({len(items)}):\n{shown}{more}"


def map_keys(keys, table, index_base=0):
    """Return ({source_key: (target, transform)}, [unmapped keys])."""
    compiled = [(re.compile(pattern), template, transform) for pattern, template, transform in table]
    mapped, unmapped = {}, []
    for key in keys:
        for pattern, template, transform in compiled:
            m = pattern.fullmatch(key)
            if m:
                groups = {k: (int(v) + 1 - index_base if k in ("s", "u") else v) for k, v in m.groupdict().items()}
                mapped[key] = (template.format(**groups), transform)
                break
        else:
            unmapped.append(key)
    return mapped, unmapped


def assign_checkpoint(model, tensors, table, *, source, index_base=0, unused=lambda target: False):
    """Copy `tensors` into `model` via `table`; raise CheckpointError listing every problem.

    `unused(target)` says which mapped weights the model legitimately lacks (the classifier
    of a classification checkpoint loaded into `BitModel`, say); they are skipped.
    """
    variables = {v.path: v for v in model.weights}
    mapped, unexpected = map_keys(tensors, table, index_base)
    if tensors and not mapped:
        example = ", ".join(sorted(tensors)[:3])
        raise CheckpointError(
            f"{source} is not a BiT checkpoint: none of its {len(tensors)} keys "
            f"is a BiT weight (keys look like: {example})"
        )
    problems, mismatched, bad_values, filled, offered, values = [], [], [], set(), set(), {}
    for key, (target, transform) in mapped.items():
        if target not in variables:
            if not unused(target):
                unexpected.append(f"{key} (-> {target}, not in this model)")
            continue
        offered.add(target)  # a key for it, listed below when it cannot be used: not missing
        array = np.asarray(tensors[key])
        if not np.issubdtype(array.dtype, np.floating):
            bad_values.append(f"{key}: dtype {array.dtype}, expected a float type")
            continue
        array = TRANSFORMS[transform](array)
        expected = tuple(variables[target].shape)
        if array.shape != expected:
            mismatched.append(f"{key}: shape {tuple(array.shape)} (as {target}), model expects {expected}")
            continue
        if not np.all(np.isfinite(array)):
            bad_values.append(f"{key}: contains NaN or infinite values")
            continue
        if target in filled:
            unexpected.append(f"{key} (-> {target}, already filled by another key)")
            continue
        filled.add(target)
        values[target] = array
    missing = sorted(set(variables) - filled - offered)
    for title, items in (
        ("unexpected keys", unexpected),
        ("missing weights", missing),
        ("wrongly shaped keys", mismatched),
        ("bad values", bad_values),
    ):
        if items:
            problems.append(_listing(title, items))
    if problems:
        raise CheckpointError(f"{source} does not fit {model.name}:\n" + "\n".join(problems))
    for target, array in values.items():
        variables[target].assign(array.astype(variables[target].dtype))
    return model


@dataclasses.dataclass
class Checkpoint:
    """A checkpoint as read from disk or the hub, before it is put into a model.

    `config` is the stored architecture (transformers) or the one inferred from the weight
    shapes (timm, .npz); `preprocessor` the source's evaluation preprocessing as a
    `preprocessor_config.json` dict (None when the checkpoint does not say); `files` every file
    read, so that writers can refuse to touch them.
    """

    format: str
    name: str
    path: str
    config: object
    tensors: dict
    table: list
    index_base: int = 0
    preprocessor: dict | None = None
    files: tuple = ()

    @property
    def has_head(self):
        """Whether the checkpoint holds a classifier (transformers writes 2 labels even without one)."""
        mapped, _ = map_keys(self.tensors, self.table, self.index_base)
        return any(target.startswith("classifier/") for target, _ in mapped.values())

    def load_into(self, model):
        """Copy the weights into `model` (any tfbit model class of a compatible config)."""
        return assign_checkpoint(
            model, self.tensors, self.table, source=self.path, index_base=self.index_base, unused=model.checkpoint_skips
        )
