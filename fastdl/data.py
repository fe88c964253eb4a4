"""Data utilities: train/dev/test split, input standardisation, mini-batches
and loaders for NPZ, CSV and IDX (MNIST-style) files.

Layout follows docs/spec.md: examples are rows, ``X`` has shape ``(m, n_features)``
and ``y`` holds one label (or target row) per example.
"""
from __future__ import annotations

import gzip
import io
import math
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
from numpy.typing import ArrayLike, DTypeLike

from ._atomic import atomic_write

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

PathLike = Union[str, "os.PathLike[str]"]

# Thresholds of the default split rule (SPEC "Train / dev / test split").
_SMALL_FRACTION = 0.2  # dev and test share of small data (60/20/20)
_SMALL_FRACTION_NO_DEV = 0.3  # test share when there is no dev set (70/30)
_LARGE_COUNT = 10_000  # dev/test size on large data
_LARGE_FRACTION = 0.01  # ... but at least 1% beyond a million examples


class DataFormatError(ValueError):
    """A data file is malformed (bad magic number, truncated, non-numeric cell, ...)."""


class _MissingKeyError(DataFormatError, KeyError):
    # KeyError so ``except KeyError`` works; ValueError's str() so the message
    # is not shown wrapped in quotes.
    __str__ = ValueError.__str__


class NotFittedError(ValueError, AttributeError):
    """Raised when a transformer is used before ``fit`` (as in scikit-learn)."""


# --------------------------------------------------------------------------
# Train / dev / test split
# --------------------------------------------------------------------------

def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _is_float(v: Any) -> bool:
    return isinstance(v, (float, np.floating))


def _default_part(m: int, fraction: float) -> int:
    return int(round(min(fraction * m, max(_LARGE_COUNT, _LARGE_FRACTION * m))))


def _resolve_size(name: str, size: Any, m: int) -> int:
    """Turn a user-given fraction or count into a count (size is not None)."""
    if _is_float(size):
        if not math.isfinite(size) or size < 0 or size >= 1:
            raise ValueError(
                f"{name}={size!r}: a fractional size must be in (0, 1) "
                f"(or 0 for no {name.split('_')[0]} set); use an int for a count"
            )
        if size == 0:
            return 0
        # Nearest count, but never round a requested non-empty part down to 0.
        return max(1, math.floor(size * m + 0.5))
    if _is_int(size):
        if size < 0:
            raise ValueError(f"{name}={size}: must not be negative")
        if size > m:
            raise ValueError(f"{name}={size}: more than the {m} examples available")
        return int(size)
    raise TypeError(
        f"{name} must be None, a float in (0, 1) or an int count, got {type(size).__name__}"
    )


def split_sizes(
    m: int,
    *,
    dev_size: Optional[Union[float, int]] = None,
    test_size: Optional[Union[float, int]] = None,
) -> tuple[int, int, int]:
    """Number of train, dev and test examples for a data set of ``m`` examples.

    Parameters
    ----------
    m : int
        Number of examples.
    dev_size, test_size : float, int or None
        Fraction in (0, 1), absolute count, ``0`` for no such set, or ``None``
        for the default rule (see :func:`train_dev_test_split`).

    Returns
    -------
    (n_train, n_dev, n_test) : tuple of int
    """
    if not _is_int(m) or m < 0:
        raise ValueError(f"m must be a non-negative int, got {m!r}")
    m = int(m)
    if _is_float(dev_size) and _is_float(test_size) and dev_size + test_size >= 1:
        raise ValueError(
            f"dev_size + test_size = {dev_size} + {test_size} = {dev_size + test_size:g} "
            "must be < 1 (nothing would be left for training)"
        )
    n_dev = None if dev_size is None else _resolve_size("dev_size", dev_size, m)
    n_test = None if test_size is None else _resolve_size("test_size", test_size, m)

    defaulted = []
    if n_dev is None and n_test is None:
        n_dev = n_test = _default_part(m, _SMALL_FRACTION)
        defaulted = ["dev_size", "test_size"]
    elif n_dev is None:
        n_dev = _default_part(m, _SMALL_FRACTION_NO_DEV if n_test == 0 else _SMALL_FRACTION)
        defaulted = ["dev_size"]
    elif n_test is None:
        n_test = _default_part(m, _SMALL_FRACTION_NO_DEV if n_dev == 0 else _SMALL_FRACTION)
        defaulted = ["test_size"]

    n_train = m - n_dev - n_test
    if n_train < 1:
        hint = f" ({' and '.join(defaulted)} took the default)" if defaulted else ""
        raise ValueError(
            f"dev ({n_dev}) + test ({n_test}) examples leave no training examples "
            f"out of m={m}{hint}; pass smaller sizes or more data"
        )
    return n_train, n_dev, n_test


def _check_class_labels(y: np.ndarray) -> None:
    if y.ndim != 1:
        raise ValueError(f"stratify=True needs 1-D class labels, got y with shape {y.shape}")
    if y.dtype.kind == "f":
        if not np.all(np.isfinite(y)) or not np.all(y == np.round(y)):
            raise ValueError(
                "stratify=True needs class labels (integers); y holds non-integer floats"
            )
    elif y.dtype.kind not in "biuUS":
        raise ValueError(f"stratify=True needs integer class labels, got dtype {y.dtype}")


def _apportion(total: int, counts: np.ndarray, caps: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Split ``total`` among classes proportionally to ``counts`` (largest remainder).

    Every class gets floor or ceil of its quota unless ``caps`` binds; ties in
    the remainders are broken at random so no class is systematically favoured.
    """
    quota = total * counts / counts.sum()
    alloc = np.minimum(np.floor(quota).astype(np.int64), caps)
    left = total - int(alloc.sum())
    order = np.lexsort((rng.random(len(counts)), -(quota - alloc)))
    while left > 0:
        for k in order:
            if left == 0:
                break
            if alloc[k] < caps[k]:
                alloc[k] += 1
                left -= 1
    return alloc


def _paired(X: ArrayLike, y: Optional[ArrayLike]) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """``X`` and ``y`` as arrays with one example per row, the same number of each."""
    X = np.asarray(X)
    if X.ndim == 0:
        raise ValueError("X must have one example per row, got a scalar")
    m = X.shape[0]
    if y is not None:
        y = np.asarray(y)
        if y.ndim == 0 or y.shape[0] != m:
            raise ValueError(
                f"X and y have different numbers of examples: X has {m}, "
                f"y has {y.shape[0] if y.ndim else 'a scalar'}"
            )
    return X, y


def train_dev_test_split(
    X: ArrayLike,
    y: Optional[ArrayLike],
    *,
    dev_size: Optional[Union[float, int]] = None,
    test_size: Optional[Union[float, int]] = None,
    seed: int = 0,
    stratify: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, Any, Any, Any]:
    """Shuffle and split into train, dev and test sets (SPEC, notes 1.1).

    Default sizes, for ``m`` examples (the same rule for dev and test)::

        n_dev = n_test = round(min(0.2 * m, max(10_000, 0.01 * m)))

    i.e. 60/20/20 up to 50,000 examples (which covers "small data" of about
    1e4 or fewer), then 10,000 each (10% at 1e5, 1% at 1e6: 98/1/1), then 1%
    each beyond 1e6. The rule is continuous in ``m``. With ``dev_size=0`` (no
    dev set) the default test share is 0.3 instead of 0.2 (70/30 on small
    data), and symmetrically for ``test_size=0``.

    Parameters
    ----------
    X : array_like, shape (m, ...)
        Inputs, one example per row.
    y : array_like, shape (m, ...) or None
        Labels or targets; ``None`` gives ``None`` for every y part.
    dev_size, test_size : float, int or None
        Fraction in (0, 1), absolute count, ``0`` for no such set (an empty
        part is returned), or ``None`` for the default rule above.
    seed : int
        Seed of the shuffle; the split is a pure function of (data, sizes, seed).
    stratify : bool
        Keep the class proportions of ``y`` (1-D class labels) in every part:
        each part's class counts are within one of the ideal for dev and test.

    Returns
    -------
    X_train, X_dev, X_test, y_train, y_dev, y_test
    """
    X, y = _paired(X, y)
    m = X.shape[0]
    n_train, n_dev, n_test = split_sizes(m, dev_size=dev_size, test_size=test_size)
    rng = np.random.default_rng(seed)

    if stratify:
        if y is None:
            raise ValueError("stratify=True needs labels y")
        _check_class_labels(y)
        classes, inverse, counts = np.unique(y, return_inverse=True, return_counts=True)
        test_k = _apportion(n_test, counts, counts, rng)
        dev_k = _apportion(n_dev, counts, counts - test_k, rng)
        parts: list[list[np.ndarray]] = [[], [], []]
        for k in range(len(classes)):
            idx = rng.permutation(np.flatnonzero(inverse == k))
            a, b = test_k[k], test_k[k] + dev_k[k]
            parts[2].append(idx[:a])
            parts[1].append(idx[a:b])
            parts[0].append(idx[b:])
        # Shuffle within each part so examples are not grouped by class.
        train_idx, dev_idx, test_idx = (rng.permutation(np.concatenate(p)) for p in parts)
    else:
        perm = rng.permutation(m)
        test_idx = perm[:n_test]
        dev_idx = perm[n_test:n_test + n_dev]
        train_idx = perm[n_test + n_dev:]

    def take(a: Optional[np.ndarray], idx: np.ndarray) -> Any:
        return None if a is None else a[idx]

    return (take(X, train_idx), take(X, dev_idx), take(X, test_idx),
            take(y, train_idx), take(y, dev_idx), take(y, test_idx))


# --------------------------------------------------------------------------
# Input normalisation
# --------------------------------------------------------------------------

class Standardizer:
    """Zero-mean, unit-variance inputs, fitted on the training set only (notes 1.9).

    ``fit`` computes ``mean_ = mean(X, axis=0)`` and the biased
    ``var_ = mean((X - mean_)**2, axis=0)``; ``transform`` returns
    ``(X - mean_) / sqrt(var_ + eps)``. Features that are constant in the
    training set get ``var_ = 0`` and always map to 0 (never NaN or inf, even
    with ``eps=0`` or dev values that differ from the training constant).

    Statistics are kept in float64. ``transform`` returns float32 for float32
    input and float64 otherwise.

    Parameters
    ----------
    eps : float
        Added to the variance before the square root (default 1e-8).
    """

    def __init__(self, eps: float = 1e-8):
        if not (math.isfinite(eps) and eps >= 0):
            raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
        self.eps = float(eps)
        self.mean_: Optional[np.ndarray] = None
        self.var_: Optional[np.ndarray] = None
        self.n_samples_seen_: Optional[int] = None
        self._cache: dict[np.dtype, tuple[np.ndarray, np.ndarray]] = {}

    # -- helpers -----------------------------------------------------------
    @property
    def n_features_in_(self) -> int:
        self._check_fitted("n_features_in_")
        return int(self.mean_.size)

    def _check_fitted(self, method: str) -> None:
        if self.mean_ is None:
            raise NotFittedError(
                f"This Standardizer instance is not fitted yet. Call 'fit' with the "
                f"training data before using '{method}'."
            )

    def _check_shape(self, X: np.ndarray) -> None:
        if X.ndim < 2 or X.shape[1:] != self.mean_.shape:
            got = X.shape[1:] if X.ndim >= 2 else X.shape
            n_got = int(np.prod(got)) if X.ndim >= 2 else None
            fitted = (f"{self.mean_.size} features" if self.mean_.ndim == 1
                      else f"feature shape {self.mean_.shape} ({self.mean_.size} features)")
            if X.ndim < 2:
                raise ValueError(
                    f"Expected a 2-D array (m, n_features) with {self.mean_.size} features, "
                    f"got an array of shape {X.shape}; use X.reshape(1, -1) for one example"
                )
            what = f"{n_got} features" if X.ndim == 2 else f"feature shape {got}"
            raise ValueError(f"X has {what}, but this Standardizer was fitted with {fitted}")

    def _params(self, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
        # Cast once per dtype so float32 transforms stay float32 without
        # re-casting the statistics on every mini-batch.
        if dtype not in self._cache:
            std = np.sqrt(self.var_ + self.eps)
            with np.errstate(divide="ignore"):
                inv = np.where(self.var_ > 0, 1.0 / std, 0.0)
            self._cache[dtype] = (self.mean_.astype(dtype), inv.astype(dtype))
        return self._cache[dtype]

    @staticmethod
    def _out_dtype(X: np.ndarray) -> np.dtype:
        return X.dtype if X.dtype in (np.float32, np.float64) else np.dtype(np.float64)

    # -- API ---------------------------------------------------------------
    def fit(self, X: ArrayLike) -> "Standardizer":
        """Compute ``mean_`` and ``var_`` from training inputs ``X`` of shape (m, ...)."""
        X = np.asarray(X)
        if X.ndim < 2:
            raise ValueError(
                f"Expected a 2-D array (m, n_features), got shape {X.shape}; "
                "use X.reshape(-1, 1) for a single feature"
            )
        if X.shape[0] == 0:
            raise ValueError("Cannot fit a Standardizer on 0 examples")
        if X.dtype.kind not in "biuf":
            raise ValueError(f"X must be numeric, got dtype {X.dtype}")
        m, shape = X.shape[0], X.shape[1:]
        X2 = X.reshape(m, -1)
        # Accumulate in float64 without a float64 copy of all of X.
        mean = X2.mean(axis=0, dtype=np.float64)
        if not np.all(np.isfinite(mean)):
            raise ValueError("X contains NaN or infinity; clean the data before fitting")
        # Two-pass variance (subtract the mean first: no cancellation), in
        # row blocks so the temporaries stay small for large X.
        sq = np.zeros_like(mean)
        block = max(1, (1 << 20) // max(1, X2.shape[1]))
        for start in range(0, m, block):
            d = X2[start:start + block].astype(np.float64) - mean
            sq += np.einsum("ij,ij->j", d, d)
        var = sq / m
        # Decide constancy exactly (max == min), not through a rounded
        # variance, and make the stored statistics exact for those features.
        const = X2.max(axis=0) == X2.min(axis=0)
        mean = np.where(const, X2[0].astype(np.float64), mean)
        var = np.where(const | (var == 0), 0.0, var)
        self.mean_, self.var_ = mean.reshape(shape), var.reshape(shape)
        self.n_samples_seen_ = int(X.shape[0])
        self._cache = {}
        return self

    def transform(self, X: ArrayLike) -> np.ndarray:
        """Return ``(X - mean_) / sqrt(var_ + eps)``, constant features as 0."""
        self._check_fitted("transform")
        X = np.asarray(X)
        self._check_shape(X)
        mean, inv = self._params(self._out_dtype(X))
        out = X - mean
        out *= inv
        return out

    def fit_transform(self, X: ArrayLike) -> np.ndarray:
        """``fit(X)`` then ``transform(X)``."""
        return self.fit(X).transform(X)

    def inverse_transform(self, X: ArrayLike) -> np.ndarray:
        """Map standardised inputs back: ``X * sqrt(var_ + eps) + mean_``.

        Constant features come back as their training value.
        """
        self._check_fitted("inverse_transform")
        X = np.asarray(X)
        self._check_shape(X)
        dtype = self._out_dtype(X)
        std = np.where(self.var_ > 0, np.sqrt(self.var_ + self.eps), 0.0).astype(dtype)
        out = X * std
        out += self.mean_.astype(dtype)
        return out

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-serialisable state (lists of Python floats round-trip exactly)."""
        self._check_fitted("to_dict")
        return {
            "type": "Standardizer",
            "eps": self.eps,
            "feature_shape": list(self.mean_.shape),
            "mean": self.mean_.ravel().tolist(),
            "var": self.var_.ravel().tolist(),
            "n_samples_seen": self.n_samples_seen_,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Standardizer":
        """Rebuild a fitted Standardizer from :meth:`to_dict` output (lists or arrays)."""
        if d.get("type", "Standardizer") != "Standardizer":
            raise ValueError(f"not a Standardizer state: type={d.get('type')!r}")
        try:
            mean = np.asarray(d["mean"], dtype=np.float64).ravel()
            var = np.asarray(d["var"], dtype=np.float64).ravel()
        except KeyError as e:
            raise ValueError(f"Standardizer state is missing {e.args[0]!r}") from None
        shape = tuple(int(s) for s in d.get("feature_shape", [mean.size]))
        if mean.size != var.size or mean.size != int(np.prod(shape)):
            raise ValueError(
                f"inconsistent Standardizer state: {mean.size} means, {var.size} variances, "
                f"feature_shape {shape}"
            )
        if np.any(var < 0) or not np.all(np.isfinite(var)) or not np.all(np.isfinite(mean)):
            raise ValueError("inconsistent Standardizer state: non-finite mean or negative variance")
        obj = cls(eps=float(d.get("eps", 1e-8)))
        obj.mean_, obj.var_ = mean.reshape(shape), var.reshape(shape)
        n = d.get("n_samples_seen")
        obj.n_samples_seen_ = None if n is None else int(n)
        return obj

    def __repr__(self) -> str:
        state = "unfitted" if self.mean_ is None else f"n_features={self.mean_.size}"
        return f"Standardizer(eps={self.eps:g}, {state})"


# --------------------------------------------------------------------------
# Mini-batches
# --------------------------------------------------------------------------

def _check_seed(name: str, v: Any) -> int:
    if not _is_int(v) or v < 0:
        raise ValueError(f"{name} must be a non-negative int, got {v!r}")
    return int(v)


def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    """The shuffle of epoch ``epoch``: ``default_rng([seed, epoch]).permutation(n)``.

    A pure function of (n, seed, epoch), so training can resume at any epoch
    and reproduce the same batches.
    """
    if not _is_int(n) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    rng = np.random.default_rng([_check_seed("seed", seed), _check_seed("epoch", epoch)])
    return rng.permutation(int(n))


def iterate_minibatches(
    X: ArrayLike,
    y: Optional[ArrayLike],
    batch_size: int,
    *,
    shuffle: bool = True,
    seed: int = 0,
    epoch: int = 0,
) -> Iterator[tuple[np.ndarray, Any]]:
    """Yield ``(X_batch, y_batch)`` covering every example exactly once (notes 2.1).

    Parameters
    ----------
    X : array_like, shape (m, ...)
    y : array_like, shape (m, ...) or None
        ``None`` yields ``None`` as the label batch.
    batch_size : int
        ``>= 1``; ``m`` (or more) gives batch gradient descent, ``1`` SGD.
        The last batch holds the ``m % batch_size`` leftover examples.
    shuffle : bool
        Order examples by :func:`epoch_permutation` ``(m, seed, epoch)``;
        otherwise batches are views of consecutive rows.
    seed, epoch : int
        Non-negative; the same pair gives the same batches.
    """
    # Validate eagerly (this is not itself a generator) so mistakes surface at
    # the call, not at the first next().
    if not _is_int(batch_size) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    X, y = _paired(X, y)
    m = X.shape[0]
    perm = epoch_permutation(m, seed, epoch) if shuffle else None
    return _batches(X, y, int(batch_size), perm)


def _batches(X: np.ndarray, y: Optional[np.ndarray], bs: int,
             perm: Optional[np.ndarray]) -> Iterator[tuple[np.ndarray, Any]]:
    m = X.shape[0]
    for start in range(0, m, bs):
        if perm is None:
            sl: Any = slice(start, start + bs)
        else:
            sl = perm[start:start + bs]
        yield X[sl], (None if y is None else y[sl])


# --------------------------------------------------------------------------
# Loaders
# --------------------------------------------------------------------------

def load_npz(path: PathLike, x_key: str = "X", y_key: Optional[str] = "y") -> tuple[np.ndarray, Optional[np.ndarray]]:
    """Load ``(X, y)`` from an ``.npz`` archive (never unpickles).

    ``y_key=None`` loads only X and returns ``(X, None)``.
    """
    with open(path, "rb") as f:
        magic = f.read(4)
    # np.load reports any non-numpy file as "pickled data": say what it is.
    if magic[:2] != b"PK":
        kind = "a single .npy array" if magic[:4] == b"\x93NUM" else "not a zip archive"
        raise DataFormatError(f"{path}: not an .npz archive ({kind})")
    try:
        archive = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as e:
        raise DataFormatError(f"{path}: cannot read as .npz ({e})") from None
    with archive:
        keys = list(archive.files)
        for key in (x_key, y_key):
            if key is not None and key not in keys:
                raise _MissingKeyError(
                    f"{path}: no array named {key!r}; available keys: {keys}. "
                    "Pass x_key= / y_key= to choose others"
                )
        try:
            X = archive[x_key]
            y = None if y_key is None else archive[y_key]
        except ValueError as e:
            raise DataFormatError(f"{path}: cannot load without pickle ({e})") from None
    if y is not None and (y.ndim == 0 or X.ndim == 0 or y.shape[0] != X.shape[0]):
        raise DataFormatError(f"{path}: {x_key!r} has shape {X.shape} but {y_key!r} has shape {y.shape}")
    return X, y


def save_npz(path: PathLike, X: ArrayLike, y: Optional[ArrayLike] = None, *,
             compress: bool = False) -> Path:
    """Write ``X`` (and ``y``) to ``path`` atomically, readable by :func:`load_npz`.

    Data goes to a temporary file in the same directory which then replaces
    ``path`` (``os.replace``), so readers never see a half-written file. The
    file is written at exactly ``path`` (no ``.npz`` is appended).
    """
    path = Path(path)
    arrays = {"X": np.asarray(X)}
    if y is not None:
        arrays["y"] = np.asarray(y)
    for k, a in arrays.items():
        if a.dtype.hasobject:
            raise ValueError(f"{k} has dtype object, which cannot be saved without pickle")
    atomic_write(path, lambda f: (np.savez_compressed if compress else np.savez)(f, **arrays))
    return path


def _open_text(path: PathLike) -> io.TextIOBase:
    if str(path).endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, "r", encoding="utf-8")


def _parse_float(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True


def _split_line(line: str, delimiter: Optional[str]) -> list[str]:
    return [c.strip() for c in (line.split() if delimiter is None else line.split(delimiter))]


def _data_lines(fh: io.TextIOBase, comments: str) -> Iterator[tuple[int, str]]:
    """(1-based line number, content) of non-blank lines, comments stripped."""
    for lineno, line in enumerate(fh, 1):
        if comments and comments in line:
            line = line[: line.index(comments)]
        line = line.strip()
        if line:
            yield lineno, line


def _find_csv_error(path: PathLike, delimiter: Optional[str], skip: int, comments: str) -> Optional[str]:
    """Slow scan naming the first bad line, run only after the fast parser failed."""
    ncols = None
    with _open_text(path) as fh:
        for lineno, line in _data_lines(fh, comments):
            if lineno <= skip:
                continue
            cells = _split_line(line, delimiter)
            if ncols is None:
                ncols = len(cells)
            elif len(cells) != ncols:
                return f"line {lineno} has {len(cells)} columns, expected {ncols}: {line[:80]!r}"
            for col, cell in enumerate(cells):
                if not _parse_float(cell):
                    shown = "an empty cell" if cell == "" else f"non-numeric cell {cell!r}"
                    return f"line {lineno}, column {col + 1}: {shown}"
    return None


def load_csv(
    path: PathLike,
    label_column: Optional[int] = -1,
    delimiter: Optional[str] = ",",
    skip_header: Optional[bool] = None,
    *,
    dtype: DTypeLike = np.float64,
    comments: str = "#",
) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """Load a numeric CSV (optionally gzipped, ``.gz``) as ``(X, y)``.

    Parameters
    ----------
    path : path
    label_column : int or None
        Column holding the label (negative counts from the end); ``None``
        returns every column in X and ``y=None``.
    delimiter : str or None
        Cell separator; ``None`` splits on whitespace.
    skip_header : bool or None
        ``None`` auto-detects: the first data line is a header when any of
        its cells is not a number (so an all-numeric header such as
        ``0,1,2`` needs ``skip_header=True``).
    dtype : dtype
        Dtype of X (float64 by default).
    comments : str
        Text after this marker is ignored; blank lines are skipped.

    Returns
    -------
    X : ndarray, shape (m, n_columns - 1)
    y : ndarray, shape (m,) or None
        int64 when every label is an integer value, float64 otherwise.

    Raises
    ------
    DataFormatError
        Non-numeric or empty cells and ragged rows, naming the line.
    """
    skip = 0
    first = None
    with _open_text(path) as fh:
        for lineno, line in _data_lines(fh, comments):
            first = (lineno, line)
            break
    if first is None:
        raise DataFormatError(f"{path}: no data rows")
    cells = _split_line(first[1], delimiter)
    if skip_header is None:
        skip_header = not all(_parse_float(c) for c in cells)
    if skip_header:
        skip = first[0]  # loadtxt's skiprows counts comment and blank lines too

    try:
        with _open_text(path) as fh, warnings.catch_warnings():
            # "input contained no data" is reported below as a DataFormatError.
            warnings.simplefilter("ignore", UserWarning)
            data = np.loadtxt(fh, delimiter=delimiter, skiprows=skip, dtype=np.float64,
                              comments=comments or None, ndmin=2)
    except ValueError as e:
        where = _find_csv_error(path, delimiter, skip, comments)
        raise DataFormatError(f"{path}: {where or e}") from None
    if data.shape[0] == 0:
        raise DataFormatError(f"{path}: no data rows after the header")

    if label_column is None:
        return data.astype(dtype, copy=False), None
    ncols = data.shape[1]
    if not -ncols <= label_column < ncols:
        raise ValueError(f"label_column={label_column} is out of range for {ncols} columns")
    col = label_column % ncols
    y = data[:, col]
    X = np.delete(data, col, axis=1).astype(dtype, copy=False)
    if np.all(np.isfinite(y)) and np.all(y == np.round(y)):
        y = y.astype(np.int64)
    return X, y.copy()


# IDX type codes (http://yann.lecun.com/exdb/mnist/): big-endian element types.
_IDX_DTYPES = {
    0x08: np.dtype("u1"),
    0x09: np.dtype("i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_GZIP_MAGIC = b"\x1f\x8b"
_CHUNK = 1 << 20


def _read_idx(path: PathLike) -> np.ndarray:
    """Read one IDX file (plain or gzip), checking the size before allocating."""
    path = os.fspath(path)
    with open(path, "rb") as raw:
        gz = raw.read(2) == _GZIP_MAGIC
    # Sniff the gzip magic as well as the extension: MNIST mirrors often
    # serve gzipped files under the plain name.
    is_gz = gz or path.endswith(".gz")
    opener = gzip.open if is_gz else open
    with opener(path, "rb") as f:
        try:
            head = f.read(4)
        except (OSError, EOFError) as e:
            raise DataFormatError(f"{path}: cannot decompress ({e})") from None
        if len(head) < 4:
            raise DataFormatError(f"{path}: truncated IDX file ({len(head)} bytes, no header)")
        if head[0] != 0 or head[1] != 0 or head[2] not in _IDX_DTYPES:
            raise DataFormatError(
                f"{path}: not an IDX file (bad magic number 0x{head.hex()}; expected "
                "0x0000TTNN with type TT in 08,09,0b,0c,0d,0e and NN dimensions)"
            )
        dtype, ndim = _IDX_DTYPES[head[2]], head[3]
        if ndim == 0:
            raise DataFormatError(f"{path}: IDX header declares 0 dimensions")
        dims_raw = f.read(4 * ndim)
        if len(dims_raw) < 4 * ndim:
            raise DataFormatError(f"{path}: truncated IDX header ({ndim} dimensions declared)")
        dims = tuple(int(d) for d in np.frombuffer(dims_raw, dtype=">u4"))
        # Python ints: no overflow however absurd the declared dims are.
        expected = math.prod(dims) * dtype.itemsize
        header = 4 + 4 * ndim
        if not is_gz:
            actual = os.fstat(f.fileno()).st_size - header
            if actual != expected:
                raise DataFormatError(_idx_size_msg(path, dims, dtype, expected, actual))
            data = np.fromfile(f, dtype=dtype, count=math.prod(dims))
        else:
            # The decompressed size is unknown up front: read in chunks, stop
            # one byte past the declared size, so memory follows the real data
            # and never an absurd header.
            buf = bytearray()
            try:
                while len(buf) <= expected:
                    chunk = f.read(min(_CHUNK, expected + 1 - len(buf)))
                    if not chunk:
                        break
                    buf += chunk
            except (OSError, EOFError) as e:
                raise DataFormatError(f"{path}: corrupt or truncated gzip stream ({e})") from None
            if len(buf) != expected:
                actual = f"more than {expected}" if len(buf) > expected else len(buf)
                raise DataFormatError(_idx_size_msg(path, dims, dtype, expected, actual))
            data = np.frombuffer(buf, dtype=dtype)
    if data.size != math.prod(dims):  # defensive: fromfile may stop short
        raise DataFormatError(f"{path}: truncated IDX data")
    return data.reshape(dims).astype(dtype.newbyteorder("="), copy=False)


def _idx_size_msg(path: str, dims: tuple, dtype: np.dtype, expected: int, actual: Any) -> str:
    return (f"{path}: IDX header declares dims {dims} of {dtype.name} ({expected} data bytes) "
            f"but the file holds {actual} data bytes (truncated or corrupt)")


def load_idx(
    images_path: PathLike,
    labels_path: Optional[PathLike] = None,
    *,
    flatten: bool = True,
    dtype: Optional[DTypeLike] = None,
) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """Load MNIST-style IDX files (``.gz`` or plain) as ``(X, y)``.

    Parameters
    ----------
    images_path : path
        IDX file of examples, shape ``(m, d1, d2, ...)`` as declared in the header.
    labels_path : path or None
        IDX file of ``m`` labels; ``None`` returns ``y=None``.
    flatten : bool
        Return X as ``(m, d1*d2*...)`` rows (what a dense network eats);
        ``False`` keeps the image shape, e.g. ``(m, 28, 28)``.
    dtype : dtype or None
        Convert X to this dtype; ``None`` keeps the stored type (uint8 for
        MNIST, the smallest in memory: scale it yourself, e.g. ``X / 255``).

    Returns
    -------
    X : ndarray
    y : ndarray of int64 (integer labels) or None
    """
    X = _read_idx(images_path)
    if flatten and X.ndim > 2:
        X = X.reshape(X.shape[0], -1)
    if dtype is not None:
        X = X.astype(dtype, copy=False)
    y = None
    if labels_path is not None:
        y = _read_idx(labels_path)
        if y.shape[0] != X.shape[0]:
            raise DataFormatError(
                f"{labels_path}: {y.shape[0]} labels for {X.shape[0]} examples in {images_path}"
            )
        if y.ndim == 1 and y.dtype.kind in "iu":
            y = y.astype(np.int64)
    return X, y


def _is_idx_name(name: str) -> bool:
    base = name[:-3] if name.endswith(".gz") else name
    # train-images-idx3-ubyte, train-images.idx3-ubyte, foo.idx
    return base.endswith(".idx") or ("idx" in base and base.endswith("-ubyte"))


def _guess_idx_labels(path: Path) -> Optional[Path]:
    name = path.name
    if "images" not in name:
        return None
    cand = path.with_name(name.replace("images", "labels").replace("idx3", "idx1"))
    return cand if cand != path and cand.exists() else None


def load_dataset(path: PathLike, **kwargs: Any) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """Load ``(X, y)`` from a file, choosing the loader by its name.

    ``.npz`` -> :func:`load_npz`; ``.csv``, ``.csv.gz``, ``.txt``, ``.tsv``
    (tab-separated) and their ``.gz`` -> :func:`load_csv`; ``.idx``,
    ``*-idx3-ubyte`` and the like (also ``.gz``) -> :func:`load_idx`, where an
    images file picks up its labels file (``images`` -> ``labels``, ``idx3`` ->
    ``idx1``) from the same directory unless ``labels_path`` is given.
    Keyword arguments go to the loader.
    """
    p = Path(path)
    name = p.name.lower()
    if name.endswith(".npz"):
        return load_npz(p, **kwargs)
    for ext in (".csv", ".txt", ".tsv"):
        if name.endswith(ext) or name.endswith(ext + ".gz"):
            if ext == ".tsv":
                kwargs.setdefault("delimiter", "\t")
            return load_csv(p, **kwargs)
    if _is_idx_name(name):
        if "labels_path" not in kwargs:
            kwargs["labels_path"] = _guess_idx_labels(p)
        return load_idx(p, **kwargs)
    raise ValueError(
        f"{path}: unknown data file type; supported: .npz, .csv/.txt/.tsv (optionally .gz), "
        ".idx and *-idxN-ubyte (optionally .gz)"
    )
