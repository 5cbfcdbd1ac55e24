"""Fine-tuning: new heads, model.fit with HyperRule, real digits, resume, distribution, precision."""

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import keras
import numpy as np
import pytest
from conftest import random_images

import tfbit
from conversion.digits import DIGIT_LABELS, load_digits_split
from tfbit.finetune import from_arrays, from_image_folder, make_pipeline
from tfbit.finetune.trainer import NonFiniteLossError, finetune
from tfbit.finetune.transfer import classification_loss, with_new_head

TINY = dict(embedding_size=16, hidden_sizes=[32, 64], depths=[1, 1], num_groups=8, num_labels=3)
DIGITS = dict(embedding_size=32, hidden_sizes=[64, 128, 256], depths=[1, 1, 1], num_groups=8, num_labels=10)
NAMES = [DIGIT_LABELS[i] for i in range(10)]


def _short_plan(steps, lr, crop=32):
    return dict(
        total_steps=steps,
        warmup_steps=max(1, steps // 10),
        decay_boundaries=(steps * 6 // 10, steps * 8 // 10, steps * 9 // 10),
        crop_size=crop,
        resize_size=crop + 4,
        base_lr=lr,
        mixup_alpha=0.0,
    )


@pytest.fixture(scope="module")
def digits():
    x_train, y_train, x_test, y_test = load_digits_split()
    return from_arrays(x_train, y_train, NAMES), from_arrays(x_test, y_test, NAMES), x_test, y_test


def test_new_head_is_zero_and_body_is_copied():
    model = tfbit.BitForImageClassification(tfbit.BitConfig(**TINY))
    new = with_new_head(model, id2label={0: "a", 1: "b", 2: "c", 3: "d", 4: "e"})
    assert new.config.num_labels == 5 and new.config.label2id["e"] == 4
    assert not np.any(new.get_layer("classifier").kernel.numpy())
    np.testing.assert_array_equal(
        new.get_layer("stem_conv").kernel.numpy(), model.get_layer("stem_conv").kernel.numpy()
    )
    x = random_images(2, 32, 32)
    np.testing.assert_allclose(keras.ops.softmax(new(x)), 0.2, atol=1e-7)  # uniform start
    frozen = with_new_head(tfbit.BitModel(tfbit.BitConfig(**TINY)), num_labels=4, freeze_backbone=True)
    assert [w.path for w in frozen.trainable_weights] == ["classifier/kernel", "classifier/bias"]
    with pytest.raises(ValueError, match="needs num_labels or id2label"):
        with_new_head(model)


def test_outputs_do_not_depend_on_the_batch():
    """GroupNorm normalizes per example: an image's logits are the same alone or in a batch."""
    model = tfbit.BitForImageClassification(tfbit.BitConfig(**TINY))
    x = random_images(8, 40, 40)
    alone = np.concatenate([model(x[i : i + 1]) for i in range(8)])
    np.testing.assert_allclose(model(x), alone, rtol=0, atol=1e-5)


@pytest.mark.parametrize("one_hot", [False, True])
def test_fit_evaluate_predict_with_keras_losses(one_hot):
    keras.utils.set_random_seed(1)
    model = tfbit.BitForImageClassification(tfbit.BitConfig(**TINY))
    x = random_images(16, 32, 32)
    y = np.arange(16) % 3
    labels = keras.utils.to_categorical(y, 3) * 0.9 + 0.1 / 3 if one_hot else y  # soft labels
    loss = (
        keras.losses.CategoricalCrossentropy(from_logits=True)
        if one_hot
        else keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    model.compile(
        keras.optimizers.SGD(0.05, momentum=0.9),
        loss,
        metrics=["categorical_accuracy" if one_hot else "sparse_categorical_accuracy"],
    )
    history = model.fit(x, labels, batch_size=8, epochs=8, verbose=0)
    assert history.history["loss"][-1] < history.history["loss"][0]
    assert set(model.evaluate(x, labels, verbose=0, return_dict=True)) >= {"loss"}
    assert model.predict(x, verbose=0).shape == (16, 3)


def test_classification_loss_matches_transformers(hf_checkpoint):
    import torch
    from conftest import SMALL

    path, hf_model = hf_checkpoint(**dict(SMALL))
    x = random_images(4, 32, 32)
    logits = tfbit.BitForImageClassification.from_pretrained(path)(x)
    labels = np.array([0, 3, 6, 2])
    with torch.no_grad():
        ref = hf_model(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), labels=torch.from_numpy(labels)).loss
    np.testing.assert_allclose(float(classification_loss(labels, logits)), float(ref), rtol=1e-5)
    multi = (np.random.RandomState(0).rand(4, 7) > 0.5).astype("float32")
    hf_model.config.problem_type = None
    with torch.no_grad():
        ref = hf_model(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), labels=torch.from_numpy(multi)).loss
    np.testing.assert_allclose(float(classification_loss(multi, logits)), float(ref), rtol=1e-5)
    with pytest.raises(ValueError, match="unknown problem_type 'ranking'"):
        classification_loss(labels, logits, problem_type="ranking")


def test_digits_fine_tuning_reaches_97_percent_and_tflite_agrees(digits, tmp_path):
    """The real-data check: a small BiT trained with model.fit + HyperRule schedule on the
    handwritten digits; then the exported TFLite model is as accurate as the Keras model."""
    from conversion.convert import convert

    train, val, x_test, y_test = digits
    keras.utils.set_random_seed(0)
    source = tfbit.BitForImageClassification(tfbit.BitConfig(**DIGITS))
    result = finetune(
        source,
        train,
        str(tmp_path),
        val,
        batch_size=64,
        epochs=5,
        plan_overrides=_short_plan(300, 0.8),
        random_flip=False,
        verbose=0,
    )
    accuracy = result.metrics["validation"]["accuracy"]
    print(f"DIGITS fine-tuned held-out accuracy {accuracy:.4f}")
    assert accuracy >= 0.97
    for name in ("best.keras", "metrics.json", "training_curve.png", "config.json", "preprocessor_config.json"):
        assert (tmp_path / name).exists(), name
    history = json.loads((tmp_path / "metrics.json").read_text())["history"]
    assert history["learning_rate"][0] > history["learning_rate"][-1]
    from PIL import Image

    for i, (image, label) in enumerate(zip(x_test, y_test)):  # held-out digits as <label>/<i>.png
        (tmp_path / "heldout" / NAMES[label]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(tmp_path / "heldout" / NAMES[label] / f"{i}.png")
    report = convert(
        str(tmp_path / "best.keras"),
        output=str(tmp_path / "export"),
        formats=("keras", "tflite"),
        quantizations=("fp32", "int8"),
        images=str(tmp_path / "heldout"),
        num_images=len(y_test),
        log=lambda m: None,
    )
    assert report["passed"]
    rows = {r["artifact"]: r["accuracy"] for r in report["artifacts"]}
    print(f"DIGITS export accuracies {rows}")
    assert abs(rows["keras"] - accuracy) < 1e-6  # keras metrics accumulate in float32
    assert abs(rows["tflite_fp32"] - rows["keras"]) <= 0.005
    assert abs(rows["tflite_int8"] - rows["keras"]) <= 0.005


def test_non_finite_loss_stops_with_a_clear_message(digits, tmp_path):
    train, _, _, _ = digits
    model = tfbit.BitForImageClassification(tfbit.BitConfig(**DIGITS))
    with pytest.raises(NonFiniteLossError, match=r"training loss became nan at step \d+; training stopped"):
        finetune(
            model,
            train,
            str(tmp_path),
            batch_size=32,
            epochs=2,
            plan_overrides=_short_plan(20, 1e9),
            random_flip=False,
            verbose=0,
        )


def _tiny_dataset(n=24, classes=("a", "b", "c")):
    images = np.random.default_rng(0).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    return from_arrays(images, np.arange(n) % len(classes), classes)


@pytest.mark.parametrize(
    "arguments, message",
    [
        (dict(epochs=0), "epochs must be a positive int, got 0"),
        (dict(epochs=2.5), "epochs must be a positive int, got 2.5"),
        (dict(batch_size=0), "batch_size must be a positive int, got 0"),
        (dict(steps=-3), "steps must be a positive int, got -3"),
        (dict(backup_every=0), "backup_every must be a positive int, got 0"),
    ],
)
def test_counts_must_be_positive_ints(arguments, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        finetune("never-loaded.keras", _tiny_dataset(), str(tmp_path / "run"), **arguments)
    assert not (tmp_path / "run").exists()


def test_options_object_and_keywords(tmp_path):
    """One FinetuneOptions travels through the run; keywords override its fields, and what is
    not an option is refused as Python refuses an unknown keyword."""
    from tfbit.finetune import FinetuneOptions

    with pytest.raises(ValueError, match="batch_size must be a positive int, got 0"):
        FinetuneOptions(batch_size=0)
    options = FinetuneOptions(epochs=3)
    with pytest.raises(ValueError, match="batch_size must be a positive int, got 0"):
        finetune("never-loaded.keras", _tiny_dataset(), str(tmp_path / "run"), None, options, batch_size=0)
    with pytest.raises(TypeError, match="finetune\\(\\) got an unexpected keyword argument 'learning_rate'"):
        finetune("never-loaded.keras", _tiny_dataset(), str(tmp_path / "run"), learning_rate=0.1)
    with pytest.raises(TypeError, match="options must be a FinetuneOptions, got int"):
        finetune("never-loaded.keras", _tiny_dataset(), str(tmp_path / "run"), None, 64)
    assert not (tmp_path / "run").exists()


def test_one_class_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"1 class \['a'\]: a classifier needs at least 2 classes"):
        finetune("never-loaded.keras", _tiny_dataset(classes=("a",)), str(tmp_path))


def test_validation_classes_are_matched_by_name(tmp_path):
    """Validation holding the training classes "2" and "0", in that order (its ids 0 and 1, the
    training ones 2 and 0), is scored by name, not by id; an unknown class is refused by name."""
    x, y, x_test, y_test = load_digits_split()
    three = from_arrays(x[y < 3], y[y < 3], NAMES[:3])
    kept = (y_test == 2) | (y_test == 0)
    by_name = y_test[kept]  # training ids
    validation = from_arrays(x_test[kept], (by_name == 0).astype(int), [NAMES[2], NAMES[0]])
    keras.utils.set_random_seed(0)
    result = finetune(
        tfbit.BitForImageClassification(tfbit.BitConfig(**TINY)),
        three,
        str(tmp_path),
        validation,
        batch_size=32,
        epochs=1,
        plan_overrides=_short_plan(40, 0.8),
        random_flip=False,
        verbose=0,
    )
    predicted = result.model.predict(make_pipeline(validation, 32, batch_size=64), verbose=0).argmax(-1)
    scored_by_name = float(np.mean(predicted == by_name))
    scored_by_id = float(np.mean(predicted == (by_name == 0)))
    assert result.metrics["validation"]["accuracy"] == pytest.approx(scored_by_name)
    assert abs(scored_by_name - scored_by_id) > 0.1, (scored_by_name, scored_by_id)  # the two differ here

    unknown = from_arrays(x_test[:4], np.zeros(4, int), [NAMES[9]])
    with pytest.raises(ValueError, match=r"validation data: classes \['9'\] are not among .*\['0', '1', '2'\]"):
        finetune("never-loaded.keras", three, str(tmp_path / "unknown"), unknown)


def test_a_file_that_breaks_after_the_check_is_named_when_training_reaches_it(tmp_path):
    from PIL import Image

    x, y, _, _ = load_digits_split()
    for i in range(16):
        (tmp_path / "data" / NAMES[y[i] % 2]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(x[i]).save(tmp_path / "data" / NAMES[y[i] % 2] / f"{i}.png")
    train = from_image_folder(tmp_path / "data")
    broken = train.paths[5]
    with open(broken, "r+b") as f:  # e.g. still being copied when training starts
        f.truncate(os.path.getsize(broken) // 2)
    with pytest.raises(ValueError, match=f"cannot decode image file '{re.escape(broken)}'"):
        finetune(
            tfbit.BitForImageClassification(tfbit.BitConfig(**TINY)),
            train,
            str(tmp_path / "run"),
            batch_size=8,
            epochs=1,
            steps=4,
            random_flip=False,
            verbose=0,
        )


def test_steps_not_divisible_by_epochs_all_run(tmp_path):
    result = finetune(
        tfbit.BitForImageClassification(tfbit.BitConfig(**TINY)),
        _tiny_dataset(),
        str(tmp_path),
        batch_size=8,
        epochs=3,
        steps=7,
        plan_overrides=dict(crop_size=32, resize_size=32),
        random_flip=False,
        verbose=0,
    )
    assert result.metrics["steps_per_epoch"] == 3 and result.metrics["epochs"] == 3  # 3 + 3 + 1
    assert result.metrics["final_step"] == result.plan.total_steps == 7
    assert len(result.history["loss"]) == 3
    more_epochs_than_steps = finetune(
        result.model,
        _tiny_dataset(),
        str(tmp_path / "short"),
        batch_size=8,
        epochs=5,
        steps=2,
        plan_overrides=dict(crop_size=32, resize_size=32),
        random_flip=False,
        verbose=0,
    )
    assert more_epochs_than_steps.metrics["epochs"] == 2
    assert more_epochs_than_steps.metrics["final_step"] == 2


@pytest.mark.parametrize("policy", ["mixed_bfloat16", "mixed_float16"])
def test_mixed_precision_trains_without_nans(policy, digits, tmp_path):
    train, val, _, _ = digits
    model = tfbit.BitForImageClassification(tfbit.BitConfig(**DIGITS))
    result = finetune(
        model,
        train,
        str(tmp_path),
        val,
        batch_size=32,
        epochs=1,
        plan_overrides=_short_plan(10, 0.4),
        mixed_precision=policy,
        random_flip=False,
        verbose=0,
    )
    assert keras.config.dtype_policy().name == "float32"  # restored
    assert np.isfinite(result.history["loss"]).all()
    assert result.model.get_layer("classifier").dtype_policy.name == "float32"


_SCRIPT = textwrap.dedent("""
    import sys, tensorflow as tf
    if sys.argv[2] == "mirrored":
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras, tfbit
    from tfbit.finetune import from_arrays, from_image_folder, make_pipeline
    from tfbit.finetune.trainer import finetune
    from conversion.digits import load_digits_split
    x, y, _, _ = load_digits_split()
    keras.utils.set_random_seed(0)
    model = tfbit.BitForImageClassification(tfbit.BitConfig(embedding_size=16, hidden_sizes=[32, 64],
                                            depths=[1, 1], num_groups=8, num_labels=10))
    strategy = tf.distribute.MirroredStrategy() if sys.argv[2] == "mirrored" else None
    steps = int(sys.argv[3])
    finetune(model, from_arrays(x[:256], y[:256]), sys.argv[1], batch_size=32, epochs=2, strategy=strategy,
             plan_overrides=dict(total_steps=steps, warmup_steps=2, decay_boundaries=(steps - 3, steps - 2, steps - 1),
                                 crop_size=32, resize_size=32, base_lr=0.1, mixup_alpha=0.0),
             backup_every=2, random_flip=False, verbose=0)
""")


def _run_script(output, mode, steps, **kwargs):
    return subprocess.Popen(
        [sys.executable, "-c", _SCRIPT, str(output), mode, str(steps)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        **kwargs,
    )


def test_mirrored_strategy_on_two_cpu_replicas(tmp_path):
    process = _run_script(tmp_path, "mirrored", 8)
    out = process.communicate(timeout=600)[0].decode()
    assert process.returncode == 0, out[-3000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["num_replicas"] == 2
    # the learning rate follows the global batch (32), whatever the replica count
    assert metrics["plan"]["learning_rate"] == pytest.approx(0.1 * 32 / 512)
    assert np.isfinite(metrics["history"]["loss"]).all()


def test_killed_training_resumes_from_its_backup(tmp_path):
    steps = 400
    process = _run_script(tmp_path, "single", steps)
    metadata = tmp_path / "backup" / "training_metadata.json"
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        try:
            if json.loads(metadata.read_text()).get("batch", -1) >= 3:
                break
        except (OSError, ValueError):  # not written yet, or being written
            pass
        time.sleep(0.2)
    assert process.poll() is None, process.communicate()[0].decode()[-3000:]
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (tmp_path / "metrics.json").exists()
    resumed = _run_script(tmp_path, "single", steps)
    out = resumed.communicate(timeout=900)[0].decode()
    assert resumed.returncode == 0, out[-3000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["resumed_from_step"] >= 2
    # the interrupted epoch restarts from its first batch, but the plan's step count holds
    assert metrics["final_step"] == steps
    assert not (tmp_path / "backup").exists()  # removed once training completed


def test_cli_trains_from_an_image_folder_and_exports(tmp_path, capsys):
    from PIL import Image

    from conversion.finetune import main

    x, y, _, _ = load_digits_split()
    for i in range(40):
        folder = tmp_path / "data" / f"digit{y[i] % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(x[i]).save(folder / f"{i}.png")
    tfbit.BitForImageClassification(tfbit.BitConfig(**TINY)).save(tmp_path / "source.keras")
    code = main(
        [
            str(tmp_path / "source.keras"),
            "--data",
            str(tmp_path / "data"),
            "--validation",
            str(tmp_path / "data"),
            "--output",
            str(tmp_path / "run"),
            "--steps",
            "6",
            "--epochs",
            "2",
            "--batch-size",
            "8",
            "--crop-size",
            "32",
            "--resize-size",
            "36",
            "--no-flip",
            "--export",
            "saved_model",
        ]
    )
    assert code == 0, capsys.readouterr()
    assert "validation accuracy" in capsys.readouterr().out
    assert json.loads((tmp_path / "run" / "config.json").read_text())["id2label"] == {"0": "digit0", "1": "digit1"}
    assert (tmp_path / "run" / "export" / "serving" / "1" / "saved_model.pb").exists()


def test_cli_reports_bad_data_paths(tmp_path, capsys):
    from conversion.finetune import main

    assert main([str(tmp_path / "m.keras"), "--data", str(tmp_path / "nowhere"), "--output", str(tmp_path / "o")]) == 2
    assert "nowhere" in capsys.readouterr().err
    (tmp_path / "data" / "cat").mkdir(parents=True)
    assert main(["x.keras", "--data", str(tmp_path / "data"), "--output", str(tmp_path / "o")]) == 2
    assert "contains no images" in capsys.readouterr().err
