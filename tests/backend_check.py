"""tfbit under the Keras backend the caller chose: parity with transformers, fine-tuning, `.keras`.

    KERAS_BACKEND=jax PYTHONPATH=.venv/jax python tests/backend_check.py OUTPUT_DIR
    KERAS_BACKEND=jax PYTHONPATH=.venv/jax XLA_FLAGS=--xla_force_host_platform_device_count=2 \
        python tests/backend_check.py OUTPUT_DIR --data-parallel

Run by tests/test_backends.py in a fresh process per backend (the backend is fixed at the first
`import keras`). It measures and prints one JSON object as its last line; the test asserts. It
also leaves in OUTPUT_DIR a `.keras` classifier written under this backend, its
preprocessor_config.json, and `expected.npz` (pixel values and transformers' logits on them) for
the converter, which runs under TensorFlow.
"""

import json
import os
import sys

import keras  # the backend first: torch is imported after it (the other order can abort)
import numpy as np
import torch  # after keras and its backend, on purpose
import transformers
from conftest import SMALL, nhwc, perturb_, random_images, run_torch, tolerance
from test_parity_hf import HYBRID

import tfbit
from tfbit.finetune import from_arrays
from tfbit.finetune.trainer import finetune
from tfbit.finetune.transfer import with_new_head

torch.set_num_threads(2)

# the pre-activation BiT, and the hybrid-ViT variant with TF-SAME padding and the dynamically
# padded stem pool (the compiled paths of JAX need its pad widths static)
PARITY_CONFIGS = {"preactivation": SMALL, "hybrid_bottleneck_same_dynamic": HYBRID}
TINY = dict(embedding_size=16, hidden_sizes=[32, 64], depths=[1, 1], num_groups=8, num_labels=3)


def scaled_delta(actual, reference):
    """max |delta| in units of the contract's scale: parity holds when this is <= 1e-4."""
    return float(np.abs(actual - reference).max()) * 1e-4 / tolerance(reference)


def relative_delta(actual, reference):
    """`scaled_delta` of a backend tensor and a transformers output (NCHW, or NC11 for HF's
    pooler)."""
    actual = keras.ops.convert_to_numpy(actual)
    return scaled_delta(actual, nhwc(reference).reshape(actual.shape))


def hf_model(class_name, path, seed=0, **config):
    torch.manual_seed(seed)
    model = perturb_(getattr(transformers, class_name)(transformers.BitConfig(**config)), seed)
    model.save_pretrained(path)
    return model


def parity(workdir):
    """Worst relative delta per config over logits (eager and compiled `predict`) and, for the
    first config, the folded inference form, pooler, every hidden state and the backbone maps."""
    results = {}
    x = random_images(2, 64, 64)
    for name, config in PARITY_CONFIGS.items():
        path = os.path.join(workdir, name)
        reference = hf_model("BitForImageClassification", path, **config)
        ref = run_torch(reference, x, output_hidden_states=True)
        classifier = tfbit.BitForImageClassification.from_pretrained(path)
        deltas = [
            relative_delta(classifier(x), ref.logits),
            relative_delta(classifier.predict(x, verbose=0), ref.logits),
        ]
        if not results:
            body = tfbit.BitModel.from_pretrained(path, output_hidden_states=True)(x)
            config = tfbit.BitConfig.from_dict(
                {**classifier.config.to_dict(), "out_indices": [1, 2, 3, 4], "out_features": None}
            )
            maps = tfbit.BitBackbone.from_pretrained(path, config=config)(x)
            deltas += [
                relative_delta(tfbit.fold_weight_standardization(classifier)(x), ref.logits),
                relative_delta(body["pooler_output"], run_torch(reference.bit, x).pooler_output),
            ]
            deltas += [relative_delta(a, r) for a, r in zip(body["hidden_states"], ref.hidden_states)]
            deltas += [relative_delta(maps[f"stage{i}"], ref.hidden_states[i]) for i in range(1, 5)]
        results[name] = max(deltas)
    return results


def training_step(workdir):
    """One SGD step (lr 1, no momentum) on the same batch in tfbit (`train_on_batch`) and in
    transformers (its own loss): the largest difference of any updated weight, relative to the
    contract's scale of the update transformers made."""
    path = os.path.join(workdir, "step_before")
    reference = hf_model("BitForImageClassification", path, seed=1, **TINY).train()
    x, labels = random_images(4, 48, 48, seed=1), np.array([0, 2, 1, 2])
    model = tfbit.BitForImageClassification.from_pretrained(path)
    before = model.get_weights()
    model.compile(keras.optimizers.SGD(1.0), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.train_on_batch(x, labels)

    optimizer = torch.optim.SGD(reference.parameters(), lr=1.0)
    loss = reference(
        torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))), labels=torch.from_numpy(labels)
    ).loss
    loss.backward()
    optimizer.step()
    reference.save_pretrained(os.path.join(workdir, "step_after"))
    expected = tfbit.BitForImageClassification.from_pretrained(os.path.join(workdir, "step_after"))
    return max(scaled_delta(w - w0, r - w0) for w, r, w0 in zip(model.get_weights(), expected.get_weights(), before))


def schedule_and_heads():
    """BiTSchedule evaluated by the backend, and new heads with a frozen body trained by fit."""
    schedule = tfbit.BiTSchedule(0.1, 10, [20, 30])
    rates = [float(keras.ops.convert_to_numpy(schedule(step))) for step in (0, 5, 10, 20, 21, 31)]
    keras.utils.set_random_seed(0)
    frozen = with_new_head(tfbit.BitModel(tfbit.BitConfig(**TINY)), num_labels=4, freeze_backbone=True)
    head_is_zero = not np.any(keras.ops.convert_to_numpy(frozen.get_layer("classifier").kernel))
    body = [w.copy() for w in frozen.get_weights()]
    frozen.compile(
        keras.optimizers.SGD(0.1, momentum=0.9), keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    history = frozen.fit(random_images(8, 32, 32), np.arange(8) % 4, batch_size=4, epochs=3, verbose=0)
    changed = {w.path: not np.array_equal(keras.ops.convert_to_numpy(w.value), b) for w, b in zip(frozen.weights, body)}
    return {
        "schedule": rates,
        "new_head_is_zero": head_is_zero,
        "trainable": [w.path for w in frozen.trainable_weights],
        "changed": sorted(path for path, c in changed.items() if c),
        "fit_losses": [float(v) for v in history.history["loss"]],
    }


def digits_like_data():
    rng = np.random.RandomState(0)
    y = np.arange(24) % 3
    x = np.clip(rng.normal(60 + 60 * y[:, None, None, None], 30, (24, 40, 40, 3)), 0, 255).astype("uint8")
    return from_arrays(x, y, ["dark", "mid", "bright"])


def run_finetune(output_dir, source):
    """`tfbit.finetune` with MixUp, validation, the HyperRule schedule scaled to 6 steps."""
    data = digits_like_data()
    return finetune(
        source,
        data,
        output_dir,
        data,
        batch_size=8,
        epochs=2,
        steps=6,
        seed=0,
        verbose=0,
        plan_overrides=dict(crop_size=32, resize_size=36, mixup_alpha=0.1, base_lr=0.1),
    )


def finetuning(workdir):
    keras.utils.set_random_seed(0)
    result = run_finetune(os.path.join(workdir, "finetune"), tfbit.BitModel(tfbit.BitConfig(**TINY)))
    x = random_images(2, 32, 32)
    reloaded = keras.saving.load_model(os.path.join(workdir, "finetune", "best.keras"))
    return {
        "final_step": result.metrics["final_step"],
        "losses": result.history["loss"],
        "learning_rate": result.history["learning_rate"],
        "files": sorted(os.listdir(os.path.join(workdir, "finetune"))),
        "reloaded_delta": float(np.abs(keras.ops.convert_to_numpy(reloaded(x) - result.model(x))).max()),
    }


def strategy_error(workdir):
    """The message of `finetune(strategy=...)`, which only the TensorFlow backend can honour."""
    import tensorflow as tf

    try:
        finetune(
            tfbit.BitModel(tfbit.BitConfig(**TINY)),
            digits_like_data(),
            os.path.join(workdir, "refused"),
            strategy=tf.distribute.get_strategy(),
        )
    except ValueError as e:
        return str(e)
    return None


def keras_file_for_conversion(workdir, output_dir):
    """A classifier loaded from transformers and saved as `.keras` under this backend, with the
    preprocessing and the expected logits the converted artifacts must reproduce."""
    from conversion import images
    from tfbit.preprocessing.processor import BitImageProcessor

    path = os.path.join(workdir, "to_convert")
    reference = hf_model("BitForImageClassification", path, seed=2, **SMALL)
    model = tfbit.BitForImageClassification.from_pretrained(path)
    processor = BitImageProcessor(size={"shortest_edge": 72}, crop_size=64)
    pixel_values = processor(images.photo_images(4).images)
    model.save(os.path.join(output_dir, "bit.keras"))
    processor.save_pretrained(output_dir)
    logits = run_torch(reference, pixel_values).logits.numpy()
    np.savez(os.path.join(output_dir, "expected.npz"), pixel_values=pixel_values, logits=logits)
    reloaded = keras.saving.load_model(os.path.join(output_dir, "bit.keras"))
    return {
        "saved_delta": relative_delta(model(pixel_values), logits),
        "reloaded_equal": bool(
            np.array_equal(
                keras.ops.convert_to_numpy(reloaded(pixel_values)), keras.ops.convert_to_numpy(model(pixel_values))
            )
        ),
    }


def data_parallel(workdir):
    """The same fine-tune on one device and under `keras.distribution.DataParallel` over every
    local device: the weights it ends with, and where they live."""
    single = run_finetune(
        os.path.join(workdir, "single"), tfbit.BitModel.from_pretrained(os.path.join(workdir, "dp_source"))
    )
    keras.distribution.set_distribution(keras.distribution.DataParallel())
    distributed = run_finetune(
        os.path.join(workdir, "distributed"), tfbit.BitModel.from_pretrained(os.path.join(workdir, "dp_source"))
    )
    weights = distributed.model.get_layer("stem_conv").kernel.value
    return {
        "devices": len(keras.distribution.list_devices()),
        "weight_devices": len(weights.sharding.device_set),
        "num_replicas": distributed.metrics["num_replicas"],
        "final_step": distributed.metrics["final_step"],
        "weight_delta": max(
            float(np.abs(a - b).max()) for a, b in zip(single.model.get_weights(), distributed.model.get_weights())
        ),
        "loss_delta": max(abs(a - b) for a, b in zip(single.history["loss"], distributed.history["loss"])),
    }


def main(output_dir, data_parallel_only=False):
    import tempfile

    report = {"backend": keras.backend.backend()}
    with tempfile.TemporaryDirectory() as workdir:
        if data_parallel_only:
            hf_model("BitModel", os.path.join(workdir, "dp_source"), **TINY)
            report["data_parallel"] = data_parallel(workdir)
        else:
            report["parity"] = parity(workdir)
            report["training_step"] = training_step(workdir)
            report.update(schedule_and_heads())
            report["finetune"] = finetuning(workdir)
            report["keras_file"] = keras_file_for_conversion(workdir, output_dir)
            report["strategy_error"] = strategy_error(workdir)
    print(json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1], "--data-parallel" in sys.argv[2:])
