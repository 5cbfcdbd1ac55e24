"""The checkpoint `finetune` writes loads after `import tfbit` alone, in a new process, with its
optimizer: the BiT schedule is registered by `tfbit`, not by the fine-tuning input pipelines."""

import json
import subprocess
import sys
import textwrap

import numpy as np
from conftest import random_images

import tfbit
from tfbit.finetune import from_arrays
from tfbit.finetune.trainer import finetune

TINY = dict(embedding_size=16, hidden_sizes=[32, 64], depths=[1, 1], num_groups=8, num_labels=3)

_LOAD = textwrap.dedent("""
    import json, sys
    import keras, numpy as np
    import tfbit
    model = keras.saving.load_model(sys.argv[1])  # compile=True: the optimizer comes back too
    optimizer = model.optimizer
    np.savez(sys.argv[3], logits=model.predict(np.load(sys.argv[2]), verbose=0),
             *[v.numpy() for v in optimizer.variables])
    print(json.dumps({"iterations": int(optimizer.iterations.numpy()),
                      "learning_rate": optimizer.get_config()["learning_rate"]}))
""")


def test_best_checkpoint_loads_with_its_optimizer_in_a_fresh_process(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (24, 32, 32, 3), dtype=np.uint8)
    train = from_arrays(images, np.arange(24) % 3, ["a", "b", "c"])
    result = finetune(
        tfbit.BitForImageClassification(tfbit.BitConfig(**TINY)),
        train,
        str(tmp_path),
        batch_size=8,
        epochs=1,
        steps=5,
        plan_overrides=dict(crop_size=32, resize_size=32),
        random_flip=False,
        verbose=0,
    )
    x = random_images(4, 32, 32)
    np.save(tmp_path / "x.npy", x)

    child = subprocess.run(
        [
            sys.executable,
            "-c",
            _LOAD,
            str(tmp_path / "best.keras"),
            str(tmp_path / "x.npy"),
            str(tmp_path / "loaded.npz"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert child.returncode == 0, child.stderr[-3000:]
    loaded = json.loads(child.stdout.strip().splitlines()[-1])
    assert loaded["iterations"] == result.model.optimizer.iterations.numpy() == 5
    schedule = loaded["learning_rate"]
    assert schedule["registered_name"] == "tfbit>BiTSchedule"
    assert schedule["config"] == json.loads(json.dumps(result.plan.schedule().get_config()))

    arrays = np.load(tmp_path / "loaded.npz")
    np.testing.assert_allclose(arrays["logits"], result.model.predict(x, verbose=0), rtol=0, atol=1e-6)
    momenta = [arrays[f"arr_{i}"] for i in range(len(arrays.files) - 1)]
    expected = [v.numpy() for v in result.model.optimizer.variables]
    assert len(momenta) == len(expected) > 2
    for got, want in zip(momenta, expected):
        np.testing.assert_array_equal(got, want)


def test_predict_and_convert_on_the_fine_tuning_output_in_fresh_processes(tmp_path):
    """The run folder is a source like any other: `predict runs/x` uses best.keras with the
    config and preprocessing written beside it, `convert runs/x/best.keras` exports it."""
    import os

    from PIL import Image

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (24, 40, 40, 3), dtype=np.uint8)
    run = tmp_path / "run"
    finetune(
        tfbit.BitForImageClassification(tfbit.BitConfig(**TINY)),
        from_arrays(images, np.arange(24) % 3, ["cat", "dog", "eel"]),
        str(run),
        batch_size=8,
        epochs=1,
        steps=2,
        plan_overrides=dict(crop_size=32, resize_size=32),
        random_flip=False,
        verbose=0,
    )
    Image.fromarray(images[0]).save(tmp_path / "photo.png")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    predicted = subprocess.run(
        [sys.executable, "-m", "conversion.predict", str(run), str(tmp_path / "photo.png"), "--json", "--top-k", "3"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    (result,) = json.loads(predicted.stdout)
    assert sorted(t["label"] for t in result["top"]) == ["cat", "dog", "eel"]
    converted = subprocess.run(
        [
            sys.executable,
            "-m",
            "conversion.convert",
            str(run / "best.keras"),
            "--output",
            str(tmp_path / "export"),
            "--formats",
            "keras",
            "saved_model",
            "--num-images",
            "4",
        ],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert converted.returncode == 0, converted.stdout[-3000:] + converted.stderr[-3000:]
    assert (tmp_path / "export" / "serving" / "1" / "saved_model.pb").exists()
    exported = json.loads((tmp_path / "export" / "preprocessor_config.json").read_text())
    assert exported["size"] == {"height": 32, "width": 32}  # the fine-tuning resolution, not 224
