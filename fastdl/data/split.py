"""Train / dev / test split (docs/spec.md "Train / dev / test split")."""
from __future__ import annotations

import math
from typing import Any, Optional, Union

import numpy as np
from numpy.typing import ArrayLike

# Thresholds of the default split rule (SPEC "Train / dev / test split").
_SMALL_FRACTION = 0.2  # dev and test share of small data (60/20/20)
_SMALL_FRACTION_NO_DEV = 0.3  # test share when there is no dev set (70/30)
_LARGE_COUNT = 10_000  # dev/test size on large data
_LARGE_FRACTION = 0.01  # ... but at least 1% beyond a million examples


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
