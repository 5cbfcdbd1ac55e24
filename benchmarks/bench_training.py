"""Training throughput of tfbit R50x1 (`model.fit`) next to transformers' PyTorch training step.

    python benchmarks/bench_training.py [--quick] [--repeats N] [--steps K] [--sizes 128 224] [--parts ...]
    python -m benchmarks.bench_training ...    (the same, from the repository root)

Batch 16, SGD momentum 0.9, sparse categorical cross-entropy from logits, random images and labels
held in memory. One worker subprocess per (system, image size); the workers of a group (PyTorch
plus as many tfbit variants as memory allows) stay alive together and are timed in turn (see
common.Worker), so every ratio to PyTorch comes from interleaved samples. A sample is the
median step time of one `fit` call of K steps (timed by a callback, so fit's per-call setup is
excluded) or of K PyTorch steps (forward + loss + backward + optimizer step).
`--parts profile` adds a TF-profiler op breakdown of one tfbit fit step (128², default and oneDNN).
"""

import argparse
import os
import sys
import time

import numpy as np

if not __package__:  # run as a file, not with -m: make the `benchmarks` package importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import (
    NUM_CLASSES,
    THREADS,
    TORCH_ENV,
    Worker,
    emit,
    fit_step_times,
    header,
    images,  # noqa: E402
    interleave,
    median,
    op_profile,
    report_profile,
    run_child,
    serve,
    setup_tf,
    setup_torch,
    table,
    use_previous_groupnorm,
)

BATCH = 16
LEARNING_RATE = 0.01
SYSTEMS = {
    "tfbit_fit": ("tfbit model.fit", {}),
    "tfbit_fit_xla": ("tfbit model.fit, jit_compile=True", {}),
    "tfbit_fit_onednn": ("tfbit model.fit, TF_ENABLE_ONEDNN_OPTS=1", {"TF_ENABLE_ONEDNN_OPTS": "1"}),
    "tfbit_fit_prevgn": ("tfbit model.fit, previous GN", {}),
    "hf_torch": ("HF transformers, PyTorch step", TORCH_ENV),
}
ANCHOR = "hf_torch"
# A training worker holds ~2.2 GB at 128² and ~3.4 GB at 224² (batch 16): cap how many live at once.
MAX_WORKERS = {128: 5, 224: 3}


def groups_for(size, systems):
    others = [n for n in systems if n != ANCHOR]
    per_group = max(1, MAX_WORKERS.get(size, 3) - (ANCHOR in systems))
    chunks = [others[i : i + per_group] for i in range(0, len(others), per_group)] or [[]]
    return [([ANCHOR] if ANCHOR in systems else []) + chunk for chunk in chunks]


def labels(n, seed=0):
    return np.random.RandomState(seed).randint(0, NUM_CLASSES, n).astype("int64")


def tfbit_trainer(name, size):
    tf = setup_tf()
    import keras

    import tfbit

    if name.endswith("_prevgn"):
        use_previous_groupnorm()
    keras.utils.set_random_seed(0)
    model = tfbit.BitForImageClassification(tfbit.BitConfig(num_labels=NUM_CLASSES))
    model.compile(
        optimizer=keras.optimizers.SGD(LEARNING_RATE, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=name.endswith("_xla"),
    )
    data = tf.data.Dataset.from_tensor_slices((images(2 * BATCH, size), labels(2 * BATCH)))
    data = data.batch(BATCH, drop_remainder=True).repeat()
    return fit_step_times(model, data)


def torch_trainer(size):
    torch = setup_torch()
    import transformers

    torch.manual_seed(0)
    model = transformers.BitForImageClassification(transformers.BitConfig(num_labels=NUM_CLASSES)).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE, momentum=0.9)
    x = torch.from_numpy(np.ascontiguousarray(images(BATCH, size).transpose(0, 3, 1, 2)))
    y = torch.from_numpy(labels(BATCH))

    def run(k):
        times = []
        for _ in range(k):
            start = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            loss = torch.nn.functional.cross_entropy(model(x).logits, y)
            loss.backward()
            optimizer.step()
            times.append(time.perf_counter() - start)
        return times

    return run


def serve_trainer(args):
    started = time.perf_counter()
    run = torch_trainer(args.size) if args.serve == "hf_torch" else tfbit_trainer(args.serve, args.size)
    run(2)  # tracing / XLA compilation, optimizer slots, allocator
    serve(lambda k: BATCH / median(run(k)), {"warmup_s": time.perf_counter() - started})


# ---- op-level profile (bench_inference.py --parts profile does the same for inference graphs) ----

PROFILES = {  # target: (system, image size, environment)
    "tfbit_fit 128² step": ("tfbit_fit", 128, {}),
    "tfbit_fit 128² step, oneDNN": ("tfbit_fit", 128, {"TF_ENABLE_ONEDNN_OPTS": "1"}),
}


def child_profile(args):
    """Wall time of one fit step (batch 16) and the TF op types that fill it (TF profiler trace)."""
    system, size, _ = PROFILES[args.profile]
    train = tfbit_trainer(system, size)
    emit(op_profile(lambda: train(1)))


# ---- parent ----------------------------------------------------------------------------------


def run_throughput(args):
    speed, ratio, info = {}, {}, {}
    for size in args.sizes:
        for group in groups_for(size, args.systems):
            print(f"\n## {size}x{size}: {', '.join(group)}", flush=True)
            workers = [Worker(__file__, n, ["--size", str(size)], SYSTEMS[n][1]) for n in group]
            ready = []
            for w in workers:  # they build concurrently; only the timed samples must not overlap
                try:
                    info[(w.name, size)] = w.reply()
                    ready.append(w)
                except RuntimeError as e:
                    print(f"  {e}", flush=True)
            samples, live = interleave(ready, [args.steps], args.repeats)
            for w in live:
                info[(w.name, size)]["rss_mb"] = w.close()["rss_mb"]
            anchor = samples.get(ANCHOR, {}).get(str(args.steps), [])
            for name, by_request in samples.items():
                values = by_request.get(str(args.steps), [])
                speed.setdefault((name, size), []).extend(values)
                ratio.setdefault((name, size), []).extend(a / b for a, b in zip(values, anchor))
    header = ["system"] + [h for s in args.sizes for h in (f"{s}² img/s", f"{s}² ×PyTorch", f"{s}² peak RSS MB")]
    rows = []
    for name in args.systems:
        row = [SYSTEMS[name][0]]
        for size in args.sizes:
            v = speed.get((name, size), [])
            r = median(ratio.get((name, size), []))
            row += [
                f"{median(v):.2f}" if v else "FAILED",
                f"{r:.2f}" if v and name != ANCHOR else "–",
                f"{info.get((name, size), {}).get('rss_mb', 0):.0f}",
            ]
        rows.append(row)
    print("\n" + table(header, rows))
    warm = ", ".join(f"{n} {s}²: {i['warmup_s']:.0f}" for (n, s), i in info.items())
    print(f"\nwarm-up s (build + 2 steps): {warm}", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: tfbit fit vs PyTorch at 128x128")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved samples per system and size")
    parser.add_argument("--steps", type=int, default=2, help="training steps per sample")
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 224])
    parser.add_argument("--systems", nargs="+", choices=list(SYSTEMS), default=list(SYSTEMS))
    parser.add_argument(
        "--parts",
        nargs="+",
        default=["throughput"],
        choices=["throughput", "profile"],
        help="profile (op breakdown of one fit step) is not in the default set",
    )
    parser.add_argument("--serve", choices=list(SYSTEMS), help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--profile", choices=list(PROFILES), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        return serve_trainer(args)
    if args.profile:
        return child_profile(args)
    if args.quick:
        args.sizes, args.repeats, args.steps = [128], 2, 2
        args.systems = [n for n in args.systems if n in ("tfbit_fit", ANCHOR)]
    started = time.perf_counter()
    print(header("bench_training", f"{THREADS} threads per system, batch {BATCH}"), flush=True)
    if "throughput" in args.parts:
        run_throughput(args)
    if "profile" in args.parts:
        print("\n## Op profile (TF profiler, one fit step after warm-up, one subprocess each)", flush=True)
        for target, (_, _, env) in PROFILES.items():
            out = run_child([__file__, "--profile", target], env)
            print(
                report_profile(target, out) if "error" not in out else f"- {target}: FAILED {out['error']}", flush=True
            )
    print(f"\n# total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
