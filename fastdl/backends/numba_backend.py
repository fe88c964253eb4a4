"""The Numba backend: every kernel of :mod:`fastdl.backends.contract`, JIT-compiled.

Signatures and semantics are exactly those of :mod:`fastdl.backends.reference`
(the oracle); ``tests/test_conformance.py`` checks every kernel against it.

How it is built
---------------
* Every compiled function is ``@njit(cache=True, error_model="numpy")``.
  ``error_model="numpy"`` gives IEEE division (x/0 -> inf/NaN, as in NumPy,
  instead of raising ZeroDivisionError); it is also what lets LLVM vectorise
  loops that divide. No ``fastmath``: NaN and Inf propagate as in NumPy and
  multiply-adds are not fused, so element-wise arithmetic written in the
  reference's operation order (SGD, momentum, RMSprop, dropout) gives the
  same bits.
  Adam folds its bias corrections into two scalars (a few ulp from the
  reference). The exceptions to "no fastmath": ``contract`` (FMA fusion
  only) inside the private exp/tanh/log polynomials, where it only makes
  them more accurate, and ``reassoc`` in the three float64 sum helpers, so
  LLVM vectorises them (the order is then fixed by the compiled code, not by
  threads).
* Inner loops run over ``range(n)`` of 1-D views (``x[lo:hi]``, ``Z[i]``):
  with a start of 0 Numba can drop negative-index wrap-around and LLVM
  vectorises them.
* ``exp`` and ``tanh`` are written out (Cody-Waite reduction + polynomial;
  Cephes' tanh/tanhf), about 1 ulp, in the array's precision (float32 data
  in float32 arithmetic, 8 lanes per AVX2 vector), because ``math.exp`` and
  ``math.tanh`` are opaque libm calls that stop vectorisation (no SVML
  here); so are float64 ``log`` and ``log1p`` (fdlibm's polynomial) for the
  losses. Sums, logs and losses stay float64.
* The public functions are thin Python wrappers: they pick a serial or a
  ``prange`` variant by problem size and call one compiled function. Both
  variants share the same chunk helper and, for reductions, the same
  partitioning (a function of the shapes only), so results never depend on
  the number of threads or on which variant ran.
* GEMMs call the row-major wrappers of ``fastdl._kernels._blas`` (the
  same BLAS as the Cython backend, chosen by :mod:`fastdl.backends.blas`:
  MKL when installed, else SciPy's OpenBLAS), registered as LLVM symbols so
  the cached machine code links to them by name; never inside a ``prange``
  region. Bias and activation (forward) and activation derivative and
  ``db`` (backward) are fused into one pass.
* Reductions (losses, ``sum_squares``, BatchNorm statistics, ``db``) are
  accumulated in float64. BatchNorm statistics: on data shifted by the
  first row, the shifted sums and sums of squares of 8 rows at a time kept in
  registers, per 64-row tile; tiles and row partitions are merged with
  Chan's formula. One read of ``Z``, as accurate as the two-pass formula.
  The BatchNorm output and ``dZ`` passes run in the array's dtype with
  per-feature coefficients computed in float64.
* Scalars (``lr``, ``eps``, ...) are cast to the array dtype inside the
  kernels (``x.dtype.type(...)``), so float32 kernels stay in float32.
* Dropout: the contract's counter-based splitmix64 generator in explicit
  uint64 arithmetic; the per-call key and threshold are computed in Python
  with :func:`contract.dropout_key` / :func:`contract.keep_threshold`.
"""
from __future__ import annotations

import functools
import math
import os
import threading

# Numba's default threading layer here is "omp" (libgomp). Unless told
# otherwise, libgomp's idle threads spin for a long time (GOMP_SPINCOUNT
# 300000 PAUSEs, milliseconds on recent Intel cores) after every parallel
# region; on a shared or oversubscribed machine that stalls the next region,
# and OpenBLAS's threads, by 10x or more (measured; benchmarks/README.md).
# A passive wait policy costs a futex wake-up (~10-50 us) per region
# instead, which the size thresholds below absorb. It only takes effect if
# libgomp is not loaded yet, and an explicit user setting always wins.
# OMP_WAIT_POLICY=PASSIVE is set by fastdl.backends (imported before this module); see there.

import numpy as np  # noqa: E402
import llvmlite.binding  # noqa: E402
import numba  # noqa: E402
from llvmlite import ir  # noqa: E402
from numba import njit, prange, types  # noqa: E402

# Numba's own order is tbb, omp, workqueue; the tbb package comes with MKL
# (fastdl[mkl]) and would then give prange a second thread pool beside the
# libgomp one of the Cython kernels and MKL. OpenMP first keeps one runtime
# (and the OMP_WAIT_POLICY above); an explicit user choice wins.
if not {"NUMBA_THREADING_LAYER", "NUMBA_THREADING_LAYER_PRIORITY"} & set(os.environ):
    numba.config.THREADING_LAYER_PRIORITY = ["omp", "tbb", "workqueue"]
from numba.extending import intrinsic, overload  # noqa: E402

from .contract import (  # noqa: E402
    GOLDEN, IDENTITY, MIX_C1, MIX_C2, RELU, SIGMOID, TANH, dropout_key, keep_threshold,
)

__all__ = [
    "dense_forward", "dense_backward", "activation_forward", "activation_backward",
    "batchnorm_forward_train", "batchnorm_forward_infer", "batchnorm_backward",
    "softmax_cross_entropy", "softmax", "sigmoid_bce", "mse",
    "dropout_forward", "dropout_backward",
    "sgd_step", "momentum_step", "rmsprop_step", "adam_step", "sum_squares", "all_finite",
    "warmup", "set_parallel", "PARALLEL_THRESHOLDS",
]

_jit = njit(cache=True, error_model="numpy")
_pjit = njit(cache=True, error_model="numpy", parallel=True)
_mjit = njit(cache=True, error_model="numpy", fastmath={"contract"})   # math polynomials only
_rjit = njit(cache=True, error_model="numpy", fastmath={"reassoc"})    # float64 sums: vectorised order

# Work sizes (elements) from which the prange variant is used; below them the
# serial variant avoids the fork/join cost (tens of microseconds with a
# passive OpenMP wait policy, see below). Chosen so that the serial time at
# the threshold is roughly 150-300 us on this class of machine (2 cores; see
# benchmarks/README.md). A kernel's result does not depend on the choice.
PARALLEL_THRESHOLDS = {
    "bias_act": 1 << 18,        # dense_forward's bias + tanh/sigmoid pass (relu/identity stay serial)
    "act_transcendental": 1 << 18,   # activation_forward tanh / sigmoid
    "act_cheap": 1 << 20,       # activation_forward relu / identity, activation_backward
    "batchnorm": 1 << 18,       # batchnorm_forward_train, batchnorm_backward
    "batchnorm_infer": 1 << 19,
    "softmax": 1 << 18,         # softmax_cross_entropy, softmax
    "dropout": 1 << 19,         # dropout_forward, dropout_backward
    "adam": 1 << 18,
    "optimizer": 1 << 19,       # sgd, momentum, rmsprop
    "sum_squares": 1 << 21,
}
_DEFAULT_THRESHOLDS = dict(PARALLEL_THRESHOLDS)
_NEVER = 1 << 62
_THR = dict(PARALLEL_THRESHOLDS)       # what the wrappers read


def set_parallel(enabled: bool = True, **thresholds: int) -> None:
    """Switch the multi-threaded (``prange``) kernel variants on or off, or move their thresholds.

    ``set_parallel(False)`` makes every kernel run its serial variant (useful
    on an oversubscribed machine, or when running several trainings side by
    side); ``set_parallel(True, adam=1 << 20)`` restores the defaults and
    overrides one threshold (in elements; keys of ``PARALLEL_THRESHOLDS``).
    Results are identical either way.
    """
    unknown = set(thresholds) - set(_DEFAULT_THRESHOLDS)
    if unknown:
        raise ValueError(f"unknown threshold(s) {sorted(unknown)}; choose from {sorted(_DEFAULT_THRESHOLDS)}")
    PARALLEL_THRESHOLDS.clear()
    PARALLEL_THRESHOLDS.update(_DEFAULT_THRESHOLDS)
    PARALLEL_THRESHOLDS.update({k: int(v) for k, v in thresholds.items()})
    _THR.clear()
    _THR.update(PARALLEL_THRESHOLDS if enabled else {k: _NEVER for k in PARALLEL_THRESHOLDS})


def _serial_after_fork() -> None:
    # GNU OpenMP is not fork-safe: a fork()ed child of a process that has run a
    # parallel region is terminated by Numba when it starts one ("fork() called
    # from a process already using GNU OpenMP"). Children (multiprocessing's
    # fork start method) therefore run the serial variants; same results.
    _THR.update({k: _NEVER for k in _THR})


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_serial_after_fork)


# Chunking. Reductions use partitions that depend on the shapes only, never
# on the thread count.
_CHUNK = 1 << 15            # elements per chunk of flat element-wise kernels
_RED_CHUNK = 1 << 16        # elements per partial sum of sum_squares
_TILE_BYTES = 1 << 17       # BatchNorm statistics tile (fits in L2)
_ROWS_PER_PART = 64         # BatchNorm / loss rows per partial result (>=)
_MAX_PARTS = 16

# uint64 constants of the dropout generator (explicitly typed: in Numba,
# mixing uint64 with int64 promotes to float64).
_U_G = np.uint64(GOLDEN)
_U_C1 = np.uint64(MIX_C1)
_U_C2 = np.uint64(MIX_C2)
_U_S27 = np.uint64(27)
_U_S30 = np.uint64(30)
_U_S31 = np.uint64(31)
_U_S32 = np.uint64(32)


# =========================================================================== vectorisable math


@intrinsic
def _bits_as_f64(typingctx, x):
    """Reinterpret the bits of an int64 as a float64 (no conversion)."""
    if not isinstance(x, types.Integer):
        return None
    sig = types.float64(types.int64)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.DoubleType())

    return sig, codegen


_LOG2E = 1.4426950408889634
_LN2_HI = 6.93147180369123816490e-01     # low bits zero: k * _LN2_HI is exact for |k| < 2**11
_LN2_LO = 1.90821492927058770002e-10
_E2, _E3, _E4, _E5, _E6, _E7, _E8, _E9, _E10, _E11, _E12, _E13 = (1.0 / math.factorial(i) for i in range(2, 14))


@_mjit
def _exp64(x):
    """exp(x) in float64, about 1 ulp; NaN -> NaN, +inf -> inf, -inf -> 0, subnormal results kept."""
    xc = x
    if xc > 710.0:
        xc = 710.0
    if xc < -746.0:
        xc = -746.0
    if xc != xc:
        xc = 0.0
    kf = np.rint(xc * _LOG2E)
    r = (xc - kf * _LN2_HI) - kf * _LN2_LO       # |r| <= ln2/2
    p = _E13
    p = p * r + _E12
    p = p * r + _E11
    p = p * r + _E10
    p = p * r + _E9
    p = p * r + _E8
    p = p * r + _E7
    p = p * r + _E6
    p = p * r + _E5
    p = p * r + _E4
    p = p * r + _E3
    p = p * r + _E2
    p = p * r + 1.0
    p = p * r + 1.0
    k = np.int64(kf)
    k1 = k >> 1                                   # 2**k = 2**k1 * 2**k2, both normal
    k2 = k - k1
    res = (p * _bits_as_f64((k1 + 1023) << 52)) * _bits_as_f64((k2 + 1023) << 52)
    if x != x:
        res = x
    return res


# Cephes tanh: rational approximation on |x| < 0.625, 1 - 2/(exp(2|x|) + 1) above.
_TP0, _TP1, _TP2 = -9.64399179425052238628e-1, -9.92877231001918586564e1, -1.61468768441708447952e3
_TQ0, _TQ1, _TQ2 = 1.12811678491632931402e2, 2.23548839060100448583e3, 4.84406305325125486048e3


@_mjit
def _tanh64(x):
    a = abs(x)
    s = x * x
    small = x + x * s * (((_TP0 * s + _TP1) * s + _TP2) / (((s + _TQ0) * s + _TQ1) * s + _TQ2))
    ac = a if a < 22.0 else 22.0                  # tanh(22) == 1.0 in float64
    e = _exp64(ac + ac)
    big = 1.0 - 2.0 / (e + 1.0)
    if x < 0:
        big = -big
    res = small if a < 0.625 else big
    if x != x:
        res = x
    return res


@_jit
def _sigmoid64(z):
    # Same formula as reference._apply_activation (exp of a non-positive number).
    e = _exp64(-abs(z))
    if z >= 0:
        return 1.0 / (1.0 + e)
    return e / (1.0 + e)


@intrinsic
def _bits_as_f32(typingctx, x):
    """Reinterpret the bits of an int32 as a float32 (no conversion)."""
    if not isinstance(x, types.Integer):
        return None
    sig = types.float32(types.int32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return sig, codegen


_f32 = np.float32
_L2E_F = _f32(_LOG2E)
_C1_F = _f32(0.693359375)          # Cephes expf: ln2 split, k * _C1_F exact in float32
_C2_F = _f32(-2.12194440e-4)
_F2, _F3, _F4, _F5, _F6, _F7 = (_f32(1.0 / math.factorial(i)) for i in range(2, 8))
_ONE_F = _f32(1.0)
_TWO_F = _f32(2.0)
_I1, _I23, _I127 = np.int32(1), np.int32(23), np.int32(127)


@_mjit
def _exp32(x):
    """expf(x) in float32 arithmetic, about 1 ulp (8 lanes per AVX2 vector)."""
    xc = x
    if xc > _f32(89.0):
        xc = _f32(89.0)
    if xc < _f32(-104.0):
        xc = _f32(-104.0)
    if xc != xc:
        xc = _f32(0.0)
    kf = np.rint(xc * _L2E_F)
    r = (xc - kf * _C1_F) - kf * _C2_F
    p = _F7
    p = p * r + _F6
    p = p * r + _F5
    p = p * r + _F4
    p = p * r + _F3
    p = p * r + _F2
    p = p * r + _ONE_F
    p = p * r + _ONE_F
    k = np.int32(kf)
    k1 = k >> _I1
    k2 = k - k1
    res = (p * _bits_as_f32((k1 + _I127) << _I23)) * _bits_as_f32((k2 + _I127) << _I23)
    if x != x:
        res = x
    return res


# Cephes tanhf: polynomial on |x| < 0.625, 1 - 2/(exp(2|x|) + 1) above.
_TF0, _TF1, _TF2, _TF3, _TF4 = (_f32(-5.70498872745e-3), _f32(2.06390887954e-2), _f32(-5.37397155531e-2),
                                _f32(1.33314422036e-1), _f32(-3.33332819422e-1))


@_mjit
def _tanh32(x):
    a = abs(x)
    z = x * x
    small = ((((_TF0 * z + _TF1) * z + _TF2) * z + _TF3) * z + _TF4) * z * x + x
    ac = a if a < _f32(10.0) else _f32(10.0)        # tanhf(10) == 1.0f
    e = _exp32(ac + ac)
    big = _ONE_F - _TWO_F / (e + _ONE_F)
    if x < 0:
        big = -big
    res = small if a < _f32(0.625) else big
    if x != x:
        res = x
    return res


@_jit
def _sigmoid32(z):
    e = _exp32(-abs(z))
    if z >= 0:
        return _ONE_F / (_ONE_F + e)
    return e / (_ONE_F + e)


def _exp_dt(x):
    """exp in the precision of x (float32 -> _exp32, else _exp64); compiled via the overload below."""
    raise NotImplementedError


def _tanh_dt(x):
    raise NotImplementedError


def _sigmoid_dt(x):
    raise NotImplementedError


def _is_f32(x):
    return isinstance(x, types.Float) and x.bitwidth == 32


@overload(_exp_dt, jit_options=dict(error_model="numpy"))
def _ov_exp_dt(x):
    if _is_f32(x):
        return lambda x: _exp32(x)
    return lambda x: _exp64(np.float64(x))


@overload(_tanh_dt, jit_options=dict(error_model="numpy"))
def _ov_tanh_dt(x):
    if _is_f32(x):
        return lambda x: _tanh32(x)
    return lambda x: _tanh64(np.float64(x))


@overload(_sigmoid_dt, jit_options=dict(error_model="numpy"))
def _ov_sigmoid_dt(x):
    if _is_f32(x):
        return lambda x: _sigmoid32(x)
    return lambda x: _sigmoid64(np.float64(x))


@_rjit
def _sum64(x):
    """float64 sum of a 1-D array (reassociation allowed only here: a vectorised, fixed order)."""
    s = 0.0
    for i in range(x.shape[0]):
        s += np.float64(x[i])
    return s


@_jit
def _max64(x):
    """Max of a 1-D array, as float64 (-inf when empty); NaNs are skipped (callers propagate them).

    Eight lanes in the array's dtype (vectorisable selects).
    """
    n = x.shape[0]
    ninf = x.dtype.type(-np.inf)
    m0 = m1 = m2 = m3 = m4 = m5 = m6 = m7 = ninf
    i = 0
    while i + 8 <= n:
        v0 = x[i]
        v1 = x[i + 1]
        v2 = x[i + 2]
        v3 = x[i + 3]
        v4 = x[i + 4]
        v5 = x[i + 5]
        v6 = x[i + 6]
        v7 = x[i + 7]
        m0 = v0 if v0 > m0 else m0
        m1 = v1 if v1 > m1 else m1
        m2 = v2 if v2 > m2 else m2
        m3 = v3 if v3 > m3 else m3
        m4 = v4 if v4 > m4 else m4
        m5 = v5 if v5 > m5 else m5
        m6 = v6 if v6 > m6 else m6
        m7 = v7 if v7 > m7 else m7
        i += 8
    while i < n:
        v = x[i]
        m0 = v if v > m0 else m0
        i += 1
    m0 = m1 if m1 > m0 else m0
    m2 = m3 if m3 > m2 else m2
    m4 = m5 if m5 > m4 else m4
    m6 = m7 if m7 > m6 else m6
    m0 = m2 if m2 > m0 else m0
    m4 = m6 if m6 > m4 else m4
    m0 = m4 if m4 > m0 else m0
    return np.float64(m0)


# fdlibm log: log(1+f) = f - (hfsq - s*(hfsq + R(s^2))), s = f/(2+f), |f| < sqrt(2)-1
_LG1, _LG2, _LG3, _LG4 = 6.666666666666735130e-01, 3.999999999940941908e-01, 2.857142874366239149e-01, \
    2.222219843214978396e-01
_LG5, _LG6, _LG7 = 1.818357216161805012e-01, 1.531383769920937332e-01, 1.479819860511658591e-01


@intrinsic
def _f64_as_bits(typingctx, x):
    """Reinterpret the bits of a float64 as an int64 (no conversion)."""
    if not isinstance(x, types.Float) or x.bitwidth != 64:
        return None
    sig = types.int64(types.float64)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(64))

    return sig, codegen


_MANT_MASK = np.int64(0x000FFFFFFFFFFFFF)
_ONE_BITS = np.int64(0x3FF0000000000000)
_I52 = np.int64(52)
_I1023 = np.int64(1023)


@_mjit
def _log64(x):
    """log(x) for positive normal x (NaN -> NaN), fdlibm's polynomial, about 1 ulp, vectorisable.

    Not for 0, negatives, subnormals or inf (callers only pass row sums >= 1 or NaN).
    """
    b = _f64_as_bits(x)
    k = (b >> _I52) - _I1023
    m = _bits_as_f64((b & _MANT_MASK) | _ONE_BITS)        # x = m * 2**k, m in [1, 2)
    big = m > 1.4142135623730951
    m = m * 0.5 if big else m
    dk = np.float64(k) + (1.0 if big else 0.0)
    f = m - 1.0                                           # exact
    s = f / (2.0 + f)
    z = s * s
    w = z * z
    t1 = w * (_LG2 + w * (_LG4 + w * _LG6))
    t2 = z * (_LG1 + w * (_LG3 + w * (_LG5 + w * _LG7)))
    r = t2 + t1
    hfsq = 0.5 * f * f
    res = dk * _LN2_HI - ((hfsq - (s * (hfsq + r) + dk * _LN2_LO)) - f)
    if x != x:
        res = x
    return res


@_mjit
def _log1p_unit(x):
    """log1p(x) for x in [0, 1] (NaN -> NaN), a few ulp, vectorisable."""
    u = 1.0 + x
    big = u > 1.4142135623730951
    v = u * 0.5 if big else u
    dk = 1.0 if big else 0.0
    f = v - 1.0                                   # exact
    s = f / (2.0 + f)
    z = s * s
    w = z * z
    t1 = w * (_LG2 + w * (_LG4 + w * _LG6))
    t2 = z * (_LG1 + w * (_LG3 + w * (_LG5 + w * _LG7)))
    r = t2 + t1
    hfsq = 0.5 * f * f
    logu = dk * _LN2_HI - ((hfsq - (s * (hfsq + r) + dk * _LN2_LO)) - f)
    d = u - 1.0
    # Goldberg's correction for the rounding of u = 1 + x
    return logu * (x / d) if d != 0.0 else x


# =========================================================================== activations (chunks)


@_jit
def _act_chunk(z, out, act):
    """out = g(z) on 1-D views (may alias)."""
    if out.ctypes.data == z.ctypes.data:
        _act_inplace(out, act)
        return
    n = z.shape[0]
    zero = out.dtype.type(0)
    if act == RELU:
        for i in range(n):
            v = z[i]
            out[i] = zero if v < zero else v      # NaN stays NaN, like np.maximum
    elif act == TANH:
        for i in range(n):
            out[i] = _tanh_dt(z[i])
    elif act == SIGMOID:
        for i in range(n):
            out[i] = _sigmoid_dt(z[i])
    else:
        for i in range(n):
            out[i] = z[i]


@_jit
def _act_grad_inplace(a, d, act):
    """d = d * g'(a) in place.

    The in-place case gets its own loop because LLVM guards a vectorised
    ``dz[i] = f(d[i])`` with a runtime overlap check that an exactly aliased
    ``dz is d`` fails: it then ran the scalar loop, whose ReLU branch is
    mispredicted half the time (~10x slower; a third of the S training step).
    With one array for input and output there is nothing to check.
    """
    n = a.shape[0]
    zero = d.dtype.type(0)
    one = d.dtype.type(1)
    if act == RELU:
        for i in range(n):
            d[i] = d[i] * (one if a[i] > zero else zero)
    elif act == TANH:
        for i in range(n):
            ai = a[i]
            d[i] = d[i] * (one - ai * ai)
    elif act == SIGMOID:
        for i in range(n):
            ai = a[i]
            d[i] = d[i] * (ai * (one - ai))


@_jit
def _act_grad_chunk(a, d, act, dz):
    """dz = d * g'(a) on 1-D views (dz may alias d); reference's operation order."""
    if dz.ctypes.data == d.ctypes.data:
        _act_grad_inplace(a, dz, act)
        return
    n = a.shape[0]
    zero = dz.dtype.type(0)
    one = dz.dtype.type(1)
    if act == RELU:
        for i in range(n):
            dz[i] = d[i] * (one if a[i] > zero else zero)
    elif act == TANH:
        for i in range(n):
            ai = a[i]
            dz[i] = d[i] * (one - ai * ai)
    elif act == SIGMOID:
        for i in range(n):
            ai = a[i]
            dz[i] = d[i] * (ai * (one - ai))
    else:
        for i in range(n):
            dz[i] = d[i]


@_jit
def _act_inplace(x, act):
    """x = g(x) on a 1-D view (one array: see _act_grad_inplace for why)."""
    n = x.shape[0]
    zero = x.dtype.type(0)
    if act == RELU:
        for i in range(n):
            v = x[i]
            x[i] = zero if v < zero else v
    elif act == TANH:
        for i in range(n):
            x[i] = _tanh_dt(x[i])
    elif act == SIGMOID:
        for i in range(n):
            x[i] = _sigmoid_dt(x[i])


@_jit
def _bias_act_rows(out, b, act, r0, r1):
    """out[r0:r1] = g(out[r0:r1] + b) in one pass.

    The rows are walked here rather than by calling a per-row helper: a call
    with array arguments costs 30-90 ns in Numba, as much as the arithmetic
    of a 64-128 wide row.
    """
    n = out.shape[1]
    if b.shape[0] == 0:
        if act != IDENTITY:
            _act_inplace(out.reshape(out.size)[r0 * n:r1 * n], act)
        return
    zero = out.dtype.type(0)
    if act == RELU:
        for i in range(r0, r1):
            row = out[i]
            for j in range(n):
                v = row[j] + b[j]
                row[j] = zero if v < zero else v
    elif act == TANH:
        for i in range(r0, r1):
            row = out[i]
            for j in range(n):
                row[j] = _tanh_dt(row[j] + b[j])
    elif act == SIGMOID:
        for i in range(r0, r1):
            row = out[i]
            for j in range(n):
                row[j] = _sigmoid_dt(row[j] + b[j])
    else:
        for i in range(r0, r1):
            row = out[i]
            for j in range(n):
                row[j] = row[j] + b[j]


@_pjit
def _bias_act_par(out, b, act, rows_per_chunk):
    m = out.shape[0]
    nch = (m + rows_per_chunk - 1) // rows_per_chunk
    for c in prange(nch):
        r0 = c * rows_per_chunk
        _bias_act_rows(out, b, act, r0, min(m, r0 + rows_per_chunk))


def _bad_act(act) -> ValueError:
    return ValueError(f"unknown activation code {act!r}; use one of IDENTITY=0, RELU=1, TANH=2, SIGMOID=3 "
                      "(fastdl.backends.contract.ACTIVATION_CODES)")


def _rows_per_chunk(m: int, n: int) -> int:
    return max(1, min(m, _CHUNK // max(n, 1)))


@_jit
def _part_lo(m, P, p):
    """First row of part p when m rows are cut into P parts (p == P gives m)."""
    return (m * p) // P


def _parts(m: int) -> int:
    """Number of row partitions of a reduction over m rows (shape-only)."""
    return max(1, min(_MAX_PARTS, m // _ROWS_PER_PART))


# =========================================================================== GEMM

_I32 = types.int32


def _gemm_signature(t):
    # (trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc): pointers passed as uintp
    return types.void(_I32, _I32, _I32, _I32, _I32, t, types.uintp, _I32, types.uintp, _I32, t, types.uintp, _I32)


_sgemm_rm = types.ExternalFunction("fastdl_sgemm_rm", _gemm_signature(types.float32))
_dgemm_rm = types.ExternalFunction("fastdl_dgemm_rm", _gemm_signature(types.float64))


def _numpy_gemm_standins() -> tuple[int, int]:
    """C-callable row-major GEMMs written with np.dot, for when fastdl._kernels is not built.

    Slow (they allocate), but they keep the Numba backend usable on its own.
    """
    from numba import carray, cfunc

    def make(nbt):
        @cfunc(types.void(_I32, _I32, _I32, _I32, _I32, nbt, types.CPointer(nbt), _I32, types.CPointer(nbt), _I32,
                          nbt, types.CPointer(nbt), _I32))
        def gemm(ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc):
            if M <= 0 or N <= 0:
                return
            c = carray(C, (M, ldc))[:, :N]
            if K <= 0:
                if beta == 0:
                    c[:, :] = 0
                return
            a = carray(A, (K, lda))[:, :M].T if ta else carray(A, (M, lda))[:, :K]
            b = carray(B, (N, ldb))[:, :K].T if tb else carray(B, (K, ldb))[:, :N]
            prod = np.dot(np.ascontiguousarray(a), np.ascontiguousarray(b))
            for i in range(M):
                for j in range(N):
                    c[i, j] = alpha * prod[i, j] + (beta * c[i, j] if beta != 0 else 0)
        return gemm

    _standins[:] = [make(types.float32), make(types.float64)]
    return _standins[0].address, _standins[1].address


_standins: list = []


def _register_gemm() -> None:
    try:
        from fastdl._kernels import _blas  # noqa: F401
    except ImportError:  # extensions not built
        s, d = _numpy_gemm_standins()
    else:
        from .blas import rowmajor_addresses

        s, d = rowmajor_addresses()   # FASTDL_BLAS=mkl without MKL: ImportError, the backend is unavailable
    llvmlite.binding.add_symbol("fastdl_sgemm_rm", s)
    llvmlite.binding.add_symbol("fastdl_dgemm_rm", d)


_register_gemm()


@_jit
def _gemm_rm(A, trans_a, B, trans_b, C, beta):
    """``C = op(A) @ op(B) + beta * C`` on C-contiguous 2-D arrays (op(X) = X.T when trans_x)."""
    M, N = C.shape
    K = A.shape[0] if trans_a else A.shape[1]
    if C.itemsize == 4:
        _sgemm_rm(_I32(trans_a), _I32(trans_b), _I32(M), _I32(N), _I32(K), np.float32(1.0), A.ctypes.data,
                  _I32(A.shape[1]), B.ctypes.data, _I32(B.shape[1]), np.float32(beta), C.ctypes.data, _I32(N))
    else:
        _dgemm_rm(_I32(trans_a), _I32(trans_b), _I32(M), _I32(N), _I32(K), 1.0, A.ctypes.data,
                  _I32(A.shape[1]), B.ctypes.data, _I32(B.shape[1]), np.float64(beta), C.ctypes.data, _I32(N))


# =========================================================================== dense


@_jit
def _dense_forward_serial(A_prev, W, b, act, out):
    _gemm_rm(A_prev, False, W, False, out, 0.0)
    _bias_act_rows(out, b, act, 0, out.shape[0])


@_jit
def _gemm(A, B, out):
    _gemm_rm(A, False, B, False, out, 0.0)


def dense_forward(A_prev, W, b, act: int, out) -> None:
    """``out = g(A_prev @ W + b)``: BLAS GEMM, then bias + activation in one pass."""
    if not 0 <= act <= 3:
        raise _bad_act(act)
    if act >= TANH and out.size >= _THR["bias_act"]:
        _gemm(A_prev, W, out)
        m, n = out.shape
        _bias_act_par(out, b, act, _rows_per_chunk(m, n))
    else:
        _dense_forward_serial(A_prev, W, b, act, out)


@_jit
def _dense_backward_impl(A_prev, W, out, dout, act, l2_over_m, dZ, dW, db, dA_prev):
    m, n = dZ.shape
    # one call over the whole (contiguous) batch: per-row calls cost more than the arithmetic
    _act_grad_chunk(out.reshape(out.size), dout.reshape(dout.size), act, dZ.reshape(dZ.size))
    if db.shape[0] != 0:
        acc = np.zeros(n, dtype=np.float64)
        for i in range(m):
            dzr = dZ[i]
            for j in range(n):
                acc[j] += dzr[j]
        for j in range(n):
            db[j] = acc[j]
    if l2_over_m != 0.0:  # dW = l2/m * W, then the GEMM accumulates onto it (beta = 1): no extra pass
        lam = dW.dtype.type(l2_over_m)
        for i in range(dW.shape[0]):
            dwr = dW[i]
            wr = W[i]
            for j in range(dwr.shape[0]):
                dwr[j] = lam * wr[j]
        _gemm_rm(A_prev, True, dZ, False, dW, 1.0)
    else:
        _gemm_rm(A_prev, True, dZ, False, dW, 0.0)
    if dA_prev.size != 0:
        _gemm_rm(dZ, False, W, True, dA_prev, 0.0)


def dense_backward(A_prev, W, out, dout, act: int, l2_over_m: float, dZ, dW, db, dA_prev) -> None:
    """``dZ = dout*g'(out)`` (with ``db`` in the same pass); ``dW``, ``dA_prev`` by BLAS."""
    if not 0 <= act <= 3:
        raise _bad_act(act)
    _dense_backward_impl(A_prev, W, out, dout, act, float(l2_over_m), dZ, dW, db, dA_prev)


# =========================================================================== activations


@_jit
def _act_fwd_serial(Z, act, out):
    _act_chunk(Z.reshape(Z.size), out.reshape(out.size), act)


@_pjit
def _act_fwd_par(Z, act, out):
    z = Z.reshape(Z.size)
    o = out.reshape(out.size)
    n = z.size
    nch = (n + _CHUNK - 1) // _CHUNK
    for c in prange(nch):
        lo = c * _CHUNK
        hi = min(n, lo + _CHUNK)
        _act_chunk(z[lo:hi], o[lo:hi], act)


@_jit
def _act_bwd_serial(out, dout, act, dZ):
    _act_grad_chunk(out.reshape(out.size), dout.reshape(dout.size), act, dZ.reshape(dZ.size))


@_pjit
def _act_bwd_par(out, dout, act, dZ):
    a = out.reshape(out.size)
    d = dout.reshape(dout.size)
    dz = dZ.reshape(dZ.size)
    n = a.size
    nch = (n + _CHUNK - 1) // _CHUNK
    for c in prange(nch):
        lo = c * _CHUNK
        hi = min(n, lo + _CHUNK)
        _act_grad_chunk(a[lo:hi], d[lo:hi], act, dz[lo:hi])


def activation_forward(Z, act: int, out) -> None:
    """``out = g(Z)`` (``out`` may alias ``Z``)."""
    if not 0 <= act <= 3:
        raise _bad_act(act)
    if Z.size >= (_THR["act_transcendental"] if act >= TANH else _THR["act_cheap"]):
        _act_fwd_par(Z, act, out)
    else:
        _act_fwd_serial(Z, act, out)


def activation_backward(out, dout, act: int, dZ) -> None:
    """``dZ = dout * g'(out)`` (``dZ`` may alias ``dout``)."""
    if not 0 <= act <= 3:
        raise _bad_act(act)
    if out.size >= _THR["act_cheap"]:
        _act_bwd_par(out, dout, act, dZ)
    else:
        _act_bwd_serial(out, dout, act, dZ)


# =========================================================================== batchnorm
#
# Statistics: float64, on data shifted by its first row K (robust to a large
# common offset). Rows are swept 8 at a time: the shifted sum and sum of
# squares of those 8 rows are formed in registers and added to per-feature
# accumulators once per sweep (instead of a load and a store of every
# accumulator per row, which bounded the old kernels). Each tile of
# _BN_TILE_ROWS rows gives a mean and M2 = q - s*s/nb; tiles, then the P row
# parts (shape-only), are merged in order with Chan's formula, so serial and
# parallel variants give the same bits. Shifting by a row of the data bounds
# the cancellation in q - s*s/nb: sum((z - K)^2) <= (m + 1) * M2, i.e. at most
# log2(m + 1) bits of the float64 result, far below float32 resolution and
# the float64 tests' 1e-12.
# Backward sums: float64 sum(dy) and sum(dy * (z - mean)) (z - mean is exact
# in float64, the product rounded once), scaled by inv_std once per feature;
# same 8-row sweeps.
# The element-wise passes (out, dZ) run in the array dtype: 8 float32 lanes
# per AVX2 vector and no conversions, where the float64 versions took about
# twice as long. Their per-feature coefficients are computed in float64 and
# rounded once, and the mean is subtracted as the float32 ``mean`` plus a
# correction folded into the constant term, so a large common offset cancels
# exactly (Sterbenz) instead of being rounded: out and dZ are within about 2
# float32 ulp of the magnitude of their terms (measured; 0.5 ulp of the result
# before), whatever the offset.
# Column blocking (statistics and output of a block of columns while it is in
# L2) was tried and lost everywhere: with the rows of a block 2^k bytes apart
# it maps onto a few L2 sets, and short row segments defeat the prefetchers.

_BN_TILE_ROWS = 64      # rows per Chan tile (the merge costs ~10 flops per feature per tile)


def _as_dtype_of(buf, like):
    """``buf`` (float64 scratch) reinterpreted as an array of ``like``'s dtype (njit only, below)."""
    return buf.view(like.dtype)


@overload(_as_dtype_of)
def _ov_as_dtype_of(buf, like):
    dt = np.dtype(str(like.dtype))

    def impl(buf, like):
        return buf.view(dt)
    return impl


@_jit
def _bn_tile_sums(Z, K, r0, r1, s, q):
    """s = sum(Z - K), q = sum((Z - K)^2) over rows [r0, r1), float64."""
    n = Z.shape[1]
    for j in range(n):
        s[j] = 0.0
        q[j] = 0.0
    i = r0
    while i + 8 <= r1:
        z0 = Z[i]
        z1 = Z[i + 1]
        z2 = Z[i + 2]
        z3 = Z[i + 3]
        z4 = Z[i + 4]
        z5 = Z[i + 5]
        z6 = Z[i + 6]
        z7 = Z[i + 7]
        for j in range(n):
            k = K[j]
            d0 = z0[j] - k
            d1 = z1[j] - k
            d2 = z2[j] - k
            d3 = z3[j] - k
            d4 = z4[j] - k
            d5 = z5[j] - k
            d6 = z6[j] - k
            d7 = z7[j] - k
            s[j] += ((d0 + d1) + (d2 + d3)) + ((d4 + d5) + (d6 + d7))
            q[j] += ((d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3)) + ((d4 * d4 + d5 * d5) + (d6 * d6 + d7 * d7))
        i += 8
    while i < r1:
        z0 = Z[i]
        for j in range(n):
            d0 = z0[j] - K[j]
            s[j] += d0
            q[j] += d0 * d0
        i += 1


@_jit
def _bn_stats_part(Z, K, r0, r1, pmean, pm2, s, q):
    """Shifted mean and M2 of rows [r0, r1) into pmean, pm2: Chan-merged tiles of _BN_TILE_ROWS rows."""
    n = Z.shape[1]
    cnt = 0
    for t0 in range(r0, r1, _BN_TILE_ROWS):
        t1 = min(t0 + _BN_TILE_ROWS, r1)
        nb = t1 - t0
        _bn_tile_sums(Z, K, t0, t1, s, q)
        if cnt == 0:
            for j in range(n):
                mb = s[j] / nb
                pmean[j] = mb
                pm2[j] = q[j] - s[j] * mb
        else:
            tot = cnt + nb
            wa = cnt * nb / tot
            fb = nb / tot
            for j in range(n):
                mb = s[j] / nb
                delta = mb - pmean[j]
                pmean[j] += delta * fb
                pm2[j] += (q[j] - s[j] * mb) + delta * delta * wa
        cnt += nb


@_jit
def _bn_merge(pmean, pm2, K, m, mu, var):
    """Merge per-part statistics in part order; undo the shift; var = M2 / m."""
    P, n = pmean.shape
    for j in range(n):
        mu[j] = pmean[0, j]
        var[j] = pm2[0, j]
    cnt = _part_lo(m, P, 1)
    for p in range(1, P):
        nb = _part_lo(m, P, p + 1) - _part_lo(m, P, p)
        tot = cnt + nb
        wa = cnt * nb / tot
        fb = nb / tot
        pmr = pmean[p]
        pm2r = pm2[p]
        for j in range(n):
            delta = pmr[j] - mu[j]
            mu[j] += delta * fb
            var[j] += pm2r[j] + delta * delta * wa
        cnt = tot
    for j in range(n):
        # max(): the rounding of q - s*s/nb can leave a tiny negative M2 on a constant feature
        var[j] = max(var[j] / cnt, 0.0)
        mu[j] += K[j]


@_jit
def _bn_finish_stats(gamma, beta, eps, momentum, running_mean, running_var, mean, inv_std, mu, var, a, c):
    """Write mean, inv_std and the running statistics; the output pass's coefficients a, c.

    Several short loops over few arrays each, so that every one vectorises
    (the sqrt and the division included). Overwrites var with float64 inv_std.
    """
    n = mu.shape[0]
    mom = running_mean.dtype.type(momentum)
    omm = 1.0 - momentum
    for j in range(n):
        # reference: momentum * running (array dtype) + (1 - momentum) * batch (float64)
        running_mean[j] = np.float64(mom * running_mean[j]) + omm * mu[j]
        running_var[j] = np.float64(mom * running_var[j]) + omm * var[j]
    for j in range(n):
        var[j] = 1.0 / np.sqrt(var[j] + eps)
    for j in range(n):
        mean[j] = mu[j]
        inv_std[j] = var[j]
    for j in range(n):
        # out = (z - mean) * a + c with mean the rounded mu: c = beta - (mu - mean) * a
        a64 = np.float64(gamma[j]) * var[j]
        a[j] = a64
        c[j] = beta[j] - (mu[j] - np.float64(mean[j])) * a64


@_jit
def _bn_out_rows(Z, mean, a, c, out, r0, r1):
    """out = (Z - mean) * a + c on rows [r0, r1), in the array dtype; 4 rows per sweep."""
    n = Z.shape[1]
    i = r0
    while i + 4 <= r1:
        z0 = Z[i]
        z1 = Z[i + 1]
        z2 = Z[i + 2]
        z3 = Z[i + 3]
        o0 = out[i]
        o1 = out[i + 1]
        o2 = out[i + 2]
        o3 = out[i + 3]
        for j in range(n):
            # all loads before the stores: with a row stride that is a multiple of 2 KiB, a store
            # to out row i followed by a load from Z row i+2 at the same column stalls (4K aliasing)
            x0 = z0[j]
            x1 = z1[j]
            x2 = z2[j]
            x3 = z3[j]
            h = mean[j]
            g = a[j]
            b = c[j]
            o0[j] = (x0 - h) * g + b
            o1[j] = (x1 - h) * g + b
            o2[j] = (x2 - h) * g + b
            o3[j] = (x3 - h) * g + b
        i += 4
    while i < r1:
        z0 = Z[i]
        o0 = out[i]
        for j in range(n):
            o0[j] = (z0[j] - mean[j]) * a[j] + c[j]
        i += 1


def bn_train_scratch_size(n: int, P: int) -> int:
    """float64 scratch elements of the BatchNorm training forward (serial or parallel)."""
    return n * (5 + 4 * P)


def bn_backward_scratch_size(n: int, P: int) -> int:
    """float64 scratch elements of the BatchNorm backward."""
    return n * (3 + 2 * P)


_scratch_local = threading.local()


def _scratch(size: int) -> np.ndarray:
    """A float64 work array of ``size`` elements, reused across calls (one per thread): the
    BatchNorm kernels' partial sums, so a training step allocates nothing."""
    buf = getattr(_scratch_local, "buf", None)
    if buf is None or buf.size < size:
        buf = np.empty(max(size, 1024))
        _scratch_local.buf = buf
    return buf[:size]


@_jit
def _bn_train_views(scratch, Z, P):
    """The forward's work arrays, carved from ``scratch`` (bn_train_scratch_size): K, per-part
    mean and M2, per-part tile sums, mu, var (float64), and a, c in Z's dtype."""
    n = Z.shape[1]
    K = scratch[:n]
    pmean = scratch[n:n + P * n].reshape((P, n))
    pm2 = scratch[n + P * n:n + 2 * P * n].reshape((P, n))
    ts = scratch[n + 2 * P * n:n + 3 * P * n].reshape((P, n))
    tq = scratch[n + 3 * P * n:n + 4 * P * n].reshape((P, n))
    r = scratch[n + 4 * P * n:]
    a = _as_dtype_of(r[2 * n:3 * n], Z)[:n]
    c = _as_dtype_of(r[3 * n:4 * n], Z)[:n]
    return K, pmean, pm2, ts, tq, r[:n], r[n:2 * n], a, c


@_jit
def _bn_shift(Z, K):
    z0 = Z[0]
    for j in range(K.shape[0]):
        K[j] = z0[j]
    return K


@_jit
def _bn_train_serial(Z, gamma, beta, eps, momentum, running_mean, running_var, mean, inv_std, out,
                     P, tile_rows, scratch):
    # tile_rows is not used any more (tiles are _BN_TILE_ROWS rows); kept for the callers
    m = Z.shape[0]
    K, pmean, pm2, ts, tq, mu, var, a, c = _bn_train_views(scratch, Z, P)
    _bn_shift(Z, K)
    for p in range(P):
        _bn_stats_part(Z, K, _part_lo(m, P, p), _part_lo(m, P, p + 1), pmean[p], pm2[p], ts[0], tq[0])
    _bn_merge(pmean, pm2, K, m, mu, var)
    _bn_finish_stats(gamma, beta, eps, momentum, running_mean, running_var, mean, inv_std, mu, var, a, c)
    _bn_out_rows(Z, mean, a, c, out, 0, m)


@_pjit
def _bn_train_par(Z, gamma, beta, eps, momentum, running_mean, running_var, mean, inv_std, out,
                  P, tile_rows, rows_per_chunk, scratch):
    m = Z.shape[0]
    K, pmean, pm2, ts, tq, mu, var, a, c = _bn_train_views(scratch, Z, P)
    _bn_shift(Z, K)
    for p in prange(P):
        _bn_stats_part(Z, K, _part_lo(m, P, p), _part_lo(m, P, p + 1), pmean[p], pm2[p], ts[p], tq[p])
    _bn_merge(pmean, pm2, K, m, mu, var)
    _bn_finish_stats(gamma, beta, eps, momentum, running_mean, running_var, mean, inv_std, mu, var, a, c)
    nch = (m + rows_per_chunk - 1) // rows_per_chunk
    for ch in prange(nch):
        r0 = ch * rows_per_chunk
        _bn_out_rows(Z, mean, a, c, out, r0, min(m, r0 + rows_per_chunk))


def batchnorm_forward_train(Z, gamma, beta, eps: float, momentum: float,
                            running_mean, running_var, mean, inv_std, out) -> None:
    """Batch statistics (float64, shifted, Chan-merged tiles), running update, normalised output."""
    m, n = Z.shape
    if m == 0:
        raise ValueError("batchnorm_forward_train: empty batch (Z has 0 rows); batch statistics are undefined")
    P = _parts(m)
    if Z.size >= _THR["batchnorm"]:
        _bn_train_par(Z, gamma, beta, float(eps), float(momentum), running_mean, running_var, mean, inv_std,
                      out, P, 0, _rows_per_chunk(m, n), _scratch(bn_train_scratch_size(n, P)))
    else:
        _bn_train_serial(Z, gamma, beta, float(eps), float(momentum), running_mean, running_var, mean,
                         inv_std, out, P, 0, _scratch(bn_train_scratch_size(n, P)))


@_jit
def _bn_infer_rows(Z, gamma, beta, rm, sd, out, r0, r1):
    n = Z.shape[1]
    for i in range(r0, r1):
        zr = Z[i]
        orow = out[i]
        for j in range(n):
            # reference order: gamma * (Z - running_mean) / sqrt(running_var + eps) + beta
            orow[j] = gamma[j] * (zr[j] - rm[j]) / sd[j] + beta[j]


@_jit
def _bn_sd(running_var, eps):
    e = running_var.dtype.type(eps)
    sd = np.empty_like(running_var)
    for j in range(running_var.shape[0]):
        sd[j] = np.sqrt(running_var[j] + e)
    return sd


@_jit
def _bn_infer_serial(Z, gamma, beta, running_mean, running_var, eps, out):
    sd = _bn_sd(running_var, eps)
    _bn_infer_rows(Z, gamma, beta, running_mean, sd, out, 0, Z.shape[0])


@_pjit
def _bn_infer_par(Z, gamma, beta, running_mean, running_var, eps, out, rows_per_chunk):
    sd = _bn_sd(running_var, eps)
    m = Z.shape[0]
    nch = (m + rows_per_chunk - 1) // rows_per_chunk
    for c in prange(nch):
        r0 = c * rows_per_chunk
        _bn_infer_rows(Z, gamma, beta, running_mean, sd, out, r0, min(m, r0 + rows_per_chunk))


def batchnorm_forward_infer(Z, gamma, beta, running_mean, running_var, eps: float, out) -> None:
    """``out = gamma*(Z - running_mean)/sqrt(running_var + eps) + beta``."""
    if Z.size >= _THR["batchnorm_infer"]:
        m, n = Z.shape
        _bn_infer_par(Z, gamma, beta, running_mean, running_var, float(eps), out, _rows_per_chunk(m, n))
    else:
        _bn_infer_serial(Z, gamma, beta, running_mean, running_var, float(eps), out)


@_jit
def _bn_bwd_part(Z, mean, dout, r0, r1, pdg, pdb):
    """pdb = sum(dy), pdg = sum(dy * (z - mean)) over rows [r0, r1), float64; 8 rows per sweep."""
    n = Z.shape[1]
    for j in range(n):
        pdg[j] = 0.0
        pdb[j] = 0.0
    i = r0
    while i + 8 <= r1:
        z0 = Z[i]
        z1 = Z[i + 1]
        z2 = Z[i + 2]
        z3 = Z[i + 3]
        z4 = Z[i + 4]
        z5 = Z[i + 5]
        z6 = Z[i + 6]
        z7 = Z[i + 7]
        e0 = dout[i]
        e1 = dout[i + 1]
        e2 = dout[i + 2]
        e3 = dout[i + 3]
        e4 = dout[i + 4]
        e5 = dout[i + 5]
        e6 = dout[i + 6]
        e7 = dout[i + 7]
        for j in range(n):
            u = np.float64(mean[j])
            y0 = np.float64(e0[j])
            y1 = np.float64(e1[j])
            y2 = np.float64(e2[j])
            y3 = np.float64(e3[j])
            y4 = np.float64(e4[j])
            y5 = np.float64(e5[j])
            y6 = np.float64(e6[j])
            y7 = np.float64(e7[j])
            pdb[j] += ((y0 + y1) + (y2 + y3)) + ((y4 + y5) + (y6 + y7))
            pdg[j] += (((y0 * (z0[j] - u) + y1 * (z1[j] - u)) + (y2 * (z2[j] - u) + y3 * (z3[j] - u)))
                       + ((y4 * (z4[j] - u) + y5 * (z5[j] - u)) + (y6 * (z6[j] - u) + y7 * (z7[j] - u))))
        i += 8
    while i < r1:
        z0 = Z[i]
        e0 = dout[i]
        for j in range(n):
            y0 = np.float64(e0[j])
            pdb[j] += y0
            pdg[j] += y0 * (z0[j] - np.float64(mean[j]))
        i += 1


@_jit
def _bn_bwd_merge(pdg, pdb, gamma, inv_std, m, dgamma, dbeta, A, B, C):
    """Merge the part sums in part order (into part 0); dgamma, dbeta and the dZ coefficients.
    Short loops over few arrays each, so that every one vectorises."""
    P, n = pdg.shape
    dg = pdg[0]
    db = pdb[0]
    for p in range(1, P):
        pgr = pdg[p]
        pbr = pdb[p]
        for j in range(n):
            dg[j] += pgr[j]
            db[j] += pbr[j]
    for j in range(n):
        dg[j] *= np.float64(inv_std[j])       # sum(dy * (z - mean)) * inv_std = sum(dy * x_hat)
    for j in range(n):
        dgamma[j] = dg[j]
        dbeta[j] = db[j]
    mt = gamma.dtype.type(m)
    for j in range(n):
        # reference: c = gamma * inv_std / m in the array dtype; dZ = c * (m*dy - dbeta - x_hat*dgamma)
        cf = np.float64((gamma[j] * inv_std[j]) / mt)
        A[j] = cf * m
        B[j] = cf * dg[j] * np.float64(inv_std[j])
        C[j] = cf * db[j]


@_jit
def _bn_bwd_rows(Z, mean, dout, dZ, A, B, C, r0, r1):
    """dZ = A*dy - B*(z - mean) - C on rows [r0, r1), in the array dtype; 4 rows per sweep.
    Each dout element is read before the dZ element (which may alias it) is written."""
    n = Z.shape[1]
    i = r0
    while i + 4 <= r1:
        z0 = Z[i]
        z1 = Z[i + 1]
        z2 = Z[i + 2]
        z3 = Z[i + 3]
        e0 = dout[i]
        e1 = dout[i + 1]
        e2 = dout[i + 2]
        e3 = dout[i + 3]
        o0 = dZ[i]
        o1 = dZ[i + 1]
        o2 = dZ[i + 2]
        o3 = dZ[i + 3]
        for j in range(n):
            # all loads before the stores (4K aliasing, see _bn_out_rows)
            x0 = z0[j] - mean[j]
            x1 = z1[j] - mean[j]
            x2 = z2[j] - mean[j]
            x3 = z3[j] - mean[j]
            y0 = e0[j]
            y1 = e1[j]
            y2 = e2[j]
            y3 = e3[j]
            a = A[j]
            b = B[j]
            c = C[j]
            o0[j] = (a * y0 - b * x0) - c
            o1[j] = (a * y1 - b * x1) - c
            o2[j] = (a * y2 - b * x2) - c
            o3[j] = (a * y3 - b * x3) - c
        i += 4
    while i < r1:
        z0 = Z[i]
        e0 = dout[i]
        o0 = dZ[i]
        for j in range(n):
            o0[j] = (A[j] * e0[j] - B[j] * (z0[j] - mean[j])) - C[j]
        i += 1


@_jit
def _bn_bwd_views(scratch, Z, P):
    """The backward's work arrays, carved from ``scratch`` (bn_backward_scratch_size): per-part
    sums (float64) and the dZ coefficients A, B, C in Z's dtype."""
    n = Z.shape[1]
    pdg = scratch[:P * n].reshape((P, n))
    pdb = scratch[P * n:2 * P * n].reshape((P, n))
    r = scratch[2 * P * n:]
    return (pdg, pdb, _as_dtype_of(r[:n], Z)[:n], _as_dtype_of(r[n:2 * n], Z)[:n],
            _as_dtype_of(r[2 * n:3 * n], Z)[:n])


@_jit
def _bn_bwd_serial(Z, gamma, mean, inv_std, dout, dZ, dgamma, dbeta, P, scratch):
    m = Z.shape[0]
    pdg, pdb, A, B, C = _bn_bwd_views(scratch, Z, P)
    for p in range(P):
        _bn_bwd_part(Z, mean, dout, _part_lo(m, P, p), _part_lo(m, P, p + 1), pdg[p], pdb[p])
    _bn_bwd_merge(pdg, pdb, gamma, inv_std, m, dgamma, dbeta, A, B, C)
    _bn_bwd_rows(Z, mean, dout, dZ, A, B, C, 0, m)


@_pjit
def _bn_bwd_par(Z, gamma, mean, inv_std, dout, dZ, dgamma, dbeta, P, rows_per_chunk, scratch):
    m = Z.shape[0]
    pdg, pdb, A, B, C = _bn_bwd_views(scratch, Z, P)
    for p in prange(P):
        _bn_bwd_part(Z, mean, dout, _part_lo(m, P, p), _part_lo(m, P, p + 1), pdg[p], pdb[p])
    _bn_bwd_merge(pdg, pdb, gamma, inv_std, m, dgamma, dbeta, A, B, C)
    nch = (m + rows_per_chunk - 1) // rows_per_chunk
    for ch in prange(nch):
        r0 = ch * rows_per_chunk
        _bn_bwd_rows(Z, mean, dout, dZ, A, B, C, r0, min(m, r0 + rows_per_chunk))


def batchnorm_backward(Z, gamma, mean, inv_std, dout, dZ, dgamma, dbeta) -> None:
    """Two passes: per-feature sums (float64), then ``dZ`` (may alias ``dout``)."""
    m, n = Z.shape
    if m == 0:
        raise ValueError("batchnorm_backward: empty batch (Z has 0 rows)")
    P = _parts(m)
    if Z.size >= _THR["batchnorm"]:
        _bn_bwd_par(Z, gamma, mean, inv_std, dout, dZ, dgamma, dbeta, P, _rows_per_chunk(m, n),
                    _scratch(bn_backward_scratch_size(n, P)))
    else:
        _bn_bwd_serial(Z, gamma, mean, inv_std, dout, dZ, dgamma, dbeta, P, _scratch(bn_backward_scratch_size(n, P)))


# =========================================================================== losses


@_jit
def _sce_rows(Z, y, dZ, do_grad, r0, r1, buf, ssum, shift):
    """Sum over rows [r0, r1) of logsumexp(z) - z_y; dZ rows if do_grad.

    Returns (loss_sum, number_of_bad_labels); a row with a bad label is
    skipped (the wrapper raises). One exp per element, in the array's
    precision: the row's exp(z - max) is kept in ``buf`` and reused for dZ.
    The row sums go to ``ssum`` and ``max - z_y`` to ``shift`` (float64), and
    their logs are taken afterwards in one vectorised loop.
    """
    m, k = Z.shape
    mf = np.float64(m)
    bad = 0
    for i in range(r0, r1):
        yi = y[i]
        if yi < 0 or yi >= k:
            bad += 1
            ssum[i] = 1.0
            shift[i] = 0.0
            continue
        zr = Z[i]
        if k <= 16:
            # rows this short are reduced inline: a call to the vectorised
            # helpers (array arguments, refcounts) costs more than the row
            mxt = buf.dtype.type(-np.inf)
            for j in range(k):
                v = zr[j]
                mxt = v if v > mxt else mxt
            mx = np.float64(mxt)
        else:
            mx = _max64(zr)
            mxt = buf.dtype.type(mx)
        for j in range(k):
            buf[j] = _exp_dt(zr[j] - mxt)        # a NaN in the row makes s NaN: all NaN
        if k <= 16:
            s = 0.0
            for j in range(k):
                s += np.float64(buf[j])
        else:
            s = _sum64(buf)
        ssum[i] = s
        shift[i] = mx - np.float64(zr[yi])
        if do_grad:
            q = 1.0 / s
            qm = q / mf
            dzr = dZ[i]
            for j in range(k):
                dzr[j] = np.float64(buf[j]) * qm
            dzr[yi] = (np.float64(buf[yi]) * q - 1.0) / mf
    loss = 0.0
    for i in range(r0, r1):
        loss += _log64(ssum[i]) + shift[i]
    return loss, bad


@_jit
def _sce_serial(Z, y, dZ, do_grad, nparts):
    # same partial sums, in the same order, as _sce_par: identical loss bits
    m = Z.shape[0]
    buf = np.empty(Z.shape[1], dtype=Z.dtype)
    ssum = np.empty(m)
    shift = np.empty(m)
    tot = 0.0
    nb = 0
    for p in range(nparts):
        lo, bd = _sce_rows(Z, y, dZ, do_grad, _part_lo(m, nparts, p), _part_lo(m, nparts, p + 1), buf, ssum,
                           shift)
        tot += lo
        nb += bd
    return tot, nb


@_pjit
def _sce_par(Z, y, dZ, do_grad, nparts):
    m, k = Z.shape
    losses = np.zeros(nparts)
    bads = np.zeros(nparts, dtype=np.int64)
    ssum = np.empty(m)
    shift = np.empty(m)
    for p in prange(nparts):
        buf = np.empty(k, dtype=Z.dtype)
        lo, bd = _sce_rows(Z, y, dZ, do_grad, _part_lo(m, nparts, p), _part_lo(m, nparts, p + 1), buf, ssum,
                           shift)
        losses[p] = lo
        bads[p] = bd
    tot = 0.0
    nb = 0
    for p in range(nparts):
        tot += losses[p]
        nb += bads[p]
    return tot, nb


def _label_error(y, k):
    bad = y[(y < 0) | (y >= k)]
    return ValueError(f"softmax_cross_entropy: labels must be class ids in [0, {k}); got {bad[:5].tolist()}"
                      f"{' ...' if bad.size > 5 else ''} ({bad.size} out of range)")


def softmax_cross_entropy(Z, y, dZ) -> float:
    """Mean of ``logsumexp(z) - z_y`` (float64); ``dZ = (softmax(Z) - onehot(y)) / m`` unless empty."""
    m, k = Z.shape
    nparts = _parts(m)
    if nparts > 1 and Z.size >= _THR["softmax"]:
        total, bad = _sce_par(Z, y, dZ, dZ.size != 0, nparts)
    else:
        total, bad = _sce_serial(Z, y, dZ, dZ.size != 0, nparts)
    if bad:
        raise _label_error(y, k)
    return total / m if m else float("nan")


@_jit
def _softmax_rows(Z, out, r0, r1, buf):
    k = Z.shape[1]
    for i in range(r0, r1):
        zr = Z[i]
        mxt = buf.dtype.type(_max64(zr))
        for j in range(k):
            buf[j] = _exp_dt(zr[j] - mxt)      # in the array's precision, like the reference
        q = out.dtype.type(1.0 / _sum64(buf))
        orow = out[i]                          # written after Z's row is read: out may alias Z
        for j in range(k):
            orow[j] = buf[j] * q


@_jit
def _softmax_serial(Z, out):
    _softmax_rows(Z, out, 0, Z.shape[0], np.empty(Z.shape[1], dtype=Z.dtype))


@_pjit
def _softmax_par(Z, out, rows_per_chunk):
    m, k = Z.shape
    nch = (m + rows_per_chunk - 1) // rows_per_chunk
    for c in prange(nch):
        r0 = c * rows_per_chunk
        _softmax_rows(Z, out, r0, min(m, r0 + rows_per_chunk), np.empty(k, dtype=Z.dtype))


def softmax(Z, out) -> None:
    """Row-wise max-shifted softmax (``exp`` in the array dtype, the row sum in float64)."""
    m, k = Z.shape
    if Z.size >= _THR["softmax"] and m >= 2:
        _softmax_par(Z, out, max(1, min(m // 2, _rows_per_chunk(m, k))))
    else:
        _softmax_serial(Z, out)


@_jit
def _sigmoid_bce_impl(Z, y, dZ):
    m = Z.shape[0]
    mf = np.float64(m)
    z = Z.reshape(m)                      # (m, 1) C-contiguous -> (m,) view
    do_grad = dZ.size != 0
    dz = dZ.reshape(dZ.size)
    terms = np.empty(m)
    for i in range(m):
        zi = np.float64(z[i])
        t = np.float64(y[i])
        e = _exp64(-abs(zi))
        zp = 0.0 if zi < 0.0 else zi      # np.maximum(z, 0): NaN stays NaN
        terms[i] = zp - zi * t + _log1p_unit(e)
        if do_grad:
            # sigmoid(z) from the same e, as reference._apply_activation computes it
            p = 1.0 / (1.0 + e) if zi >= 0 else e / (1.0 + e)
            dz[i] = (p - t) / mf
    return _sum64(terms) / mf


def sigmoid_bce(Z, y, dZ) -> float:
    """Stable fused sigmoid + binary cross-entropy (mean over rows); ``dZ = (sigmoid(z) - y)/m``."""
    return _sigmoid_bce_impl(Z, y, dZ)


@_rjit
def _sqdiff_sum(a, b):
    """sum((a - b)**2) in float64 over flat arrays (reassociation: vectorised, fixed order)."""
    s = 0.0
    for i in range(a.shape[0]):
        d = np.float64(a[i]) - np.float64(b[i])
        s += d * d
    return s


@_jit
def _mse_impl(Yhat, Y, dZ):
    m = Yhat.shape[0]
    mf = np.float64(m)
    a = Yhat.reshape(Yhat.size)
    b = Y.reshape(Y.size)
    if dZ.size != 0:
        dz = dZ.reshape(dZ.size)
        inv_m = 1.0 / mf                          # (yhat - y)/m to within an ulp, without a divide
        for i in range(a.shape[0]):
            dz[i] = (np.float64(a[i]) - np.float64(b[i])) * inv_m
    return 0.5 * _sqdiff_sum(a, b) / mf


def mse(Yhat, Y, dZ) -> float:
    """``0.5*||yhat - y||^2`` averaged over rows; ``dZ = (yhat - y)/m``."""
    return _mse_impl(Yhat, Y, dZ)


# =========================================================================== dropout


@_jit
def _dropout_fwd_chunk(a, base, key, thr, kp, mask, out):
    """Elements base .. base+len(a)-1 (flat, row-major) of the contract's generator."""
    zero = out.dtype.type(0)
    one = out.dtype.type(1)
    b1 = np.uint64(base + 1)
    for i in range(a.shape[0]):
        x = key + (b1 + np.uint64(i)) * _U_G
        x ^= x >> _U_S30
        x *= _U_C1
        x ^= x >> _U_S27
        x *= _U_C2
        x ^= x >> _U_S31
        keep = (x >> _U_S32) < thr
        mask[i] = np.uint8(1) if keep else np.uint8(0)
        # reference: A * mask / keep_prob, in the array dtype
        out[i] = (a[i] * (one if keep else zero)) / kp


@_jit
def _dropout_fwd_serial(A, key, thr, keep_prob, mask, out):
    _dropout_fwd_chunk(A.reshape(A.size), 0, key, thr, out.dtype.type(keep_prob), mask.reshape(mask.size),
                       out.reshape(out.size))


@_pjit
def _dropout_fwd_par(A, key, thr, keep_prob, mask, out):
    kp = out.dtype.type(keep_prob)
    a = A.reshape(A.size)
    mk = mask.reshape(mask.size)
    o = out.reshape(out.size)
    n = a.size
    nch = (n + _CHUNK - 1) // _CHUNK
    for c in prange(nch):
        lo = c * _CHUNK
        hi = min(n, lo + _CHUNK)
        _dropout_fwd_chunk(a[lo:hi], lo, key, thr, kp, mk[lo:hi], o[lo:hi])


def dropout_forward(A, keep_prob: float, seed: int, step: int, layer: int, mask, out) -> None:
    """Counter-based mask (bit-identical to the reference) + apply + 1/keep_prob, one pass."""
    key = np.uint64(dropout_key(seed, step, layer))
    thr = np.uint64(keep_threshold(keep_prob))
    if A.size >= _THR["dropout"]:
        _dropout_fwd_par(A, key, thr, float(keep_prob), mask, out)
    else:
        _dropout_fwd_serial(A, key, thr, float(keep_prob), mask, out)


@_jit
def _dropout_bwd_chunk(d, mask, kp, dA):
    for i in range(d.shape[0]):
        dA[i] = (d[i] * mask[i]) / kp


@_jit
def _dropout_bwd_serial(dout, mask, keep_prob, dA):
    _dropout_bwd_chunk(dout.reshape(dout.size), mask.reshape(mask.size), dA.dtype.type(keep_prob),
                       dA.reshape(dA.size))


@_pjit
def _dropout_bwd_par(dout, mask, keep_prob, dA):
    kp = dA.dtype.type(keep_prob)
    d = dout.reshape(dout.size)
    mk = mask.reshape(mask.size)
    o = dA.reshape(dA.size)
    n = d.size
    nch = (n + _CHUNK - 1) // _CHUNK
    for c in prange(nch):
        lo = c * _CHUNK
        hi = min(n, lo + _CHUNK)
        _dropout_bwd_chunk(d[lo:hi], mk[lo:hi], kp, o[lo:hi])


def dropout_backward(dout, mask, keep_prob: float, dA) -> None:
    """``dA = dout * mask / keep_prob`` (``dA`` may alias ``dout``)."""
    if dout.size >= _THR["dropout"]:
        _dropout_bwd_par(dout, mask, float(keep_prob), dA)
    else:
        _dropout_bwd_serial(dout, mask, float(keep_prob), dA)


# =========================================================================== optimisers
# Element-wise arithmetic in the array dtype. SGD, momentum and RMSprop use
# the reference's operation order (float32 results match NumPy bit for bit);
# Adam folds its bias corrections into two scalars computed once, outside the
# loop (agrees with the reference to a few ulp per step).


@_jit
def _sgd_chunk(p, g, lr):
    for i in range(p.shape[0]):
        p[i] -= lr * g[i]


@_jit
def _sgd_serial(p, g, lr):
    _sgd_chunk(p, g, p.dtype.type(lr))


@_pjit
def _sgd_par(p, g, lr):
    lr_ = p.dtype.type(lr)
    n = p.size
    nch = (n + _CHUNK - 1) // _CHUNK
    for c in prange(nch):
        lo = c * _CHUNK
        hi = min(n, lo + _CHUNK)
        _sgd_chunk(p[lo:hi], g[lo:hi], lr_)


def sgd_step(params, grads, lr: float) -> None:
    """``params -= lr * grads``."""
    if params.size >= _THR["optimizer"]:
        _sgd_par(params, grads, float(lr))
    else:
        _sgd_serial(params, grads, float(lr))


@_jit
def _mom_chunk(p, g, v, b, omb, scale):
    for i in range(p.shape[0]):
        vi = b * v[i] + omb * g[i]
        v[i] = vi
        p[i] -= scale * vi


@_jit
def _mom_serial(p, g, v, beta, omb, scale):
    t = p.dtype.type
    _mom_chunk(p, g, v, t(beta), t(omb), t(scale))


@_pjit
def _mom_par(p, g, v, beta, omb, scale):
    t = p.dtype.type
    b_ = t(beta)
    omb_ = t(omb)
    sc_ = t(scale)
    n = p.size
    nch = (n + _CHUNK - 1) // _CHUNK
    for c in prange(nch):
        lo = c * _CHUNK
        hi = min(n, lo + _CHUNK)
        _mom_chunk(p[lo:hi], g[lo:hi], v[lo:hi], b_, omb_, sc_)


def momentum_step(params, grads, v, lr: float, beta: float, t: int, bias_correction: bool) -> None:
    """``v = beta*v + (1-beta)*g``; ``params -= lr/(1-beta**t) * v`` (or ``lr * v``)."""
    beta = float(beta)
    scale = float(lr) / (1 - beta ** t) if bias_correction else float(lr)
    if params.size >= _THR["optimizer"]:
        _mom_par(params, grads, v, beta, 1 - beta, scale)
    else:
        _mom_serial(params, grads, v, beta, 1 - beta, scale)


@_jit
def _rms_chunk(p, g, s, b2, omb2, lr, eps):
    for i in range(p.shape[0]):
        gi = g[i]
        si = b2 * s[i] + omb2 * gi * gi
        s[i] = si
        p[i] -= lr * gi / (np.sqrt(si) + eps)


@_jit
def _rms_serial(p, g, s, lr, b2, omb2, eps):
    t = p.dtype.type
    _rms_chunk(p, g, s, t(b2), t(omb2), t(lr), t(eps))


@_pjit
def _rms_par(p, g, s, lr, b2, omb2, eps):
    t = p.dtype.type
    b2_ = t(b2)
    omb2_ = t(omb2)
    lr_ = t(lr)
    eps_ = t(eps)
    n = p.size
    nch = (n + _CHUNK - 1) // _CHUNK
    for c in prange(nch):
        lo = c * _CHUNK
        hi = min(n, lo + _CHUNK)
        _rms_chunk(p[lo:hi], g[lo:hi], s[lo:hi], b2_, omb2_, lr_, eps_)


def rmsprop_step(params, grads, s, lr: float, beta2: float, eps: float) -> None:
    """``s = beta2*s + (1-beta2)*g^2``; ``params -= lr*g/(sqrt(s)+eps)``."""
    beta2 = float(beta2)
    if params.size >= _THR["optimizer"]:
        _rms_par(params, grads, s, float(lr), beta2, 1 - beta2, float(eps))
    else:
        _rms_serial(params, grads, s, float(lr), beta2, 1 - beta2, float(eps))


@_jit
def _adam_chunk(p, g, v, s, b1, omb1, b2, omb2, step, inv_bc2, eps):
    # The moments in the reference's order; the update as lr/(1-beta1^t) * v /
    # (sqrt(s * 1/(1-beta2^t)) + eps): one division and one square root per
    # element (the reference's three divisions made this divider-bound).
    for i in range(p.shape[0]):
        gi = g[i]
        vi = b1 * v[i] + omb1 * gi
        si = b2 * s[i] + omb2 * gi * gi
        v[i] = vi
        s[i] = si
        p[i] -= step * vi / (np.sqrt(si * inv_bc2) + eps)


@_jit
def _adam_serial(p, g, v, s, b1, omb1, b2, omb2, step, inv_bc2, eps):
    t = p.dtype.type
    _adam_chunk(p, g, v, s, t(b1), t(omb1), t(b2), t(omb2), t(step), t(inv_bc2), t(eps))


@_pjit
def _adam_par(p, g, v, s, b1, omb1, b2, omb2, step, inv_bc2, eps):
    t = p.dtype.type
    b1_ = t(b1)
    omb1_ = t(omb1)
    b2_ = t(b2)
    omb2_ = t(omb2)
    step_ = t(step)
    ibc2_ = t(inv_bc2)
    eps_ = t(eps)
    n = p.size
    nch = (n + _CHUNK - 1) // _CHUNK
    for c in prange(nch):
        lo = c * _CHUNK
        hi = min(n, lo + _CHUNK)
        _adam_chunk(p[lo:hi], g[lo:hi], v[lo:hi], s[lo:hi], b1_, omb1_, b2_, omb2_, step_, ibc2_, eps_)


def adam_step(params, grads, v, s, lr: float, beta1: float, beta2: float, eps: float, t: int) -> None:
    """Fused Adam: both moments, bias correction (computed once, outside the loop) and the update in one pass."""
    beta1 = float(beta1)
    beta2 = float(beta2)
    step = float(lr) / (1 - beta1 ** t)
    inv_bc2 = 1.0 / (1 - beta2 ** t)
    if params.size >= _THR["adam"]:
        _adam_par(params, grads, v, s, beta1, 1 - beta1, beta2, 1 - beta2, step, inv_bc2, float(eps))
    else:
        _adam_serial(params, grads, v, s, beta1, 1 - beta1, beta2, 1 - beta2, step, inv_bc2, float(eps))


# =========================================================================== reductions


@_rjit
def _ssq_chunk(x):
    """Sum of squares in float64 (reassociation allowed only here: a vectorised, fixed order)."""
    s = 0.0
    for i in range(x.shape[0]):
        a = np.float64(x[i])
        s += a * a
    return s


@_rjit
def _all_finite(x):
    """True if no element of the 1-D array is NaN or infinite.

    ``x * 0`` is 0 for every finite value and NaN otherwise; summed in the
    array's dtype with reassociation this is one vectorised pass, 4-8x
    cheaper than the float64 sum of squares (the fused epoch's per-step
    divergence check).
    """
    acc = x.dtype.type(0)
    for i in range(x.shape[0]):
        acc += x[i] * x.dtype.type(0)
    return acc == 0


@_jit
def _ssq_serial(x):
    xf = x.reshape(x.size)
    n = xf.size
    nch = (n + _RED_CHUNK - 1) // _RED_CHUNK
    tot = 0.0
    for c in range(nch):
        lo = c * _RED_CHUNK
        tot += _ssq_chunk(xf[lo:min(n, lo + _RED_CHUNK)])
    return tot


@_pjit
def _ssq_par(x):
    xf = x.reshape(x.size)
    n = xf.size
    nch = (n + _RED_CHUNK - 1) // _RED_CHUNK
    parts = np.empty(nch)
    for c in prange(nch):
        lo = c * _RED_CHUNK
        parts[c] = _ssq_chunk(xf[lo:min(n, lo + _RED_CHUNK)])
    tot = 0.0
    for c in range(nch):
        tot += parts[c]
    return tot


def sum_squares(x) -> float:
    """``sum(x**2)`` accumulated in float64 (same chunking serial or parallel)."""
    if x.size >= _THR["sum_squares"]:
        return float(_ssq_par(x))
    return float(_ssq_serial(x))


def all_finite(x) -> bool:
    """True if no element of the 1-D array is NaN or infinite (one vectorised pass)."""
    return bool(_all_finite(x.reshape(x.size)))


# =========================================================================== warm-up


def warmup(dtypes=(np.float32, np.float64)) -> None:
    """Compile (or load from Numba's on-disk cache) every kernel variant for ``dtypes``.

    Optional: kernels compile on first use anyway. Useful before timing, or
    to pay the compile cost up front. Runs both the serial and the parallel
    variant of every kernel on tiny arrays; the thresholds are restored.
    """
    saved_public, saved_active = dict(PARALLEL_THRESHOLDS), dict(_THR)
    try:
        for parallel in (False, True):
            if parallel:
                _THR.update({k: 0 for k in _THR})
            else:
                _THR.update({k: _NEVER for k in _THR})
            for dt in dtypes:
                _warmup_one(np.dtype(dt))
    finally:
        PARALLEL_THRESHOLDS.clear()
        PARALLEL_THRESHOLDS.update(saved_public)
        _THR.clear()
        _THR.update(saved_active)


def _warmup_one(dt) -> None:
    m, n = 2 * _ROWS_PER_PART, 9               # m gives the losses two row partitions
    rng = np.random.default_rng(0)
    A = rng.standard_normal((m, n)).astype(dt)
    W = rng.standard_normal((n, n)).astype(dt)
    b = np.zeros(n, dt)
    out = np.empty((m, n), dt)
    for act in (IDENTITY, RELU, TANH, SIGMOID):
        dense_forward(A, W, b, act, out)
        dense_forward(A, W, b[:0], act, out)
        activation_forward(A, act, out)
        activation_backward(out, A, act, out.copy())
    dense_backward(A, W, out, out.copy(), RELU, 0.1, np.empty_like(out), np.empty_like(W), b.copy(),
                   np.empty_like(A))
    dense_backward(A, W, out, out.copy(), RELU, 0.0, np.empty_like(out), np.empty_like(W), b[:0],
                   np.empty((0, 0), dt))
    g1 = np.ones(n, dt)
    st = [np.ones(n, dt) for _ in range(4)]
    batchnorm_forward_train(A, g1, b, 1e-5, 0.9, st[0], st[1], st[2], st[3], out)
    batchnorm_forward_infer(A, g1, b, st[0], st[1], 1e-5, out)
    batchnorm_backward(A, g1, st[2], st[3], out.copy(), np.empty_like(out), st[0], st[1])
    y = np.zeros(m, np.int64)
    softmax_cross_entropy(A, y, np.empty_like(A))
    softmax_cross_entropy(A, y, np.empty((0, 0), dt))
    softmax(A, out)
    mask = np.empty((m, n), np.uint8)
    dropout_forward(A, 0.5, 0, 1, 0, mask, out)
    dropout_backward(out, mask, 0.5, np.empty_like(out))
    p = A.reshape(-1).copy()
    gr = A.reshape(-1)
    v, s = np.zeros_like(p), np.zeros_like(p)
    sgd_step(p, gr, 0.1)
    momentum_step(p, gr, v, 0.1, 0.9, 1, True)
    rmsprop_step(p, gr, s, 0.1, 0.999, 1e-8)
    adam_step(p, gr, v, s, 0.1, 0.9, 0.999, 1e-8, 1)
    sum_squares(p)
    all_finite(p)
    Zb = np.zeros((4, 1), dt)
    sigmoid_bce(Zb, np.zeros(4, dt), np.empty_like(Zb))
    sigmoid_bce(Zb, np.zeros(4, dt), np.empty((0, 0), dt))
    mse(Zb, Zb, np.empty_like(Zb))
    mse(Zb, Zb, np.empty((0, 0), dt))

# =========================================================================== argument layout guard


def _layout_guard(fn):
    """Turn Numba's errors on a strided / Fortran-order / misaligned array into a clear ValueError.

    The contract requires C-contiguous arrays (layers always pass them). The check runs only when
    the compiled call fails, so the fast path pays one Python frame and nothing else.
    """
    from numba.core.errors import TypingError

    @functools.wraps(fn)
    def guarded(*args):
        try:
            return fn(*args)
        except (TypingError, NotImplementedError):  # NotImplementedError: reshape of a Fortran-order array
            for i, a in enumerate(args):
                if isinstance(a, np.ndarray) and not (a.flags.c_contiguous and a.flags.aligned):
                    raise ValueError(
                        f"{fn.__name__}: argument {i} (shape {a.shape}, strides {a.strides}) is not a C-contiguous, "
                        "aligned array; the kernel contract requires one (use np.ascontiguousarray)") from None
            raise

    return guarded


for _name in __all__:
    if _name not in ("warmup", "PARALLEL_THRESHOLDS", "set_parallel"):
        globals()[_name] = _layout_guard(globals()[_name])


# =========================================================================== fused whole-epoch trainer
#
# Lives in this module on purpose: Numba's on-disk cache is invalidated per source file, and the
# fused epoch inlines the kernels above. In a separate file, editing this one would leave a stale
# cached epoch calling into recompiled kernels (seen: segfaults).
#
# A whole training epoch in ONE compiled call (Numba).
# 
# For small networks the cost of a step is per-call overhead, not arithmetic:
# the per-layer path makes ~15 Python-level kernel calls per step. Here the
# model is encoded as arrays (layer kinds, widths, offsets into ``params``,
# ``state`` and one workspace) and interpreted inside a single ``@njit``
# function that runs every mini-batch of an epoch: gather, forward, loss,
# backward, divergence check, optimiser update. It calls the same compiled
# kernels as above (GEMMs through BLAS), with the same serial/parallel decisions, so it produces the same numbers as the
# per-layer path with ``backend="numba"``.
# 
# Supported: Sequential models of Dense / BatchNorm / activation / Dropout
# layers with ``softmax_cross_entropy``, any of the four optimisers, any
# schedule. Everything else uses the per-layer path (see :func:`supports`).

OP_DENSE, OP_BN, OP_ACT, OP_DROPOUT = 0, 1, 2, 3
OPT_SGD, OPT_MOMENTUM, OPT_RMSPROP, OPT_ADAM = 0, 1, 2, 3
# integer program columns
(I_KIND, I_NIN, I_NOUT, I_ACT, I_P0, I_P1, I_S0, I_S1, I_LAYER,
 I_OUT, I_DX, I_MASK, I_MEAN, I_INV, N_ICOLS) = range(15)
# float program columns
F_KEEP, F_MOMENTUM, F_EPS, N_FCOLS = 0, 1, 2, 3
# threshold slots (elements at which the prange variant is used)
T_BN, T_DROPOUT, T_OPT, T_SSQ, N_T = 0, 1, 2, 3, 4
# scalar slots of the optimiser
H_BETA1, H_BETA2, H_EPS, N_H = 0, 1, 2, 3

# ----------------------------------------------------------------------------- helpers (compiled)


@_jit
def _mix64(x):
    x ^= x >> np.uint64(30)
    x *= np.uint64(MIX_C1)
    x ^= x >> np.uint64(27)
    x *= np.uint64(MIX_C2)
    x ^= x >> np.uint64(31)
    return x


@_jit
def _dropout_key(seed, step, layer):
    # contract.dropout_key in uint64 arithmetic (seed, step, layer >= 0)
    k = _mix64(np.uint64(seed) + np.uint64(GOLDEN))
    k = _mix64(k ^ np.uint64(step))
    return _mix64(k ^ np.uint64(layer))


@_jit
def _view2(buf, off, m, n):
    return buf[off:off + m * n].reshape((m, n))


@_jit
def _fz_parts(m):
    return max(1, min(_MAX_PARTS, m // _ROWS_PER_PART))


@_jit
def _fz_rows_per_chunk(m, n):
    return max(1, min(m, _CHUNK // max(n, 1)))


@_jit
def _fz_tile_rows(n, itemsize):
    return max(1, _TILE_BYTES // max(1, n * itemsize))


@_jit
def _ssq(x, thr):
    if x.size >= thr:
        return _ssq_par(x)
    return _ssq_serial(x)


@_jit
def _forward(X, iprog, fprog, params, state, ws, masks, m, seed, step, thr, empty1, scratch):
    """Training-mode forward of an m-row batch; returns the logits view."""
    x = X
    for j in range(iprog.shape[0]):
        kind = iprog[j, I_KIND]
        nin = iprog[j, I_NIN]
        nout = iprog[j, I_NOUT]
        if kind == OP_DENSE:
            W = params[iprog[j, I_P0]:iprog[j, I_P0] + nin * nout].reshape((nin, nout))
            b = params[iprog[j, I_P1]:iprog[j, I_P1] + nout] if iprog[j, I_P1] >= 0 else empty1
            out = _view2(ws, iprog[j, I_OUT], m, nout)
            _dense_forward_serial(x, W, b, iprog[j, I_ACT], out)
            x = out
        elif kind == OP_BN:
            p0 = iprog[j, I_P0]
            s0 = iprog[j, I_S0]
            out = _view2(ws, iprog[j, I_OUT], m, nout)
            mean = ws[iprog[j, I_MEAN]:iprog[j, I_MEAN] + nout]
            inv = ws[iprog[j, I_INV]:iprog[j, I_INV] + nout]
            gamma = params[p0:p0 + nout]
            beta = params[p0 + nout:p0 + 2 * nout]
            rm = state[s0:s0 + nout]
            rv = state[s0 + nout:s0 + 2 * nout]
            P = _fz_parts(m)
            tr = _fz_tile_rows(nout, x.itemsize)
            if m * nout >= thr[T_BN]:
                _bn_train_par(x, gamma, beta, fprog[j, F_EPS], fprog[j, F_MOMENTUM], rm, rv, mean, inv, out,
                              P, tr, _fz_rows_per_chunk(m, nout), scratch)
            else:
                _bn_train_serial(x, gamma, beta, fprog[j, F_EPS], fprog[j, F_MOMENTUM], rm, rv, mean, inv,
                                 out, P, tr, scratch)
            x = out
        elif kind == OP_ACT:
            out = _view2(ws, iprog[j, I_OUT], m, nout)
            _act_fwd_serial(x, iprog[j, I_ACT], out)
            x = out
        else:  # dropout (only emitted when keep_prob < 1)
            out = _view2(ws, iprog[j, I_OUT], m, nout)
            mask = masks[iprog[j, I_MASK]:iprog[j, I_MASK] + m * nout].reshape((m, nout))
            key = _dropout_key(seed, step, iprog[j, I_LAYER])
            kp = fprog[j, F_KEEP]
            thr_keep = np.uint64(kp * 4294967296.0)
            if m * nout >= thr[T_DROPOUT]:
                _dropout_fwd_par(x, key, thr_keep, kp, mask, out)
            else:
                _dropout_fwd_serial(x, key, thr_keep, kp, mask, out)
            x = out
    return x


@_jit
def _backward(X, iprog, fprog, params, grads, ws, masks, m, dlogits, l2_over_m, empty1, empty2, scratch):
    dout = dlogits
    n_ops = iprog.shape[0]
    for j in range(n_ops - 1, -1, -1):
        kind = iprog[j, I_KIND]
        nin = iprog[j, I_NIN]
        nout = iprog[j, I_NOUT]
        x = X if j == 0 else _view2(ws, iprog[j - 1, I_OUT], m, nin)
        out = _view2(ws, iprog[j, I_OUT], m, nout)
        need_dx = j > 0
        dx = _view2(ws, iprog[j, I_DX], m, nin) if need_dx else empty2
        if kind == OP_DENSE:
            p0 = iprog[j, I_P0]
            W = params[p0:p0 + nin * nout].reshape((nin, nout))
            dW = grads[p0:p0 + nin * nout].reshape((nin, nout))
            db = grads[iprog[j, I_P1]:iprog[j, I_P1] + nout] if iprog[j, I_P1] >= 0 else empty1
            _dense_backward_impl(x, W, out, dout, iprog[j, I_ACT], l2_over_m, dout, dW, db, dx)
        elif kind == OP_BN:
            p0 = iprog[j, I_P0]
            mean = ws[iprog[j, I_MEAN]:iprog[j, I_MEAN] + nout]
            inv = ws[iprog[j, I_INV]:iprog[j, I_INV] + nout]
            target = dx if need_dx else _view2(ws, iprog[j, I_DX], m, nin)
            _bn_bwd_serial(x, params[p0:p0 + nout], mean, inv, dout, target, grads[p0:p0 + nout],
                           grads[p0 + nout:p0 + 2 * nout], _fz_parts(m), scratch)
        elif kind == OP_ACT:
            if need_dx:
                _act_bwd_serial(out, dout, iprog[j, I_ACT], dx)
        else:
            if need_dx:
                mask = masks[iprog[j, I_MASK]:iprog[j, I_MASK] + m * nout].reshape((m, nout))
                _dropout_bwd_serial(dout, mask, fprog[j, F_KEEP], dx)
        dout = dx


@_jit
def _optimizer_step(kind, params, grads, v, s, hyper, c1, c2, thr):
    big = params.size >= thr[T_OPT]
    if kind == OPT_ADAM:
        b1 = hyper[H_BETA1]
        b2 = hyper[H_BETA2]
        if big:
            _adam_par(params, grads, v, s, b1, 1 - b1, b2, 1 - b2, c1, c2, hyper[H_EPS])
        else:
            _adam_serial(params, grads, v, s, b1, 1 - b1, b2, 1 - b2, c1, c2, hyper[H_EPS])
    elif kind == OPT_MOMENTUM:
        b = hyper[H_BETA1]
        if big:
            _mom_par(params, grads, v, b, 1 - b, c1)
        else:
            _mom_serial(params, grads, v, b, 1 - b, c1)
    elif kind == OPT_RMSPROP:
        b2 = hyper[H_BETA2]
        if big:
            _rms_par(params, grads, s, c1, b2, 1 - b2, hyper[H_EPS])
        else:
            _rms_serial(params, grads, s, c1, b2, 1 - b2, hyper[H_EPS])
    else:
        if big:
            _sgd_par(params, grads, c1)
        else:
            _sgd_serial(params, grads, c1)


@_jit
def _train_epoch(X, y, perm, batch_size, iprog, fprog, dense_w, params, grads, state, ws, masks, xbuf, ybuf,
                 dlog_buf, opt_kind, v, s, hyper, coef1, coef2, l2, step0, seed, thr, costs, losses, scratch):
    """Run every mini-batch of one epoch. Returns (steps done, wrong predictions, status).

    status 0: fine; 1: the cost or the gradients of step ``steps done`` were not finite
    (the optimiser was not applied for that step).
    """
    N = X.shape[0]
    n_in = X.shape[1]
    k = dlog_buf.shape[0] // max(batch_size, 1)
    empty1 = params[:0]
    empty2 = ws[:0].reshape((0, 0))
    n_batches = (N + batch_size - 1) // batch_size
    wrong = 0
    for bi in range(n_batches):
        s0 = bi * batch_size
        m = min(batch_size, N - s0)
        xb = xbuf[:m * n_in].reshape((m, n_in))
        yb = ybuf[:m]
        for r in range(m):
            src = perm[s0 + r]
            yb[r] = y[src]
            xr = X[src]
            dst = xb[r]
            for c in range(n_in):
                dst[c] = xr[c]
        step = step0 + bi
        logits = _forward(xb, iprog, fprog, params, state, ws, masks, m, seed, step, thr, empty1, scratch)
        dlog = dlog_buf[:m * k].reshape((m, k))
        total, bad = _sce_serial(logits, yb, dlog, True, _fz_parts(m))
        loss = total / m
        _backward(xb, iprog, fprog, params, grads, ws, masks, m, dlog, l2 / m, empty1, empty2, scratch)
        l2_term = 0.0
        if l2 != 0.0:
            ss = 0.0
            for d in range(dense_w.shape[0]):
                ss += _ssq(params[dense_w[d, 0]:dense_w[d, 1]], thr[T_SSQ])
            l2_term = l2 / (2.0 * m) * ss
        J = loss + l2_term
        costs[bi] = J
        losses[bi] = loss
        for r in range(m):
            row = logits[r]
            best = 0
            for c in range(1, k):
                if row[c] > row[best]:
                    best = c
            if best != yb[r]:
                wrong += 1
        if not (math.isfinite(J) and _all_finite(grads)):
            return bi, wrong, 1
        _optimizer_step(opt_kind, params, grads, v, s, hyper, coef1[bi], coef2[bi], thr)
    return n_batches, wrong, 0


# ----------------------------------------------------------------------------- Python side


def supports(model, optimizer) -> str | None:
    """None if the fused epoch can train ``model`` with ``optimizer``, else the reason it cannot."""
    from ..layers import Activation, BatchNorm, Dense, Dropout
    from ..optim import SGD, Adam, Momentum, RMSprop

    if model.loss.name != "softmax_cross_entropy":
        return f"loss {model.loss.name!r} (fused path: softmax_cross_entropy only)"
    if model.l2_scale != "batch":
        return "l2_scale='dataset'"
    if type(optimizer) not in (SGD, Momentum, RMSprop, Adam):
        return f"optimizer {type(optimizer).__name__}"
    for op in model._ops:
        if not isinstance(op, (Dense, BatchNorm, Activation, Dropout)):
            return f"layer {type(op).__name__}"
    if model.backend_name != "numba":
        return f"backend {model.backend_name!r} (the fused epoch runs the numba kernels)"
    return None


class FusedEpoch:
    """The compiled program of one model and batch size (built once per ``fit``)."""

    def __init__(self, model, optimizer, batch_size: int, n_features: int):
        from ..layers import Activation, BatchNorm, Dense, Dropout

        self.model = model
        self.optimizer = optimizer
        self.batch_size = batch_size
        dt = model.dtype
        offsets = {name: sl.start for name, sl in model.param_slices}
        state_off, off = {}, 0
        for li, layer in enumerate(model.layers):
            for name, shape in layer.state_specs():
                state_off[(li, name)] = off
                off += int(np.prod(shape))
        index = {id(layer): li for li, layer in enumerate(model.layers)}
        ops = [op for op in model._ops if not (isinstance(op, Dropout) and op.keep_prob == 1.0)]
        iprog = np.full((len(ops), N_ICOLS), -1, np.int64)
        fprog = np.zeros((len(ops), N_FCOLS), np.float64)
        B = batch_size
        ws_size = mask_size = 0
        dim = n_features
        for j, op in enumerate(ops):
            li = index[id(op)]
            nin = dim
            nout = op.output_dim(dim)
            row = iprog[j]
            row[I_NIN], row[I_NOUT], row[I_LAYER] = nin, nout, li
            if isinstance(op, Dense):
                row[I_KIND], row[I_ACT] = OP_DENSE, op.activation
                row[I_P0] = offsets[f"layers[{li}].W"]
                row[I_P1] = offsets.get(f"layers[{li}].b", -1)
            elif isinstance(op, BatchNorm):
                row[I_KIND] = OP_BN
                row[I_P0] = offsets[f"layers[{li}].gamma"]
                row[I_S0] = state_off[(li, "running_mean")]
                fprog[j, F_MOMENTUM], fprog[j, F_EPS] = op.momentum, op.eps
                row[I_MEAN], row[I_INV] = ws_size, ws_size + nout
                ws_size += 2 * nout
            elif isinstance(op, Activation):
                row[I_KIND], row[I_ACT] = OP_ACT, op.code
            else:
                row[I_KIND] = OP_DROPOUT
                fprog[j, F_KEEP] = op.keep_prob
                row[I_MASK] = mask_size
                mask_size += B * nout
            row[I_OUT] = ws_size
            ws_size += B * nout
            # a BatchNorm first op gets one too: its dZ is not needed, but written in place into
            # dout it would take the kernel's slow (aliased, unvectorised) path
            if j > 0 or isinstance(op, BatchNorm):
                row[I_DX] = ws_size
                ws_size += B * nin
            dim = nout
        self.iprog, self.fprog = iprog, fprog
        P = max(1, min(_MAX_PARTS, B // _ROWS_PER_PART))  # the partitions of a full batch: the most
        widths = [int(r[I_NOUT]) for r in iprog if r[I_KIND] == OP_BN]
        self.scratch = np.empty(max([max(bn_train_scratch_size(n, P), bn_backward_scratch_size(n, P))
                                     for n in widths] + [1]))
        self.ws = np.zeros(ws_size, dt)
        self.masks = np.zeros(max(mask_size, 1), np.uint8)
        self.xbuf = np.empty(B * n_features, dt)
        self.ybuf = np.empty(B, np.int64)
        self.dlog = np.empty(B * model.n_outputs, dt)
        self.dense_w = np.array([[offsets[f"layers[{index[id(layer)]}].W"],
                                  offsets[f"layers[{index[id(layer)]}].W"] + layer.W.size]
                                 for layer in model.layers if isinstance(layer, Dense)], np.int64).reshape(-1, 2)

    def _coefficients(self, lrs: np.ndarray, t0: int) -> tuple[np.ndarray, np.ndarray, int, np.ndarray]:
        """Per-step optimiser scalars, computed in Python exactly as the per-layer kernels do."""
        from ..optim import Adam, Momentum, RMSprop

        opt = self.optimizer
        n = lrs.size
        c1 = np.empty(n)
        c2 = np.zeros(n)
        hyper = np.zeros(N_H)
        steps = range(t0 + 1, t0 + n + 1)

        def one_minus_pow(beta: float) -> np.ndarray:
            # Python's float ** int, as the per-step kernels compute it (np.power may differ in the last bit)
            return np.array([1 - beta ** t for t in steps])

        if isinstance(opt, Adam):
            kind = OPT_ADAM
            hyper[:] = (opt.beta1, opt.beta2, opt.eps)
            c1[:] = lrs / one_minus_pow(float(opt.beta1))
            c2[:] = 1.0 / one_minus_pow(float(opt.beta2))
        elif isinstance(opt, Momentum):
            kind = OPT_MOMENTUM
            hyper[H_BETA1] = opt.beta
            c1[:] = lrs / one_minus_pow(float(opt.beta)) if opt.bias_correction else lrs
        elif isinstance(opt, RMSprop):
            kind = OPT_RMSPROP
            hyper[H_BETA2], hyper[H_EPS] = opt.beta2, opt.eps
            c1[:] = lrs
        else:
            kind = 0
            c1[:] = lrs
        return c1, c2, kind, hyper

    def run(self, X: np.ndarray, y: np.ndarray, perm: np.ndarray, lrs: np.ndarray
            ) -> tuple[np.ndarray, np.ndarray, int, bool]:
        """Train one epoch. Returns (cost per step, data loss per step, wrong predictions, diverged)."""
        model, opt = self.model, self.optimizer
        opt._ensure_state(model.params, model.grads)
        n_steps = lrs.size
        c1, c2, kind, hyper = self._coefficients(lrs, opt.t)
        v = opt.state.get("v", model.params[:0])
        s = opt.state.get("s", model.params[:0])
        thr = np.array([_THR["batchnorm"], _THR["dropout"],
                        _THR["adam"] if kind == OPT_ADAM else _THR["optimizer"], _THR["sum_squares"]],
                       np.int64)
        costs = np.empty(n_steps)
        losses = np.empty(n_steps)
        done, wrong, status = _train_epoch(
            X, y, perm, self.batch_size, self.iprog, self.fprog, self.dense_w, model.params, model.grads,
            model.state, self.ws, self.masks, self.xbuf, self.ybuf, self.dlog, kind, v, s, hyper, c1, c2,
            float(model.l2), model.step_count, model.seed, thr, costs, losses, self.scratch)
        opt.t += done
        model.step_count += done
        return costs[:done + status], losses[:done + status], wrong, bool(status)
