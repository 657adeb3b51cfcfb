"""Tests of mlres_jax.input_pipeline (paper App. A: data and augmentation)."""

import gzip
import io
import itertools
import os

from array_record.python import array_record_module
import chex
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds
from tensorflow_datasets.core import splits as splits_lib
from tensorflow_datasets.proto import tf_example_pb2

from mlres_jax import input_pipeline as ip


# ---------------------------------------------------------------------------
# Helpers that write data in the real on-disk formats.
# ---------------------------------------------------------------------------


def _idx_bytes(array: np.ndarray) -> bytes:
    """IDX bytes of a uint8 array: 00 00 08 ndim, big-endian u32 dims, data."""
    header = bytes([0, 0, 0x08, array.ndim])
    dims = np.asarray(array.shape, dtype=">u4").tobytes()
    return header + dims + np.ascontiguousarray(array, np.uint8).tobytes()


def _write_idx(path, array, compress=True):
    data = _idx_bytes(array)
    with open(path, "wb") as f:
        f.write(gzip.compress(data) if compress else data)


def _fake_fashion_mnist(folder, num_train=12, num_test=5, bad_label=None):
    """Writes four IDX.gz files; image i has pixel (r, c) = (i + r + c) % 256.

    Labels are (i * 3) % 10 for train and (i * 7) % 10 for test.
    """
    def images(n, offset):
        i = np.arange(n)[:, None, None] + offset
        r = np.arange(28)[None, :, None]
        c = np.arange(28)[None, None, :]
        return ((i + r + c) % 256).astype(np.uint8)
    train_images = images(num_train, 0)
    test_images = images(num_test, 100)
    train_labels = (np.arange(num_train) * 3 % 10).astype(np.uint8)
    test_labels = (np.arange(num_test) * 7 % 10).astype(np.uint8)
    if bad_label is not None:
        train_labels[0] = bad_label
    os.makedirs(folder, exist_ok=True)
    _write_idx(os.path.join(folder, "train-images-idx3-ubyte.gz"), train_images)
    _write_idx(os.path.join(folder, "train-labels-idx1-ubyte.gz"), train_labels)
    _write_idx(os.path.join(folder, "t10k-images-idx3-ubyte.gz"), test_images)
    _write_idx(os.path.join(folder, "t10k-labels-idx1-ubyte.gz"), test_labels)
    return train_images, train_labels, test_images, test_labels


# ---------------------------------------------------------------------------
# read_idx.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("compress", [True, False])
def test_read_idx_round_trip(tmp_path, compress):
    array = (np.arange(2 * 3 * 4) * 7 % 256).astype(np.uint8).reshape(2, 3, 4)
    path = str(tmp_path / "a.idx")
    _write_idx(path, array, compress=compress)
    out = ip.read_idx(path)
    assert out.dtype == np.uint8
    assert out.shape == (2, 3, 4)
    np.testing.assert_array_equal(out, array)


def test_read_idx_one_dimensional(tmp_path):
    path = str(tmp_path / "labels.gz")
    _write_idx(path, np.array([9, 0, 3], np.uint8))
    np.testing.assert_array_equal(ip.read_idx(path), [9, 0, 3])


def test_read_idx_bad_magic_names_file(tmp_path):
    path = str(tmp_path / "bad.idx")
    with open(path, "wb") as f:
        f.write(b"\x01\x02\x08\x01" + np.asarray([3], ">u4").tobytes() + b"abc")
    with pytest.raises(ValueError, match="bad.idx.*magic"):
        ip.read_idx(path)


def test_read_idx_size_mismatch(tmp_path):
    path = str(tmp_path / "short.idx")
    # Header says 2x3 = 6 bytes, only 5 follow.
    data = bytes([0, 0, 8, 2]) + np.asarray([2, 3], ">u4").tobytes() + b"\0" * 5
    with open(path, "wb") as f:
        f.write(data)
    with pytest.raises(ValueError, match=r"short\.idx.*6 data bytes.*has 5"):
        ip.read_idx(path)


# ---------------------------------------------------------------------------
# Fashion-MNIST.
# ---------------------------------------------------------------------------


def test_load_fashion_mnist_from_fake_idx(tmp_path):
    folder = str(tmp_path / "fm")
    train_x, train_y, test_x, test_y = _fake_fashion_mnist(folder)
    ip.check_available("fashion_mnist", fashion_mnist_dir=folder)
    ds = ip.load("fashion_mnist", fashion_mnist_dir=folder)
    assert ds.info is ip.DATASETS["fashion_mnist"]
    chex.assert_shape(ds.train_images, (12, 28, 28, 1))
    chex.assert_shape(ds.test_images, (5, 28, 28, 1))
    assert ds.train_images.dtype == np.uint8
    assert ds.train_labels.dtype == np.int32
    assert ds.test_labels.dtype == np.int32
    np.testing.assert_array_equal(ds.train_images[..., 0], train_x)
    np.testing.assert_array_equal(ds.test_images[..., 0], test_x)
    # Hand values: train image 5 pixel (2, 3) = 5 + 2 + 3 = 10; test image 1
    # pixel (0, 0) = 100 + 1 = 101; labels 3i % 10 and 7i % 10.
    assert ds.train_images[5, 2, 3, 0] == 10
    assert ds.test_images[1, 0, 0, 0] == 101
    np.testing.assert_array_equal(ds.train_labels,
                                  [0, 3, 6, 9, 2, 5, 8, 1, 4, 7, 0, 3])
    np.testing.assert_array_equal(ds.test_labels, [0, 7, 4, 1, 8])


def test_fashion_mnist_missing_dir(tmp_path):
    folder = str(tmp_path / "nowhere")
    for fn in (ip.check_available, ip.load):
        with pytest.raises(ip.DataSetUnavailableError) as e:
            fn("fashion_mnist", fashion_mnist_dir=folder)
        message = str(e.value)
        assert "dataset-fashion-mnist" in message
        assert folder in message
        assert "fashion_mnist_dir" in message


def test_fashion_mnist_one_file_missing(tmp_path):
    folder = str(tmp_path / "fm")
    _fake_fashion_mnist(folder)
    os.remove(os.path.join(folder, "t10k-labels-idx1-ubyte.gz"))
    with pytest.raises(ip.DataSetUnavailableError,
                       match="missing t10k-labels-idx1-ubyte.gz"):
        ip.check_available("fashion_mnist", fashion_mnist_dir=folder)


def test_fashion_mnist_label_out_of_range(tmp_path):
    folder = str(tmp_path / "fm")
    _fake_fashion_mnist(folder, bad_label=10)
    with pytest.raises(ValueError, match=r"'fashion_mnist' train.*\[0, 10\)"):
        ip.load("fashion_mnist", fashion_mnist_dir=folder)


def _empty(path):
    open(path, "wb").close()


def _truncated_gzip(path):
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[:len(data) // 2])


def _not_idx(path):
    with open(path, "wb") as f:
        f.write(gzip.compress(b"<html>404 Not Found</html>"))


def _short_body(path):
    _write_idx(path, np.zeros((12, 28, 27), np.uint8)[..., :27])  # header fine below
    with gzip.open(path, "rb") as f:
        data = f.read()
    header = bytes([0, 0, 8, 3]) + np.asarray([12, 28, 28], ">u4").tobytes()
    with open(path, "wb") as f:
        f.write(gzip.compress(header + data[16:]))  # 12x28x27 bytes for 12x28x28


def _images_as_labels(path):
    _write_idx(path, np.zeros((12, 28, 28), np.uint8))  # same count, wrong rank


def _fewer_labels(path):
    _write_idx(path, np.zeros((11,), np.uint8))  # 12 images, 11 labels


# (damage, file, found by check_available from the headers, words of the message)
DAMAGED_FILES = [
    (_empty, "train-images-idx3-ubyte.gz", True, "bad IDX magic number"),
    (_truncated_gzip, "train-images-idx3-ubyte.gz", False, "corrupt gzip data"),
    (_not_idx, "t10k-images-idx3-ubyte.gz", True, "bad IDX magic number"),
    (_short_body, "train-images-idx3-ubyte.gz", False, "needs 9408 data bytes"),
    (_images_as_labels, "train-labels-idx1-ubyte.gz", False, "(want [N])"),
    (_fewer_labels, "train-labels-idx1-ubyte.gz", True, "12 images but"),
]


@pytest.mark.parametrize("damage,name,in_header,words", DAMAGED_FILES)
def test_damaged_fashion_mnist_files_are_data_set_errors(tmp_path, damage, name,
                                                         in_header, words):
    folder = str(tmp_path / "fm")
    _fake_fashion_mnist(folder)
    damage(os.path.join(folder, name))
    functions = [ip.check_available, ip.load] if in_header else [ip.load]
    for function in functions:
        with pytest.raises(ip.DataSetDamagedError) as error:
            function("fashion_mnist", fashion_mnist_dir=folder)
        message = str(error.value)
        assert words in message and name in message
        assert "dataset-fashion-mnist" in message  # how to get the files again
    if not in_header:  # the header is fine: the cheap check counts the images
        assert ip.check_available("fashion_mnist", fashion_mnist_dir=folder) == 12


# ---------------------------------------------------------------------------
# tfds data sets.
# ---------------------------------------------------------------------------


def test_unknown_name_lists_known_names():
    for fn in (ip.check_available, ip.load):
        with pytest.raises(ValueError) as e:
            fn("imagenet")
        for known in ("cifar10", "cifar100", "stl10", "fashion_mnist"):
            assert known in str(e.value)


def test_infos_match_spec_table():
    # Paper App. A: sizes, classes, padding.
    expected = {
        "cifar10": ((32, 32, 3), 10, 50_000, 10_000, 4),
        "cifar100": ((32, 32, 3), 100, 50_000, 10_000, 4),
        "stl10": ((96, 96, 3), 10, 5_000, 8_000, 12),
        "fashion_mnist": ((28, 28, 1), 10, 60_000, 10_000, 2),
    }
    for name, (shape, classes, train, test, pad) in expected.items():
        info = ip.DATASETS[name]
        assert (info.name, info.image_shape, info.num_classes, info.num_train,
                info.num_test, info.padding, info.test_split) == (
                    name, shape, classes, train, test, pad, "test")


@pytest.mark.parametrize("name", ["cifar10", "stl10"])
def test_tfds_not_prepared(tmp_path, name):
    data_dir = str(tmp_path / "empty")
    os.makedirs(data_dir)
    for fn in (ip.check_available, ip.load):
        with pytest.raises(ip.DataSetUnavailableError) as e:
            fn(name, data_dir=data_dir)
        message = str(e.value)
        assert repr(name) in message
        assert data_dir in message
        assert f"tfds build {name} --file_format=array_record" in message
        assert "config.data_dir" in message
        assert f"no folder {os.path.join(data_dir, name)}" in message
    # A folder that exists but holds no prepared data: still unavailable, with
    # tfds's own reason quoted.
    os.makedirs(os.path.join(data_dir, name))
    with pytest.raises(ip.DataSetUnavailableError,
                       match=f"(?s)tfds cannot open it.*tfds build {name}"):
        ip.check_available(name, data_dir=data_dir)


@pytest.mark.parametrize("name,shape,num_classes", [
    ("cifar10", (32, 32, 3), 10),
    ("cifar100", (32, 32, 3), 100),
    ("stl10", (96, 96, 3), 10),
])
def test_tfds_mock_data(name, shape, num_classes):
    with tfds.testing.mock_data(num_examples=6):
        ip.check_available(name)
        ds = ip.load(name)
    for images, labels in ((ds.train_images, ds.train_labels),
                           (ds.test_images, ds.test_labels)):
        chex.assert_shape(images, (6, *shape))
        assert images.dtype == np.uint8
        assert labels.dtype == np.int32
        chex.assert_shape(labels, (6,))
        assert labels.min() >= 0 and labels.max() < num_classes
    # Mock images are random; not all identical.
    assert len(np.unique(ds.train_images.reshape(6, -1), axis=0)) > 1


def _write_array_record_cifar10(data_dir, counts):
    """Writes a tiny cifar10 in tfds's real ArrayRecord on-disk layout.

    Train/test image i is constant (i * 10 + k) with k = 0 / 5, label i % 10.
    Uses tfds's own proto and metadata writers; no TensorFlow needed.
    """
    builder = tfds.builder("cifar10", data_dir=data_dir,
                           file_format="array_record")
    builder.data_path.mkdir(parents=True, exist_ok=True)
    split_infos = []
    for split, (n, k) in counts.items():
        name = f"cifar10-{split}.array_record-00000-of-00001"
        writer = array_record_module.ArrayRecordWriter(
            str(builder.data_path / name), "group_size:1")
        for i in range(n):
            png = io.BytesIO()
            Image.fromarray(np.full((32, 32, 3), i * 10 + k, np.uint8)).save(
                png, format="PNG")
            example = tf_example_pb2.Example()
            feature = example.features.feature
            feature["image"].bytes_list.value.append(png.getvalue())
            feature["label"].int64_list.value.append(i % 10)
            feature["id"].bytes_list.value.append(f"{split}_{i}".encode())
            writer.write(example.SerializeToString())
        writer.close()
        split_infos.append(splits_lib.SplitInfo(
            name=split, shard_lengths=[n], num_bytes=0,
            filename_template=tfds.core.naming.ShardedFileTemplate(
                data_dir=builder.data_path, dataset_name="cifar10", split=split,
                filetype_suffix="array_record")))
    builder.info.set_splits(splits_lib.SplitDict(split_infos))
    builder.info.write_to_directory(builder.data_path)


def test_tfds_real_array_record_files(tmp_path):
    """The non-mock read path: PNG decoding and batched __getitems__."""
    data_dir = str(tmp_path / "tfds")
    _write_array_record_cifar10(data_dir, {"train": (12, 0), "test": (3, 5)})
    ip.check_available("cifar10", data_dir=data_dir)
    ds = ip.load("cifar10", data_dir=data_dir)
    chex.assert_shape(ds.train_images, (12, 32, 32, 3))
    chex.assert_shape(ds.test_images, (3, 32, 32, 3))
    np.testing.assert_array_equal(ds.train_images[:, 7, 9, 2],
                                  np.arange(12) * 10)
    np.testing.assert_array_equal(ds.test_images[:, 0, 0, 0], [5, 15, 25])
    np.testing.assert_array_equal(ds.train_labels,
                                  [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1])
    np.testing.assert_array_equal(ds.test_labels, [0, 1, 2])
    assert ds.train_labels.dtype == np.int32


# ---------------------------------------------------------------------------
# Batching.
# ---------------------------------------------------------------------------


def test_train_batch_indices():
    idx = ip.train_batch_indices(103, 10, seed=7, epoch=0)
    chex.assert_shape(idx, (10, 10))  # 103 // 10 = 10 steps, 3 dropped.
    flat = idx.ravel()
    assert len(np.unique(flat)) == 100
    assert flat.min() >= 0 and flat.max() < 103
    np.testing.assert_array_equal(
        idx, ip.train_batch_indices(103, 10, seed=7, epoch=0))
    assert not np.array_equal(
        idx, ip.train_batch_indices(103, 10, seed=7, epoch=1))
    assert not np.array_equal(
        idx, ip.train_batch_indices(103, 10, seed=8, epoch=0))
    # Shuffled, not the identity order.
    assert not np.array_equal(flat, np.arange(100))
    # Exactly the documented generator.
    np.testing.assert_array_equal(
        flat, np.random.default_rng([7, 0]).permutation(103)[:100])


def test_train_batch_indices_exact_and_too_small():
    idx = ip.train_batch_indices(12, 4, seed=0, epoch=3)
    np.testing.assert_array_equal(np.sort(idx.ravel()), np.arange(12))
    chex.assert_shape(ip.train_batch_indices(3, 4, seed=0, epoch=0), (0, 4))
    with pytest.raises(ValueError):
        ip.train_batch_indices(10, 0, seed=0, epoch=0)


def test_eval_batches_pads_last_batch():
    images = (np.arange(7)[:, None, None, None] + 1
              + np.zeros((7, 2, 2, 1))).astype(np.uint8)  # image i is all i+1.
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
    all_labels = np.concatenate([l for _, l, _ in batches])
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
    return np.stack([
        rng.permutation(h * w * c).reshape(h, w, c).astype(np.uint8) + 1
        for _ in range(b)])


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
        crop = padded[dy:dy + h, dx:dx + w]
        crops[(dy, dx, False)] = crop
        crops[(dy, dx, True)] = crop[:, ::-1]
    return crops


def test_augment_output_is_a_crop_of_padded_image():
    padding = 2
    images = _distinct_images(3, 5, 6, 2, seed=1).astype(np.float32)
    out = np.asarray(
        jax.jit(ip.augment, static_argnums=2)(jax.random.key(3), images,
                                              padding))
    chex.assert_shape(out, images.shape)
    for image, o in zip(images, out):
        matches = [k for k, crop in _all_crops(image, padding).items()
                   if np.array_equal(crop, o)]
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
        ip.standardize(x), np.array([-1.0, 1.0]).reshape(1, 1, 2, 1), atol=1e-6)
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
    chex.assert_trees_all_close(
        ip.standardize(x), expected.reshape(1, 1, 2, 1), atol=1e-6)
    # Constant image -> zeros, finite.
    out = ip.standardize(np.full((2, 3, 3, 2), 7, np.uint8))
    chex.assert_trees_all_close(out, np.zeros((2, 3, 3, 2), np.float32))


def test_standardize_mean_zero_std_one_per_image():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (4, 8, 8, 3)).astype(np.uint8)
    images[1] //= 8  # different scale per image
    out = np.asarray(ip.standardize(images))
    chex.assert_shape(out, (4, 8, 8, 3))
    chex.assert_trees_all_close(out.mean(axis=(1, 2, 3)), np.zeros(4),
                                atol=1e-5)
    chex.assert_trees_all_close(out.std(axis=(1, 2, 3)), np.ones(4), atol=1e-5)


def test_preprocess_for_train_and_eval():
    images = _distinct_images(4, 6, 6, 3)
    key = jax.random.key(2)
    train = ip.preprocess_for_train(key, images, 2)
    chex.assert_trees_all_close(
        train, ip.standardize(ip.augment(key, images, 2)))
    chex.assert_type(train, jnp.float32)
    evaluated = ip.preprocess_for_eval(images)
    chex.assert_type(evaluated, jnp.float32)
    chex.assert_trees_all_close(evaluated,
                                ip.standardize(images.astype(np.float32)))
    chex.assert_trees_all_close(np.asarray(evaluated).mean(axis=(1, 2, 3)),
                                np.zeros(4), atol=1e-5)
