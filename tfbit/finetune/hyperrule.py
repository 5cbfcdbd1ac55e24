"""BiT-HyperRule: the fine-tuning recipe of Kolesnikov et al. (2019), as Keras parts.

The rule picks schedule length, MixUp and resolution from two dataset statistics:

| training examples  | warm-up; lr decays (÷10); end | MixUp α |
|--------------------|-------------------------------|---------|
| < 20 000           | 100; 200, 300, 400; 500       | 0       |
| 20 000 – 499 999   | 500; 3000, 6000, 9000; 10 000 | 0.1     |
| ≥ 500 000          | 500; 6000, 12 000, 18 000; 20 000 | 0.1 |

Images with area < 96×96 are resized to 160 and randomly cropped to 128, larger ones
resized to 512 and cropped to 480; evaluation resizes straight to the crop size.

Batch size: the step counts are for batch 512 and are *kept* for any batch size, as in the
original big_transfer scripts (the TF2 one explicitly declines to rescale them). The learning
rate is scaled linearly, ``learning_rate = base_lr * batch_size / 512``, which is the paper's
0.003 at the reference batch. A smaller batch therefore sees fewer examples in total;
``plan.scaled_to(total_steps)`` lengthens the schedule (same shape) to keep the number of epochs.

The learning-rate schedule, `BiTSchedule`, lives in `tfbit.schedules`: `import tfbit` registers
it, so a saved model's optimizer loads without importing the fine-tuning pipelines.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Sequence

import keras

from tfbit.schedules import BiTSchedule

REFERENCE_BATCH_SIZE = 512
_SMALL_AREA = 96 * 96

# (exclusive upper bound on dataset size, warm-up, decay boundaries, total steps, MixUp α)
_SCHEDULES = (
    (20_000, 100, (200, 300, 400), 500, 0.0),
    (500_000, 500, (3000, 6000, 9000), 10_000, 0.1),
    (math.inf, 500, (6000, 12_000, 18_000), 20_000, 0.1),
)


def _check(ok: bool, field: str, value, requirement: str) -> None:
    if not ok:
        raise ValueError(f"{field} must be {requirement}, got {value!r}")


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _image_hw(image_size) -> tuple[int, int]:
    """An int (square), (h, w) or (h, w, c) → (h, w); the original `get_resolution` takes (H, W)."""
    if _is_int(image_size):
        hw = (image_size, image_size)
    elif isinstance(image_size, Sequence) and len(image_size) in (2, 3):
        hw = tuple(image_size[:2])
    else:
        hw = ()
    _check(len(hw) == 2 and all(_is_int(v) and v > 0 for v in hw), "image_size", image_size,
           "a positive int, (h, w) or (h, w, c)")
    return int(hw[0]), int(hw[1])


@dataclasses.dataclass(frozen=True)
class HyperRulePlan:
    """Everything BiT-HyperRule decides for one fine-tuning run.

    Build it with `hyperrule_plan`; fields are validated (ValueError naming the field).

    Args:
        dataset_size: number of training examples the rule was applied to.
        image_size: (h, w) of the training images.
        resize_size: side training images are resized to before the random crop.
        crop_size: side of the random training crop; evaluation resizes straight to it.
        warmup_steps: optimizer steps of the linear learning-rate warm-up.
        decay_boundaries: optimizer steps after which the learning rate is divided by 10.
        total_steps: optimizer steps of the whole run.
        mixup_alpha: MixUp's Beta(α, α) parameter; 0 disables MixUp.
        batch_size: the global batch size the learning rate is scaled to.
        base_lr: learning rate at the reference batch size of 512.
        learning_rate: peak learning rate, `base_lr * batch_size / 512` unless overridden.
        momentum: SGD momentum.
    """

    dataset_size: int
    image_size: tuple[int, int]
    resize_size: int
    crop_size: int
    warmup_steps: int
    decay_boundaries: tuple[int, ...]
    total_steps: int
    mixup_alpha: float
    batch_size: int
    base_lr: float
    learning_rate: float
    momentum: float = 0.9

    def __post_init__(self):
        # Normalize to plain Python types (numpy scalars, lists from JSON) so plans compare
        # equal and `to_dict()` stays JSON-serializable; frozen, hence object.__setattr__.
        def normalize(name, ok, requirement, cast):
            value = getattr(self, name)
            _check(ok(value), name, value, requirement)
            object.__setattr__(self, name, cast(value))

        object.__setattr__(self, "image_size", _image_hw(self.image_size))
        for name in ("dataset_size", "resize_size", "crop_size", "total_steps", "batch_size"):
            normalize(name, lambda v: _is_int(v) and v > 0, "a positive int", int)
        for name in ("base_lr", "learning_rate"):
            normalize(name, lambda v: _is_real(v) and v > 0, "a positive float", float)
        normalize("mixup_alpha", lambda v: _is_real(v) and v >= 0, "a float >= 0", float)
        normalize("momentum", lambda v: _is_real(v) and 0 <= v < 1, "a float in [0, 1)", float)
        normalize("warmup_steps", lambda v: _is_int(v) and 0 <= v <= self.total_steps,
                  f"an int in [0, total_steps={self.total_steps}]", int)
        normalize("decay_boundaries",
                  lambda b: isinstance(b, Sequence) and all(_is_int(s) for s in b)
                  and all(x < y for x, y in zip(b, b[1:]))
                  and all(self.warmup_steps <= s < self.total_steps for s in b),
                  f"strictly increasing ints in [warmup_steps={self.warmup_steps}, "
                  f"total_steps={self.total_steps})", lambda b: tuple(int(s) for s in b))
        _check(self.crop_size <= self.resize_size, "crop_size", self.crop_size,
               f"<= resize_size ({self.resize_size})")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def scaled_to(self, total_steps: int) -> HyperRulePlan:
        """This plan with its schedule stretched or shrunk to `total_steps`, keeping its shape.

        Warm-up and decay boundaries keep their fraction of the run, rounded down to whole
        steps (500 steps with warm-up 100 and decays after 200, 300, 400 become, for 50 steps,
        warm-up 10 and decays after 20, 30, 40). In a run too short to separate them,
        boundaries that fall on the same step merge into one decay.

        Args:
            total_steps: optimizer steps of the new run, a positive int.
        """
        _check(_is_int(total_steps) and total_steps > 0, "total_steps", total_steps, "a positive int")

        def scale(step):
            return step * total_steps // self.total_steps

        return dataclasses.replace(
            self, total_steps=total_steps, warmup_steps=scale(self.warmup_steps),
            decay_boundaries=tuple(dict.fromkeys(scale(b) for b in self.decay_boundaries)))

    def schedule(self) -> BiTSchedule:
        return BiTSchedule(self.learning_rate, self.warmup_steps, self.decay_boundaries)

    def optimizer(self, **kwargs) -> keras.optimizers.SGD:
        """SGD with momentum and no weight decay; `kwargs` go to `keras.optimizers.SGD`."""
        return keras.optimizers.SGD(learning_rate=self.schedule(), momentum=self.momentum, **kwargs)


def hyperrule_plan(dataset_size: int, image_size, batch_size: int = REFERENCE_BATCH_SIZE,
                   base_lr: float = 0.003, **overrides) -> HyperRulePlan:
    """BiT-HyperRule's plan for a dataset of `dataset_size` examples of `image_size`.

    Any `HyperRulePlan` field can be overridden by keyword; invalid values raise ValueError
    naming the field, unknown fields TypeError. To train for another number of steps with
    the same schedule shape, use `hyperrule_plan(...).scaled_to(total_steps)`.

    Args:
        dataset_size: number of training examples; picks the schedule and MixUp.
        image_size: int (square), (h, w) or (h, w, c) of the training images; picks the
            resolution.
        batch_size: the global batch size; the learning rate is scaled linearly to it.
        base_lr: the learning rate at the reference batch size of 512.
        **overrides: `HyperRulePlan` fields replacing what the rule decides.
    """
    _check(_is_int(dataset_size) and dataset_size > 0, "dataset_size", dataset_size, "a positive int")
    _check(_is_int(batch_size) and batch_size > 0, "batch_size", batch_size, "a positive int")
    _check(_is_real(base_lr) and base_lr > 0, "base_lr", base_lr, "a positive float")
    h, w = _image_hw(image_size)
    _, warmup, boundaries, total, alpha = next(s for s in _SCHEDULES if dataset_size < s[0])
    resize, crop = (160, 128) if h * w < _SMALL_AREA else (512, 480)
    fields = dict(
        dataset_size=dataset_size, image_size=(h, w), resize_size=resize, crop_size=crop,
        warmup_steps=warmup, decay_boundaries=boundaries, total_steps=total, mixup_alpha=alpha,
        batch_size=batch_size, base_lr=base_lr,
        learning_rate=base_lr * batch_size / REFERENCE_BATCH_SIZE,
    )
    unknown = set(overrides) - {f.name for f in dataclasses.fields(HyperRulePlan)}
    if unknown:
        raise TypeError(f"unknown HyperRulePlan field(s): {sorted(unknown)}")
    return HyperRulePlan(**{**fields, **overrides})
