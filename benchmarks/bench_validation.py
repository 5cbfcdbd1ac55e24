"""Validation passes during `model.fit`: an evaluation pipeline that keeps its crops in memory
after the first pass (`PipelineOptions.evaluation_cache_bytes`, the default) against one that
decodes every image again in each pass (`evaluation_cache_bytes=0`, tfbit before 2026-12-07).

    python benchmarks/bench_validation.py [--repeats 2] [--epochs 10] [--steps-per-epoch 3]

The run of docs/finetuning.md's short digits fine-tune: the embedded digits checkpoint, scikit-
learn's digits written as PNG folders (1438 training, 359 validation images, 32 px), batch 32,
and a validation pass after every epoch, as `conversion.finetune --validation` does. Keras starts
a new iterator for each pass; without the cache each one instantiates the serving decoder's
graph again and decodes every image. Both variants run in this process, in turn, each with a
freshly built and compiled model (both pay the same tracing); the ratio is per pair.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))


def _digit_folders(root):
    from PIL import Image

    from conversion.digits import load_digits_split

    x, y, x_val, y_val = load_digits_split()
    for split, images, labels in (("train", x, y), ("val", x_val, y_val)):
        for i, (image, label) in enumerate(zip(images, labels)):
            os.makedirs(os.path.join(root, split, str(label)), exist_ok=True)
            Image.fromarray(image).save(os.path.join(root, split, str(label), f"{i}.png"))
    return os.path.join(root, "train"), os.path.join(root, "val")


def _fit_seconds(train, validation, cache_bytes, args):
    import keras

    import tfbit
    from conversion.convert import DEFAULT_CHECKPOINT
    from tfbit.finetune import PipelineOptions, make_pipeline

    model = tfbit.BitForImageClassification.from_pretrained(DEFAULT_CHECKPOINT)
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    options = PipelineOptions(seed=0, random_flip=False, evaluation_cache_bytes=cache_bytes)
    train_ds = make_pipeline(train, (40, 32), 32, training=True, options=options)
    val_ds = make_pipeline(validation, (40, 32), 32, options=options)
    started = time.perf_counter()
    model.fit(
        train_ds,
        epochs=args.epochs,
        steps_per_epoch=args.steps_per_epoch,
        validation_data=val_ds,
        verbose=0,
        shuffle=False,
    )
    return time.perf_counter() - started


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--steps-per-epoch", type=int, default=3)
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    from tfbit.finetune import from_image_folder

    with tempfile.TemporaryDirectory() as root:
        train_dir, val_dir = _digit_folders(root)
        train, validation = from_image_folder(train_dir), from_image_folder(val_dir)
        times = {"cached": [], "decoded each pass": []}
        for _ in range(args.repeats):
            times["decoded each pass"].append(_fit_seconds(train, validation, 0, args))
            times["cached"].append(_fit_seconds(train, validation, 512 * 2**20, args))
    print(f"model.fit, {args.epochs} epochs of {args.steps_per_epoch} steps, a validation pass after each:")
    for name, seconds in times.items():
        print(f"  {name:18s} median {statistics.median(seconds):6.1f} s  ({', '.join(f'{s:.1f}' for s in seconds)})")
    ratios = [old / new for old, new in zip(times["decoded each pass"], times["cached"])]
    print(f"  speed-up (decoded / cached, per pair): median {statistics.median(ratios):.2f}x")


if __name__ == "__main__":
    main()
