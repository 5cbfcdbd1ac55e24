"""The Python API refuses bad input with tfbit's own exception types (issue 25, tfbit/errors.py):
each case calls a public entry point as a user would type it, and its exception is a
`tfbit.TfbitError` of the documented class, still an instance of the built-in type tfbit raised
before, and carries the message the command line prints for the same input.

One fresh interpreter runs every case (importing TensorFlow takes ~6 s), started from the
repository's root and working in the cases' folder, so paths are typed as a user types them.
It calls the command lines' `main(argv)` in the same process for their messages (the process
boundary adds nothing to them; tests/test_bad_inputs.py runs several of these inputs as real
processes). docs/models.md's "Errors from Python" block runs there too.
"""

import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHECKPOINT = os.path.join(ROOT, "conversion", "default_checkpoint")
PHOTO = os.path.join(ROOT, "conversion", "photos", "coffee.jpg")
COMPLETED = "holds a completed fine-tune (metrics.json, best.keras): pass overwrite=True"

# What each case calls, with the command line for the same input, run in the cases' folder.
SCRIPT = r"""
import contextlib, importlib, io, json, os, sys, warnings

os.chdir(sys.argv[1])
warnings.simplefilter("ignore")  # a warning would come before a command line's message
import tfbit
from tfbit.finetune import from_image_folder, finetune
from conversion.convert import convert

results = {}


def api(name, call):
    try:
        call()
    except Exception as e:
        results[name] = {"mro": [f"{c.__module__}.{c.__qualname__}" for c in type(e).__mro__], "message": str(e)}
    else:
        results[name] = {"mro": None, "message": None}


def cli(name, module, *argv):
    stderr = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(stderr):
        code = importlib.import_module(module).main(list(argv))
    results[name].update(code=code, stderr=stderr.getvalue())


api("config", lambda: tfbit.BitConfig.from_pretrained("bad_config"))
cli("config", "conversion.convert", "bad_config", "--output", "out", "--formats", "keras")
api("load_model_config", lambda: tfbit.load_model("bad_config"))
cli("load_model_config", "conversion.convert", "bad_config", "--output", "out", "--formats", "keras")
api("preprocessor", lambda: tfbit.BitImageProcessor.from_pretrained("bad_preprocessor"))
cli("preprocessor", "conversion.convert", "bad_preprocessor", "--output", "out", "--formats", "keras")
api("missing", lambda: tfbit.BitForImageClassification.from_pretrained("no/such/dir"))
cli("missing", "conversion.convert", "no/such/dir")
api("weight_shape", lambda: tfbit.BitForImageClassification.from_pretrained("bad_weights"))
cli("weight_shape", "conversion.convert", "bad_weights", "--output", "out", "--formats", "keras")
api("convert", lambda: convert("digits", output="out", formats=["keras"], out_features=["stage1"]))
cli("convert", "conversion.convert", "digits", "--output", "out", "--formats", "keras", "--out-features", "stage1")
api("convert_config", lambda: convert("bad_config", output="out", formats=["keras"]))

tfbit.BitForImageClassification.from_pretrained("digits").save("digits/model.keras")
processor = tfbit.BitImageProcessor.from_pretrained("digits")
api("image", lambda: processor("broken.jpg"))
api("unreadable_image", lambda: processor(["loop.jpg"]))
cli("image", "conversion.predict", "digits/model.keras", "broken.jpg", "loop.jpg")

api("no_images", lambda: from_image_folder("empty_class"))
cli("no_images", "conversion.finetune", "never-loaded.keras", "--data", "empty_class", "--output", "run")
api("one_class", lambda: finetune("never-loaded.keras", from_image_folder("one_class"), "run"))
cli("one_class", "conversion.finetune", "never-loaded.keras", "--data", "one_class", "--output", "run")
api("completed", lambda: finetune("never-loaded.keras", from_image_folder("two_classes"), "completed"))
cli("completed", "conversion.finetune", "never-loaded.keras", "--data", "two_classes", "--output", "completed")

docs = io.StringIO()
with contextlib.redirect_stdout(docs):
    exec(sys.stdin.read(), {})
results["docs"] = docs.getvalue()
print("RESULTS", json.dumps(results))
"""


def docs_block():
    """docs/models.md's block in "Errors from Python"."""
    page = open(os.path.join(ROOT, "docs", "models.md"), encoding="utf-8").read()
    section = page.split("## Errors from Python", 1)[1].split("\n## ", 1)[0]
    (block,) = re.findall(r"```python\n(.*?)```", section, re.S)
    return block


def _checkpoint(folder, name, **changes):
    """A copy of the embedded checkpoint with `changes` {file: {key: value}} to its JSON files."""
    shutil.copytree(CHECKPOINT, folder / name)
    for file, values in changes.items():
        data = json.loads((folder / name / file).read_text())
        (folder / name / file).write_text(json.dumps({**data, **values}))
    return folder / name


def _photos(folder, *names):
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copy(PHOTO, folder / name)


def _cases(folder):
    _checkpoint(folder, "digits")
    _checkpoint(folder, "bad_config", **{"config.json": {"label2id": [0, 1]}})
    _checkpoint(folder, "bad_preprocessor", **{"preprocessor_config.json": {"size": "big"}})
    weights = load_file(_checkpoint(folder, "bad_weights") / "model.safetensors")
    weights["classifier.1.bias"] = np.zeros(9, np.float32)  # 10 classes in config.json
    save_file(weights, folder / "bad_weights" / "model.safetensors")
    (folder / "broken.jpg").write_bytes(open(PHOTO, "rb").read()[:2000])  # truncated
    os.symlink("loop.jpg", folder / "loop.jpg")
    (folder / "empty_class" / "cat").mkdir(parents=True)
    _photos(folder / "empty_class" / "dog", "a.jpg")
    _photos(folder / "one_class" / "cat", "a.jpg", "b.jpg")
    _photos(folder / "two_classes" / "cat", "a.jpg")
    _photos(folder / "two_classes" / "dog", "a.jpg")
    (folder / "completed").mkdir()
    (folder / "completed" / "metrics.json").write_text("{}")


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    folder = tmp_path_factory.mktemp("api-errors")
    _cases(folder)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(TF_CPP_MIN_LOG_LEVEL="3", HF_HUB_OFFLINE="1")
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(folder)],
        cwd=ROOT,
        env=env,
        input=docs_block(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (line,) = [line for line in done.stdout.splitlines() if line.startswith("RESULTS ")]
    return json.loads(line.removeprefix("RESULTS "))


def _refusal(outcome, error, builtin):
    assert outcome["mro"] is not None, "nothing was raised"
    assert outcome["mro"][0] == f"tfbit.errors.{error}" or outcome["mro"][0].endswith(f".{error}"), outcome
    assert "tfbit.errors.TfbitError" in outcome["mro"] and f"builtins.{builtin}" in outcome["mro"], outcome
    return outcome["message"]


# case: (the class raised, the built-in it still is, how the command line prints the message)
CASES = {
    "config": ("ConfigError", "ValueError", "error: {}"),
    "load_model_config": ("ConfigError", "ValueError", "error: {}"),
    "preprocessor": ("ConfigError", "ValueError", "error: {}"),
    "missing": ("MissingFileError", "FileNotFoundError", "error: {}"),
    "weight_shape": ("CheckpointError", "ValueError", "error: {}"),
    "convert": ("ConversionError", "Exception", "error: {}"),
    "no_images": ("DataError", "ValueError", "error: {}"),
    "one_class": ("DataError", "ValueError", "error: {}"),
    "completed": ("CompletedRunError", "ValueError", "error: {}"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_api_raises_the_command_lines_refusal(case, outcomes):
    error, builtin, printed = CASES[case]
    outcome = outcomes[case]
    message = _refusal(outcome, error, builtin)
    assert outcome["code"] == 2
    assert outcome["stderr"] == printed.format(message) + "\n"


def test_the_messages_name_the_input(outcomes):
    """The messages are the ones tfbit has always given (tests/test_bad_inputs.py pins two as
    real processes print them)."""
    assert outcomes["config"]["message"] == (
        "bad_config/config.json: BitConfig.label2id must be a dict of label: class id, got a list"
    )
    assert outcomes["load_model_config"]["message"] == outcomes["config"]["message"]
    assert outcomes["preprocessor"]["message"].startswith(
        "bad_preprocessor/preprocessor_config.json: size must be an int, (height, width) or a dict"
    )
    assert outcomes["missing"]["message"].startswith("no/such/dir: no such file or directory, and not a hub repo id")
    assert outcomes["weight_shape"]["message"].startswith("bad_weights does not fit ")
    assert "classifier.1.bias: shape (9,)" in outcomes["weight_shape"]["message"]
    assert outcomes["convert"]["message"] == "--out-features chooses the stages of a backbone: add --task backbone"
    assert outcomes["no_images"]["message"].startswith("class folder 'empty_class/cat' contains no images")
    assert outcomes["one_class"]["message"].startswith("the training data has 1 class ['cat']")
    assert outcomes["completed"]["message"].startswith(f"completed {COMPLETED}")


def test_convert_from_python_wraps_the_library_refusal(outcomes):
    """`conversion.convert.convert` raises ConversionError with the library's message, as the
    command line prints it."""
    message = _refusal(outcomes["convert_config"], "ConversionError", "Exception")
    assert message == outcomes["config"]["message"]


def test_images_are_refused_with_the_message_predict_skips_them_with(outcomes):
    broken = _refusal(outcomes["image"], "ImageError", "ValueError")
    unreadable = _refusal(outcomes["unreadable_image"], "FileError", "OSError")
    assert broken.startswith("cannot read broken.jpg as an image: ")
    assert unreadable == "cannot read loop.jpg: Too many levels of symbolic links"
    stderr = outcomes["image"]["stderr"].splitlines()
    assert stderr[:2] == [f"skipped: {broken}", f"skipped: {unreadable}"]
    assert outcomes["image"]["code"] == 2  # none of the images could be read


def test_the_docs_block_prints_what_its_comments_say(outcomes):
    expected = [line.split("# ")[-1] for line in docs_block().splitlines() if "print(" in line]
    assert outcomes["docs"].splitlines() == expected
