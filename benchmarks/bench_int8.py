"""Mobile int8 on a realistic R50x1: speed, fidelity and integer-only graphs of every TFLite
variant, next to onnxruntime running transformers' model in fp32 and static int8.

    python benchmarks/bench_int8.py [--repeats N] [--calibration 2 8 16 32] [--views 4]
                                    [--image-size 224] [--train-steps 0] [--recipes NAME ...]
    python benchmarks/bench_int8.py --layers   (only the per-layer error profile of full int8, below)
    python -m benchmarks.bench_int8 ...        (the same, from the repository root)

The model is benchmarks/realistic_model.py's full-size R50x1 (a head fitted so that each shipped
photo is a class of its own; built and cached on first use, ~2 min); --train-steps N selects its
trained-body variant (the body trained end to end for N steps first; 200 steps at --image-size 128
take ~7 min). Three subprocesses:

1. tflite (TensorFlow): tfbit loads the checkpoint, `conversion.export` writes fp32, fp16,
   dynamic-range int8 and the published full int8 (`int8`: LiteRT's quantizer with
   `conversion.quantize.DEFAULT_RECIPE`, calibrated on N mirrored photos, as `conversion.convert`
   does, for each N of --calibration); then the alternatives, all calibrated on the default 16
   photos: the TFLite converter's own full int8 (`converter_int8`, the published file until issue
   23) and its 16x8 mode (`converter_int16x8`, int16 activations everywhere), and every recipe of
   `conversion.quantize.RECIPES` (`aeq_<recipe>`, or those of --recipes) applied to the fp32
   file; the float model's logits are the reference (it equals transformers within the
   project's 1e-4 contract, tests/test_parity_hf.py).
2. onnx (PyTorch): transformers loads the same checkpoint, exports ONNX (opset 17), and
   onnxruntime's static quantization (QDQ, per-channel weights) calibrates on the same images.
3. measure (neither framework): every file runs on the evaluation set — the 32 photos and
   --views augmented views of each (crop, flip, brightness/contrast; not the views the head was
   fitted on) — for top-1 agreement with the reference (also on the images whose float top-1
   margin is at least a fifth of the logits' spread, i.e. not near-ties), max |delta logits| in
   units of the logits' per-image spread, and accuracy (the class of a view is its photo); then batch-1
   latency, interleaved over the systems --repeats times, 2 threads each (LiteRT with
   XNNPACK, onnxruntime intra-op 2). The table's "tensors" column counts each file's tensors by
   type and its QUANTIZE ops (the edges' and the int8 <-> int16 requantizations).

--layers: where full int8's error comes from. TensorFlow's QuantizationDebugger runs the full
int8 model (the converter's settings, 16 calibration photos) on the evaluation set and compares
every quantized op's output with the float op fed the same quantized input: each op's own
error in quantization steps of its output (RMSE, mean and max; rounding alone gives RMSE 0.29),
by op type, by layer group and the ten worst. Then full int8 is converted again with some op
types left in float (`KEEP_FLOAT`) and measured for top-1 agreement: which ops, made exact,
win the answers back.
"""

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time

import numpy as np

if not __package__:  # run as a file, not with -m: make the `benchmarks` package importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import THREADS, TORCH_ENV, emit, header, median, run_child, setup_tf, setup_torch, table  # noqa: E402

DEFAULT_CALIBRATION = 16  # conversion.convert's --calibration-images default
EVAL_SEED = 1000  # realistic_model fits its head on views drawn with seed 0


def _inputs(workdir):
    return {k: np.load(os.path.join(workdir, f"{k}.npy")) for k in ("eval", "labels", "reference")}


def _calibration_photos(count):
    """What `conversion.convert` calibrates on for photos: mirrored photos, spread over the set
    (PIL images, for either framework's processor)."""
    from conversion import images as real

    return real.mirrored(real.spread(real.photo_images().images, count))


def _checkpoint(args):
    from benchmarks import realistic_model

    return realistic_model.realistic_checkpoint(
        image_size=args.image_size, train_steps=args.train_steps, log=lambda m: print(m, file=sys.stderr)
    )


def _realistic(args):
    """(the folded float model, its processor, evaluation pixels, their labels): the realistic
    R50x1 and the 32 photos plus `args.views` augmented views of each (the class of a view is its photo)."""
    import tfbit
    from benchmarks import realistic_model
    from conversion import export
    from conversion import images as real
    from tfbit.preprocessing.processor import BitImageProcessor

    model, checkpoint = tfbit.load_model(_checkpoint(args), task="classification")
    processor = BitImageProcessor.from_dict(checkpoint.preprocessor)
    photos = real.photo_images().images
    rng = np.random.RandomState(EVAL_SEED)
    augmented = [realistic_model.augment(p, rng) for p in photos for _ in range(args.views)]
    labels = list(range(len(photos))) + [i for i in range(len(photos)) for _ in range(args.views)]
    return export.float32_inference_model(model), processor, processor(photos + augmented), labels


@contextlib.contextmanager
def _int8_converter(tf, inference, size, calibration):
    """A TFLite converter set up for the converter's own full int8 (the published `int8` until
    issue 23: integer kernels only, float input and output), calibrated on `calibration`, on a
    graph saved in a temporary folder that lives as long as the context."""
    from conversion import export

    with tempfile.TemporaryDirectory() as graph_dir:
        spec = tf.TensorSpec([None, *size, 3], tf.float32, name="pixel_values")
        graph = export._save(
            inference,
            os.path.join(graph_dir, "graph"),
            {"serving_default": (lambda x: {"logits": inference(x, training=False)}, spec)},
        )
        converter = export._configure(export._converter(graph), "fp32")
        converter.optimizations = {tf.lite.Optimize.DEFAULT}
        converter.representative_dataset = lambda: ([x[None]] for x in calibration)
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        yield converter


def child_tflite(args):
    """Stage 1: the evaluation set, the float reference and every TFLite file."""
    tf = setup_tf()
    from conversion import export, tflite_graph

    inference, processor, pixels, labels = _realistic(args)
    reference = inference.predict(pixels, batch_size=16, verbose=0)
    np.save(os.path.join(args.workdir, "eval.npy"), pixels)
    np.save(os.path.join(args.workdir, "labels.npy"), np.asarray(labels))
    np.save(os.path.join(args.workdir, "reference.npy"), reference)
    size = tuple(pixels.shape[1:3])

    files, seconds = {}, {}

    def write(name, flatbuffer, started):
        seconds[name] = time.perf_counter() - started
        files[name] = os.path.join(args.workdir, f"{name}.tflite")
        with open(files[name], "wb") as f:
            f.write(flatbuffer)

    for calibration in sorted(set(args.calibration) | {DEFAULT_CALIBRATION}):
        started = time.perf_counter()
        quantizations = ("fp32", "fp16", "dynamic_int8", "int8") if calibration == DEFAULT_CALIBRATION else ("int8",)
        for q, flatbuffer in export.tflite_models(
            inference, "classification", size, quantizations, processor(_calibration_photos(calibration))
        ).items():
            if isinstance(flatbuffer, Exception):
                print(f"{q} (calibration {calibration}) failed: {flatbuffer}", file=sys.stderr)
                continue
            write(
                q if calibration == DEFAULT_CALIBRATION or q != "int8" else f"int8_cal{calibration}",
                flatbuffer,
                started,
            )

    # The converter's own full int8 and its 16x8 mode (int16 activations everywhere).
    calibration = processor(_calibration_photos(DEFAULT_CALIBRATION))
    for name, ops in (
        ("converter_int8", [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]),
        ("converter_int16x8", [tf.lite.OpsSet.EXPERIMENTAL_TFLITE_BUILTINS_ACTIVATIONS_INT16_WEIGHTS_INT8]),
    ):
        started = time.perf_counter()
        with _int8_converter(tf, inference, size, calibration) as converter:
            converter.target_spec.supported_ops = ops
            try:
                write(name, converter.convert(), started)
            except Exception as e:  # a failed alternative is a result, not a crash
                print(f"{name} failed: {e}", file=sys.stderr)

    # LiteRT's quantizer, every recipe, on the float file and the same calibration photos.
    from conversion import quantize

    with open(files["fp32"], "rb") as f:
        float_flatbuffer = f.read()
    for recipe in args.recipes or quantize.RECIPES:
        started = time.perf_counter()
        try:
            write(f"aeq_{recipe}", quantize.quantize(float_flatbuffer, calibration, recipe), started)
        except Exception as e:
            print(f"aeq_{recipe} failed: {e}", file=sys.stderr)

    emit(
        {
            "files": files,
            "seconds": seconds,
            "float_ops": {name: len(tflite_graph.float_ops(open(p, "rb").read())) for name, p in files.items()},
            "types": {name: _tensor_types(open(p, "rb").read()) for name, p in files.items()},
            "sizes_mb": {name: os.path.getsize(p) / 2**20 for name, p in files.items()},
        }
    )


def _tensor_types(flatbuffer):
    """ "int8 425, int16 14, ...": the file's tensors by type, and its QUANTIZE ops (the edges'
    and the requantizations between int8 and int16 ops)."""
    from tfbit.private_api import tflite_flatbuffer_utils, tflite_schema

    schema = tflite_schema()
    names = {code: name.lower() for name, code in vars(schema.TensorType).items() if not name.startswith("_")}
    model = tflite_flatbuffer_utils().read_model_from_bytearray(bytearray(flatbuffer))
    counts = {}
    for tensor in model.subgraphs[0].tensors:
        counts[names[tensor.type]] = counts.get(names[tensor.type], 0) + 1
    quantize_code = schema.BuiltinOperator.QUANTIZE
    codes = [max(c.builtinCode, c.deprecatedBuiltinCode) for c in model.operatorCodes]
    counts["QUANTIZE ops"] = sum(codes[op.opcodeIndex] == quantize_code for op in model.subgraphs[0].operators)
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))


# Op types kept in float (the debugger's denylist; float kernels allowed for them) to see which
# of them, computed exactly, win the answers back.
KEEP_FLOAT = {
    "nothing (full int8)": [],
    "GroupNorm statistics (MEAN)": ["MEAN"],
    "every GroupNorm op (MEAN, SUB, MUL, ADD, RSQRT)": ["MEAN", "SUB", "MUL", "ADD", "RSQRT"],
    "convolutions (CONV_2D)": ["CONV_2D"],
}


def _agreement(logits, reference):
    """Top-1 agreement, overall and on the images that are not near-ties of the float model."""
    spread = np.mean(reference.max(1) - reference.min(1))
    top = np.sort(reference, axis=1)
    clear = (top[:, -1] - top[:, -2]) >= 0.2 * spread
    agree = logits.argmax(1) == reference.argmax(1)
    return {
        "agreement": float(np.mean(agree)),
        "clear_agreement": float(np.mean(agree[clear])),
        "clear": int(clear.sum()),
        "per_spread": float(np.abs(logits - reference).max() / spread),
    }


def child_layers(args):
    """Per-op error of full int8 (QuantizationDebugger's layer statistics), then the agreement
    of full int8 with each group of KEEP_FLOAT left in float."""
    tf = setup_tf()
    inference, processor, evaluation, _ = _realistic(args)
    calibration = processor(_calibration_photos(DEFAULT_CALIBRATION))
    with _int8_converter(tf, inference, tuple(evaluation.shape[1:3]), calibration) as converter:
        debugger = tf.lite.experimental.QuantizationDebugger(
            converter=converter, debug_dataset=lambda: ([x[None]] for x in evaluation)
        )
        debugger.run()
    reference = inference.predict(evaluation, batch_size=16, verbose=0)
    keep_float = {}
    for name, ops in KEEP_FLOAT.items():
        with _int8_converter(tf, inference, tuple(evaluation.shape[1:3]), calibration) as converter:
            if ops:
                converter.target_spec.supported_ops = [
                    tf.lite.OpsSet.TFLITE_BUILTINS_INT8,
                    tf.lite.OpsSet.TFLITE_BUILTINS,
                ]
                flatbuffer = tf.lite.experimental.QuantizationDebugger(
                    converter=converter,
                    debug_dataset=lambda: ([x[None]] for x in evaluation[:1]),
                    debug_options=tf.lite.experimental.QuantizationDebugOptions(denylisted_ops=ops),
                ).get_nondebug_quantized_model()
            else:
                flatbuffer = converter.convert()
        path = os.path.join(args.workdir, f"keep_float_{len(keep_float)}.tflite")
        with open(path, "wb") as f:
            f.write(flatbuffer)
        run = _runner(path)
        keep_float[name] = _agreement(
            np.concatenate([run(evaluation[i : i + 16]) for i in range(0, len(evaluation), 16)]), reference
        )
    stats = os.path.join(args.workdir, "layer_stats.csv")
    with open(stats, "w") as f:
        debugger.layer_statistics_dump(f)
    import csv

    with open(stats) as f:
        rows = list(csv.DictReader(f))
    layers = []
    for depth, row in enumerate(rows):
        scale = float(row["scale"])
        if not scale:
            continue
        layers.append(
            {
                "depth": depth,
                "op": row["op_name"],
                "tensor": row["tensor_name"],
                "rmse_steps": float(row["mean_squared_error"]) ** 0.5 / scale,
                "bias_steps": float(row["mean_error"]) / scale,
                "max_steps": float(row["max_abs_error"]) / scale,
            }
        )
    emit({"layers": layers, "images": len(evaluation), "keep_float": keep_float})


def report_layers(out):
    """Each op's own error in quantization steps of its output (the debugger's statistics are of
    the difference int8 - float): RMSE, mean (a bias) and max; rounding alone gives RMSE 0.29."""
    layers = out["layers"]
    print(f"\n## Full int8 per-op error (QuantizationDebugger, {out['images']} images, 16 calibration photos)")
    by_op = {}
    for layer in layers:
        by_op.setdefault(layer["op"], []).append(layer)
    rows = [
        [
            op,
            len(group),
            f"{median([g['rmse_steps'] for g in group]):.2f}",
            f"{max(g['rmse_steps'] for g in group):.2f}",
            f"{max(abs(g['bias_steps']) for g in group):.2f}",
            f"{max(g['max_steps'] for g in group):.1f}",
        ]
        for op, group in sorted(by_op.items(), key=lambda item: -max(g["rmse_steps"] for g in item[1]))
    ]
    print(table(["op", "count", "median RMSE", "max RMSE", "max |bias|", "max |error|"], rows))
    stages = {}
    for layer in layers:
        stage = layer["tensor"].split("/")[1].split("_")[0] if "/" in layer["tensor"] else "?"
        stages.setdefault(stage, []).append(layer["rmse_steps"])
    print(
        table(
            ["layer group", "ops", "median RMSE", "max RMSE"],
            [[stage, len(v), f"{median(v):.2f}", f"{max(v):.2f}"] for stage, v in stages.items()],
        )
    )
    worst = sorted(layers, key=lambda g: -g["rmse_steps"])[:10]
    print(
        table(
            ["depth", "op", "RMSE", "bias", "max |error|", "tensor"],
            [
                [
                    g["depth"],
                    g["op"],
                    f"{g['rmse_steps']:.2f}",
                    f"{g['bias_steps']:.2f}",
                    f"{g['max_steps']:.1f}",
                    g["tensor"][:70],
                ]
                for g in worst
            ],
        )
    )
    print(f"\n## Full int8 with some op types left in float ({out['images']} images)")
    print(
        table(
            ["kept in float", "top-1 agreement", "on margin >= 0.2 spread", "max |Δ| / spread"],
            [
                [name, f"{k['agreement']:.1%}", f"{k['clear_agreement']:.1%} of {k['clear']}", f"{k['per_spread']:.3f}"]
                for name, k in out["keep_float"].items()
            ],
        )
    )


def child_onnx(args):
    """Stage 2: transformers' model from the same checkpoint as ONNX, fp32 and static int8."""
    import tensorflow  # noqa: F401  loaded before torch: the other order can abort (see README)

    torch = setup_torch()
    import onnxruntime.quantization as oq
    import transformers

    path = _checkpoint(args)
    model = transformers.BitForImageClassification.from_pretrained(path).eval()
    fp32 = os.path.join(args.workdir, "hf_fp32.onnx")
    torch.onnx.export(
        model,
        (torch.zeros(1, 3, args.image_size, args.image_size),),
        fp32,
        input_names=["pixel_values"],
        output_names=["logits"],
        dynamic_axes={"pixel_values": {0: "batch"}},
        opset_version=17,
        dynamo=False,
    )
    processor = transformers.AutoImageProcessor.from_pretrained(path)
    calibration = processor(_calibration_photos(DEFAULT_CALIBRATION), return_tensors="np")["pixel_values"]

    class Reader(oq.CalibrationDataReader):
        def __init__(self):
            self.items = iter([{"pixel_values": x[None]} for x in calibration])

        def get_next(self):
            return next(self.items, None)

    prepared = os.path.join(args.workdir, "hf_fp32_prepared.onnx")
    oq.quant_pre_process(fp32, prepared)
    int8 = os.path.join(args.workdir, "hf_int8.onnx")
    started = time.perf_counter()
    oq.quantize_static(
        prepared,
        int8,
        Reader(),
        quant_format=oq.QuantFormat.QDQ,
        per_channel=True,
        activation_type=oq.QuantType.QInt8,
        weight_type=oq.QuantType.QInt8,
    )
    emit(
        {
            "files": {"onnxruntime_fp32": fp32, "onnxruntime_int8": int8},
            "seconds": {"onnxruntime_int8": time.perf_counter() - started},
        }
    )


def _runner(path):
    """fn(NHWC float32 batch) -> logits, for a .tflite or .onnx file."""
    if path.endswith(".onnx"):
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = THREADS, 1
        session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        run = lambda x: session.run(None, {"pixel_values": np.ascontiguousarray(x.transpose(0, 3, 1, 2))})[0]
    else:
        from ai_edge_litert.interpreter import Interpreter

        interpreter = Interpreter(model_path=path, num_threads=THREADS)
        interpreter.allocate_tensors()
        inp, out = interpreter.get_input_details()[0]["index"], interpreter.get_output_details()[0]["index"]

        def run(x):
            if tuple(interpreter.get_input_details()[0]["shape"]) != x.shape:
                interpreter.resize_tensor_input(inp, x.shape)
                interpreter.allocate_tensors()
            interpreter.set_tensor(inp, x)
            interpreter.invoke()
            return interpreter.get_tensor(out)

    return run


def child_measure(args):
    """Stage 3: fidelity on the evaluation set, then interleaved batch-1 latency."""
    data = _inputs(args.workdir)
    files = json.loads(args.files)
    reference, labels, x = data["reference"], data["labels"], data["eval"]
    spread = float(np.mean(reference.max(1) - reference.min(1)))
    runs = {name: _runner(path) for name, path in files.items()}
    fidelity = {
        "reference": {
            "accuracy": float(np.mean(reference.argmax(1) == labels)),
            "spread": spread,
            "clear": _agreement(reference, reference)["clear"],
        }
    }
    for name, run in runs.items():
        logits = np.concatenate([run(x[i : i + 16]) for i in range(0, len(x), 16)])
        fidelity[name] = {
            **_agreement(logits, reference),
            "accuracy": float(np.mean(logits.argmax(1) == labels)),
            "max_abs_diff": float(np.abs(logits - reference).max()),
        }
    one = x[:1]
    for run in runs.values():  # XNNPACK packing, allocator warm-up
        run(one), run(one)
    latency = {name: [] for name in runs}
    names = list(runs)
    for r in range(args.repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            n, start = 0, time.perf_counter()
            while n < 3 or time.perf_counter() - start < 1.0:
                runs[name](one)
                n += 1
            latency[name].append((time.perf_counter() - start) / n * 1000)
    emit({"fidelity": fidelity, "latency_ms": latency, "images": len(x)})


def ratio(latency, name, other):
    """Median of per-repeat speed ratios name/other (samples taken moments apart)."""
    return median([b / a for a, b in zip(latency[name], latency[other])])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="interleaved latency samples per system")
    parser.add_argument(
        "--calibration",
        type=int,
        nargs="+",
        default=[2, 8, 32],
        help=f"calibration set sizes for full int8 besides the default {DEFAULT_CALIBRATION}",
    )
    parser.add_argument("--views", type=int, default=4, help="augmented views per photo in the evaluation set")
    parser.add_argument("--image-size", type=int, default=224, help="the realistic model's resolution")
    parser.add_argument(
        "--train-steps",
        type=int,
        default=0,
        help="the realistic model's trained-body variant (0: random body, head fitted)",
    )
    parser.add_argument(
        "--recipes", nargs="+", help="LiteRT quantizer recipes to measure (default: all of conversion.quantize.RECIPES)"
    )
    parser.add_argument("--workdir", help="keep the files here")
    parser.add_argument("--layers", action="store_true", help="only the per-op error profile of full int8")
    parser.add_argument("--child", choices=["tflite", "onnx", "measure", "layers"], help=argparse.SUPPRESS)
    parser.add_argument("--files", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return {"tflite": child_tflite, "onnx": child_onnx, "measure": child_measure, "layers": child_layers}[
            args.child
        ](args)

    started = time.perf_counter()
    print(header("bench_int8", f"{THREADS} threads per system"), flush=True)
    scratch = None if args.workdir else tempfile.TemporaryDirectory(prefix="tfbit_int8_")
    workdir = args.workdir or scratch.name
    os.makedirs(workdir, exist_ok=True)
    common = [
        "--workdir",
        workdir,
        "--views",
        str(args.views),
        "--image-size",
        str(args.image_size),
        "--train-steps",
        str(args.train_steps),
    ]
    if args.layers:
        out = run_child([__file__, "--child", "layers", *common])
        if "error" in out:
            sys.exit(f"layers stage failed: {out['error']}")
        report_layers(out)
        print(f"\n# total {time.perf_counter() - started:.0f} s")
        return
    recipes = ["--recipes", *args.recipes] if args.recipes else []
    tflite = run_child([__file__, "--child", "tflite", "--calibration", *map(str, args.calibration), *recipes, *common])
    if "error" in tflite:
        sys.exit(f"tflite stage failed: {tflite['error']}")
    onnx = run_child([__file__, "--child", "onnx", *common], TORCH_ENV)
    if "error" in onnx:
        print(f"onnx stage failed (the onnxruntime rows are missing; `make bench` installs it): {onnx['error']}")
        onnx = {"files": {}, "seconds": {}}
    files = {**tflite["files"], **onnx["files"]}
    out = run_child(
        [__file__, "--child", "measure", "--files", json.dumps(files), "--repeats", str(args.repeats), *common]
    )
    if "error" in out:
        sys.exit(f"measure stage failed: {out['error']}")

    fidelity, latency = out["fidelity"], out["latency_ms"]
    ref = fidelity["reference"]
    body = f"body trained {args.train_steps} steps" if args.train_steps else "random body"
    print(
        f"\n## Realistic R50x1 ({body}), {args.image_size}x{args.image_size}: {out['images']} images (32 photos + "
        f"{args.views} views each); float reference accuracy {ref['accuracy']:.1%}, mean logit spread "
        f"{ref['spread']:.2f}; {ref['clear']} images with a top-1 margin >= 0.2 spread"
    )
    rows = []
    for name in files:
        f, lat = fidelity[name], latency[name]
        rows.append(
            [
                name,
                f"{median(lat):.1f}",
                f"{ratio(latency, name, 'fp32'):.2f}" if "fp32" in latency else "–",
                f"{ratio(latency, name, 'onnxruntime_int8'):.2f}" if "onnxruntime_int8" in latency else "–",
                f"{f['agreement']:.1%}",
                f"{f['clear_agreement']:.1%}",
                f"{f['accuracy']:.1%}",
                f"{f['max_abs_diff']:.2f}",
                f"{f['per_spread']:.3f}",
                str(tflite["float_ops"].get(name, "–")),
                tflite["types"].get(name, "–"),
                f"{tflite['sizes_mb'][name]:.1f}" if name in tflite["sizes_mb"] else "–",
                f"{(tflite['seconds'].get(name) or onnx['seconds'].get(name) or float('nan')):.0f}",
            ]
        )
    print(
        table(
            [
                "system",
                "b1 ms",
                "× TFLite fp32",
                "× ORT int8",
                "top-1 agreement",
                "on margin >= 0.2 spread",
                "accuracy",
                "max |Δ|",
                "|Δ| / spread",
                "float ops",
                "tensors",
                "MB",
                "convert s",
            ],
            rows,
        )
    )
    print(
        "\n(× columns: speed ratios, median of interleaved samples; convert s for the default-calibration"
        " TFLite row is the time of all four variants together)"
    )
    print("# raw " + json.dumps({"tflite": tflite, "onnx": onnx, "measure": out}))
    print(f"\n# total {time.perf_counter() - started:.0f} s" + ("" if scratch else f"; files in {workdir}"))
    if scratch:
        scratch.cleanup()


if __name__ == "__main__":
    main()
