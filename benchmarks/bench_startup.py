"""The start of a command line: `import tensorflow, keras` in a fresh process, with the
installed ml_dtypes against other releases of it (setup.cfg excludes ml_dtypes 0.7.0).

    python benchmarks/bench_startup.py [--versions 0.6.0 0.7.0] [--repeats 5]

Each version is installed with pip into a temporary folder (the package index must be reachable)
and put first on PYTHONPATH; the processes run in turn, A B A B ..., so each ratio compares
starts measured moments apart. Also times `import ml_dtypes` alone: its share of the start.
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

IMPORTS = {
    "tensorflow+keras": "import tensorflow, keras, ml_dtypes; print(ml_dtypes.__version__)",
    "ml_dtypes alone": "import numpy, ml_dtypes; print(ml_dtypes.__version__)",
}


def _install(version, root):
    target = os.path.join(root, version)
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", target, f"ml_dtypes=={version}"],
        check=True,
    )
    return target


def _seconds(code, path, version):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": path}
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    seconds = time.perf_counter() - started
    found = done.stdout.split()[-1]
    if found != version:
        raise SystemExit(f"expected ml_dtypes {version}, the process imported {found}")
    return seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--versions", nargs="+", default=["0.6.0", "0.7.0"])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as root:
        paths = {version: _install(version, root) for version in args.versions}
        for what, code in IMPORTS.items():
            times = {version: [] for version in args.versions}
            for _ in range(args.repeats + 1):  # the first round warms the page cache, not counted
                for version, path in paths.items():
                    times[version].append(_seconds(code, path, version))
            first = args.versions[0]
            for version in args.versions:
                counted = times[version][1:]
                ratio = statistics.median(a / b for a, b in zip(counted, times[first][1:]))
                print(
                    f"{what:18s} ml_dtypes {version:8s} median {statistics.median(counted):6.2f} s "
                    f"(min {min(counted):.2f}, max {max(counted):.2f}), x{ratio:.2f} of {first}"
                )


if __name__ == "__main__":
    main()
