"""The Numba whole-epoch executor (fastdl.backends.numba.epoch) against the per-layer path on backend='numba'.

Bit-identity: the executor runs the same compiled cores with the same
serial/parallel decisions as the public kernels the per-layer executor
calls, in the same order, so parameters, BatchNorm statistics, optimiser
state, every step's cost and data loss, and the error count must be equal
to the last bit: for every loss, every optimiser kind, BatchNorm, Dropout,
per-example weights and both L2 scales, with the parallel variants in use
(thresholds lowered through the scoped setting, and once at the default
thresholds with widths above them).
"""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("numba")

import fastdl as fd  # noqa: E402
from fastdl.backends import get_backend  # noqa: E402
from fastdl.backends.numba import THRESHOLD_NAMES, threshold_array, use_thresholds  # noqa: E402
from fastdl.backends.numba.epoch import NumbaEpochExecutor  # noqa: E402
from fastdl.plan import step_coefficients  # noqa: E402

OPTIMIZERS = {
    "sgd": lambda: fd.SGD(lr=0.05, backend="numba"),
    "momentum": lambda: fd.Momentum(lr=0.05, beta=0.9, bias_correction=True, backend="numba"),
    "rmsprop": lambda: fd.RMSprop(lr=0.01, backend="numba"),
    "adam": lambda: fd.Adam(lr=0.01, backend="numba"),
    "nesterov": lambda: fd.ClassicalMomentum(lr=0.05, momentum=0.9, nesterov=True, backend="numba"),
    "classical": lambda: fd.ClassicalMomentum(lr=0.05, momentum=0.9, nesterov=False, backend="numba"),
}
LOW = threshold_array(True, **{k: 300 for k in THRESHOLD_NAMES})   # parallel variants from 300 elements


def _layers(n_in: int, widths: tuple[int, ...], n_out: int, *, bn: bool, keep: float, act=fd.layers.Tanh):
    layers, d = [], n_in
    for w in widths:
        layers.append(fd.layers.Dense(d, w))
        if bn:
            layers.append(fd.layers.BatchNorm(w))
        layers.append(act())
        if keep < 1.0:
            layers.append(fd.layers.Dropout(keep_prob=keep))
        d = w
    layers.append(fd.layers.Dense(d, n_out))
    return layers


def _data(loss: str, N: int, n_in: int, k: int, dtype, seed: int = 0):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((N, n_in)).astype(dtype)
    if loss == "softmax_cross_entropy":
        y = rng.integers(0, k, N).astype(np.int64)
    elif loss == "binary_cross_entropy":
        y = rng.integers(0, 2, N).astype(dtype)
    else:
        y = rng.standard_normal((N, k)).astype(dtype)
    return X, y


def _model(loss, n_in, widths, k, dtype, *, bn, keep, l2, l2_scale):
    return fd.Sequential(_layers(n_in, widths, k, bn=bn, keep=keep), loss=loss, l2=l2, l2_scale=l2_scale,
                         dtype=dtype, backend="numba", seed=7)


def _per_layer_epoch(model, opt, X, y, w, perm, B, lrs):
    """One epoch on the per-layer path, step by step (what fit's per-layer runner does)."""
    N = X.shape[0]
    costs, losses, wrong = [], [], 0
    for bi, s0 in enumerate(range(0, N, B)):
        idx = perm[s0:s0 + B]
        data_loss, l2_term, logits = model._loss_and_grads(
            X[idx], y[idx], dropout=True, n_total=N, step=model.step_count,
            weights=None if w.size == 0 else np.ascontiguousarray(w[idx]))
        costs.append(data_loss + l2_term)
        losses.append(data_loss)
        if model.plan.classifier:
            wrong += model.count_errors(logits, y[idx])
        opt.step(model.params, model.grads, lrs[bi])
        model.step_count += 1
    return np.array(costs), np.array(losses), wrong


def _fused_epoch(model, opt, X, y, w, perm, B, lrs, executor=None):
    spec = opt.spec()
    ex = executor or get_backend("numba").epoch_executor(model.plan, B, spec)
    assert isinstance(ex, NumbaEpochExecutor)
    st = dict(zip(spec.state_names, opt.ensure_state(model.params, model.grads)))
    v, s = st.get("v", model.params[:0]), st.get("s", model.params[:0])
    c1, c2 = step_coefficients(spec, lrs, opt.t)
    n = lrs.size
    costs, losses = np.full(n, np.nan), np.full(n, np.nan)
    done, wrong, status = ex.run_epoch(X, y, w, perm, model.params, model.grads, model.state, v, s, c1, c2,
                                       model.step_count, model.seed, X.shape[0], costs, losses)
    opt.t += done
    model.step_count += done
    return costs[:done + (status == 1)], losses[:done + (status == 1)], wrong, done, status


def _assert_same(m1, o1, m2, o2) -> None:
    np.testing.assert_array_equal(m1.params, m2.params)
    np.testing.assert_array_equal(m1.state, m2.state)
    for name in o1.spec().state_names:
        np.testing.assert_array_equal(o1.state[name], o2.state[name], err_msg=f"optimiser state {name}")
    assert o1.t == o2.t and m1.step_count == m2.step_count


def _compare(loss, opt_name, dtype, *, n_in=13, widths=(37, 29), k=5, N=203, B=64, bn=True, keep=0.8, l2=0.01,
             l2_scale="batch", weighted=False, epochs=2):
    X, y = _data(loss, N, n_in, k if loss != "binary_cross_entropy" else 1, dtype)
    k = 1 if loss == "binary_cross_entropy" else k
    w = np.random.default_rng(3).random(N) * 2 if weighted else np.empty(0)
    m1 = _model(loss, n_in, widths, k, dtype, bn=bn, keep=keep, l2=l2, l2_scale=l2_scale)
    m2 = _model(loss, n_in, widths, k, dtype, bn=bn, keep=keep, l2=l2, l2_scale=l2_scale)
    o1, o2 = OPTIMIZERS[opt_name](), OPTIMIZERS[opt_name]()
    rng = np.random.default_rng(11)
    n_steps = (N + B - 1) // B
    for _ in range(epochs):
        perm = rng.permutation(N).astype(np.int64)
        lrs = np.linspace(0.02, 0.01, n_steps)
        c_ref, l_ref, wrong_ref = _per_layer_epoch(m1, o1, X, y, w, perm, B, lrs)
        c_fz, l_fz, wrong_fz, done, status = _fused_epoch(m2, o2, X, y, w, perm, B, lrs)
        assert (done, status) == (n_steps, 0)
        np.testing.assert_array_equal(c_fz, c_ref)
        np.testing.assert_array_equal(l_fz, l_ref)
        assert wrong_fz == wrong_ref
        _assert_same(m1, o1, m2, o2)
    assert np.isfinite(m2.params).all()


@pytest.mark.parametrize("opt_name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("loss", ["softmax_cross_entropy", "binary_cross_entropy", "mse"])
def test_fused_epoch_bit_identical_to_per_layer_every_loss_and_optimizer(loss, opt_name):
    with use_thresholds(LOW):
        _compare(loss, opt_name, np.float32)


@pytest.mark.parametrize("loss", ["softmax_cross_entropy", "binary_cross_entropy", "mse"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fused_epoch_weights_and_dataset_l2(loss, dtype):
    with use_thresholds(LOW):
        _compare(loss, "adam", dtype, weighted=True, l2_scale="dataset")
        _compare(loss, "momentum", dtype, weighted=True, l2_scale="batch", bn=False, keep=1.0)


def test_fused_epoch_batch_of_one_and_odd_shapes():
    _compare("softmax_cross_entropy", "adam", np.float64, n_in=3, widths=(1, 7), k=2, N=5, B=1)
    _compare("softmax_cross_entropy", "sgd", np.float32, n_in=1, widths=(2,), k=3, N=9, B=4, bn=False, keep=0.5)


def test_fused_epoch_at_default_thresholds_above_them():
    # 128 x 2100 > 2^18: BatchNorm and the tanh bias pass run their parallel variants; Adam over > 2^18 params
    _compare("softmax_cross_entropy", "adam", np.float32, n_in=150, widths=(2100,), k=10, N=256, B=128,
             keep=0.9, epochs=1)


def test_zero_weight_batch_contributes_nothing():
    with use_thresholds(LOW):
        X, y = _data("softmax_cross_entropy", 40, 6, 3, np.float64)
        w = np.ones(40)
        w[:20] = 0.0
        m1 = _model("softmax_cross_entropy", 6, (8,), 3, np.float64, bn=True, keep=1.0, l2=0.1, l2_scale="batch")
        m2 = _model("softmax_cross_entropy", 6, (8,), 3, np.float64, bn=True, keep=1.0, l2=0.1, l2_scale="batch")
        o1, o2 = fd.SGD(lr=0.1, backend="numba"), fd.SGD(lr=0.1, backend="numba")
        perm = np.arange(40, dtype=np.int64)
        lrs = np.full(2, 0.1)
        c_ref, l_ref, _ = _per_layer_epoch(m1, o1, X, y, w, perm, 20, lrs)
        c_fz, l_fz, _, _, status = _fused_epoch(m2, o2, X, y, w, perm, 20, lrs)
        assert status == 0 and c_fz[0] == 0.0 and l_fz[0] == 0.0
        np.testing.assert_array_equal(c_fz, c_ref)
        _assert_same(m1, o1, m2, o2)


def test_status_1_leaves_the_failing_step_unapplied():
    with use_thresholds(LOW):
        X, y = _data("softmax_cross_entropy", 60, 6, 3, np.float32)
        X[45, 2] = np.nan                       # in the 3rd batch of 20 (identity order)
        m1 = _model("softmax_cross_entropy", 6, (9,), 3, np.float32, bn=False, keep=1.0, l2=0.0, l2_scale="batch")
        m2 = _model("softmax_cross_entropy", 6, (9,), 3, np.float32, bn=False, keep=1.0, l2=0.0, l2_scale="batch")
        o1, o2 = fd.Adam(lr=0.01, backend="numba"), fd.Adam(lr=0.01, backend="numba")
        perm = np.arange(60, dtype=np.int64)
        lrs = np.full(3, 0.01)
        _per_layer_epoch(m1, o1, X[:40], y[:40], np.empty(0), perm[:40], 20, lrs[:2])   # the two good steps
        costs, losses, _, done, status = _fused_epoch(m2, o2, X, y, np.empty(0), perm, 20, lrs)
        assert (done, status) == (2, 1)
        assert not np.isfinite(costs[2])
        _assert_same(m1, o1, m2, o2)


def test_status_2_when_the_update_makes_parameters_non_finite():
    X, y = _data("softmax_cross_entropy", 16, 4, 3, np.float32)
    m = _model("softmax_cross_entropy", 4, (5,), 3, np.float32, bn=False, keep=1.0, l2=0.0, l2_scale="batch")
    opt = fd.SGD(lr=1e39, backend="numba")
    _, _, _, done, status = _fused_epoch(m, opt, X, y, np.empty(0), np.arange(16, dtype=np.int64), 16,
                                         np.array([1e39]))
    assert (done, status) == (1, 2)


def test_run_epoch_rejects_mismatched_arrays_with_a_clear_error():
    X, y = _data("softmax_cross_entropy", 10, 4, 3, np.float32)
    m = _model("softmax_cross_entropy", 4, (5,), 3, np.float32, bn=False, keep=1.0, l2=0.0, l2_scale="batch")
    opt = fd.SGD(lr=0.1, backend="numba")
    ex = get_backend("numba").epoch_executor(m.plan, 4, opt.spec())
    args = dict(X=X, y=y, w=np.empty(0), perm=np.arange(10, dtype=np.int64), params=m.params, grads=m.grads,
                state=m.state, v=m.params[:0], s=m.params[:0], c1=np.zeros(3), c2=np.zeros(3), step0=0, seed=0,
                n_total=10, costs=np.empty(3), losses=np.empty(3))
    for name, bad, match in (("X", X.astype(np.float64), "X must be"), ("y", y.astype(np.int32), "y must be"),
                             ("w", np.ones(9), "w must be"), ("c1", np.zeros(2), "c1 must be"),
                             ("params", m.params[:-1], "params must be")):
        with pytest.raises(ValueError, match=match):
            ex.run_epoch(**{**args, name: bad})


def test_compile_touches_no_caller_state():
    m = _model("mse", 4, (5,), 2, np.float64, bn=True, keep=0.5, l2=0.1, l2_scale="batch")
    before = m.params.copy(), m.state.copy()
    ex = get_backend("numba").epoch_executor(m.plan, 8, fd.Adam(backend="numba").spec())
    ex.compile()
    np.testing.assert_array_equal(m.params, before[0])
    np.testing.assert_array_equal(m.state, before[1])


@pytest.mark.parametrize("loss", ["softmax_cross_entropy", "mse"])
def test_fused_epoch_bf16_bit_identical_to_per_layer(loss):
    # precision='bf16': every Dense GEMM through the bf16 GEMM, in both paths
    with use_thresholds(LOW):
        X, y = _data(loss, 90, 11, 4, np.float32)
        models = [fd.Sequential(_layers(11, (23, 19), 4, bn=True, keep=0.8), loss=loss, l2=0.01, precision="bf16",
                                dtype="float32", backend="numba", seed=5) for _ in range(2)]
        opts = [fd.Adam(lr=0.01, backend="numba") for _ in range(2)]
        perm = np.random.default_rng(2).permutation(90).astype(np.int64)
        lrs = np.full(3, 0.01)
        c_ref, l_ref, w_ref = _per_layer_epoch(models[0], opts[0], X, y, np.empty(0), perm, 32, lrs)
        c_fz, l_fz, w_fz, done, status = _fused_epoch(models[1], opts[1], X, y, np.empty(0), perm, 32, lrs)
        assert (done, status) == (3, 0) and w_fz == w_ref
        np.testing.assert_array_equal(c_fz, c_ref)
        _assert_same(models[0], opts[0], models[1], opts[1])
        # and bf16 is not fp32: the same model in fp32 ends elsewhere
        m32 = fd.Sequential(_layers(11, (23, 19), 4, bn=True, keep=0.8), loss=loss, l2=0.01, dtype="float32",
                            backend="numba", seed=5)
        _fused_epoch(m32, fd.Adam(lr=0.01, backend="numba"), X, y, np.empty(0), perm, 32, lrs)
        assert not np.array_equal(m32.params, models[1].params)


@pytest.mark.parametrize("act", [0, 1, 2, 3])
def test_numba_bf16_dense_kernels_match_the_reference_emulation(act):
    from fastdl.backends import numba as nb
    from fastdl.backends import reference as ref

    rng = np.random.default_rng(act)
    for m, n_in, n_out in ((1, 3, 2), (37, 19, 11), (130, 65, 33)):
        A = rng.standard_normal((m, n_in)).astype(np.float32)
        W = rng.standard_normal((n_in, n_out)).astype(np.float32)
        b = rng.standard_normal(n_out).astype(np.float32)
        outs = [np.empty((m, n_out), np.float32) for _ in range(2)]
        nb.dense_forward(A, W, b, act, outs[0], 1)
        ref.dense_forward(A, W, b, act, outs[1], 1)
        np.testing.assert_allclose(outs[0], outs[1], rtol=1e-5, atol=1e-5)
        dout = rng.standard_normal((m, n_out)).astype(np.float32)
        res = []
        for mod in (nb, ref):
            r = (np.empty_like(dout), np.empty_like(W), np.empty_like(b), np.empty_like(A))
            mod.dense_backward(A, W, outs[1], dout.copy(), act, 0.25, *r, 1)
            res.append(r)
        for x, z in zip(*res):
            np.testing.assert_allclose(x, z, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="float32"):
        A64 = np.ones((2, 2))
        nb.dense_forward(A64, A64, np.ones(2), act, np.empty((2, 2)), 1)


def test_bf16_on_a_float64_plan_is_refused():
    m = fd.Sequential(_layers(4, (5,), 3, bn=False, keep=1.0), dtype="float64", backend="numba")
    plan = m.plan
    import dataclasses

    bad = dataclasses.replace(plan, ops=tuple(dataclasses.replace(op, precision=1) for op in plan.ops),
                              precision=1, _layouts={})
    with pytest.raises(ValueError, match="float32"):
        get_backend("numba").epoch_executor(bad, 4, fd.SGD().spec())


def test_numpy_bf16_gemm_standin_rounds_both_operands():
    # the numba backend's bf16 GEMM when fastdl._kernels is not built
    import ctypes

    from fastdl.backends.numba.dense import _numpy_bf16_gemm_standin
    from fastdl.backends.reference import round_to_bf16

    fn = ctypes.CFUNCTYPE(None, *([ctypes.c_int] * 5), ctypes.c_float, ctypes.c_void_p, ctypes.c_int,
                          ctypes.c_void_p, ctypes.c_int, ctypes.c_float, ctypes.c_void_p, ctypes.c_int)(
        _numpy_bf16_gemm_standin())
    rng = np.random.default_rng(4)
    A = rng.standard_normal((5, 3)).astype(np.float32)
    B = rng.standard_normal((3, 4)).astype(np.float32)
    A[0, 0] = np.nan
    C = np.zeros((5, 4), np.float32)
    fn(0, 0, 5, 4, 3, 1.0, A.ctypes.data, 3, B.ctypes.data, 4, 0.0, C.ctypes.data, 4)
    expected = round_to_bf16(A) @ round_to_bf16(B)
    np.testing.assert_allclose(C[1:], expected[1:], rtol=1e-6)
    assert np.isnan(C[0]).all() and not np.array_equal(C[1:], (A @ B)[1:])
