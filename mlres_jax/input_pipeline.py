"""Batching and augmentation (paper App. A).

Host side (numpy): the shuffled training order of each epoch
(`train_batch_indices`) and padded evaluation batches (`eval_batches`).
Device side (pure JAX, inside the jitted steps): zero padding, a random crop
back to the original size and a random horizontal flip (`augment`), then
per-image standardisation (`standardize`); evaluation standardises only.
Where the data comes from is `mlres_jax.datasets`.
"""

from __future__ import annotations

from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np

# ---------------------------------------------------------------------------
# Batching (host side, numpy).
# ---------------------------------------------------------------------------


def train_batch_indices(num_examples: int, batch_size: int, seed: int, epoch: int) -> np.ndarray:
    """Shuffled example indices for one training epoch.

    A fresh permutation per epoch from
    ``np.random.default_rng([seed, epoch])``, so the order depends only on
    (seed, epoch) (resumable). The last ``num_examples % batch_size`` examples
    of the permutation are dropped so all batches have the same shape; with
    ``num_examples < batch_size`` the result has zero rows.

    Args:
        num_examples: size of the training set, >= 0.
        batch_size: examples per step, > 0.
        seed: non-negative seed.
        epoch: non-negative epoch number.

    Returns:
        int64[num_examples // batch_size, batch_size], each index at most once.

    Raises:
        ValueError: batch_size <= 0, num_examples < 0, or a negative seed/epoch.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}.")
    if num_examples < 0:
        raise ValueError(f"num_examples must be >= 0, got {num_examples}.")
    if seed < 0 or epoch < 0:
        raise ValueError(f"seed and epoch must be >= 0, got {seed}, {epoch}.")
    perm = np.random.default_rng([seed, epoch]).permutation(num_examples)
    steps = num_examples // batch_size
    return perm[: steps * batch_size].reshape(steps, batch_size)


def fitted_eval_batch_size(batch_size: int, num_examples: int, multiple: int = 1) -> int:
    """The evaluation batch for a set of ``num_examples``: no larger than the set needs.

    `eval_batches` pads the last batch to the full batch size, so a batch
    larger than the set only adds padding to evaluate (a batch of 100,000
    for a test split of 500 evaluates 200 times its images).

    Args:
      batch_size: the batch asked for (``config.eval_batch_size``), > 0.
      num_examples: the set's size, > 0.
      multiple: the batch must be a multiple of this (the devices of the
        mesh that splits it); ``batch_size`` is one.

    Returns:
      ``batch_size``, or, if smaller, ``num_examples`` rounded up to a
      multiple of ``multiple``: the set in one batch.
    """
    return min(batch_size, -(-num_examples // multiple) * multiple)


def eval_batches(
    images: np.ndarray, labels: np.ndarray, batch_size: int
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Batches a whole evaluation set in order, padding the last batch.

    Every example appears exactly once with mask True; the last batch is
    filled up to `batch_size` with zero images, label 0 and mask False, so all
    batches have one static shape (one compilation of the eval step).

    Args:
        images: uint8[N, H, W, C].
        labels: int[N].
        batch_size: examples per batch, > 0.

    Yields:
        (images uint8[B, H, W, C], labels int32[B], mask bool[B]).

    Raises:
        ValueError: batch_size <= 0 or len(images) != len(labels).
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}.")
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels.")
    n = len(images)
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        real = stop - start
        batch_images = np.zeros((batch_size, *images.shape[1:]), images.dtype)
        batch_labels = np.zeros((batch_size,), np.int32)
        mask = np.zeros((batch_size,), bool)
        batch_images[:real] = images[start:stop]
        batch_labels[:real] = labels[start:stop]
        mask[:real] = True
        yield batch_images, batch_labels, mask


# ---------------------------------------------------------------------------
# Augmentation and standardisation (device side, pure JAX).
# ---------------------------------------------------------------------------


def augment(rng: jax.Array, images: jax.Array, padding: int) -> jax.Array:
    """Random zero-pad-and-crop and horizontal flip (paper App. A).

    Each image is zero-padded by `padding` pixels on every side, cropped back
    to H x W at an offset drawn uniformly from {0..2*padding}^2 independently
    per example, and mirrored left-right with probability 1/2 per example.
    Done on the raw values (zero padding = black), before :func:`standardize`.
    Jit with `padding` static.

    Args:
        rng: PRNG key.
        images: uint8 or float [B, H, W, C].
        padding: static Python int >= 0; 0 means no crop (flip only).

    Returns:
        float32[B, H, W, C], not standardised.

    Raises:
        ValueError: negative padding or images not of rank 4.
    """
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}.")
    if images.ndim != 4:
        raise ValueError(f"images must be [B, H, W, C], got shape {images.shape}.")
    images = jnp.asarray(images).astype(jnp.float32)
    b, h, w, c = images.shape
    crop_rng, flip_rng = jax.random.split(rng)
    if padding > 0:
        padded = jnp.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
        offsets = jax.random.randint(crop_rng, (b, 2), 0, 2 * padding + 1)
        images = jax.vmap(
            lambda image, off: jax.lax.dynamic_slice(image, (off[0], off[1], 0), (h, w, c))
        )(padded, offsets)
    flip = jax.random.bernoulli(flip_rng, 0.5, (b,))
    return jnp.where(flip[:, None, None, None], images[:, :, ::-1, :], images)


def standardize(images: jax.Array) -> jax.Array:
    """Per-image standardisation as ``tf.image.per_image_standardization``.

    ``(x - mean) / max(std, 1 / sqrt(H * W * C))`` with mean and (population)
    std over all pixels and channels of each image. Paper App. A only says
    "standardisation"; this is TensorFlow's per-image op (the paper used
    TensorFlow). The floor keeps constant images finite (they map to zeros).

    Args:
        images: uint8 or float [..., H, W, C].

    Returns:
        float32[..., H, W, C].
    """
    x = jnp.asarray(images).astype(jnp.float32)
    axes = (-3, -2, -1)
    num_values = x.shape[-3] * x.shape[-2] * x.shape[-1]
    mean = jnp.mean(x, axis=axes, keepdims=True)
    std = jnp.sqrt(jnp.mean(jnp.square(x - mean), axis=axes, keepdims=True))
    return (x - mean) / jnp.maximum(std, 1.0 / np.sqrt(num_values))


def preprocess_for_train(rng: jax.Array, images: jax.Array, padding: int) -> jax.Array:
    """Pad, crop, flip, then standardise (paper App. A order).

    Args:
        rng: PRNG key.
        images: uint8 or float [B, H, W, C] with raw 0..255 values.
        padding: static Python int >= 0.

    Returns:
        float32[B, H, W, C].
    """
    return standardize(augment(rng, images, padding))


def preprocess_for_eval(images: jax.Array) -> jax.Array:
    """Standardise only (evaluation has no augmentation, paper App. A).

    Args:
        images: uint8 or float [B, H, W, C].

    Returns:
        float32[B, H, W, C].
    """
    return standardize(images)
