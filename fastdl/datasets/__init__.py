"""Small data sets shipped with fastdl (no download needed)."""
from __future__ import annotations

import functools
import gzip
from importlib import resources

import numpy as np
from numpy.typing import DTypeLike

__all__ = ["load_digits"]

_DIGITS_FILE = "digits.csv.gz"
_DIGITS_SHAPE = (1797, 65)


@functools.lru_cache(maxsize=1)
def _digits_table() -> np.ndarray:
    # importlib.resources rather than __file__ so this also works from a
    # wheel or zip import.
    ref = resources.files(__name__).joinpath("data").joinpath(_DIGITS_FILE)
    with ref.open("rb") as raw, gzip.open(raw, "rt", encoding="ascii") as fh:
        table = np.loadtxt(fh, delimiter=",", dtype=np.int64, ndmin=2)
    if table.shape != _DIGITS_SHAPE:
        raise RuntimeError(
            f"packaged {_DIGITS_FILE} has shape {table.shape}, expected {_DIGITS_SHAPE}; "
            "the installation is corrupt"
        )
    table.setflags(write=False)  # cached: callers get copies
    return table


def load_digits(*, return_images: bool = False, dtype: DTypeLike = "float32") -> tuple[np.ndarray, np.ndarray]:
    """The 8x8 handwritten digits: 1,797 images of the digits 0-9.

    Each pixel is an integer count 0..16 (a 32x32 bitmap cut into 4x4 blocks
    and the "on" pixels counted). About 180 examples per class.

    Parameters
    ----------
    return_images : bool
        ``False``: X has shape (1797, 64), one flattened image per row.
        ``True``: X has shape (1797, 8, 8).
    dtype : dtype
        Dtype of X (default float32, fastdl's default; values stay 0..16, so
        scale or standardise them before training).

    Returns
    -------
    X : ndarray, shape (1797, 64) or (1797, 8, 8)
    y : ndarray of int64, shape (1797,)
        Digit labels 0..9.

    Notes
    -----
    Source: E. Alpaydin and C. Kaynak, "Optical Recognition of Handwritten
    Digits", UCI Machine Learning Repository (1998),
    https://doi.org/10.24432/C50P49 — the test-set copy (``optdigits.tes``)
    as distributed with scikit-learn as ``load_digits``. Licensed under
    CC BY 4.0 (https://creativecommons.org/licenses/by/4.0/).
    """
    table = _digits_table()
    X = table[:, :64].astype(dtype)
    if return_images:
        X = X.reshape(-1, 8, 8)
    y = table[:, 64].copy()
    return X, y
