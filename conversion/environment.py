"""The process environment of the command lines (`python -m conversion.finetune`, the converter,
predict, ...), set before TensorFlow is imported.

Neither this module nor anything a CLI imports before parsing its arguments imports TensorFlow
or tfbit (which imports Keras), so `--help` is instant; a CLI then calls `configure()`. What it sets, and why:

- oneDNN (`TF_ENABLE_ONEDNN_OPTS`): off for inference, on for fine-tuning, unless the
  environment says otherwise (the measurements are in `conversion/runtime.py`).
- TensorFlow's C++ logging: `TF_CPP_MIN_LOG_LEVEL=3` unless exported (TensorFlow reads it
  once, at import), which silences the converter's ~25 MLIR/SavedModel-loader lines and the
  `failed call to cuInit` error of a machine without a GPU. The lines TensorFlow writes while
  it is imported (`All log messages before absl::InitializeLog()`, the CUDA stub and CPU
  feature notices) ignore that setting, as does LiteRT's `INFO: Created TensorFlow Lite
  XNNPACK delegate`: `native_logs_filtered` removes them from the file descriptor itself.
  `--verbose` (`configure(verbose=True)`) brings all of them back.
- Hugging Face progress bars (hub downloads, transformers' "Loading weights") off when stderr
  is not a terminal, where they would write carriage returns into a log file.
"""

import contextlib
import importlib
import os
import re
import sys
import threading

ONEDNN = "TF_ENABLE_ONEDNN_OPTS"
LOG_LEVEL = "TF_CPP_MIN_LOG_LEVEL"
HF_PROGRESS_BARS = "HF_HUB_DISABLE_PROGRESS_BARS"
_quiet = False  # set by `configure`: the running CLI filters native log lines
_exported = dict(os.environ)  # before any default below: what a child CLI should inherit

# abseil/glog records ("I0000 00:00:1795969131.85 22771 file.cc:31] ..."), the notice abseil
# prints before it is initialized, the continuation line of TensorFlow's CPU feature notice,
# and LiteRT's minimal logger ("INFO: ...").
_NATIVE_LOG_LINE = re.compile(
    r"[IWEF]\d{4} \d\d:\d\d:\d+\.\d+\s+\d+ [^\s\]]+:\d+\] "
    r"|WARNING: All log messages before absl::InitializeLog\(\) is called"
    r"|To enable the following instructions: .* rebuild TensorFlow"
    r"|INFO: "
)


def onednn_default(training=False):
    """oneDNN on for training (its convolution gradients make a step 40-45% faster), off for
    inference (20% slower at batch 1), unless the environment says otherwise."""
    os.environ.setdefault(ONEDNN, "1" if training else "0")


def quiet_defaults(verbose=False):
    """TensorFlow's C++ log level and the Hugging Face progress bars, as the module explains."""
    if verbose:
        os.environ[LOG_LEVEL] = "0"
        return
    os.environ.setdefault(LOG_LEVEL, "3")
    if not sys.stderr.isatty():
        os.environ.setdefault(HF_PROGRESS_BARS, "1")


def configure(verbose=False, training=False):
    """Everything above, then TensorFlow imported with its import-time log lines filtered out,
    then tfbit (which imports Keras). Call it first thing in a CLI's `main`, after parsing the arguments."""
    global _quiet
    _quiet = not verbose
    onednn_default(training)
    quiet_defaults(verbose)
    with native_logs_filtered(enabled=not verbose):
        importlib.import_module("tensorflow")  # here, so that its import-time lines are filtered
        importlib.import_module("tfbit")


def exported_environment():
    """The environment as the user exported it, without the defaults set here: for a child
    process that is another CLI (it sets its own, e.g. oneDNN off for inference)."""
    return dict(_exported)


def cli_logs_filtered():
    """`native_logs_filtered` where a quiet CLI runs (`configure`); a no-op for library callers.
    For blocks that start LiteRT (its XNNPACK notice comes at the first invocation)."""
    return native_logs_filtered(enabled=_quiet)


@contextlib.contextmanager
def native_logs_filtered(enabled=True):
    """Inside the block, what C++ code writes to file descriptor 2 goes through a pipe to a
    thread that passes on every line except native log records (see `_NATIVE_LOG_LINE`), so
    Python warnings, tracebacks and anything unexpected still reach the user, in order. A pipe,
    not a temporary file: a file-size limit (`ulimit -f`) would cut a file's lines mid-record,
    and the cut-off record would no longer look like one."""
    if not enabled:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)
    relay = threading.Thread(target=_relay, args=(read_end, saved), name="native-log-filter", daemon=True)
    relay.start()
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)  # the pipe's last write end closes: the relay reads to the end and stops
        # a child started inside the block may still hold the write end; it keeps its filter
        relay.join(timeout=5)
        if not relay.is_alive():
            os.close(saved)


def _relay(read_end, target):
    with os.fdopen(read_end, "rb") as pipe:
        for line in pipe:
            if not _NATIVE_LOG_LINE.match(line.decode("utf-8", "replace")):
                try:
                    while line:
                        line = line[os.write(target, line) :]
                except OSError:  # stderr closed: drain the pipe so that writers never block
                    continue


def require_tensorflow_backend(needs, command):
    """SavedModel and TFLite are TensorFlow graphs, so exporting or running them takes Keras on
    TensorFlow; raises ValueError saying so (`needs`: "exports need", `command`: the CLI)."""
    import keras

    backend = keras.backend.backend()
    if backend != "tensorflow":
        raise ValueError(
            f"{needs} the TensorFlow backend of Keras, but it runs on {backend} "
            f"(KERAS_BACKEND or ~/.keras/keras.json): run {command} with KERAS_BACKEND=tensorflow"
        )
