"""Input checks shared by the public API: clear errors, never a silent wrong answer."""
from __future__ import annotations

import numbers

import numpy as np

DTYPES = {"float32": np.float32, "float64": np.float64}


def check_dtype(dtype) -> np.dtype:
    """Normalise a model dtype ('float32' / 'float64' or the NumPy types)."""
    try:
        dt = np.dtype(dtype)
    except TypeError:
        dt = None
    if dt is None or dt.name not in DTYPES:
        raise ValueError(f"dtype must be 'float32' or 'float64', got {dtype!r}")
    return dt


def check_positive(name: str, value, *, integer: bool = False, allow_zero: bool = False) -> float:
    """Check a scalar hyperparameter is a finite positive number (or >= 0)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if integer and not float(value).is_integer():
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if not np.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be {bound}, got {value!r}")
    return int(value) if integer else float(value)


def check_unit_interval(name: str, value, *, closed_right: bool = True, open_left: bool = True) -> float:
    """Check ``value`` lies in (0, 1] (or [0, 1) etc.)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not np.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    lo_ok = value > 0 if open_left else value >= 0
    hi_ok = value <= 1 if closed_right else value < 1
    if not (lo_ok and hi_ok):
        lo = "(0" if open_left else "[0"
        hi = "1]" if closed_right else "1)"
        raise ValueError(f"{name} must be in {lo}, {hi}, got {value!r}")
    return float(value)


def check_choice(name: str, value, choices) -> str:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; choose one of {sorted(choices)}")
    return value


def as_float_matrix(X, dtype: np.dtype, n_features: int | None, name: str = "X") -> np.ndarray:
    """Return ``X`` as a C-contiguous 2-D array of ``dtype``, checking values.

    Accepts anything ``np.asarray`` understands (lists, pandas frames) holding
    real numbers; integer and other float dtypes are converted. Refuses
    complex, object/strings, NaN/inf and wrong feature counts.
    """
    if hasattr(X, "to_numpy"):  # pandas-like
        X = X.to_numpy()
    try:
        arr = np.asarray(X)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{name} could not be converted to a numeric array: {exc}") from None
    if arr.dtype == object or arr.dtype.kind not in "biuf":
        raise TypeError(f"{name} must hold real numbers, got dtype {arr.dtype}")
    if arr.ndim != 2:
        raise ValueError(f"{name} must be 2-D (m examples, n features), got shape {arr.shape}")
    if arr.shape[0] == 0:
        raise ValueError(f"{name} has no examples (shape {arr.shape})")
    if n_features is not None and arr.shape[1] != n_features:
        raise ValueError(f"{name} has {arr.shape[1]} features but the model expects {n_features}")
    out = np.ascontiguousarray(arr, dtype=dtype)
    if not np.isfinite(out).all():
        bad = int(np.count_nonzero(~np.isfinite(out)))
        raise ValueError(f"{name} contains {bad} NaN or infinite value(s)"
                         + (" (after conversion to float32 some values overflowed)" if arr.dtype.kind == "f"
                            and np.isfinite(arr).all() else ""))
    return out


def _label_type_message(name: str, arr: np.ndarray, want: str) -> str:
    """The error for string / object labels, naming the ways out (a newcomer's first trap)."""
    sample = ", ".join(repr(v) for v in arr.reshape(-1)[:3].tolist())
    return (f"{name} must hold {want}, got dtype {arr.dtype} (e.g. {sample}). Encode the labels first: "
            f"classes, {name}_ids = np.unique({name}, return_inverse=True) (classes[{name}_ids] maps back), "
            f"or scikit-learn's LabelEncoder; fastdl.sklearn.MLPClassifier accepts any labels directly")


def as_class_labels(y, m: int, n_classes: int, name: str = "y") -> np.ndarray:
    """Integer class ids in [0, n_classes) as int64, shape (m,).

    Float labels holding whole numbers are accepted (converted); one-hot or
    fractional labels are refused with a hint.
    """
    if hasattr(y, "to_numpy"):
        y = y.to_numpy()
    arr = np.asarray(y)
    if arr.ndim == 2 and arr.shape[1] == n_classes and arr.shape[1] > 1:
        raise ValueError(f"{name} looks one-hot encoded (shape {arr.shape}); pass class ids instead, "
                         f"e.g. {name}.argmax(axis=1)")
    if arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D class ids of shape ({m},), got shape {arr.shape}")
    if arr.shape[0] != m:
        raise ValueError(f"{name} has {arr.shape[0]} labels but X has {m} examples")
    if arr.dtype == object or arr.dtype.kind not in "biuf":
        raise TypeError(_label_type_message(name, arr, "integer class ids 0..n_classes-1"))
    if arr.dtype.kind == "f":
        if not np.isfinite(arr).all() or not np.all(arr == np.round(arr)):
            raise ValueError(f"{name} must hold whole-number class ids; got non-integer values")
    labels = arr.astype(np.int64)
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= n_classes:
        raise ValueError(f"{name} has labels in [{lo}, {hi}] but the model has {n_classes} classes "
                         f"(labels must be in [0, {n_classes - 1}])")
    return labels


def as_binary_labels(y, m: int, dtype: np.dtype, name: str = "y") -> np.ndarray:
    """Labels in {0, 1} as ``dtype``, shape (m,)."""
    if hasattr(y, "to_numpy"):
        y = y.to_numpy()
    arr = np.asarray(y)
    if arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D labels in {{0, 1}} of shape ({m},), got shape {arr.shape}")
    if arr.shape[0] != m:
        raise ValueError(f"{name} has {arr.shape[0]} labels but X has {m} examples")
    if arr.dtype == object or arr.dtype.kind not in "biuf":
        raise TypeError(_label_type_message(name, arr, "0/1 labels"))
    if not np.isin(arr, (0, 1)).all():
        raise ValueError(f"{name} must hold only 0 and 1 for binary cross-entropy; "
                         f"found values such as {arr[~np.isin(arr, (0, 1))][:3].tolist()}")
    return np.ascontiguousarray(arr, dtype=dtype)


def as_regression_targets(y, m: int, k: int, dtype: np.dtype, name: str = "y", loss: str = "mse") -> np.ndarray:
    """Float targets of shape (m, k); (m,) is accepted when k == 1."""
    if hasattr(y, "to_numpy"):
        y = y.to_numpy()
    arr = np.asarray(y)
    if arr.ndim == 1 and k == 1:
        arr = arr[:, None]
    if arr.ndim != 2 or arr.shape != (m, k):
        raise ValueError(f"{name} must have shape ({m}, {k}) for {loss}, got {arr.shape}")
    return as_float_matrix(arr, dtype, k, name)
