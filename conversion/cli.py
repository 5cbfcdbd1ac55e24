"""What the converter and predict command lines need before TensorFlow is imported: argument
types, the choices they list, the `--verbose` switch and progress output.

`--help` must not import TensorFlow (5-10 s), and the library modules that define these
choices import it: so the choices are repeated here, and tests/test_quiet_cli.py checks that
they equal the library's (`conversion.export.TFLITE_QUANTIZATIONS`, `tfbit.pretrained.TASKS`,
`tfbit.weights.FORMATS`). Nothing here imports TensorFlow or numpy (`tfbit.runtime` does not,
and in a CLI's process neither does `tfbit` itself: `tfbit.api`).
"""

import sys
import time

from tfbit import runtime

positive_int = runtime.positive_int  # the argparse type of counts (--threads, --top-k, ...)
parser = runtime.parser  # the parser of `python -m <module>` from its docstring

TFLITE_QUANTIZATIONS = ("fp32", "fp16", "dynamic_int8", "int8")
TASKS = ("classification", "features", "backbone")
SOURCE_FORMATS = ("hf", "timm", "npz", "keras")


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
