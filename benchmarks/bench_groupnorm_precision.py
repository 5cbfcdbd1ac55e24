"""How exact float32 BiT is, per stage, against float64: PyTorch (transformers), tfbit's Keras
model and its TFLite fp32 file; and what GroupNorm's channel sums cost.

    python benchmarks/bench_groupnorm_precision.py [--photos 8]

Model: a random-weight R50x1 transformers BitBackbone (stage1-4, 1-D parameters perturbed as the
parity tests do), on the shipped photos at 224 px. The reference is the same PyTorch model in
float64. The timing part compares tfbit's GroupNorm (channel sums over the width, then the
height) with the whole-plane sum it replaced, at the R50x1 shapes, in one process.
"""

import argparse
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import header, whole_plane_groupnorm_call  # noqa: E402

STAGES = ("stage1", "stage2", "stage3", "stage4")
# (height, width, channels) of R50x1's GroupNorm inputs at 224 px
SHAPES = [
    (56, 56, 64),
    (56, 56, 256),
    (28, 28, 128),
    (28, 28, 512),
    (14, 14, 256),
    (14, 14, 1024),
    (7, 7, 512),
    (7, 7, 2048),
]


def precision(photos):
    import torch
    import transformers

    import tfbit
    from conversion import export, runners
    from conversion import images as real
    from tfbit.preprocessing.processor import BitImageProcessor

    torch.manual_seed(0)
    reference = transformers.BitBackbone(transformers.BitConfig(out_features=list(STAGES))).eval()
    with torch.no_grad():
        for p in reference.parameters():
            if p.ndim == 1:
                p.add_(0.2 * torch.randn(p.shape))
    pixels = BitImageProcessor()(real.photo_images(photos).images)
    x = torch.from_numpy(np.ascontiguousarray(pixels.transpose(0, 3, 1, 2)))
    with torch.no_grad():
        float32 = [m.numpy().transpose(0, 2, 3, 1) for m in reference(x).feature_maps]
        float64 = [m.numpy().transpose(0, 2, 3, 1) for m in reference.double()(x.double()).feature_maps]
    with tempfile.TemporaryDirectory() as workdir:
        reference.float().save_pretrained(workdir)
        model, _ = tfbit.load_model(workdir, task="backbone")
        inference = export.float32_inference_model(model)
        keras_out = inference.predict(pixels, batch_size=8, verbose=0)
        path = os.path.join(workdir, "fp32.tflite")
        with open(path, "wb") as f:
            f.write(export.tflite_bytes(inference, "backbone", pixels.shape[1:3], "fp32"))
        tflite_out = runners.tflite_runner(path)(pixels)
    print(
        f"\n{'stage':7} {'max|ref|':>9} {'PyTorch f32':>12} {'tfbit Keras':>12} {'tfbit TFLite':>13}   "
        "(max |Δ| against float64, and / max|ref|)"
    )
    for i, stage in enumerate(STAGES):
        scale = float(np.abs(float64[i]).max())
        errors = [float(np.abs(out - float64[i]).max()) for out in (float32[i], keras_out[stage], tflite_out[stage])]
        cells = "".join(f" {e:8.2e} ({e / scale:.1e})" for e in errors)
        print(f"{stage:7} {scale:9.1f}{cells}")


def speed(batches, repeats=3):
    import tensorflow as tf

    import tfbit

    print(f"\nGroupNorm+ReLU over the {len(SHAPES)} R50x1 shapes, ms per call (best of {repeats}), TF graph:")
    for batch in batches:
        totals = {"rows then columns (tfbit)": 0.0, "whole plane (before)": 0.0}
        for h, w, c in SHAPES:
            x = tf.constant(np.random.RandomState(0).rand(batch, h, w, c).astype("float32") * 10)
            layer = tfbit.GroupNormActivation(32, 1e-5, "relu")
            layer.build(x.shape)
            calls = {
                "rows then columns (tfbit)": tf.function(lambda v: layer(v)),
                "whole plane (before)": tf.function(lambda v: whole_plane_groupnorm_call(layer, v)),
            }
            reps = max(5, 200 // batch)
            for name, call in calls.items():
                call(x)
                best = []
                for _ in range(repeats):
                    start = time.perf_counter()
                    for _ in range(reps):
                        call(x)
                    best.append((time.perf_counter() - start) / reps * 1000)
                totals[name] += min(best)
        new, old = totals.values()
        print(f"  batch {batch:2}: tfbit {new:7.2f}   before {old:7.2f}   ratio tfbit/before {new / old:.2f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--photos", type=int, default=8)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    args = parser.parse_args()
    print(header("bench_groupnorm_precision.py", f"R50x1 backbone, {args.photos} photos, batches {args.batches}"))
    precision(args.photos)
    speed(args.batches)


if __name__ == "__main__":
    main()
