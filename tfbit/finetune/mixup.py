"""Batch-level MixUp as used by BiT: one λ ~ Beta(α, α) per batch, mixed with the batch reversed."""

from __future__ import annotations

import tensorflow as tf

from tfbit.errors import ConfigError, DataError


def _as_seed(seed):
    """Stateless seed of shape [2]; an int `s` becomes [s, 0]."""
    if isinstance(seed, int):
        return tf.constant([seed, 0], tf.int64)
    return tf.convert_to_tensor(seed)


def sample_mixup_lambda(alpha: float, seed=None, shape=()) -> tf.Tensor:
    """λ ~ Beta(α, α) from two Gamma(α) draws, float32.

    Sampling is done in float64: for α = 0.1 a float32 Gamma draw underflows to 0 often
    enough (~1e-4) to produce 0/0 over many batches.

    Args:
        alpha: the Beta distribution's α (> 0).
        seed: None draws from the stateful global RNG; an int or a shape-[2] tensor gives a
            stateless, deterministic draw.
        shape: shape of the returned λ values.
    """
    if seed is None:
        g1 = tf.random.gamma(shape, alpha, dtype=tf.float64)
        g2 = tf.random.gamma(shape, alpha, dtype=tf.float64)
    else:
        s1, s2 = tf.unstack(tf.random.split(_as_seed(seed), 2))
        g1 = tf.random.stateless_gamma(shape, s1, alpha, dtype=tf.float64)
        g2 = tf.random.stateless_gamma(shape, s2, alpha, dtype=tf.float64)
    total = g1 + g2
    lam = tf.where(total > 0, g1 / tf.where(total > 0, total, 1.0), 0.5)
    return tf.cast(lam, tf.float32)


def _soft_labels(labels, num_classes: int) -> tf.Tensor:
    labels = tf.convert_to_tensor(labels)
    if labels.shape.rank == 1:  # sparse class ids
        return tf.one_hot(tf.cast(labels, tf.int32), num_classes, dtype=tf.float32)
    if labels.shape.rank == 2:  # already one-hot / soft
        return tf.cast(labels, tf.float32)
    raise DataError(f"labels must be (batch,) ids or (batch, classes), got shape {labels.shape}")


def mixup(images, labels, alpha: float, num_classes: int, seed=None):
    """Mixes a batch with its reverse: x = λ·x + (1-λ)·x[::-1], same for one-hot labels.

    Args:
        images: a batch of images, any dtype.
        labels: (batch,) class ids or (batch, num_classes) one-hot / soft labels.
        alpha: MixUp's α, λ ~ Beta(α, α); 0 only casts the images and one-hot encodes the
            labels.
        num_classes: width of the one-hot labels.
        seed: see `sample_mixup_lambda`.

    Returns:
        float32 images and float32 soft labels of shape (batch, num_classes).
    """
    if alpha < 0:
        raise ConfigError(f"alpha must be >= 0, got {alpha}")
    images = tf.cast(images, tf.float32)  # mixing uint8 would truncate
    labels = _soft_labels(labels, num_classes)
    if alpha == 0:
        return images, labels
    lam = sample_mixup_lambda(alpha, seed)
    images = lam * images + (1.0 - lam) * tf.reverse(images, axis=[0])
    labels = lam * labels + (1.0 - lam) * tf.reverse(labels, axis=[0])
    return images, labels


class MixUp:
    """`mixup` as a callable for `batched_dataset.map(MixUp(alpha, num_classes, seed))`.

    A `tf.random.Generator` supplies a fresh stateless seed per batch, so a given `seed`
    reproduces the λ sequence while successive epochs still draw new values. Map it
    without `num_parallel_calls` if reproducibility matters (parallel calls reorder draws).
    The generator is shared by every iterator over the mapped dataset, prefetching included:
    an iterator opened after another continues wherever that one stopped drawing (Keras'
    `fit` opens its data twice under JAX). `make_pipeline` zips its batches with a seed
    stream instead, which each iterator starts afresh.

    Args:
        alpha: MixUp's α (see `mixup`).
        num_classes: width of the one-hot labels.
        seed: int seed of the λ sequence; None draws a non-deterministic one.
    """

    def __init__(self, alpha: float, num_classes: int, seed: int | None = None):
        if alpha < 0:
            raise ConfigError(f"alpha must be >= 0, got {alpha}")
        self.alpha = float(alpha)
        self.num_classes = int(num_classes)
        self.seed = seed
        self._rng = (
            tf.random.Generator.from_non_deterministic_state() if seed is None else tf.random.Generator.from_seed(seed)
        )

    def __call__(self, images, labels):
        seed = self._rng.make_seeds(1)[:, 0] if self.alpha > 0 else None
        return mixup(images, labels, self.alpha, self.num_classes, seed=seed)

    def __repr__(self):
        return f"MixUp(alpha={self.alpha}, num_classes={self.num_classes}, seed={self.seed})"
