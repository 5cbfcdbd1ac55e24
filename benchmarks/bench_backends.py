"""tfbit R50x1 under each Keras backend: parity with transformers and `model.fit` step time.

    python benchmarks/bench_backends.py [--backends tensorflow jax torch] [--size 128] [--batch 8]
                                        [--repeats 3] [--steps 3]

One worker subprocess per backend (KERAS_BACKEND is fixed at the first `import keras`), alive
together and timed in turn (common.Worker), so the ratios come from interleaved samples under
the same background load. Each worker first loads one randomly initialized transformers
BitForImageClassification (bit-50, 1000 labels, GroupNorm affine parameters perturbed) with
`from_pretrained` and reports max |Δ logits| on 2 images of 224² against transformers; then
compiles the model with SGD (momentum 0.9) and sparse cross-entropy (each backend's default:
tf.function, jax.jit, eager torch) and times `fit` steps on in-memory random data (a sample is
the median step time of one `fit` call of K steps, timed by a callback).
"""

import argparse
import os
import sys
import tempfile
import time

import numpy as np

if not __package__:  # run as a file, not with -m: make the `benchmarks` package importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import (
    NUM_CLASSES,
    THREADS,
    TORCH_ENV,
    Worker,
    fit_step_times,
    header,
    images,  # noqa: E402
    interleave,
    median,
    serve,
    table,
)

BACKENDS = ("tensorflow", "jax", "torch")
ANCHOR = "tensorflow"


def parity(model_dir):
    """(max |Δ logits|, the contract's tolerance) of tfbit under this backend vs transformers."""
    import keras
    import torch  # after keras and its backend
    import transformers

    import tfbit

    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    reference = transformers.BitForImageClassification(transformers.BitConfig(num_labels=NUM_CLASSES)).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in reference.parameters():
            if p.ndim == 1:  # random init leaves GroupNorm at gamma=1, beta=0
                p.add_(0.2 * torch.randn(p.shape, generator=generator))
        reference.save_pretrained(model_dir)
        x = images(2, 224)
        expected = reference(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))).logits.numpy()
    model = tfbit.BitForImageClassification.from_pretrained(model_dir)
    delta = float(np.abs(keras.ops.convert_to_numpy(model.predict(x, verbose=0)) - expected).max())
    return model, delta, 1e-4 * max(1.0, float(np.abs(expected).max()))


def trainer(args):
    import keras
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(THREADS)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    with tempfile.TemporaryDirectory() as model_dir:
        model, delta, tolerance = parity(model_dir)
    model.compile(
        optimizer=keras.optimizers.SGD(0.01, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    labels = np.random.RandomState(0).randint(0, NUM_CLASSES, 2 * args.batch)
    data = tf.data.Dataset.from_tensor_slices((images(2 * args.batch, args.size), labels))
    data = data.batch(args.batch, drop_remainder=True).repeat()
    run = fit_step_times(model, data)
    return run, {"max_delta": delta, "tolerance": tolerance, "backend": keras.backend.backend()}


def serve_backend(args):
    started = time.perf_counter()
    run, info = trainer(args)
    run(2)  # compilation, optimizer slots, allocator
    serve(lambda k: median(run(k)), {**info, "warmup_s": time.perf_counter() - started})


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS))
    parser.add_argument("--size", type=int, default=128, help="training image size (default 128)")
    parser.add_argument("--batch", type=int, default=8, help="training batch (default 8)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved samples per backend")
    parser.add_argument("--steps", type=int, default=3, help="fit steps per sample")
    parser.add_argument("--serve", choices=BACKENDS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        return serve_backend(args)
    started = time.perf_counter()
    print(
        header("bench_backends", f"{THREADS} threads per backend; R50x1 fit at {args.size}², batch {args.batch}"),
        flush=True,
    )
    options = ["--size", str(args.size), "--batch", str(args.batch)]
    workers = [
        Worker(__file__, b, options, {"KERAS_BACKEND": b, **(TORCH_ENV if b == "torch" else {})}) for b in args.backends
    ]
    info, ready = {}, []
    for w in workers:
        try:
            info[w.name] = w.reply()
            ready.append(w)
        except RuntimeError as e:
            print(f"  {e}", flush=True)
    samples, live = interleave(ready, [args.steps], args.repeats)
    for w in live:
        w.close()
    anchor = samples.get(ANCHOR, {}).get(str(args.steps), [])
    rows = []
    for name in args.backends:
        times = samples.get(name, {}).get(str(args.steps), [])
        ratios = [t / a for t, a in zip(times, anchor)]
        i = info.get(name, {})
        rows.append(
            [
                name,
                f"{i['max_delta']:.2e}" if i else "FAILED",
                f"{i['tolerance']:.1e}" if i else "",
                f"{1e3 * median(times):.0f}" if times else "FAILED",
                f"{median(ratios):.2f}" if ratios and name != ANCHOR else "–",
                f"{i['warmup_s']:.0f}" if i else "",
            ]
        )
    print(
        "\n"
        + table(
            ["backend", "max |Δ logits| vs transformers", "tolerance", "fit step ms", "× TensorFlow time", "warm-up s"],
            rows,
        )
    )
    print(f"\n# total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
