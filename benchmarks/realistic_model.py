"""A realistic full-size test case: R50x1 whose head tells the 32 shipped photos apart.

    python benchmarks/realistic_model.py [--rebuild] [--image-size 224] [--train-steps N]

    from benchmarks.realistic_model import realistic_checkpoint
    path = realistic_checkpoint()    # saved_models/.cache/realistic-r50x1, built when absent

A random-init classifier gives near-uniform logits, so quantized variants "agree" or "disagree"
on top-1 by chance. This builds a checkpoint that behaves like a trained one on the photos in
conversion/photos/ (tools/make_photos.py):

- the body is google/bit-50's architecture (transformers' BitConfig defaults: R50x1, 2048
  features) with transformers' random init (seeded), and every GroupNorm gamma/beta perturbed
  (+0.2 * N(0, 1), as tests/conftest.py's perturb_) so the norms' affine part is exercised;
- the head (2048 -> 32) is FITTED: class i is photo i, named after its file. Multinomial
  logistic regression (L2-regularized, L-BFGS in float64) on the pooled features of each photo
  and of AUGMENTATIONS random crops/flips/brightness-contrast changes of it, so the head relies
  on features that survive small changes, not on noise directions;
- with --train-steps N (`trained body`) the body is first trained end to end for N SGD steps on
  random augmented views of the photos (class i = photo i, batch 16, 20 warm-up steps), so its
  features are learned like a fine-tuned model's rather than random; the head is then fitted as
  above. R50x1 from random init at 128 px: ~2-3 s a step on 2 cores;
- preprocessing is google/bit-50's (shortest edge, center crop with no margin, bilinear,
  mean = std = 0.5) at 224 px by default (bit-50 uses 448; --image-size 448 builds that, in
  saved_models/.cache/realistic-r50x1-448, at ~4x the conversion and verification cost).

The directory is a transformers checkpoint (config.json with id2label, model.safetensors in HF's
key layout, preprocessor_config.json, written by transformers' save_pretrained), so
`python -m conversion.convert <dir> --images conversion/photos` treats it like a hub
checkpoint; realistic_model.json beside them records the recipe and the fit. The cache is
rebuilt when that recipe changes (e.g. the photos). Building takes ~1.5-2 min on 2 cores and
needs torch + transformers (the `test` extra).
"""

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CACHE_ROOT = os.path.join(ROOT, "saved_models", ".cache")
RECIPE_FILE = "realistic_model.json"
IMAGE_SIZE = 224
SEED = 0
AUGMENTATIONS = 5  # augmented views per photo the head is fitted on (besides the photo itself)
L2 = 1e-3  # on standardized features: top-1 margin ~8-9 logits on the photos
NORM_NOISE = 0.2  # GroupNorm gamma/beta perturbation, as tests/conftest.py's perturb_
TRAIN_BATCH, TRAIN_LR, TRAIN_WARMUP = 16, 0.03, 20  # the trained body's SGD (momentum 0.9)


def default_path(image_size=IMAGE_SIZE, train_steps=0):
    name = "realistic-r50x1" if image_size == IMAGE_SIZE else f"realistic-r50x1-{image_size}"
    return os.path.join(CACHE_ROOT, name + (f"-trained{train_steps}" if train_steps else ""))


def _photos():
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    from conversion.images import photo_paths

    paths = photo_paths()
    digest = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            digest.update(os.path.basename(p).encode() + b"\0" + f.read())
    return paths, digest.hexdigest()


def recipe(image_size=IMAGE_SIZE, train_steps=0):
    """What the cached checkpoint was built from; a different recipe means a rebuild."""
    paths, digest = _photos()
    spec = {
        "version": 1,
        "architecture": "transformers BitConfig defaults (google/bit-50: R50x1)",
        "image_size": image_size,
        "seed": SEED,
        "norm_noise": NORM_NOISE,
        "augmentations": AUGMENTATIONS,
        "l2": L2,
        "photos_sha256": digest,
        "labels": [os.path.splitext(os.path.basename(p))[0] for p in paths],
    }
    if train_steps:
        spec["training"] = {"steps": train_steps, "batch": TRAIN_BATCH, "lr": TRAIN_LR, "warmup": TRAIN_WARMUP}
    return spec


def _read_images(paths):
    from PIL import Image, ImageOps

    images = []
    for p in paths:
        with Image.open(p) as image:  # as tfbit.preprocessing.decode.load_image / transformers
            images.append(ImageOps.exif_transpose(image).convert("RGB"))
    return images


def augment(image, rng):
    """A random crop (35-100% of the area, aspect 3/4-4/3), flip and brightness/contrast change."""
    from PIL import Image, ImageEnhance

    w, h = image.size
    cw, ch = w, h
    for _ in range(10):
        area, ratio = rng.uniform(0.35, 1.0) * w * h, np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
        tw, th = int(round(np.sqrt(area * ratio))), int(round(np.sqrt(area / ratio)))
        if tw <= w and th <= h:
            cw, ch = tw, th
            break
    x, y = rng.randint(0, w - cw + 1), rng.randint(0, h - ch + 1)
    image = image.crop((x, y, x + cw, y + ch))
    if rng.rand() < 0.5:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    image = ImageEnhance.Brightness(image).enhance(rng.uniform(0.8, 1.2))
    return ImageEnhance.Contrast(image).enhance(rng.uniform(0.8, 1.2))


def _processor(image_size):
    import transformers

    return transformers.BitImageProcessor(
        do_resize=True,
        size={"shortest_edge": image_size},
        resample=2,
        do_center_crop=True,
        crop_size={"height": image_size, "width": image_size},
        do_rescale=True,
        do_normalize=True,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        do_convert_rgb=True,
    )


def _pooled_features(model, processor, images, batch=16):
    import torch

    out = []
    with torch.no_grad():
        for i in range(0, len(images), batch):
            pixel_values = processor(images[i : i + batch], return_tensors="pt")["pixel_values"]
            out.append(model.bit(pixel_values).pooler_output.flatten(1).double().numpy())
    return np.concatenate(out)


def _train_body(model, photos, processor, steps, log):
    """End-to-end SGD on fresh random augmented views (class i = photo i); returns the losses
    of the first and last 10 steps."""
    import torch

    rng = np.random.RandomState(SEED + 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=TRAIN_LR, momentum=0.9)
    losses = []
    model.train()
    for step in range(steps):
        chosen = rng.randint(0, len(photos), TRAIN_BATCH)
        pixel_values = processor([augment(photos[i], rng) for i in chosen], return_tensors="pt")["pixel_values"]
        for group in optimizer.param_groups:
            group["lr"] = TRAIN_LR * min(1.0, (step + 1) / TRAIN_WARMUP)
        loss = torch.nn.functional.cross_entropy(model(pixel_values).logits, torch.from_numpy(chosen))
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
        if step % 20 == 0 or step == steps - 1:
            log(f"  training step {step + 1}/{steps}: loss {loss.item():.3f}")
    model.eval()
    return {"first_10_loss": float(np.mean(losses[:10])), "last_10_loss": float(np.mean(losses[-10:]))}


def fit_head(features, labels, num_labels, l2):
    """L2-regularized multinomial logistic regression on centered, globally scaled features;
    returns (weight (num_labels, 2048), bias) acting on the raw pooled features."""
    import torch

    mean = features.mean(0)
    scale = (features - mean).std()
    x = torch.from_numpy((features - mean) / scale)
    y = torch.from_numpy(labels)
    w = torch.zeros(features.shape[1], num_labels, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(num_labels, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([w, b], max_iter=300, tolerance_grad=1e-9, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(x @ w + b, y) + l2 * (w**2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    weight = w.detach().numpy() / scale
    bias = b.detach().numpy() - mean @ weight
    return weight.T, bias


def logit_stats(logits, labels=None):
    """top-1 accuracy (when labels are given), mean top-1/top-2 margin, mean and max spread."""
    logits = np.asarray(logits, np.float64)
    labels = np.arange(len(logits)) if labels is None else np.asarray(labels)
    top = np.sort(logits, axis=1)
    spread = logits.max(1) - logits.min(1)
    return {
        "top1": float((logits.argmax(1) == labels).mean()),
        "mean_margin": float((top[:, -1] - top[:, -2]).mean()),
        "min_margin": float((top[:, -1] - top[:, -2]).min()),
        "mean_spread": float(spread.mean()),
        "max_abs": float(np.abs(logits).max()),
    }


def build(path, image_size=IMAGE_SIZE, log=print, train_steps=0):
    """Build the checkpoint into `path` (replaced atomically); returns its recipe + fit stats."""
    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()

    spec = recipe(image_size, train_steps)
    paths, _ = _photos()
    labels = spec["labels"]
    started = time.perf_counter()
    torch.manual_seed(SEED)
    config = transformers.BitConfig(
        num_labels=len(labels), id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)}
    )
    model = transformers.BitForImageClassification(config).eval()
    generator = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for p in model.bit.parameters():  # the body's 1-D parameters are its GroupNorm gamma/beta
            if p.ndim == 1:
                p.add_(NORM_NOISE * torch.randn(p.shape, generator=generator))
    processor = _processor(image_size)
    photos = _read_images(paths)
    training = _train_body(model, photos, processor, train_steps, log) if train_steps else None
    rng = np.random.RandomState(SEED)
    views = photos + [augment(im, rng) for _ in range(AUGMENTATIONS) for im in photos]
    targets = np.tile(np.arange(len(photos)), AUGMENTATIONS + 1)
    log(
        f"pooled features of {len(photos)} photos and {len(views) - len(photos)} augmented views "
        f"at {image_size} px (R50x1, torch)"
    )
    features = _pooled_features(model, processor, views)
    weight, bias = fit_head(features, targets, len(labels), L2)
    classifier = model.classifier[1]
    with torch.no_grad():
        classifier.weight.copy_(torch.from_numpy(weight).float())
        classifier.bias.copy_(torch.from_numpy(bias).float())
    n = len(photos)
    fit = {
        "photos": logit_stats(features[:n] @ weight.T + bias),
        "augmented_views": logit_stats(features[n:] @ weight.T + bias, targets[n:]),
        "feature_cosine_between_photos": float(_mean_offdiagonal_cosine(features[:n])),
        "build_seconds": round(time.perf_counter() - started, 1),
        "training": training,
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
    }

    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".realistic-", dir=parent)
    try:
        model.save_pretrained(staging)  # config.json + model.safetensors
        processor.save_pretrained(staging)
        with open(os.path.join(staging, RECIPE_FILE), "w", encoding="utf-8") as f:
            json.dump({"recipe": spec, "fit": fit}, f, indent=2)
        os.chmod(staging, 0o755)  # mkdtemp makes it private
        for name in os.listdir(staging):
            os.chmod(os.path.join(staging, name), 0o644)
        if os.path.isdir(path):
            shutil.rmtree(path)
        os.replace(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return {"recipe": spec, "fit": fit}


def _mean_offdiagonal_cosine(features):
    unit = features / np.linalg.norm(features, axis=1, keepdims=True)
    cosine = unit @ unit.T
    return cosine[~np.eye(len(cosine), dtype=bool)].mean()


def cached_info(path):
    """The recorded recipe and fit of a built checkpoint, or None."""
    try:
        with open(os.path.join(path, RECIPE_FILE), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def realistic_checkpoint(path=None, image_size=IMAGE_SIZE, rebuild=False, log=print, train_steps=0):
    """Path of the realistic R50x1 checkpoint directory, built first when absent or stale."""
    path = path or default_path(image_size, train_steps)
    info = cached_info(path)
    complete = all(
        os.path.isfile(os.path.join(path, f)) for f in ("config.json", "model.safetensors", "preprocessor_config.json")
    )
    if rebuild or not complete or info is None or info["recipe"] != recipe(image_size, train_steps):
        log(f"building the realistic R50x1 checkpoint in {path}")
        build(path, image_size, log, train_steps)
    return path


def evaluate(path):
    """Reload the checkpoint with transformers and run it on the photos: logit statistics."""
    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()
    paths, _ = _photos()
    model = transformers.BitForImageClassification.from_pretrained(path).eval()
    processor = transformers.AutoImageProcessor.from_pretrained(path)
    logits = []
    with torch.no_grad():
        for i in range(0, len(paths), 16):
            pixel_values = processor(_read_images(paths[i : i + 16]), return_tensors="pt")["pixel_values"]
            logits.append(model(pixel_values).logits.double().numpy())
    logits = np.concatenate(logits)
    names = [os.path.splitext(os.path.basename(p))[0] for p in paths]
    labels = [model.config.label2id[n] for n in names]
    return logit_stats(logits, labels)


def main(argv=None):
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: shared cores
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rebuild", action="store_true", help="build even when the cache is current")
    parser.add_argument(
        "--image-size",
        type=int,
        default=IMAGE_SIZE,
        help=f"preprocessing size (default {IMAGE_SIZE}; google/bit-50 uses 448)",
    )
    parser.add_argument(
        "--train-steps",
        type=int,
        default=0,
        help="train the body end to end for this many steps first (default 0: random body)",
    )
    parser.add_argument(
        "--path", help="where to build (default: saved_models/.cache/realistic-r50x1[-SIZE][-trainedN])"
    )
    args = parser.parse_args(argv)
    path = realistic_checkpoint(args.path, args.image_size, args.rebuild, train_steps=args.train_steps)
    info = cached_info(path)
    print(f"checkpoint: {path}")
    fit = info["fit"]
    print(
        f"fit: {fit['augmented_views']['top1']:.1%} top-1 on the {AUGMENTATIONS} augmented training views per photo; "
        f"mean feature cosine between photos {fit['feature_cosine_between_photos']:.3f}"
    )
    stats = evaluate(path)
    print(
        f"transformers on the {len(info['recipe']['labels'])} photos: top-1 {stats['top1']:.1%}, "
        f"top-1/top-2 logit margin mean {stats['mean_margin']:.2f} (min {stats['min_margin']:.2f}), "
        f"logit spread (max - min) mean {stats['mean_spread']:.2f}, max |logit| {stats['max_abs']:.2f}"
    )
    return 0 if stats["top1"] == 1.0 else 1


if __name__ == "__main__":
    sys.exit(main())
