"""The Cython whole-epoch executor (kernels/_epoch.pyx) against the Cython per-layer path.

The executor runs the same compiled cores as the Cython kernels' entry points,
so one epoch of it must leave EXACTLY the same bits as the per-layer executor
(``model._loss_and_grads`` + ``optimizer.step`` with ``backend='cython'``)
stepping through the same batches: parameters, BatchNorm running statistics,
optimiser state, per-step costs and losses, error count. Tested for every
loss, every optimiser kind, BatchNorm, dropout, L2 (batch and dataset scale),
per-example weights (incl. an all-zero-weight batch), float32 and float64,
odd shapes, batch 1, a short last batch, and widths above the OpenMP
thresholds of the BatchNorm, activation, dropout and optimiser kernels.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

import fastdl as fd
from fastdl.plan import OPT_ADAM, step_coefficients

cb = pytest.importorskip("fastdl.backends.cython_backend", reason="Cython extensions not built")

OPTIMIZERS = {
    "sgd": lambda: fd.optim.SGD(lr=0.05),
    "momentum": lambda: fd.optim.Momentum(lr=0.05, beta=0.8),
    "momentum_bc": lambda: fd.optim.Momentum(lr=0.05, beta=0.8, bias_correction=True),
    "rmsprop": lambda: fd.optim.RMSprop(lr=0.01),
    "adam": lambda: fd.optim.Adam(lr=0.01),
    "classical": lambda: fd.optim.ClassicalMomentum(lr=0.05, momentum=0.9, nesterov=False),
    "nesterov": lambda: fd.optim.ClassicalMomentum(lr=0.05, momentum=0.9, nesterov=True),
}


def make_model(loss, dtype, widths=(13, 7), n_features=9, k=3, bn=True, keep=0.75, l2=0.0, l2_scale="batch",
               seed=3):
    layers, d = [], n_features
    for i, w in enumerate(widths):
        layers.append(fd.Dense(d, w, use_bias=not (bn and i == 0)))
        if bn and i == 0:
            layers.append(fd.BatchNorm(w))
        layers.append(fd.ReLU() if i % 2 == 0 else fd.Tanh())
        if keep < 1.0:
            layers.append(fd.Dropout(keep_prob=keep))
        d = w
    layers.append(fd.Dense(d, k))
    return fd.Sequential(layers, loss=loss, l2=l2, l2_scale=l2_scale, dtype=dtype, backend="cython", seed=seed)


def make_data(loss, N, n_features, k, dtype, rng):
    X = rng.standard_normal((N, n_features)).astype(dtype)
    if loss == "softmax_cross_entropy":
        y = rng.integers(0, k, N).astype(np.int64)
    elif loss == "binary_cross_entropy":
        y = rng.integers(0, 2, (N, k) if k > 1 else N).astype(dtype)
    else:
        y = rng.standard_normal((N, k)).astype(dtype)
    return X, y


def per_layer_epoch(model, opt, X, y, w, perm, B, lrs):
    """The reference run: fit's per-step loop on the per-layer executor."""
    costs, losses, wrong = [], [], 0
    for bi, s in enumerate(range(0, len(perm), B)):
        idx = perm[s:s + B]
        xb, yb = X[idx], y[idx]
        wb = None if w is None else np.ascontiguousarray(w[idx])
        dl, l2t, logits = model._loss_and_grads(xb, yb, dropout=True, n_total=X.shape[0], step=model.step_count,
                                                weights=wb)
        J = dl + l2t
        costs.append(J)
        losses.append(dl)
        if model.plan.classifier:
            wrong += model.count_errors(logits, yb)
        if not (math.isfinite(J) and model.kernels.all_finite(model.grads)):
            return np.array(costs), np.array(losses), wrong, 1
        opt.step(model.params, model.grads, lr=float(lrs[bi]))
        model.step_count += 1
    return np.array(costs), np.array(losses), wrong, 0


def fused_epoch(model, opt, X, y, w, perm, B, lrs):
    spec = opt.spec()
    ex = cb.epoch_executor(model.plan, B, spec)
    ex.compile()
    names = spec.state_names
    st = dict(zip(names, opt.ensure_state(model.params)))
    empty = model.params[:0]
    c1, c2 = step_coefficients(spec, lrs, opt.t)
    n = len(lrs)
    costs, losses = np.full(n, np.nan), np.full(n, np.nan)
    done, wrong, status = ex.run_epoch(X, y, np.empty(0) if w is None else w, perm, model.params, model.grads,
                                       model.state, st.get("v", empty), st.get("s", empty), c1, c2,
                                       model.step_count, model.seed, X.shape[0], costs, losses)
    opt.t += done
    model.step_count += done
    n_out = done + (status == 1)
    return costs[:n_out], losses[:n_out], wrong, status


def same_bits(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()


def run_both(loss, dtype, opt_name, *, N=37, B=8, weights=False, epochs=2, rng_seed=0, **model_kw):
    rng = np.random.default_rng(rng_seed)
    ref = make_model(loss, dtype, **model_kw)
    fus = ref.copy()
    k = ref.n_outputs
    X, y = make_data(loss, N, ref.n_features, k, dtype, rng)
    w = rng.uniform(0.0, 3.0, N) if weights else None
    opt_r, opt_f = OPTIMIZERS[opt_name](), OPTIMIZERS[opt_name]()
    for epoch in range(epochs):
        perm = np.random.default_rng(epoch).permutation(N).astype(np.int64)
        n_steps = -(-N // B)
        lrs = np.linspace(1.0, 0.6, n_steps) * opt_r.lr
        r = per_layer_epoch(ref, opt_r, X, y, w, perm, B, lrs)
        f = fused_epoch(fus, opt_f, X, y, w, perm, B, lrs)
        assert r[3] == f[3] == 0
        assert same_bits(r[0], f[0]), (r[0], f[0])        # per-step costs J
        assert same_bits(r[1], f[1])                      # per-step data losses
        assert r[2] == f[2]                               # wrong predictions
        assert same_bits(ref.params, fus.params)
        assert same_bits(ref.state, fus.state)
        assert same_bits(ref.grads, fus.grads)
        for name in opt_r.state_names:
            assert same_bits(opt_r.state[name], opt_f.state[name]), name
        assert ref.step_count == fus.step_count and opt_r.t == opt_f.t
    assert np.isfinite(ref.params).all()
    return ref, fus


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("opt_name", sorted(OPTIMIZERS))
def test_every_optimizer_bit_identical(opt_name, dtype):
    run_both("softmax_cross_entropy", dtype, opt_name, l2=0.3)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("loss,k", [("softmax_cross_entropy", 4), ("binary_cross_entropy", 1), ("mse", 3)])
@pytest.mark.parametrize("weights", [False, True])
@pytest.mark.parametrize("l2_scale", ["batch", "dataset"])
def test_every_loss_weights_and_l2_scale(loss, k, weights, l2_scale, dtype):
    run_both(loss, dtype, "adam", k=k, weights=weights, l2=0.5, l2_scale=l2_scale)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_multilabel_binary_cross_entropy(dtype):
    if not hasattr(fd.Sequential, "count_errors"):
        pytest.skip("per-layer path without count_errors")
    try:
        make_model("binary_cross_entropy", dtype, k=3)
    except ValueError as exc:  # the model side of k-output BCE (helper P1) not landed yet
        pytest.skip(f"multi-output binary_cross_entropy not supported by the model yet: {exc}")
    run_both("binary_cross_entropy", dtype, "sgd", k=3, weights=True)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("bn,keep", [(False, 1.0), (True, 1.0), (False, 0.6), (True, 0.6)])
def test_batchnorm_and_dropout(bn, keep, dtype):
    run_both("softmax_cross_entropy", dtype, "momentum", bn=bn, keep=keep)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_batch_one_odd_shapes_and_first_op_kinds(dtype):
    # batch 1 (SGD) and odd widths; a BatchNorm first op (its dZ goes to its own dX buffer)
    run_both("softmax_cross_entropy", dtype, "rmsprop", N=5, B=1, widths=(1, 3), n_features=1, k=2, bn=False)
    rng = np.random.default_rng(1)
    layers = [fd.BatchNorm(6), fd.Tanh(), fd.Dropout(keep_prob=0.5), fd.Dense(6, 5), fd.Sigmoid(), fd.Dense(5, 3)]
    ref = fd.Sequential(layers, dtype=dtype, backend="cython", seed=9, l2=0.1)
    fus = ref.copy()
    X, y = make_data("softmax_cross_entropy", 19, 6, 3, dtype, rng)
    opt_r, opt_f = fd.optim.Adam(lr=0.02), fd.optim.Adam(lr=0.02)
    perm = np.arange(19, dtype=np.int64)[::-1].copy()
    lrs = np.full(4, 0.02)
    r = per_layer_epoch(ref, opt_r, X, y, None, perm, 5, lrs)
    f = fused_epoch(fus, opt_f, X, y, None, perm, 5, lrs)
    assert same_bits(r[0], f[0]) and r[2] == f[2]
    assert same_bits(ref.params, fus.params) and same_bits(ref.state, fus.state)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_wide_layers_above_parallel_thresholds(dtype):
    # 256 x 4100 BatchNorm / ReLU / dropout passes (> 2 x 524288 elements: two OpenMP threads when
    # available) and ~790k parameters (a parallel Adam step); the short last batch runs serially.
    run_both("softmax_cross_entropy", dtype, "adam", N=600, B=256, epochs=1, widths=(4100, 128), n_features=64,
             k=10, keep=0.7, l2=0.01)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("opt_name", ["adam", "sgd"])
def test_l2_sum_folded_into_the_update_multiblock_serial(opt_name, dtype):
    # a 300x300 W (> one 65536-element block of the L2 sum) in a model small enough for a serial
    # optimiser step: the executor's folded sum ||W||^2 (update + sum per block) must equal the
    # per-layer sum_squares pass bit for bit, step after step (it enters every cost J)
    run_both("softmax_cross_entropy", dtype, opt_name, N=40, B=16, widths=(300, 300), n_features=7, k=5, l2=0.7,
             keep=1.0)


def test_zero_weight_batch_contributes_nothing():
    # the second batch has all-zero weights: loss 0, no data gradient, no L2 term, no L2 gradient
    rng = np.random.default_rng(5)
    ref = make_model("softmax_cross_entropy", "float32", l2=0.2)
    fus = ref.copy()
    X, y = make_data("softmax_cross_entropy", 24, ref.n_features, 3, "float32", rng)
    w = rng.uniform(0.5, 2.0, 24)
    w[8:16] = 0.0
    perm = np.arange(24, dtype=np.int64)
    lrs = np.full(3, 0.01)
    opt_r, opt_f = fd.optim.SGD(lr=0.01), fd.optim.SGD(lr=0.01)
    r = per_layer_epoch(ref, opt_r, X, y, w, perm, 8, lrs)
    f = fused_epoch(fus, opt_f, X, y, w, perm, 8, lrs)
    assert f[1][1] == 0.0 and f[0][1] == 0.0
    assert same_bits(r[0], f[0]) and same_bits(ref.params, fus.params)


def test_nonfinite_step_is_not_applied():
    # an inf input in the third batch: steps 0 and 1 applied, step 2 reported (status 1) and NOT applied,
    # exactly as fit's per-step loop stops before the optimiser
    rng = np.random.default_rng(2)
    ref = make_model("softmax_cross_entropy", "float32", keep=1.0)
    fus = ref.copy()
    X, y = make_data("softmax_cross_entropy", 30, ref.n_features, 3, "float32", rng)
    X[20, 0] = np.inf
    perm = np.arange(30, dtype=np.int64)
    lrs = np.full(4, 0.01)
    opt_r, opt_f = fd.optim.Adam(lr=0.01), fd.optim.Adam(lr=0.01)
    r = per_layer_epoch(ref, opt_r, X, y, None, perm, 8, lrs)
    f = fused_epoch(fus, opt_f, X, y, None, perm, 8, lrs)
    assert r[3] == f[3] == 1
    assert len(f[0]) == 3 and not np.isfinite(f[0][2]) and fus.step_count == 2 and opt_f.t == 2
    assert same_bits(r[0][:2], f[0][:2])
    assert same_bits(ref.params, fus.params) and same_bits(opt_r.state["v"], opt_f.state["v"])


def test_status_2_when_the_update_overflows():
    rng = np.random.default_rng(4)
    model = make_model("softmax_cross_entropy", "float32", bn=False, keep=1.0)
    X, y = make_data("softmax_cross_entropy", 8, model.n_features, 3, "float32", rng)
    spec = fd.optim.SGD(lr=1.0).spec()
    ex = cb.epoch_executor(model.plan, 8, spec)
    costs, losses = np.zeros(1), np.zeros(1)
    done, _, status = ex.run_epoch(X, y, np.empty(0), np.arange(8, dtype=np.int64), model.params, model.grads,
                                   model.state, model.params[:0], model.params[:0], np.array([np.inf]),
                                   np.zeros(1), 0, 0, 8, costs, losses)
    assert (done, status) == (1, 2)
    assert np.isfinite(costs[0])


def test_arguments_are_checked():
    model = make_model("softmax_cross_entropy", "float32")
    spec = fd.optim.Adam().spec()
    ex = cb.epoch_executor(model.plan, 4, spec)
    X = np.zeros((6, model.n_features), np.float32)
    y = np.zeros(6, np.int64)
    v, s = np.zeros_like(model.params), np.zeros_like(model.params)
    good = dict(X=X, y=y, w=np.empty(0), perm=np.arange(6, dtype=np.int64), params=model.params,
                grads=model.grads, state=model.state, v=v, s=s, c1=np.ones(2), c2=np.ones(2), step0=0, seed=0,
                n_total=6, costs=np.zeros(2), losses=np.zeros(2))
    bad = {
        "X": (X.astype(np.float64), "X must be"),
        "y": (np.array([0, 1, 2, 0, 1, 3], np.int64), "class labels"),   # a bad label in the 2nd batch
        "w": (np.ones(5), "w must be"),
        "perm": (np.array([0, 1, 2, 3, 4, 6], np.int64), "perm indexes"),
        "v": (np.zeros(3, np.float32), "optimiser state v"),
        "c1": (np.ones(1), "c1 and c2 must be"),
        "params": (model.params[::2], "params and grads"),
    }
    before = model.params.copy()
    for name, (value, msg) in bad.items():
        with pytest.raises(ValueError, match=msg):
            ex.run_epoch(**{**good, name: value})
    assert same_bits(model.params, before)          # rejected before any step ran
    assert ex.run_epoch(**good)[2] == 0


def _bf16_model(**kw):
    import warnings

    with warnings.catch_warnings():   # "no bfloat16 unit" on CPUs without one: still correct
        warnings.simplefilter("ignore")
        return make_model(**kw)


@pytest.mark.parametrize("loss,k", [("softmax_cross_entropy", 4), ("mse", 2)])
def test_bf16_epoch_bit_identical_to_per_layer(loss, k):
    try:
        model = _bf16_model(loss=loss, dtype="float32", k=k, l2=0.2)
    except TypeError as exc:
        pytest.skip(f"Sequential(precision=...) not available: {exc}")
    model = fd.Sequential.from_config(model.get_config(), backend="cython", precision="bf16") \
        if model.precision != "bf16" else model
    assert any(op.precision == 1 for op in model.plan.ops)
    fus = model.copy()
    rng = np.random.default_rng(7)
    X, y = make_data(loss, 29, model.n_features, k, "float32", rng)
    perm = rng.permutation(29).astype(np.int64)
    lrs = np.full(4, 0.01)
    opt_r, opt_f = fd.optim.Adam(lr=0.01), fd.optim.Adam(lr=0.01)
    r = per_layer_epoch(model, opt_r, X, y, None, perm, 8, lrs)
    f = fused_epoch(fus, opt_f, X, y, None, perm, 8, lrs)
    assert r[3] == f[3] == 0
    assert same_bits(r[0], f[0]) and same_bits(model.params, fus.params) and same_bits(model.state, fus.state)


def test_bf16_dense_kernels_match_the_reference_emulation():
    from fastdl.backends import reference as ref

    rng = np.random.default_rng(11)
    A, W, b = (rng.standard_normal(s).astype(np.float32) for s in ((67, 45), (45, 33), (33,)))
    dout = rng.standard_normal((67, 33)).astype(np.float32)
    res = []
    for be in (cb, ref):
        out, dZ, dW, db, dA = (np.empty((67, 33), np.float32), np.empty((67, 33), np.float32), np.empty_like(W),
                               np.empty_like(b), np.empty_like(A))
        be.dense_forward(A, W, b, 1, out, 1)
        be.dense_backward(A, W, out, dout, 1, 0.05, dZ, dW, db, dA, 1)
        res.append((out, dZ, dW, db, dA))
    for x, r in zip(*res):   # float32 accumulation of the same bf16 operands: float32 tolerance
        np.testing.assert_allclose(x, r, rtol=1e-5, atol=1e-5 * float(np.abs(r).max()))
    # and not the fp32 product: the operands really were rounded
    out32 = np.empty((67, 33), np.float32)
    cb.dense_forward(A, W, b, 1, out32, 0)
    assert not np.allclose(out32, res[0][0], rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="float32"):
        cb.dense_forward(A.astype(np.float64), W.astype(np.float64), b.astype(np.float64), 1,
                         np.empty((67, 33)), 1)


def test_backend_object_offers_the_executor():
    from fastdl.backends import get_backend

    model = make_model("mse", "float64", k=2)
    ex = get_backend("cython").epoch_executor(model.plan, 16, fd.optim.Adam().spec())
    assert isinstance(ex, cb.epoch_executor(model.plan, 16, fd.optim.Adam().spec()).__class__)
    assert ex.plan is model.plan and ex.batch_size == 16 and ex.opt_spec.kind == OPT_ADAM


THREADS_PROBE = """
import hashlib, sys
import numpy as np
sys.path.insert(0, {tests!r})
import test_cython_epoch as t
ref, fus = t.run_both("softmax_cross_entropy", "float32", "adam", N=600, B=256, epochs=1, widths=(4100, 128),
                      n_features=64, k=10, keep=0.7, l2=0.01)
print(hashlib.sha256(fus.params.tobytes() + fus.state.tobytes()).hexdigest())
"""


def test_epoch_independent_of_the_thread_count():
    # wide layers run their passes on 2 threads when allowed: the epoch's result must not change
    # with OMP_NUM_THREADS (bit-exact resume on another machine). The BLAS is held on one thread in
    # both runs: OpenBLAS (the default on non-Intel CPUs) may split a GEMM differently with more
    # threads, which the README's Guarantees state as the one thread-count dependence.
    import os
    import subprocess
    import sys
    from pathlib import Path

    code = THREADS_PROBE.format(tests=str(Path(__file__).parent))
    digests = set()
    for nt in ("1", "2"):
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                              env={**os.environ, "OMP_NUM_THREADS": nt, "OPENBLAS_NUM_THREADS": "1",
                                   "MKL_NUM_THREADS": "1"})
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        digests.add(proc.stdout.strip().splitlines()[-1])
    assert len(digests) == 1, digests


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_weighted_losses_match_the_reference_above_the_parallel_thresholds(dtype):
    # the Cython loss kernels with per-example weights, on sizes whose rows are split across
    # threads (softmax-CE 3000x130, BCE 140000x1 and 20000x3, MSE 8200x130), against the reference
    from fastdl.backends import reference as ref

    rng = np.random.default_rng(8)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == np.float32 else dict(rtol=1e-11, atol=1e-13)
    cases = [
        ("softmax_cross_entropy", rng.standard_normal((3000, 130)).astype(dtype) * 3, rng.integers(0, 130, 3000)),
        ("sigmoid_bce", rng.standard_normal((140000, 1)).astype(dtype) * 3,
         (rng.random(140000) < 0.4).astype(dtype)),
        ("sigmoid_bce", rng.standard_normal((20000, 3)).astype(dtype), (rng.random((20000, 3)) < 0.4).astype(dtype)),
        ("mse", rng.standard_normal((8200, 130)).astype(dtype), rng.standard_normal((8200, 130)).astype(dtype)),
    ]
    for name, Z, y in cases:
        w = rng.uniform(0.0, 2.0, Z.shape[0])
        d_c, d_r = np.full_like(Z, np.nan), np.full_like(Z, np.nan)
        l_c = getattr(cb, name)(Z, y, d_c, w)
        l_r = getattr(ref, name)(Z, y, d_r, w)
        np.testing.assert_allclose(l_c, l_r, **tol)
        np.testing.assert_allclose(d_c, d_r, rtol=tol["rtol"], atol=tol["atol"] * float(np.abs(d_r).max()))
        # all-zero weights: loss 0 and dZ 0 (the batch contributes nothing)
        assert getattr(cb, name)(Z, y, d_c, np.zeros(Z.shape[0])) == 0.0 and not d_c.any()
