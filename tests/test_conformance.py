"""Every compiled backend against the NumPy reference, kernel by kernel.

Parametrised over all available non-reference backends
(``fastdl.backends.available_backends()``), so a new backend is picked up
automatically. Tolerances (docs/design.md "Habits"): float32 about 1e-5 relative,
float64 about 1e-12 relative; dropout masks bit-identical.

Output arrays are pre-filled with NaN (uint8 masks with 7) before each call,
so a kernel that leaves part of an output unwritten fails.
"""
from __future__ import annotations

import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastdl.backends import available_backends, get_backend, reference
from fastdl.backends.contract import IDENTITY, KERNELS, RELU, SIGMOID, TANH
from fastdl.plan import (OPT_ADAM, OPT_CLASSICAL_MOMENTUM, OPT_MOMENTUM, OPT_NESTEROV, OPT_RMSPROP, OPT_SGD,
                         OptimizerSpec, step_scalars)

BACKENDS = [b for b in available_backends() if b != "reference"]
DTYPES = [np.float32, np.float64]
ACTS = [IDENTITY, RELU, TANH, SIGMOID]
RTOL = {np.dtype(np.float32): 1e-5, np.dtype(np.float64): 1e-12}
# Shapes: batch 1, odd sizes, non-multiples of the SIMD width, and sizes above
# the compiled backends' parallel thresholds (>= 65536 elements).
SHAPES = [(1, 1), (1, 7), (3, 5), (7, 17), (17, 33), (33, 65), (65, 130), (130, 3), (257, 300)]
SMALL_SHAPES = SHAPES[:-1]

pytestmark = pytest.mark.skipif(not BACKENDS, reason="no compiled backend available")

backend_param = pytest.mark.parametrize("bname", BACKENDS)
dtype_param = pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
FUZZ = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def rng_for(*key) -> np.random.Generator:
    """A generator seeded from ``key`` (stable across processes, unlike hash())."""
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


def randn(rng, shape, dtype, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(dtype)


def nan_like(a):
    out = np.empty_like(a)
    out.fill(np.nan)
    return out


def assert_close(actual, expected, dtype, rtol=None, what="", scale=None):
    """Relative tolerance for the dtype, absolute floor relative to the largest magnitude (or ``scale``)."""
    rtol = RTOL[np.dtype(dtype)] if rtol is None else rtol
    expected = np.asarray(expected)
    if scale is None:
        finite = expected[np.isfinite(expected)] if expected.size else expected
        scale = float(np.max(np.abs(finite))) if finite.size else 1.0
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * max(scale, 1e-30), err_msg=what)


def assert_loss_close(actual, expected, dtype):
    """Losses: relative tolerance, plus an absolute floor of rtol (a near-zero loss such as
    log(1 + 1e-13) is a cancellation whose absolute, not relative, error is bounded)."""
    assert isinstance(actual, float), f"loss must be a Python float, got {type(actual).__name__}"
    if np.isnan(expected):
        assert np.isnan(actual)
    else:
        rt = RTOL[np.dtype(dtype)]
        np.testing.assert_allclose(actual, expected, rtol=rt, atol=rt)


def test_backends_discovered():
    # The list used by every test here: all loadable backends but the oracle.
    assert "reference" in available_backends()
    for b in BACKENDS:
        assert get_backend(b).name == b


@backend_param
def test_backend_implements_every_kernel(bname):
    srcs = get_backend(bname).sources
    assert set(srcs) == set(KERNELS)
    missing = [k for k, s in srcs.items() if s != bname]
    if missing and bname == "numba":      # the numba backend promises the full contract
        pytest.fail(f"numba falls back to reference for {missing}")
    if missing:
        pytest.skip(f"{bname} falls back to reference for {missing}")


# --------------------------------------------------------------------------- dense


def _dense_case(bname, dtype, m, n_in, n_out, act, use_bias, want_dA, l2, seed=0):
    be = get_backend(bname)
    rng = rng_for(seed, m, n_in, n_out, act)
    A = randn(rng, (m, n_in), dtype)
    W = randn(rng, (n_in, n_out), dtype, scale=1 / np.sqrt(n_in))
    b = randn(rng, (n_out,), dtype) if use_bias else np.zeros(0, dtype)
    out_r, out_b = nan_like(np.empty((m, n_out), dtype)), nan_like(np.empty((m, n_out), dtype))
    reference.dense_forward(A, W, b, act, out_r)
    be.dense_forward(A, W, b, act, out_b)
    # A dot product's rounding scales with the sum of |terms|, not with |result|:
    # the absolute floor of every GEMM output is rtol * (|X| @ |Y|).
    absA, absW = np.abs(A.astype(np.float64)), np.abs(W.astype(np.float64))
    assert_close(out_b, out_r, dtype, what="dense_forward out",
                 scale=float(np.max(absA @ absW + (np.abs(b) if b.size else 0.0))))

    dout = randn(rng, (m, n_out), dtype)
    res = []
    for mod, out in ((reference, out_r), (be, out_r.copy())):
        dZ = nan_like(dout)
        dW = nan_like(W)
        db = nan_like(b)
        dA = nan_like(A) if want_dA else np.empty((0, 0), dtype)
        mod.dense_backward(A, W, out, dout.copy(), act, l2, dZ, dW, db, dA)
        res.append((dZ, dW, db, dA))
    absdZ = np.abs(res[0][0].astype(np.float64))
    scales = {"dZ": None, "dW": float(np.max(absA.T @ absdZ + l2 * absW)),
              "db": float(np.max(absdZ.sum(axis=0))), "dA_prev": float(np.max(absdZ @ absW.T))}
    for name, r, x in zip(("dZ", "dW", "db", "dA_prev"), res[0], res[1]):
        assert x.shape == r.shape
        assert_close(x, r, dtype, what=f"dense_backward {name}", scale=scales[name])


@backend_param
@dtype_param
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("m,n_in,n_out", [(1, 1, 1), (1, 7, 3), (3, 5, 17), (7, 33, 65), (65, 17, 130),
                                          (130, 3, 7), (256, 40, 300)])
def test_dense(bname, dtype, act, m, n_in, n_out):
    _dense_case(bname, dtype, m, n_in, n_out, act, use_bias=True, want_dA=True, l2=0.01)


@backend_param
@dtype_param
@pytest.mark.parametrize("use_bias,want_dA,l2", [(False, False, 0.0), (False, True, 0.3), (True, False, 0.0)])
def test_dense_optional_outputs(bname, dtype, use_bias, want_dA, l2):
    # Empty b/db ((0,)) and dA_prev ((0, 0)) mean "not computed".
    for act in (RELU, SIGMOID):
        _dense_case(bname, dtype, 9, 13, 11, act, use_bias, want_dA, l2)
        _dense_case(bname, dtype, 300, 13, 257, act, use_bias, want_dA, l2)


@backend_param
@dtype_param
@pytest.mark.parametrize("act", ACTS)
def test_dense_backward_dZ_aliases_dout(bname, dtype, act):
    be = get_backend(bname)
    for m, n_in, n_out in ((5, 7, 9), (260, 31, 300)):
        rng = rng_for(3, m, act)
        A = randn(rng, (m, n_in), dtype)
        W = randn(rng, (n_in, n_out), dtype)
        out = np.empty((m, n_out), dtype)
        reference.dense_forward(A, W, np.zeros(0, dtype), act, out)
        dout = randn(rng, (m, n_out), dtype)
        exp = [nan_like(dout), nan_like(W), np.empty(n_out, dtype), nan_like(A)]
        reference.dense_backward(A, W, out, dout.copy(), act, 0.1, *exp)
        buf = dout.copy()
        got = [buf, nan_like(W), np.empty(n_out, dtype), nan_like(A)]
        be.dense_backward(A, W, out, buf, act, 0.1, *got)
        absA, absW, absdZ = (np.abs(x.astype(np.float64)) for x in (A, W, exp[0]))
        scales = [None, float(np.max(absA.T @ absdZ + 0.1 * absW)), float(np.max(absdZ.sum(axis=0))),
                  float(np.max(absdZ @ absW.T))]
        for r, x, sc in zip(exp, got, scales):
            assert_close(x, r, dtype, scale=sc)


@backend_param
@dtype_param
@FUZZ
@given(m=st.integers(1, 70), n_in=st.integers(1, 70), n_out=st.integers(1, 140), act=st.sampled_from(ACTS),
       use_bias=st.booleans(), want_dA=st.booleans())
def test_dense_fuzz(bname, dtype, m, n_in, n_out, act, use_bias, want_dA):
    _dense_case(bname, dtype, m, n_in, n_out, act, use_bias, want_dA, l2=0.05)


# --------------------------------------------------------------------------- activations


@backend_param
@dtype_param
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("shape", SHAPES)
def test_activation_forward_backward(bname, dtype, act, shape):
    be = get_backend(bname)
    rng = rng_for(5, shape, act)
    Z = randn(rng, shape, dtype, scale=3.0)
    out_r, out_b = nan_like(Z), nan_like(Z)
    reference.activation_forward(Z, act, out_r)
    be.activation_forward(Z, act, out_b)
    assert_close(out_b, out_r, dtype)
    dout = randn(rng, shape, dtype)
    dz_r, dz_b = nan_like(Z), nan_like(Z)
    reference.activation_backward(out_r, dout, act, dz_r)
    be.activation_backward(out_r, dout, act, dz_b)
    assert_close(dz_b, dz_r, dtype)


@backend_param
@dtype_param
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("shape", [(7, 17), (257, 300)])
def test_activation_in_place(bname, dtype, act, shape):
    be = get_backend(bname)
    rng = rng_for(6, shape, act)
    Z = randn(rng, shape, dtype, scale=3.0)
    exp = nan_like(Z)
    reference.activation_forward(Z, act, exp)
    buf = Z.copy()
    be.activation_forward(buf, act, buf)            # out aliases Z
    assert_close(buf, exp, dtype)
    dout = randn(rng, shape, dtype)
    dexp = nan_like(Z)
    reference.activation_backward(exp, dout, act, dexp)
    dbuf = dout.copy()
    be.activation_backward(exp, dbuf, act, dbuf)    # dZ aliases dout
    assert_close(dbuf, dexp, dtype)


@backend_param
@dtype_param
@pytest.mark.parametrize("act", ACTS)
def test_activation_special_values(bname, dtype, act):
    # NaN propagates like NumPy; +-inf and huge values saturate without NaN.
    be = get_backend(bname)
    Z = np.array([[np.nan, np.inf, -np.inf, 0.0, -0.0, 1e4, -1e4, 88.0, -88.0, 800.0, -800.0, 1e-30]], dtype)
    out_r, out_b = nan_like(Z), nan_like(Z)
    with np.errstate(all="ignore"):
        reference.activation_forward(Z, act, out_r)
    be.activation_forward(Z, act, out_b)
    np.testing.assert_allclose(out_b, out_r, rtol=RTOL[np.dtype(dtype)], atol=0)


@backend_param
def test_unknown_activation_code_raises(bname):
    be = get_backend(bname)
    Z = np.ones((2, 3), np.float32)
    for bad in (4, -1):
        with pytest.raises(ValueError):
            be.activation_forward(Z, bad, np.empty_like(Z))
        with pytest.raises(ValueError):
            be.dense_forward(Z, np.ones((3, 3), np.float32), np.zeros(3, np.float32), bad, np.empty_like(Z))


# --------------------------------------------------------------------------- batchnorm


def _bn_case(bname, dtype, m, n, offset=0.0, scale=1.0, seed=0):
    be = get_backend(bname)
    rng = rng_for(seed, m, n)
    Z = (rng.standard_normal((m, n)) * scale + offset).astype(dtype)
    gamma = randn(rng, (n,), dtype) + dtype(1)
    beta = randn(rng, (n,), dtype)
    rm0 = randn(rng, (n,), dtype)
    rv0 = np.abs(randn(rng, (n,), dtype)) + dtype(0.5)
    res = {}
    for key, mod in (("r", reference), ("b", be)):
        rm, rv = rm0.copy(), rv0.copy()
        mean, inv_std = nan_like(rm0), nan_like(rm0)
        out = nan_like(Z)
        mod.batchnorm_forward_train(Z, gamma, beta, 1e-5, 0.9, rm, rv, mean, inv_std, out)
        res[key] = dict(rm=rm, rv=rv, mean=mean, inv_std=inv_std, out=out)
    rt = RTOL[np.dtype(dtype)]
    # Conditioning: the mean of a centred feature is a cancellation (judge it on
    # the data's scale), and out = (z - mean)*inv_std amplifies the mean's
    # rounding (eps*|offset|, in the reference too) by 1/std.
    cond = 1.0 + (abs(offset) / scale if scale else 0.0)
    for k in res["r"]:
        if k == "mean":
            np.testing.assert_allclose(res["b"][k], res["r"][k], rtol=rt, atol=rt * (abs(offset) + scale),
                                       err_msg=k)
        elif k == "out":
            np.testing.assert_allclose(res["b"][k], res["r"][k], rtol=rt,
                                       atol=rt * cond * float(np.max(np.abs(res["r"][k]))), err_msg=k)
        else:
            assert_close(res["b"][k], res["r"][k], dtype, what=f"batchnorm_forward_train {k}")

    # backward with the reference's saved statistics, plus an aliasing run
    mean, inv_std = res["r"]["mean"], res["r"]["inv_std"]
    dout = randn(rng, (m, n), dtype)
    exp = [nan_like(Z), nan_like(gamma), nan_like(gamma)]
    reference.batchnorm_backward(Z, gamma, mean, inv_std, dout, *exp)
    got = [nan_like(Z), nan_like(gamma), nan_like(gamma)]
    be.batchnorm_backward(Z, gamma, mean, inv_std, dout.copy(), *got)
    # dZ = gamma*inv_std/m*(m*dy - dbeta - x_hat*dgamma) cancels: absolute floor on the m*dy scale
    scale_dz = float(np.max(np.abs(gamma * inv_std))) * max(1.0, float(np.max(np.abs(dout))))
    np.testing.assert_allclose(got[0], exp[0], rtol=rt, atol=rt * scale_dz, err_msg="dZ")
    np.testing.assert_allclose(got[1], exp[1], rtol=rt, atol=rt * m * max(1.0, float(np.max(np.abs(dout)))),
                               err_msg="dgamma")
    np.testing.assert_allclose(got[2], exp[2], rtol=rt, atol=rt * m * max(1.0, float(np.max(np.abs(dout)))),
                               err_msg="dbeta")
    buf = dout.copy()
    got2 = [nan_like(gamma), nan_like(gamma)]
    be.batchnorm_backward(Z, gamma, mean, inv_std, buf, buf, *got2)     # dZ aliases dout
    np.testing.assert_array_equal(buf, got[0])
    np.testing.assert_array_equal(got2[0], got[1])
    np.testing.assert_array_equal(got2[1], got[2])

    # inference with the updated running statistics
    out_r, out_b = nan_like(Z), nan_like(Z)
    rm, rv = res["r"]["rm"], res["r"]["rv"]
    reference.batchnorm_forward_infer(Z, gamma, beta, rm, rv, 1e-5, out_r)
    be.batchnorm_forward_infer(Z, gamma, beta, rm, rv, 1e-5, out_b)
    assert_close(out_b, out_r, dtype, what="batchnorm_forward_infer")


@backend_param
@dtype_param
@pytest.mark.parametrize("shape", SHAPES + [(1000, 70), (2, 40000)])
def test_batchnorm(bname, dtype, shape):
    _bn_case(bname, dtype, *shape)


@backend_param
@dtype_param
def test_batchnorm_large_offset_is_stable(bname, dtype):
    # mean 1e4, std 1: a naive E[z^2] - E[z]^2 in float32 would lose every digit.
    _bn_case(bname, dtype, 513, 37, offset=1e4, scale=1.0)
    _bn_case(bname, dtype, 300, 300, offset=-3e3, scale=0.1)


@backend_param
@dtype_param
def test_batchnorm_constant_feature(bname, dtype):
    # var = 0: inv_std = 1/sqrt(eps), x_hat = 0, no NaN.
    _bn_case(bname, dtype, 64, 5, offset=2.0, scale=0.0)


@backend_param
@dtype_param
@FUZZ
@given(m=st.integers(1, 200), n=st.integers(1, 90), offset=st.sampled_from([0.0, 5.0, -100.0]))
def test_batchnorm_fuzz(bname, dtype, m, n, offset):
    _bn_case(bname, dtype, m, n, offset=offset)


# --------------------------------------------------------------------------- losses


def _sce_case(bname, dtype, m, k, scale=3.0, seed=0, want_grad=True):
    be = get_backend(bname)
    rng = rng_for(seed, m, k)
    Z = randn(rng, (m, k), dtype, scale=scale)
    y = rng.integers(0, k, size=m).astype(np.int64)
    dz_r = nan_like(Z) if want_grad else np.empty((0, 0), dtype)
    dz_b = nan_like(Z) if want_grad else np.empty((0, 0), dtype)
    l_r = reference.softmax_cross_entropy(Z, y, dz_r)
    l_b = be.softmax_cross_entropy(Z, y, dz_b)
    assert_loss_close(l_b, l_r, dtype)
    assert dz_b.shape == dz_r.shape
    # dZ = (p - onehot)/m: p_y - 1 cancels when p_y ~ 1, so the floor is on the 1/m scale
    assert_close(dz_b, dz_r, dtype, scale=1.0 / m)
    return Z


@backend_param
@dtype_param
@pytest.mark.parametrize("shape", [(1, 1), (1, 10), (3, 2), (7, 17), (33, 65), (128, 10), (130, 1000), (65, 3)])
@pytest.mark.parametrize("want_grad", [True, False])
def test_softmax_cross_entropy(bname, dtype, shape, want_grad):
    _sce_case(bname, dtype, *shape, want_grad=want_grad)


@backend_param
@dtype_param
@pytest.mark.parametrize("scale", [1e4, 1e3, 50.0])
def test_softmax_cross_entropy_huge_logits(bname, dtype, scale):
    # Logits of +-1e4: finite loss and gradient (max-shifted, logsumexp form).
    _sce_case(bname, dtype, 17, 11, scale=scale)
    be = get_backend(bname)
    Z = np.array([[1e4, -1e4, 0.0], [-1e4, -1e4, -1e4], [1e4, 1e4, -1e4]], dtype)
    y = np.array([1, 0, 2])
    dz = nan_like(Z)
    loss = be.softmax_cross_entropy(Z, y, dz)
    assert np.isfinite(loss) and np.all(np.isfinite(dz))
    dz_r = nan_like(Z)
    assert_loss_close(loss, reference.softmax_cross_entropy(Z, y, dz_r), dtype)
    assert_close(dz, dz_r, dtype)


@backend_param
@dtype_param
def test_softmax_cross_entropy_nan_propagates(bname, dtype):
    be = get_backend(bname)
    Z = np.array([[0.0, np.nan, 1.0], [1.0, 2.0, 3.0]], dtype)
    dz = nan_like(Z)
    loss = be.softmax_cross_entropy(Z, np.array([0, 1]), dz)
    assert np.isnan(loss)
    assert np.all(np.isnan(dz[0])) and np.all(np.isfinite(dz[1]))


@backend_param
def test_softmax_cross_entropy_rejects_bad_labels(bname):
    be = get_backend(bname)
    Z = np.zeros((4, 3), np.float32)
    with pytest.raises((ValueError, IndexError)):
        be.softmax_cross_entropy(Z, np.array([0, 1, 3, 2]), np.empty_like(Z))


@backend_param
@dtype_param
@FUZZ
@given(m=st.integers(1, 80), k=st.integers(1, 40), scale=st.sampled_from([0.1, 3.0, 300.0]))
def test_softmax_cross_entropy_fuzz(bname, dtype, m, k, scale):
    _sce_case(bname, dtype, m, k, scale=scale)


@backend_param
@dtype_param
@pytest.mark.parametrize("shape", [(1, 1), (1, 10), (7, 17), (128, 10), (130, 1000)])
@pytest.mark.parametrize("scale", [3.0, 1e4])
def test_softmax(bname, dtype, shape, scale):
    be = get_backend(bname)
    rng = rng_for(8, shape)
    Z = randn(rng, shape, dtype, scale=scale)
    out_r, out_b = nan_like(Z), nan_like(Z)
    reference.softmax(Z, out_r)
    be.softmax(Z, out_b)
    assert_close(out_b, out_r, dtype)
    np.testing.assert_allclose(out_b.sum(axis=1), 1.0, rtol=10 * RTOL[np.dtype(dtype)])


@backend_param
@dtype_param
@pytest.mark.parametrize("m", [1, 2, 7, 33, 130, 1000])
@pytest.mark.parametrize("scale", [3.0, 1e4])
@pytest.mark.parametrize("want_grad", [True, False])
def test_sigmoid_bce(bname, dtype, m, scale, want_grad):
    be = get_backend(bname)
    rng = rng_for(9, m)
    Z = randn(rng, (m, 1), dtype, scale=scale)
    y = rng.integers(0, 2, size=m).astype(dtype)
    dz_r = nan_like(Z) if want_grad else np.empty((0, 0), dtype)
    dz_b = nan_like(Z) if want_grad else np.empty((0, 0), dtype)
    l_r = reference.sigmoid_bce(Z, y, dz_r)
    l_b = be.sigmoid_bce(Z, y, dz_b)
    assert_loss_close(l_b, l_r, dtype)
    assert_close(dz_b, dz_r, dtype)


@backend_param
@dtype_param
@pytest.mark.parametrize("shape", [(1, 2), (7, 3), (130, 17)])
@pytest.mark.parametrize("weighted", [False, True])
def test_sigmoid_bce_multilabel(bname, dtype, shape, weighted):
    """k > 1 outputs (multilabel, (m, k) targets): per-row loss = sum over the k outputs."""
    be = get_backend(bname)
    rng = rng_for(12, shape)
    Z = randn(rng, shape, dtype, scale=3.0)
    y = rng.integers(0, 2, size=shape).astype(dtype)
    extra = (rng.uniform(0, 2, shape[0]),) if weighted else ()
    dz_r, dz_b = nan_like(Z), nan_like(Z)
    l_r = reference.sigmoid_bce(Z, y, dz_r, *extra)
    l_b = be.sigmoid_bce(Z, y, dz_b, *extra)
    assert_loss_close(l_b, l_r, dtype)
    assert_close(dz_b, dz_r, dtype)


@backend_param
@dtype_param
@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (7, 3), (33, 65), (130, 1)])
@pytest.mark.parametrize("want_grad", [True, False])
def test_mse(bname, dtype, shape, want_grad):
    be = get_backend(bname)
    rng = rng_for(10, shape)
    Yhat = randn(rng, shape, dtype)
    Y = randn(rng, shape, dtype)
    dz_r = nan_like(Yhat) if want_grad else np.empty((0, 0), dtype)
    dz_b = nan_like(Yhat) if want_grad else np.empty((0, 0), dtype)
    l_r = reference.mse(Yhat, Y, dz_r)
    l_b = be.mse(Yhat, Y, dz_b)
    assert_loss_close(l_b, l_r, dtype)
    assert_close(dz_b, dz_r, dtype)


@backend_param
@dtype_param
@pytest.mark.parametrize("loss", ["softmax_cross_entropy", "sigmoid_bce", "mse"])
@pytest.mark.parametrize("m", [1, 7, 130, 1000])
@pytest.mark.parametrize("want_grad", [True, False])
def test_weighted_losses(bname, dtype, loss, m, want_grad):
    """Per-example weights (contract: sw left to right, loss sum(w L)/sw, dZ_i = w_i/sw * g_i)."""
    be = get_backend(bname)
    rng = rng_for(11, m, loss)
    k = {"softmax_cross_entropy": 10, "sigmoid_bce": 1, "mse": 3}[loss]
    Z = randn(rng, (m, k), dtype, scale=3.0)
    y = {"softmax_cross_entropy": lambda: rng.integers(0, k, size=m).astype(np.int64),
         "sigmoid_bce": lambda: rng.integers(0, 2, size=m).astype(dtype),
         "mse": lambda: randn(rng, (m, k), dtype)}[loss]()
    w = rng.uniform(0.0, 2.0, m)
    w[::3] = 0.0 if m > 1 else w[::3]          # zero weights are allowed
    dz_r = nan_like(Z) if want_grad else np.empty((0, 0), dtype)
    dz_b = nan_like(Z) if want_grad else np.empty((0, 0), dtype)
    l_r = getattr(reference, loss)(Z, y, dz_r, w)
    l_b = getattr(be, loss)(Z, y, dz_b, w)
    assert_loss_close(l_b, l_r, dtype)
    assert_close(dz_b, dz_r, dtype, scale=1.0 / m)
    # all-zero weights: the batch contributes nothing
    dz0 = nan_like(Z)
    assert getattr(be, loss)(Z, y, dz0, np.zeros(m)) == 0.0
    assert (dz0 == 0).all()


# --------------------------------------------------------------------------- dropout


def _dropout_case(bname, dtype, shape, keep_prob, seed, step, layer):
    be = get_backend(bname)
    rng = rng_for(11, shape)
    A = randn(rng, shape, dtype)
    res = []
    for mod in (reference, be):
        mask = np.full(shape, 7, np.uint8)
        out = nan_like(A)
        mod.dropout_forward(A, keep_prob, seed, step, layer, mask, out)
        res.append((mask, out))
    (mask_r, out_r), (mask_b, out_b) = res
    np.testing.assert_array_equal(mask_b, mask_r)            # bit-identical masks
    assert_close(out_b, out_r, dtype)
    dout = randn(rng, shape, dtype)
    da_r, da_b = nan_like(A), nan_like(A)
    reference.dropout_backward(dout, mask_r, keep_prob, da_r)
    be.dropout_backward(dout, mask_r, keep_prob, da_b)
    assert_close(da_b, da_r, dtype)
    return mask_r


@backend_param
@dtype_param
@pytest.mark.parametrize("shape", SHAPES + [(128, 4096)])
@pytest.mark.parametrize("keep_prob", [0.5, 0.8])
def test_dropout(bname, dtype, shape, keep_prob):
    _dropout_case(bname, dtype, shape, keep_prob, seed=42, step=3, layer=1)


@backend_param
@pytest.mark.parametrize("keep_prob", [1e-9, 0.1, 0.999999, 1.0])
@pytest.mark.parametrize("seed,step,layer", [(0, 1, 0), (2**63 + 12345, 10**12, 7), (-1, 2**64 - 1, 2**40)])
def test_dropout_mask_edges(bname, keep_prob, seed, step, layer):
    # Extreme keys (seeds past 2**63, negative seed) and thresholds near 0 and 2**32.
    mask = _dropout_case(bname, np.float32, (33, 65), keep_prob, seed, step, layer)
    if keep_prob == 1.0:
        assert mask.all()


@backend_param
@dtype_param
def test_dropout_in_place(bname, dtype):
    be = get_backend(bname)
    for shape in ((7, 9), (300, 257)):
        rng = rng_for(12, shape)
        A = randn(rng, shape, dtype)
        mask_r, out_r = np.empty(shape, np.uint8), nan_like(A)
        reference.dropout_forward(A, 0.7, 5, 2, 3, mask_r, out_r)
        buf, mask = A.copy(), np.empty(shape, np.uint8)
        be.dropout_forward(buf, 0.7, 5, 2, 3, mask, buf)       # out aliases A
        np.testing.assert_array_equal(mask, mask_r)
        assert_close(buf, out_r, dtype)
        dout = randn(rng, shape, dtype)
        da_r = nan_like(A)
        reference.dropout_backward(dout, mask_r, 0.7, da_r)
        be.dropout_backward(dout, mask, 0.7, dout)              # dA aliases dout
        assert_close(dout, da_r, dtype)


@backend_param
@FUZZ
@given(m=st.integers(1, 300), n=st.integers(1, 300), keep_prob=st.floats(0.05, 1.0),
       seed=st.integers(0, 2**64 - 1), step=st.integers(0, 2**40), layer=st.integers(0, 1000))
def test_dropout_fuzz(bname, m, n, keep_prob, seed, step, layer):
    _dropout_case(bname, np.float32, (m, n), keep_prob, seed, step, layer)


def test_dropout_mask_independent_of_threads():
    if "numba" not in BACKENDS:
        pytest.skip("numba backend not available")
    import numba

    from fastdl.backends import numba as nb

    be = get_backend("numba")
    A = np.ones((300, 1000), np.float32)
    masks = []
    old = numba.get_num_threads()
    try:
        nb.set_parallel(True, dropout=0)           # force the prange variant
        for nt in sorted({1, old}):
            numba.set_num_threads(nt)
            mask = np.empty(A.shape, np.uint8)
            be.dropout_forward(A, 0.5, 1, 2, 3, mask, np.empty_like(A))
            masks.append(mask)
    finally:
        numba.set_num_threads(old)
        nb.set_parallel(True)
    for mk in masks[1:]:
        np.testing.assert_array_equal(mk, masks[0])


# --------------------------------------------------------------------------- optimisers

OPT_SIZES = [1, 3, 7, 17, 33, 65, 130, 1001, 70001]


def _run_opt(mod, name, p, g_seq, state, **kw):
    """``len(g_seq)`` steps of optimiser ``name`` with the coefficients the plan computes for each step."""
    kind = {"sgd": OPT_SGD, "momentum": OPT_MOMENTUM, "rmsprop": OPT_RMSPROP, "adam": OPT_ADAM,
            "nesterov": OPT_NESTEROV, "classical": OPT_CLASSICAL_MOMENTUM}[name]
    spec = OptimizerSpec(kind, (kw.get("beta", kw.get("beta1", kw.get("mu", 0.0))), kw.get("beta2", 0.0),
                                kw.get("eps", 0.0)), kw.get("bias_correction", False))
    for t, g in enumerate(g_seq, start=1):
        c1, c2 = step_scalars(spec, kw["lr"], t)
        if name == "sgd":
            mod.sgd_step(p, g, c1)
        elif name == "momentum":
            mod.momentum_step(p, g, state[0], kw["beta"], c1)
        elif name in ("nesterov", "classical"):
            mod.nesterov_step(p, g, state[0], kw["mu"], c1, name == "nesterov")
        elif name == "rmsprop":
            mod.rmsprop_step(p, g, state[0], c1, kw["beta2"], kw["eps"])
        elif name == "adam":
            mod.adam_step(p, g, state[0], state[1], kw["beta1"], kw["beta2"], kw["eps"], c1, c2)


OPT_CASES = {
    "sgd": dict(lr=0.05),
    "momentum": dict(lr=0.05, beta=0.9, bias_correction=False),
    "momentum_bc": dict(lr=0.05, beta=0.9, bias_correction=True),
    "nesterov": dict(lr=0.05, mu=0.9),
    "nesterov_odd": dict(lr=0.3, mu=0.5),
    "classical": dict(lr=0.05, mu=0.9),
    "rmsprop": dict(lr=1e-3, beta2=0.999, eps=1e-8),
    "adam": dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8),
    "adam_odd": dict(lr=0.3, beta1=0.5, beta2=0.9, eps=1e-4),
}


@backend_param
@dtype_param
@pytest.mark.parametrize("case", list(OPT_CASES))
@pytest.mark.parametrize("n", OPT_SIZES)
def test_optimizer_many_steps(bname, dtype, case, n):
    be = get_backend(bname)
    name = case.split("_")[0]
    kw = OPT_CASES[case]
    rng = rng_for(13, n, case)
    steps = 30 if n > 10000 else 60
    p0 = randn(rng, (n,), dtype)
    grads = [randn(rng, (n,), dtype) for _ in range(steps)]
    nstate = {"sgd": 0, "momentum": 1, "nesterov": 1, "classical": 1, "rmsprop": 1, "adam": 2}[name]
    res = []
    for mod in (reference, be):
        p = p0.copy()
        state = [np.zeros(n, dtype) for _ in range(nstate)]
        _run_opt(mod, name, p, grads, state, **kw)
        res.append([p] + state)
    for r, x in zip(res[0], res[1]):
        assert_close(x, r, dtype)


@backend_param
@dtype_param
def test_optimizer_zero_grad_and_first_step(bname, dtype):
    # t = 1 bias correction with zero state and zero gradient: no NaN (eps > 0).
    be = get_backend(bname)
    n = 37
    p, g = np.ones(n, dtype), np.zeros(n, dtype)
    v, s = np.zeros(n, dtype), np.zeros(n, dtype)
    be.adam_step(p, g, v, s, 0.9, 0.999, 1e-8, 1e-3 / (1 - 0.9), 1 / (1 - 0.999))
    np.testing.assert_array_equal(p, np.ones(n, dtype))
    be.rmsprop_step(p, g, s, 1e-3, 0.999, 1e-8)
    be.momentum_step(p, g, v, 0.9, 1e-3 / (1 - 0.9))
    be.nesterov_step(p, g, v, 0.9, 1e-3, True)
    be.nesterov_step(p, g, v, 0.9, 1e-3, False)
    np.testing.assert_array_equal(p, np.ones(n, dtype))


# --------------------------------------------------------------------------- reductions


@backend_param
@dtype_param
@pytest.mark.parametrize("n", [0, 1, 3, 7, 8, 9, 17, 33, 65, 130, 1001, 65537, 300001])
def test_sum_squares(bname, dtype, n):
    be = get_backend(bname)
    x = randn(rng_for(14, n), (n,), dtype, scale=10.0)
    got = be.sum_squares(x)
    assert isinstance(got, float)
    # float64 accumulation: even float32 input agrees to ~1e-12
    np.testing.assert_allclose(got, reference.sum_squares(x), rtol=1e-12, atol=0)


@backend_param
def test_sum_squares_float32_accumulates_in_float64(bname):
    be = get_backend(bname)
    x = np.full(10**6 + 3, 0.1, np.float32)
    exact = float(np.float64(np.float32(0.1)) ** 2 * x.size)
    np.testing.assert_allclose(be.sum_squares(x), exact, rtol=1e-12)


@backend_param
@dtype_param
@pytest.mark.parametrize("n", [0, 1, 3, 7, 8, 9, 17, 33, 65, 130, 1001, 65537, 300001])
def test_all_finite(bname, dtype, n):
    be = get_backend(bname)
    x = randn(rng_for(15, n), (n,), dtype, scale=1e30 if dtype == np.float64 else 1e3)
    assert be.all_finite(x) is True
    rng = np.random.default_rng(n)
    for bad in (np.nan, np.inf, -np.inf):
        for pos in ({0, n - 1, n // 2, int(rng.integers(0, n))} if n else set()):
            y = x.copy()
            y[pos] = bad
            assert be.all_finite(y) is False, (bad, pos)
    # the largest finite value and subnormals are finite
    z = np.array([np.finfo(dtype).max, -np.finfo(dtype).max, np.finfo(dtype).smallest_subnormal, 0.0], dtype)
    assert be.all_finite(z) is True


# --------------------------------------------------------------------------- numba: serial == parallel


@pytest.mark.skipif("numba" not in BACKENDS or not hasattr(__import__("os"), "fork"), reason="numba/fork")
def test_numba_kernels_work_in_a_forked_child():
    # GNU OpenMP is not fork-safe; the backend switches a forked child to its
    # serial variants, so a child of a process that ran parallel kernels works.
    import os

    from fastdl.backends import numba as nb

    p = np.ones(1 << 20, np.float32)
    g, v, s = p.copy(), np.zeros_like(p), np.zeros_like(p)
    nb.set_parallel(True, adam=0)
    c = {t: step_scalars(OptimizerSpec(OPT_ADAM, (0.9, 0.999, 1e-8)), 1e-3, t) for t in (1, 2)}
    nb.adam_step(p, g, v, s, 0.9, 0.999, 1e-8, *c[1])        # parallel region in the parent
    expected = p.copy()
    reference.adam_step(expected, g, v.copy(), s.copy(), 0.9, 0.999, 1e-8, *c[2])
    pid = os.fork()
    if pid == 0:                                                 # child: exit code reports the result
        code = 1
        try:
            nb.adam_step(p, g, v, s, 0.9, 0.999, 1e-8, *c[2])
            code = 0 if np.allclose(p, expected, rtol=1e-5) else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    nb.set_parallel(True)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, f"child status {status}"


_CYTHON_FORK_CHILD = """
import os, sys
import numpy as np
import fastdl as fd
K = fd.get_backend("cython").unchecked
n = 1 << 22
def adam(p):
    g, v, s = np.full_like(p, 0.5), np.zeros_like(p), np.zeros_like(p)
    K.adam_step(p, g, v, s, 0.9, 0.999, 1e-8, 1e-3, 1.0)
    return p
with fd.backends.use("cython", threads=2):
    expected = adam(np.ones(n, np.float32))        # a 2-thread region in the parent
pid = os.fork()
if pid == 0:
    code = 1
    try:
        with fd.backends.use("cython", threads=2):
            got = adam(np.ones(n, np.float32))
        code = 0 if np.array_equal(got, expected) else 2
    finally:
        os._exit(code)
_, status = os.waitpid(pid, 0)
sys.exit(os.WEXITSTATUS(status) if os.WIFEXITED(status) else 3)
"""


@pytest.mark.skipif("cython" not in BACKENDS or not hasattr(__import__("os"), "fork"), reason="cython/fork")
def test_cython_kernels_work_in_a_forked_child():
    # libgomp hangs in a fork()ed child whose parent ran a parallel region; the Cython kernels
    # mark the child at fork (fastdl_common.h) and run serially there, with the same bits.
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", _CYTHON_FORK_CHILD], timeout=120, capture_output=True, text=True)
    assert r.returncode == 0, (r.returncode, r.stderr[-2000:])


@pytest.mark.skipif("numba" not in BACKENDS, reason="numba backend not available")
@dtype_param
def test_numba_serial_and_parallel_variants_bit_identical(dtype):
    # The prange variants share the serial variants' chunk helpers and
    # shape-only partitions: forcing either must give the same bits.
    from fastdl.backends import numba as nb

    rng = rng_for(15)
    m, n = 130, 257
    Z = randn(rng, (m, n), dtype)
    W = randn(rng, (n, 33), dtype)
    dout = randn(rng, (m, n), dtype)
    y = rng.integers(0, n, size=m)
    flat = randn(rng, (m * n,), dtype)

    def run_all():
        res = []
        for act in ACTS:
            o = nan_like(np.empty((m, 33), dtype))
            nb.dense_forward(Z, W, np.ones(33, dtype), act, o)
            a, d = nan_like(Z), nan_like(Z)
            nb.activation_forward(Z, act, a)
            nb.activation_backward(a, dout, act, d)
            res += [o, a, d]
        st = [np.ones(n, dtype), np.ones(n, dtype), nan_like(Z[0]), nan_like(Z[0])]
        o = nan_like(Z)
        nb.batchnorm_forward_train(Z, st[0] * 2, st[1], 1e-5, 0.9, *st, o)
        dz, dg, dbt = nan_like(Z), nan_like(Z[0]), nan_like(Z[0])
        nb.batchnorm_backward(Z, st[0], st[2], st[3], dout, dz, dg, dbt)
        oi = nan_like(Z)
        nb.batchnorm_forward_infer(Z, st[0], st[1], st[0], st[1], 1e-5, oi)
        res += st + [o, dz, dg, dbt, oi]
        dce, sm = nan_like(Z), nan_like(Z)
        res += [np.array(nb.softmax_cross_entropy(Z, y, dce)), dce]
        nb.softmax(Z, sm)
        res.append(sm)
        mask, do, da = np.empty(Z.shape, np.uint8), nan_like(Z), nan_like(Z)
        nb.dropout_forward(Z, 0.6, 1, 2, 3, mask, do)
        nb.dropout_backward(dout, mask, 0.6, da)
        res += [mask, do, da]
        p, v, s = flat.copy(), np.zeros_like(flat), np.zeros_like(flat)
        for t in range(1, 4):
            c1, c2 = step_scalars(OptimizerSpec(OPT_ADAM, (0.9, 0.999, 1e-8)), 1e-2, t)
            nb.adam_step(p, dout.reshape(-1), v, s, 0.9, 0.999, 1e-8, c1, c2)
            nb.rmsprop_step(p, dout.reshape(-1), s, 1e-2, 0.9, 1e-8)
            nb.momentum_step(p, dout.reshape(-1), v, 0.9, 1e-2 / (1 - 0.9 ** t))
            nb.nesterov_step(p, dout.reshape(-1), v, 0.9, 1e-2, t % 2 == 0)
            nb.sgd_step(p, dout.reshape(-1), 1e-2)
        res += [p, v, s, np.array(nb.sum_squares(flat))]
        return res

    try:
        nb.set_parallel(False)
        serial = run_all()
        nb.set_parallel(True, **{k: 0 for k in nb.THRESHOLD_NAMES})
        parallel = run_all()
    finally:
        nb.set_parallel(True)
    assert len(serial) == len(parallel)
    for i, (a, b) in enumerate(zip(serial, parallel)):
        np.testing.assert_array_equal(a, b, err_msg=f"result #{i}")
