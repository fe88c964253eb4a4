"""Input standardisation fitted on the training set (docs/spec.md "Input normalisation")."""
from __future__ import annotations

import math
from typing import Any, Optional

import numpy as np
from numpy.typing import ArrayLike

from .errors import NotFittedError

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
