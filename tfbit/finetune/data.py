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
import functools
import os
import re
from collections.abc import Callable, Sequence

import numpy as np
import tensorflow as tf

from tfbit.errors import ConfigError, DataError, ImageError, MissingFileError
from tfbit.finetune.hyperrule import HyperRulePlan
from tfbit.finetune.mixup import mixup
from tfbit.preprocessing import tf_decode
from tfbit.preprocessing.decode import IMAGE_EXTENSIONS

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


def _gray_to_rgb(image):
    """Single-channel images get three equal channels; RGB passes through."""
    return tf.image.grayscale_to_rgb(image) if image.shape[-1] == 1 else image


def _op_message(error: tf.errors.OpError) -> str:
    """TensorFlow's own reason, without the node, kernel and op names it wraps it in, and the
    serving decoder's check without its assertion wrapper (tfbit.preprocessing.tf_decode)."""
    found = re.search(r"assertion failed: \[tfbit: (?:image \d+ of the batch: )?([^\]]*)\]", error.message)
    if found:
        return found.group(1)
    return re.sub(r"\s*\[\[.*?\]\]|\{\{.*?\}\}|\[Op:.*", "", error.message, flags=re.S).strip()


@dataclasses.dataclass(frozen=True, eq=False)
class ImageDataset:
    """An unbatched labelled image source.

    Args:
        source: a `tf.data.Dataset` of tuples that `decode(*element)` turns into
            (uint8 (H, W, 3) image, int64 label); without `decode`, of those pairs already.
        class_names: the name of each label id.
        num_examples: the number of elements of `source`.
        decode: see `source`; runs after shuffling, so that only cheap elements are shuffled.
        image_size: the (h, w) of the images when known (median for image folders), handy
            for `hyperrule_plan(ds.num_examples, ds.image_size)`.
        paths: the file of each example, when they come from files; errors name them.
    """

    source: tf.data.Dataset
    class_names: tuple[str, ...]
    num_examples: int
    decode: Callable | None = None
    image_size: tuple[int, int] | None = None
    paths: tuple[str, ...] | None = None

    @property
    def dataset(self) -> tf.data.Dataset:
        """(uint8 (H, W, 3) image, int64 label) examples."""
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

    def _decode(self, *element):
        return self.decode(*element) if self.decode is not None else element

    def relabeled(self, class_names: Sequence[str]) -> ImageDataset:
        """The same examples, labelled by their class name's position in `class_names`.

        Evaluation data may hold a subset of the training classes, or list them in another
        order: `validation.relabeled(train.class_names)` gives its labels the training ids.

        Args:
            class_names: the target classes; each class of this dataset must be one of them
                (DataError naming those that are not).
        """
        class_names = tuple(class_names)
        ids = {name: i for i, name in enumerate(class_names)}
        unknown = [name for name in self.class_names if name not in ids]
        if unknown:
            raise DataError(f"classes {unknown} are not among the classes {list(class_names)}")
        new_ids = tf.constant([ids[name] for name in self.class_names], tf.int64)

        def decode(*element):
            image, label = self._decode(*element)
            return image, tf.gather(new_ids, label)

        return dataclasses.replace(self, class_names=class_names, decode=decode)

    def shard(self, num_shards: int, index: int) -> ImageDataset:
        """Every `num_shards`-th example from the `index`-th on: one worker's part of the data."""
        count = len(range(index, self.num_examples, num_shards))
        paths = None if self.paths is None else self.paths[index::num_shards]
        return dataclasses.replace(self, source=self.source.shard(num_shards, index), num_examples=count, paths=paths)

    def verify(self) -> np.ndarray:
        """Decodes every example once, as training does, and returns their (h, w) sizes.

        Decoding runs in parallel through tf.data. If an example does not decode (a truncated
        or corrupt file), raises ImageError naming it (its file when `paths` is known) with
        TensorFlow's reason, and how many others fail too.
        """

        def decoded_size(index, element):
            image, _ = self._decode(*element)
            return index, tf.shape(image)[:2]

        sizes = np.zeros((self.num_examples, 2), np.int64)
        decoded = np.zeros(self.num_examples, bool)
        pipeline = self.source.enumerate().map(decoded_size, num_parallel_calls=AUTOTUNE).ignore_errors().batch(4096)
        for indices, hw in pipeline.as_numpy_iterator():
            sizes[indices], decoded[indices] = hw, True
        failed = np.flatnonzero(~decoded)
        if failed.size:
            first = int(failed[0])
            try:  # again, eagerly, for TensorFlow's reason (tf.data only dropped it)
                self._decode(*next(iter(self.source.skip(first).take(1))))
                reason = "it failed to decode in the input pipeline"
            except tf.errors.OpError as e:
                reason = _op_message(e)
            others = [self._name(int(i)) for i in failed[1:6]]
            more = (
                (
                    f" ({failed.size - 1} more cannot be decoded: {', '.join(others)}"
                    f"{', ...' if failed.size > 6 else ''})"
                )
                if others
                else ""
            )
            raise ImageError(f"cannot decode {self._name(first)}: {reason}{more}")
        return sizes

    def _name(self, index: int) -> str:
        return f"image file {self.paths[index]!r}" if self.paths else f"example {index}"


# --- sources -----------------------------------------------------------------------------


def from_tfds(
    name_or_builder,
    split: str,
    data_dir: str | None = None,
    download: bool = False,
    image_key: str = "image",
    label_key: str = "label",
    shuffle_files: bool = False,
) -> ImageDataset:
    """A split of a tensorflow-datasets dataset.

    Args:
        name_or_builder: a dataset name ("name[/config][:version]"), a prepared-dataset
            directory (".../name/config/version"), or a builder (e.g. `tfds.ImageFolder`).
        split: a tfds split ("train", "test[:10%]", ...).
        data_dir: where tfds keeps prepared datasets (tfds' default when None).
        download: let tfds download and prepare the dataset. With False (the default, works
            offline) it must already be prepared in `data_dir`; otherwise MissingFileError.
        image_key: the image feature.
        label_key: the `ClassLabel` feature; its names become `class_names`.
        shuffle_files: shuffle the order of the dataset's files (`builder.as_dataset`).
    """
    import tensorflow_datasets as tfds  # heavy; only needed here

    builder = _prepared_builder(name_or_builder, data_dir, download)
    features = builder.info.features
    for key in (image_key, label_key):
        if key not in features:
            raise DataError(f"tfds dataset {builder.name!r} has no feature {key!r}: {list(features)}")
    image_feature = features[image_key]
    source = builder.as_dataset(
        split=split, shuffle_files=shuffle_files, decoders={image_key: tfds.decode.SkipDecoding()}
    )
    source = source.map(lambda ex: (ex[image_key], ex[label_key]))

    def decode(encoded, label):
        return _gray_to_rgb(image_feature.decode_example(encoded)), tf.cast(label, tf.int64)

    shape = image_feature.shape
    image_size = tuple(shape[:2]) if None not in shape[:2] else None
    return ImageDataset(
        source, tuple(features[label_key].names), builder.info.splits[split].num_examples, decode, image_size
    )


def _prepared_builder(name_or_builder, data_dir, download):
    """The tfds builder `from_tfds` names, prepared (downloaded only with `download`)."""
    import tensorflow_datasets as tfds

    builder = name_or_builder
    if isinstance(builder, (str, os.PathLike)):
        builder = os.fspath(builder)
        if os.path.isdir(builder):
            builder = tfds.builder_from_directory(builder)
        elif os.path.isabs(builder) or builder.startswith("."):  # a path, not "name[/config]"
            raise MissingFileError(f"tfds dataset directory not found: {builder!r}")
        else:
            try:
                builder = tfds.builder(builder, data_dir=data_dir)
            except tfds.core.DatasetNotFoundError:  # tfds' message lists its ~1300 datasets
                raise MissingFileError(
                    f"{builder!r} is neither an image folder nor a tensorflow-datasets name "
                    "(https://www.tensorflow.org/datasets/catalog/overview)"
                ) from None
    # ImageFolder reads files on the fly: it is never "prepared" and refuses to prepare.
    reads_files = isinstance(builder, tfds.ImageFolder)
    if download and not reads_files:
        builder.download_and_prepare()
    if not reads_files and not builder.is_prepared():
        raise MissingFileError(
            f"tfds dataset {builder.name!r} is not prepared in {builder.data_dir!r}; "
            "prepare it there or pass download=True"
        )
    return builder


@functools.cache
def _file_decoder():
    # The serving graph's decoder: training sees each photo as inference will (EXIF orientation,
    # 16-bit and palette handling, the first GIF frame), and refuses the same files. Traced once
    # per process and without AutoGraph: its graph is large (~2 s to trace, ~3 s more to convert),
    # and a run maps it into several pipelines (the checks, training, validation, the final score).
    return tf.function(
        lambda path: tf_decode.decode_image_bytes(tf.io.read_file(path)),
        input_signature=[tf.TensorSpec([], tf.string)],
        autograph=False,
    )


def _decode_file(path, label):
    return _file_decoder()(path), label


def _is_file(entry):
    """Whether a folder entry is a file; ImageError naming a symbolic link that leads nowhere (a
    loop, a missing target), as `ImageDataset.verify` names a file that cannot be decoded."""
    try:
        os.stat(entry.path)  # entry.is_file() is False for a link to a missing target
    except OSError as e:
        raise ImageError(f"cannot read image file {entry.path!r}: {e.strerror}") from None
    return entry.is_file()


def from_image_folder(root, extensions: Sequence[str] = IMAGE_EXTENSIONS, verify: bool = True) -> ImageDataset:
    """Images in `root/<class>/*.{jpg,jpeg,png,bmp,gif}`; class ids follow sorted folder names.

    Args:
        root: the folder holding one sub-folder per class.
        extensions: file name endings read as images (case-insensitive); other files are
            ignored.
        verify: decode every file now, with the TensorFlow decoder training uses (see
            `ImageDataset.verify`), so that a truncated or corrupt file fails here, named,
            rather than mid-training; also measures the median `image_size`. Costs one
            decoding pass over the data.
    """
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise MissingFileError(f"image folder not found: {root!r}")
    class_names = sorted(d.name for d in os.scandir(root) if d.is_dir() and not d.name.startswith("."))
    if not class_names:
        raise DataError(f"no class folders in {root!r} (expected root/<class>/<image>)")
    extensions = tuple(e.lower() for e in extensions)
    paths, labels = [], []
    for label, name in enumerate(class_names):
        folder = os.path.join(root, name)
        files = sorted(f.path for f in os.scandir(folder) if f.name.lower().endswith(extensions) and _is_file(f))
        if not files:
            raise DataError(f"class folder {folder!r} contains no images ({', '.join(extensions)})")
        paths += files
        labels += [label] * len(files)
    source = tf.data.Dataset.from_tensor_slices((paths, np.array(labels, np.int64)))
    dataset = ImageDataset(source, tuple(class_names), len(paths), _decode_file, paths=tuple(paths))
    if not verify:
        return dataset
    image_size = tuple(int(v) for v in np.median(dataset.verify(), axis=0))
    return dataclasses.replace(dataset, image_size=image_size)


def from_arrays(images, labels, class_names: Sequence[str] | None = None) -> ImageDataset:
    """In-memory images with integer labels.

    Args:
        images: (N, H, W), (N, H, W, 1) or (N, H, W, 3); uint8 is kept as is, other dtypes
            are cast to float32 and assumed in [0, 255].
        labels: (N,) integer class ids.
        class_names: the name of each id; default "0" ... str(max label).
    """
    images, labels = np.asarray(images), np.asarray(labels)
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise DataError(f"images must have shape (N, H, W), (N, H, W, 1) or (N, H, W, 3), got {images.shape}")
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"labels must be a 1-D integer array, got shape {labels.shape} dtype {labels.dtype}")
    if len(images) != len(labels):
        raise DataError(f"images and labels differ in length: images {images.shape}, labels {labels.shape}")
    if len(labels) == 0:
        raise DataError("from_arrays got no examples")
    if class_names is None:
        class_names = [str(i) for i in range(int(labels.max()) + 1)]
    if labels.min() < 0 or labels.max() >= len(class_names):
        raise DataError(f"labels must be in [0, {len(class_names)}), got range [{labels.min()}, {labels.max()}]")
    if images.dtype != np.uint8:
        images = images.astype(np.float32)
    source = tf.data.Dataset.from_tensor_slices((images, labels.astype(np.int64)))
    return ImageDataset(
        source,
        tuple(str(c) for c in class_names),
        len(images),
        lambda image, label: (_gray_to_rgb(image), label),
        tuple(images.shape[1:3]),
    )


# --- pipelines ---------------------------------------------------------------------------


def _sizes(plan_or_sizes) -> tuple[int, int]:
    if isinstance(plan_or_sizes, HyperRulePlan):
        return plan_or_sizes.resize_size, plan_or_sizes.crop_size
    if isinstance(plan_or_sizes, int):
        return plan_or_sizes, plan_or_sizes
    resize, crop = plan_or_sizes
    if crop > resize:
        raise ConfigError(f"crop size {crop} exceeds resize size {resize}")
    return int(resize), int(crop)


@dataclasses.dataclass(frozen=True)
class PipelineOptions:
    """How `make_pipeline` prepares examples, besides image sizes, batch size and labels.

    Args:
        preprocess: maps float [0, 255] images to model input; default `Normalize()` → [-1, 1].
        mixup_alpha: MixUp's α for training batches; None takes the plan's (none without a
            plan). Evaluation pipelines refuse MixUp.
        random_flip: BiT's random left-right flip of training images; turn it off where
            mirroring changes the class (digits, text).
        antialias: resize with an antialiasing filter, like the PIL resize of the PyTorch
            reference; False gives plain bilinear like the upstream TF pipeline.
        shuffle_buffer: size of the training shuffle buffer; default min(examples, 10 000).
        seed: makes shuffling, crops, flips and MixUp reproducible.
        evaluation_cache_bytes: an evaluation pipeline whose resized, preprocessed images
            (float32 crops) fit in this many bytes keeps them in memory after its first pass:
            Keras starts a new iterator for each validation pass, and the decoder's large graph
            takes 1-2 s to instantiate in each one, besides decoding every image again. 0: never.
    """

    preprocess: Callable = dataclasses.field(default_factory=Normalize)
    mixup_alpha: float | None = None
    random_flip: bool = True
    antialias: bool = True
    shuffle_buffer: int | None = None
    seed: int | None = None
    evaluation_cache_bytes: int = 512 * 2**20


def _batch_and_mixup(plan, batch_size, training, options):
    """The batch size (the plan's unless given) and MixUp α (the plan's for training unless
    `options` gives one) of a pipeline."""
    if batch_size is None:
        if plan is None:
            raise ConfigError("batch_size is required when no HyperRulePlan is given")
        batch_size = plan.batch_size
    mixup_alpha = options.mixup_alpha
    if mixup_alpha is None:
        mixup_alpha = plan.mixup_alpha if plan is not None and training else 0.0
    if mixup_alpha and not training:
        raise ConfigError(f"MixUp is for training only, got mixup_alpha={mixup_alpha} with training=False")
    return batch_size, mixup_alpha


def _resized(image, size, options):
    return tf.image.resize(image, (size, size), antialias=options.antialias)


def _per_iterator(make, repeat):
    """`make()`, a dataset whose randomness comes from seed generators of its own; with `repeat`
    (an endless training stream) built inside each iterator, so that every iterator yields the
    same stream.

    A dataset's seed generators are shared by its iterators: a reshuffling `shuffle().repeat()`
    advances at each epoch, `Dataset.random(rerandomize_each_iteration=True)` at each iterator.
    Keras' `fit` first reads a batch from an iterator of its own under JAX and under
    `tf.distribute` strategies, and how far that dropped iterator had prefetched would change
    what the next one sees. Without `repeat`, each pass draws anew (new order and crops per
    epoch of a finite pipeline)."""
    if not repeat:
        return make()
    stream = tf.autograph.experimental.do_not_convert(lambda _: make())
    forever = tf.data.experimental.assert_cardinality(tf.data.INFINITE_CARDINALITY)
    return tf.data.Dataset.range(1).flat_map(stream).apply(forever)


def _seeds(seed, repeat):
    """Stateless seeds, shape [2], one per element (see `_per_iterator`)."""
    return _per_iterator(lambda: tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(2), repeat)


def _shuffled(ds, buffer, seed, repeat):
    def shuffled():
        once = ds.shuffle(buffer, seed=seed, reshuffle_each_iteration=True)
        return once.repeat() if repeat else once

    return _per_iterator(shuffled, repeat)


def _augmented(ds, resize, crop, options, repeat):
    """Training examples: resized to `resize`, randomly cropped to `crop`, flipped, preprocessed."""

    def augment(example, aug_seed):
        image, label = example
        crop_seed, flip_seed = tf.unstack(tf.random.split(aug_seed, 2))
        image = tf.image.stateless_random_crop(_resized(image, resize, options), (crop, crop, 3), crop_seed)
        if options.random_flip:
            image = tf.image.stateless_random_flip_left_right(image, flip_seed)
        return options.preprocess(image), label

    # a stateless seed per example keeps augmentation reproducible under parallel map
    return tf.data.Dataset.zip(ds, _seeds(options.seed, repeat)).map(augment, num_parallel_calls=AUTOTUNE)


MIXUP_STREAM = 1  # folded into the seeds, so the λ of batch b is not drawn from example b's crop seed


def _mixed(batches, alpha, num_classes, seed, repeat):
    """MixUp on each batch, its λ drawn from a seed stream zipped with the batches: `MixUp`'s
    generator would be shared by all iterators (see `_per_iterator`)."""

    def mixed(batch, batch_seed):
        return mixup(
            *batch, alpha, num_classes, seed=tf.random.experimental.stateless_fold_in(batch_seed, MIXUP_STREAM)
        )

    return tf.data.Dataset.zip(batches, _seeds(seed, repeat)).map(mixed)


def make_pipeline(
    image_dataset: ImageDataset,
    plan_or_sizes,
    batch_size: int | None = None,
    training: bool = False,
    *,
    one_hot: bool = False,
    repeat: bool | None = None,
    options: PipelineOptions | None = None,
) -> tf.data.Dataset:
    """Batched, prefetching (pixel_values float32 NHWC, labels) dataset.

    Training shuffles, resizes to resize_size, randomly crops to crop_size, flips and applies
    MixUp; evaluation resizes straight to crop_size.

    Args:
        image_dataset: the examples; labels are its class ids.
        plan_or_sizes: a `HyperRulePlan` (which also supplies the batch size when
            `batch_size` is None, and the MixUp α of training pipelines), (resize_size,
            crop_size), or a single size for both.
        batch_size: examples per batch; required without a plan.
        training: augment and shuffle (see above) rather than only resize.
        one_hot: float32 (B, num_classes) labels instead of int64 (B,) ids; MixUp implies it.
        repeat: repeat the data forever, dropping incomplete batches; defaults to `training`,
            since BiT trains for a number of steps, not epochs.
        options: the rest, see `PipelineOptions`.
    """
    options = options or PipelineOptions()
    plan = plan_or_sizes if isinstance(plan_or_sizes, HyperRulePlan) else None
    resize, crop = _sizes(plan_or_sizes)
    batch_size, mixup_alpha = _batch_and_mixup(plan, batch_size, training, options)
    repeat = training if repeat is None else repeat

    ds = image_dataset.source
    if training:
        buffer = options.shuffle_buffer or min(image_dataset.num_examples, 10_000)
        ds = _shuffled(ds, buffer, options.seed, repeat)
    elif repeat:
        ds = ds.repeat()
    if image_dataset.decode is not None:
        ds = ds.map(image_dataset.decode, num_parallel_calls=AUTOTUNE)
    if training:
        ds = _augmented(ds, resize, crop, options, repeat)
    else:
        ds = ds.map(
            lambda image, label: (options.preprocess(_resized(image, crop, options)), label),
            num_parallel_calls=AUTOTUNE,
        )
        if not repeat and image_dataset.num_examples * crop * crop * 3 * 4 <= options.evaluation_cache_bytes:
            ds = ds.cache()

    num_classes = image_dataset.num_classes
    ds = ds.batch(batch_size, drop_remainder=repeat)
    if mixup_alpha:
        ds = _mixed(ds, mixup_alpha, num_classes, options.seed, repeat)
    elif one_hot:
        ds = ds.map(lambda x, y: (x, tf.one_hot(y, num_classes, dtype=tf.float32)), num_parallel_calls=AUTOTUNE)
    return ds.prefetch(AUTOTUNE)
