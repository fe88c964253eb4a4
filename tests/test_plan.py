"""The execution plan (fastdl.plan) and the per-layer executor that runs it.

The plan's contents are checked against the model's layers and flat arrays;
the executor against a plain NumPy forward/backward written out here from
docs/spec.md (not by calling the kernels), on random models.
"""
from __future__ import annotations

import numpy as np
import pytest
from threadpoolctl import threadpool_limits

import fastdl as fd
from fastdl import plan as P
from fastdl.backends import available_backends
from fastdl.backends.reference import dropout_mask


@pytest.fixture(autouse=True)
def _one_blas_thread():
    with threadpool_limits(1):
        yield


# ----------------------------------------------------------------------------- plan contents


def test_fusion_rule_and_op_fields():
    model = fd.Sequential([
        fd.Dense(6, 8), fd.ReLU(),                               # fused: one op
        fd.Dense(8, 5, use_bias=False), fd.BatchNorm(5), fd.Tanh(),  # BN, then a standalone activation
        fd.Dropout(keep_prob=0.7),
        fd.Dense(5, 4), fd.Identity(), fd.Sigmoid(),             # Identity fused (code 0), Sigmoid standalone
        fd.Dropout(keep_prob=1.0),                               # the identity: no op
        fd.Dense(4, 3),
    ], seed=0, backend="reference")
    ops = model.plan.ops
    kinds = [op.kind for op in ops]
    assert kinds == [P.OP_DENSE, P.OP_DENSE, P.OP_BATCHNORM, P.OP_ACTIVATION, P.OP_DROPOUT, P.OP_DENSE,
                     P.OP_ACTIVATION, P.OP_DENSE]
    assert [op.layer for op in ops] == [0, 2, 3, 4, 5, 6, 8, 10]
    assert ops[0].act == fd.ReLU().code and ops[1].act == 0 and ops[5].act == 0
    assert ops[3].act == fd.Tanh().code and ops[6].act == fd.Sigmoid().code
    assert ops[4].keep_prob == 0.7
    assert ops[2].eps == 1e-5 and ops[2].momentum == 0.9
    assert [(op.n_in, op.n_out) for op in ops] == [(6, 8), (8, 5), (5, 5), (5, 5), (5, 5), (5, 4), (4, 4), (4, 3)]
    assert ops[1].p1 == -1 and ops[0].p1 >= 0
    assert model.plan.n_features == 6 and model.plan.n_outputs == 3
    assert model.plan.loss == P.LOSS_SOFTMAX_CE and model.plan.classifier
    # describe() is plain data
    assert model.plan.describe()[0]["kind"] == P.OP_DENSE


def test_activation_first_is_standalone():
    model = fd.Sequential([fd.Dropout(keep_prob=0.5), fd.Tanh(), fd.Dense(3, 2)], backend="reference")
    assert [op.kind for op in model.plan.ops] == [P.OP_DROPOUT, P.OP_ACTIVATION, P.OP_DENSE]


def test_offsets_match_the_models_flat_arrays():
    model = fd.Sequential([fd.Dense(3, 4, use_bias=False), fd.BatchNorm(4), fd.ReLU(), fd.Dense(4, 5),
                           fd.BatchNorm(5), fd.Dense(5, 2)], backend="reference")
    sl = dict(model.param_slices)
    for op in model.plan.ops:
        if op.kind == P.OP_DENSE:
            assert op.p0 == sl[f"layers[{op.layer}].W"].start
            assert op.p1 == (sl[f"layers[{op.layer}].b"].start if f"layers[{op.layer}].b" in sl else -1)
        elif op.kind == P.OP_BATCHNORM:
            layer = model.layers[op.layer]
            assert op.p0 == sl[f"layers[{op.layer}].gamma"].start
            assert op.p0 + op.n_out == sl[f"layers[{op.layer}].beta"].start
            # the state views are where the plan says
            assert np.shares_memory(layer.running_mean, model.state[op.s0:op.s0 + op.n_out])
            assert layer.running_mean.__array_interface__["data"][0] == \
                model.state[op.s0:].__array_interface__["data"][0]
            assert layer.running_var.__array_interface__["data"][0] == \
                model.state[op.s0 + op.n_out:].__array_interface__["data"][0]
    assert model.plan.n_params == model.params.size and model.plan.n_state == model.state.size
    dense = [(sl[n].start, sl[n].stop) for n in sl if n.endswith(".W")]
    np.testing.assert_array_equal(model.plan.dense_weights, dense)


@pytest.mark.parametrize("B", [1, 7, 64])
def test_layout_buffers_do_not_overlap_and_fit(B):
    model = fd.Sequential([fd.BatchNorm(5), fd.Dense(5, 9, use_bias=False), fd.BatchNorm(9), fd.ReLU(),
                           fd.Dropout(keep_prob=0.5), fd.Dense(9, 4), fd.Tanh(), fd.Dropout(keep_prob=0.8),
                           fd.Dense(4, 3)], backend="reference")
    plan = model.plan
    lay = plan.layout(B)
    assert lay.iprog.shape == (len(plan.ops), P.N_ICOLS) and lay.iprog.dtype == np.int64
    assert lay.fprog.shape == (len(plan.ops), P.N_FCOLS)
    spans, masks = [], []
    for j, op in enumerate(plan.ops):
        row = lay.iprog[j]
        assert row[P.I_KIND] == op.kind and row[P.I_LAYER] == op.layer and row[P.I_PREC] == op.precision
        spans.append((row[P.I_OUT], row[P.I_OUT] + B * op.n_out))
        if j > 0 or op.kind == P.OP_BATCHNORM:
            spans.append((row[P.I_DX], row[P.I_DX] + B * op.n_in))
        else:
            assert row[P.I_DX] == -1
        if op.kind == P.OP_BATCHNORM:
            spans += [(row[P.I_MEAN], row[P.I_MEAN] + op.n_out), (row[P.I_INV], row[P.I_INV] + op.n_out)]
        if op.kind == P.OP_DROPOUT:
            masks.append((row[P.I_MASK], row[P.I_MASK] + B * op.n_out))
            assert lay.fprog[j, P.F_KEEP] == op.keep_prob
    d = plan.dlogits_offset(B)
    spans.append((d, d + B * plan.n_outputs))
    for group, size in ((spans, lay.ws_size), (masks, lay.mask_size)):
        group.sort()
        assert all(0 <= a < b <= size for a, b in group)
        assert all(group[i][1] <= group[i + 1][0] for i in range(len(group) - 1)), group
    assert spans[-1][1] == lay.ws_size and masks[-1][1] == lay.mask_size
    assert plan.layout(B) is lay  # cached


def test_layout_cache_is_bounded():
    model = fd.Sequential([fd.Dense(3, 2)], backend="reference")
    for B in range(1, 3 * P.MAX_CACHED_LAYOUTS):
        model.plan.layout(B)
    assert len(model.plan._layouts) <= P.MAX_CACHED_LAYOUTS
    X = np.zeros((5, 3), np.float32)
    for m in range(1, 40):
        model.decision_function(np.zeros((m, 3), np.float32))
    assert len(model.executor._workspaces) <= 8
    assert model.predict(X).shape == (5,)


def test_plan_records_loss_l2_and_precision_and_follows_changes():
    model = fd.Sequential([fd.Dense(3, 1)], loss="binary_cross_entropy", l2=0.5, l2_scale="dataset",
                          backend="reference", precision="bf16")
    plan = model.plan
    assert plan.loss == P.LOSS_SIGMOID_BCE and plan.l2 == 0.5 and plan.l2_scale == P.L2_DATASET
    assert plan.precision == P.PRECISION_BF16 and plan.ops[0].precision == P.PRECISION_BF16
    assert plan.l2_m(32, 1000) == 1000.0
    model.l2 = 0.25
    model.l2_scale = "batch"
    assert model.plan is not plan and model.plan.l2 == 0.25 and model.plan.l2_scale == P.L2_BATCH
    assert model.plan.l2_m(32, 1000) == 32.0
    assert model.executor.plan is model.plan
    assert fd.Sequential([fd.Dense(3, 2)], loss="mse", backend="reference").plan.loss == P.LOSS_MSE


# ----------------------------------------------------------------------------- optimiser coefficients


@pytest.mark.parametrize("kind,hyper,bc", [
    (P.OPT_ADAM, (0.9, 0.999, 1e-8), False), (P.OPT_ADAM, (0.5, 0.75, 1e-4), False),
    (P.OPT_MOMENTUM, (0.9, 0.0, 0.0), True), (P.OPT_MOMENTUM, (0.9, 0.0, 0.0), False),
    (P.OPT_SGD, (0.0, 0.0, 0.0), False), (P.OPT_RMSPROP, (0.0, 0.99, 1e-8), False),
    (P.OPT_NESTEROV, (0.9, 0.0, 0.0), False), (P.OPT_CLASSICAL_MOMENTUM, (0.8, 0.0, 0.0), False)])
@pytest.mark.parametrize("t0", [0, 7, 1000])
def test_step_coefficients_follow_the_formulas(kind, hyper, bc, t0):
    spec = P.OptimizerSpec(kind, hyper, bc)
    lrs = np.array([1e-3, 0.5, 2.0, 1e-3])
    c1, c2 = P.step_coefficients(spec, lrs, t0)
    for i, lr in enumerate(lrs):
        t = t0 + 1 + i
        if kind == P.OPT_ADAM:
            e1, e2 = lr / (1 - hyper[0] ** t), 1 / (1 - hyper[1] ** t)
        elif kind == P.OPT_MOMENTUM and bc:
            e1, e2 = lr / (1 - hyper[0] ** t), 0.0
        else:
            e1, e2 = lr, 0.0
        assert c1[i] == pytest.approx(e1, rel=1e-15) and c2[i] == pytest.approx(e2, rel=1e-15)
        # the single-step form used by Optimizer.step gives the same bits
        s1, s2 = P.step_scalars(spec, float(lr), t)
        assert (s1, s2) == (float(c1[i]), float(c2[i]))


def test_optimizer_specs():
    assert fd.Adam(beta1=0.8, beta2=0.9, eps=1e-6).spec() == P.OptimizerSpec(P.OPT_ADAM, (0.8, 0.9, 1e-6))
    assert fd.Momentum(beta=0.7, bias_correction=True).spec() == P.OptimizerSpec(P.OPT_MOMENTUM, (0.7, 0, 0), True)
    assert fd.RMSprop(beta2=0.9, eps=1e-7).spec().hyper == (0.0, 0.9, 1e-7)
    assert fd.SGD().spec().kind == P.OPT_SGD and fd.SGD().spec().state_names == ()
    assert fd.ClassicalMomentum(momentum=0.6).spec() == P.OptimizerSpec(P.OPT_NESTEROV, (0.6, 0, 0))
    assert fd.ClassicalMomentum(nesterov=False).spec().kind == P.OPT_CLASSICAL_MOMENTUM
    assert fd.Adam().spec().state_names == fd.Adam.state_names


# ----------------------------------------------------------------------------- executor vs NumPy

ACT = {0: lambda z: z, 1: lambda z: np.maximum(z, 0), 2: np.tanh, 3: lambda z: 1 / (1 + np.exp(-z))}
DACT = {0: lambda a: np.ones_like(a), 1: lambda a: (a > 0).astype(a.dtype), 2: lambda a: 1 - a * a,
        3: lambda a: a * (1 - a)}


def numpy_step(model, X, y, *, weights=None, dropout=True, seed=None, step=0, n_total=None):
    """J's parts and the flat gradient, written out from docs/spec.md with float64 NumPy."""
    params = model.params.astype(np.float64)
    grads = np.zeros_like(params)
    ops = model.plan.ops
    m = X.shape[0]
    x = X.astype(np.float64)
    cache = []
    for op in ops:
        if op.kind == P.OP_DENSE:
            W = params[op.p0:op.p0 + op.n_in * op.n_out].reshape(op.n_in, op.n_out)
            z = x @ W + (params[op.p1:op.p1 + op.n_out] if op.p1 >= 0 else 0)
            out = ACT[op.act](z)
            cache.append((x, out, W))
        elif op.kind == P.OP_BATCHNORM:
            n = op.n_out
            g, b = params[op.p0:op.p0 + n], params[op.p0 + n:op.p0 + 2 * n]
            mu, var = x.mean(0), x.var(0)
            xh = (x - mu) / np.sqrt(var + op.eps)
            out = g * xh + b
            cache.append((xh, var, g))
        elif op.kind == P.OP_ACTIVATION:
            out = ACT[op.act](x)
            cache.append(out)
        else:
            if dropout:
                mask = np.empty(x.shape, np.uint8)
                dropout_mask(model.seed if seed is None else seed, step, op.layer, op.keep_prob, mask)
                out = x * mask / op.keep_prob
            else:
                mask, out = None, x
            cache.append(mask)
        x = out
    Z = x
    w = np.ones(m) if weights is None else weights
    sw = w.sum()
    if model.plan.loss == P.LOSS_SOFTMAX_CE:
        zmax = Z.max(1, keepdims=True)
        lse = np.log(np.exp(Z - zmax).sum(1)) + zmax[:, 0]
        L = lse - Z[np.arange(m), y]
        G = np.exp(Z - lse[:, None])
        G[np.arange(m), y] -= 1
    elif model.plan.loss == P.LOSS_SIGMOID_BCE:
        t = y.reshape(Z.shape)
        L = (np.maximum(Z, 0) - Z * t + np.log1p(np.exp(-np.abs(Z)))).sum(1)
        G = 1 / (1 + np.exp(-Z)) - t
    else:
        L = 0.5 * ((Z - y) ** 2).sum(1)
        G = Z - y
    data_loss = float((w * L).sum() / sw)
    d = G * (w / sw)[:, None]
    if model.l2_scale == "dataset" and n_total:
        m_l2 = n_total
    else:
        m_l2 = sw
    ss = sum(float((params[a:b] ** 2).sum()) for a, b in model.plan.dense_weights)
    l2_term = model.l2 / (2 * m_l2) * ss if model.l2 else 0.0
    for op, c in zip(reversed(ops), reversed(cache)):
        if op.kind == P.OP_DENSE:
            xin, out, W = c
            dz = d * DACT[op.act](out)
            grads[op.p0:op.p0 + W.size] = (xin.T @ dz + model.l2 / m_l2 * W).reshape(-1)
            if op.p1 >= 0:
                grads[op.p1:op.p1 + op.n_out] = dz.sum(0)
            d = dz @ W.T
        elif op.kind == P.OP_BATCHNORM:
            xh, var, g = c
            n = op.n_out
            dg, db = (d * xh).sum(0), d.sum(0)
            grads[op.p0:op.p0 + n], grads[op.p0 + n:op.p0 + 2 * n] = dg, db
            d = g / (m * np.sqrt(var + op.eps)) * (m * d - db - xh * dg)
        elif op.kind == P.OP_ACTIVATION:
            d = d * DACT[op.act](c)
        elif c is not None:
            d = d * c / op.keep_prob
    return data_loss, l2_term, Z, grads


def random_model(rng, loss, dtype, backend, l2_scale="batch"):
    n_in = int(rng.integers(1, 9))
    layers, dim = [], n_in
    if rng.random() < 0.3:
        layers.append(fd.BatchNorm(dim))
    for _ in range(int(rng.integers(1, 4))):
        out = int(rng.integers(1, 12))
        bn = rng.random() < 0.4
        layers.append(fd.Dense(dim, out, use_bias=not bn, init=str(rng.choice(["he", "xavier", "lecun"]))))
        if bn:
            layers.append(fd.BatchNorm(out))
        layers.append([fd.ReLU, fd.Tanh, fd.Sigmoid, fd.Identity][int(rng.integers(0, 4))]())
        if rng.random() < 0.4:
            layers.append(fd.Dropout(keep_prob=float(rng.choice([0.5, 0.8, 1.0]))))
        dim = out
    k = {"softmax_cross_entropy": int(rng.integers(2, 6)), "binary_cross_entropy": int(rng.choice([1, 1, 3])),
         "mse": int(rng.integers(1, 4))}[loss]
    layers.append(fd.Dense(dim, k))
    return fd.Sequential(layers, loss=loss, l2=float(rng.choice([0.0, 0.3])), l2_scale=l2_scale, dtype=dtype,
                         backend=backend, seed=int(rng.integers(0, 100)))


def targets(rng, loss, m, k):
    if loss == "softmax_cross_entropy":
        return rng.integers(0, k, m)
    if loss == "binary_cross_entropy":
        return rng.integers(0, 2, m if k == 1 else (m, k)).astype(float)
    return rng.standard_normal((m, k))


BACKENDS = available_backends()
LOSSES = ["softmax_cross_entropy", "binary_cross_entropy", "mse"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("case", range(6))
@pytest.mark.parametrize("weighted", [False, True])
def test_executor_matches_numpy_on_random_models(backend, loss, case, weighted):
    rng = np.random.default_rng([case, LOSSES.index(loss), weighted])
    model = random_model(rng, loss, "float64", backend, l2_scale=["batch", "dataset"][case % 2])
    m = int(rng.choice([1, 2, 5, 17])) if not any(isinstance(la, fd.BatchNorm) for la in model.layers) \
        else int(rng.choice([2, 5, 17]))  # BatchNorm needs 2 rows for a variance
    X = rng.standard_normal((m, model.n_features))
    y = targets(rng, loss, m, model.n_outputs)
    w = rng.uniform(0.1, 3.0, m) if weighted else None
    exp_loss, exp_l2, exp_Z, exp_g = numpy_step(model, X, y, weights=w, step=3, n_total=250)
    Xc, yc = model.check_X(X), model.check_y(y, m)
    wc = model.check_sample_weight(w, m)
    loss_v, l2_v, Z = model._loss_and_grads(Xc, yc, dropout=True, n_total=250, step=3, weights=wc)
    np.testing.assert_allclose(Z, exp_Z, rtol=1e-10, atol=1e-12)
    assert loss_v == pytest.approx(exp_loss, rel=1e-10, abs=1e-12)
    assert l2_v == pytest.approx(exp_l2, rel=1e-10, abs=1e-14)
    np.testing.assert_allclose(model.grads, exp_g, rtol=1e-8, atol=1e-11)


@pytest.mark.parametrize("loss", LOSSES)
def test_executor_float32_matches_float64(loss):
    rng = np.random.default_rng(42)
    model = random_model(rng, loss, "float32", "reference")
    m = 9
    X = rng.standard_normal((m, model.n_features))
    y = targets(rng, loss, m, model.n_outputs)
    exp_loss, _, exp_Z, exp_g = numpy_step(model, X, y, step=0)
    J = model.compute_gradients(X, y)
    assert J == pytest.approx(exp_loss + model.l2_cost(m), rel=1e-4)
    np.testing.assert_allclose(model.grads, exp_g, rtol=2e-3, atol=2e-4)
    assert model.grads.dtype == np.float32


def test_inference_uses_running_statistics_and_no_dropout():
    rng = np.random.default_rng(1)
    model = fd.Sequential([fd.Dense(4, 6, use_bias=False), fd.BatchNorm(6), fd.ReLU(), fd.Dropout(keep_prob=0.5),
                           fd.Dense(6, 3)], dtype="float64", backend="reference")
    bn = model.layers[1]
    bn.running_mean[...] = rng.standard_normal(6)
    bn.running_var[...] = rng.uniform(0.5, 2, 6)
    X = rng.standard_normal((5, 4))
    d0, d1 = model.layers[0], model.layers[4]
    Z = X @ d0.W
    A = np.maximum(bn.gamma * (Z - bn.running_mean) / np.sqrt(bn.running_var + bn.eps) + bn.beta, 0)
    np.testing.assert_allclose(model.decision_function(X), A @ d1.W + d1.b, rtol=1e-12)


@pytest.mark.parametrize("loss", ["softmax_cross_entropy", "binary_cross_entropy"])
def test_count_errors_by_the_plans_loss(loss):
    rng = np.random.default_rng(2)
    k = 4 if loss == "softmax_cross_entropy" else 1
    model = fd.Sequential([fd.Dense(3, k)], loss=loss, backend="reference")
    Z = rng.standard_normal((11, k)).astype(np.float32)
    if k > 1:
        y = rng.integers(0, k, 11)
        expected = int((Z.argmax(1) != y).sum())
    else:
        y = rng.integers(0, 2, 11).astype(np.float32)
        expected = int(((Z[:, 0] > 0) != (y > 0.5)).sum())
    assert model.count_errors(Z, y) == expected
    with pytest.raises(TypeError, match="no classification error"):
        fd.Sequential([fd.Dense(3, 2)], loss="mse", backend="reference").count_errors(Z, y)


def test_changing_a_layers_configuration_recompiles_the_plan():
    model = fd.Sequential([fd.Dense(3, 4, use_bias=False), fd.BatchNorm(4), fd.ReLU(), fd.Dropout(keep_prob=0.5),
                           fd.Dense(4, 2)], backend="reference")
    model.layers[1].momentum = 0.5
    model.layers[1].eps = 1e-3
    model.layers[3].keep_prob = 1.0
    ops = model.plan.ops
    assert ops[1].momentum == 0.5 and ops[1].eps == 1e-3
    assert [op.kind for op in ops] == [P.OP_DENSE, P.OP_BATCHNORM, P.OP_ACTIVATION, P.OP_DENSE]
    assert model.executor.plan is model.plan


def test_executors_read_only_the_plan_and_arrays():
    """docs/spec.md "The execution plan": executors never import the model, layers, optimisers or training."""
    import ast
    import pathlib

    root = pathlib.Path(fd.__file__).parent
    for path in (root / "executors").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                mod = ("." * node.level) + (node.module or "")
                names = [mod + "." + a.name for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            for name in names:
                parts = name.replace("fastdl.", ".").lstrip(".").split(".")
                assert parts[0] not in {"model", "layers", "optim", "training", "losses"}, f"{path.name}: {name}"
