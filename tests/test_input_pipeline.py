"""Tests of mlres_jax.input_pipeline: batching and augmentation (paper App. A)."""

import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mlres_jax import input_pipeline as ip

# ---------------------------------------------------------------------------
# Batching.
# ---------------------------------------------------------------------------


def test_train_batch_indices():
    idx = ip.train_batch_indices(103, 10, seed=7, epoch=0)
    chex.assert_shape(idx, (10, 10))  # 103 // 10 = 10 steps, 3 dropped.
    flat = idx.ravel()
    assert len(np.unique(flat)) == 100
    assert flat.min() >= 0 and flat.max() < 103
    np.testing.assert_array_equal(idx, ip.train_batch_indices(103, 10, seed=7, epoch=0))
    assert not np.array_equal(idx, ip.train_batch_indices(103, 10, seed=7, epoch=1))
    assert not np.array_equal(idx, ip.train_batch_indices(103, 10, seed=8, epoch=0))
    # Shuffled, not the identity order.
    assert not np.array_equal(flat, np.arange(100))
    # Exactly the documented generator.
    np.testing.assert_array_equal(flat, np.random.default_rng([7, 0]).permutation(103)[:100])


def test_train_batch_indices_exact_and_too_small():
    idx = ip.train_batch_indices(12, 4, seed=0, epoch=3)
    np.testing.assert_array_equal(np.sort(idx.ravel()), np.arange(12))
    chex.assert_shape(ip.train_batch_indices(3, 4, seed=0, epoch=0), (0, 4))
    with pytest.raises(ValueError):
        ip.train_batch_indices(10, 0, seed=0, epoch=0)


def test_eval_batches_pads_last_batch():
    images = (np.arange(7)[:, None, None, None] + 1 + np.zeros((7, 2, 2, 1))).astype(
        np.uint8
    )  # image i is all i+1.
    labels = np.arange(7) % 3
    batches = list(ip.eval_batches(images, labels, 3))
    assert len(batches) == 3  # ceil(7 / 3).
    for b_images, b_labels, mask in batches:
        chex.assert_shape(b_images, (3, 2, 2, 1))
        assert b_images.dtype == np.uint8
        assert b_labels.dtype == np.int32
        assert mask.dtype == np.bool_
    masks = np.concatenate([m for _, _, m in batches])
    np.testing.assert_array_equal(masks, [1, 1, 1, 1, 1, 1, 1, 0, 0])
    all_images = np.concatenate([b for b, _, _ in batches])
    all_labels = np.concatenate([labels for _, labels, _ in batches])
    np.testing.assert_array_equal(all_images[masks], images)
    np.testing.assert_array_equal(all_labels[masks], labels)
    # Padding rows are zeros.
    assert not all_images[~masks].any()


def test_eval_batches_exact_multiple():
    images = np.zeros((6, 1, 1, 1), np.uint8)
    batches = list(ip.eval_batches(images, np.zeros(6), 3))
    assert len(batches) == 2
    assert all(m.all() for _, _, m in batches)


# ---------------------------------------------------------------------------
# Augmentation and standardisation.
# ---------------------------------------------------------------------------


def _distinct_images(b, h, w, c, seed=0):
    """uint8 images whose pixels are all distinct within each image."""
    rng = np.random.default_rng(seed)
    return np.stack(
        [rng.permutation(h * w * c).reshape(h, w, c).astype(np.uint8) + 1 for _ in range(b)]
    )


def test_augment_padding_zero_is_identity_or_mirror():
    images = _distinct_images(64, 3, 4, 2)
    out = np.asarray(ip.augment(jax.random.key(0), images, 0))
    chex.assert_shape(out, (64, 3, 4, 2))
    chex.assert_type(out, jnp.float32)
    flipped = []
    for image, o in zip(images.astype(np.float32), out):
        same = np.array_equal(o, image)
        mirror = np.array_equal(o, image[:, ::-1, :])
        assert same != mirror  # exactly one (images are not symmetric)
        flipped.append(mirror)
    # Flip probability 1/2: both outcomes occur in 64 draws.
    assert 0 < sum(flipped) < 64


def _all_crops(image, padding):
    """All (2p+1)^2 crops of the zero-padded image, with and without flip."""
    h, w, _ = image.shape
    padded = np.pad(image, ((padding, padding), (padding, padding), (0, 0)))
    crops = {}
    for dy, dx in itertools.product(range(2 * padding + 1), repeat=2):
        crop = padded[dy : dy + h, dx : dx + w]
        crops[(dy, dx, False)] = crop
        crops[(dy, dx, True)] = crop[:, ::-1]
    return crops


def test_augment_output_is_a_crop_of_padded_image():
    padding = 2
    images = _distinct_images(3, 5, 6, 2, seed=1).astype(np.float32)
    out = np.asarray(jax.jit(ip.augment, static_argnums=2)(jax.random.key(3), images, padding))
    chex.assert_shape(out, images.shape)
    for image, o in zip(images, out):
        matches = [k for k, crop in _all_crops(image, padding).items() if np.array_equal(crop, o)]
        # Distinct nonzero pixels: exactly one (offset, flip) reproduces it.
        assert len(matches) == 1, matches


def test_augment_offsets_and_flips_cover_all_cases():
    # 3x3 images, padding 1: 9 offsets x 2 flips = 18 cases, each of
    # probability 1/18; 720 examples make a missed case vanishingly unlikely
    # (18 * (17/18)^720 < 1e-16).
    padding = 1
    image = _distinct_images(1, 3, 3, 1)[0]
    images = np.repeat(image[None], 720, axis=0)
    out = np.asarray(ip.augment(jax.random.key(5), images, padding))
    crops = _all_crops(image.astype(np.float32), padding)
    seen = {}
    for o in out:
        (key,) = [k for k, crop in crops.items() if np.array_equal(crop, o)]
        seen[key] = seen.get(key, 0) + 1
    assert len(seen) == 18
    # Each case ~ 720/18 = 40 times; binomial std ~ 6.2.
    assert min(seen.values()) > 10 and max(seen.values()) < 80


def test_augment_zero_padding_is_black():
    # All-255 image 4x4, padding 4, offset must bring in zeros unless (4, 4).
    images = np.full((32, 4, 4, 1), 255, np.uint8)
    out = np.asarray(ip.augment(jax.random.key(1), images, 4))
    assert set(np.unique(out)) <= {0.0, 255.0}
    assert (out == 0).any()


def test_augment_rng_dependence():
    images = _distinct_images(8, 8, 8, 3)
    a = ip.augment(jax.random.key(0), images, 4)
    a2 = ip.augment(jax.random.key(0), images, 4)
    b = ip.augment(jax.random.key(1), images, 4)
    chex.assert_trees_all_close(a, a2)
    assert not np.array_equal(np.asarray(a), np.asarray(b))


def test_standardize_hand_values():
    # [1, 3]: mean 2, std 1 -> [-1, 1].
    x = np.array([1.0, 3.0]).reshape(1, 1, 2, 1)
    chex.assert_trees_all_close(
        ip.standardize(x), np.array([-1.0, 1.0]).reshape(1, 1, 2, 1), atol=1e-6
    )
    # [0, 0, 0, 4]: mean 1, var (1+1+1+9)/4 = 3 -> (x - 1) / sqrt(3).
    x = np.array([0, 0, 0, 4], np.uint8).reshape(1, 2, 2, 1)
    expected = (np.array([0, 0, 0, 4.0]) - 1) / np.sqrt(3)
    out = ip.standardize(x)
    chex.assert_type(out, jnp.float32)
    chex.assert_trees_all_close(out, expected.reshape(1, 2, 2, 1), atol=1e-6)


def test_standardize_floor():
    # [0, 0.1]: std 0.05 < 1/sqrt(2) floor -> (x - 0.05) * sqrt(2) = -+0.0707.
    x = np.array([0.0, 0.1]).reshape(1, 1, 2, 1)
    expected = np.array([-0.05, 0.05]) * np.sqrt(2)
    chex.assert_trees_all_close(ip.standardize(x), expected.reshape(1, 1, 2, 1), atol=1e-6)
    # Constant image -> zeros, finite.
    out = ip.standardize(np.full((2, 3, 3, 2), 7, np.uint8))
    chex.assert_trees_all_close(out, np.zeros((2, 3, 3, 2), np.float32))


def test_standardize_mean_zero_std_one_per_image():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (4, 8, 8, 3)).astype(np.uint8)
    images[1] //= 8  # different scale per image
    out = np.asarray(ip.standardize(images))
    chex.assert_shape(out, (4, 8, 8, 3))
    chex.assert_trees_all_close(out.mean(axis=(1, 2, 3)), np.zeros(4), atol=1e-5)
    chex.assert_trees_all_close(out.std(axis=(1, 2, 3)), np.ones(4), atol=1e-5)


def test_preprocess_for_train_and_eval():
    images = _distinct_images(4, 6, 6, 3)
    key = jax.random.key(2)
    train = ip.preprocess_for_train(key, images, 2)
    chex.assert_trees_all_close(train, ip.standardize(ip.augment(key, images, 2)))
    chex.assert_type(train, jnp.float32)
    evaluated = ip.preprocess_for_eval(images)
    chex.assert_type(evaluated, jnp.float32)
    chex.assert_trees_all_close(evaluated, ip.standardize(images.astype(np.float32)))
    chex.assert_trees_all_close(np.asarray(evaluated).mean(axis=(1, 2, 3)), np.zeros(4), atol=1e-5)
