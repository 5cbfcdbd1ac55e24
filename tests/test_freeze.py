"""Freezing as Keras defines it, for a tfbit body inside a user's own model (keras.io's
transfer-learning recipe), checked in fresh processes against Keras' own nested model.

Keras' semantics (keras.io/guides/transfer_learning): `layer.trainable = False` moves every
weight of the layer, and of the layers it holds, to `non_trainable_weights`; a model nested in
another contributes only its trainable weights; the flag is part of the saved config, so a
`.keras` file reloads frozen and its optimizer state (built for the trainable weights only)
loads without a "Skipping variable loading" warning; `trainable = True` unfreezes everything.
"""

import json
import os
import subprocess
import sys

import pytest
from conftest import SMALL

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Each variant: a body, the user's Dropout + Dense head, one `fit` epoch, `model.save`.
BUILD = r"""
import json, sys, warnings
import numpy as np
import keras, tfbit

checkpoint, out = sys.argv[1], sys.argv[2]
keras.utils.set_random_seed(0)
x = np.random.RandomState(0).uniform(-1, 1, (8, 64, 64, 3)).astype("float32")
y = np.arange(8) % 3


def head(features):
    return keras.layers.Dense(3, name="head")(keras.layers.Dropout(0.2)(features))


def functional(base):
    inputs = keras.Input((64, 64, 3))
    features = base(inputs, training=False)["pooler_output"]
    return keras.Model(inputs, head(features))


def keras_control():
    # Keras' own nested functional model, frozen the same way: the control
    inputs = keras.Input((None, None, 3))
    h = keras.layers.Conv2D(8, 3, name="c1")(inputs)
    h = keras.layers.Conv2D(8, 3, name="c2")(h)
    base = keras.Model(inputs, {"pooler_output": keras.layers.GlobalAveragePooling2D()(h)}, name="control")
    base.trainable = False
    return functional(base)


def after():
    base = tfbit.BitModel.from_pretrained(checkpoint)
    base.trainable = False
    return functional(base)


def at_construction():
    base = tfbit.BitModel(tfbit.BitConfig.from_pretrained(checkpoint), trainable=False)
    return functional(base)


def partial():
    base = tfbit.BitModel.from_pretrained(checkpoint)
    base.freeze_stages("stage2")
    return functional(base)


def sequential():
    config = tfbit.BitConfig.from_dict({**tfbit.BitConfig.from_pretrained(checkpoint).to_dict(),
                                        "num_labels": 0, "id2label": None, "label2id": None})
    base = tfbit.BitForImageClassification(config)  # no labels: the pooled features
    base.trainable = False
    return keras.Sequential([keras.Input((64, 64, 3)), base, keras.layers.Dropout(0.2),
                             keras.layers.Dense(3, name="head")])


results = {}
for variant in ("keras_control", "after", "at_construction", "partial", "sequential"):
    model = globals()[variant]()
    body = model.layers[0] if isinstance(model, keras.Sequential) else model.layers[1]
    before = [w.numpy().copy() for w in body.weights]
    model.compile(keras.optimizers.Adam(1e-2), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, epochs=1, batch_size=4, verbose=0)
    moved = [w.path for a, w in zip(before, body.weights) if not np.array_equal(a, w.numpy())]
    model.save(f"{out}/{variant}.keras")
    results[variant] = {"trainable": len(model.trainable_weights), "body_weights": len(body.weights),
                        "body_trainable": [w.path for w in body.trainable_weights], "moved": moved}
json.dump(results, open(f"{out}/built.json", "w"))
"""

# A new process: reload each file, one more `fit` step, which body weights moved.
RELOAD = r"""
import json, sys, warnings
import numpy as np
import keras, tfbit

out = sys.argv[1]
x = np.random.RandomState(1).uniform(-1, 1, (4, 64, 64, 3)).astype("float32")
y = np.arange(4) % 3
results = {}
for variant in json.load(open(f"{out}/built.json")):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = keras.saving.load_model(f"{out}/{variant}.keras")
        body = model.layers[0] if isinstance(model, keras.Sequential) else model.layers[1]
        before = [w.numpy().copy() for w in body.weights]
        model.fit(x, y, epochs=1, batch_size=4, verbose=0)
    results[variant] = {
        "trainable": len(model.trainable_weights), "body_flag": body.trainable,
        "body_trainable": [w.path for w in body.trainable_weights],
        "moved": [w.path for a, w in zip(before, body.weights) if not np.array_equal(a, w.numpy())],
        "warnings": [str(w.message) for w in caught if "Skipping variable loading" in str(w.message)]}
json.dump(results, open(f"{out}/reloaded.json", "w"))
"""

VARIANTS = ("keras_control", "after", "at_construction", "partial", "sequential")


def _python(code, *args):
    env = {**os.environ, "PYTHONPATH": ROOT, "TF_CPP_MIN_LOG_LEVEL": "2"}
    done = subprocess.run(
        [sys.executable, "-c", code, *map(str, args)], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, torch_module):
    import transformers
    from conftest import perturb_

    root = tmp_path_factory.mktemp("freeze")
    torch_module.manual_seed(0)
    config = {k: v for k, v in SMALL.items() if k != "num_labels"}
    perturb_(transformers.BitModel(transformers.BitConfig(**config))).save_pretrained(root / "bit")
    _python(BUILD, root / "bit", root)
    _python(RELOAD, root)
    return (json.loads((root / "built.json").read_text()), json.loads((root / "reloaded.json").read_text()))


@pytest.mark.parametrize("variant", ["keras_control", "after", "at_construction", "sequential"])
def test_frozen_body_stays_frozen_through_fit_save_and_reload(runs, variant):
    built, reloaded = runs[0][variant], runs[1][variant]
    assert built["trainable"] == 2 and built["body_trainable"] == [] and built["moved"] == []
    assert reloaded["body_flag"] is False
    assert reloaded["trainable"] == 2 and reloaded["body_trainable"] == []
    assert reloaded["moved"] == [], f"a frozen body weight trained after reloading: {reloaded['moved'][:3]}"
    assert reloaded["warnings"] == []


def test_partial_freeze_trains_only_the_top_stages_before_and_after_reload(runs):
    built, reloaded = runs[0]["partial"], runs[1]["partial"]

    def stages(paths):
        return {p.split("/")[-2].split("_")[0] for p in paths}

    # stem, stage1 and stage2 frozen; stage3, stage4 and the final norm train
    assert stages(built["body_trainable"]) == {"stage3", "stage4", "norm"}
    assert set(built["moved"]) == set(built["body_trainable"])
    assert reloaded["body_flag"] is True and reloaded["body_trainable"] == built["body_trainable"]
    assert reloaded["trainable"] == built["trainable"]
    assert set(reloaded["moved"]) == set(built["body_trainable"])
    assert reloaded["warnings"] == []


def test_trainable_false_freezes_every_weight_of_every_model_class():
    import tfbit

    config = tfbit.BitConfig(**SMALL)
    for cls in (tfbit.BitModel, tfbit.BitForImageClassification, tfbit.BitBackbone):
        model = cls(config, trainable=False)
        assert model.trainable_weights == [] and len(model.non_trainable_weights) == len(model.weights), cls
        model.trainable = True  # Keras: unfreezing the model unfreezes every layer
        assert len(model.trainable_weights) == len(model.weights), cls


def test_freeze_stages_names_and_errors():
    import tfbit

    model = tfbit.BitModel(tfbit.BitConfig(**SMALL))
    frozen = model.freeze_stages(1)
    assert frozen[0] == "stem_conv" and all(n.startswith(("stem_", "stage1_")) for n in frozen)
    assert model.frozen_layers() == frozen
    assert model.get_config()["frozen_layers"] == frozen
    clone = tfbit.BitModel.from_config(model.get_config())
    assert clone.frozen_layers() == frozen
    assert tfbit.fold_weight_standardization(model).frozen_layers() == frozen
    model.trainable = False
    assert "frozen_layers" not in model.get_config()  # the whole model is frozen: the flag says it
    with pytest.raises(
        ValueError,
        match=r"freeze_stages: 'stage9' is not a stage of this model: choose from "
        r"stem, stage1, stage2, stage3, stage4",
    ):
        model.freeze_stages("stage9")
    with pytest.raises(ValueError, match=r"stage index 5 is out of range: 0 \(stem\) to 4"):
        model.freeze_stages(5)


def test_finetune_freeze_backbone_survives_reload(tmp_path):
    """with_new_head(freeze_backbone=True) freezes layers inside the model: kept by get_config."""
    import keras

    import tfbit
    from tfbit.finetune.transfer import with_new_head

    model = with_new_head(tfbit.BitModel(tfbit.BitConfig(**SMALL)), num_labels=3, freeze_backbone=True)
    assert [w.path.split("/")[-2] for w in model.trainable_weights] == ["classifier", "classifier"]
    model.save(tmp_path / "m.keras")
    reloaded = keras.saving.load_model(tmp_path / "m.keras")
    assert [w.path for w in reloaded.trainable_weights] == [w.path for w in model.trainable_weights]
