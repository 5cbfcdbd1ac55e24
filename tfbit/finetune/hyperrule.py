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

The learning-rate schedule, `BiTSchedule`, lives in `tfbit.finetune.schedules`: `import tfbit` registers
it, so a saved model's optimizer loads without importing the fine-tuning pipelines.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Sequence

import keras
import numpy as np

from tfbit.errors import ConfigError
from tfbit.finetune.schedules import BiTSchedule

REFERENCE_BATCH_SIZE = 512
_SMALL_AREA = 96 * 96
# Below this fraction of the full HyperRule schedule's learning (`total_learning`) a run is
# warned about: on the digits, 0.4% (batch 32, 30 steps) left the model at 12% accuracy where
# the short-run schedule (48%) reached 98% (docs/finetuning.md, "Short runs").
MIN_LEARNING_FRACTION = 0.1
# The short-run schedule (`short_run_plan`): what the measurements found for runs of 30-300 steps.
SHORT_RUN_LEARNING_RATE = 0.01
SHORT_RUN_WARMUP_FRACTION = 0.1
SHORT_RUN_DECAY_FRACTION = 0.8

# (exclusive upper bound on dataset size, warm-up, decay boundaries, total steps, MixUp α)
_SCHEDULES = (
    (20_000, 100, (200, 300, 400), 500, 0.0),
    (500_000, 500, (3000, 6000, 9000), 10_000, 0.1),
    (math.inf, 500, (6000, 12_000, 18_000), 20_000, 0.1),
)


def _check(ok: bool, field: str, value, requirement: str) -> None:
    if not ok:
        raise ConfigError(f"{field} must be {requirement}, got {value!r}")


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
    _check(
        len(hw) == 2 and all(_is_int(v) and v > 0 for v in hw),
        "image_size",
        image_size,
        "a positive int, (h, w) or (h, w, c)",
    )
    return int(hw[0]), int(hw[1])


@dataclasses.dataclass(frozen=True)
class HyperRulePlan:
    """Everything BiT-HyperRule decides for one fine-tuning run.

    Build it with `hyperrule_plan`; fields are validated (ConfigError naming the field).

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
        normalize(
            "warmup_steps",
            lambda v: _is_int(v) and 0 <= v <= self.total_steps,
            f"an int in [0, total_steps={self.total_steps}]",
            int,
        )
        normalize(
            "decay_boundaries",
            lambda b: (
                isinstance(b, Sequence)
                and all(_is_int(s) for s in b)
                and all(x < y for x, y in zip(b, b[1:]))
                and all(self.warmup_steps <= s < self.total_steps for s in b)
            ),
            f"strictly increasing ints in [warmup_steps={self.warmup_steps}, total_steps={self.total_steps})",
            lambda b: tuple(int(s) for s in b),
        )
        _check(self.crop_size <= self.resize_size, "crop_size", self.crop_size, f"<= resize_size ({self.resize_size})")

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
            self,
            total_steps=total_steps,
            warmup_steps=scale(self.warmup_steps),
            decay_boundaries=tuple(dict.fromkeys(scale(b) for b in self.decay_boundaries)),
        )

    def schedule(self) -> BiTSchedule:
        return BiTSchedule(self.learning_rate, self.warmup_steps, self.decay_boundaries)

    def learning_rates(self) -> np.ndarray:
        """The learning rate of each optimizer step 0 .. total_steps - 1 (`BiTSchedule`'s rule, in
        NumPy so that a 20 000-step plan is summed at once)."""
        step = np.arange(self.total_steps, dtype=np.float64)
        decays = (step[:, None] > np.asarray(self.decay_boundaries, np.float64)[None, :]).sum(axis=1)
        rates = self.learning_rate * 0.1**decays
        if self.warmup_steps:
            rates = np.where(step < self.warmup_steps, self.learning_rate * step / self.warmup_steps, rates)
        return rates

    def total_learning(self) -> float:
        """The sum of the learning rate over the run: how far SGD can move the weights, in units
        of gradient steps. The full HyperRule schedule at batch 512 sums to ~0.48."""
        return float(self.learning_rates().sum())

    def optimizer(self, **kwargs) -> keras.optimizers.SGD:
        """SGD with momentum and no weight decay; `kwargs` go to `keras.optimizers.SGD`."""
        return keras.optimizers.SGD(learning_rate=self.schedule(), momentum=self.momentum, **kwargs)


def hyperrule_plan(
    dataset_size: int, image_size, batch_size: int = REFERENCE_BATCH_SIZE, base_lr: float = 0.003, **overrides
) -> HyperRulePlan:
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
        dataset_size=dataset_size,
        image_size=(h, w),
        resize_size=resize,
        crop_size=crop,
        warmup_steps=warmup,
        decay_boundaries=boundaries,
        total_steps=total,
        mixup_alpha=alpha,
        batch_size=batch_size,
        base_lr=base_lr,
        learning_rate=base_lr * batch_size / REFERENCE_BATCH_SIZE,
    )
    unknown = set(overrides) - {f.name for f in dataclasses.fields(HyperRulePlan)}
    if unknown:
        raise TypeError(f"unknown HyperRulePlan field(s): {sorted(unknown)}")
    return HyperRulePlan(**{**fields, **overrides})


def short_run_plan(
    dataset_size: int,
    image_size,
    total_steps: int,
    batch_size: int = REFERENCE_BATCH_SIZE,
    source_resolution: int | None = None,
    **overrides,
) -> HyperRulePlan:
    """The short-run schedule: what a practitioner picks for a run of a few hundred steps or fewer,
    where the HyperRule schedule scaled down (`scaled_to`) barely trains (measured in docs/finetuning.md).

    Against `hyperrule_plan(...).scaled_to(total_steps)` it changes three things:
    - the peak learning rate is 0.01 at any batch size (HyperRule: 0.003 x batch / 512, 1.9e-4
      at batch 32);
    - warm-up is the first 10% of the steps and the rate drops once, ÷10, at 80% (HyperRule:
      warm-up 20%, decays at 40%, 60% and 80%);
    - images smaller than 96x96 are trained at their own size, or at the source model's
      `source_resolution` if that is larger, up to HyperRule's 128 px (HyperRule always
      upsamples them to 128: a model trained at 32 px then sees digits four times larger than
      it learnt them).
    MixUp and the rest follow the rule. `overrides` replace fields as in `hyperrule_plan`; a
    `base_lr` sets the learning rate to `base_lr * batch_size / 512` as there.
    """
    _check(_is_int(total_steps) and total_steps > 0, "total_steps", total_steps, "a positive int")
    _check(
        source_resolution is None or (_is_int(source_resolution) and source_resolution > 0),
        "source_resolution",
        source_resolution,
        "a positive int or None",
    )
    rule = hyperrule_plan(dataset_size, image_size, batch_size)
    h, w = rule.image_size
    fields = dict(
        total_steps=total_steps,
        warmup_steps=int(total_steps * SHORT_RUN_WARMUP_FRACTION),
        decay_boundaries=(int(total_steps * SHORT_RUN_DECAY_FRACTION),),
        learning_rate=SHORT_RUN_LEARNING_RATE,
        base_lr=SHORT_RUN_LEARNING_RATE * REFERENCE_BATCH_SIZE / batch_size,
    )
    if h * w < _SMALL_AREA:
        crop = min(rule.crop_size, max(h, w, source_resolution or 0))
        fields.update(crop_size=crop, resize_size=max(crop, rule.resize_size * crop // rule.crop_size))
    if "base_lr" in overrides:
        fields["learning_rate"] = overrides["base_lr"] * batch_size / REFERENCE_BATCH_SIZE
    unknown = set(overrides) - {f.name for f in dataclasses.fields(HyperRulePlan)}
    if unknown:
        raise TypeError(f"unknown HyperRulePlan field(s): {sorted(unknown)}")
    return dataclasses.replace(rule, **{**fields, **overrides})


def learning_shortfall(plan: HyperRulePlan) -> str | None:
    """A warning when `plan` gives the model less than `MIN_LEARNING_FRACTION` of the learning
    (`total_learning`) of the full HyperRule schedule for its data at batch 512, else None."""
    reference = hyperrule_plan(plan.dataset_size, plan.image_size)
    fraction = plan.total_learning() / reference.total_learning()
    if fraction >= MIN_LEARNING_FRACTION:
        return None
    return (
        f"this schedule gives the model {100 * fraction:.2g}% of the learning of the full BiT-HyperRule "
        f"schedule (its learning rate sums to {plan.total_learning():.2g} over {plan.total_steps} steps, "
        f"peak {plan.learning_rate:.2g}; the full schedule's sums to {reference.total_learning():.2g} over "
        f"{reference.total_steps} steps at batch {REFERENCE_BATCH_SIZE}): the model will barely move from "
        "its starting point. For a short run use the short-run schedule (--schedule short, "
        "finetune(..., schedule='short')), or train more steps or with a higher base learning rate"
    )
