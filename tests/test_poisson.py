"""The Poisson loss (log link) end to end: kernels, validation, model, executors, gradients, files, ONNX.

* every compiled backend's ``poisson`` kernel against the NumPy reference on random
  inputs (odd shapes, batch 1, float32 and float64, weighted and not, with and
  without ``dZ``), outputs pre-filled with NaN;
* the kernel's exact definition (the half Poisson deviance, scikit-learn's
  ``poisson_loss`` including its constant) and its overflow behaviour;
* the validated entry point refuses negative and non-finite targets by name;
* each epoch executor (Numba, Cython) bit-identical to its backend's per-layer
  path on a Poisson model; fit's divergence guard catches an exp overflow;
* gradcheck, save/load, ONNX (onnxruntime).
"""
from __future__ import annotations

import math
import zlib

import numpy as np
import pytest

import fastdl as fd
from fastdl.backends import available_backends, get_backend, reference
from fastdl.backends.validate import KernelArgumentError
from fastdl.plan import LOSS_KERNELS, LOSS_POISSON, step_coefficients

COMPILED = [b for b in available_backends() if b != "reference"]
RTOL = {np.dtype(np.float32): 1e-5, np.dtype(np.float64): 1e-12}
SHAPES = [(1, 1), (1, 4), (3, 1), (7, 3), (17, 5), (130, 2), (257, 3)]


def rng_for(*key) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


def case(m, k, dtype, key=0):
    rng = rng_for(m, k, np.dtype(dtype).name, key)
    Z = (rng.standard_normal((m, k)) * 1.5).astype(dtype)
    Y = rng.poisson(np.exp(rng.standard_normal((m, k)))).astype(dtype)
    Y[0, 0] = 0.0                       # xlogy(0, 0) = 0 must be taken, not 0 * log(0)
    return Z, Y, rng.uniform(0.0, 3.0, m)


def half_deviance(Z, Y, w=None) -> float:
    """The definition, independently of the reference kernel: mean over rows (weighted) of the row sums."""
    z, y = Z.astype(np.float64), Y.astype(np.float64)
    xlogy = np.where(y > 0, y * np.log(np.where(y > 0, y, 1.0)), 0.0)
    rows = (np.exp(z) - y * z + xlogy - y).sum(axis=1)
    return float(rows.mean()) if w is None else float(np.dot(w, rows) / w.sum())


def test_plan_codes():
    assert LOSS_KERNELS[LOSS_POISSON] == "poisson"
    model = fd.Sequential([fd.Dense(3, 2)], loss="poisson", seed=0)
    assert model.plan.loss == LOSS_POISSON and not model.plan.classifier and not model.loss.classifier


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("weighted", [False, True])
def test_reference_is_the_half_poisson_deviance(dtype, weighted):
    Z, Y, w = case(9, 3, dtype)
    dZ = np.full_like(Z, np.nan)
    loss = reference.poisson(Z, Y, dZ, w if weighted else None)
    assert isinstance(loss, float)
    np.testing.assert_allclose(loss, half_deviance(Z, Y, w if weighted else None), rtol=1e-12)
    scale = (w / w.sum())[:, None] if weighted else 1.0 / 9
    np.testing.assert_allclose(dZ, (np.exp(Z.astype(np.float64)) - Y) * scale, rtol=RTOL[np.dtype(dtype)])
    # the deviance is 0 at a perfect fit exp(z) = y (y > 0), >= 0 everywhere
    Yp = Y + 1
    assert abs(reference.poisson(np.log(Yp).astype(dtype), Yp, np.empty((0, 0), dtype))) < 1e-5
    assert loss >= 0


def test_matches_scikit_learns_poisson_loss():
    nn_base = pytest.importorskip("sklearn.neural_network._base")
    Z, Y, w = case(11, 2, np.float64, key=1)
    for weights in (None, w):
        ours = reference.poisson(Z, Y, np.empty((0, 0)), weights)
        theirs = nn_base.poisson_loss(Y, np.exp(Z), sample_weight=weights)
        np.testing.assert_allclose(ours, theirs, rtol=1e-12)


@pytest.mark.parametrize("bname", COMPILED)
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("m,k", SHAPES)
@pytest.mark.parametrize("weighted", [False, True])
def test_compiled_kernel_matches_reference(bname, dtype, m, k, weighted):
    be = get_backend(bname)
    assert be.sources["poisson"] == bname
    Z, Y, w = case(m, k, dtype)
    ww = w if weighted else None
    dZ_r, dZ_b = np.full_like(Z, np.nan), np.full_like(Z, np.nan)
    l_r = reference.poisson(Z, Y, dZ_r, ww)
    l_b = be.poisson(Z, Y, dZ_b, ww)
    rt = RTOL[np.dtype(dtype)]
    assert isinstance(l_b, float)
    np.testing.assert_allclose(l_b, l_r, rtol=rt, atol=rt)
    np.testing.assert_allclose(dZ_b, dZ_r, rtol=rt, atol=rt * float(np.abs(dZ_r).max()))
    # loss only (empty dZ): the same value
    np.testing.assert_allclose(be.poisson(Z, Y, np.empty((0, 0), dtype), ww), l_r, rtol=rt, atol=rt)


@pytest.mark.parametrize("bname", ["reference"] + COMPILED)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_zero_weight_batch_and_overflow(bname, dtype):
    be = get_backend(bname)
    Z, Y, _ = case(5, 2, dtype)
    dZ = np.full_like(Z, np.nan)
    assert be.poisson(Z, Y, dZ, np.zeros(5)) == 0.0
    assert (dZ == 0).all()
    # exp overflows to inf: a non-finite loss and gradient (the divergence checks see it), never a crash
    Zb = Z.copy()
    Zb[2, 1] = 800.0
    dZ = np.full_like(Z, np.nan)
    with np.errstate(all="ignore"):
        loss = be.unchecked.poisson(Zb, Y, dZ)
    assert not math.isfinite(loss)
    assert not np.isfinite(dZ[2, 1]) and np.isfinite(np.delete(dZ.ravel(), 2 * 2 + 1)).all()
    if dtype == np.float32:
        # exp(100) fits float64 (the loss) but not float32 (dZ): the gradient check sees it
        Zb[2, 1] = 100.0
        with np.errstate(all="ignore"):
            loss = be.unchecked.poisson(Zb, Y, dZ)
        assert math.isfinite(loss) and not np.isfinite(dZ[2, 1])


@pytest.mark.parametrize("bname", ["reference"] + COMPILED)
def test_validated_entry_refuses_bad_targets(bname):
    be = get_backend(bname)
    Z, Y, _ = case(4, 2, np.float64)
    dZ = np.zeros_like(Z)
    with pytest.raises(KernelArgumentError, match=r"poisson: 'Y' must be >= 0 .*1 negative value"):
        bad = Y.copy()
        bad[1, 1] = -1.0
        be.poisson(Z, bad, dZ)
    with pytest.raises(KernelArgumentError, match=r"poisson: 'Y' must be finite"):
        bad = Y.copy()
        bad[3, 0] = np.nan
        be.poisson(Z, bad, dZ)
    with pytest.raises(KernelArgumentError, match="same dtype"):
        be.poisson(Z, Y.astype(np.float32), dZ)
    with pytest.raises(KernelArgumentError, match="shape"):
        be.poisson(Z, Y[:, :1].copy(), dZ)
    assert (dZ == 0).all()


# --------------------------------------------------------------------------- the model


def test_model_predicts_the_rate_and_validates_targets():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((30, 4))
    model = fd.Sequential([fd.Dense(4, 5), fd.Tanh(), fd.Dense(5, 2)], loss="poisson", dtype="float64", seed=1)
    np.testing.assert_array_equal(model.predict(X), np.exp(model.decision_function(X)))
    with pytest.raises(TypeError, match="no class probabilities"):
        model.predict_proba(X)
    y = rng.poisson(1.0, (30, 2)).astype(float)
    ev = model.evaluate(X, y)
    assert set(ev) == {"loss"}
    np.testing.assert_allclose(ev["loss"], half_deviance(model.decision_function(X), y), rtol=1e-12)
    y[3, 1] = -2.0
    with pytest.raises(ValueError, match=r"y must be >= 0 for loss='poisson'.*1 negative"):
        model.fit(X, y, epochs=1)
    with pytest.raises(ValueError, match="NaN or infinite"):
        model.fit(X, np.full((30, 2), np.inf), epochs=1)
    with pytest.raises(ValueError, match=r"shape \(30, 2\) for poisson"):
        model.fit(X, np.ones(30), epochs=1)
    with pytest.raises(ValueError, match="applies its own output function"):
        fd.Sequential([fd.Dense(4, 1), fd.ReLU()], loss="poisson")


@pytest.mark.parametrize("bname,fused", [("reference", False)] + [(b, f) for b in COMPILED for f in (False, True)])
def test_fit_learns_a_log_linear_rate(bname, fused):
    rng = np.random.default_rng(3)
    X = rng.uniform(-1, 1, (400, 2))
    y = rng.poisson(np.exp(0.8 * X[:, 0] - 0.5 * X[:, 1] + 1.0)).astype(float)
    model = fd.Sequential([fd.Dense(2, 1)], loss="poisson", dtype="float64", backend=bname, seed=0)
    before = model.evaluate(X, y)["loss"]
    model.fit(X, y, optimizer=fd.Adam(lr=0.05), epochs=40, batch_size=50, fused=fused, verbose=0)
    assert model.evaluate(X, y)["loss"] < 0.5 * before
    W = model.layers[0].W.ravel()
    np.testing.assert_allclose(W, [0.8, -0.5], atol=0.15)
    np.testing.assert_allclose(model.layers[0].b, [1.0], atol=0.15)


@pytest.mark.parametrize("bname,fused", [("reference", False)] + [(b, f) for b in COMPILED for f in (False, True)])
def test_exp_overflow_is_a_divergence(bname, fused):
    rng = np.random.default_rng(0)
    X = rng.standard_normal((64, 3)).astype(np.float32)
    y = rng.poisson(2.0, 64).astype(np.float32)
    model = fd.Sequential([fd.Dense(3, 4), fd.ReLU(), fd.Dense(4, 1)], loss="poisson", backend=bname, seed=0)
    with np.errstate(all="ignore"), pytest.raises(fd.TrainingDiverged):
        model.fit(X * 1e4, y, optimizer=fd.SGD(lr=10.0), epochs=3, batch_size=16, fused=fused, verbose=0)
    assert np.isfinite(model.params).all()


@pytest.mark.parametrize("l2_scale", ["batch", "dataset"])
@pytest.mark.parametrize("k", [1, 2])
def test_gradcheck(k, l2_scale):
    rng = np.random.default_rng(k)
    X = rng.standard_normal((7, 4))
    y = rng.poisson(1.5, (7, k)).astype(float)
    layers = [fd.Dense(4, 5, use_bias=False), fd.BatchNorm(5), fd.Tanh(), fd.Dense(5, 3), fd.Sigmoid(),
              fd.Dense(3, k)]
    model = fd.Sequential(layers, loss="poisson", l2=0.3, l2_scale=l2_scale, dtype="float64", seed=k)
    report = fd.gradcheck(model, X, y)
    assert report.difference < 1e-7, str(report)
    w = rng.uniform(0.0, 3.0, 7)
    weighted = fd.gradcheck(model, X, y, sample_weight=w)
    assert weighted.difference < 1e-7, str(weighted)
    assert not np.allclose(weighted.exact, report.exact)


def test_save_load_round_trip(tmp_path):
    rng = np.random.default_rng(5)
    X = rng.standard_normal((50, 3))
    y = rng.poisson(np.exp(X[:, :2] * 0.3)).astype(float)
    model = fd.Sequential([fd.Dense(3, 6), fd.ReLU(), fd.Dense(6, 2)], loss="poisson", dtype="float64", seed=2)
    model.fit(X, y, optimizer=fd.Adam(lr=0.01), epochs=3, batch_size=16, verbose=0)
    path = tmp_path / "poisson.fdl"
    model.save(path)
    back = fd.load(path)
    assert back.loss.name == "poisson" and back.get_config() == model.get_config()
    np.testing.assert_array_equal(back.predict(X), model.predict(X))
    assert back.evaluate(X, y) == model.evaluate(X, y)


def test_onnx_export_applies_exp(tmp_path):
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    rng = np.random.default_rng(6)
    X = rng.standard_normal((40, 5))
    y = rng.poisson(2.0, (40, 3)).astype(float)
    model = fd.Sequential([fd.Dense(5, 8), fd.BatchNorm(8), fd.ReLU(), fd.Dense(8, 3)], loss="poisson", seed=3)
    model.fit(X, y, optimizer=fd.Adam(lr=0.01), epochs=3, batch_size=8, verbose=0)
    path = tmp_path / "poisson.onnx"
    model.to_onnx(path)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    assert [o.name for o in sess.get_outputs()] == ["outputs"]
    (out,) = sess.run(None, {"input": X.astype(np.float32)})
    np.testing.assert_allclose(out, model.predict(X), rtol=1e-5, atol=1e-6)
    assert "Exp" in {n.op_type for n in __import__("onnx").load(str(path)).graph.node}


# --------------------------------------------------------------------------- epoch executors


def _per_layer_epoch(model, opt, X, y, w, perm, B, lrs):
    costs, losses = [], []
    for bi, s0 in enumerate(range(0, len(perm), B)):
        idx = perm[s0:s0 + B]
        dl, l2t, _ = model._loss_and_grads(X[idx], y[idx], dropout=True, n_total=X.shape[0], step=model.step_count,
                                           weights=None if w is None else np.ascontiguousarray(w[idx]))
        costs.append(dl + l2t)
        losses.append(dl)
        opt.step(model.params, model.grads, lr=float(lrs[bi]))
        model.step_count += 1
    return np.array(costs), np.array(losses)


def _fused_epoch(model, opt, X, y, w, perm, B, lrs):
    spec = opt.spec()
    ex = model.kernels.epoch_executor(model.plan, B, spec)
    st = dict(zip(spec.state_names, opt.ensure_state(model.params)))
    empty = model.params[:0]
    c1, c2 = step_coefficients(spec, lrs, opt.t)
    costs, losses = np.full(lrs.size, np.nan), np.full(lrs.size, np.nan)
    done, wrong, status = ex.run_epoch(X, y, np.empty(0) if w is None else w, perm, model.params, model.grads,
                                       model.state, st.get("v", empty), st.get("s", empty), c1, c2,
                                       model.step_count, model.seed, X.shape[0], costs, losses)
    opt.t += done
    model.step_count += done
    assert (done, wrong, status) == (lrs.size, 0, 0)
    return costs, losses


def _same_bits(a, b) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


@pytest.mark.parametrize("bname", COMPILED)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("weighted,l2_scale", [(False, "batch"), (True, "batch"), (True, "dataset")])
@pytest.mark.parametrize("opt_name", ["adam", "nesterov"])
def test_epoch_executor_bit_identical_to_per_layer(bname, dtype, k, weighted, l2_scale, opt_name):
    rng = np.random.default_rng(k)
    N, B, nf = 41, 8, 6
    layers = [fd.Dense(nf, 9, use_bias=False), fd.BatchNorm(9), fd.ReLU(), fd.Dropout(keep_prob=0.8),
              fd.Dense(9, 5), fd.Tanh(), fd.Dense(5, k)]
    ref = fd.Sequential(layers, loss="poisson", l2=0.2, l2_scale=l2_scale, dtype=dtype, backend=bname, seed=4)
    fus = ref.copy()
    X = rng.standard_normal((N, nf)).astype(dtype)
    y = ref.check_y(rng.poisson(1.5, (N, k)).astype(dtype), N)
    w = rng.uniform(0.0, 3.0, N) if weighted else None
    make = {"adam": lambda: fd.Adam(lr=0.01, backend=bname),
            "nesterov": lambda: fd.ClassicalMomentum(lr=0.02, momentum=0.9, nesterov=True, backend=bname)}[opt_name]
    o_r, o_f = make(), make()
    for epoch in range(2):
        perm = np.random.default_rng(epoch).permutation(N).astype(np.int64)
        lrs = np.linspace(1.0, 0.5, -(-N // B)) * o_r.lr
        c_r, l_r = _per_layer_epoch(ref, o_r, X, y, w, perm, B, lrs)
        c_f, l_f = _fused_epoch(fus, o_f, X, y, w, perm, B, lrs)
        assert np.isfinite(c_r).all()
        assert _same_bits(c_r, c_f) and _same_bits(l_r, l_f)
        assert _same_bits(ref.params, fus.params) and _same_bits(ref.state, fus.state)
        for name in o_r.spec().state_names:
            assert _same_bits(o_r.state[name], o_f.state[name]), name


@pytest.mark.parametrize("bname", COMPILED)
def test_epoch_executor_batch_of_one(bname):
    rng = np.random.default_rng(9)
    ref = fd.Sequential([fd.Dense(1, 3), fd.Sigmoid(), fd.Dense(3, 1)], loss="poisson", dtype="float32",
                        backend=bname, seed=1)
    fus = ref.copy()
    X = rng.standard_normal((5, 1)).astype(np.float32)
    y = ref.check_y(rng.poisson(1.0, 5).astype(np.float32), 5)
    o_r, o_f = fd.RMSprop(lr=0.01, backend=bname), fd.RMSprop(lr=0.01, backend=bname)
    perm = np.arange(5, dtype=np.int64)[::-1].copy()
    lrs = np.full(5, 0.01)
    c_r, _ = _per_layer_epoch(ref, o_r, X, y, None, perm, 1, lrs)
    c_f, _ = _fused_epoch(fus, o_f, X, y, None, perm, 1, lrs)
    assert _same_bits(c_r, c_f) and _same_bits(ref.params, fus.params)
