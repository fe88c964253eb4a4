"""The NumPy reference backend against independent, straightforward computations.

Every expected value here is written out from docs/spec.md (loops or plain
formulas), not by calling the backend again, so a slip in the reference
(the oracle of every compiled backend) shows up here.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
from threadpoolctl import threadpool_limits

from fastdl.backends import reference as R
from fastdl.backends.contract import IDENTITY, RELU, SIGMOID, TANH, dropout_key, keep_threshold
from fastdl.plan import OPT_ADAM, OPT_MOMENTUM, OptimizerSpec, step_scalars

DTYPES = [np.float32, np.float64]
ACTS = [IDENTITY, RELU, TANH, SIGMOID]


@pytest.fixture(autouse=True)
def _one_blas_thread():
    """Tiny matrices: a multi-threaded BLAS only adds synchronisation cost (seconds on a
    loaded 2-core machine). Results do not depend on the thread count."""
    with threadpool_limits(1):
        yield


def tol(dtype):
    return dict(rtol=1e-5, atol=1e-5) if dtype == np.float32 else dict(rtol=1e-12, atol=1e-12)


def g_scalar(z: float, act: int) -> float:
    if act == IDENTITY:
        return z
    if act == RELU:
        return z if z > 0 else 0.0
    if act == TANH:
        return math.tanh(z)
    return 1.0 / (1.0 + math.exp(-z))


def gprime_from_z(z: float, act: int) -> float:
    if act == IDENTITY:
        return 1.0
    if act == RELU:
        return 1.0 if z > 0 else 0.0
    if act == TANH:
        return 1.0 - math.tanh(z) ** 2
    s = 1.0 / (1.0 + math.exp(-z))
    return s * (1.0 - s)


def loop_matmul(A, B):
    m, k = A.shape
    n = B.shape[1]
    out = np.zeros((m, n))
    for i in range(m):
        for j in range(n):
            out[i, j] = math.fsum(float(A[i, p]) * float(B[p, j]) for p in range(k))
    return out


# ----------------------------------------------------------------------------- dense


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("use_bias", [True, False])
def test_dense_forward(dtype, act, use_bias):
    rng = np.random.default_rng(act + 10 * use_bias)
    m, n_in, n_out = 5, 4, 3
    A = rng.standard_normal((m, n_in)).astype(dtype)
    W = rng.standard_normal((n_in, n_out)).astype(dtype)
    b = rng.standard_normal(n_out).astype(dtype) if use_bias else np.empty(0, dtype)
    out = np.full((m, n_out), np.nan, dtype)
    R.dense_forward(A, W, b, act, out)
    Z = loop_matmul(A, W) + (b.astype(np.float64) if use_bias else 0.0)
    expected = np.array([[g_scalar(Z[i, j], act) for j in range(n_out)] for i in range(m)])
    np.testing.assert_allclose(out, expected, **tol(dtype))
    assert out.dtype == dtype


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("l2", [0.0, 0.3])
def test_dense_backward(dtype, act, l2):
    rng = np.random.default_rng(100 + act)
    m, n_in, n_out = 6, 4, 3
    A = rng.standard_normal((m, n_in)).astype(dtype)
    W = rng.standard_normal((n_in, n_out)).astype(dtype)
    b = rng.standard_normal(n_out).astype(dtype)
    Z = loop_matmul(A, W) + b.astype(np.float64)
    out = np.array([[g_scalar(z, act) for z in row] for row in Z]).astype(dtype)
    dout = rng.standard_normal((m, n_out)).astype(dtype)
    dout_copy = dout.copy()
    dZ = np.full((m, n_out), np.nan, dtype)
    dW = np.full((n_in, n_out), np.nan, dtype)
    db = np.full(n_out, np.nan, dtype)
    dA = np.full((m, n_in), np.nan, dtype)
    R.dense_backward(A, W, out, dout, act, l2, dZ, dW, db, dA)

    dZ_exp = np.array([[dout_copy[i, j] * gprime_from_z(Z[i, j], act) for j in range(n_out)]
                       for i in range(m)])
    dW_exp = np.zeros((n_in, n_out))
    for p in range(n_in):
        for j in range(n_out):
            dW_exp[p, j] = sum(float(A[i, p]) * dZ_exp[i, j] for i in range(m)) + l2 * float(W[p, j])
    db_exp = dZ_exp.sum(axis=0)
    dA_exp = np.zeros((m, n_in))
    for i in range(m):
        for p in range(n_in):
            dA_exp[i, p] = sum(dZ_exp[i, j] * float(W[p, j]) for j in range(n_out))
    # float32 sigmoid/tanh derivatives are taken from a rounded A: looser tolerance
    t = tol(dtype) if dtype == np.float64 else dict(rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(dZ, dZ_exp, **t)
    np.testing.assert_allclose(dW, dW_exp, **t)
    np.testing.assert_allclose(db, db_exp, **t)
    np.testing.assert_allclose(dA, dA_exp, **t)


def test_dense_backward_empty_slots_and_alias():
    """No bias (db of size 0), first layer (dA_prev of shape (0,0)), dZ aliasing dout."""
    rng = np.random.default_rng(7)
    A = rng.standard_normal((5, 3))
    W = rng.standard_normal((3, 2))
    out = np.maximum(A @ W, 0)
    dout = rng.standard_normal((5, 2))
    expected_dZ = dout * (out > 0)
    dW = np.empty((3, 2))
    R.dense_backward(A, W, out, dout, RELU, 0.0, dout, dW, np.empty(0), np.empty((0, 0)))
    np.testing.assert_allclose(dout, expected_dZ, rtol=1e-14)
    np.testing.assert_allclose(dW, A.T @ expected_dZ, rtol=1e-12)


def test_relu_derivative_is_zero_at_zero():
    A = np.zeros((3, 1))
    W = np.ones((1, 2))
    b = np.zeros(2)
    out = np.empty((3, 2))
    R.dense_forward(A, W, b, RELU, out)
    assert np.all(out == 0)
    dout = np.ones((3, 2))
    dZ = np.empty((3, 2))
    R.dense_backward(A, W, out, dout, RELU, 0.0, dZ, np.empty((1, 2)), np.empty(2), np.empty((3, 1)))
    assert np.all(dZ == 0)
    dZ2 = np.empty((3, 2))
    R.activation_backward(np.array([[0.0, 0.0], [0.0, 1e-30], [-0.0, 2.0]]), dout, RELU, dZ2)
    np.testing.assert_array_equal(dZ2, [[0, 0], [0, 1], [0, 1]])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", ACTS)
def test_activation_forward_backward(dtype, act):
    rng = np.random.default_rng(act)
    Z = (3 * rng.standard_normal((4, 5))).astype(dtype)
    out = np.empty_like(Z)
    R.activation_forward(Z, act, out)
    exp = np.array([[g_scalar(float(z), act) for z in row] for row in Z])
    np.testing.assert_allclose(out, exp, **tol(dtype))
    dout = rng.standard_normal(Z.shape).astype(dtype)
    dZ = np.empty_like(Z)
    R.activation_backward(out, dout, act, dZ)
    exp_d = np.array([[float(dout[i, j]) * gprime_from_z(float(Z[i, j]), act) for j in range(5)]
                      for i in range(4)])
    t = tol(dtype) if dtype == np.float64 else dict(rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(dZ, exp_d, **t)
    # aliasing: out may alias Z, dZ may alias dout
    Z2 = Z.copy()
    R.activation_forward(Z2, act, Z2)
    np.testing.assert_array_equal(Z2, out)
    d2 = dout.copy()
    R.activation_backward(out, d2, act, d2)
    np.testing.assert_array_equal(d2, dZ)


def test_sigmoid_activation_is_stable_for_huge_inputs():
    Z = np.array([[-1e4, -800.0, 0.0, 800.0, 1e4]])
    out = np.empty_like(Z)
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        R.activation_forward(Z, SIGMOID, out)
    np.testing.assert_allclose(out, [[0.0, 0.0, 0.5, 1.0, 1.0]], atol=1e-300)


# ----------------------------------------------------------------------------- batchnorm


@pytest.mark.parametrize("dtype", DTYPES)
def test_batchnorm_forward_train(dtype):
    rng = np.random.default_rng(1)
    m, n, eps, mom = 7, 4, 1e-5, 0.9
    Z = (2 * rng.standard_normal((m, n)) + 3).astype(dtype)
    gamma = rng.uniform(0.5, 1.5, n).astype(dtype)
    beta = rng.standard_normal(n).astype(dtype)
    rm0 = rng.standard_normal(n).astype(dtype)
    rv0 = rng.uniform(0.5, 2, n).astype(dtype)
    rm, rv = rm0.copy(), rv0.copy()
    mean = np.empty(n, dtype)
    inv_std = np.empty(n, dtype)
    out = np.empty((m, n), dtype)
    R.batchnorm_forward_train(Z, gamma, beta, eps, mom, rm, rv, mean, inv_std, out)
    for j in range(n):
        col = [float(Z[i, j]) for i in range(m)]
        mu = math.fsum(col) / m
        var = math.fsum((c - mu) ** 2 for c in col) / m  # biased
        assert mean[j] == pytest.approx(mu, rel=1e-6 if dtype == np.float32 else 1e-13)
        assert inv_std[j] == pytest.approx(1 / math.sqrt(var + eps), rel=1e-6 if dtype == np.float32 else 1e-12)
        for i in range(m):
            exp = float(gamma[j]) * (col[i] - mu) / math.sqrt(var + eps) + float(beta[j])
            assert out[i, j] == pytest.approx(exp, rel=1e-5, abs=1e-5 if dtype == np.float32 else 1e-12)
        assert rm[j] == pytest.approx(0.9 * float(rm0[j]) + 0.1 * mu, rel=1e-6, abs=1e-6)
        assert rv[j] == pytest.approx(0.9 * float(rv0[j]) + 0.1 * var, rel=1e-6, abs=1e-6)
    # batch output has per-feature mean beta and (almost) std gamma
    np.testing.assert_allclose(out.astype(np.float64).mean(0), beta, atol=1e-5)


def test_batchnorm_running_average_converges_to_batch_stats():
    rng = np.random.default_rng(2)
    Z = rng.standard_normal((50, 3)) * [1.0, 2.0, 3.0] + [5.0, -1.0, 0.0]
    rm, rv = np.zeros(3), np.ones(3)
    mean, inv_std, out = np.empty(3), np.empty(3), np.empty_like(Z)
    exp_m, exp_v = np.zeros(3), np.ones(3)
    for _ in range(100):
        R.batchnorm_forward_train(Z, np.ones(3), np.zeros(3), 1e-5, 0.9, rm, rv, mean, inv_std, out)
        exp_m = 0.9 * exp_m + 0.1 * Z.mean(0)
        exp_v = 0.9 * exp_v + 0.1 * Z.var(0)
    np.testing.assert_allclose(rm, exp_m, rtol=1e-12)
    np.testing.assert_allclose(rv, exp_v, rtol=1e-12)
    np.testing.assert_allclose(rm, Z.mean(0), rtol=1e-4)
    np.testing.assert_allclose(rv, Z.var(0), rtol=1e-4)  # biased variance


@pytest.mark.parametrize("dtype", DTYPES)
def test_batchnorm_forward_infer(dtype):
    rng = np.random.default_rng(3)
    Z = rng.standard_normal((5, 3)).astype(dtype)
    gamma, beta = rng.uniform(0.5, 2, 3).astype(dtype), rng.standard_normal(3).astype(dtype)
    rm, rv = rng.standard_normal(3).astype(dtype), rng.uniform(0.1, 2, 3).astype(dtype)
    rm0, rv0 = rm.copy(), rv.copy()
    out = np.empty_like(Z)
    R.batchnorm_forward_infer(Z, gamma, beta, rm, rv, 1e-3, out)
    for i in range(5):
        for j in range(3):
            exp = float(gamma[j]) * (float(Z[i, j]) - float(rm[j])) / math.sqrt(float(rv[j]) + 1e-3) + float(beta[j])
            assert out[i, j] == pytest.approx(exp, rel=1e-5, abs=1e-6)
    assert out.dtype == dtype
    np.testing.assert_array_equal(rm, rm0)  # inference never touches the running stats
    np.testing.assert_array_equal(rv, rv0)


def test_batchnorm_backward_matches_finite_differences():
    rng = np.random.default_rng(4)
    m, n, eps = 6, 3, 1e-5
    Z = rng.standard_normal((m, n))
    gamma = rng.uniform(0.5, 1.5, n)
    beta = rng.standard_normal(n)
    Rw = rng.standard_normal((m, n))  # f = sum(Rw * BN(Z)), so dout = Rw

    def f(Z_, gamma_, beta_):
        rm, rv = np.zeros(n), np.ones(n)
        mean, inv_std, out = np.empty(n), np.empty(n), np.empty((m, n))
        R.batchnorm_forward_train(Z_, gamma_, beta_, eps, 0.9, rm, rv, mean, inv_std, out)
        return float(np.sum(Rw * out)), mean, inv_std

    _, mean, inv_std = f(Z, gamma, beta)
    dZ, dgamma, dbeta = np.empty((m, n)), np.empty(n), np.empty(n)
    R.batchnorm_backward(Z, gamma, mean, inv_std, Rw.copy(), dZ, dgamma, dbeta)

    h = 1e-6

    def fd(arr, which):
        g = np.zeros_like(arr)
        for idx in np.ndindex(arr.shape):
            plus, minus = arr.copy(), arr.copy()
            plus[idx] += h
            minus[idx] -= h
            args_p = [Z, gamma, beta]
            args_m = [Z, gamma, beta]
            args_p[which], args_m[which] = plus, minus
            g[idx] = (f(*args_p)[0] - f(*args_m)[0]) / (2 * h)
        return g

    np.testing.assert_allclose(dZ, fd(Z, 0), rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(dgamma, fd(gamma, 1), rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(dbeta, fd(beta, 2), rtol=1e-6, atol=1e-8)
    # the closed forms of docs/spec.md
    x_hat = (Z - Z.mean(0)) / np.sqrt(Z.var(0) + eps)
    np.testing.assert_allclose(dgamma, (Rw * x_hat).sum(0), rtol=1e-12)
    np.testing.assert_allclose(dbeta, Rw.sum(0), rtol=1e-12)
    # dZ may alias dout
    d = Rw.copy()
    R.batchnorm_backward(Z, gamma, mean, inv_std, d, d, np.empty(n), np.empty(n))
    np.testing.assert_allclose(d, dZ, rtol=1e-12, atol=1e-14)


# ----------------------------------------------------------------------------- losses


def logsumexp_row(row) -> float:
    mx = max(row)
    return mx + math.log(math.fsum(math.exp(z - mx) for z in row))


@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_cross_entropy(dtype):
    rng = np.random.default_rng(5)
    m, k = 6, 4
    Z = (2 * rng.standard_normal((m, k))).astype(dtype)
    y = rng.integers(0, k, m).astype(np.int64)
    dZ = np.full((m, k), np.nan, dtype)
    loss = R.softmax_cross_entropy(Z, y, dZ)
    assert isinstance(loss, float)
    rows = [[float(v) for v in Z[i]] for i in range(m)]
    exp_loss = sum(logsumexp_row(r) - r[y[i]] for i, r in enumerate(rows)) / m
    assert loss == pytest.approx(exp_loss, rel=1e-6 if dtype == np.float32 else 1e-12)
    for i, r in enumerate(rows):
        lse = logsumexp_row(r)
        for j in range(k):
            p = math.exp(r[j] - lse)
            exp = (p - (1.0 if j == y[i] else 0.0)) / m
            assert dZ[i, j] == pytest.approx(exp, rel=1e-5, abs=1e-7 if dtype == np.float32 else 1e-15)
    # the gradient rows sum to zero; no-gradient call leaves nothing to write
    np.testing.assert_allclose(dZ.sum(1), 0, atol=1e-6)
    assert R.softmax_cross_entropy(Z, y, np.empty((0, 0), dtype)) == loss


@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_cross_entropy_is_stable_for_huge_logits(dtype):
    Z = np.array([[1e4, -1e4, 0.0], [1e4, -1e4, 0.0], [-1e4, -1e4, -1e4], [1e4, 1e4, -1e4]], dtype)
    y = np.array([0, 1, 2, 1])
    dZ = np.empty_like(Z)
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        loss = R.softmax_cross_entropy(Z, y, dZ)
    assert math.isfinite(loss) and np.isfinite(dZ).all()
    # per-row losses: 0, 2e4, log 3, log 2
    assert loss == pytest.approx((0 + 2e4 + math.log(3) + math.log(2)) / 4, rel=1e-6)
    m = 4
    exp = np.array([[0, 0, 0], [1, -1, 0], [1 / 3, 1 / 3, -2 / 3], [0.5, -0.5, 0]]) / m
    np.testing.assert_allclose(dZ, exp, atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_rows_sum_to_one(dtype):
    rng = np.random.default_rng(6)
    Z = (5 * rng.standard_normal((8, 5))).astype(dtype)
    Z[0] = [1e4, -1e4, 0, 3, 1e4]
    out = np.empty_like(Z)
    with np.errstate(over="raise", invalid="raise"):
        R.softmax(Z, out)
    assert np.isfinite(out).all() and (out >= 0).all()
    np.testing.assert_allclose(out.sum(1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(out[0], [0.5, 0, 0, 0, 0.5], atol=1e-7)
    for i in range(1, 8):
        r = [float(v) for v in Z[i]]
        lse = logsumexp_row(r)
        np.testing.assert_allclose(out[i], [math.exp(v - lse) for v in r], rtol=1e-5 if dtype == np.float32 else 1e-12)


@pytest.mark.parametrize("dtype", DTYPES)
def test_sigmoid_bce(dtype):
    rng = np.random.default_rng(8)
    m = 9
    Z = (3 * rng.standard_normal((m, 1))).astype(dtype)
    y = rng.integers(0, 2, m).astype(dtype)
    dZ = np.empty((m, 1), dtype)
    loss = R.sigmoid_bce(Z, y, dZ)
    exp = 0.0
    for i in range(m):
        s = 1 / (1 + math.exp(-float(Z[i, 0])))
        exp -= float(y[i]) * math.log(s) + (1 - float(y[i])) * math.log(1 - s)
        assert dZ[i, 0] == pytest.approx((s - float(y[i])) / m, rel=1e-5, abs=1e-7)
    assert loss == pytest.approx(exp / m, rel=1e-6 if dtype == np.float32 else 1e-12)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,k", [(1, 2), (7, 3)])
def test_sigmoid_bce_multilabel(dtype, m, k):
    """k outputs (multilabel): a row's loss is the sum of its k BCEs; dZ = (sigmoid(z) - y)/m."""
    rng = np.random.default_rng(m * k)
    Z = (3 * rng.standard_normal((m, k))).astype(dtype)
    y = rng.integers(0, 2, (m, k)).astype(dtype)
    dZ = np.empty((m, k), dtype)
    loss = R.sigmoid_bce(Z, y, dZ)
    exp = 0.0
    for i in range(m):
        for j in range(k):
            s = 1 / (1 + math.exp(-float(Z[i, j])))
            exp -= float(y[i, j]) * math.log(s) + (1 - float(y[i, j])) * math.log(1 - s)
            assert dZ[i, j] == pytest.approx((s - float(y[i, j])) / m, rel=1e-5, abs=1e-7)
    assert loss == pytest.approx(exp / m, rel=1e-6 if dtype == np.float32 else 1e-12)


@pytest.mark.parametrize("dtype", DTYPES)
def test_sigmoid_bce_is_stable_for_huge_logits(dtype):
    Z = np.array([[1e4], [1e4], [-1e4], [-1e4]], dtype)
    y = np.array([1, 0, 0, 1], dtype)
    dZ = np.empty_like(Z)
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        loss = R.sigmoid_bce(Z, y, dZ)
    assert math.isfinite(loss)
    assert loss == pytest.approx((0 + 1e4 + 0 + 1e4) / 4, rel=1e-9)
    np.testing.assert_allclose(dZ[:, 0], np.array([0, 1, 0, -1]) / 4, atol=1e-12)


@pytest.mark.parametrize("dtype", DTYPES)
def test_mse(dtype):
    rng = np.random.default_rng(9)
    m, k = 5, 3
    Yh = rng.standard_normal((m, k)).astype(dtype)
    Y = rng.standard_normal((m, k)).astype(dtype)
    dZ = np.empty_like(Yh)
    loss = R.mse(Yh, Y, dZ)
    exp = sum(0.5 * sum((float(Yh[i, j]) - float(Y[i, j])) ** 2 for j in range(k)) for i in range(m)) / m
    assert loss == pytest.approx(exp, rel=1e-6 if dtype == np.float32 else 1e-12)
    np.testing.assert_allclose(dZ, (Yh.astype(np.float64) - Y) / m, **tol(dtype))


# ----------------------------------------------------------------------------- weighted losses


def _loss_case(kind, m, dtype, rng):
    """(kernel, Z, y, per-row loss, per-row unit gradient) written out with Python floats."""
    if kind == "softmax":
        k = 4
        Z = (2 * rng.standard_normal((m, k))).astype(dtype)
        y = rng.integers(0, k, m).astype(np.int64)
        rows = [[float(v) for v in Z[i]] for i in range(m)]
        L = [logsumexp_row(r) - r[y[i]] for i, r in enumerate(rows)]
        G = [[math.exp(r[j] - logsumexp_row(r)) - (j == y[i]) for j in range(k)] for i, r in enumerate(rows)]
        return R.softmax_cross_entropy, Z, y, L, G
    if kind == "bce":
        Z = (3 * rng.standard_normal((m, 1))).astype(dtype)
        y = rng.integers(0, 2, m).astype(dtype)
        L, G = [], []
        for i in range(m):
            z, t = float(Z[i, 0]), float(y[i])
            L.append(max(z, 0) - z * t + math.log1p(math.exp(-abs(z))))
            G.append([1 / (1 + math.exp(-z)) - t])
        return R.sigmoid_bce, Z, y, L, G
    Z = rng.standard_normal((m, 3)).astype(dtype)
    Y = rng.standard_normal((m, 3)).astype(dtype)
    L = [0.5 * sum((float(Z[i, j]) - float(Y[i, j])) ** 2 for j in range(3)) for i in range(m)]
    G = [[float(Z[i, j]) - float(Y[i, j]) for j in range(3)] for i in range(m)]
    return R.mse, Z, Y, L, G


@pytest.mark.parametrize("kind", ["softmax", "bce", "mse"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 7])
def test_weighted_losses(kind, dtype, m):
    """loss = sum(w_i L_i)/sum(w); dZ_i = w_i/sum(w) * unit gradient (contract, scikit-learn's rule)."""
    rng = np.random.default_rng(12 + m)
    fn, Z, y, L, G = _loss_case(kind, m, dtype, rng)
    w = rng.uniform(0.0, 3.0, m)
    sw = math.fsum(w)
    dZ = np.full(Z.shape, np.nan, dtype)
    loss = fn(Z, y, dZ, w)
    assert isinstance(loss, float)
    assert loss == pytest.approx(math.fsum(wi * li for wi, li in zip(w, L)) / sw,
                                 rel=1e-5 if dtype == np.float32 else 1e-12)
    exp = np.array([[w[i] / sw * g for g in G[i]] for i in range(m)])
    np.testing.assert_allclose(dZ, exp, rtol=1e-5 if dtype == np.float32 else 1e-12, atol=1e-7)
    # no-gradient call: the same loss; unit weights: exactly the unweighted values
    assert fn(Z, y, np.empty((0, 0), dtype), w) == pytest.approx(loss, rel=1e-15)
    d1, d0 = np.empty_like(dZ), np.empty_like(dZ)
    l1, l0 = fn(Z, y, d1, np.ones(m)), fn(Z, y, d0)
    assert l1 == pytest.approx(l0, rel=1e-12)
    np.testing.assert_allclose(d1, d0, rtol=1e-6 if dtype == np.float32 else 1e-14)
    # an empty weight array means unweighted
    de = np.empty_like(dZ)
    assert fn(Z, y, de, np.empty(0)) == l0
    np.testing.assert_array_equal(de, d0)


@pytest.mark.parametrize("kind", ["softmax", "bce", "mse"])
def test_weighted_losses_zero_weight_sum_contributes_nothing(kind):
    fn, Z, y, _, _ = _loss_case(kind, 3, np.float64, np.random.default_rng(1))
    dZ = np.full(Z.shape, np.nan)
    assert fn(Z, y, dZ, np.zeros(3)) == 0.0
    assert (dZ == 0).all()


# ----------------------------------------------------------------------------- bfloat16 emulation


def py_bf16(x: float) -> float:
    """Round a float32 value to bfloat16 (nearest, ties to even) from its bits, in plain Python."""
    import struct

    u = struct.unpack("<I", struct.pack("<f", x))[0]
    if math.isnan(x):
        return x
    lower, upper = u & 0xFFFF, u >> 16
    if lower > 0x8000 or (lower == 0x8000 and upper & 1):
        upper += 1
    return struct.unpack("<f", struct.pack("<I", (upper << 16) & 0xFFFFFFFF))[0]


def test_round_to_bf16_nearest_even_and_nan():
    vals = np.array([1.0, 1 + 2 ** -8, 1 + 2 ** -7, 1 + 3 * 2 ** -8, 1 + 2 ** -8 + 2 ** -20, -2.5e-3, 3.0e38,
                     3.4e38, np.inf, -np.inf, 0.0, -0.0, 1e-40, np.nan], np.float32)
    out = R.round_to_bf16(vals)
    assert out.dtype == np.float32
    exp = [py_bf16(float(v)) for v in vals]
    np.testing.assert_array_equal(out[:-1], np.array(exp[:-1], np.float32))
    assert np.isnan(out[-1])
    assert out[1] == 1.0 and out[2] == 1 + 2 ** -7 and out[3] == 1 + 2 ** -6  # ties to even both ways
    rng = np.random.default_rng(3)
    x = rng.standard_normal(1000).astype(np.float32)
    r = R.round_to_bf16(x)
    assert (r.view(np.uint32) & 0xFFFF == 0).all()
    assert np.all(np.abs(r - x) <= np.abs(x) * 2.0 ** -8)


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("shape", [(1, 3, 2), (7, 33, 5)])
def test_dense_bf16_emulation(act, shape):
    """precision=1: each GEMM's operands rounded to bf16, products exact, float32 accumulation."""
    m, n_in, n_out = shape
    rng = np.random.default_rng(m + n_in)
    A = rng.standard_normal((m, n_in)).astype(np.float32)
    W = rng.standard_normal((n_in, n_out)).astype(np.float32)
    b = rng.standard_normal(n_out).astype(np.float32)
    out = np.empty((m, n_out), np.float32)
    R.dense_forward(A, W, b, act, out, 1)
    Ar = np.array([[py_bf16(float(v)) for v in row] for row in A])
    Wr = np.array([[py_bf16(float(v)) for v in row] for row in W])
    Z = loop_matmul(Ar, Wr) + b
    ref = np.empty((m, n_out))
    R.activation_forward(Z, act, ref)
    np.testing.assert_allclose(out, ref, rtol=2e-6, atol=2e-6)
    # differs from fp32 by about the bf16 rounding, not more
    out32 = np.empty_like(out)
    R.dense_forward(A, W, b, act, out32)
    assert np.abs(out - out32).max() < 0.1 * np.abs(out32).max() + 1e-3
    # backward: dW = bf16(A)^T bf16(dZ) + l2 W (float32 W), dA = bf16(dZ) bf16(W)^T
    dout = rng.standard_normal((m, n_out)).astype(np.float32)
    dZ, dW, db, dA = (np.empty((m, n_out), np.float32), np.empty_like(W), np.empty_like(b),
                      np.empty_like(A))
    R.dense_backward(A, W, out, dout, act, 0.25, dZ, dW, db, dA, 1)
    dZ_ref = np.empty((m, n_out), np.float32)
    R.activation_backward(out, dout, act, dZ_ref)
    np.testing.assert_array_equal(dZ, dZ_ref)
    dZr = np.array([[py_bf16(float(v)) for v in row] for row in dZ_ref])
    np.testing.assert_allclose(dW, loop_matmul(Ar.T, dZr) + 0.25 * W.astype(np.float64), rtol=2e-6, atol=2e-6)
    np.testing.assert_allclose(dA, loop_matmul(dZr, Wr.T), rtol=2e-6, atol=2e-6)
    np.testing.assert_allclose(db, dZ_ref.astype(np.float64).sum(0), rtol=1e-6, atol=1e-6)


def test_dense_bf16_needs_float32_and_a_known_code():
    A, W = np.ones((2, 3)), np.ones((3, 2))
    with pytest.raises(ValueError, match="float32"):
        R.dense_forward(A, W, np.empty(0), 0, np.empty((2, 2)), 1)
    with pytest.raises(ValueError, match="precision code"):
        R.dense_forward(A.astype(np.float32), W.astype(np.float32), np.empty(0, np.float32), 0,
                        np.empty((2, 2), np.float32), 7)


# ----------------------------------------------------------------------------- dropout

M64 = (1 << 64) - 1


def py_mix64(x: int) -> int:
    x &= M64
    x ^= x >> 30
    x = (x * 0xBF58476D1CE4E5B9) & M64
    x ^= x >> 27
    x = (x * 0x94D049BB133111EB) & M64
    return x ^ (x >> 31)


def py_keep_bits(seed, step, layer, keep_prob, n_elems):
    G = 0x9E3779B97F4A7C15
    key = py_mix64(py_mix64(py_mix64(seed + G) ^ step) ^ layer)
    thr = int(keep_prob * 2.0 ** 32)
    return [int(py_mix64(key + (e + 1) * G) >> 32 < thr) for e in range(n_elems)]


def drop(A, keep_prob, seed, step, layer):
    mask = np.empty(A.shape, np.uint8)
    out = np.empty_like(A)
    R.dropout_forward(A, keep_prob, seed, step, layer, mask, out)
    return mask, out


def test_dropout_mask_matches_the_contract_generator():
    assert dropout_key(3, 5, 2) == py_mix64(py_mix64(py_mix64(3 + 0x9E3779B97F4A7C15) ^ 5) ^ 2)
    assert keep_threshold(0.5) == 2 ** 31
    A = np.ones((7, 5))
    mask, out = drop(A, 0.6, 12345, 17, 3)
    assert mask.reshape(-1).tolist() == py_keep_bits(12345, 17, 3, 0.6, 35)
    np.testing.assert_allclose(out, mask / 0.6, rtol=1e-15)


def test_dropout_mask_reproducible_and_keyed_by_seed_step_layer():
    A = np.ones((40, 50), np.float32)
    m0, _ = drop(A, 0.5, 1, 0, 2)
    np.testing.assert_array_equal(m0, drop(A, 0.5, 1, 0, 2)[0])
    for other in [drop(A, 0.5, 2, 0, 2)[0], drop(A, 0.5, 1, 1, 2)[0], drop(A, 0.5, 1, 0, 3)[0]]:
        assert (other != m0).mean() > 0.3  # about half the bits differ


@pytest.mark.parametrize("keep_prob", [0.2, 0.5, 0.8, 0.95])
@pytest.mark.parametrize("dtype", DTYPES)
def test_dropout_keep_fraction_and_inverted_scaling(keep_prob, dtype):
    A = np.ones((400, 500), dtype)
    mask, out = drop(A, keep_prob, 7, 3, 1)
    n = A.size
    sd = math.sqrt(keep_prob * (1 - keep_prob) / n)
    assert abs(mask.mean() - keep_prob) < 5 * sd
    # inverted dropout: values are 0 or 1/keep_prob, the expected activation is unchanged
    assert set(np.unique(out).tolist()) <= {0.0, float(dtype(1) / dtype(keep_prob))}
    assert abs(out.astype(np.float64).mean() - 1.0) < 5 * sd / keep_prob
    np.testing.assert_allclose(out, A * mask / dtype(keep_prob), rtol=1e-7)


def test_dropout_keep_prob_one_keeps_everything():
    mask, out = drop(np.arange(12.0).reshape(3, 4), 1.0, 0, 0, 0)
    assert mask.all()
    np.testing.assert_array_equal(out, np.arange(12.0).reshape(3, 4))


@pytest.mark.parametrize("dtype", DTYPES)
def test_dropout_backward_uses_the_same_mask(dtype):
    rng = np.random.default_rng(10)
    A = rng.standard_normal((20, 30)).astype(dtype)
    mask, out = drop(A, 0.7, 5, 9, 4)
    dout = rng.standard_normal(A.shape).astype(dtype)
    dA = np.empty_like(dout)
    R.dropout_backward(dout, mask, 0.7, dA)
    np.testing.assert_allclose(dA, dout * mask / dtype(0.7), **tol(dtype))
    np.testing.assert_array_equal(dA == 0, (mask == 0) | (dout == 0))
    # aliasing: out may alias A, dA may alias dout
    A2 = A.copy()
    R.dropout_forward(A2, 0.7, 5, 9, 4, np.empty(A.shape, np.uint8), A2)
    np.testing.assert_array_equal(A2, out)
    d2 = dout.copy()
    R.dropout_backward(d2, mask, 0.7, d2)
    np.testing.assert_array_equal(d2, dA)


# ----------------------------------------------------------------------------- optimisers

N_STEPS = 50


def grad_sequence(n, dtype, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(n).astype(dtype) for _ in range(N_STEPS)]


def opt_tol(dtype):
    return dict(rtol=1e-4, atol=1e-5) if dtype == np.float32 else dict(rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("dtype", DTYPES)
def test_sgd_steps(dtype):
    grads = grad_sequence(11, dtype)
    p = np.linspace(-1, 1, 11).astype(dtype)
    exp = [float(v) for v in p]
    for g in grads:
        R.sgd_step(p, g, 0.05)
        exp = [w - 0.05 * float(gi) for w, gi in zip(exp, g)]
    np.testing.assert_allclose(p, exp, **opt_tol(dtype))
    assert p.dtype == dtype


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias_correction", [False, True])
def test_momentum_steps(dtype, bias_correction):
    grads = grad_sequence(9, dtype, 1)
    lr, beta = 0.02, 0.9
    p = np.linspace(-1, 1, 9).astype(dtype)
    v = np.zeros(9, dtype)
    W = [float(x) for x in p]
    vv = [0.0] * 9
    for t, g in enumerate(grads, start=1):
        c1, _ = step_scalars(OptimizerSpec(OPT_MOMENTUM, (beta, 0.0, 0.0), bias_correction), lr, t)
        R.momentum_step(p, g, v, beta, c1)
        for i in range(9):
            vv[i] = beta * vv[i] + (1 - beta) * float(g[i])
            step = vv[i] / (1 - beta ** t) if bias_correction else vv[i]
            W[i] -= lr * step
    np.testing.assert_allclose(p, W, **opt_tol(dtype))
    np.testing.assert_allclose(v, vv, **opt_tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_rmsprop_steps(dtype):
    grads = grad_sequence(9, dtype, 2)
    lr, beta2, eps = 0.01, 0.999, 1e-8
    p = np.linspace(-1, 1, 9).astype(dtype)
    s = np.zeros(9, dtype)
    W = [float(x) for x in p]
    ss = [0.0] * 9
    for g in grads:
        R.rmsprop_step(p, g, s, lr, beta2, eps)
        for i in range(9):
            ss[i] = beta2 * ss[i] + (1 - beta2) * float(g[i]) ** 2
            W[i] -= lr * float(g[i]) / (math.sqrt(ss[i]) + eps)
    np.testing.assert_allclose(p, W, **opt_tol(dtype))
    np.testing.assert_allclose(s, ss, **opt_tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("betas", [(0.9, 0.999), (0.5, 0.9)])
def test_adam_steps(dtype, betas):
    beta1, beta2 = betas
    grads = grad_sequence(9, dtype, 3)
    lr, eps = 1e-3, 1e-8
    p = np.linspace(-1, 1, 9).astype(dtype)
    v, s = np.zeros(9, dtype), np.zeros(9, dtype)
    W = [float(x) for x in p]
    vv, ss = [0.0] * 9, [0.0] * 9
    for t, g in enumerate(grads, start=1):
        c1, c2 = step_scalars(OptimizerSpec(OPT_ADAM, (beta1, beta2, eps)), lr, t)
        R.adam_step(p, g, v, s, beta1, beta2, eps, c1, c2)
        for i in range(9):
            gi = float(g[i])
            vv[i] = beta1 * vv[i] + (1 - beta1) * gi
            ss[i] = beta2 * ss[i] + (1 - beta2) * gi * gi
            v_hat = vv[i] / (1 - beta1 ** t)
            s_hat = ss[i] / (1 - beta2 ** t)
            W[i] -= lr * v_hat / (math.sqrt(s_hat) + eps)
    np.testing.assert_allclose(p, W, **opt_tol(dtype))
    np.testing.assert_allclose(v, vv, **opt_tol(dtype))
    np.testing.assert_allclose(s, ss, **opt_tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("n", [1, 9, 33])
def test_nesterov_and_classical_momentum_steps(dtype, nesterov, n):
    """scikit-learn's SGD rule (sklearn/neural_network/_stochastic_optimizers.py, written out)."""
    grads = grad_sequence(n, dtype, 4)
    lr, mu = 0.05, 0.8
    p = np.linspace(-1, 1, n).astype(dtype)
    v = np.zeros(n, dtype)
    W = [float(x) for x in p]
    vv = [0.0] * n
    for g in grads:
        R.nesterov_step(p, g, v, mu, lr, nesterov)
        for i in range(n):
            vv[i] = mu * vv[i] - lr * float(g[i])
            W[i] += (mu * vv[i] - lr * float(g[i])) if nesterov else vv[i]
    np.testing.assert_allclose(p, W, **opt_tol(dtype))
    np.testing.assert_allclose(v, vv, **opt_tol(dtype))
    assert p.dtype == dtype and v.dtype == dtype


def test_nesterov_momentum_zero_is_sgd():
    g = np.array([1.0, -2.0, 0.5])
    p1, p2, p3 = np.ones(3), np.ones(3), np.ones(3)
    R.nesterov_step(p1, g, np.zeros(3), 0.0, 0.1, True)
    R.nesterov_step(p2, g, np.zeros(3), 0.0, 0.1, False)
    R.sgd_step(p3, g, 0.1)
    np.testing.assert_allclose(p1, p3, rtol=1e-15)
    np.testing.assert_allclose(p2, p3, rtol=1e-15)


def test_adam_first_step_is_lr_times_sign():
    """With bias correction, the first Adam step is lr * g / (|g| + eps) ~ lr * sign(g)."""
    g = np.array([3.0, -0.5, 1e-3])
    p = np.zeros(3)
    R.adam_step(p, g, np.zeros(3), np.zeros(3), 0.9, 0.999, 1e-8, 0.1 / (1 - 0.9), 1 / (1 - 0.999))
    np.testing.assert_allclose(p, -0.1 * np.sign(g), rtol=1e-4)


def test_ewa_bias_correction_worked_example():
    """Notes 2.5: beta = 0.98, t = 2: 1 - beta^2 = 0.0396 and
    v_2 / 0.0396 = (0.0196 theta_1 + 0.02 theta_2) / 0.0396 (a weighted average)."""
    beta = 0.98
    assert 1 - beta ** 2 == pytest.approx(0.0396, abs=1e-15)
    theta1, theta2 = 40.0, 50.0
    # momentum_step with bias correction keeps v = EWA of the gradients and
    # moves the params by lr * v_t / (1 - beta^t)
    p, v = np.zeros(1), np.zeros(1)
    R.momentum_step(p, np.array([theta1]), v, beta, 1.0 / (1 - beta ** 1))
    assert v[0] == pytest.approx(0.02 * theta1)
    assert p[0] == pytest.approx(-theta1)  # corrected v_1 = theta_1 exactly
    R.momentum_step(p, np.array([theta2]), v, beta, 1.0 / (1 - beta ** 2))
    assert v[0] == pytest.approx(0.0196 * theta1 + 0.02 * theta2)
    corrected = (0.0196 * theta1 + 0.02 * theta2) / 0.0396
    assert p[0] == pytest.approx(-theta1 - corrected)
    assert theta1 < corrected < theta2
    # without correction v_1 is 50x too small (the bias the notes describe)
    p, v = np.zeros(1), np.zeros(1)
    R.momentum_step(p, np.array([theta1]), v, beta, 1.0)
    assert p[0] == pytest.approx(-0.02 * theta1)


def test_ewa_averages_about_one_over_one_minus_beta_values():
    beta = 0.9
    v = 0.0
    for t in range(1, 200):
        v = beta * v + (1 - beta) * 1.0
    assert v == pytest.approx(1.0, abs=1e-8)
    # weight of a value 1/(1-beta) = 10 steps back has decayed to about 1/e
    assert beta ** (1 / (1 - beta)) == pytest.approx(1 / math.e, rel=0.1)


# ----------------------------------------------------------------------------- reductions


@pytest.mark.parametrize("dtype", DTYPES)
def test_sum_squares(dtype):
    rng = np.random.default_rng(11)
    x = rng.standard_normal(1001).astype(dtype)
    res = R.sum_squares(x)
    assert isinstance(res, float)
    assert res == pytest.approx(math.fsum(float(v) ** 2 for v in x), rel=1e-12)
    assert R.sum_squares(np.empty(0, dtype)) == 0.0


def test_sum_squares_accumulates_in_float64():
    # 2**24 + many ones: a float32 accumulator would lose the small terms
    x = np.ones(100_001, np.float32)
    x[0] = 4096.0  # 4096^2 = 2**24
    assert R.sum_squares(x) == 2.0 ** 24 + 100_000
