"""Epoch permutations and mini-batches (docs/spec.md "Mini-batches")."""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Optional

import numpy as np
from numpy.typing import ArrayLike

from .split import _is_int, _paired

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
