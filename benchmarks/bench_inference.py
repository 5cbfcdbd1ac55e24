"""Inference speed of tfbit R50x1 next to its peers, conversion cost, and GroupNorm variants.

    python benchmarks/bench_inference.py [--quick] [--repeats N] [--parts ...] [--groups ...]
    python -m benchmarks.bench_inference ...    (the same, from the repository root)
    python -m benchmarks.bench_inference --preset tf-paths   (issue 13's rows only, ~10 min)

Every system runs in its own subprocess (`--serve NAME`), so imports, environment variables read
at import time (TF_ENABLE_ONEDNN_OPTS) and peak RSS are per system. The systems of a group and the
two anchors (HF PyTorch, keras ResNet50V2) stay alive together and are timed in turn, so ratios
come from samples taken moments apart: the machine is shared, read the ratios more than img/s.
"""

import argparse
import glob
import json
import os
import resource
import sys
import tempfile
import time

import numpy as np

if not __package__:  # run as a file, not with -m: make the `benchmarks` package importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import (
    NUM_CLASSES,
    ROOT,
    SIZE,
    THREADS,
    TORCH_ENV,
    Worker,
    emit,  # noqa: E402
    header,
    images,
    interleave,
    median,
    op_profile,
    peak_rss_mb,
    previous_groupnorm_call,
    report_profile,
    run_child,
    serve,
    setup_tf,
    setup_torch,
    table,
    use_previous_groupnorm,
)

CALIBRATION_IMAGES = 16  # `conversion.convert`'s default


# ---- systems ---------------------------------------------------------------------------------
# name: (label, environment, family). Builders below take the work dir and return
# make(batch) -> a zero-argument call that runs one batch to completion.

SYSTEMS = {
    "tfbit_eager": ("tfbit Keras, eager model(x)", {}, "graph"),
    "tfbit_graph": ("tfbit Keras, tf.function", {}, "graph"),
    "tfbit_folded_graph": ("tfbit folded, tf.function", {}, "graph"),
    "tfbit_folded_xla": ("tfbit folded, XLA", {}, "xla"),
    "tfbit_folded_graph_onednn": ("tfbit folded, tf.function, oneDNN", {"TF_ENABLE_ONEDNN_OPTS": "1"}, "onednn"),
    "tfbit_folded_graph_prevgn": ("tfbit folded, previous GN, tf.function", {}, "graph"),
    "tfbit_folded_xla_prevgn": ("tfbit folded, previous GN, XLA", {}, "xla"),
    "tfbit_saved_model": ("tfbit SavedModel, pixel_values signature", {}, "graph"),
    "tfbit_default_pob": ("tfbit Keras default (WS cached), predict_on_batch", {}, "graph"),
    "tfbit_folded_pob": ("tfbit folded, predict_on_batch", {}, "graph"),
    "tfbit_saved_model_bytes": ("tfbit SavedModel, serving_default (JPEG/PNG photos)", {}, "graph"),
    "tfbit_saved_model_onednn": ("tfbit SavedModel, pixel_values, oneDNN", {"TF_ENABLE_ONEDNN_OPTS": "1"}, "onednn"),
    "tfbit_saved_model_xla": ("tfbit SavedModel --saved-model-xla, pixel_values", {}, "xla"),
    "tfbit_saved_model_xla_bytes": ("tfbit SavedModel --saved-model-xla, serving_default", {}, "xla"),
    "tflite_fp32": ("TFLite fp32 (LiteRT, XNNPACK)", {}, "graph"),
    "tflite_fp16": ("TFLite fp16 weights", {}, "graph"),
    "tflite_dynamic_int8": ("TFLite dynamic-range int8", {}, "graph"),
    "tflite_int8": ("TFLite full int8", {}, "graph"),
    "hf_torch": ("HF transformers BitForImageClassification (torch)", TORCH_ENV, None),
    "timm": ("timm resnetv2_50x1_bit (torch)", TORCH_ENV, None),
    "hf_onnxruntime": ("HF transformers BiT exported to ONNX, onnxruntime", TORCH_ENV, None),
    "rn50v2_graph": ("keras ResNet50V2 (BatchNorm), tf.function", {}, "graph"),
    "rn50v2_xla": ("keras ResNet50V2 (BatchNorm), XLA", {}, "xla"),
    "rn50v2_graph_onednn": ("keras ResNet50V2, tf.function, oneDNN", {"TF_ENABLE_ONEDNN_OPTS": "1"}, "onednn"),
    "rn50v2_saved_model": ("keras ResNet50V2, SavedModel (model.export)", {}, "saved_model"),
}
RN50V2_OF_FAMILY = {"graph": "rn50v2_graph", "xla": "rn50v2_xla", "onednn": "rn50v2_graph_onednn"}
# Issue 13's goals, paired ratios in one run: (system, peer, goal); printed after the table.
GOALS = [("tfbit_default_pob", "tfbit_folded_pob", 0.95), ("tfbit_graph", "tfbit_folded_graph", 0.95)] + [
    (saved_model, peer, goal)
    for saved_model in ("tfbit_saved_model", "tfbit_saved_model_onednn", "tfbit_saved_model_xla")
    for peer, goal in (("rn50v2_saved_model", 0.90), ("hf_onnxruntime", 1.0))
]


def keras_runner(model, jit_compile=None, eager=False):
    tf = setup_tf()
    fn = model if eager else tf.function(lambda x: model(x, training=False), jit_compile=jit_compile)

    def make(batch):
        x = tf.constant(images(batch))
        return lambda: np.asarray(fn(x))

    return make


def load_tfbit(workdir, folded):
    setup_tf()
    import keras

    import tfbit  # noqa: F401  registers the layers for load_model

    return keras.saving.load_model(os.path.join(workdir, "folded.keras" if folded else "model.keras"), compile=False)


def build(name, workdir):
    if name.endswith("_prevgn"):
        use_previous_groupnorm()
    if name.endswith("_pob"):  # what a user who loads a model and calls predict_on_batch runs
        model = load_tfbit(workdir, folded="folded" in name)
        return lambda batch: lambda x=images(batch): model.predict_on_batch(x)
    if name.startswith("tfbit_saved_model"):
        return saved_model_runner(
            os.path.join(workdir, "saved_model_xla" if "_xla" in name else "saved_model"),
            encoded=name.endswith("_bytes"),
        )
    if name.startswith("tfbit_"):
        model = load_tfbit(workdir, folded="folded" in name)
        return keras_runner(model, jit_compile="xla" in name or None, eager=name == "tfbit_eager")
    if name == "rn50v2_saved_model":
        tf = setup_tf()
        loaded = tf.saved_model.load(os.path.join(workdir, "rn50v2_saved_model"))  # owns the variables

        def make(batch):
            x = tf.constant(images(batch))
            return lambda: loaded.serve(x).numpy()

        return make
    if name.startswith("rn50v2"):
        setup_tf()
        import keras

        return keras_runner(
            keras.applications.ResNet50V2(weights=None, classes=NUM_CLASSES), jit_compile="xla" in name or None
        )
    if name.startswith("tflite_"):
        from ai_edge_litert.interpreter import Interpreter

        path = os.path.join(workdir, name[len("tflite_") :] + ".tflite")

        def make(batch):
            # One interpreter per batch size so that both stay allocated while interleaved.
            interpreter = Interpreter(model_path=path, num_threads=THREADS)
            index = interpreter.get_input_details()[0]["index"]
            interpreter.resize_tensor_input(index, (batch, SIZE, SIZE, 3))
            interpreter.allocate_tensors()
            interpreter.set_tensor(index, images(batch))
            out = interpreter.get_output_details()[0]["index"]

            def call():
                interpreter.invoke()
                return interpreter.get_tensor(out)

            return call

        return make
    torch = setup_torch()
    if name == "hf_onnxruntime":
        return onnxruntime_runner(torch, workdir)
    if name == "hf_torch":
        import transformers

        model = transformers.BitForImageClassification(transformers.BitConfig(num_labels=NUM_CLASSES))
        forward = lambda x: model(x).logits
    else:
        import timm

        model = timm.create_model("resnetv2_50x1_bit", pretrained=False, num_classes=NUM_CLASSES)
        forward = model
    model.eval()

    def make(batch):
        x = torch.from_numpy(np.ascontiguousarray(images(batch).transpose(0, 3, 1, 2)))

        def call():
            with torch.no_grad():
                return forward(x).numpy()

        return call

    return make


def saved_model_runner(path, encoded):
    """A SavedModel signature as TF Serving runs it: `pixel_values` on preprocessed images, or
    `serving_default` on the shipped photos' JPEG/PNG bytes (decoded and preprocessed in the graph)."""
    tf = setup_tf()
    signatures = tf.saved_model.load(path).signatures
    if encoded:
        photos = sorted(glob.glob(os.path.join(ROOT, "conversion", "photos", "*.[jp][pn]g")))
        data = [open(f, "rb").read() for f in photos]
        fn = signatures["serving_default"]

        def make(batch):
            x = tf.constant([data[i % len(data)] for i in range(batch)])
            return lambda: fn(image_bytes=x)["logits"].numpy()

        return make
    fn = signatures["pixel_values"]

    def make(batch):
        x = tf.constant(images(batch))
        return lambda: fn(pixel_values=x)["logits"].numpy()

    return make


def onnxruntime_runner(torch, workdir):
    """The strongest CPU peer in shared/notes/measurements.md: transformers' BiT exported by torch
    (TorchScript exporter, opset 17; it constant-folds weight standardization) on onnxruntime,
    which fuses GroupNorm."""
    import onnxruntime
    import transformers

    model = transformers.BitForImageClassification(transformers.BitConfig(num_labels=NUM_CLASSES)).eval()
    path = os.path.join(workdir, "hf_bit.onnx")
    torch.onnx.export(
        model,
        (torch.zeros(1, 3, SIZE, SIZE),),
        path,
        input_names=["pixel_values"],
        output_names=["logits"],
        dynamic_axes={"pixel_values": {0: "batch"}},
        opset_version=17,
        dynamo=False,
    )
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = THREADS, 1
    session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])

    def make(batch):
        x = np.ascontiguousarray(images(batch).transpose(0, 3, 1, 2))
        return lambda: session.run(None, {"pixel_values": x})[0]

    return make


def sample(call, batch, min_seconds=1.0):
    """img/s over at least min_seconds of calls (one call at batch 16)."""
    n, start = 0, time.perf_counter()
    while n == 0 or time.perf_counter() - start < min_seconds:
        call()
        n += 1
    return n * batch / (time.perf_counter() - start)


def serve_system(args):
    started = time.perf_counter()
    make = build(args.serve, args.workdir)
    calls = {b: make(b) for b in args.batches}
    load = time.perf_counter() - started
    for call in calls.values():  # tracing, XLA compilation, allocator and XNNPACK warm-up
        call()
        call()
    serve(lambda batch: sample(calls[batch], batch), {"load_s": load, "warmup_s": time.perf_counter() - started - load})


# ---- conversion ------------------------------------------------------------------------------


def vm_rss_mb():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def child_conversion(args):
    """Times every export of a random R50x1 and leaves the artifacts for the system runs."""
    setup_tf()
    import keras

    import tfbit
    from conversion import export
    from tfbit.preprocessing.processor import BitImageProcessor

    keras.utils.set_random_seed(0)
    config = tfbit.BitConfig(num_labels=NUM_CLASSES)
    model = tfbit.BitForImageClassification(config)
    rss_before = vm_rss_mb()
    calibration = images(CALIBRATION_IMAGES, seed=1)
    seconds = {}

    def timed(label, step):
        start = time.perf_counter()
        out = step()
        seconds[label] = time.perf_counter() - start
        return out

    timed(".keras save", lambda: model.save(os.path.join(args.workdir, "model.keras")))
    inference = timed("float32_inference_model (fold)", lambda: export.float32_inference_model(model))
    timed(
        "SavedModel (TF Serving)",
        lambda: export.write_saved_model(
            inference,
            "classification",
            BitImageProcessor().to_dict(),
            config.id2label,
            os.path.join(args.workdir, "saved_model"),
        ),
    )
    timed(
        "SavedModel, XLA forward pass (--saved-model-xla)",
        lambda: export.write_saved_model(
            inference,
            "classification",
            BitImageProcessor().to_dict(),
            config.id2label,
            os.path.join(args.workdir, "saved_model_xla"),
            xla=True,
        ),
    )
    models = timed(
        f"TFLite {', '.join(args.quantizations)}",
        lambda: export.tflite_models(inference, "classification", (SIZE, SIZE), args.quantizations, calibration),
    )
    for quantization, flatbuffer in models.items():
        with open(os.path.join(args.workdir, quantization + ".tflite"), "wb") as f:
            f.write(flatbuffer)
    inference.save(os.path.join(args.workdir, "folded.keras"))  # for the system runs, not timed
    # The TF Serving peer: keras' own SavedModel export of ResNet50V2 (not timed).
    keras.applications.ResNet50V2(weights=None, classes=NUM_CLASSES).export(
        os.path.join(args.workdir, "rn50v2_saved_model"), verbose=False
    )
    # The int8 worker runs beside this process: count both peaks (an upper bound of the total).
    worker_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    emit(
        {
            "seconds": seconds,
            "total_s": sum(seconds.values()),
            "rss_before_mb": rss_before,
            "rss_mb": peak_rss_mb() + worker_mb,
            "worker_rss_mb": worker_mb,
        }
    )


# ---- GroupNorm variants ----------------------------------------------------------------------

GN_SHAPES = [(1, 56, 56, 256), (16, 56, 56, 256), (16, 56, 56, 64), (16, 7, 7, 2048)]
GN_GROUPS, EPS = 32, 1e-5


def gn_variants(tf, keras, channels):
    """name -> fn(x) for GroupNorm(32)+ReLU with gamma=1.3, beta=0.1 (any affine will do)."""
    import tfbit

    gamma = np.full(channels, 1.3, "float32")
    beta = np.full(channels, 0.1, "float32")

    def layer(cls, **kw):
        obj = cls(**kw)
        obj.build((None, 8, 8, channels))
        obj.set_weights([gamma, beta])
        return obj

    current = layer(tfbit.GroupNormActivation, groups=GN_GROUPS, epsilon=EPS)
    previous = layer(
        type("Previous", (tfbit.GroupNormActivation,), {"call": previous_groupnorm_call}), groups=GN_GROUPS, epsilon=EPS
    )
    keras_gn = layer(keras.layers.GroupNormalization, groups=GN_GROUPS, epsilon=EPS)

    def grouped_affine(x, mean, var):
        scale = gamma.reshape(1, 1, GN_GROUPS, -1) * tf.math.rsqrt(var + EPS)
        offset = beta.reshape(1, 1, GN_GROUPS, -1) - mean * scale
        n = tf.shape(x)[0]
        return tf.nn.relu(x * tf.reshape(scale, (n, 1, 1, channels)) + tf.reshape(offset, (n, 1, 1, channels)))

    def one_pass(x):  # E[x^2] - E[x]^2 on the grouped view
        g = tf.reshape(x, (tf.shape(x)[0], -1, GN_GROUPS, channels // GN_GROUPS))
        mean = tf.reduce_mean(g, (1, 3), keepdims=True)
        return grouped_affine(x, mean, tf.reduce_mean(tf.square(g), (1, 3), keepdims=True) - tf.square(mean))

    def shifted(x):  # one pass around a shift (each group's first value), tf.nn.sufficient_statistics
        g = tf.reshape(x, (tf.shape(x)[0], -1, GN_GROUPS, channels // GN_GROUPS))
        shift = tf.stop_gradient(g[:, :1, :, :1])
        count, m_ss, v_ss, _ = tf.nn.sufficient_statistics(g, (1, 3), shift=shift, keepdims=True)
        mean, var = tf.nn.normalize_moments(count, m_ss, v_ss, shift)
        return grouped_affine(x, mean, var)

    return {
        "tfbit layers.py (per-channel moments)": current,
        "previous tfbit (grouped-view moments)": previous,
        "keras GroupNormalization+ReLU": lambda x: tf.nn.relu(keras_gn(x)),
        "one-pass E[x2]-E[x]2, grouped view": one_pass,
        "shifted one-pass (sufficient_statistics)": shifted,
    }


def gn_reference(x):
    n, h, w, c = x.shape
    g = x.astype("float64").reshape(n, h * w, GN_GROUPS, c // GN_GROUPS)
    mean, var = g.mean((1, 3), keepdims=True), g.var((1, 3), keepdims=True)
    y = ((g - mean) / np.sqrt(var + EPS)).reshape(x.shape) * 1.3 + 0.1
    return np.maximum(y, 0)


def time_call(fn, x, seconds=0.4, repeats=3):
    fn(x)
    fn(x)
    out = []
    for _ in range(repeats):
        n, start = 0, time.perf_counter()
        while n == 0 or time.perf_counter() - start < seconds:
            np.asarray(fn(x))
            n += 1
        out.append((time.perf_counter() - start) / n)
    return median(out)


def activation_ratios(tf, model, x):
    """max over GroupNorm inputs of |group mean| / group std: how much cancellation a one-pass
    variance would face on these activations."""
    import tfbit

    original, ratios = tfbit.GroupNormActivation.call, []

    def spy(self, inputs):
        g = np.asarray(inputs, "float64")
        g = g.reshape(g.shape[0], -1, self.groups, g.shape[-1] // self.groups)
        ratios.append(float((np.abs(g.mean((1, 3))) / (g.std((1, 3)) + 1e-12)).max()))
        return original(self, inputs)

    tfbit.GroupNormActivation.call = spy
    try:
        model(tf.constant(x))
    finally:
        tfbit.GroupNormActivation.call = original
    return max(ratios)


def child_groupnorm(args):
    tf = setup_tf()
    import keras

    import tfbit
    from conversion.digits import load_digits_split
    from tfbit.preprocessing.processor import BitImageProcessor

    result = {"speed": [], "numerics": [], "model": {}, "ratios": {}}
    for shape in GN_SHAPES[:1] if args.quick else GN_SHAPES:
        x = tf.constant(np.random.RandomState(0).normal(0.5, 1, shape).astype("float32"))
        for name, fn in gn_variants(tf, keras, shape[-1]).items():
            for xla in (False, True):
                compiled = tf.function(fn, jit_compile=xla)
                result["speed"].append([list(shape), name, xla, time_call(compiled, x) * 1e3])
    # Numerics vs a float64 reference when every group sits at a large mean (the worst case for
    # a one-pass variance); the parity contract is 1e-4 * max(1, |ref|).
    shape = (2, 14, 14, 256)
    for offset in (0, 10, 100, 1000):
        x = (offset + np.random.RandomState(1).normal(0, 1, shape)).astype("float32")
        ref = gn_reference(x)
        for name, fn in gn_variants(tf, keras, shape[-1]).items():
            err = float(np.abs(np.asarray(tf.function(fn)(tf.constant(x))) - ref).max() / max(1, np.abs(ref).max()))
            result["numerics"].append([offset, name, err])

    # Whole-model effect, interleaved in this process: layers.py, the previous version, and no
    # statistics at all (per-channel affine + ReLU only: GroupNorm's cost over a folded BatchNorm).
    keras.utils.set_random_seed(0)
    model = tfbit.fold_weight_standardization(tfbit.BitForImageClassification(tfbit.BitConfig(num_labels=NUM_CLASSES)))
    original = tfbit.GroupNormActivation.call
    no_stats = lambda self, x: self.activation(x * self.gamma + self.beta)
    batches = (1,) if args.quick else tuple(args.batches)
    inputs = {b: tf.constant(images(b)) for b in batches}
    fns, outputs = {}, {}
    for name, call in [("layers.py", original), ("previous", previous_groupnorm_call), ("no statistics", no_stats)]:
        tfbit.GroupNormActivation.call = call
        for xla in (False,) if args.quick else (False, True):
            fn = fns[(name, xla)] = tf.function(model, jit_compile=xla)
            for b in batches:  # trace now, while this call is installed
                outputs[(name, xla, b)] = np.asarray(fn(inputs[b]))
    tfbit.GroupNormActivation.call = original
    samples = {}
    for _ in range(1 if args.quick else 3):
        for (name, xla), fn in fns.items():
            for b in batches:
                samples.setdefault(f"{name}|{xla}|{b}", []).append(b / time_call(fn, inputs[b], 1.0, 1))
    result["model"] = {k: median(v) for k, v in samples.items()}
    ref = outputs[("previous", False, batches[-1])]
    result["model_delta"] = float(
        np.abs(outputs[("layers.py", False, batches[-1])] - ref).max() / max(1, np.abs(ref).max())
    )

    # Activations that real inputs produce: random-init R50 and the trained digits checkpoint.
    result["ratios"]["R50x1 random init, random images"] = activation_ratios(tf, model, images(2))
    digits = tfbit.BitForImageClassification.from_pretrained(os.path.join(ROOT, "conversion", "default_checkpoint"))
    processor = BitImageProcessor.from_pretrained(os.path.join(ROOT, "conversion", "default_checkpoint"))
    result["ratios"]["digits checkpoint (trained), 32 test digits"] = activation_ratios(
        tf, digits, processor(list(load_digits_split()[2][:32]))
    )
    emit(result)


# ---- op-level profile -------------------------------------------------------------------------
# (bench_training.py --parts profile profiles a fit step the same way)

PROFILES = {  # target: (what runs, environment)
    "tfbit_folded_graph b16": ("tfbit_folded_graph", {}),
    "tfbit_folded_graph_prevgn b16": ("tfbit_folded_graph_prevgn", {}),
    "rn50v2_graph b16": ("rn50v2_graph", {}),
}


def child_profile(args):
    """Wall time of one batch-16 call and the TF op types that fill it (TF profiler trace)."""
    system, _ = PROFILES[args.profile]
    emit(op_profile(build(system, args.workdir)(16)))


# ---- parent ----------------------------------------------------------------------------------

# Each group runs as live workers next to the anchors, so every ratio is taken between samples
# measured moments apart; a system's RN50V2 counterpart is always in its group.
ANCHORS = ["hf_torch", "rn50v2_graph"]
SYSTEM_GROUPS = [
    ["tfbit_folded_graph", "tfbit_folded_graph_prevgn", "tfbit_graph", "tfbit_eager"],
    ["tfbit_folded_xla", "tfbit_folded_xla_prevgn", "rn50v2_xla", "tfbit_saved_model"],
    ["tfbit_folded_graph", "tfbit_folded_graph_onednn", "rn50v2_graph_onednn", "timm"],
    ["tflite_fp32", "tflite_fp16", "tflite_dynamic_int8", "tflite_int8", "hf_onnxruntime"],
    # issue 13: the default Keras path against the folded one, and TF Serving's SavedModel
    # (each variant, both signatures) against keras ResNet50V2's and onnxruntime
    ["tfbit_default_pob", "tfbit_folded_pob", "tfbit_graph", "tfbit_folded_graph"],
    [
        "tfbit_saved_model",
        "tfbit_saved_model_bytes",
        "tfbit_saved_model_onednn",
        "tfbit_saved_model_xla",
        "tfbit_saved_model_xla_bytes",
        "rn50v2_saved_model",
        "hf_onnxruntime",
    ],
]
# `--preset tf-paths`: exactly the issue-13 rows (groups 5 and 6) and the artifacts they need.
TF_PATHS_GROUPS = [5, 6]
QUICK_GROUPS = [["tfbit_folded_graph", "tfbit_folded_graph_prevgn", "tflite_fp32"]]


def run_systems(groups, args, workdir):
    """Returns per group {system: {batch: [img/s per repeat]}} and per system info."""
    results, info = [], {}
    for i, group in enumerate(groups, 1):
        names = list(dict.fromkeys(ANCHORS + group))
        print(f"  group {i}/{len(groups)}: {', '.join(names)}", flush=True)
        workers = []
        for name in names:
            w = Worker(__file__, name, ["--workdir", workdir, "--batches", *map(str, args.batches)], SYSTEMS[name][1])
            workers.append(w)
        ready = []
        for w in workers:  # they build concurrently; only the timed samples must not overlap
            try:
                info.setdefault(w.name, {}).update(w.reply())
                ready.append(w)
            except RuntimeError as e:
                print(f"  {e}", flush=True)
                info.setdefault(w.name, {})["error"] = str(e)
        samples, live = interleave(ready, args.batches, args.repeats)
        for w in live:
            rss = w.close()["rss_mb"]
            info[w.name]["rss_mb"] = max(rss, info[w.name].get("rss_mb", 0))
        results.append({name: {int(b): v for b, v in by_batch.items()} for name, by_batch in samples.items()})
    return results, info


def paired_ratio(results, name, other, batch):
    """Median over groups and repeats of name/other, each pair measured in the same repeat."""
    ratios = [
        a / b
        for g in results
        if name in g and other in g
        for a, b in zip(g[name].get(batch, []), g[other].get(batch, []))
    ]
    return median(ratios) if ratios else None


def report_systems(results, info, batches):
    header = (
        ["system"]
        + [h for b in batches for h in (f"b{b} img/s", f"b{b} ×HF", f"b{b} ×RN50V2")]
        + ["peak RSS MB", "warm-up s"]
    )
    rows = []
    for name, (label, _, family) in SYSTEMS.items():
        speeds = {b: [v for g in results for v in g.get(name, {}).get(b, [])] for b in batches}
        if not any(speeds.values()):
            if name in info:
                rows.append([label, "FAILED"] + [""] * (len(header) - 2))
            continue
        rn50 = None if name.startswith("rn50v2") else RN50V2_OF_FAMILY.get(family)
        row = [label]
        for b in batches:
            hf, rn = paired_ratio(results, name, "hf_torch", b), rn50 and paired_ratio(results, name, rn50, b)
            row += [
                f"{median(speeds[b]):.2f}" if speeds[b] else "–",
                f"{hf:.2f}" if hf and name != "hf_torch" else "–",
                f"{rn:.2f}" if rn else "–",
            ]
        row += [f"{info[name].get('rss_mb', 0):.0f}", f"{info[name].get('warmup_s', 0):.1f}"]
        rows.append(row)
    return table(header, rows)


def report_goals(results, batches):
    lines = []
    for name, peer, goal in GOALS:
        ratios = {b: paired_ratio(results, name, peer, b) for b in batches}
        if any(ratios.values()):
            cells = ", ".join(f"b{b} {r:.2f}" if r else f"b{b} –" for b, r in ratios.items())
            lines.append(f"- {SYSTEMS[name][0]} / {SYSTEMS[peer][0]}: {cells} (goal ≥ {goal:.2f})")
    return "\n".join(["Issue 13 ratios (median of paired repeats):"] + lines) if lines else ""


def report_conversion(out):
    rows = [[k, f"{v:.1f}"] for k, v in out["seconds"].items()]
    rows.append(["total", f"{out['total_s']:.1f}"])
    return (
        table(["conversion step (R50x1, random weights)", "seconds"], rows)
        + f"\npeak RSS {out['rss_mb']:.0f} MB: this process + the int8 worker's {out['worker_rss_mb']:.0f} MB "
        f"(model built: {out['rss_before_mb']:.0f} MB)"
    )


def report_groupnorm(out):
    speed = {}
    for shape, name, xla, ms in out["speed"]:
        speed.setdefault(name, {})[(tuple(shape), xla)] = ms
    keys = [(tuple(s), x) for s in dict.fromkeys(tuple(r[0]) for r in out["speed"]) for x in (False, True)]
    header = ["variant (ms per call)"] + [f"{'×'.join(map(str, s))}{' XLA' if x else ''}" for s, x in keys]
    speed_table = table(header, [[n] + [f"{v[k]:.2f}" for k in keys] for n, v in speed.items()])
    errors = {}
    for offset, name, err in out["numerics"]:
        errors.setdefault(name, {})[offset] = err
    offsets = sorted({r[0] for r in out["numerics"]})
    error_table = table(
        ["variant: max|err| / max(1,|ref|) vs float64"] + [f"mean {o}, std 1" for o in offsets],
        [[n] + [f"{e[o]:.1e}" for o in offsets] for n, e in errors.items()],
    )
    model_rows = {}
    for key, v in out["model"].items():
        name, xla, b = key.split("|")
        model_rows.setdefault(name, {})[(xla == "True", int(b))] = v
    cols = sorted(next(iter(model_rows.values())))
    model_table = table(
        ["R50x1 folded, GroupNorm as"] + [f"{'XLA' if x else 'graph'} b{b} img/s" for x, b in cols],
        [[n] + [f"{v[c]:.2f}" for c in cols] for n, v in model_rows.items()],
    )
    ratios = "\n".join(
        f"- max |group mean| / group std of GroupNorm inputs, {k}: {v:.1f}" for k, v in out["ratios"].items()
    )
    return (
        f"{speed_table}\n\n{error_table}\n\n{model_table}\n(layers.py vs previous GN, whole-model logits: "
        f"max|delta|/max(1,|ref|) = {out['model_delta']:.1e})\n{ratios}"
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: few systems, batch 1")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved samples per system and batch")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument(
        "--parts",
        nargs="+",
        default=["conversion", "systems", "groupnorm"],
        choices=["conversion", "systems", "groupnorm", "profile"],
        help="profile (op breakdown of a few graphs) is not in the default set",
    )
    parser.add_argument("--groups", nargs="+", type=int, help="run only these system groups (1-based)")
    parser.add_argument("--workdir", help="keep the converted artifacts here (or reuse them: --parts profile)")
    parser.add_argument("--serve", choices=list(SYSTEMS), help=argparse.SUPPRESS)
    parser.add_argument("--child", choices=["conversion", "groupnorm", "profile"], help=argparse.SUPPRESS)
    parser.add_argument("--profile", choices=list(PROFILES), help=argparse.SUPPRESS)
    parser.add_argument("--quantizations", nargs="+", default=["fp32", "fp16", "dynamic_int8", "int8"])
    parser.add_argument(
        "--preset",
        choices=["tf-paths"],
        help="tf-paths: the issue-13 rows only (default Keras path vs folded, the TF Serving "
        "SavedModel and its variants vs keras ResNet50V2's SavedModel and onnxruntime), "
        "i.e. --parts conversion systems --groups 5 6 --quantizations fp32; ~10 min",
    )
    args = parser.parse_args()
    if args.preset == "tf-paths":
        args.parts, args.groups, args.quantizations = ["conversion", "systems"], TF_PATHS_GROUPS, ["fp32"]
    if args.serve:
        return serve_system(args)
    if args.child == "conversion":
        return child_conversion(args)
    if args.child == "groupnorm":
        return child_groupnorm(args)
    if args.child == "profile":
        return child_profile(args)

    if args.quick:
        args.repeats, args.batches = min(args.repeats, 2), [1]
    groups = (
        QUICK_GROUPS if args.quick else [SYSTEM_GROUPS[i - 1] for i in args.groups or range(1, len(SYSTEM_GROUPS) + 1)]
    )
    started = time.perf_counter()
    print(header("bench_inference", f"{THREADS} threads per system"), flush=True)
    # Artifacts (~400 MB) are deleted at exit unless --workdir keeps them for a later --parts run.
    scratch = None if args.workdir else tempfile.TemporaryDirectory(prefix="tfbit_bench_")
    workdir = args.workdir or scratch.name
    os.makedirs(workdir, exist_ok=True)
    if "conversion" in args.parts:
        print("\n## Conversion (subprocess)", flush=True)
        quant = ["fp32"] if args.quick else args.quantizations
        out = run_child([__file__, "--child", "conversion", "--workdir", workdir, "--quantizations", *quant])
        print(report_conversion(out) if "error" not in out else f"FAILED: {out['error']}", flush=True)
    if "systems" in args.parts:
        print(f"\n## Inference, R50x1 {SIZE}x{SIZE}, img/s, {args.repeats} interleaved samples per group", flush=True)
        results, info = run_systems(groups, args, workdir)
        print("\n" + report_systems(results, info, args.batches), flush=True)
        print("\n" + report_goals(results, args.batches), flush=True)
        print("# raw " + json.dumps({"results": results, "info": info}), flush=True)
    if "groupnorm" in args.parts:
        print("\n## GroupNorm(32)+ReLU variants (one subprocess, 2 threads)", flush=True)
        out = run_child(
            [__file__, "--child", "groupnorm", "--batches", *map(str, args.batches)]
            + (["--quick"] if args.quick else [])
        )
        print(report_groupnorm(out) if "error" not in out else f"FAILED: {out['error']}", flush=True)
    if "profile" in args.parts:
        print("\n## Op profile (TF profiler, one call after warm-up, one subprocess each)", flush=True)
        for target, (_, env) in PROFILES.items():
            out = run_child([__file__, "--child", "profile", "--profile", target, "--workdir", workdir], env)
            print(
                report_profile(target, out) if "error" not in out else f"- {target}: FAILED {out['error']}", flush=True
            )
    print(f"\n# total {time.perf_counter() - started:.0f} s" + ("" if scratch else f"; artifacts in {workdir}"))
    if scratch:
        scratch.cleanup()


if __name__ == "__main__":
    main()
