"""Vectorisable elementary functions in the array's precision, and float64 row reductions.

``math.exp`` / ``math.tanh`` / ``math.log`` are opaque libm calls that stop
LLVM's vectorisation (no SVML here), so exp and tanh are written out
(Cody-Waite reduction + polynomial; Cephes' tanh/tanhf), about 1 ulp, in the
array's precision (float32 data in float32 arithmetic), and float64 ``log``
and ``log1p`` use fdlibm's polynomial. Compiled with ``contract`` (FMA fusion
only), which only makes the polynomials more accurate. ``_sum64`` uses
``reassoc`` so that it vectorises (its order is then fixed by the compiled
code, never by threads).
"""
from __future__ import annotations

import math

import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic, overload

from ._cache import jit as _jit, mjit as _mjit, rjit as _rjit

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


def _as_dtype_of(buf, like):
    """``buf`` (float64 scratch) reinterpreted as an array of ``like``'s dtype (njit only, below)."""
    return buf.view(like.dtype)


@overload(_as_dtype_of)
def _ov_as_dtype_of(buf, like):
    dt = np.dtype(str(like.dtype))

    def impl(buf, like):
        return buf.view(dt)
    return impl
