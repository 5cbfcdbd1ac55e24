"""BiT's learning-rate schedule, registered by `import tfbit` so that the optimizer of a saved
fine-tuning checkpoint (`best.keras`) loads without importing the fine-tuning input pipelines."""

from collections.abc import Sequence

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="tfbit")
class BiTSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warm-up from 0 to `learning_rate`, then ×`decay_factor` after each boundary.

    Matches the original `get_lr`: lr(step) = lr·step/warmup for step < warmup, and a decay
    applies once step > boundary (so step == boundary still uses the previous value, like
    `keras.optimizers.schedules.PiecewiseConstantDecay`). Past the last boundary the final
    value is kept; stop training at `HyperRulePlan.total_steps`.

    Args:
        learning_rate: the peak rate, reached at the end of the warm-up.
        warmup_steps: steps of the linear warm-up; 0 starts at `learning_rate`.
        decay_boundaries: optimizer steps after which the rate is multiplied by `decay_factor`.
        decay_factor: the multiplier of each decay.
        name: optional name of the schedule.
    """

    def __init__(
        self,
        learning_rate: float,
        warmup_steps: int,
        decay_boundaries: Sequence[int],
        decay_factor: float = 0.1,
        name: str | None = None,
    ):
        super().__init__()
        self.learning_rate = float(learning_rate)
        self.warmup_steps = int(warmup_steps)
        self.decay_boundaries = tuple(int(b) for b in decay_boundaries)
        self.decay_factor = float(decay_factor)
        self.name = name

    def __call__(self, step):
        step = ops.cast(step, "float32")
        lr = ops.convert_to_tensor(self.learning_rate, "float32")
        if self.decay_boundaries:
            boundaries = ops.convert_to_tensor(self.decay_boundaries, "float32")
            num_decays = ops.sum(ops.cast(ops.greater(step, boundaries), "float32"))
            lr = lr * ops.power(ops.convert_to_tensor(self.decay_factor, "float32"), num_decays)
        if self.warmup_steps > 0:
            warm = self.learning_rate * step / self.warmup_steps
            lr = ops.where(step < self.warmup_steps, warm, lr)
        return lr

    def get_config(self) -> dict:
        return dict(
            learning_rate=self.learning_rate,
            warmup_steps=self.warmup_steps,
            decay_boundaries=list(self.decay_boundaries),
            decay_factor=self.decay_factor,
            name=self.name,
        )
