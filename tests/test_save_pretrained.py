"""`model.save_pretrained(directory)` back to transformers: what tfbit writes, transformers'
`from_pretrained` loads in a fresh process (the user's next step) and computes the same outputs
with, within 1e-5 of the outputs' scale; labels and preprocessing travel with it."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import SMALL, random_images

import tfbit
from tfbit.preprocessing.processor import BitImageProcessor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LABELS = {0: "cat", 1: "dog", 2: "eel"}
PROCESSOR = BitImageProcessor(size={"shortest_edge": 36}, crop_size={"height": 32, "width": 32})

# transformers in its own interpreter: each case's checkpoint loaded with the class it names,
# run on the case's images; the outputs come back as one .npz.
TRANSFORMERS_RUN = """
import json, sys
import numpy as np, torch, transformers
cases, out = json.load(open(sys.argv[1])), {}
for i, case in enumerate(cases):
    model = getattr(transformers, case["class"]).from_pretrained(case["dir"]).eval()
    x = torch.from_numpy(np.load(case["images"]).transpose(0, 3, 1, 2).copy())
    with torch.no_grad():
        result = model(x)
    if case["class"] == "BitForImageClassification":
        out[f"{i}/logits"] = result.logits.numpy()
        out[f"{i}/labels"] = np.array(json.dumps(model.config.id2label))
    elif case["class"] == "BitModel":
        out[f"{i}/last_hidden_state"] = result.last_hidden_state.numpy().transpose(0, 2, 3, 1)
        out[f"{i}/pooler_output"] = result.pooler_output.numpy()[:, :, 0, 0]
    else:
        for name, fmap in zip(model.out_features, result.feature_maps):
            out[f"{i}/{name}"] = fmap.numpy().transpose(0, 2, 3, 1)
    if case.get("processor"):
        processor = transformers.AutoImageProcessor.from_pretrained(case["dir"])
        out[f"{i}/crop"] = np.array([processor.crop_size["height"], processor.crop_size["width"]])
np.savez(sys.argv[2], **out)
"""


def randomized(model, seed=0, kernel_scale=1.0):
    """Every weight random (norm gammas around 1, betas and head non-zero), so that a wrong
    transpose, key or eps shows in the outputs; small kernels make the eps matter."""
    rng = np.random.RandomState(seed)
    for w in model.weights:
        value = rng.normal(size=w.shape) * (0.2 if len(w.shape) == 1 else kernel_scale)
        w.assign((value + (1.0 if w.path.endswith("gamma") else 0.0)).astype("float32"))
    return model


def run_transformers(cases, tmp_path):
    """Run `cases` (dicts: model, dir, images) through transformers in a fresh interpreter."""
    spec = []
    for i, case in enumerate(cases):
        np.save(tmp_path / f"images{i}.npy", case["images"])
        spec.append(
            {
                "class": type(case["model"]).__name__,
                "dir": str(case["dir"]),
                "images": str(tmp_path / f"images{i}.npy"),
                "processor": case.get("processor", False),
            }
        )
    (tmp_path / "cases.json").write_text(json.dumps(spec))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-c", TRANSFORMERS_RUN, str(tmp_path / "cases.json"), str(tmp_path / "out.npz")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return dict(np.load(tmp_path / "out.npz"))


def assert_close(actual, reference, what):
    """The save_pretrained contract: max |delta| <= 1e-5 x max(1, max |reference|)."""
    actual, reference = np.asarray(actual), np.asarray(reference)
    assert actual.shape == reference.shape, f"{what}: {actual.shape} != {reference.shape}"
    delta, scale = float(np.abs(actual - reference).max()), max(1.0, float(np.abs(reference).max()))
    assert delta <= 1e-5 * scale, f"{what}: max |delta| {delta:.3g} > {1e-5 * scale:.3g}"


def fine_tuned(images):
    """A new head for LABELS trained a few steps with model.fit."""
    import keras

    from tfbit.finetune.transfer import with_new_head

    model = with_new_head(randomized(tfbit.BitModel(tfbit.BitConfig(**SMALL)), seed=9), id2label=LABELS)
    model.compile(
        optimizer=keras.optimizers.SGD(0.1), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    model.fit(images, np.array([0, 2]), epochs=2, verbose=0)
    return model


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """tfbit models of each class and convention, written with save_pretrained, and what
    transformers computes from the written folders."""
    tmp = tmp_path_factory.mktemp("save_pretrained")
    images = random_images(2, 40, 48)
    cases = {
        "classifier": tfbit.BitForImageClassification(tfbit.BitConfig(**SMALL)),
        "features": tfbit.BitModel(tfbit.BitConfig(**SMALL)),
        "backbone": tfbit.BitBackbone(tfbit.BitConfig(**SMALL, out_features=["stem", "stage2", "stage3"])),
        # transformers cannot build width_factor != 1 itself: the writer folds it into the widths
        "wide": tfbit.BitForImageClassification(
            tfbit.BitConfig(**{**SMALL, "hidden_sizes": [16, 32, 48, 64]}, width_factor=2)
        ),
        # the original .npz convention: eps 1e-10, written as standardized kernels
        "npz_eps": tfbit.BitForImageClassification(tfbit.BitConfig(**SMALL, ws_eps=1e-10)),
        "bottleneck": tfbit.BitModel(
            tfbit.BitConfig(**SMALL, layer_type="bottleneck", global_padding="SAME", embedding_dynamic_padding=True)
        ),
    }
    for i, (name, model) in enumerate(cases.items()):
        randomized(model, seed=i, kernel_scale=1e-4 if name == "npz_eps" else 1.0)
    cases["folded"] = tfbit.fold_weight_standardization(cases["npz_eps"])  # the inference form
    cases["tuned"] = fine_tuned(images)
    runs = []
    for name, model in cases.items():
        processor = PROCESSOR if name == "tuned" else None
        model.save_pretrained(tmp / name, preprocessor=processor)
        runs.append({"model": model, "dir": tmp / name, "images": images, "processor": processor is not None})
    outputs = run_transformers(runs, tmp)
    return (
        tmp,
        images,
        cases,
        {
            name: {k.split("/", 1)[1]: v for k, v in outputs.items() if k.split("/")[0] == str(i)}
            for i, name in enumerate(cases)
        },
    )


@pytest.mark.parametrize("name", ["classifier", "wide", "npz_eps", "folded"])
def test_transformers_classifier_computes_the_same_logits(written, name):
    _, images, cases, outputs = written
    assert_close(cases[name](images), outputs[name]["logits"], name)


def test_the_eps_case_tells_the_conventions_apart(written):
    """Kernels written as they are would be standardized by transformers with its 1e-8: on
    these weights that changes the logits ten times beyond the contract, so the test above sees it."""
    _, images, cases, _ = written
    model = cases["npz_eps"]
    with_hf_eps = tfbit.BitForImageClassification(tfbit.BitConfig.from_dict({**model.config.to_dict(), "ws_eps": 1e-8}))
    with_hf_eps.set_weights(model.get_weights())
    assert np.abs(np.asarray(with_hf_eps(images)) - np.asarray(model(images))).max() > 10 * 1e-5


@pytest.mark.parametrize("name", ["features", "bottleneck"])
def test_transformers_bit_model_computes_the_same_features(written, name):
    _, images, cases, outputs = written
    ours = cases[name](images)
    assert_close(ours["last_hidden_state"], outputs[name]["last_hidden_state"], name)
    assert_close(ours["pooler_output"], outputs[name]["pooler_output"], name)


def test_transformers_backbone_returns_the_same_feature_maps(written):
    _, images, cases, outputs = written
    ours = cases["backbone"](images)
    assert set(ours) == {"stem", "stage2", "stage3"}
    for stage, fmap in ours.items():
        assert_close(fmap, outputs["backbone"][stage], stage)


def test_written_folder_has_transformers_files_and_nothing_left_beside_it(written):
    tmp, _, _, _ = written
    assert sorted(os.listdir(tmp / "classifier")) == ["config.json", "model.safetensors"]
    assert not [f for f in os.listdir(tmp) if f.startswith(".")]  # no staging folder left
    config = json.loads((tmp / "wide" / "config.json").read_text())
    assert config["width_factor"] == 1 and config["hidden_sizes"] == [32, 64, 96, 128]
    assert config["architectures"] == ["BitForImageClassification"]


def test_tfbit_reads_back_what_it_wrote(written):
    tmp, images, cases, _ = written
    again = tfbit.BitForImageClassification.from_pretrained(tmp / "npz_eps")
    assert_close(again(images), cases["npz_eps"](images), "tfbit -> transformers folder -> tfbit")


def test_fine_tuned_head_with_custom_labels_and_preprocessor(written):
    """A head fine-tuned with model.fit on new labels: transformers gets the labels, the head and
    the preprocessing the model was trained with."""
    _, images, cases, outputs = written
    model = cases["tuned"]
    assert np.abs(np.asarray(model.get_layer("classifier").kernel)).max() > 0  # the head has moved
    assert_close(model(images), outputs["tuned"]["logits"], "fine-tuned head")
    assert json.loads(str(outputs["tuned"]["labels"])) == {"0": "cat", "1": "dog", "2": "eel"}
    assert list(outputs["tuned"]["crop"]) == [32, 32]


def test_other_files_in_the_folder_are_kept_and_ours_replaced(tmp_path):
    model = tfbit.BitModel(tfbit.BitConfig(**SMALL))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "README.md").write_text("my model card")
    (tmp_path / "out" / "config.json").write_text("{}")
    model.save_pretrained(tmp_path / "out")
    assert (tmp_path / "out" / "README.md").read_text() == "my model card"
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == "bit"


def test_a_missing_preprocessor_file_is_named_and_nothing_is_written(tmp_path):
    model = tfbit.BitModel(tfbit.BitConfig(**SMALL))
    with pytest.raises(FileNotFoundError, match="no preprocessor_config.json at .*nowhere"):
        model.save_pretrained(tmp_path / "out", preprocessor=tmp_path / "nowhere")
    assert os.listdir(tmp_path) == []


def test_finetune_cli_writes_a_transformers_checkpoint(tmp_path):
    """`python -m conversion.finetune ... --save-pretrained` as typed: the folder it writes loads in
    transformers, with the data's labels, computing what best.keras computes."""
    import keras
    from PIL import Image

    rng = np.random.RandomState(0)
    for label in ("ant", "bee"):
        (tmp_path / "data" / label).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.randint(0, 255, (40, 40, 3), np.uint8)).save(tmp_path / "data" / label / f"{i}.png")
    randomized(tfbit.BitModel(tfbit.BitConfig(**SMALL))).save_pretrained(tmp_path / "source")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "conversion.finetune",
            str(tmp_path / "source"),
            "--data",
            str(tmp_path / "data"),
            "--output",
            str(tmp_path / "run"),
            "--steps",
            "2",
            "--epochs",
            "1",
            "--batch-size",
            "4",
            "--crop-size",
            "32",
            "--resize-size",
            "36",
            "--save-pretrained",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"transformers checkpoint: {tmp_path / 'run' / 'transformers'}" in done.stdout
    best = keras.saving.load_model(tmp_path / "run" / "best.keras")
    images = random_images(2, 32, 32, seed=5)
    outputs = run_transformers(
        [{"model": best, "dir": tmp_path / "run" / "transformers", "images": images, "processor": True}], tmp_path
    )
    assert_close(best(images), outputs["0/logits"], "fine-tuned by the CLI")
    assert json.loads(str(outputs["0/labels"])) == {"0": "ant", "1": "bee"}
