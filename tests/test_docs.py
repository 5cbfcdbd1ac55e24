"""Every fenced code block of README.md and docs/ runs as typed, in fresh processes (bash blocks
through bash, with the test environment's bin first on PATH), in a world built the way a user's
machine would hold it: a hub checkpoint in a local hub cache (huggingface_hub's real layout,
offline), real photos, image folders, the demo's export.

One substitution: `google/bit-50` is a preset whose architecture tfbit checks (a full-size R50x1),
and converting and fine-tuning a full-size model in every block would take many minutes; the
blocks run with `bit-50` replaced by `bit-small`, a small random BiT at `google/bit-small`. A
full-size R50x1 converts with the default command in tests/test_realistic_r50.py, and
`google/bit-50` loads full-size weights from a hub cache in tests/test_presets.py.

A block that cannot run on a test machine (a server, a cloud, several hosts, the network) is
listed in EXCUSED with the reason; a block run by another test module is listed in ELSEWHERE.
`test_every_block_is_accounted_for` fails on a new block that is neither run nor listed."""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
from conftest import SMALL
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = ["README.md"] + sorted(f"docs/{name}" for name in os.listdir(os.path.join(ROOT, "docs")))
FENCE = re.compile(r"```(\w*)\n(.*?)```", re.S)

# (page, a text the block holds) -> the test module that runs it
ELSEWHERE = {
    ("README.md", "tfbit.BitModel(config, output_hidden_states=True)"): "tests/test_readme.py",
    ("docs/models.md", "tfbit.BitModel(config, output_hidden_states=True)"): "tests/test_readme.py",
    ("docs/own-model.md", "base.freeze_stages"): "tests/test_readme.py",
    ("docs/own-model.md", "python -m conversion.convert mine.keras"): "tests/test_readme.py",
    ("docs/mobile.md", "digits_int8_uint8.tflite"): "tests/test_task_library.py",
    ("docs/mobile.md", "ImageClassifier.create_from_file"): "tests/test_task_library.py",
    ("docs/conversion.md", "python -m conversion.convert https://tfhub.dev/google/bit/m-r50x1/1"): (
        "tests/test_savedmodel.py"
    ),
    ("docs/models.md", "BitPreprocessing.from_pretrained"): "tests/test_preprocessing_layer.py",
    ("docs/finetuning.md", "load_digits_split"): "tests/test_short_finetune.py",
    ("docs/serving.md", "labels/stable:predict"): "tests/test_serving_kit.py",
    ("docs/serving.md", "prediction_service_pb2_grpc"): "tests/test_serving_kit.py",
    ("docs/models.md", "except tfbit.ConfigError"): "tests/test_api_errors.py",
    ("docs/kerashub.md", "--formats keras_hub"): "tests/test_kerashub.py",
    ("docs/kerashub.md", "tfbit.kerashub.save_to_preset(model"): "tests/test_kerashub.py",
    ("docs/kerashub.md", "classifier.preprocessor(images)"): "tests/test_kerashub.py",
    ("docs/kerashub.md", "classifier.fit(train"): "tests/test_kerashub.py",
}
# (page, a text the block holds) -> why no test machine can run it
EXCUSED = {
    ("README.md", "make demo"): "make itself is CI's command (.ci/run runs `make test`); the demo "
    "it runs, `python -m conversion.convert`, builds this module's world",
    ("docs/models.md", 'from_preset("bit-m-r101x3")'): "downloads the released weights (network)",
    ("docs/models.md", 'os.environ["KERAS_BACKEND"] = "jax"'): "the full HyperRule run under JAX; "
    "tests/test_backends.py runs finetune under JAX with the same distribution",
    ("docs/mobile.md", "ImageClassifier.createFromFile(context"): "Kotlin needs an Android build; the "
    "Python block beside it makes the same Task Library calls and is run by tests/test_task_library.py",
    ("docs/scaling.md", "on host1 (worker 0"): "needs two hosts",
    ("docs/scaling.md", "localhost_tf_configs(2)"): "a full HyperRule run on two workers; "
    "tests/test_multi_worker.py runs two localhost workers with the same TF_CONFIGs",
    ("docs/scaling.md", "multi_worker_strategy()"): "needs a TF_CONFIG cluster of several hosts",
    ("docs/scaling.md", "DataflowRunner"): "needs Dataflow, Flink and Spark clusters",
    ("docs/serving.md", "docker run"): "needs docker and the tensorflow/serving image; "
    "tests/test_serving_kit.py parses the files it reads with TF Serving's protos",
    ("docs/kerashub.md", "keras_hub.upload_preset("): "uploads to Kaggle and the Hugging Face hub "
    "(network, credentials); tests/test_kerashub.py runs upload_preset's checks of the folder",
}
# lines of run blocks that are not run, and why
SKIPPED_LINES = {
    "python -m conversion.convert SOURCE [": "the synopsis, not a command",
    "oxford_flowers102": "downloads the tfds dataset (network)",
    "pip install": "the test environment has the extras installed",
}


def _blocks():
    """(page, language, text) of every fenced block with a language (bash, python, py);
    blocks without one are listings: output, trees, file layouts."""
    for page in PAGES:
        text = open(os.path.join(ROOT, page), encoding="utf-8").read()
        for language, body in FENCE.findall(text):
            if language:
                yield page, language, body


def block(page, marker):
    (found,) = [body for p, _, body in _blocks() if p == page and marker in body] or [None]
    assert found is not None, f"{page} has no block holding {marker!r}"
    return found


RUN_HERE = {
    ("README.md", "python -m conversion.predict saved_models/bit-50 photo.jpg"),
    ("README.md", 'tfbit.load_model("google/bit-50", task="features")'),
    ("README.md", "python -m conversion.convert mine.keras"),
    ("README.md", "--output runs/flowers --export saved_model tflite"),
    ("docs/finetuning.md", "--output runs/flowers --export saved_model tflite"),
    ("docs/finetuning.md", "from tfbit.finetune.trainer import finetune\n\ntrain"),
    ("docs/conversion.md", "python -m conversion.predict saved_models/digits image.png"),
    ("docs/conversion.md", "--confusion-matrix cm.png"),
    ("docs/models.md", 'from_pretrained("google/bit-50")'),
    ("docs/models.md", 'model.save_pretrained("my-bit"'),
    ("docs/models.md", 'processor(["cat.jpg", "dog.png"])'),
    ("docs/mobile.md", "runner(pixel_values=pixel_values[:1])"),
    ("docs/scaling.md", "pip install 'tfbit[beam]'"),
    ("docs/scaling.md", "--format parquet"),
    ("docs/scaling.md", "python -m conversion.neighbours out/features --k 5"),
    ("README.md", "python -m conversion.convert no/such/dir"),
}


def test_every_block_is_accounted_for():
    listed = list(ELSEWHERE) + list(EXCUSED) + list(RUN_HERE)
    unlisted = []
    for page, _, body in _blocks():
        owners = [key for key in listed if key[0] == page and key[1] in body]
        if len(owners) != 1:
            unlisted.append(f"{page}: {len(owners)} entries for the block starting {body.strip()[:60]!r}")
    assert not unlisted, unlisted
    for (page, marker), module in ELSEWHERE.items():
        source = open(os.path.join(ROOT, module), encoding="utf-8").read()
        read = page.split("/")[-1] in source or block(page, marker) == block("README.md", marker)
        assert read, f"{module} does not read {page}"


# ---- the world ----------------------------------------------------------------------------------


def _photo(name):
    return Image.open(os.path.join(ROOT, "conversion", "photos", name)).convert("RGB")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A user's working folder: photos, image folders, the demo export, and a hub cache whose
    `google/bit-50` is a small random BiT with named labels (offline, in huggingface_hub's layout)."""
    import torch
    import transformers
    from test_hub import write_hub_cache

    from conversion.digits import load_digits_split

    root = tmp_path_factory.mktemp("world")
    torch.manual_seed(0)
    labels = ["tabby cat", "coffee mug", "rocket", "pagoda", "raccoon", "flower", "astronaut"]
    config = transformers.BitConfig(**{**SMALL, "id2label": dict(enumerate(labels))})
    checkpoint = root / "checkpoint"
    transformers.BitForImageClassification(config).save_pretrained(checkpoint)
    processor = {"size": {"shortest_edge": 72}, "crop_size": {"height": 64, "width": 64}}
    processor.update(image_processor_type="BitImageProcessor", image_mean=[0.5] * 3, image_std=[0.5] * 3)
    (checkpoint / "preprocessor_config.json").write_text(json.dumps(processor))
    files = ("config.json", "model.safetensors", "preprocessor_config.json")
    write_hub_cache(root / "hub", "google/bit-small", {f: checkpoint / f for f in files})

    _photo("chelsea.jpg").save(root / "photo.jpg")
    _photo("chelsea.jpg").save(root / "cat.jpg")
    _photo("flower_dahlia.png").save(root / "dog.png")
    (root / "photos").mkdir()
    (root / "more").mkdir()
    for name in ("chelsea", "coffee", "rocket", "raccoon"):
        _photo(f"{name}.jpg").save(root / "photos" / f"{name}.jpg")
    _photo("chelsea_eyes.jpg").save(root / "photos" / "cat.jpg")
    _photo("camera.png").save(root / "more" / "camera.png")
    (root / "notes.jpg").write_text("not an image: a text file named .jpg")
    folders = {
        "train": {"cat": ["chelsea", "chelsea_eyes"], "coffee": ["coffee", "coffee_cup"], "rocket": ["rocket_tower"]},
        "val": {"cat": ["chelsea"], "coffee": ["coffee_table"], "rocket": ["rocket_launchpad"]},
    }
    for split, classes in folders.items():
        for label, names in classes.items():
            (root / "data" / split / label).mkdir(parents=True)
            for i, name in enumerate(names):
                image = _photo(f"{name}.jpg")
                image.save(root / "data" / split / label / f"{2 * i}.jpg")
                image.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(
                    root / "data" / split / label / f"{2 * i + 1}.jpg"
                )
    _other_sources(root, checkpoint)

    _, _, digits, digit_labels = load_digits_split()
    Image.fromarray(digits[0]).save(root / "image.png")
    Image.fromarray(digits[0]).save(root / "digit.png")
    Image.fromarray(digits[1]).save(root / "photos" / "digit.png")
    for image, label in list(zip(digits, digit_labels))[:20]:
        (root / "heldout" / str(label)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(
            root / "heldout" / str(label) / f"{len(os.listdir(root / 'heldout' / str(label)))}.png"
        )
    os.symlink(os.path.join(ROOT, "conversion"), root / "conversion")  # `conversion/default_checkpoint`
    done = _run(root, ["python", "-m", "conversion.convert"])  # `make demo`: -> saved_models/digits
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return root


def _other_sources(root, checkpoint):
    """What docs/models.md's placeholders name: a transformers directory, timm's hub copy (a
    small timm ResNetV2 with the BiT tag's name), and original-release `.npz` files."""
    from test_hub import write_timm_repo

    import tfbit
    from tfbit.weights.writers import save_original_npz

    shutil.copytree(checkpoint, root / "path" / "to" / "checkpoint")
    (root / "timm").mkdir()
    write_timm_repo(
        root / "hub", "timm/resnetv2_50x1_bit.goog_in21k_ft_in1k", root / "timm", num_classes=5, side=64, seed=1
    )
    # the original release's GroupNorm has 32 groups: the small model's widths are multiples of 32
    original = dict(embedding_size=32, hidden_sizes=[128, 256, 384, 512], depths=[1, 1, 1, 1], num_labels=7)
    model = tfbit.BitForImageClassification(tfbit.BitConfig(**original, num_groups=32))
    save_original_npz(model, str(root / "BiT-M-R50x1-ILSVRC2012.npz"))
    save_original_npz(model, str(root / "BiT-M-R50x1.npz"))


def _env(cwd):
    env = {**os.environ, "HF_HUB_CACHE": str(cwd / "hub"), "HF_HUB_OFFLINE": "1"}
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env.pop("PYTHONPATH", None)
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)
    return env


def _run(cwd, command, input=None):
    return subprocess.run(command, cwd=cwd, env=_env(cwd), capture_output=True, text=True, timeout=1800, input=input)


def _runnable(text):
    """The block with `bit-50` replaced (see the module) and SKIPPED_LINES left out (with the
    indented lines that continue a synopsis)."""
    kept, skipping = [], False
    for line in text.replace("bit-50", "bit-small").splitlines():
        skipping = any(marker in line for marker in SKIPPED_LINES) or (skipping and line.startswith(" "))
        if not skipping:
            kept.append(line)
    return "\n".join(kept) + "\n"


def run_bash(world, page, marker, edit=lambda text: text):
    """Runs the block with bash (stopping at the first failing command); returns its stdout."""
    done = _run(world, ["bash", "-e", "-c", edit(_runnable(block(page, marker)))])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    return done.stdout


def run_python(world, text):
    done = _run(world, ["python", "-"], input=_runnable(text))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


# ---- the blocks -----------------------------------------------------------------------------------
# The fine-tuning commands run the full BiT-HyperRule schedule as typed (thousands of steps at
# batch 64); here they train 2 steps of batch 4, the one other change made to a block.
def _short_cli(text):
    assert "--output runs/flowers" in text
    return text.replace("--output runs/flowers", "--output runs/flowers --steps 2 --batch-size 4")


def test_readme_convert_and_predict(world):
    predicted = run_bash(world, "README.md", "python -m conversion.predict saved_models/bit-50 photo.jpg")
    report = json.loads((world / "saved_models" / "bit-small" / "report.json").read_text())
    assert len(report["artifacts"]) == 7 and all(row["published"] for row in report["artifacts"]), report
    lines = predicted.splitlines()
    assert lines[lines.index("photo.jpg") + 5].split("%")[0].strip()  # five labels with their probability


def test_readme_own_model_then_convert(world):
    python = block("README.md", 'tfbit.load_model("google/bit-50", task="features")')
    run_python(world, python + "\nmodel.save('mine.keras')\nopen('labels.txt', 'w').write('cat\\ncoffee\\nrocket')\n")
    done = _run(world, ["bash", "-c", _runnable(block("README.md", "python -m conversion.convert mine.keras"))])
    assert done.returncode in (0, 1), done.stdout[-3000:] + done.stderr[-3000:]  # 1: a quantized near-tie
    report = json.loads((world / "export" / "report.json").read_text())
    assert {row["artifact"] for row in report["artifacts"] if row["published"]} >= {"keras", "tflite_fp32"}


def test_finetune_command_then_save_pretrained(world):
    readme = block("README.md", "--output runs/flowers --export saved_model tflite")
    assert readme in block("docs/finetuning.md", "--output runs/flowers --export saved_model tflite")
    run_bash(world, "README.md", "--output runs/flowers --export saved_model tflite", edit=_short_cli)
    assert (world / "runs" / "flowers" / "best.keras").is_file()
    assert (world / "runs" / "flowers" / "export" / "report.json").is_file()
    sources = block("docs/models.md", 'from_pretrained("google/bit-50")').splitlines()
    prelude = "import tfbit\n" + "\n".join(line for line in sources if "google/bit-50" in line)
    run_python(world, prelude + "\n" + block("docs/models.md", 'model.save_pretrained("my-bit"'))
    check = (
        "import transformers\nprint(type(transformers.BitForImageClassification.from_pretrained('my-bit')).__name__)"
    )
    assert run_python(world, check).split()[-1] == "BitForImageClassification"


def test_finetune_from_python(world):
    python = block("docs/finetuning.md", "from tfbit.finetune.trainer import finetune\n\ntrain")
    assert '"runs/flowers", val, batch_size=64)' in python
    run_python(
        world, python.replace('"runs/flowers", val, batch_size=64)', '"runs/python", val, batch_size=4, steps=2)')
    )
    assert (world / "runs" / "python" / "best.keras").is_file()


def test_models_sources(world):
    """docs/models.md's sources, the placeholders naming what the world wrote."""
    shapes = "\nprint(timm_model.config.num_labels, original.config.num_labels, type(model).__name__)"
    out = run_python(world, "import tfbit\n" + block("docs/models.md", 'from_pretrained("google/bit-50")') + shapes)
    assert out.split()[-3:] == ["5", "7", "BitModel"]


def test_predict_commands(world):
    out = run_bash(world, "docs/conversion.md", "python -m conversion.predict saved_models/digits image.png")
    assert out.splitlines()[0].startswith("image.png") and "photos/digit.png" in out, out
    run_bash(world, "docs/conversion.md", "--confusion-matrix cm.png")
    assert (world / "preds.csv").is_file() and (world / "cm.png").is_file()


def test_processor_and_litert_snippets(world):
    processor = block("docs/models.md", 'processor(["cat.jpg", "dog.png"])')
    litert = block("docs/mobile.md", "runner(pixel_values=pixel_values[:1])")
    out = run_python(world, processor + "\n" + litert + "\nprint(len(pixel_values), logits.shape[0])")
    assert out.split()[-2:] == ["2", "1"], out


def test_batch_inference_and_neighbours(world):
    """docs/scaling.md: the retrieval block (a features export, records, neighbours) first, as
    the features example of the batch block reads its export."""
    shutil.rmtree(world / "saved_models" / "bit-small", ignore_errors=True)  # scaling.md starts afresh
    out = run_bash(world, "docs/scaling.md", "python -m conversion.neighbours out/features --k 5")
    assert "photos/cat.jpg" in out, out
    shutil.rmtree(world / "out")
    run_bash(world, "docs/scaling.md", "pip install 'tfbit[beam]'")
    run_bash(world, "docs/scaling.md", "--format parquet")
    assert list((world / "out").glob("preds*")) and list((world / "out").glob("features*"))


def test_exit_code_examples(world):
    """README's exit codes, each line run alone: the code and the last line on stderr its comment gives."""
    lines = _runnable(block("README.md", "python -m conversion.convert no/such/dir")).strip().splitlines()
    assert len(lines) == 3
    for line in lines:
        command, expected = (part.strip() for part in line.split("#"))
        code, message = expected.split(": ", 1)
        done = _run(world, ["bash", "-c", command])
        assert done.returncode == int(code), command + "\n" + done.stderr[-2000:]
        assert "Traceback" not in done.stderr, done.stderr[-3000:]
        if code == "0":
            assert message == "done" and done.stdout.startswith("digit.png\n") and not done.stderr.strip()
        else:
            last = done.stderr.strip().splitlines()[-1]
            assert last.startswith(message.removesuffix("...").strip()), (command, done.stderr[-2000:])
