"""CPU runtime defaults of the command-line tools, chosen by measurement (benchmarks/RESULTS.md).

- Threads: every core the process may use, for TensorFlow's intra-op pool and for LiteRT,
  whose Python interpreter otherwise runs on a single thread.
- oneDNN (`TF_ENABLE_ONEDNN_OPTS`, read once when TensorFlow is imported): off for inference,
  where it slows BiT at batch 1 by ~20% (nothing fuses with GroupNorm) and gains ~7% at
  batch 16; on for fine-tuning, where its convolution gradients make a step 40-45% faster.
  Some TensorFlow builds turn it on by default, so every CLI says it explicitly before
  anything imports TensorFlow (`conversion.environment.configure`); a value already in the
  environment wins.
- XLA stays opt-in: +5-20% img/s for inference, but compiling R50x1 takes 20-40 s.
"""

import os
import warnings


def available_cores():
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


THREADS_PER_CORE = 4  # beyond this, threads only contend (and each TF pool thread costs memory)


def checked_threads(threads):
    """`threads`, refused (ValueError) above THREADS_PER_CORE per available core: a typo such as
    100000 would otherwise start that many TensorFlow threads (minutes of stall, gigabytes)."""
    cores = available_cores()
    if threads > THREADS_PER_CORE * cores:
        raise ValueError(
            f"at most {THREADS_PER_CORE} threads per available core ({THREADS_PER_CORE * cores} "
            f"on this machine's {cores}), got {threads}"
        )
    return threads


def set_threads(threads=None):
    """TensorFlow's intra-op pool gets `threads` (default: every available core); returns it."""
    threads = checked_threads(threads) if threads else available_cores()
    import tensorflow as tf

    current = tf.config.threading.get_intra_op_parallelism_threads()  # 0: TF's default, all cores
    if current != threads and not (current == 0 and threads == available_cores()):
        try:
            tf.config.threading.set_intra_op_parallelism_threads(threads)
        except RuntimeError:
            warnings.warn(
                f"TensorFlow is already running: its thread pools stay as they are (not {threads} threads)",
                stacklevel=2,
            )
    return threads
