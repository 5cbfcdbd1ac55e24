"""Train the small default BiT checkpoint on scikit-learn's digits, in Hugging Face format.

    python -m tools.make_digits_checkpoint [--output conversion/default_checkpoint] [--epochs N]

The model is a plain ``transformers.BitForImageClassification`` trained with
PyTorch, so the shipped folder is a genuine transformers checkpoint that the
TF port must reproduce. Inputs go through the very ``BitImageProcessor`` that
is saved next to the weights, so training and inference preprocessing agree.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch
import transformers
from PIL import Image
from transformers import BitConfig, BitForImageClassification, BitImageProcessor

from conversion.digits import DIGIT_LABELS, IMAGE_SIZE, SEED, load_digits_split

DEFAULT_OUTPUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "default_checkpoint")
MAX_SHIFT = 3  # pixels at 32x32, i.e. under one original 8x8 pixel


def make_config() -> BitConfig:
    return BitConfig(
        layer_type="preactivation",
        global_padding=None,
        num_groups=8,
        embedding_size=32,
        hidden_sizes=[64, 128, 256],
        depths=[1, 1, 1],
        num_labels=len(DIGIT_LABELS),
        id2label=dict(DIGIT_LABELS),
        label2id={v: k for k, v in DIGIT_LABELS.items()},
    )


def make_processor() -> BitImageProcessor:
    # Resize/crop are no-ops on IMAGE_SIZE inputs but let arbitrary photos be fed to the demo.
    return BitImageProcessor(
        do_resize=True,
        size={"shortest_edge": IMAGE_SIZE},
        resample=Image.Resampling.BICUBIC,
        do_center_crop=True,
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        do_convert_rgb=True,
    )


def pixel_values(processor, images: np.ndarray) -> torch.Tensor:
    # PIL images, exactly what the held-out PNG files decode to.
    return processor([Image.fromarray(x) for x in images], return_tensors="pt")["pixel_values"]


def random_shift(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    # Pad with +1.0 (= white 255 after normalisation) so shifted-in pixels look like paper.
    n, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (MAX_SHIFT,) * 4, value=1.0)
    dy, dx = torch.randint(0, 2 * MAX_SHIFT + 1, (2, n), generator=generator).tolist()
    return torch.stack([padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(n)])


def train(model, x, y, epochs: int, batch_size: int = 64, lr: float = 3e-3) -> None:
    gen = torch.Generator().manual_seed(SEED)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * ((len(x) + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    model.train()
    for epoch in range(epochs):
        perm = torch.randperm(len(x), generator=gen)
        total, correct, loss_sum = 0, 0, 0.0
        for s in range(0, len(x), batch_size):
            idx = perm[s : s + batch_size]
            out = model(pixel_values=random_shift(x[idx], gen), labels=y[idx])
            opt.zero_grad()
            out.loss.backward()
            opt.step()
            sched.step()
            total += len(idx)
            correct += (out.logits.argmax(-1) == y[idx]).sum().item()
            loss_sum += out.loss.item() * len(idx)
        print(
            f"epoch {epoch + 1:3d}/{epochs}  loss {loss_sum / total:.4f}  train acc {correct / total:.4f}", flush=True
        )


@torch.no_grad()
def evaluate_checkpoint(path: str) -> tuple[int, int]:
    """(num_correct, num_heldout) of the saved checkpoint, reloaded through transformers."""
    model = BitForImageClassification.from_pretrained(path).eval()
    processor = BitImageProcessor.from_pretrained(path)
    _, _, x_test, y_test = load_digits_split()
    logits = model(pixel_values=pixel_values(processor, x_test)).logits
    return int((logits.argmax(-1).numpy() == y_test).sum()), len(y_test)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--output", default=DEFAULT_OUTPUT)
    ap.add_argument("--epochs", type=int, default=30)
    args = ap.parse_args(argv)

    torch.manual_seed(SEED)
    # Denormal floats appear during training and slow CPU steps ~10x. set_flush_denormal only
    # affects the calling thread, so train single-threaded: faster than 2 threads here and the
    # float reduction order (hence the exact weights) does not depend on the core count.
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    x_train, y_train, _, _ = load_digits_split()
    processor = make_processor()
    model = BitForImageClassification(make_config())
    print(f"parameters: {sum(p.numel() for p in model.parameters()):,}")

    start = time.perf_counter()
    train(model, pixel_values(processor, x_train), torch.from_numpy(y_train), args.epochs)
    train_seconds = time.perf_counter() - start

    os.makedirs(args.output, exist_ok=True)
    model.eval().save_pretrained(args.output)  # transformers 5 always writes model.safetensors
    processor.save_pretrained(args.output)

    correct, n = evaluate_checkpoint(args.output)
    metrics = {
        "heldout_accuracy_transformers": correct / n,
        "num_heldout": n,
        "num_correct": correct,
        "image_size": IMAGE_SIZE,
        "seed": SEED,
        "epochs": args.epochs,
        "train_seconds": round(train_seconds, 1),
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
    }
    with open(os.path.join(args.output, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)
        f.write("\n")
    print(json.dumps(metrics, indent=2))
    return metrics


if __name__ == "__main__":
    main()
