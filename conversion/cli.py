"""What the command lines need before TensorFlow is imported: argument
types, the choices they list, the `--verbose` switch and progress output.

`--help` must not import TensorFlow (5-10 s), and the library modules that define these
choices import it: so the choices are repeated here, and tests/test_quiet_cli.py checks that
they equal the library's (`conversion.export.TFLITE_QUANTIZATIONS`, `tfbit.models.pretrained.TASKS`,
`tfbit.weights.FORMATS`). Nothing here imports TensorFlow, numpy or tfbit (which imports Keras).
"""

import argparse
import os
import sys
import time

# console entry points (setup.cfg) of the command-line modules
COMMANDS = {
    "conversion.convert": "tfbit-convert",
    "conversion.predict": "tfbit-predict",
    "conversion.batch_predict": "tfbit-batch-predict",
    "conversion.neighbours": "tfbit-neighbours",
    "conversion.finetune": "tfbit-finetune",
}


def program(module):
    """How the user started `module`: its console command (`tfbit-convert`), else `python -m`."""
    command = os.path.basename(sys.argv[0]) if sys.argv else ""
    return command if command == COMMANDS.get(module) else f"python -m {module}"


def parser(module, doc):
    """The parser of the command line `module`: the module docstring's first paragraph describes
    the command, the paragraphs after its usage line are the epilog."""
    return argparse.ArgumentParser(
        prog=program(module),
        description=doc.split("\n\n")[0],
        epilog=doc.split("\n\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def positive_int(text):
    """argparse type of counts (`--threads`, `--top-k`, ...)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def thread_count(text):
    """argparse type of `--threads` (`conversion.runtime.checked_threads`)."""
    from conversion.runtime import checked_threads

    try:
        return checked_threads(positive_int(text))
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


TFLITE_QUANTIZATIONS = ("fp32", "fp16", "dynamic_int8", "int8")
TASKS = ("classification", "features", "backbone")
SOURCE_FORMATS = ("hf", "timm", "npz", "h5", "savedmodel", "keras")


def add_threads(parser):
    parser.add_argument(
        "--threads",
        type=thread_count,
        help="CPU threads (default: every available core; see conversion/runtime.py)",
    )


def add_verbose(parser):
    parser.add_argument(
        "--verbose", action="store_true", help="show TensorFlow's and LiteRT's own log lines (hidden by default)"
    )


class Progress:
    """Progress of a long loop on stderr: one line rewritten in place on a terminal, a plain line
    every `every_seconds` (and at the end) otherwise, so log files hold no carriage returns.
    Silent when the whole job fits in one step."""

    def __init__(self, total, what, stream=None, every_seconds=10.0, single_step=False):
        self.total, self.what = total, what
        self.stream = stream or sys.stderr
        self.enabled = not single_step
        self.tty = self.stream.isatty()
        self.every = every_seconds
        self.started = self.last = time.monotonic()

    def update(self, done):
        if not self.enabled:
            return
        now = time.monotonic()
        finished = done >= self.total
        rate = done / max(now - self.started, 1e-9)
        line = f"{self.what}: {done}/{self.total} ({rate:.1f}/s)"
        if self.tty:
            self.stream.write("\r" + line + ("\n" if finished else ""))
        elif finished or now - self.last >= self.every:
            self.stream.write(line + "\n")
            self.last = now
        self.stream.flush()
