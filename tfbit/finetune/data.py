"""tf.data input pipelines with BiT augmentation.

Training: resize to (resize, resize) → random crop (crop, crop) → random left-right flip
(per image, p = 0.5; the upstream TF2 script flipped every image). Evaluation: resize straight
to (crop, crop). Then a pixel preprocessing function maps [0, 255] values to model input.

Sources (`from_tfds`, `from_image_folder`, `from_arrays`) return an `ImageDataset` whose
`source` holds cheap elements (encoded bytes or paths where possible) and whose `decode`
turns them into (uint8 HWC RGB image, int64 label), so shuffling happens before decoding.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence

import numpy as np
import tensorflow as tf

from tfbit.finetune.hyperrule import HyperRulePlan
from tfbit.finetune.mixup import MixUp

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")
AUTOTUNE = tf.data.AUTOTUNE


class Normalize:
    """`(x * scale - mean) / std`; the default maps [0, 255] to [-1, 1], what BiT weights expect."""

    def __init__(self, mean=0.5, std=0.5, scale=1.0 / 255.0):
        self.mean, self.std, self.scale = mean, std, scale

    def __call__(self, images):
        images = tf.cast(images, tf.float32) * self.scale
        return (images - tf.constant(self.mean, tf.float32)) / tf.constant(self.std, tf.float32)

    def __repr__(self):
        return f"Normalize(mean={self.mean}, std={self.std}, scale={self.scale})"


def _to_rgb(image):
    return tf.image.grayscale_to_rgb(image) if image.shape[-1] == 1 else image


@dataclasses.dataclass(frozen=True, eq=False)
class ImageDataset:
    """An unbatched labelled image source.

    `source` yields whatever `decode` expects; `dataset` yields (uint8 (H, W, 3), int64 label).
    `image_size` is the (h, w) of the images when known (median for image folders), handy for
    `hyperrule_plan(ds.num_examples, ds.image_size)`.
    """

    source: tf.data.Dataset
    class_names: tuple[str, ...]
    num_examples: int
    decode: Callable | None = None
    image_size: tuple[int, int] | None = None

    @property
    def dataset(self) -> tf.data.Dataset:
        return self.source if self.decode is None else self.source.map(self.decode, num_parallel_calls=AUTOTUNE)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def id2label(self) -> dict[int, str]:
        return dict(enumerate(self.class_names))

    @property
    def label2id(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.class_names)}


# --- sources -----------------------------------------------------------------------------

def from_tfds(name_or_builder, split: str, data_dir: str | None = None, download: bool = False,
              image_key: str = "image", label_key: str = "label",
              shuffle_files: bool = False) -> ImageDataset:
    """A tfds dataset by name ("name[/config][:version]"), prepared-dataset directory
    (".../name/config/version"), or builder (e.g. `tfds.ImageFolder`).

    With `download=False` (the default, works offline) the dataset must already be prepared
    in `data_dir`; otherwise FileNotFoundError.
    """
    import tensorflow_datasets as tfds  # heavy; only needed here

    builder = name_or_builder
    if isinstance(builder, (str, os.PathLike)):
        builder = os.fspath(builder)
        if os.path.isdir(builder):
            builder = tfds.builder_from_directory(builder)
        elif os.path.isabs(builder) or builder.startswith("."):  # a path, not "name[/config]"
            raise FileNotFoundError(f"tfds dataset directory not found: {builder!r}")
        else:
            builder = tfds.builder(builder, data_dir=data_dir)
    # ImageFolder reads files on the fly: it is never "prepared" and refuses to prepare.
    reads_files = isinstance(builder, tfds.ImageFolder)
    if download and not reads_files:
        builder.download_and_prepare()
    if not reads_files and not builder.is_prepared():
        raise FileNotFoundError(
            f"tfds dataset {builder.name!r} is not prepared in {builder.data_dir!r}; "
            "prepare it there or pass download=True")

    features = builder.info.features
    for key in (image_key, label_key):
        if key not in features:
            raise ValueError(f"tfds dataset {builder.name!r} has no feature {key!r}: {list(features)}")
    image_feature = features[image_key]
    source = builder.as_dataset(split=split, shuffle_files=shuffle_files,
                                decoders={image_key: tfds.decode.SkipDecoding()})
    source = source.map(lambda ex: (ex[image_key], ex[label_key]))

    def decode(encoded, label):
        return _to_rgb(image_feature.decode_example(encoded)), tf.cast(label, tf.int64)

    shape = image_feature.shape
    image_size = tuple(shape[:2]) if None not in shape[:2] else None
    return ImageDataset(source, tuple(features[label_key].names),
                        builder.info.splits[split].num_examples, decode, image_size)


def _verify_image(path: str) -> tuple[int, int]:
    from PIL import Image

    try:
        with Image.open(path) as im:
            size = im.size
            im.verify()
    except Exception as e:  # PIL raises many types for bad files
        raise ValueError(f"cannot read image file {path!r}: {e}") from e
    return size[1], size[0]


def from_image_folder(root, extensions: Sequence[str] = IMAGE_EXTENSIONS, verify: bool = True) -> ImageDataset:
    """Images in `root/<class>/*.{jpg,jpeg,png,bmp,gif}`; class ids follow sorted folder names.

    Every file is checked with PIL at construction (`verify=True`) so a corrupt file fails
    here, named, rather than mid-training inside tf.data.
    """
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"image folder not found: {root!r}")
    class_names = sorted(d.name for d in os.scandir(root) if d.is_dir() and not d.name.startswith("."))
    if not class_names:
        raise ValueError(f"no class folders in {root!r} (expected root/<class>/<image>)")
    extensions = tuple(e.lower() for e in extensions)
    paths, labels = [], []
    for label, name in enumerate(class_names):
        folder = os.path.join(root, name)
        files = sorted(f.path for f in os.scandir(folder)
                       if f.is_file() and f.name.lower().endswith(extensions))
        if not files:
            raise ValueError(f"class folder {folder!r} contains no images ({', '.join(extensions)})")
        paths += files
        labels += [label] * len(files)
    image_size = None
    if verify:
        sizes = np.array([_verify_image(p) for p in paths])
        image_size = tuple(int(v) for v in np.median(sizes, axis=0))

    def decode(path, label):
        # expand_animations=False: GIFs give their first frame as a 3-D image.
        image = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
        image.set_shape([None, None, 3])
        return image, label

    source = tf.data.Dataset.from_tensor_slices((paths, np.array(labels, np.int64)))
    return ImageDataset(source, tuple(class_names), len(paths), decode, image_size)


def from_arrays(images, labels, class_names: Sequence[str] | None = None) -> ImageDataset:
    """In-memory images (N, H, W[, 1|3]) with integer labels (N,).

    uint8 images are kept as is; other dtypes are cast to float32 and assumed in [0, 255].
    Without `class_names`, classes are named "0" … str(max label).
    """
    images, labels = np.asarray(images), np.asarray(labels)
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"images must have shape (N, H, W), (N, H, W, 1) or (N, H, W, 3), got {images.shape}")
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be a 1-D integer array, got shape {labels.shape} dtype {labels.dtype}")
    if len(images) != len(labels):
        raise ValueError(f"images and labels differ in length: images {images.shape}, labels {labels.shape}")
    if len(labels) == 0:
        raise ValueError("from_arrays got no examples")
    if class_names is None:
        class_names = [str(i) for i in range(int(labels.max()) + 1)]
    if labels.min() < 0 or labels.max() >= len(class_names):
        raise ValueError(f"labels must be in [0, {len(class_names)}), got range "
                         f"[{labels.min()}, {labels.max()}]")
    if images.dtype != np.uint8:
        images = images.astype(np.float32)
    source = tf.data.Dataset.from_tensor_slices((images, labels.astype(np.int64)))
    return ImageDataset(source, tuple(str(c) for c in class_names), len(images),
                        lambda image, label: (_to_rgb(image), label), tuple(images.shape[1:3]))


# --- pipelines ---------------------------------------------------------------------------

def _sizes(plan_or_sizes) -> tuple[int, int]:
    if isinstance(plan_or_sizes, HyperRulePlan):
        return plan_or_sizes.resize_size, plan_or_sizes.crop_size
    if isinstance(plan_or_sizes, int):
        return plan_or_sizes, plan_or_sizes
    resize, crop = plan_or_sizes
    if crop > resize:
        raise ValueError(f"crop size {crop} exceeds resize size {resize}")
    return int(resize), int(crop)


def make_pipeline(image_dataset: ImageDataset, plan_or_sizes, batch_size: int | None = None,
                  training: bool = False, num_classes: int | None = None,
                  mixup_alpha: float | None = None, shuffle_buffer: int | None = None,
                  seed: int | None = None, one_hot: bool = False,
                  preprocess: Callable | None = None, repeat: bool | None = None,
                  antialias: bool = True, random_flip: bool = True) -> tf.data.Dataset:
    """Batched, prefetching (pixel_values float32 NHWC, labels) dataset.

    plan_or_sizes: a `HyperRulePlan` (also supplies the batch size and, for training, the
        MixUp α when those are None) or (resize_size, crop_size) or a single size.
    labels: int64 (B,) ids, or float32 (B, num_classes) when `one_hot` or MixUp is active.
    repeat: defaults to `training` — BiT trains for a number of steps, not epochs.
    preprocess: maps float [0, 255] images to model input; default `Normalize()` → [-1, 1].
    seed: makes shuffling, crops, flips and MixUp reproducible.
    antialias: resize with an antialiasing filter, like the PIL resize of the PyTorch
        reference; False gives plain bilinear like the upstream TF pipeline.
    random_flip: BiT's left-right flip; turn it off where mirroring changes the class
        (digits, text).
    """
    plan = plan_or_sizes if isinstance(plan_or_sizes, HyperRulePlan) else None
    resize, crop = _sizes(plan_or_sizes)
    if batch_size is None:
        if plan is None:
            raise ValueError("batch_size is required when no HyperRulePlan is given")
        batch_size = plan.batch_size
    if mixup_alpha is None:
        mixup_alpha = plan.mixup_alpha if plan is not None and training else 0.0
    if mixup_alpha and not training:
        raise ValueError(f"MixUp is for training only, got mixup_alpha={mixup_alpha} with training=False")
    num_classes = num_classes or image_dataset.num_classes
    repeat = training if repeat is None else repeat
    preprocess = preprocess or Normalize()

    ds = image_dataset.source
    if training:
        buffer = shuffle_buffer or min(image_dataset.num_examples, 10_000)
        ds = ds.shuffle(buffer, seed=seed, reshuffle_each_iteration=True)
    if repeat:
        ds = ds.repeat()
    if image_dataset.decode is not None:
        ds = ds.map(image_dataset.decode, num_parallel_calls=AUTOTUNE)

    def resize_to(image, size):
        return tf.image.resize(image, (size, size), antialias=antialias)

    if training:
        def augment(example, aug_seed):
            image, label = example
            crop_seed, flip_seed = tf.unstack(tf.random.split(aug_seed, 2))
            image = tf.image.stateless_random_crop(resize_to(image, resize), (crop, crop, 3), crop_seed)
            if random_flip:
                image = tf.image.stateless_random_flip_left_right(image, flip_seed)
            return preprocess(image), label

        # One stateless seed per example keeps augmentation reproducible under parallel map,
        # and rerandomize_each_iteration gives new crops/flips on every pass.
        seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(2)
        ds = tf.data.Dataset.zip(ds, seeds).map(augment, num_parallel_calls=AUTOTUNE)
    else:
        ds = ds.map(lambda image, label: (preprocess(resize_to(image, crop)), label),
                    num_parallel_calls=AUTOTUNE)

    ds = ds.batch(batch_size, drop_remainder=repeat)
    if mixup_alpha:
        ds = ds.map(MixUp(mixup_alpha, num_classes, seed=seed))
    elif one_hot:
        ds = ds.map(lambda x, y: (x, tf.one_hot(y, num_classes, dtype=tf.float32)),
                    num_parallel_calls=AUTOTUNE)
    return ds.prefetch(AUTOTUNE)
