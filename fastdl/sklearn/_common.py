"""What every part of :mod:`fastdl.sklearn` shares: the scikit-learn import, constants and small helpers."""
from __future__ import annotations

import numbers

import numpy as np

try:
    import scipy.sparse as sp
    from sklearn.utils.validation import validate_data  # noqa: F401  (scikit-learn >= 1.6 has it)
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("fastdl.sklearn needs scikit-learn >= 1.6: pip install 'fastdl[sklearn]'") from exc

from ..layers import Identity, ReLU, Sigmoid, Tanh

ACTIVATIONS = {"identity": Identity, "logistic": Sigmoid, "tanh": Tanh, "relu": ReLU}
SOLVERS = ("lbfgs", "sgd", "adam", "rmsprop")
LOSSES = {"squared_error": "mse", "poisson": "poisson"}   # MLPRegressor's loss -> fastdl's loss
LEARNING_RATES = ("constant", "invscaling", "adaptive")
NONFINITE_MSG = ("Solver produced non-finite parameter weights. The input data may contain large values and "
                 "need to be preprocessed.")
PREDICT_CHUNK = 4096  # rows densified / evaluated at a time (bounds memory on sparse and large inputs)


def _rows(X, idx, dtype) -> np.ndarray:
    """Rows ``idx`` (index array or slice) of dense or sparse ``X`` as a C-contiguous ``dtype`` array.

    Sparse input is densified here, one mini-batch at a time.
    """
    if sp.issparse(X):
        return np.ascontiguousarray(X[idx].toarray(), dtype=dtype)
    if isinstance(idx, slice):
        return np.ascontiguousarray(X[idx], dtype=dtype)
    return X.take(idx, axis=0)


def _check_sample_weight(sample_weight, n: int, dtype=np.float64) -> np.ndarray | None:
    if sample_weight is None:
        return None
    if isinstance(sample_weight, numbers.Number):
        return np.full(n, float(sample_weight), np.float64)
    sw = np.asarray(sample_weight)
    if sw.ndim != 1:
        raise ValueError(f"Sample weights must be 1D array or scalar, got shape {sw.shape}")
    if sw.shape[0] != n:
        raise ValueError(f"sample_weight.shape == ({sw.shape[0]},), expected ({n},)!")
    try:
        sw = sw.astype(np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"sample_weight must be numeric: {exc}") from exc
    if not np.isfinite(sw).all():
        raise ValueError("sample_weight must be finite (no NaN or infinity)")
    if (sw < 0).any():
        raise ValueError("sample_weight must be non-negative")
    if sw.sum() <= 0:
        raise ValueError("Sample weights must contain at least one non-zero number (all weights are zero).")
    return np.ascontiguousarray(sw)


class _Diverged(Exception):
    pass


class _MaxFun(Exception):
    pass


def _partial_fit_guard(est) -> bool:
    if est.solver == "lbfgs":
        raise AttributeError(f"partial_fit is only available for stochastic optimizers. {est.solver} is not "
                             "stochastic.")
    return True
