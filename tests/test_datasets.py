"""Tests of mlres_jax.datasets: the IDX reader, Fashion-MNIST, the tfds sources, their messages."""

import gzip
import io
import os

import chex
import numpy as np
import pytest
import tensorflow_datasets as tfds
from array_record.python import array_record_module
from PIL import Image
from tensorflow_datasets.core import splits as splits_lib
from tensorflow_datasets.proto import tf_example_pb2

from mlres_jax import datasets

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
    out = datasets.read_idx(path)
    assert out.dtype == np.uint8
    assert out.shape == (2, 3, 4)
    np.testing.assert_array_equal(out, array)


def test_read_idx_one_dimensional(tmp_path):
    path = str(tmp_path / "labels.gz")
    _write_idx(path, np.array([9, 0, 3], np.uint8))
    np.testing.assert_array_equal(datasets.read_idx(path), [9, 0, 3])


def test_read_idx_bad_magic_names_file(tmp_path):
    path = str(tmp_path / "bad.idx")
    with open(path, "wb") as f:
        f.write(b"\x01\x02\x08\x01" + np.asarray([3], ">u4").tobytes() + b"abc")
    with pytest.raises(ValueError, match="bad.idx.*magic"):
        datasets.read_idx(path)


def test_read_idx_size_mismatch(tmp_path):
    path = str(tmp_path / "short.idx")
    # Header says 2x3 = 6 bytes, only 5 follow.
    data = bytes([0, 0, 8, 2]) + np.asarray([2, 3], ">u4").tobytes() + b"\0" * 5
    with open(path, "wb") as f:
        f.write(data)
    with pytest.raises(ValueError, match=r"short\.idx.*6 data bytes.*has 5"):
        datasets.read_idx(path)


# ---------------------------------------------------------------------------
# Fashion-MNIST.
# ---------------------------------------------------------------------------


def test_load_fashion_mnist_from_fake_idx(tmp_path):
    folder = str(tmp_path / "fm")
    train_x, train_y, test_x, test_y = _fake_fashion_mnist(folder)
    datasets.check_available("fashion_mnist", fashion_mnist_dir=folder)
    ds = datasets.load("fashion_mnist", fashion_mnist_dir=folder)
    assert ds.info is datasets.DATASETS["fashion_mnist"]
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
    np.testing.assert_array_equal(ds.train_labels, [0, 3, 6, 9, 2, 5, 8, 1, 4, 7, 0, 3])
    np.testing.assert_array_equal(ds.test_labels, [0, 7, 4, 1, 8])


def test_fashion_mnist_missing_dir(tmp_path):
    folder = str(tmp_path / "nowhere")
    for fn in (datasets.check_available, datasets.load):
        with pytest.raises(datasets.DataSetUnavailableError) as e:
            fn("fashion_mnist", fashion_mnist_dir=folder)
        message = str(e.value)
        assert "dataset-fashion-mnist" in message
        assert folder in message
        assert "fashion_mnist_dir" in message


def test_fashion_mnist_one_file_missing(tmp_path):
    folder = str(tmp_path / "fm")
    _fake_fashion_mnist(folder)
    os.remove(os.path.join(folder, "t10k-labels-idx1-ubyte.gz"))
    with pytest.raises(datasets.DataSetUnavailableError, match="missing t10k-labels-idx1-ubyte.gz"):
        datasets.check_available("fashion_mnist", fashion_mnist_dir=folder)


def test_fashion_mnist_label_out_of_range(tmp_path):
    folder = str(tmp_path / "fm")
    _fake_fashion_mnist(folder, bad_label=10)
    with pytest.raises(ValueError, match=r"'fashion_mnist' train.*\[0, 10\)"):
        datasets.load("fashion_mnist", fashion_mnist_dir=folder)


def _empty(path):
    open(path, "wb").close()


def _truncated_gzip(path):
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])


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
def test_damaged_fashion_mnist_files_are_data_set_errors(tmp_path, damage, name, in_header, words):
    folder = str(tmp_path / "fm")
    _fake_fashion_mnist(folder)
    damage(os.path.join(folder, name))
    functions = [datasets.check_available, datasets.load] if in_header else [datasets.load]
    for function in functions:
        with pytest.raises(datasets.DataSetDamagedError) as error:
            function("fashion_mnist", fashion_mnist_dir=folder)
        message = str(error.value)
        assert words in message and name in message
        assert "dataset-fashion-mnist" in message  # how to get the files again
    if not in_header:  # the header is fine: the cheap check counts the images
        assert datasets.check_available("fashion_mnist", fashion_mnist_dir=folder) == 12


# ---------------------------------------------------------------------------
# tfds data sets.
# ---------------------------------------------------------------------------


def test_unknown_name_lists_known_names():
    for fn in (datasets.check_available, datasets.load):
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
        info = datasets.DATASETS[name]
        assert (
            info.name,
            info.image_shape,
            info.num_classes,
            info.num_train,
            info.num_test,
            info.padding,
            info.test_split,
        ) == (name, shape, classes, train, test, pad, "test")


@pytest.mark.parametrize("name", ["cifar10", "stl10"])
def test_tfds_not_prepared(tmp_path, name):
    data_dir = str(tmp_path / "empty")
    os.makedirs(data_dir)
    for fn in (datasets.check_available, datasets.load):
        with pytest.raises(datasets.DataSetUnavailableError) as e:
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
    with pytest.raises(
        datasets.DataSetUnavailableError, match=f"(?s)tfds cannot open it.*tfds build {name}"
    ):
        datasets.check_available(name, data_dir=data_dir)


@pytest.mark.parametrize(
    "name,shape,num_classes",
    [
        ("cifar10", (32, 32, 3), 10),
        ("cifar100", (32, 32, 3), 100),
        ("stl10", (96, 96, 3), 10),
    ],
)
def test_tfds_mock_data(name, shape, num_classes):
    with tfds.testing.mock_data(num_examples=6):
        datasets.check_available(name)
        ds = datasets.load(name)
    for images, labels in ((ds.train_images, ds.train_labels), (ds.test_images, ds.test_labels)):
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
    builder = tfds.builder("cifar10", data_dir=data_dir, file_format="array_record")
    builder.data_path.mkdir(parents=True, exist_ok=True)
    split_infos = []
    for split, (n, k) in counts.items():
        name = f"cifar10-{split}.array_record-00000-of-00001"
        writer = array_record_module.ArrayRecordWriter(
            str(builder.data_path / name), "group_size:1"
        )
        for i in range(n):
            png = io.BytesIO()
            Image.fromarray(np.full((32, 32, 3), i * 10 + k, np.uint8)).save(png, format="PNG")
            example = tf_example_pb2.Example()
            feature = example.features.feature
            feature["image"].bytes_list.value.append(png.getvalue())
            feature["label"].int64_list.value.append(i % 10)
            feature["id"].bytes_list.value.append(f"{split}_{i}".encode())
            writer.write(example.SerializeToString())
        writer.close()
        split_infos.append(
            splits_lib.SplitInfo(
                name=split,
                shard_lengths=[n],
                num_bytes=0,
                filename_template=tfds.core.naming.ShardedFileTemplate(
                    data_dir=builder.data_path,
                    dataset_name="cifar10",
                    split=split,
                    filetype_suffix="array_record",
                ),
            )
        )
    builder.info.set_splits(splits_lib.SplitDict(split_infos))
    builder.info.write_to_directory(builder.data_path)


def test_tfds_real_array_record_files(tmp_path):
    """The real read path: ArrayRecord files written by tfds, PNG decoding."""
    data_dir = str(tmp_path / "tfds")
    _write_array_record_cifar10(data_dir, {"train": (12, 0), "test": (3, 5)})
    datasets.check_available("cifar10", data_dir=data_dir)
    ds = datasets.load("cifar10", data_dir=data_dir)
    chex.assert_shape(ds.train_images, (12, 32, 32, 3))
    chex.assert_shape(ds.test_images, (3, 32, 32, 3))
    np.testing.assert_array_equal(ds.train_images[:, 7, 9, 2], np.arange(12) * 10)
    np.testing.assert_array_equal(ds.test_images[:, 0, 0, 0], [5, 15, 25])
    np.testing.assert_array_equal(ds.train_labels, [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1])
    np.testing.assert_array_equal(ds.test_labels, [0, 1, 2])
    assert ds.train_labels.dtype == np.int32
