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


def set_threads(threads=None):
    """TensorFlow's intra-op pool gets `threads` (default: every available core); returns it."""
    threads = threads or available_cores()
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
