"""Data utilities: train/dev/test split, input standardisation, mini-batches
and loaders for NPZ, CSV and IDX (MNIST-style) files.

Layout follows docs/spec.md: examples are rows, ``X`` has shape ``(m, n_features)``
and ``y`` holds one label (or target row) per example.
"""
from __future__ import annotations

from .batches import epoch_permutation, iterate_minibatches
from .errors import DataFormatError, NotFittedError
from .files import load_csv, load_dataset, load_idx, load_npz, save_npz
from .split import split_sizes, train_dev_test_split
from .standardize import Standardizer

__all__ = [
    "DataFormatError",
    "NotFittedError",
    "split_sizes",
    "train_dev_test_split",
    "Standardizer",
    "epoch_permutation",
    "iterate_minibatches",
    "load_npz",
    "save_npz",
    "load_csv",
    "load_idx",
    "load_dataset",
]

