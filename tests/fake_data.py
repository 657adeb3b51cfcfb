"""Small Fashion-MNIST-format (IDX) data sets written by tests."""

import gzip
import os

import numpy as np


def _write_idx(path, array):
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(n).to_bytes(4, "big") for n in array.shape
    )
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


def write_fashion_mnist(folder, num_train=64, num_test=20, seed=0):
    """Writes the four IDX .gz files with learnable images: class k is a bright
    horizontal bar at rows 2k..2k+2 on a noisy background.

    Returns:
      ``folder``.
    """
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    for prefix, count in (("train", num_train), ("t10k", num_test)):
        labels = rng.integers(0, 10, size=count)
        images = rng.integers(0, 60, size=(count, 28, 28))
        for i, label in enumerate(labels):
            images[i, 2 * label + 4 : 2 * label + 7, :] = 250
        _write_idx(os.path.join(folder, f"{prefix}-images-idx3-ubyte.gz"), images)
        _write_idx(os.path.join(folder, f"{prefix}-labels-idx1-ubyte.gz"), labels)
    return folder
