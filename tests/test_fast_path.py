"""The default inference path: a model with `standardize_weights=True` reuses its standardized
kernels across inference calls (`WSConv2D`), and never serves stale ones after its weights change.

References are transformers on the same weights where the weights come from a checkpoint, else
the same model standardizing afresh (`training=True`; BiT has no dropout, and DropPath is 0).
"""

import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import SMALL, assert_parity, random_images, run_torch

import tfbit
from tfbit.weights import read_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def two_checkpoints(hf_checkpoint):
    """Two transformers checkpoints of one config with different weights: (path, HF model) each."""
    return hf_checkpoint(seed=0, subdir="a", **SMALL), hf_checkpoint(seed=1, subdir="b", **SMALL)


def inference_outputs(model, x, traced):
    """Every inference entry point of the issue: predict, predict_on_batch, __call__(training=False)
    eagerly and in a tf.function traced before (`traced`)."""
    return {
        "predict": model.predict(x, verbose=0),
        "predict_on_batch": model.predict_on_batch(x),
        "call(training=False)": np.asarray(model(x, training=False)),
        "tf.function": np.asarray(traced(x)),
    }


def warm(model, x):
    """Fill the standardized-kernel cache through every entry point; returns the traced function."""
    traced = tf.function(lambda t: model(t, training=False))
    inference_outputs(model, x, traced)
    return traced


def test_inference_entry_points_match_transformers_and_repeat(two_checkpoints):
    (path, hf_model), _ = two_checkpoints
    x = random_images(2, 64, 64)
    reference = run_torch(hf_model, x).logits
    model = tfbit.BitForImageClassification.from_pretrained(path)
    traced = tf.function(lambda t: model(t, training=False))
    for attempt in ("first call", "cached"):
        for entry, out in inference_outputs(model, x, traced).items():
            assert_parity(out, reference, f"{entry}, {attempt}")


def _set_weights(model, donor, path):
    model.set_weights(donor.get_weights())


def _assign(model, donor, path):
    for variable, value in zip(model.weights, donor.weights):
        variable.assign(value)


def _load_weights(model, donor, path):
    file = str(path.parent / "donor.weights.h5")
    donor.save_weights(file)
    model.load_weights(file)


def _from_pretrained_onto_model(model, donor, path):
    read_checkpoint(str(path)).load_into(model)


@pytest.mark.parametrize(
    "change",
    [_set_weights, _assign, _load_weights, _from_pretrained_onto_model],
    ids=["set_weights", "assign", "load_weights", "checkpoint_load_into"],
)
def test_no_stale_kernels_after_loading_new_weights(change, two_checkpoints):
    (path_a, hf_a), (path_b, hf_b) = two_checkpoints
    x = random_images(2, 64, 64)
    model = tfbit.BitForImageClassification.from_pretrained(path_a)
    traced = warm(model, x)
    change(model, tfbit.BitForImageClassification.from_pretrained(path_b), path_b)
    reference = run_torch(hf_b, x).logits
    assert np.abs(reference - run_torch(hf_a, x).logits).max() > 100 * np.abs(reference).max() * 1e-4
    for entry, out in inference_outputs(model, x, traced).items():
        assert_parity(out, reference, f"{entry} after {change.__name__}")
    assert traced.experimental_get_tracing_count() == 1  # the change was seen without retracing


def test_one_kernel_assigned_in_place_is_seen():
    keras.utils.set_random_seed(0)
    model = tfbit.BitForImageClassification(tfbit.BitConfig(**SMALL))
    x = random_images(2, 64, 64)
    traced = warm(model, x)
    kernel = model.get_layer("stage2_unit1_conv2").kernel
    kernel.assign(kernel * 0.5 + 0.01 * np.random.RandomState(2).normal(size=kernel.shape).astype("float32"))
    reference = np.asarray(model(x, training=True))
    for entry, out in inference_outputs(model, x, traced).items():
        assert_parity(out, reference, f"{entry} after assigning one kernel")


def test_fit_and_its_validation_see_every_training_step():
    keras.utils.set_random_seed(0)
    model = tfbit.BitForImageClassification(tfbit.BitConfig(**SMALL))
    x, y = random_images(4, 64, 64), np.arange(4) % SMALL["num_labels"]
    traced = warm(model, x)
    before = model.predict_on_batch(x)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model.compile(optimizer=keras.optimizers.SGD(0.5, momentum=0.9), loss=loss)
    history = model.fit(x, y, validation_data=(x, y), epochs=2, batch_size=4, verbose=0)
    reference = np.asarray(model(x, training=True))
    assert np.abs(reference - before).max() > 1e-2, "training did not change the model"
    for entry, out in inference_outputs(model, x, traced).items():
        assert_parity(out, reference, f"{entry} after fit")
    # evaluate inside fit runs the compiled inference function between training steps
    np.testing.assert_allclose(history.history["val_loss"][-1], float(loss(y, reference)), rtol=1e-4)


def test_gradients_flow_to_the_kernels_and_ignore_the_cache():
    keras.utils.set_random_seed(0)
    model = tfbit.BitForImageClassification(tfbit.BitConfig(**SMALL))
    x = tf.constant(random_images(2, 64, 64))

    def gradients(training):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(model(x, training=training) ** 2)
        return tape.gradient(loss, model.trainable_weights)

    before = gradients(True)
    warm(model, x)
    for training in (True, None):
        grads = gradients(training)
        assert all(g is not None for g in grads), f"training={training}: a weight got no gradient"
        for g, b, w in zip(grads, before, model.trainable_weights):
            np.testing.assert_array_equal(np.asarray(g), np.asarray(b), err_msg=f"{w.path}, training={training}")


def test_mixed_precision_cached_equals_fresh():
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        keras.utils.set_random_seed(0)
        model = tfbit.BitForImageClassification(tfbit.BitConfig(**SMALL))
    finally:
        keras.config.set_dtype_policy(previous)
    x = tf.constant(random_images(2, 64, 64))
    fresh = np.asarray(tf.function(lambda t: model(t, training=True))(x))
    cached = tf.function(lambda t: model(t, training=False))
    cached(x)
    np.testing.assert_array_equal(np.asarray(cached(x)), fresh)
    assert model.predict_on_batch(x).dtype == np.float32


def test_weights_and_keras_files_are_unchanged(tmp_path):
    keras.utils.set_random_seed(0)
    config = tfbit.BitConfig(**SMALL)
    model = tfbit.BitForImageClassification(config)
    x = random_images(2, 64, 64)
    model.predict_on_batch(x)
    folded = tfbit.fold_weight_standardization(model)
    # the standardized copies are not weights: not listed, not saved, not trained
    assert [w.path for w in model.weights] == [w.path for w in folded.weights]
    assert len(model.trainable_weights) == len(folded.trainable_weights) and not model.non_trainable_weights
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    np.testing.assert_array_equal(loaded.predict_on_batch(x), model.predict_on_batch(x))
    # a file written without the cache (the folded form) loads as before
    folded.save(tmp_path / "folded.keras")
    assert_parity(keras.saving.load_model(tmp_path / "folded.keras").predict_on_batch(x), model(x, training=True))


def test_keras_export_of_the_default_model_holds_current_kernels(tmp_path):
    """`model.export` (Keras' SavedModel) of a standardizing model: the standardized copies are
    captured state, so the export after a weight change serves the new weights."""
    keras.utils.set_random_seed(0)
    model = tfbit.BitForImageClassification(tfbit.BitConfig(**SMALL))
    x = random_images(2, 32, 32)
    model.predict_on_batch(x)
    model.set_weights([w * 1.5 + 0.01 for w in model.get_weights()])
    model.export(str(tmp_path / "exported"), verbose=False)
    exported = tf.saved_model.load(str(tmp_path / "exported"))  # owns the variables `serve` reads
    served = exported.serve(x).numpy()
    assert_parity(served, model(x, training=True), "exported SavedModel")


def test_tf_saved_model_save_of_the_default_model_holds_current_kernels(tmp_path):
    """`tf.saved_model.save(model)` (TensorFlow's own export) reaches the cached kernels too."""
    keras.utils.set_random_seed(0)
    model = tfbit.BitForImageClassification(tfbit.BitConfig(**SMALL))
    x = random_images(2, 32, 32)
    model.predict_on_batch(x)
    model.set_weights([w * 1.5 + 0.01 for w in model.get_weights()])
    tf.saved_model.save(model, str(tmp_path / "saved"))
    loaded = tf.saved_model.load(str(tmp_path / "saved"))
    served = loaded.signatures["serving_default"](tf.constant(x))
    (logits,) = served.values()
    assert_parity(logits.numpy(), model(x, training=True), "tf.saved_model.save")


def test_user_flow_in_a_fresh_interpreter(two_checkpoints, tmp_path):
    """from_pretrained -> predict -> set_weights -> predict, as a user runs it, against transformers."""
    (path_a, _), (path_b, hf_b) = two_checkpoints
    x = random_images(2, 64, 64)
    np.save(tmp_path / "x.npy", x)
    code = (
        f"import numpy as np, tfbit; x = np.load({str(tmp_path / 'x.npy')!r});"
        f"m = tfbit.BitForImageClassification.from_pretrained({str(path_a)!r}); m.predict(x, verbose=0);"
        f"m.set_weights(tfbit.BitForImageClassification.from_pretrained({str(path_b)!r}).get_weights());"
        f"np.save({str(tmp_path / 'out.npy')!r}, m.predict(x, verbose=0))"
    )
    env = {**os.environ, "PYTHONPATH": ROOT, "TF_CPP_MIN_LOG_LEVEL": "2"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=300)
    assert_parity(np.load(tmp_path / "out.npy"), run_torch(hf_b, x).logits, "predict after set_weights")


def _xla_functions(saved_model_dir):
    from tensorflow.core.protobuf import saved_model_pb2

    proto = saved_model_pb2.SavedModel()
    proto.ParseFromString((saved_model_dir / "saved_model.pb").read_bytes())
    return [f.signature.name for f in proto.meta_graphs[0].graph_def.library.function if f.attr["_XlaMustCompile"].b]


def test_convert_saved_model_xla_cli_verifies_and_compiles_the_forward_pass(tmp_path):
    """`--saved-model-xla` as a user types it: the served graph holds an XLA-compiled forward pass,
    both signatures verified against PyTorch like the default SavedModel."""
    out = tmp_path / "digits"
    cmd = [
        sys.executable,
        "-m",
        "conversion.convert",
        "--formats",
        "saved_model",
        "--saved-model-xla",
        "--output",
        str(out),
        "--num-images",
        "8",
    ]
    proc = subprocess.run(
        cmd, cwd=ROOT, capture_output=True, text=True, timeout=900, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    import json

    report = json.loads((out / "report.json").read_text())
    rows = {r["artifact"]: r for r in report["artifacts"]}
    assert rows["saved_model[pixel_values]"]["passed"] and rows["saved_model[pixel_values]"]["criterion"] == "parity"
    assert rows["saved_model[image_bytes]"]["passed"]
    assert _xla_functions(out / "serving" / "1"), "no function of the SavedModel is XLA-compiled"
    serve = tf.saved_model.load(str(out / "serving" / "1")).signatures["pixel_values"]
    assert serve(pixel_values=tf.zeros((2, 64, 64, 3)))["logits"].shape == (2, 10)


def test_default_saved_model_is_not_xla_compiled(tmp_path):
    """TF Serving runs the default SavedModel without any XLA flag."""
    from conversion import export

    keras.utils.set_random_seed(0)
    config = tfbit.BitConfig(**SMALL)
    model = export.float32_inference_model(tfbit.BitForImageClassification(config))
    export.write_saved_model(model, "classification", {}, config.id2label, str(tmp_path / "plain"))
    assert _xla_functions(tmp_path / "plain") == []
