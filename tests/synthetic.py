"""A synthetic in-memory data set for tests that train without reading MNIST."""

from __future__ import annotations

import numpy as np

from mpff.data import Dataset


def synthetic_dataset(n_train: int = 120, n_test: int = 40, dim: int = 784, seed: int = 0) -> Dataset:
    """Normal random images and uniform labels, already normalised (mean 0, std 1)."""
    rng = np.random.default_rng(seed)
    return Dataset(
        name="synthetic",
        x_train=rng.standard_normal((n_train, dim)).astype(np.float32),
        y_train=rng.integers(0, 10, n_train).astype(np.int64),
        x_test=rng.standard_normal((n_test, dim)).astype(np.float32),
        y_test=rng.integers(0, 10, n_test).astype(np.int64),
        input_mean=np.zeros(dim, np.float32), input_std=np.ones(dim, np.float32),
    )
