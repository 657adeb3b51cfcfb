"""The data sets: what they are, where they come from, and reading them whole.

The paper trains on CIFAR-10, CIFAR-100 and STL-10 (App. A); their sizes,
classes and crop padding are in `DATASETS`. Sources:

* ``cifar10``, ``cifar100``, ``stl10``: tensorflow-datasets ArrayRecord files
  read through ``tfds.data_source`` (random access, no TensorFlow needed).
  These cannot be downloaded on the project's machines; they have to be
  prepared elsewhere with ``tfds build`` (which does need TensorFlow). Tests
  use ``tfds.testing.mock_data``.
* ``fashion_mnist``: the gzip-compressed IDX files of the Debian package
  ``dataset-fashion-mnist``, read by `read_idx`. This is the real data set
  that is available offline (see the README); it is not part of the paper.

`check_available` checks cheaply that a data set is there (a run calls it
before anything expensive); `load` reads both splits whole into numpy arrays
(the largest, CIFAR train, is 50000 x 32 x 32 x 3 bytes = 153.6 MB). A
missing data set raises `DataSetUnavailableError`, a damaged one
`DataSetDamagedError`, each with a message that says what to do. Batching and
augmentation are `mlres_jax.input_pipeline`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import logging as python_logging
import os
import zlib
from collections.abc import Iterator
from typing import Any

import numpy as np
from absl import logging

from mlres_jax import errors


@dataclasses.dataclass(frozen=True)
class DataSetInfo:
    """Static description of a data set.

    Attributes:
        name: key in :data:`DATASETS` (and the tfds name of the tfds ones).
        image_shape: (H, W, C) of every image.
        num_classes: labels are in [0, num_classes).
        num_train: number of training examples of the real data set.
        num_test: number of test examples of the real data set.
        padding: zero-padding pixels on each side before the random crop
            (paper App. A: 4 for CIFAR, 12 for STL-10;
            Fashion-MNIST is not in the paper, 2 is this project's choice for
            its 28x28 images).
        test_split: tfds split name of the test set.
    """

    name: str
    image_shape: tuple[int, int, int]
    num_classes: int
    num_train: int
    num_test: int
    padding: int
    test_split: str = "test"


# Paper App. A (sizes, classes, padding); Fashion-MNIST counts from its README.
# Columns: name, image shape (H, W, C), classes, training and test examples.
DATASETS: dict[str, DataSetInfo] = {
    info.name: info
    for info in (
        DataSetInfo("cifar10", (32, 32, 3), 10, 50_000, 10_000, padding=4),
        DataSetInfo("cifar100", (32, 32, 3), 100, 50_000, 10_000, padding=4),
        DataSetInfo("stl10", (96, 96, 3), 10, 5_000, 8_000, padding=12),
        DataSetInfo("fashion_mnist", (28, 28, 1), 10, 60_000, 10_000, padding=2),
    )
}

_TFDS_DATASETS = ("cifar10", "cifar100", "stl10")
_TRAIN_SPLIT = "train"

DEFAULT_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"

# File names of the original Fashion-MNIST release (and of the Debian package).
_FASHION_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}


class DataSetError(errors.UserError):
    """A data set cannot be used; the message says why and what to do."""


class DataSetUnavailableError(DataSetError):
    """The data set's files are not on this machine.

    The message names the data set, where it looked, and how to make it
    available.
    """


class DataSetDamagedError(DataSetError, ValueError):
    """The data set's files are there but cannot be read as the data set.

    Empty, truncated or corrupt files, files of another format, labels out
    of range. The message names the file and how to get it again.
    """


@dataclasses.dataclass(frozen=True)
class DataSet:
    """A whole data set in memory.

    Attributes:
        info: static description.
        train_images: uint8[N, H, W, C].
        train_labels: int32[N].
        test_images: uint8[M, H, W, C].
        test_labels: int32[M].
    """

    info: DataSetInfo
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray


def _info(name: str) -> DataSetInfo:
    """Returns DATASETS[name]; ValueError listing the known names otherwise."""
    try:
        return DATASETS[name]
    except KeyError:
        raise ValueError(
            f"Unknown data set {name!r}; known data sets: {', '.join(sorted(DATASETS))}."
        ) from None


def _tfds_dir_description(data_dir: str | None) -> str:
    if data_dir is not None:
        return data_dir
    import tensorflow_datasets as tfds  # Lazy: slow to import.

    return (
        f"tfds's default data dir {tfds.core.constants.DATA_DIR} "
        "(~/tensorflow_datasets unless $TFDS_DATA_DIR is set)"
    )


def _tfds_unavailable(
    name: str, split: str, data_dir: str | None, cause: str
) -> DataSetUnavailableError:
    where = _tfds_dir_description(data_dir)
    dir_arg = data_dir if data_dir is not None else "DIR"
    return DataSetUnavailableError(
        f"Data set {name!r} (split {split!r}) is not prepared in {where}: "
        f"{cause}\n"
        "To make it available, on a machine with internet access and "
        "TensorFlow (pip install -e '.[prepare]'), run\n"
        f"  tfds build {name} --file_format=array_record "
        f"--data_dir={dir_arg}\n"
        f"copy that folder to {dir_arg} on this machine if needed, and pass "
        f"--config.data_dir={dir_arg}."
    )


@contextlib.contextmanager
def _without_tfds_warnings() -> Iterator[None]:
    """Drops tfds's warnings while a data set is opened.

    Probing a data set that is not prepared makes tfds warn that a "variant
    folder has no dataset_info.json" before it fails; the error raised then
    says what is missing and what to do, so the warning is only noise. tfds
    logs through absl, i.e. the Python logger "absl".
    """

    def keep(record: python_logging.LogRecord) -> bool:
        return (
            record.levelno >= python_logging.ERROR or "tensorflow_datasets" not in record.pathname
        )

    logger = python_logging.getLogger("absl")
    logger.addFilter(keep)
    try:
        yield
    finally:
        logger.removeFilter(keep)


def _tfds_source(name: str, split: str, data_dir: str | None) -> Any:
    """Opens a tfds ArrayRecord data source (lazy; no records are read).

    Raises:
        DataSetUnavailableError: tfds cannot open it or it has no records.
    """
    import tensorflow_datasets as tfds  # Lazy: slow to import.

    try:
        with _without_tfds_warnings():
            source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
        length = len(source)
    except Exception as e:
        # A missing folder gives e.g. NotImplementedError('Random access data
        # source for file format FileFormat.TFRECORD is not supported') or
        # KeyError('... `splits` is empty'); both only mean "not prepared".
        # tfds's wording is misleading there, so name the missing folder.
        root = tfds.core.constants.DATA_DIR if data_dir is None else data_dir
        folder = os.path.join(os.path.expanduser(root), name)
        if not os.path.isdir(folder):
            cause = f"there is no folder {folder}."
        else:
            cause = f"tfds cannot open it ({type(e).__name__}: {e})."
        raise _tfds_unavailable(name, split, data_dir, cause) from e
    if length == 0:
        raise _tfds_unavailable(name, split, data_dir, "the split has 0 records.")
    return source


def _read_tfds_split(
    info: DataSetInfo, split: str, data_dir: str | None
) -> tuple[np.ndarray, np.ndarray]:
    """Reads a whole tfds split into uint8[N, H, W, C] images, int32[N] labels.

    Raises:
        DataSetUnavailableError: the split is not prepared.
        ValueError: an image has the wrong shape.
    """
    source = _tfds_source(info.name, split, data_dir)
    n = len(source)
    images = np.empty((n, *info.image_shape), np.uint8)
    labels = np.empty((n,), np.int64)
    for i in range(n):
        record = source[i]
        image = np.asarray(record["image"])
        if image.shape != info.image_shape:
            raise ValueError(
                f"Data set {info.name!r} split {split!r} record {i}: "
                f"image shape {image.shape} != expected "
                f"{info.image_shape}."
            )
        images[i] = image
        labels[i] = int(record["label"])
    logging.info("Read %d records of %s/%s.", n, info.name, split)
    return images, labels.astype(np.int32)


def _parse_idx_header(raw: bytes, path: str) -> tuple[tuple[int, ...], int]:
    """The shape and the header length of IDX data ``raw`` (decompressed).

    Raises:
        ValueError: bad magic number, unsupported type or a truncated header.
    """
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(
            f"{path}: bad IDX magic number {raw[:4].hex()!r} (expected 0000 "
            "then type and rank bytes)."
        )
    type_code, ndim = raw[2], raw[3]
    if type_code != 0x08:
        raise ValueError(
            f"{path}: IDX data type 0x{type_code:02x} is not supported (only 0x08, unsigned byte)."
        )
    header_len = 4 + 4 * ndim
    if len(raw) < header_len:
        raise ValueError(f"{path}: IDX header truncated ({len(raw)} bytes).")
    shape = tuple(int(s) for s in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    return shape, header_len


@contextlib.contextmanager
def _open_idx(path: str) -> Iterator[Any]:
    """The IDX file as a binary stream, decompressed if it is gzip (by its magic bytes)."""
    with open(path, "rb") as f:
        gzipped = f.read(2) == b"\x1f\x8b"
    try:
        with gzip.open(path, "rb") if gzipped else open(path, "rb") as f:
            yield f
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise ValueError(f"{path}: corrupt gzip data: {e}") from e


def read_idx_shape(path: str) -> tuple[int, ...]:
    """The shape in an IDX file's header, reading only the header.

    Raises:
        ValueError: as `read_idx`, for the header.
        OSError: the file cannot be read.
    """
    with _open_idx(path) as f:
        start = f.read(4)
        rank = start[3] if len(start) == 4 else 0
        return _parse_idx_header(start + f.read(4 * rank), path)[0]


def read_idx(path: str) -> np.ndarray:
    """Reads an IDX file (the MNIST/Fashion-MNIST format), gzip or plain.

    Format (http://yann.lecun.com/exdb/mnist/): magic = 2 zero bytes, a type
    byte (0x08 = unsigned byte, the only type supported here) and the number of
    dimensions d; then d big-endian uint32 sizes; then the data, row-major.
    Gzip is detected by the file's first two bytes (1f 8b), not by its name.

    Args:
        path: file to read.

    Returns:
        uint8 array with the shape given in the header.

    Raises:
        ValueError: bad magic number, unsupported type, corrupt gzip data, or
            data size that does not match the header (the message names the
            file).
        OSError: the file cannot be read.
    """
    with _open_idx(path) as f:
        raw = f.read()
    shape, header_len = _parse_idx_header(raw, path)
    expected = int(np.prod(shape, dtype=np.int64))
    actual = len(raw) - header_len
    if actual != expected:
        raise ValueError(
            f"{path}: IDX header shape {shape} needs {expected} data bytes, file has {actual}."
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header_len).reshape(shape)


def _fashion_mnist_paths(fashion_mnist_dir: str) -> dict[str, str]:
    return {k: os.path.join(fashion_mnist_dir, v) for k, v in _FASHION_MNIST_FILES.items()}


def _check_fashion_mnist(fashion_mnist_dir: str) -> dict[str, str]:
    """Returns the four file paths; DataSetUnavailableError if one is missing.

    Raises:
        DataSetUnavailableError: a file is missing.
    """
    paths = _fashion_mnist_paths(fashion_mnist_dir)
    missing = [os.path.basename(p) for p in paths.values() if not os.path.isfile(p)]
    if missing:
        raise DataSetUnavailableError(
            f"Data set 'fashion_mnist' is not in {fashion_mnist_dir}: "
            f"missing {', '.join(missing)}.\n"
            "To make it available, on Debian/Ubuntu run\n"
            "  sudo apt-get install dataset-fashion-mnist\n"
            f"(installs to {DEFAULT_FASHION_MNIST_DIR}), or download the four "
            "files "
            + ", ".join(_FASHION_MNIST_FILES.values())
            + " from https://github.com/zalandoresearch/fashion-mnist into a "
            "folder DIR and pass --config.fashion_mnist_dir=DIR."
        )
    return paths


def _load_fashion_mnist(fashion_mnist_dir: str) -> DataSet:
    """Reads Fashion-MNIST from the IDX files in `fashion_mnist_dir`.

    tfds's own ``fashion_mnist`` builder finds the Debian package's files (as
    ``manual_dir``) but rejects them: Debian recompressed them, so the archive
    checksums differ from those tfds registers. Hence this reader.
    """
    paths = _check_fashion_mnist(fashion_mnist_dir)
    arrays = {k: read_idx(p) for k, p in paths.items()}
    out = {}
    for split in ("train", "test"):
        images = arrays[f"{split}_images"]
        labels = arrays[f"{split}_labels"]
        if images.ndim != 3 or labels.ndim != 1:
            raise ValueError(
                f"Data set 'fashion_mnist': {paths[split + '_images']} has "
                f"shape {images.shape} (want [N, 28, 28]) and "
                f"{paths[split + '_labels']} has shape {labels.shape} "
                "(want [N])."
            )
        if images.shape[0] != labels.shape[0]:
            raise ValueError(
                f"Data set 'fashion_mnist' {split}: {images.shape[0]} images "
                f"but {labels.shape[0]} labels."
            )
        out[f"{split}_images"] = images[..., np.newaxis]
        out[f"{split}_labels"] = labels.astype(np.int32)
    return DataSet(info=DATASETS["fashion_mnist"], **out)


def _validate(ds: DataSet) -> None:
    """Checks image shapes/dtypes and label ranges (not counts: any size is a data set).

    Raises:
        ValueError: naming the data set and what is wrong.
    """
    info = ds.info
    for split in ("train", "test"):
        images = getattr(ds, f"{split}_images")
        labels = getattr(ds, f"{split}_labels")
        if images.dtype != np.uint8 or images.shape[1:] != info.image_shape:
            raise ValueError(
                f"Data set {info.name!r} {split}: images are {images.dtype}"
                f"{list(images.shape)}, expected uint8[N, "
                f"{', '.join(map(str, info.image_shape))}]."
            )
        if labels.shape != (images.shape[0],):
            raise ValueError(
                f"Data set {info.name!r} {split}: labels shape {labels.shape} "
                f"does not match {images.shape[0]} images."
            )
        if labels.size and (labels.min() < 0 or labels.max() >= info.num_classes):
            raise ValueError(
                f"Data set {info.name!r} {split}: labels in [{labels.min()}, "
                f"{labels.max()}], expected [0, {info.num_classes})."
            )


def check_available(
    name: str, *, data_dir: str | None = None, fashion_mnist_dir: str = DEFAULT_FASHION_MNIST_DIR
) -> int:
    """Cheaply checks that `load(name, ...)` will find the data; counts it.

    Opens the data sources, or reads the IDX files' headers; reads no
    images. A run calls it before anything expensive, so that a missing or
    damaged data set, or a config that does not fit its size, costs seconds.

    Args:
        name: a key of :data:`DATASETS`.
        data_dir: tfds data dir for cifar10/cifar100/stl10 (None: tfds default).
        fashion_mnist_dir: folder with the Fashion-MNIST IDX files.

    Returns:
        The number of training examples found.

    Raises:
        ValueError: unknown name (the message lists the known ones).
        DataSetUnavailableError: the data is not there (the message says how
            to get it).
        DataSetDamagedError: a file's header cannot be read, or the counts of
            images and labels differ.
    """
    info = _info(name)
    if name == "fashion_mnist":
        paths = _check_fashion_mnist(fashion_mnist_dir)
        with _reported_as_damaged(name, fashion_mnist_dir):
            counts = {key: read_idx_shape(path)[0] for key, path in paths.items()}
            for split in ("train", "test"):
                if counts[f"{split}_images"] != counts[f"{split}_labels"]:
                    raise ValueError(
                        f"{paths[split + '_images']} holds {counts[split + '_images']} "
                        f"images but {paths[split + '_labels']} "
                        f"{counts[split + '_labels']} labels."
                    )
        return counts["train_images"]
    assert name in _TFDS_DATASETS, name
    train = _tfds_source(name, _TRAIN_SPLIT, data_dir)
    _tfds_source(name, info.test_split, data_dir)
    return len(train)


def _how_to_get_again(name: str, where: str) -> str:
    if name == "fashion_mnist":
        return (
            "Install the files again (sudo apt-get install --reinstall "
            "dataset-fashion-mnist), or download the four files "
            + ", ".join(_FASHION_MNIST_FILES.values())
            + " from "
            f"https://github.com/zalandoresearch/fashion-mnist into {where}."
        )
    return (
        f"Prepare it again: tfds build {name} --file_format=array_record "
        f"--data_dir={where} (on a machine with internet access)."
    )


@contextlib.contextmanager
def _reported_as_damaged(name: str, where: str) -> Iterator[None]:
    """Turns an error reading the data set's files into `DataSetDamagedError`.

    The one place where reading errors of every data set (corrupt gzip, a bad
    IDX header, a truncated file, a wrong shape, labels out of range, an
    unreadable file) become a one-line message that names the file and says
    how to get it again.
    """
    try:
        yield
    except DataSetError:
        raise
    except (ValueError, OSError, EOFError) as error:
        raise DataSetDamagedError(
            f"Data set {name!r} in {where} cannot be read: {error} "
            + _how_to_get_again(name, where)
        ) from error


def load(
    name: str, *, data_dir: str | None = None, fashion_mnist_dir: str = DEFAULT_FASHION_MNIST_DIR
) -> DataSet:
    """Loads the whole train and test split of a data set into memory.

    Args:
        name: a key of :data:`DATASETS`.
        data_dir: tfds data dir for cifar10/cifar100/stl10 (None: tfds default).
        fashion_mnist_dir: folder with the Fashion-MNIST IDX files.

    Returns:
        DataSet with images uint8[N, H, W, C] and labels int32[N].

    Raises:
        ValueError: unknown name.
        DataSetUnavailableError: the data is not there.
        DataSetDamagedError: a file cannot be read, or the data has a wrong
            image shape or labels outside [0, num_classes).
    """
    info = _info(name)
    where = fashion_mnist_dir if name == "fashion_mnist" else _tfds_dir_description(data_dir)
    with _reported_as_damaged(name, where):
        if name == "fashion_mnist":
            ds = _load_fashion_mnist(fashion_mnist_dir)
        else:
            ds = DataSet(
                info,
                *_read_tfds_split(info, _TRAIN_SPLIT, data_dir),
                *_read_tfds_split(info, info.test_split, data_dir),
            )
        _validate(ds)
    return ds
