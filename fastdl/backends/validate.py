"""Validated public entry points of the kernels: one rule for every backend.

``get_backend(name).<kernel>`` is the kernel wrapped by :func:`checked`;
``get_backend(name).unchecked.<kernel>`` is the raw kernel, which the
executors and layers call on buffers they allocate themselves. The raw
kernels read and write through raw pointers and trust their arguments, so
anything reaching them from user code goes through this module first.

The rule (the conventions of :mod:`fastdl.backends.contract`; issue 14 item 3)
------------------------------------------------------------------------------
* Every array argument is a ``numpy.ndarray`` that is C-contiguous, aligned
  and in native byte order; every output is writeable.
* Float arrays share ONE dtype per call, ``float32`` or ``float64``.
  Class labels (``softmax_cross_entropy``'s ``y``) are ``int64`` in
  ``[0, k)``; dropout masks are ``uint8``; per-example weights ``w`` are
  ``float64``; Poisson targets (``poisson``'s ``Y``) are finite and ``>= 0``.
* Shapes are consistent with each other exactly as the contract states;
  every output has exactly the shape the contract implies. Optional outputs
  (``b``/``db``, ``dA_prev``, a loss's ``dZ``, ``w``) may instead be an empty
  array (``size == 0``) of the right dtype and number of dimensions.
* Batch and feature dimensions of 2-D kernels are at least 1 (BLAS rejects a
  leading dimension of 0, and a mean over 0 rows is undefined); flat 1-D
  kernels (optimisers, ``sum_squares``, ``all_finite``) accept length 0.
* An output may share memory with an input only where the contract says
  "may alias", and then only as the very same array (in-place); any other
  overlap is refused (the kernels would read values they have already
  overwritten).
* Scalars: activation codes 0-3, ``precision`` 0 or 1, ``keep_prob`` in
  (0, 1], dropout ``seed``/``step``/``layer`` integers (any sign: the
  generator works modulo 2**64), ``t`` a non-negative integer.
* Conversion: only scalars are converted (NumPy scalars to Python ``int`` /
  ``float`` / ``bool``). Arrays are never copied or converted: a wrong array
  is a :class:`KernelArgumentError` naming the argument and what to do. There
  is no silent slow path.

Nothing here writes to any array: a refused call leaves every output (and
the memory around it) untouched.
"""
from __future__ import annotations

import functools
import inspect
import numbers
from typing import Any, Callable

import numpy as np

# Argument kinds
F_IN = "float input"           # float array of the call's dtype, read only
F_OUT = "float output"         # float array of the call's dtype, written
F_INOUT = "float in/out"       # read and updated in place (running stats, params, optimiser state)
LABELS = "int64 labels"
MASK_OUT = "uint8 mask output"
MASK_IN = "uint8 mask"
WEIGHTS = "float64 weights"
COUNTS = "float input, finite and >= 0"   # Poisson targets: a float input whose values are checked too
ACT = "activation code"
PRECISION = "precision code"
REAL = "real"
PROB = "probability"
UINT = "unsigned integer"
INT = "integer"                # any Python/NumPy integer (the dropout counters work modulo 2**64)
BOOL = "bool"

_ARRAY_KINDS = {F_IN, F_OUT, F_INOUT, LABELS, MASK_OUT, MASK_IN, WEIGHTS, COUNTS}
_WRITTEN = {F_OUT, F_INOUT, MASK_OUT}
_FLOAT_KINDS = {F_IN, F_OUT, F_INOUT, COUNTS}
_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))
_INT64 = np.dtype(np.int64)
_UINT8 = np.dtype(np.uint8)
_F64 = np.dtype(np.float64)


class KernelArgumentError(ValueError, TypeError):
    """A kernel's public entry point refused an argument (wrong dtype, shape, layout or value).

    A ``ValueError`` (and, for arguments of the wrong type, also a ``TypeError``,
    so either ``except`` clause catches it). Nothing was written.
    """


class _Arg:
    __slots__ = ("name", "kind", "shape", "optional", "is_array", "written", "is_float")

    def __init__(self, name: str, kind: str, shape: tuple = (), optional: bool = False):
        self.name, self.kind, self.shape, self.optional = name, kind, shape, optional
        # precomputed: the checks run on every public call
        self.is_array = kind in _ARRAY_KINDS
        self.written = kind in _WRITTEN
        self.is_float = kind in _FLOAT_KINDS


def _a(kind: str, *shape: str, optional: bool = False) -> tuple:
    return (kind, shape, optional)


# Per kernel: argument name -> (kind, symbolic shape, optional-empty). Keyed by NAME, not
# position: the positional order is taken from the reference kernel's signature, so a
# signature change in the contract is followed here (or fails loudly on an unknown name).
# Names of retired signatures may stay in a table; they are simply never looked up.
_OPT_1D = {"params": _a(F_INOUT, "p"), "grads": _a(F_IN, "p"), "v": _a(F_INOUT, "p"),
           "s": _a(F_INOUT, "p"), "lr": _a(REAL), "beta": _a(REAL), "beta1": _a(REAL),
           "beta2": _a(REAL), "eps": _a(REAL), "c1": _a(REAL), "c2": _a(REAL), "mu": _a(REAL),
           "t": _a(UINT), "bias_correction": _a(BOOL), "nesterov": _a(BOOL)}
SPECS: dict[str, dict[str, tuple]] = {
    "dense_forward": {"A_prev": _a(F_IN, "m", "n_in"), "W": _a(F_IN, "n_in", "n_out"),
                      "b": _a(F_IN, "n_out", optional=True), "act": _a(ACT),
                      "out": _a(F_OUT, "m", "n_out"), "precision": _a(PRECISION)},
    "dense_backward": {"A_prev": _a(F_IN, "m", "n_in"), "W": _a(F_IN, "n_in", "n_out"),
                       "out": _a(F_IN, "m", "n_out"), "dout": _a(F_IN, "m", "n_out"), "act": _a(ACT),
                       "l2_over_m": _a(REAL), "dZ": _a(F_OUT, "m", "n_out"),
                       "dW": _a(F_OUT, "n_in", "n_out"), "db": _a(F_OUT, "n_out", optional=True),
                       "dA_prev": _a(F_OUT, "m", "n_in", optional=True), "precision": _a(PRECISION)},
    "activation_forward": {"Z": _a(F_IN, "m", "n"), "act": _a(ACT), "out": _a(F_OUT, "m", "n")},
    "activation_backward": {"out": _a(F_IN, "m", "n"), "dout": _a(F_IN, "m", "n"), "act": _a(ACT),
                            "dZ": _a(F_OUT, "m", "n")},
    "batchnorm_forward_train": {"Z": _a(F_IN, "m", "n"), "gamma": _a(F_IN, "n"), "beta": _a(F_IN, "n"),
                                "eps": _a(REAL), "momentum": _a(REAL),
                                "running_mean": _a(F_INOUT, "n"), "running_var": _a(F_INOUT, "n"),
                                "mean": _a(F_OUT, "n"), "inv_std": _a(F_OUT, "n"),
                                "out": _a(F_OUT, "m", "n")},
    "batchnorm_forward_infer": {"Z": _a(F_IN, "m", "n"), "gamma": _a(F_IN, "n"), "beta": _a(F_IN, "n"),
                                "running_mean": _a(F_IN, "n"), "running_var": _a(F_IN, "n"),
                                "eps": _a(REAL), "out": _a(F_OUT, "m", "n")},
    "batchnorm_backward": {"Z": _a(F_IN, "m", "n"), "gamma": _a(F_IN, "n"), "mean": _a(F_IN, "n"),
                           "inv_std": _a(F_IN, "n"), "dout": _a(F_IN, "m", "n"),
                           "dZ": _a(F_OUT, "m", "n"), "dgamma": _a(F_OUT, "n"), "dbeta": _a(F_OUT, "n")},
    "softmax_cross_entropy": {"Z": _a(F_IN, "m", "k"), "y": _a(LABELS, "m"),
                              "dZ": _a(F_OUT, "m", "k", optional=True),
                              "w": _a(WEIGHTS, "m", optional=True)},
    "softmax": {"Z": _a(F_IN, "m", "k"), "out": _a(F_OUT, "m", "k")},
    # k >= 1 independent binary outputs (multilabel); targets (m, k), or (m,) when k == 1
    "sigmoid_bce": {"Z": _a(F_IN, "m", "k"), "y": _a(F_IN, "m", "k"),
                    "dZ": _a(F_OUT, "m", "k", optional=True), "w": _a(WEIGHTS, "m", optional=True)},
    "mse": {"Yhat": _a(F_IN, "m", "k"), "Y": _a(F_IN, "m", "k"), "dZ": _a(F_OUT, "m", "k", optional=True),
            "w": _a(WEIGHTS, "m", optional=True)},
    "poisson": {"Z": _a(F_IN, "m", "k"), "Y": _a(COUNTS, "m", "k"), "dZ": _a(F_OUT, "m", "k", optional=True),
                "w": _a(WEIGHTS, "m", optional=True)},
    "dropout_forward": {"A": _a(F_IN, "m", "n"), "keep_prob": _a(PROB), "seed": _a(INT),
                        "step": _a(INT), "layer": _a(INT), "mask": _a(MASK_OUT, "m", "n"),
                        "out": _a(F_OUT, "m", "n")},
    "dropout_backward": {"dout": _a(F_IN, "m", "n"), "mask": _a(MASK_IN, "m", "n"), "keep_prob": _a(PROB),
                         "dA": _a(F_OUT, "m", "n")},
    "sgd_step": _OPT_1D,
    "momentum_step": _OPT_1D,
    "nesterov_step": _OPT_1D,
    "rmsprop_step": _OPT_1D,
    "adam_step": _OPT_1D,
    "sum_squares": {"x": _a(F_IN, "p")},
    "all_finite": {"x": _a(F_IN, "p")},
}

# (output, input) pairs that may be the very same array (the contract's "may alias").
ALIASES: dict[str, set[tuple[str, str]]] = {
    "dense_backward": {("dZ", "dout")},
    "activation_forward": {("out", "Z")},
    "activation_backward": {("dZ", "dout")},
    "batchnorm_forward_infer": {("out", "Z")},
    "batchnorm_backward": {("dZ", "dout")},
    "softmax": {("out", "Z")},
    "dropout_forward": {("out", "A")},
    "dropout_backward": {("dA", "dout")},
}
# Kernels whose dimensions may be 0 (flat passes: nothing to read, nothing to write).
_ZERO_OK = {"sgd_step", "momentum_step", "nesterov_step", "rmsprop_step", "adam_step",
            "sum_squares", "all_finite"}
_FIXED = {"one": 1}   # symbolic dimensions with a fixed size
# (kernel, argument): a 1-D array of shape (m,) is also accepted where the rule says (m, k), if k == 1
_VECTOR_IF_K1 = {("sigmoid_bce", "y")}


def _fail(kernel: str, msg: str) -> KernelArgumentError:
    return KernelArgumentError(f"{kernel}: {msg}")


def _check_scalar(kernel: str, a: _Arg, v: Any) -> Any:
    k = a.kind
    tv = type(v)
    # fast paths for plain Python scalars (the ABC isinstance checks below cost ~1 us each)
    if tv is float and k == REAL:
        return v
    if tv is int and k in (INT, UINT, ACT, PRECISION) and (k == INT or (k == ACT and 0 <= v <= 3)
                                                           or (k == PRECISION and v in (0, 1))
                                                           or (k == UINT and 0 <= v < 1 << 64)):
        return v
    if k == BOOL:
        if isinstance(v, (bool, np.bool_)):
            return bool(v)
        raise _fail(kernel, f"'{a.name}' must be a bool, got {type(v).__name__} {v!r}")
    if k in (ACT, PRECISION, UINT, INT):
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Integral):
            raise _fail(kernel, f"'{a.name}' must be an integer, got {type(v).__name__} {v!r}")
        v = int(v)
        if k == ACT and not 0 <= v <= 3:
            raise _fail(kernel, f"'act' must be an activation code 0-3 (IDENTITY=0, RELU=1, TANH=2, "
                                f"SIGMOID=3), got {v}")
        if k == PRECISION and v not in (0, 1):
            raise _fail(kernel, f"'precision' must be 0 (float32) or 1 (bfloat16 GEMMs), got {v}")
        if k == UINT and not 0 <= v < 1 << 64:
            raise _fail(kernel, f"'{a.name}' must be an integer in [0, 2**64), got {v}")
        return v
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Real):
        raise _fail(kernel, f"'{a.name}' must be a real number, got {type(v).__name__} {v!r}")
    v = float(v)
    if k == PROB and not 0.0 < v <= 1.0:
        raise _fail(kernel, f"'{a.name}' must be in (0, 1], got {v!r}")
    return v


def _root(x: np.ndarray) -> np.ndarray:
    """The ndarray at the end of ``x``'s chain of ndarray bases."""
    while isinstance(x.base, np.ndarray):
        x = x.base
    return x


def _layout_problem(x: np.ndarray) -> str | None:
    if not x.dtype.isnative:
        return (f"is in non-native byte order (dtype {x.dtype.str!r}); convert it with "
                f"x.astype(x.dtype.newbyteorder('='))")
    if not x.flags.c_contiguous:
        return "is not C-contiguous (a transposed, Fortran-order or strided view); pass np.ascontiguousarray(x)"
    if not x.flags.aligned:
        return "is not aligned to its item size (an offset view of a byte buffer); pass a copy"
    return None


def _check_call(kernel: str, spec: list[_Arg], values: list, aliases: set) -> list:
    """Check one call's arguments; returns them with scalars converted."""
    dims: dict[str, tuple[int, str]] = {}
    fdtype: np.dtype | None = None
    fdtype_from = ""
    arrays: list[tuple[_Arg, np.ndarray]] = []
    out = list(values)
    zero_ok = kernel in _ZERO_OK
    vector_if_k1: list[str] = []
    for i, (a, v) in enumerate(zip(spec, values)):
        if not a.is_array:
            out[i] = _check_scalar(kernel, a, v)
            continue
        if v is None and a.optional:
            continue     # an optional argument left out (a default of None): nothing to check
        if not isinstance(v, np.ndarray):
            raise _fail(kernel, f"'{a.name}' must be a numpy.ndarray, got {type(v).__name__}")
        shape = a.shape
        if v.ndim == 1 and (kernel, a.name) in _VECTOR_IF_K1:
            shape = shape[:1]
            vector_if_k1.append(a.name)
        nd = len(shape)
        if v.ndim != nd:
            raise _fail(kernel, f"'{a.name}' must be {nd}-D ({a.kind} of shape "
                                f"({', '.join(shape)}{',' if nd == 1 else ''})), got shape {v.shape}")
        fl = v.flags
        dt = v.dtype
        if not (fl.c_contiguous and fl.aligned and dt.isnative):
            raise _fail(kernel, f"'{a.name}' {_layout_problem(v)}")
        if a.written and not fl.writeable:
            raise _fail(kernel, f"'{a.name}' is an output and must be writeable (got a read-only array)")
        if a.is_float:
            if dt not in _FLOATS:
                raise _fail(kernel, f"'{a.name}' must be float32 or float64, got {dt}")
            if fdtype is None:
                fdtype, fdtype_from = dt, a.name
            elif dt != fdtype:
                raise _fail(kernel, f"'{a.name}' is {dt} but '{fdtype_from}' is {fdtype}: every float "
                                    f"array of one call has the same dtype")
        elif a.kind == LABELS and dt != _INT64:
            raise _fail(kernel, f"'{a.name}' must be int64 class labels, got {dt}")
        elif a.kind in (MASK_IN, MASK_OUT) and dt != _UINT8:
            raise _fail(kernel, f"'{a.name}' must be a uint8 mask, got {dt}")
        elif a.kind == WEIGHTS and dt != _F64:
            raise _fail(kernel, f"'{a.name}' must be float64 per-example weights, got {dt}")
        if a.optional and v.size == 0:
            arrays.append((a, v))
            continue
        for axis, (sym, n) in enumerate(zip(shape, v.shape)):
            want = _FIXED.get(sym)
            if want is not None:
                if n != want:
                    raise _fail(kernel, f"'{a.name}' has shape {v.shape}; axis {axis} must be {want}")
                continue
            if n == 0 and not zero_ok:
                raise _fail(kernel, f"'{a.name}' has shape {v.shape}: every dimension must be at least 1")
            seen = dims.get(sym)
            if seen is None:
                dims[sym] = (n, a.name)
            elif seen[0] != n:
                raise _fail(kernel, f"'{a.name}' has shape {v.shape} but '{seen[1]}' sets {sym} = {seen[0]} "
                                    f"(axis {axis} of '{a.name}' must be {seen[0]})")
        arrays.append((a, v))
    for name in vector_if_k1:
        if "k" in dims and dims["k"][0] != 1:
            raise _fail(kernel, f"'{name}' is 1-D, which needs one output column, but '{dims['k'][1]}' has "
                                f"k = {dims['k'][0]} columns: pass targets of shape (m, {dims['k'][0]})")
    for a, v in arrays:
        if a.kind == LABELS and v.size:
            k = dims["k"][0]
            lo, hi = int(v.min()), int(v.max())
            if lo < 0 or hi >= k:
                raise _fail(kernel, f"'{a.name}' must hold class ids in [0, {k}); got values in [{lo}, {hi}]")
        elif a.kind == COUNTS and v.size:
            if not np.isfinite(v).all():
                raise _fail(kernel, f"'{a.name}' must be finite (Poisson targets); it holds "
                                    f"{int(np.count_nonzero(~np.isfinite(v)))} NaN or infinite value(s)")
            lo = float(v.min())
            if lo < 0:
                raise _fail(kernel, f"'{a.name}' must be >= 0 (Poisson targets: counts or rates); it holds "
                                    f"{int(np.count_nonzero(v < 0))} negative value(s), the smallest {lo!r}")
    # Overlap: outputs may share memory with nothing, except a permitted in-place alias.
    # An array whose chain of bases ends in an array that allocated its memory (OWNDATA) can only
    # overlap arrays with the same root: other pairs skip the bounds check (~1 us a pair).
    roots = {}
    for _, v in arrays:
        r = _root(v)
        roots[id(v)] = (r, r.flags.owndata)
    for a, v in arrays:
        if not a.written or v.size == 0:
            continue
        rv, own_v = roots[id(v)]
        for b, u in arrays:
            if b is a or u.size == 0:
                continue
            ru, own_u = roots[id(u)]
            if (ru is not rv and own_u and own_v) or not np.may_share_memory(v, u):
                continue
            same = (u.__array_interface__["data"][0] == v.__array_interface__["data"][0]
                    and u.shape == v.shape and u.dtype == v.dtype)
            if same and ((a.name, b.name) in aliases or (b.name, a.name) in aliases):
                continue
            what = ("may alias it only as the very same array" if (a.name, b.name) in aliases
                    or (b.name, a.name) in aliases else "must not share memory with it")
            raise _fail(kernel, f"output '{a.name}' overlaps '{b.name}'; '{a.name}' {what}")
    return out


def _is_default(v: Any, d: Any) -> bool:
    if v is d:
        return True
    return type(v) in (int, float, bool) and type(d) in (int, float, bool) and v == d


def checked(kernel: str, raw: Callable, reference: Callable) -> Callable:
    """Wrap ``raw`` (one backend's kernel) in the validation rule of this module.

    The positional order and defaults of the arguments are the reference
    kernel's. Trailing arguments left at their defaults are not passed on, so
    a backend whose kernel predates an optional argument still runs.
    """
    table = SPECS[kernel]
    params = list(inspect.signature(reference).parameters.values())
    unknown = [p.name for p in params if p.name not in table]
    if unknown:
        raise RuntimeError(f"validate.SPECS[{kernel!r}] does not describe argument(s) {unknown} "
                           f"of the reference kernel: update fastdl/backends/validate.py")
    spec = [_Arg(p.name, *table[p.name]) for p in params]
    names = [p.name for p in params]
    defaults = [p.default for p in params]
    n = len(params)
    required = sum(d is inspect.Parameter.empty for d in defaults)
    aliases = ALIASES.get(kernel, set())

    @functools.wraps(reference)
    def entry(*args: Any, **kwargs: Any) -> Any:
        if len(args) > n:
            raise _fail(kernel, f"takes {n} arguments ({', '.join(names)}), got {len(args)}")
        values = list(args) + defaults[len(args):]
        for key, val in kwargs.items():
            try:
                j = names.index(key)
            except ValueError:
                raise _fail(kernel, f"unexpected keyword argument {key!r}; arguments: {', '.join(names)}") from None
            if j < len(args):
                raise _fail(kernel, f"got multiple values for argument {key!r}")
            values[j] = val
        missing = [names[j] for j in range(n) if values[j] is inspect.Parameter.empty]
        if missing:
            raise _fail(kernel, f"missing argument(s) {missing}")
        values = _check_call(kernel, spec, values, aliases)
        last = n
        while last > required and _is_default(values[last - 1], defaults[last - 1]):
            last -= 1
        return raw(*values[:last])

    entry.__qualname__ = entry.__name__ = kernel
    entry.__wrapped__ = raw   # type: ignore[attr-defined]
    entry.__signature__ = inspect.signature(reference)   # type: ignore[attr-defined]  # the contract's
    return entry
