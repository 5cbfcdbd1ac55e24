import dataclasses
import json

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfbit.finetune import BiTSchedule, HyperRulePlan, hyperrule_plan

# (dataset size, warm-up, boundaries, total steps, MixUp α) from the BiT paper's table.
TABLE = [
    (1_000, 100, (200, 300, 400), 500, 0.0),
    (10_000, 100, (200, 300, 400), 500, 0.0),
    (19_999, 100, (200, 300, 400), 500, 0.0),
    (20_000, 500, (3000, 6000, 9000), 10_000, 0.1),
    (50_000, 500, (3000, 6000, 9000), 10_000, 0.1),
    (499_999, 500, (3000, 6000, 9000), 10_000, 0.1),
    (500_000, 500, (6000, 12_000, 18_000), 20_000, 0.1),
    (1_281_167, 500, (6000, 12_000, 18_000), 20_000, 0.1),
]


@pytest.mark.parametrize("size, warmup, boundaries, total, alpha", TABLE)
def test_schedule_table(size, warmup, boundaries, total, alpha):
    plan = hyperrule_plan(size, (224, 224))
    assert (plan.warmup_steps, plan.decay_boundaries, plan.total_steps, plan.mixup_alpha) == (
        warmup,
        boundaries,
        total,
        alpha,
    )
    assert plan.batch_size == 512 and plan.base_lr == plan.learning_rate == 0.003
    assert plan.momentum == 0.9


@pytest.mark.parametrize(
    "image_size, expected",
    [
        ((32, 32), (160, 128)),  # CIFAR
        (32, (160, 128)),
        ((28, 28, 1), (160, 128)),  # MNIST, (h, w, c)
        ((95, 96), (160, 128)),  # area 9120 < 96*96
        ((96, 96), (512, 480)),
        ((64, 200), (512, 480)),  # area, not side, decides
        ((224, 224, 3), (512, 480)),  # ImageNet
    ],
)
def test_resolution_rule(image_size, expected):
    plan = hyperrule_plan(50_000, image_size)
    assert (plan.resize_size, plan.crop_size) == expected
    assert len(plan.image_size) == 2


def test_lr_scales_with_batch_but_steps_do_not():
    ref = hyperrule_plan(50_000, 32)
    small = hyperrule_plan(50_000, 32, batch_size=128)
    assert small.learning_rate == pytest.approx(0.003 * 128 / 512)
    assert hyperrule_plan(50_000, 32, batch_size=1024, base_lr=0.01).learning_rate == pytest.approx(0.02)
    assert (small.warmup_steps, small.decay_boundaries, small.total_steps) == (
        ref.warmup_steps,
        ref.decay_boundaries,
        ref.total_steps,
    )


def test_overrides_and_to_dict():
    plan = hyperrule_plan(1_000, 32, mixup_alpha=0.2, total_steps=600, decay_boundaries=[250, 500], learning_rate=0.01)
    assert plan.mixup_alpha == 0.2 and plan.total_steps == 600
    assert plan.decay_boundaries == (250, 500) and plan.learning_rate == 0.01
    d = plan.to_dict()
    assert json.loads(json.dumps(d))["crop_size"] == 128
    assert HyperRulePlan(**json.loads(json.dumps(d))) == plan


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(crop_size=600), "crop_size"),
        (dict(resize_size=0), "resize_size"),
        (dict(warmup_steps=-1), "warmup_steps"),
        (dict(warmup_steps=501), "warmup_steps"),
        (dict(decay_boundaries=(300, 200)), "decay_boundaries"),
        (dict(decay_boundaries=(200, 500)), "decay_boundaries"),
        (dict(total_steps=2.5), "total_steps"),
        (dict(mixup_alpha=-0.1), "mixup_alpha"),
        (dict(momentum=1.0), "momentum"),
        (dict(learning_rate=0), "learning_rate"),
        (dict(batch_size=0), "batch_size"),
        (dict(base_lr=-1.0), "base_lr"),
        (dict(dataset_size=0), "dataset_size"),
        (dict(image_size=(0, 3)), "image_size"),
    ],
)
def test_invalid_values_name_the_field(overrides, field):
    kwargs = {"dataset_size": 1_000, "image_size": 32, **overrides}
    with pytest.raises(ValueError, match=field):
        hyperrule_plan(**kwargs)


def test_unknown_override():
    with pytest.raises(TypeError, match="warmup"):
        hyperrule_plan(1_000, 32, warmup=5)


def _expected_lr(step, lr=0.003):
    # The original big_transfer get_lr, for a < 20 000 example dataset.
    if step < 100:
        return lr * step / 100
    return lr * 0.1 ** sum(s < step for s in (200, 300, 400, 500))


STEPS = [0, 1, 50, 99, 100, 101, 199, 200, 201, 300, 301, 400, 401, 499]


@pytest.mark.parametrize("dtype", [tf.int64, tf.float32])
def test_schedule_values_in_graph_mode(dtype):
    schedule = hyperrule_plan(1_000, 32).schedule()
    fn = tf.function(schedule)
    got = np.array([float(fn(tf.constant(s, dtype))) for s in STEPS])
    np.testing.assert_allclose(got, [_expected_lr(s) for s in STEPS], rtol=1e-5, atol=1e-12)
    assert got[0] == 0.0 and got[STEPS.index(50)] == pytest.approx(0.0015)
    assert got[STEPS.index(100)] == pytest.approx(0.003)
    assert got[STEPS.index(401)] == pytest.approx(3e-6)


def test_schedule_drives_sgd():
    optimizer = hyperrule_plan(1_000, 32, batch_size=256).optimizer()
    assert isinstance(optimizer, keras.optimizers.SGD) and optimizer.momentum == 0.9
    var = keras.Variable(1.0)
    for _ in range(51):
        optimizer.apply_gradients([(tf.constant(1.0), var)])
    # iterations == 51 → lr = 0.0015 * 51 / 100
    assert float(optimizer.learning_rate) == pytest.approx(0.0015 * 51 / 100)


def test_schedule_without_warmup_or_boundaries():
    assert float(BiTSchedule(0.1, 0, ())(tf.constant(0))) == pytest.approx(0.1)


def test_schedule_serialization_round_trip():
    schedule = BiTSchedule(0.01, 500, (3000, 6000, 9000), name="bit")
    config = keras.saving.serialize_keras_object(schedule)
    assert config["registered_name"] == "tfbit>BiTSchedule"
    restored = keras.saving.deserialize_keras_object(json.loads(json.dumps(config)))
    assert isinstance(restored, BiTSchedule) and restored.get_config() == schedule.get_config()
    for step in (0, 250, 500, 3001, 9001):
        assert float(restored(step)) == pytest.approx(float(schedule(step)))


def test_model_with_schedule_saves_and_loads(tmp_path):
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.compile(optimizer=hyperrule_plan(1_000, 32).optimizer(), loss="mse")
    model.fit(np.ones((4, 3)), np.ones((4, 2)), epochs=1, verbose=0)
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    assert isinstance(loaded.optimizer._learning_rate, BiTSchedule)
    assert loaded.optimizer._learning_rate.get_config() == model.optimizer._learning_rate.get_config()


def test_scaled_to_keeps_the_schedule_shape():
    plan = hyperrule_plan(50_000, 32, batch_size=64)  # warm-up 500, decays 3000/6000/9000 of 10 000
    short = plan.scaled_to(100)
    assert (short.total_steps, short.warmup_steps, short.decay_boundaries) == (100, 5, (30, 60, 90))
    assert (
        dataclasses.replace(short, total_steps=10_000, warmup_steps=500, decay_boundaries=(3000, 6000, 9000)) == plan
    )  # nothing else changes
    assert plan.scaled_to(20_000).decay_boundaries == (6000, 12_000, 18_000)
    small = hyperrule_plan(1_000, 32).scaled_to(6)  # 100; 200, 300, 400; 500
    assert (small.warmup_steps, small.decay_boundaries) == (1, (2, 3, 4))
    tiny = hyperrule_plan(1_000, 32).scaled_to(2)  # 0.4; 0.8, 1.2, 1.6 → decays merge
    assert (tiny.warmup_steps, tiny.decay_boundaries) == (0, (0, 1))
    for steps in range(1, 60):  # every length gives a valid plan
        assert hyperrule_plan(1_000, 32).scaled_to(steps).total_steps == steps
    with pytest.raises(ValueError, match="total_steps must be a positive int, got 0"):
        plan.scaled_to(0)
