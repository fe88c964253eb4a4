"""Sequential: flat parameters, fusion, cost, predictions, fit, and input validation."""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from threadpoolctl import threadpool_limits

import fastdl as fd
from fastdl import schedules as S
from fastdl.optim import get_optimizer

B = "reference"

# Tiny data sets: fit's batch_size clipping and the vanishing-gradient monitor (all-zero
# inputs in the validation tests) are expected here; test_fit_batch_size_larger_than_data
# checks the warning itself.
pytestmark = [pytest.mark.filterwarnings("ignore:batch_size=.*is larger than:UserWarning"),
              pytest.mark.filterwarnings("ignore:vanishing gradient:RuntimeWarning")]


@pytest.fixture(autouse=True)
def _one_blas_thread():
    """Tiny matrices: a multi-threaded BLAS only adds synchronisation cost (seconds on a
    loaded 2-core machine). Results do not depend on the thread count."""
    with threadpool_limits(1):
        yield


def make_data(m=40, n=5, k=3, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((m, n)).astype(np.float32)
    y = rng.integers(0, k, m)
    return X, y


def _dense(model):
    return [layer for layer in model.layers if isinstance(layer, fd.Dense)]


def mlp(n=5, h=8, k=3, *, bn=False, keep_prob=1.0, act=fd.ReLU, **kw):
    layers = [fd.Dense(n, h, use_bias=not bn)]
    if bn:
        layers.append(fd.BatchNorm(h))
    layers.append(act())
    if keep_prob < 1.0:
        layers.append(fd.Dropout(keep_prob=keep_prob))
    layers.append(fd.Dense(h, k))
    kw.setdefault("backend", B)
    return fd.Sequential(layers, **kw)


# ----------------------------------------------------------------------------- construction


def test_flat_params_are_shared_views_in_order():
    layers = [fd.Dense(3, 4, use_bias=False), fd.BatchNorm(4), fd.ReLU(), fd.Dropout(keep_prob=0.8), fd.Dense(4, 2)]
    model = fd.Sequential(layers, backend=B)
    d0, bn, _, _, d1 = layers
    assert model.params.shape == (12 + 4 + 4 + 8 + 2,)
    assert model.grads.shape == model.params.shape
    assert model.state.shape == (8,)
    assert model.params.dtype == np.float32
    names = [n for n, _ in model.param_slices]
    assert names == ["layers[0].W", "layers[1].gamma", "layers[1].beta", "layers[4].W", "layers[4].b"]
    assert [sl.stop - sl.start for _, sl in model.param_slices] == [12, 4, 4, 8, 2]
    assert not hasattr(d0, "b") or d0.b is None or getattr(d0, "b", np.empty(0)).size == 0
    for arr in (d0.W, bn.gamma, bn.beta, d1.W, d1.b):
        assert np.shares_memory(arr, model.params)
    for arr in (d0.dW, bn.dgamma, bn.dbeta, d1.dW, d1.db):
        assert np.shares_memory(arr, model.grads)
    for arr in (bn.running_mean, bn.running_var):
        assert np.shares_memory(arr, model.state)
    assert d0.W.shape == (3, 4) and d1.W.shape == (4, 2) and d1.b.shape == (2,)

    # writing the flat vector changes the layers ...
    model.params[...] = np.arange(model.params.size)
    np.testing.assert_array_equal(d0.W, np.arange(12).reshape(3, 4))
    np.testing.assert_array_equal(bn.gamma, np.arange(12, 16))
    np.testing.assert_array_equal(bn.beta, np.arange(16, 20))
    np.testing.assert_array_equal(d1.W, np.arange(20, 28).reshape(4, 2))
    np.testing.assert_array_equal(d1.b, [28, 29])
    # ... and writing a layer changes the flat vector
    d1.W[1, 0] = -7.0
    bn.beta[2] = -3.0
    assert model.params[22] == -7.0 and model.params[18] == -3.0
    model.state[...] = np.arange(8)
    np.testing.assert_array_equal(bn.running_mean, np.arange(4))
    np.testing.assert_array_equal(bn.running_var, np.arange(4, 8))

    # gradients: one flat vector too
    model.params[...] = np.random.default_rng(0).standard_normal(model.params.size) * 0.3
    X, y = make_data(10, 3, 2)
    model.compute_gradients(X, y)
    for name, value, grad in model.parameter_arrays():
        sl = dict(model.param_slices)[name]
        np.testing.assert_array_equal(grad, model.grads[sl])
        np.testing.assert_array_equal(value, model.params[sl])
    np.testing.assert_array_equal(d0.dW.reshape(-1), model.grads[:12])
    np.testing.assert_array_equal(d1.db, model.grads[28:30])
    model.grads[...] = 0
    assert np.all(d0.dW == 0) and np.all(bn.dgamma == 0)


def test_initialisation():
    model = fd.Sequential([fd.Dense(400, 300), fd.ReLU(), fd.Dense(300, 200, init="xavier"), fd.Tanh(),
                           fd.Dense(200, 10, init="lecun")], backend=B, seed=3)
    d0, d1, d2 = _dense(model)
    assert d0.W.std() == pytest.approx(math.sqrt(2 / 400), rel=0.03)
    assert d1.W.std() == pytest.approx(math.sqrt(2 / 500), rel=0.03)
    assert d2.W.std() == pytest.approx(math.sqrt(1 / 200), rel=0.05)
    assert np.all(d0.b == 0) and np.all(d1.b == 0)
    same = fd.Sequential([fd.Dense(400, 300), fd.ReLU(), fd.Dense(300, 200, init="xavier"), fd.Tanh(),
                          fd.Dense(200, 10, init="lecun")], backend=B, seed=3)
    np.testing.assert_array_equal(model.params, same.params)
    other = fd.Sequential([fd.Dense(400, 300)], backend=B, seed=4, loss="mse")
    assert not np.array_equal(_dense(other)[0].W, d0.W)
    bnm = mlp(bn=True)
    bn = bnm.layers[1]
    assert np.all(bn.gamma == 1) and np.all(bn.beta == 0)
    assert np.all(bn.running_mean == 0) and np.all(bn.running_var == 1)


def test_layer_cannot_be_shared_between_models():
    d = fd.Dense(3, 2)
    fd.Sequential([d], backend=B)
    with pytest.raises(ValueError, match="already belongs to another model"):
        fd.Sequential([d], backend=B)


@pytest.mark.parametrize("act", [fd.ReLU, fd.Tanh, fd.Sigmoid])
def test_activation_fusion_matches_unfused(act):
    X, y = make_data(12, 5, 3, seed=1)
    fused = fd.Sequential([fd.Dense(5, 6), act(), fd.Dense(6, 3)], backend=B, seed=1, l2=0.1,
                          dtype="float64")
    # An Identity in between stops the fusion: the activation runs as its own op.
    unfused = fd.Sequential([fd.Dense(5, 6), fd.Identity(), act(), fd.Dense(6, 3)], backend=B, seed=1,
                            l2=0.1, dtype="float64")
    assert len(fused.plan.ops) == 2 and len(unfused.plan.ops) == 3
    assert fused.plan.ops[0].act == act().code and unfused.plan.ops[0].act == 0
    unfused.params[...] = fused.params
    np.testing.assert_allclose(fused.decision_function(X), unfused.decision_function(X), rtol=1e-13)
    J1 = fused.compute_gradients(X, y)
    J2 = unfused.compute_gradients(X, y)
    assert J1 == pytest.approx(J2, rel=1e-13)
    np.testing.assert_allclose(fused.grads, unfused.grads, rtol=1e-12, atol=1e-15)


def test_batchnorm_path_matches_numpy():
    """Dense(no bias) -> BatchNorm -> ReLU (standalone op) -> Dense, checked by hand."""
    X, y = make_data(16, 5, 3, seed=2)
    X = X.astype(np.float64)
    model = mlp(bn=True, dtype="float64", seed=2)
    assert len(model.plan.ops) == 4  # the ReLU after BatchNorm is not fused
    d0, bn, _, d1 = model.layers
    bn.gamma[...] = [0.5, 1, 1.5, 2, 1, 1, 0.7, 1.2]
    bn.beta[...] = np.linspace(-1, 1, 8)
    Z = X @ d0.W
    mu, var = Z.mean(0), Z.var(0)
    A = np.maximum(bn.gamma * (Z - mu) / np.sqrt(var + bn.eps) + bn.beta, 0)
    logits = A @ d1.W + d1.b
    lse = np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1)) + logits.max(1)
    expected_J = np.mean(lse - logits[np.arange(16), y])
    assert model.compute_gradients(X, y) == pytest.approx(expected_J, rel=1e-12)
    # training-mode pass updated the running statistics (momentum 0.9)
    np.testing.assert_allclose(bn.running_mean, 0.1 * mu, rtol=1e-12)
    np.testing.assert_allclose(bn.running_var, 0.9 + 0.1 * var, rtol=1e-12)
    # inference uses the running statistics
    A_inf = np.maximum(bn.gamma * (Z - bn.running_mean) / np.sqrt(bn.running_var + bn.eps) + bn.beta, 0)
    np.testing.assert_allclose(model.decision_function(X), A_inf @ d1.W + d1.b, rtol=1e-12)


# ----------------------------------------------------------------------------- cost and L2


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_compute_gradients_includes_l2_term(dtype):
    X, y = make_data(20, 5, 3, seed=3)
    lam = 0.7
    model = mlp(l2=lam, dtype=dtype, seed=5, keep_prob=1.0)
    plain = model.copy()
    plain.l2 = 0.0
    J = model.compute_gradients(X, y)
    sum_w2 = sum(float(np.sum(d.W.astype(np.float64) ** 2)) for d in _dense(model))
    data_loss = model.evaluate(X, y)["loss"]
    rtol = 1e-5 if dtype == "float32" else 1e-12
    assert J == pytest.approx(data_loss + lam / (2 * 20) * sum_w2, rel=rtol)
    assert model.l2_cost(20) == pytest.approx(lam / 40 * sum_w2, rel=rtol)
    # the gradient carries (lambda/m) * W on the weights only, not on the biases
    plain.compute_gradients(X, y)
    diff = model.grads.astype(np.float64) - plain.grads
    for name, sl in model.param_slices:
        if name.endswith(".W"):
            np.testing.assert_allclose(diff[sl], lam / 20 * model.params[sl], rtol=1e-4, atol=1e-6)
        else:
            np.testing.assert_allclose(diff[sl], 0, atol=1e-6)


def test_l2_not_applied_to_batchnorm_params():
    X, y = make_data(20, 5, 3, seed=3)
    model = mlp(bn=True, l2=2.0, dtype="float64")
    plain = model.copy()
    plain.l2 = 0.0
    model.layers[1].gamma[...] = 3.0
    plain.layers[1].gamma[...] = 3.0
    J, J0 = model.compute_gradients(X, y), plain.compute_gradients(X, y)
    ss = sum(np.sum(d.W ** 2) for d in _dense(model))
    assert J - J0 == pytest.approx(2.0 / 40 * ss, rel=1e-10)
    np.testing.assert_allclose(model.layers[1].dgamma, plain.layers[1].dgamma, rtol=1e-10)


def test_l2_scale_dataset():
    X, y = make_data(20, 5, 3, seed=4)
    lam, N = 0.5, 1000
    model = mlp(l2=lam, l2_scale="dataset", dtype="float64")
    batch = mlp(l2=lam, dtype="float64")
    ss = sum(np.sum(d.W ** 2) for d in _dense(model))
    loss = model.evaluate(X, y)["loss"]
    assert model.compute_gradients(X, y, n_total=N) == pytest.approx(loss + lam / (2 * N) * ss, rel=1e-12)
    g_dataset = model.grads.copy()
    # without n_total the batch size is used; the default 'batch' scale ignores n_total
    assert model.compute_gradients(X, y) == pytest.approx(loss + lam / 40 * ss, rel=1e-12)
    assert batch.compute_gradients(X, y, n_total=N) == pytest.approx(loss + lam / 40 * ss, rel=1e-12)
    model.l2 = 0.0
    model.compute_gradients(X, y)
    sl = model.param_slices[0][1]
    np.testing.assert_allclose(g_dataset[sl] - model.grads[sl], lam / N * model.params[sl], rtol=1e-9)
    with pytest.raises(ValueError, match="l2_scale"):
        mlp(l2_scale="epoch")


# ----------------------------------------------------------------------------- predictions


def test_predictions_softmax():
    X, y = make_data(30, 5, 4, seed=5)
    model = mlp(k=4)
    P = model.predict_proba(X)
    assert P.shape == (30, 4) and P.dtype == np.float32
    assert np.all((P >= 0) & (P <= 1))
    np.testing.assert_allclose(P.sum(1), 1, rtol=1e-5)
    pred = model.predict(X)
    assert pred.shape == (30,) and pred.dtype.kind == "i"
    np.testing.assert_array_equal(pred, P.argmax(1))
    ev = model.evaluate(X, y)
    assert {"loss", "accuracy", "error"} <= set(ev)
    assert ev["accuracy"] == pytest.approx(np.mean(pred == y))
    assert ev["error"] == pytest.approx(1 - ev["accuracy"])
    assert ev["loss"] > 0
    assert model.decision_function(X).shape == (30, 4)
    # chunked inference gives the same numbers
    np.testing.assert_allclose(model.decision_function(X, batch_size=7), model.decision_function(X), rtol=1e-6)


def test_predictions_binary():
    X, _ = make_data(30, 5, 2, seed=6)
    y = (X[:, 0] > 0).astype(np.int64)
    model = mlp(k=1, loss="binary_cross_entropy")
    P = model.predict_proba(X)
    assert P.shape == (30, 2)
    np.testing.assert_allclose(P.sum(1), 1, rtol=1e-6)
    assert np.all((P >= 0) & (P <= 1))
    pred = model.predict(X)
    assert pred.shape == (30,) and set(np.unique(pred)) <= {0, 1}
    np.testing.assert_array_equal(pred, (P[:, 1] > 0.5).astype(int))
    ev = model.evaluate(X, y)
    assert {"loss", "accuracy", "error"} <= set(ev)
    assert 0 <= ev["error"] <= 1
    h = model.fit(X, y, optimizer=fd.Adam(0.05), epochs=30, batch_size=10)
    assert model.evaluate(X, y)["accuracy"] >= 0.9
    assert "error" in h.history
    # k outputs are k independent labels (multilabel): y must then be (m, k)
    with pytest.raises(ValueError, match=r"shape \(30, 2\)"):
        mlp(k=2, loss="binary_cross_entropy").evaluate(X, y)


def test_multilabel_binary_cross_entropy():
    """k sigmoid outputs: per-row loss = sum of k BCEs, proba (m, k), subset accuracy."""
    rng = np.random.default_rng(8)
    X = rng.standard_normal((40, 5))
    Y = np.stack([X[:, 0] > 0, X[:, 1] + X[:, 2] > 0, X[:, 3] < 0.5], axis=1).astype(int)
    model = mlp(k=3, loss="binary_cross_entropy", dtype="float64", seed=1)
    Z = model.decision_function(X)
    per = np.maximum(Z, 0) - Z * Y + np.log1p(np.exp(-np.abs(Z)))
    ev = model.evaluate(X, Y)
    assert ev["loss"] == pytest.approx(per.sum(1).mean(), rel=1e-12)
    assert ev["error"] == pytest.approx(np.mean(((Z > 0) != Y).any(axis=1)))
    P = model.predict_proba(X)
    assert P.shape == (40, 3)
    np.testing.assert_allclose(P, 1 / (1 + np.exp(-Z)), rtol=1e-12)
    np.testing.assert_array_equal(model.predict(X), (Z > 0).astype(int))
    assert model.count_errors(Z, model.check_y(Y, 40)) == int(((Z > 0) != Y).any(axis=1).sum())
    assert fd.gradcheck(model, X[:8], Y[:8]).difference < 1e-7
    w = rng.uniform(0.5, 2, 40)
    assert fd.gradcheck(model, X[:8], Y[:8], sample_weight=w[:8]).difference < 1e-7
    model.fit(X, Y, optimizer=fd.Adam(0.05), epochs=40, batch_size=10)
    assert model.evaluate(X, Y)["accuracy"] >= 0.8
    with pytest.raises(ValueError, match="only 0 and 1"):
        model.evaluate(X, Y * 2)


def test_predictions_mse():
    rng = np.random.default_rng(7)
    X = rng.standard_normal((30, 5))
    Y = np.stack([X[:, 0] + X[:, 1], X[:, 2] * 0.5], axis=1)
    model = mlp(k=2, loss="mse", act=fd.Tanh)
    pred = model.predict(X)
    assert pred.shape == (30, 2) and pred.dtype == np.float32
    ev = model.evaluate(X, Y)
    assert "loss" in ev and "accuracy" not in ev and "error" not in ev
    assert ev["loss"] == pytest.approx(0.5 * np.mean(np.sum((pred - Y) ** 2, axis=1)), rel=1e-5)
    with pytest.raises(TypeError, match="no class probabilities"):
        model.predict_proba(X)
    h = model.fit(X, Y, optimizer=fd.Adam(0.01), epochs=40, batch_size=10)
    assert {"loss", "cost", "lr"} <= set(h.history)
    assert "error" not in h.history and "accuracy" not in h.history
    assert model.evaluate(X, Y)["loss"] < ev["loss"]
    # 1-D targets are accepted for one output
    m1 = mlp(k=1, loss="mse")
    assert m1.evaluate(X, Y[:, 0])["loss"] >= 0
    # an activation on the output layer is allowed for mse
    fd.Sequential([fd.Dense(5, 1), fd.Sigmoid()], loss="mse", backend=B)


# ----------------------------------------------------------------------------- fit


def test_fit_history_and_batch_count():
    X, y = make_data(50, 5, 3, seed=8)
    Xv, yv = make_data(20, 5, 3, seed=9)
    model = mlp(bn=True, keep_prob=0.8, l2=0.01)
    h = model.fit(X, y, epochs=4, batch_size=16, validation_data=(Xv, yv))
    assert isinstance(h, fd.History) and model.history is h
    assert {"loss", "cost", "lr", "error", "val_loss", "val_error"} <= set(h.history)
    assert all(len(h[k]) == 4 for k in ("loss", "cost", "lr", "error", "val_loss", "val_error"))
    assert h.epoch == [0, 1, 2, 3]
    assert len(h.batch_cost) == 4 * math.ceil(50 / 16)  # last batch of 2 examples
    assert model.step_count == 16
    assert all(math.isfinite(c) for c in h.batch_cost)
    assert all(c >= lo for c, lo in zip(h["cost"], h["loss"]))  # J includes the (positive) L2 term
    assert all(0 <= e <= 1 for e in h["error"] + h["val_error"])
    assert h["val_loss"][-1] == pytest.approx(model.evaluate(Xv, yv)["loss"], rel=1e-6)
    assert h.time > 0
    assert "History" in repr(h)
    # no validation: no val_ keys
    h2 = mlp().fit(X, y, epochs=1)
    assert {"loss", "cost", "lr", "error"} <= set(h2.history)
    assert not any(k.startswith("val_") for k in h2.history)


def test_fit_learns_and_continues():
    X, y = make_data(60, 5, 3, seed=10)
    y = (X[:, 0] > 0).astype(int) + (X[:, 1] > 0.5)
    model = mlp()
    opt = fd.Adam(0.01)
    h1 = model.fit(X, y, optimizer=opt, epochs=5, batch_size=20)
    assert opt.t == 15
    h2 = model.fit(X, y, optimizer=opt, epochs=20, batch_size=20)
    assert opt.t == 75 and model.step_count == 75
    assert h2["loss"][-1] < h1["loss"][0]
    assert len(h2.batch_cost) == 60


def test_fit_is_reproducible_with_a_seed():
    X, y = make_data(50, 5, 3, seed=11)

    def run(seed):
        model = mlp(bn=True, keep_prob=0.7, l2=0.01, seed=seed)
        h = model.fit(X, y, optimizer=fd.Adam(0.01), epochs=3, batch_size=8)
        return model, h

    a, ha = run(0)
    b, hb = run(0)
    np.testing.assert_array_equal(a.params, b.params)
    np.testing.assert_array_equal(a.state, b.state)
    assert ha.batch_cost == hb.batch_cost
    c, hc = run(1)
    assert not np.array_equal(a.params, c.params)
    assert ha.batch_cost != hc.batch_cost


def test_fit_batch_size_larger_than_data_warns_and_clips():
    X, y = make_data(10, 5, 3)
    model = mlp()
    with pytest.warns(UserWarning, match="larger than the 10 examples"):
        h = model.fit(X, y, epochs=3, batch_size=64)
    assert len(h.batch_cost) == 3


def test_fit_batch_and_stochastic_gradient_descent():
    X, y = make_data(9, 5, 3)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="batch_size")
        h = mlp().fit(X, y, epochs=2, batch_size=9)
        assert len(h.batch_cost) == 2
        h = mlp(bn=False).fit(X, y, epochs=2, batch_size=1)
        assert len(h.batch_cost) == 18
        h = mlp().fit(X, y, epochs=1, batch_size=4)  # 4, 4, 1
        assert len(h.batch_cost) == 3


def test_fit_uses_sgd_updates_exactly():
    """One full batch per epoch with SGD: params follow W -= lr_epoch * dW by hand."""
    X, y = make_data(12, 5, 3, seed=12)
    model = mlp(dtype="float64", l2=0.1)
    manual = model.copy()
    model.fit(X, y, optimizer=fd.SGD(0.5), epochs=3, batch_size=12, lr_schedule=S.InverseTimeDecay(1.0))
    for epoch in range(3):
        manual.compute_gradients(X, y)
        manual.params -= 0.5 / (1 + epoch) * manual.grads
    np.testing.assert_allclose(model.params, manual.params, rtol=1e-12, atol=1e-14)


def test_fit_without_shuffle_uses_data_order():
    X, y = make_data(12, 5, 3, seed=13)
    model = mlp(dtype="float64")
    manual = model.copy()
    model.fit(X, y, optimizer=fd.SGD(0.1), epochs=1, batch_size=6, shuffle=False)
    for s in (0, 6):
        manual.compute_gradients(X[s:s + 6], y[s:s + 6])
        manual.params -= 0.1 * manual.grads
    np.testing.assert_allclose(model.params, manual.params, rtol=1e-12)


@pytest.mark.parametrize("schedule, expected", [
    (None, lambda a, e, t: a),
    ("constant", lambda a, e, t: a),
    (S.InverseTimeDecay(0.5), lambda a, e, t: a / (1 + 0.5 * e)),
    ("inverse_time", lambda a, e, t: a / (1 + 1.0 * e)),
    (S.ExponentialDecay(0.9), lambda a, e, t: 0.9 ** e * a),
    ("exponential", lambda a, e, t: 0.95 ** e * a),
    (S.InverseSqrtDecay(2.0), lambda a, e, t: 2.0 / math.sqrt(e + 1) * a),
    (S.InverseSqrtDecay(1.0, per_step=True), lambda a, e, t: a / math.sqrt(t)),
    (S.StaircaseDecay(0.5, every=2), lambda a, e, t: a * 0.5 ** (e // 2)),
    (S.LambdaSchedule(lambda a, e, t: a * (e + 1)), lambda a, e, t: a * (e + 1)),
])
def test_schedules_in_fit(schedule, expected):
    X, y = make_data(30, 5, 3, seed=14)
    model = mlp()
    opt = fd.SGD(0.01)
    h = model.fit(X, y, optimizer=opt, epochs=5, batch_size=10, lr_schedule=schedule)
    per_epoch = 3
    for e, lr in enumerate(h["lr"]):
        t_last = (e + 1) * per_epoch  # the lr recorded is that of the epoch's last update
        assert lr == pytest.approx(expected(0.01, e, t_last), rel=1e-12)
    assert opt.lr == 0.01  # the schedule never changes alpha0


def test_manual_decay_through_a_callback():
    class Halve(fd.Callback):
        def __init__(self, opt):
            self.opt = opt

        def on_epoch_end(self, model, epoch, logs):
            self.opt.lr /= 2

    X, y = make_data(30, 5, 3)
    opt = fd.SGD(0.08)
    h = mlp().fit(X, y, optimizer=opt, epochs=4, batch_size=10, callbacks=[Halve(opt)])
    assert h["lr"] == pytest.approx([0.08, 0.04, 0.02, 0.01])


def test_unknown_schedule():
    X, y = make_data(10, 5, 3)
    with pytest.raises(ValueError, match="unknown lr schedule"):
        mlp().fit(X, y, lr_schedule="cosine")


class Snapshots(fd.Callback):
    def __init__(self):
        self.params = []

    def on_epoch_end(self, model, epoch, logs):
        self.params.append(model.params.copy())


def test_early_stopping_stops_and_restores_best():
    rng = np.random.default_rng(15)
    X = rng.standard_normal((20, 10)).astype(np.float32)
    y = rng.integers(0, 3, 20)
    Xv = rng.standard_normal((40, 10)).astype(np.float32)
    yv = rng.integers(0, 3, 40)  # pure noise: the dev loss rises as the model memorises X
    model = fd.Sequential([fd.Dense(10, 64), fd.ReLU(), fd.Dense(64, 3)], backend=B, seed=0)
    es = fd.EarlyStopping(patience=3)
    snap = Snapshots()
    h = model.fit(X, y, optimizer=fd.Adam(0.03), epochs=200, batch_size=20, validation_data=(Xv, yv),
                  callbacks=[snap, es])
    n = len(h.epoch)
    assert es.stopped_epoch is not None and n < 200
    assert es.stopped_epoch == n - 1
    best = int(np.argmin(h["val_loss"]))
    assert es.best_epoch == best
    assert n == best + 3 + 1  # stopped after `patience` epochs without improvement
    np.testing.assert_array_equal(model.params, snap.params[best])
    assert model.evaluate(Xv, yv)["loss"] == pytest.approx(min(h["val_loss"]), rel=1e-6)


def test_early_stopping_restores_bn_state_and_needs_validation():
    X, y = make_data(30, 5, 3, seed=16)
    model = mlp(bn=True)
    # lr grows each epoch, 'min' mode: epoch 0 stays best, stop after 2 more epochs
    es = fd.EarlyStopping(monitor="lr", patience=2)
    snap_state = []

    class State(fd.Callback):
        def on_epoch_end(self, model, epoch, logs):
            snap_state.append((model.params.copy(), model.state.copy()))

    h = model.fit(X, y, epochs=10, batch_size=10, callbacks=[State(), es],
                  lr_schedule=S.ExponentialDecay(1.5))
    assert len(h.epoch) == 3 and es.best_epoch == 0
    np.testing.assert_array_equal(model.params, snap_state[0][0])
    np.testing.assert_array_equal(model.state, snap_state[0][1])
    with pytest.raises(ValueError, match="no validation_data"):
        mlp().fit(X, y, epochs=1, callbacks=[fd.EarlyStopping()])
    with pytest.raises(KeyError, match="not in logs"):
        mlp().fit(X, y, epochs=1, callbacks=[fd.EarlyStopping(monitor="accuracy_typo")])


def test_digits_reach_90_percent_dev_accuracy():
    X, y = fd.datasets.load_digits()
    X = np.asarray(X, np.float64)
    perm = np.random.default_rng(0).permutation(len(y))
    tr, dv = perm[:1200], perm[1200:]
    mu, sd = X[tr].mean(0), X[tr].std(0)
    Xs = (X - mu) / np.sqrt(sd ** 2 + 1e-8)
    model = fd.Sequential([fd.Dense(64, 32), fd.ReLU(), fd.Dense(32, 10)], backend=B, seed=0)
    h = model.fit(Xs[tr], y[tr], optimizer=fd.Adam(3e-3), epochs=10, batch_size=32,
                  validation_data=(Xs[dv], y[dv]))
    acc = model.evaluate(Xs[dv], y[dv])["accuracy"]
    assert acc > 0.9
    assert h["val_error"][-1] == pytest.approx(1 - acc)


def test_float64_end_to_end():
    X, y = make_data(40, 5, 3, seed=17)
    model = mlp(bn=True, keep_prob=0.8, dtype="float64")
    assert model.params.dtype == np.float64 and model.state.dtype == np.float64
    model.fit(X, y, epochs=3, batch_size=16)
    P = model.predict_proba(X)
    assert P.dtype == np.float64
    np.testing.assert_allclose(P.sum(1), 1, rtol=1e-12)
    c32 = model.copy(dtype="float32")
    assert c32.params.dtype == np.float32
    np.testing.assert_allclose(c32.predict_proba(X), P, rtol=1e-4, atol=1e-5)
    assert fd.Sequential([fd.Dense(2, 2)], dtype=np.float64, backend=B).dtype == np.float64


def test_training_diverged():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((30, 5)) * 1e20  # first gradient overflows float32
    model = fd.Sequential([fd.Dense(5, 1)], loss="mse", backend=B)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(fd.TrainingDiverged, match="learning rate"):
            model.fit(X, np.zeros(30), optimizer=fd.SGD(1.0), epochs=3, batch_size=10)
    assert np.isfinite(model.params).all()  # the last finite parameters are kept


def test_fit_zero_epochs_is_a_no_op():
    X, y = make_data(10, 5, 3)
    model = mlp()
    before = model.params.copy()
    h = model.fit(X, y, epochs=0, batch_size=5)
    assert h.epoch == [] and h.batch_cost == []
    np.testing.assert_array_equal(model.params, before)


def test_copy_is_independent_and_keeps_the_kernels():
    model = mlp(bn=True)
    c = model.copy()
    assert c.kernels is model.kernels
    np.testing.assert_array_equal(c.params, model.params)
    c.params[...] = 0
    assert not np.all(model.params == 0)
    assert model.copy(dtype="float64").params.dtype == np.float64


# ----------------------------------------------------------------------------- dropout in the model


def test_model_dropout_keeps_the_mean_activation():
    n = 2000
    model = fd.Sequential([fd.Dense(n, n, init="zeros", use_bias=False), fd.Dropout(keep_prob=0.5)], loss="mse",
                          backend=B, seed=3)
    model.layers[0].W[...] = np.eye(n)
    X = np.full((20, n), 3.0, np.float32)
    Y = np.zeros((20, n), np.float32)
    out = model._loss_and_grads(X, Y, dropout=True, n_total=None, step=0)[2].copy()
    assert set(np.unique(out).tolist()) == {0.0, 6.0}
    assert out.mean() == pytest.approx(3.0, rel=0.02)
    assert (out == 0).mean() == pytest.approx(0.5, abs=0.01)
    # a different step draws a different mask; the same step the same one
    out2 = model._loss_and_grads(X, Y, dropout=True, n_total=None, step=1)[2].copy()
    assert (out2 != out).mean() > 0.3
    again = model._loss_and_grads(X, Y, dropout=True, n_total=None, step=0)[2]
    np.testing.assert_array_equal(again, out)
    # inference: identity, no scaling
    np.testing.assert_array_equal(model.predict(X), X)
    # switched off: identity
    off = model._loss_and_grads(X, Y, dropout=False, n_total=None, step=0)[2]
    np.testing.assert_array_equal(off, X)


def test_dropout_keep_prob_one_is_identity_in_training():
    X, y = make_data(20, 5, 3)
    a = mlp(keep_prob=1.0, dtype="float64", seed=2)
    b = fd.Sequential([fd.Dense(5, 8), fd.ReLU(), fd.Dropout(keep_prob=1.0), fd.Dense(8, 3)], backend=B, seed=2,
                      dtype="float64")
    b.params[...] = a.params
    assert a.compute_gradients(X, y) == b.compute_gradients(X, y)
    np.testing.assert_array_equal(a.grads, b.grads)


def test_dropout_and_activation_as_first_layers():
    X, y = make_data(20, 5, 3)
    model = fd.Sequential([fd.Dropout(keep_prob=0.8), fd.Tanh(), fd.Dense(5, 3)], backend=B, dtype="float64")
    assert model.n_features == 5
    assert model.predict(X).shape == (20,)
    report = fd.gradcheck(model, X, y)
    assert report.verdict == "good", str(report)
    model.fit(X, y, epochs=2, batch_size=8)


def test_dropout_gradient_is_masked():
    X, y = make_data(20, 5, 3)
    model = mlp(keep_prob=0.5, dtype="float64")
    J_drop = model.compute_gradients(X, y)
    g_drop = model.grads.copy()
    J_off = model.compute_gradients(X, y, dropout=False)
    assert J_drop != J_off
    assert not np.array_equal(g_drop, model.grads)


# ----------------------------------------------------------------------------- bad input


@pytest.fixture
def clf():
    return mlp(n=4, k=3)


def test_bad_X(clf):
    y = np.zeros(5, int)
    with pytest.raises(ValueError, match="must be 2-D"):
        clf.predict(np.zeros(4))
    with pytest.raises(ValueError, match="must be 2-D"):
        clf.fit(np.zeros((5, 4, 1)), y)
    with pytest.raises(ValueError, match="has 3 features but the model expects 4"):
        clf.fit(np.zeros((5, 3)), y)
    with pytest.raises(ValueError, match="has 3 features but the model expects 4"):
        clf.predict(np.zeros((5, 3)))
    bad = np.zeros((5, 4))
    bad[2, 1] = np.nan
    with pytest.raises(ValueError, match="NaN or infinite"):
        clf.fit(bad, y)
    bad[2, 1] = np.inf
    with pytest.raises(ValueError, match="1 NaN or infinite"):
        clf.evaluate(bad, y)
    with pytest.raises(ValueError, match="overflowed"), np.errstate(over="ignore"):
        clf.predict(np.full((5, 4), 1e300))  # finite in float64, inf in float32
    with pytest.raises(TypeError, match="real numbers"):
        clf.predict(np.array([["a", "b", "c", "d"]]))
    with pytest.raises(TypeError, match="real numbers"):
        clf.predict(np.zeros((2, 4), complex))
    with pytest.raises(ValueError, match="no examples"):
        clf.predict(np.zeros((0, 4)))
    with pytest.raises((ValueError, TypeError), match="numeric|real numbers"):
        clf.predict([[1, 2, 3, 4], [1, 2]])
    # lists and integer arrays are converted
    assert clf.predict([[1, 2, 3, 4]]).shape == (1,)
    assert clf.predict(np.ones((2, 4), np.int64)).shape == (2,)


def test_bad_labels(clf):
    X = np.zeros((5, 4))
    with pytest.raises(ValueError, match=r"labels in \[0, 3\] but the model has 3 classes"):
        clf.fit(X, [0, 1, 2, 3, 0])
    with pytest.raises(ValueError, match=r"labels in \[-1, 2\]"):
        clf.evaluate(X, [0, 1, 2, -1, 0])
    with pytest.raises(ValueError, match="whole-number class ids"):
        clf.fit(X, [0, 1.5, 2, 0, 0])
    with pytest.raises(ValueError, match="one-hot"):
        clf.fit(X, np.eye(3)[[0, 1, 2, 0, 1]])
    with pytest.raises(ValueError, match="has 4 labels but X has 5 examples"):
        clf.fit(X, [0, 1, 2, 0])
    with pytest.raises(TypeError, match="integer class ids"):
        clf.fit(X, ["a", "b", "c", "a", "b"])
    with pytest.raises(ValueError, match="whole-number"):
        clf.fit(X, [0, np.nan, 2, 0, 0])
    # whole-number floats and (m, 1) columns are accepted
    clf.fit(X, np.array([0.0, 1.0, 2.0, 0.0, 1.0]), epochs=1)
    clf.fit(X, np.array([[0], [1], [2], [0], [1]]), epochs=1)
    # validation data is checked too
    with pytest.raises(ValueError, match="has 3 features"):
        clf.fit(X, [0, 1, 2, 0, 1], validation_data=(np.zeros((2, 3)), [0, 1]))
    with pytest.raises(ValueError, match="validation_data must be a tuple"):
        clf.fit(X, [0, 1, 2, 0, 1], validation_data=np.zeros((2, 4)))


def test_bad_binary_labels():
    model = mlp(n=4, k=1, loss="binary_cross_entropy")
    X = np.zeros((4, 4))
    with pytest.raises(ValueError, match=r"only 0 and 1.*2"):
        model.fit(X, [0, 1, 2, 1])
    with pytest.raises(ValueError, match="only 0 and 1"):
        model.fit(X, [0, 1, -1, 1])
    with pytest.raises(ValueError, match="has 3 labels but X has 4"):
        model.fit(X, [0, 1, 1])
    model.fit(X, np.array([0.0, 1.0, 1.0, 0.0]), epochs=1)
    model.fit(X, np.array([True, False, True, False]), epochs=1)


def test_bad_regression_targets():
    model = mlp(n=4, k=2, loss="mse")
    with pytest.raises(ValueError, match=r"shape \(4, 2\) for mse"):
        model.fit(np.zeros((4, 4)), np.zeros((4, 3)))
    with pytest.raises(ValueError, match="NaN or infinite"):
        model.fit(np.zeros((4, 4)), np.full((4, 2), np.nan))


def test_bad_hyperparameters():
    for kp in (0, 0.0, 1.5, -0.1, float("nan")):
        with pytest.raises(ValueError, match="keep_prob must be"):
            fd.Dropout(keep_prob=kp)
    for lr in (0, -1e-3):
        for cls in (fd.SGD, fd.Momentum, fd.RMSprop, fd.Adam):
            with pytest.raises(ValueError, match="lr must be > 0"):
                cls(lr=lr)
    with pytest.raises(TypeError, match="lr must be a number"):
        fd.Adam(lr="0.1")
    with pytest.raises(ValueError, match="beta1 must be in"):
        fd.Adam(beta1=1.0)
    X, y = make_data(10, 5, 3)
    model = mlp()
    with pytest.raises(ValueError, match="batch_size must be > 0"):
        model.fit(X, y, batch_size=0)
    with pytest.raises(ValueError, match="batch_size must be an integer"):
        model.fit(X, y, batch_size=2.5)
    with pytest.raises(ValueError, match="epochs must be >= 0"):
        model.fit(X, y, epochs=-1)
    with pytest.raises(ValueError, match="l2 must be >= 0"):
        mlp(l2=-1.0)
    with pytest.raises(ValueError, match="dtype must be 'float32' or 'float64'"):
        mlp(dtype="float16")
    with pytest.raises(ValueError, match="n_out must be > 0"):
        fd.Dense(3, 0)
    with pytest.raises(ValueError, match="momentum must be in"):
        fd.BatchNorm(3, momentum=1.0)


def test_unknown_names():
    with pytest.raises(ValueError, match="unknown loss 'hinge'"):
        mlp(loss="hinge")
    with pytest.raises(ValueError, match="unknown init 'glorot'"):
        fd.Dense(3, 2, init="glorot")
    with pytest.raises(ValueError, match="unknown backend 'tensorflow'"):
        mlp(backend="tensorflow")
    with pytest.raises(ValueError, match="unknown optimizer 'adamw'"):
        get_optimizer("adamw")
    assert isinstance(get_optimizer("Adam", lr=0.1), fd.Adam)
    X, y = make_data(10, 5, 3)
    with pytest.raises(TypeError, match="must be a fastdl optimizer"):
        mlp().fit(X, y, optimizer="adam")


def test_bad_architectures():
    with pytest.raises(ValueError, match=r"layers\[2\].*expects 5 inputs but the previous layer outputs 4"):
        fd.Sequential([fd.Dense(3, 4), fd.ReLU(), fd.Dense(5, 2)], backend=B)
    with pytest.raises(ValueError, match=r"expects 6 inputs but the previous layer outputs 4"):
        fd.Sequential([fd.Dense(3, 4), fd.BatchNorm(6), fd.Dense(6, 2)], backend=B)
    with pytest.raises(ValueError, match="remove the final Sigmoid"):
        fd.Sequential([fd.Dense(3, 1), fd.Sigmoid()], loss="binary_cross_entropy", backend=B)
    with pytest.raises(ValueError, match="remove the final ReLU"):
        fd.Sequential([fd.Dense(3, 4), fd.ReLU()], backend=B)
    with pytest.raises(ValueError, match=">= 2 outputs"):
        fd.Sequential([fd.Dense(3, 1)], backend=B)
    with pytest.raises(ValueError, match="at least one layer"):
        fd.Sequential([], backend=B)
    with pytest.raises(TypeError, match="not a fastdl layer"):
        fd.Sequential([fd.Dense(3, 2), "relu"], backend=B)
    with pytest.raises(ValueError, match="input width is unknown"):
        fd.Sequential([fd.ReLU()], loss="mse", backend=B)


def test_optimizer_reused_on_another_model():
    X, y = make_data(10, 5, 3)
    opt = fd.Adam()
    mlp(h=8).fit(X, y, optimizer=opt, epochs=1)
    with pytest.raises(ValueError, match="used with another model"):
        mlp(h=9).fit(X, y, optimizer=opt, epochs=1)
    opt.reset()
    mlp(h=9).fit(X, y, optimizer=opt, epochs=1)
    assert opt.t == 1


# ----------------------------------------------------------------------------- precision


def test_precision_validated_saved_and_in_the_plan():
    model = fd.Sequential([fd.Dense(3, 2)], precision="bf16", backend=B)
    assert model.precision == "bf16" and model.get_config()["precision"] == "bf16"
    assert all(op.precision == 1 for op in model.plan.ops)
    again = fd.Sequential.from_config(model.get_config(), backend=B)
    assert again.precision == "bf16"
    old = model.get_config()
    del old["precision"]  # files written before precision existed
    assert fd.Sequential.from_config(old, backend=B).precision == "fp32"
    with pytest.raises(ValueError, match="unknown precision 'fp16'; choose one of.*bf16.*fp32"):
        fd.Sequential([fd.Dense(3, 2)], precision="fp16", backend=B)
    with pytest.raises(ValueError, match="bf16.*needs dtype='float32'"):
        fd.Sequential([fd.Dense(3, 2)], precision="bf16", dtype="float64", backend=B)
    assert model.copy(precision="fp32").precision == "fp32"
    assert "bf16" in repr(model)


def test_bf16_model_rounds_the_gemm_operands():
    """precision='bf16' (reference emulation): the forward equals float32 math on bf16-rounded X and W."""
    from fastdl.backends.reference import round_to_bf16

    X, y = make_data(16, 5, 3, seed=8)
    X = X * 1.2345  # values with low mantissa bits set
    fp = mlp(seed=4, backend=B)
    bf = mlp(seed=4, backend=B, precision="bf16")
    d0, d1 = bf.layers[0], bf.layers[2]
    A = np.maximum(round_to_bf16(X).astype(np.float64) @ round_to_bf16(d0.W) + d0.b, 0).astype(np.float32)
    expected = round_to_bf16(A).astype(np.float64) @ round_to_bf16(d1.W) + d1.b
    out = bf.decision_function(X)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    assert not np.array_equal(out, fp.decision_function(X))
    # training works and the gradient check runs on the float64 fp32 copy
    Jb, Jf = bf.compute_gradients(X, y), fp.compute_gradients(X, y)
    assert Jb == pytest.approx(Jf, rel=2e-2)
    assert fd.gradcheck(bf, X[:6], y[:6]).difference < 1e-6


# ----------------------------------------------------------------------------- per-example weights


@pytest.mark.parametrize("loss", ["softmax_cross_entropy", "binary_cross_entropy", "mse"])
def test_integer_weights_equal_duplicated_rows(loss):
    """scikit-learn's rule: weight 2 == the row twice (loss, gradient and the L2 term's m).
    (Without BatchNorm: its batch statistics see each row once, whatever its weight.)"""
    rng = np.random.default_rng(3)
    k = {"softmax_cross_entropy": 3, "binary_cross_entropy": 1, "mse": 2}[loss]
    X = rng.standard_normal((9, 5))
    y = {"softmax_cross_entropy": rng.integers(0, 3, 9), "binary_cross_entropy": rng.integers(0, 2, 9),
         "mse": rng.standard_normal((9, 2))}[loss]
    w = np.array([1, 2, 0, 3, 1, 1, 2, 1, 4])
    a = mlp(k=k, loss=loss, l2=0.3, dtype="float64", seed=1)
    b = mlp(k=k, loss=loss, l2=0.3, dtype="float64", seed=1)
    Ja = a.compute_gradients(X, y, sample_weight=w, dropout=False)
    rep = np.repeat(np.arange(9), w)
    Jb = b.compute_gradients(X[rep], y[rep], dropout=False)
    assert Ja == pytest.approx(Jb, rel=1e-12)
    np.testing.assert_allclose(a.grads, b.grads, rtol=1e-10, atol=1e-13)
    ea, eb = a.evaluate(X, y, sample_weight=w), b.evaluate(X[rep], y[rep])
    assert ea.keys() == eb.keys()
    for key in ea:
        assert ea[key] == pytest.approx(eb[key], rel=1e-12, abs=1e-15)


def test_unit_weights_equal_the_unweighted_step():
    X, y = make_data(12, 5, 3, seed=5)
    a, b = mlp(l2=0.2, seed=2), mlp(l2=0.2, seed=2)
    Ja = a.compute_gradients(X, y, sample_weight=np.ones(12))
    Jb = b.compute_gradients(X, y)
    assert Ja == pytest.approx(Jb, rel=1e-6)
    np.testing.assert_allclose(a.grads, b.grads, rtol=1e-5, atol=1e-7)


def test_weights_scale_invariant_and_dataset_l2():
    X, y = make_data(12, 5, 3, seed=6)
    w = np.random.default_rng(0).uniform(0.1, 2, 12)
    # the data term is invariant to the weights' scale (the L2 term's m = sum(w) is not: scikit-learn's rule)
    a, b = mlp(seed=2, dtype="float64"), mlp(seed=2, dtype="float64")
    assert a.compute_gradients(X, y, sample_weight=w) == pytest.approx(
        b.compute_gradients(X, y, sample_weight=10 * w), rel=1e-12)
    np.testing.assert_allclose(a.grads, b.grads, rtol=1e-10)
    c = mlp(l2=0.2, seed=2, dtype="float64")
    ss = sum(float(np.sum(la.W ** 2)) for la in _dense(c))
    assert c.compute_gradients(X, y, sample_weight=10 * w) == pytest.approx(
        a.evaluate(X, y, sample_weight=w)["loss"] + 0.2 / (2 * 10 * w.sum()) * ss, rel=1e-6)
    # l2_scale='dataset': the L2 m stays n_total, only the data term is weighted
    d = mlp(l2=0.2, seed=2, dtype="float64", l2_scale="dataset")
    J = d.compute_gradients(X, y, sample_weight=w, n_total=500)
    assert J == pytest.approx(d.evaluate(X, y, sample_weight=w)["loss"]
                              + 0.2 / 1000 * sum(float(np.sum(la.W ** 2)) for la in _dense(d)), rel=1e-6)


@pytest.mark.parametrize("bad,match", [
    (np.ones(5), r"shape \(12,\)"), (np.ones((12, 1)), r"shape \(12,\)"),
    (np.r_[np.ones(11), np.nan], "NaN or infinite"), (np.r_[np.ones(11), -1.0], ">= 0"),
    (np.zeros(12), "sums to 0"), (["a"] * 12, "numbers")])
def test_sample_weight_validation(bad, match):
    X, y = make_data(12, 5, 3)
    model = mlp()
    with pytest.raises((ValueError, TypeError), match=match):
        model.compute_gradients(X, y, sample_weight=bad)
    with pytest.raises((ValueError, TypeError), match=match):
        model.evaluate(X, y, sample_weight=bad)


def test_classical_momentum_trains_like_scikit_learns_rule():
    """Two steps of fd.ClassicalMomentum against scikit-learn's update written out."""
    X, y = make_data(10, 5, 3, seed=9)
    for nesterov in (True, False):
        model = mlp(seed=3, dtype="float64")
        opt = fd.ClassicalMomentum(lr=0.1, momentum=0.8, nesterov=nesterov, backend=B)
        p = model.params.copy()
        v = np.zeros_like(p)
        for _ in range(3):
            model.compute_gradients(X, y)
            g = model.grads.copy()
            v = 0.8 * v - 0.1 * g
            p = p + (0.8 * v - 0.1 * g if nesterov else v)
            opt.step(model.params, model.grads)
        np.testing.assert_allclose(model.params, p, rtol=1e-12)
        assert opt.t == 3 and repr(opt).startswith("ClassicalMomentum(")
        restored = get_optimizer("classical_momentum", **opt.get_config())
        restored.load_state_dict(opt.state_dict())
        np.testing.assert_array_equal(restored.state["v"], opt.state["v"])
    with pytest.raises(ValueError, match="momentum"):
        fd.ClassicalMomentum(momentum=1.0)
