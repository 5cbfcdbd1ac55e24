"""The README's and docs/' offline examples run as written."""

import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_models_example_runs_and_its_comments_hold():
    namespace = {}
    exec(BLOCKS[0], namespace)
    out, maps = namespace["out"], namespace["maps"]
    assert tuple(out["last_hidden_state"].shape) == (2, 7, 7, 2048)
    assert tuple(out["pooler_output"].shape) == (2, 2048)
    assert len(out["hidden_states"]) == 5
    assert tuple(namespace["logits"].shape) == (1, 10) and namespace["logits"].dtype == "float32"
    assert list(maps) == ["stage2", "stage4"] and namespace["backbone"].channels == [512, 2048]


def _blocks(page, language):
    return re.findall(rf"```{language}\n(.*?)```", (README.parent / page).read_text(), re.S)


def test_your_own_keras_model_recipe_runs_as_typed(tmp_path, hf_checkpoint):
    """docs/own-model.md in fresh processes, offline, on real photos, with the body from a local
    hub cache (huggingface_hub's real layout). The body has google/bit-50's depths, on which the
    page's counts of trainable weights depend, at a narrow width: as tests/test_docs.py does, the
    blocks name it `google/bit-small` (tfbit checks that `google/bit-50` is a full-size R50x1,
    whose conversion tests/test_realistic_r50.py runs). The page's parameter count is checked on
    the full-size architecture."""
    import json
    import os
    import shlex
    import subprocess
    import sys

    from PIL import Image
    from test_hub import write_hub_cache

    import tfbit

    full_size = tfbit.BitModel(tfbit.BitConfig()).count_params() + 2048 * 3 + 3  # + the 3-label head
    page = (README.parent / "docs" / "own-model.md").read_text()
    assert f"your Functional built on tfbit, 3 labels, {full_size / 1e6:.1f} M parameters" in page

    narrow = dict(embedding_size=16, hidden_sizes=[32, 64, 96, 128], depths=[3, 4, 6, 3], num_groups=8)
    checkpoint, _ = hf_checkpoint(num_labels=1000, **narrow)
    (checkpoint / "preprocessor_config.json").write_text(
        json.dumps(
            {
                "image_processor_type": "BitImageProcessor",
                "size": {"shortest_edge": 256},
                "crop_size": {"height": 224, "width": 224},
                "image_mean": [0.5] * 3,
                "image_std": [0.5] * 3,
            }
        )
    )
    cache = tmp_path / "hub"
    write_hub_cache(
        cache,
        "google/bit-small",
        {f: checkpoint / f for f in ("config.json", "model.safetensors", "preprocessor_config.json")},
    )
    photos = README.parent / "conversion" / "photos"
    for label, names in {
        "cat": ["chelsea", "chelsea_eyes"],
        "coffee": ["coffee", "coffee_cup"],
        "rocket": ["rocket", "rocket_tower"],
    }.items():
        (tmp_path / "photos" / label).mkdir(parents=True)
        for i, name in enumerate(names):
            image = Image.open(photos / f"{name}.jpg").convert("RGB")
            image.save(tmp_path / "photos" / label / f"{2 * i}.jpg")
            image.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(tmp_path / "photos" / label / f"{2 * i + 1}.jpg")
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "TF_CPP_MIN_LOG_LEVEL": "2"}
    env.pop("PYTHONPATH", None)

    def run(args, codes=(0,)):
        done = subprocess.run(
            [sys.executable, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1200
        )
        assert done.returncode in codes, done.stdout[-3000:] + done.stderr[-3000:]
        return done.stdout

    python, bash = _blocks("docs/own-model.md", "python")[0], _blocks("docs/own-model.md", "bash")[0]
    assert 'tfbit.load_model("google/bit-50", task="features")' in python
    python = python.replace("google/bit-50", "google/bit-small")
    counts = "\nprint('COUNTS', len(model.trainable_weights), len(base.trainable_weights), model.count_params())\n"
    trained = python.replace("model.fit(train, epochs=2)\n", "model.fit(train, epochs=2)\n" + counts)
    out = run(["-c", trained + counts])
    first, last = [line.split()[1:] for line in out.splitlines() if line.startswith("COUNTS")]
    assert first[:2] == ["2", "0"]  # as the page's comments say
    assert last[:2] == ["87", "85"]
    assert (tmp_path / "labels.txt").read_text() == "cat\ncoffee\nrocket"
    commands = [shlex.split(line.split("#")[0]) for line in bash.strip().splitlines()]
    assert [c[:3] for c in commands] == [
        ["python", "-m", "conversion.convert"],
        ["python", "-m", "conversion.predict"],
        ["python", "-m", "conversion.predict"],
    ]
    converted = run(commands[0][1:], codes=(0, 1))
    assert f"your Functional built on tfbit, 3 labels, {int(last[2]) / 1e6:.1f} M parameters" in converted
    assert "reference: your Keras model" in converted
    report = json.loads((tmp_path / "export" / "report.json").read_text())
    rows = {row["artifact"]: row for row in report["artifacts"]}
    lossless = ["keras", "saved_model[pixel_values]", "tflite_fp32"]
    assert all(rows[name]["passed"] and rows[name]["published"] for name in lossless + ["saved_model[image_bytes]"])
    # A random-weight body barely separates the photos (logits within ~0.3 of each other): the
    # quantized files may disagree on those near-ties and are then left out, as the page says
    # of full int8. Trained weights are what the lossy bounds are calibrated on.
    assert all(rows[name]["published"] == rows[name]["passed"] for name in rows)
    served, own = run(commands[1][1:]), run(commands[2][1:])
    assert served.splitlines()[0] == own.splitlines()[0] == "photos/cat/1.jpg"
    assert served.split()[2] == own.split()[2]  # the same top label


def test_readme_is_a_front_door_and_every_link_resolves():
    text = README.read_text()
    assert len(text.splitlines()) <= 250
    pages = sorted((README.parent / "docs").glob("*.md"))
    assert {p.name for p in pages} <= set(re.findall(r"\(docs/([\w-]+\.md)\)", text))  # every page linked
    for page in [README, *pages]:
        for link in re.findall(r"\]\(([\w./-]+\.md)\)", page.read_text()):
            assert (page.parent / link).exists(), f"{page.name} links to {link}, which does not exist"
