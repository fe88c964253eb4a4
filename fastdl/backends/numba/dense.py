"""Dense layers and activations: BLAS GEMMs with bias, activation and their gradients fused in.

GEMMs call the row-major wrappers of ``fastdl._kernels._blas`` (the same
BLAS as the Cython backend, chosen by :mod:`fastdl.backends.blas`: MKL when
installed, else SciPy's OpenBLAS), registered as LLVM symbols so that cached
machine code links to them by name; never inside a ``prange`` region. Bias
and activation (forward), activation derivative and ``db`` (backward) are
fused into one pass over the output.
"""
from __future__ import annotations

import llvmlite.binding
import numpy as np
from numba import types

from ..contract import IDENTITY, RELU, SIGMOID, TANH
from ._cache import jit as _jit
from ._chunks import (CHUNK, T_ACT_CHEAP, T_ACT_TRANS, T_BIAS_ACT, chunked, current_thresholds, flat_bounds,
                      n_chunks, rows_per_chunk)
from ._math import _sigmoid_dt, _tanh_dt

# ---------------------------------------------------------------------------------- activation loops


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


@chunked
@_jit
def _bias_act(c, rpc, out, b, act):
    m = out.shape[0]
    _bias_act_rows(out, b, act, c * rpc, min(m, (c + 1) * rpc))


def _bad_act(act) -> ValueError:
    return ValueError(f"unknown activation code {act!r}; use one of IDENTITY=0, RELU=1, TANH=2, SIGMOID=3 "
                      "(fastdl.backends.contract.ACTIVATION_CODES)")


def _check_precision(precision, out) -> None:
    if precision not in (0, 1):
        raise ValueError(f"unknown precision {precision!r}; use 0 (fp32) or 1 (bf16)")
    if precision == 1 and out.dtype != np.float32:
        raise ValueError(f"precision=1 (bf16 GEMMs) needs float32 arrays, got {out.dtype}")


_I32 = types.int32


def _gemm_signature(t):
    # (trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc): pointers passed as uintp
    return types.void(_I32, _I32, _I32, _I32, _I32, t, types.uintp, _I32, types.uintp, _I32, t, types.uintp, _I32)


_sgemm_rm = types.ExternalFunction("fastdl_sgemm_rm", _gemm_signature(types.float32))
_dgemm_rm = types.ExternalFunction("fastdl_dgemm_rm", _gemm_signature(types.float64))
# bf16 GEMM (docs/spec.md section 13): both operands rounded to bfloat16, float32 accumulation
_bf16gemm_rm = types.ExternalFunction("fastdl_bf16gemm_rm", _gemm_signature(types.float32))
# the same on operands already rounded by the caller (the epoch executor rounds each operand once per step)
_bf16gemm_pre_rm = types.ExternalFunction("fastdl_bf16gemm_pre_rm", _gemm_signature(types.float32))


@_jit
def _bf16_bits(v):
    """The float32 bits v rounded to bfloat16, nearest even; a NaN stays a quiet NaN (fdl_f32_to_bf16's bits).

    Branch-free (a select), so that the loops calling it vectorise."""
    r = (v + np.uint32(0x7FFF) + ((v >> np.uint32(16)) & np.uint32(1))) & np.uint32(0xFFFF0000)
    q = (v | np.uint32(0x00400000)) & np.uint32(0xFFFF0000)
    return q if (v & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000) else r


@_jit
def _round_bf16(x):
    """float32 array rounded in place to bfloat16 (nearest-even; NaN stays NaN), returned (njit/cfunc use)."""
    u = x.reshape(x.size).view(np.uint32)
    for i in range(u.shape[0]):
        u[i] = _bf16_bits(u[i])
    return x


def _numpy_gemm_standins() -> tuple[int, int]:
    """C-callable row-major GEMMs written with np.dot, for when fastdl._kernels is not built.

    Slow (they allocate), but they keep the Numba backend usable on its own.
    """
    from numba import carray, cfunc

    def make(nbt, bf16=False):
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
            a = np.ascontiguousarray(a)
            b = np.ascontiguousarray(b)
            if bf16:   # round to bfloat16, nearest-even (NaN stays NaN), as float32 values
                a = _round_bf16(a.copy())
                b = _round_bf16(b.copy())
            prod = np.dot(a, b)
            for i in range(M):
                for j in range(N):
                    c[i, j] = alpha * prod[i, j] + (beta * c[i, j] if beta != 0 else 0)
        return gemm

    _standins[:] = [make(types.float32), make(types.float64), make(types.float32, True)]
    return _standins[0].address, _standins[1].address


def _numpy_bf16_gemm_standin() -> int:
    """The bf16 GEMM stand-in (operands rounded to bfloat16, then np.dot in float32) of the above."""
    if len(_standins) < 3:
        _numpy_gemm_standins()
    return _standins[2].address


_standins: list = []


def _register_gemm() -> None:
    try:
        from fastdl._kernels import _blas  # noqa: F401
    except ImportError:  # extensions not built
        s, d = _numpy_gemm_standins()
        h = _numpy_bf16_gemm_standin()
        pre = s   # operands already rounded (bf16gemm_pre_rm's contract): the float32 stand-in
    else:
        from ..blas import rowmajor_addresses

        # FASTDL_BLAS=mkl without MKL: ImportError, the backend is unavailable
        s, d, h = rowmajor_addresses()[:3]
        pre = rowmajor_addresses()[3]
    llvmlite.binding.add_symbol("fastdl_sgemm_rm", s)
    llvmlite.binding.add_symbol("fastdl_dgemm_rm", d)
    llvmlite.binding.add_symbol("fastdl_bf16gemm_rm", h)
    llvmlite.binding.add_symbol("fastdl_bf16gemm_pre_rm", pre)


_register_gemm()


@_jit
def _gemm_rm(A, trans_a, B, trans_b, C, beta, precision):
    """``C = op(A) @ op(B) + beta * C`` on C-contiguous 2-D arrays (op(X) = X.T when trans_x).

    ``precision`` 1 (float32 only; the callers check): operands rounded to bfloat16.
    """
    M, N = C.shape
    K = A.shape[0] if trans_a else A.shape[1]
    if C.itemsize == 4 and precision == 1:
        _bf16gemm_rm(_I32(trans_a), _I32(trans_b), _I32(M), _I32(N), _I32(K), np.float32(1.0), A.ctypes.data,
                     _I32(A.shape[1]), B.ctypes.data, _I32(B.shape[1]), np.float32(beta), C.ctypes.data, _I32(N))
    elif C.itemsize == 4:
        _sgemm_rm(_I32(trans_a), _I32(trans_b), _I32(M), _I32(N), _I32(K), np.float32(1.0), A.ctypes.data,
                  _I32(A.shape[1]), B.ctypes.data, _I32(B.shape[1]), np.float32(beta), C.ctypes.data, _I32(N))
    else:
        _dgemm_rm(_I32(trans_a), _I32(trans_b), _I32(M), _I32(N), _I32(K), 1.0, A.ctypes.data,
                  _I32(A.shape[1]), B.ctypes.data, _I32(B.shape[1]), np.float64(beta), C.ctypes.data, _I32(N))


# ---------------------------------------------------------------------------------- dense


@_jit
def dense_forward_impl(A_prev, W, b, act, out, parallel, precision):
    """GEMM, then bias + activation over row chunks (``parallel``: a prange over them)."""
    _gemm_rm(A_prev, False, W, False, out, 0.0, precision)
    m, n = out.shape
    rpc = rows_per_chunk(m, n)
    _bias_act(parallel, n_chunks(m, rpc), rpc, out, b, act)


def dense_forward(A_prev, W, b, act: int, out, precision: int = 0) -> None:
    """``out = g(A_prev @ W + b)``: BLAS GEMM, then bias + activation in one pass."""
    if not 0 <= act <= 3:
        raise _bad_act(act)
    _check_precision(precision, out)
    dense_forward_impl(A_prev, W, b, act, out, act >= TANH and out.size >= current_thresholds()[T_BIAS_ACT],
                       precision)


@_jit
def dense_backward_impl(A_prev, W, out, dout, act, l2_over_m, dZ, dW, db, dA_prev, precision):
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
    lam = dW.dtype.type(l2_over_m)
    if l2_over_m == 0.0:
        _gemm_rm(A_prev, True, dZ, False, dW, 0.0, precision)
    elif precision == 0:  # dW = l2/m * W, then the GEMM accumulates onto it (beta = 1): no extra pass
        wf = W.reshape(W.size)
        dwf = dW.reshape(dW.size)
        for i in range(wf.shape[0]):
            dwf[i] = lam * wf[i]
        _gemm_rm(A_prev, True, dZ, False, dW, 1.0, precision)
    else:  # bf16: the rounded product, then + l2/m * W with the float32 W (docs/spec.md section 13)
        _gemm_rm(A_prev, True, dZ, False, dW, 0.0, precision)
        wf = W.reshape(W.size)
        dwf = dW.reshape(dW.size)
        for i in range(wf.shape[0]):
            dwf[i] = dwf[i] + lam * wf[i]
    if dA_prev.size != 0:
        _gemm_rm(dZ, False, W, True, dA_prev, 0.0, precision)


def dense_backward(A_prev, W, out, dout, act: int, l2_over_m: float, dZ, dW, db, dA_prev,
                   precision: int = 0) -> None:
    """``dZ = dout*g'(out)`` (with ``db`` in the same pass); ``dW``, ``dA_prev`` by BLAS."""
    if not 0 <= act <= 3:
        raise _bad_act(act)
    _check_precision(precision, dW)
    dense_backward_impl(A_prev, W, out, dout, act, float(l2_over_m), dZ, dW, db, dA_prev, precision)


# ------------------------------------------------------------------ bf16 with operands rounded once
# docs/spec.md section 13: the epoch executor rounds W once per step, a Dense layer's input once (for Z
# and dW) and dZ once (for dW and dX), then multiplies with _bf16gemm_pre_rm. The numbers are those of
# dense_forward_impl / dense_backward_impl with precision 1 (tests/test_bf16.py checks the bits).


@_jit
def _round_bf16_inplace(x):
    """x = round_bf16(x): one array, so that LLVM vectorises it (see _act_grad_inplace: 10x)."""
    u = x.reshape(x.size).view(np.uint32)
    for i in range(u.shape[0]):
        u[i] = _bf16_bits(u[i])


@_jit
def round_bf16_into(src, dst):
    """dst = round_bf16(src) on C-contiguous float32 arrays of equal size (may alias; _round_bf16's bits)."""
    if src.ctypes.data == dst.ctypes.data:
        _round_bf16_inplace(dst)
        return
    s = src.reshape(src.size).view(np.uint32)
    d = dst.reshape(dst.size).view(np.uint32)
    for i in range(s.shape[0]):
        d[i] = _bf16_bits(s[i])


@_jit
def _gemm_pre(A, trans_a, B, trans_b, C):
    """``C = op(A) @ op(B)`` on float32 operands that are already bfloat16 values."""
    M, N = C.shape
    K = A.shape[0] if trans_a else A.shape[1]
    _bf16gemm_pre_rm(_I32(trans_a), _I32(trans_b), _I32(M), _I32(N), _I32(K), np.float32(1.0), A.ctypes.data,
                     _I32(A.shape[1]), B.ctypes.data, _I32(B.shape[1]), np.float32(0.0), C.ctypes.data, _I32(N))


@_jit
def dense_forward_bf16_impl(A, Ar, round_in, Wr, b, act, out, outr, parallel):
    """dense_forward_impl(precision=1) with ``Wr`` = round(W) given, ``Ar`` = round(A) (written here when
    ``round_in``, kept for dW) and round(out) written into ``outr`` (unless it is empty)."""
    if round_in:
        round_bf16_into(A, Ar)
    _gemm_pre(Ar, False, Wr, False, out)
    m, n = out.shape
    rpc = rows_per_chunk(m, n)
    _bias_act(parallel, n_chunks(m, rpc), rpc, out, b, act)
    if outr.size != 0:
        round_bf16_into(out, outr)


@_jit
def dense_backward_bf16_impl(Ar, W, Wr, out, dout, act, l2_over_m, dW, db, dA_prev):
    """dense_backward_impl(precision=1) with the rounded ``Ar``, ``Wr``; dZ is computed into ``dout`` and
    rounded there after ``db`` has summed it (the one operand of both GEMMs)."""
    m, n = dout.shape
    dz = dout.reshape(dout.size)
    _act_grad_chunk(out.reshape(out.size), dz, act, dz)
    if db.shape[0] != 0:
        acc = np.zeros(n, dtype=np.float64)
        for i in range(m):
            dzr = dout[i]
            for j in range(n):
                acc[j] += dzr[j]
        for j in range(n):
            db[j] = acc[j]
    round_bf16_into(dout, dout)
    _gemm_pre(Ar, True, dout, False, dW)
    if l2_over_m != 0.0:
        lam = dW.dtype.type(l2_over_m)
        wf = W.reshape(W.size)
        dwf = dW.reshape(dW.size)
        for i in range(wf.shape[0]):
            dwf[i] = dwf[i] + lam * wf[i]
    if dA_prev.size != 0:
        _gemm_pre(dout, False, Wr, True, dA_prev)


def bf16_gemm_packs(M: int, N: int, K: int) -> bool:
    """Whether a bf16 product of this shape runs on a kernel that packs (and rounds) its operands itself
    (``_blas.bf16_gemm_packs``; False without fastdl._kernels): then the cores' pre-rounding is skipped."""
    try:
        from fastdl._kernels._blas import bf16_gemm_packs as packs
    except ImportError:
        return False
    return packs(M, N, K)


def round_bf16(src, dst) -> None:
    """``dst = round_bf16(src)`` on C-contiguous float32 arrays of one size (Backend.bf16_cores)."""
    round_bf16_into(src, dst)


def dense_forward_bf16(A, Ar, round_in: bool, Wr, b, act: int, out, outr=None) -> None:
    """The bf16 forward with operands rounded once (``Ar``/``Wr``; see dense_forward_bf16_impl)."""
    if not 0 <= act <= 3:
        raise _bad_act(act)
    if outr is None:
        outr = out[:0, :0]
    dense_forward_bf16_impl(A, Ar, bool(round_in), Wr, b, act, out, outr,
                            act >= TANH and out.size >= current_thresholds()[T_BIAS_ACT])


def dense_backward_bf16(Ar, W, Wr, out, dout, act: int, l2_over_m: float, dZr, dW, db, dA_prev) -> None:
    """The bf16 backward with operands rounded once; ``dZr`` receives round_bf16(dZ) (may be ``dout``)."""
    if not 0 <= act <= 3:
        raise _bad_act(act)
    if dZr is not dout:
        dZr[...] = dout
    dense_backward_bf16_impl(Ar, W, Wr, out, dZr, act, float(l2_over_m), dW, db, dA_prev)


# ---------------------------------------------------------------------------------- activations


@chunked
@_jit
def _act_fwd(c, Z, act, out):
    z = Z.reshape(Z.size)
    lo, hi = flat_bounds(c, z.size, CHUNK)
    _act_chunk(z[lo:hi], out.reshape(out.size)[lo:hi], act)


@chunked
@_jit
def _act_bwd(c, out, dout, act, dZ):
    a = out.reshape(out.size)
    lo, hi = flat_bounds(c, a.size, CHUNK)
    _act_grad_chunk(a[lo:hi], dout.reshape(dout.size)[lo:hi], act, dZ.reshape(dZ.size)[lo:hi])


@_jit
def activation_forward_impl(Z, act, out, parallel):
    _act_fwd(parallel, n_chunks(Z.size, CHUNK), Z, act, out)


@_jit
def activation_backward_impl(out, dout, act, dZ, parallel):
    _act_bwd(parallel, n_chunks(out.size, CHUNK), out, dout, act, dZ)


def activation_forward(Z, act: int, out) -> None:
    """``out = g(Z)`` (``out`` may alias ``Z``)."""
    if not 0 <= act <= 3:
        raise _bad_act(act)
    thr = current_thresholds()
    activation_forward_impl(Z, act, out, Z.size >= (thr[T_ACT_TRANS] if act >= TANH else thr[T_ACT_CHEAP]))


def activation_backward(out, dout, act: int, dZ) -> None:
    """``dZ = dout * g'(out)`` (``dZ`` may alias ``dout``)."""
    if not 0 <= act <= 3:
        raise _bad_act(act)
    activation_backward_impl(out, dout, act, dZ, out.size >= current_thresholds()[T_ACT_CHEAP])
