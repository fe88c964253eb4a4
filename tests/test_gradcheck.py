"""Gradient checking: backprop of every layer type and loss against finite differences,
and a deliberately broken backward pass must be caught and located."""
from __future__ import annotations

import numpy as np
import pytest
from threadpoolctl import threadpool_limits

import fastdl as fd
from fastdl.backends import KERNELS, Backend, get_backend
from fastdl.gradcheck import verdict_for

B = "reference"


@pytest.fixture(autouse=True)
def _one_blas_thread():
    """Tiny matrices: a multi-threaded BLAS only adds synchronisation cost (seconds on a
    loaded 2-core machine). Results do not depend on the thread count."""
    with threadpool_limits(1):
        yield


def data(m=6, n=4, k=3, seed=0, loss="softmax_cross_entropy"):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((m, n))
    if loss == "softmax_cross_entropy":
        y = rng.integers(0, k, m)
    elif loss == "binary_cross_entropy":
        y = rng.integers(0, 2, m)
    else:
        y = rng.standard_normal((m, k))
    return X, y


def every_layer(n, k, keep_prob=0.5):
    return [
        fd.Dense(n, 5, use_bias=False), fd.BatchNorm(5), fd.ReLU(), fd.Dropout(keep_prob=keep_prob),
        fd.Dense(5, 4), fd.Tanh(),
        fd.Dense(4, 4, init="xavier"), fd.Sigmoid(),
        fd.Dense(4, 3, use_bias=False), fd.Identity(), fd.BatchNorm(3), fd.Tanh(),
        fd.Dense(3, k),
    ]


@pytest.mark.parametrize("loss, k", [("softmax_cross_entropy", 3), ("binary_cross_entropy", 1), ("mse", 2)])
@pytest.mark.parametrize("l2", [0.0, 0.5])
def test_gradcheck_every_layer_type(loss, k, l2):
    X, y = data(k=k, loss=loss, seed=int(l2 * 10) + k)
    model = fd.Sequential(every_layer(4, k), loss=loss, l2=l2, dtype="float64", backend=B, seed=k)
    report = fd.gradcheck(model, X, y)
    assert report.difference < 1e-7, str(report)
    assert report.verdict == "good"
    assert set(report.per_array) == {name for name, _ in model.param_slices}
    assert all(d < 1e-6 for d in report.per_array.values()), str(report)
    assert report.approx.shape == report.exact.shape == (model.params.size,)
    assert "good" in str(report)


@pytest.mark.parametrize("loss, k", [("softmax_cross_entropy", 3), ("binary_cross_entropy", 1), ("mse", 2)])
@pytest.mark.parametrize("l2_scale", ["batch", "dataset"])
def test_gradcheck_with_sample_weights(loss, k, l2_scale):
    """J = sum(w_i L_i)/sum(w) + lambda/(2 sum(w)) ||W||^2: backprop of the weighted cost is exact too."""
    X, y = data(m=7, k=k, loss=loss, seed=k + 20)
    w = np.random.default_rng(k).uniform(0.0, 3.0, 7)
    model = fd.Sequential(every_layer(4, k), loss=loss, l2=0.4, l2_scale=l2_scale, dtype="float64",
                          backend=B, seed=k)
    report = fd.gradcheck(model, X, y, sample_weight=w)
    assert report.difference < 1e-7, str(report)
    # the weights matter: an unweighted check of the same model finds other gradients
    unweighted = fd.gradcheck(model, X, y)
    assert not np.allclose(report.exact, unweighted.exact)


@pytest.mark.parametrize("act", [fd.ReLU, fd.Tanh, fd.Sigmoid])
def test_gradcheck_fused_and_standalone_activations(act):
    X, y = data(seed=3)
    for layers in ([fd.Dense(4, 6), act(), fd.Dense(6, 3)],
                   [fd.Dense(4, 6), fd.BatchNorm(6), act(), fd.Dense(6, 3)]):
        model = fd.Sequential(layers, l2=0.2, dtype="float64", backend=B, seed=1)
        report = fd.gradcheck(model, X, y)
        assert report.difference < 1e-7, str(report)


def test_gradcheck_batchnorm_as_first_layer():
    X, y = data(seed=4)
    model = fd.Sequential([fd.BatchNorm(4), fd.Dense(4, 3)], dtype="float64", backend=B)
    model.layers[0].gamma[...] = [0.5, 1.5, 2.0, 0.8]
    model.layers[0].beta[...] = [0.1, -0.2, 0.3, 0.0]
    report = fd.gradcheck(model, X, y)
    assert report.difference < 1e-7, str(report)


def test_gradcheck_on_a_float32_model_runs_in_float64_and_leaves_the_model_alone():
    X, y = data(seed=5)
    model = fd.Sequential(every_layer(4, 3, keep_prob=0.7), l2=0.1, backend=B, seed=2)
    model.fit(X, y, epochs=2, batch_size=3)
    before = (model.params.copy(), model.state.copy(), model.grads.copy(), model.step_count)
    report = fd.gradcheck(model, X, y)
    assert report.difference < 1e-7, str(report)
    np.testing.assert_array_equal(model.params, before[0])
    np.testing.assert_array_equal(model.state, before[1])
    np.testing.assert_array_equal(model.grads, before[2])
    assert model.step_count == before[3]
    assert model.dtype == np.float32


def test_gradcheck_dropout_is_switched_off():
    """With dropout on the cost would change between the +eps and -eps evaluations (or the
    exact gradient would use a mask the finite differences do not): the check must still pass."""
    X, y = data(m=10, seed=6)
    model = fd.Sequential([fd.Dense(4, 8), fd.ReLU(), fd.Dropout(keep_prob=0.3), fd.Dense(8, 3)], dtype="float64",
                          backend=B, seed=3)
    report = fd.gradcheck(model, X, y)
    assert report.difference < 1e-7, str(report)
    # the exact gradient is the dropout-free one
    model.compute_gradients(X, y, dropout=False)
    np.testing.assert_allclose(report.exact, model.grads[report.indices], rtol=1e-12)


def test_gradcheck_max_per_array_subsamples():
    X, y = data(seed=7)
    model = fd.Sequential([fd.Dense(4, 10), fd.ReLU(), fd.Dense(10, 3)], dtype="float64", backend=B)
    report = fd.gradcheck(model, X, y, max_per_array=5, seed=1)
    assert report.indices.size == 5 + 5 + 5 + 3  # W0, b0, W1 capped at 5; b1 has 3
    assert len(np.unique(report.indices)) == report.indices.size
    assert report.difference < 1e-7


# ----------------------------------------------------------------------------- a broken backward


def broken_backend(kernel: str, wrap) -> Backend:
    ref = get_backend("reference")
    kernels = {k: getattr(ref, k) for k in KERNELS}
    kernels[kernel] = wrap(getattr(ref, kernel))
    return Backend("broken", kernels, {k: "reference" for k in KERNELS})


def scale_dW_of(shape, factor):
    def wrap(fn):
        def dense_backward(A_prev, W, out, dout, act, l2_over_m, dZ, dW, db, dA_prev):
            fn(A_prev, W, out, dout, act, l2_over_m, dZ, dW, db, dA_prev)
            if W.shape == shape:
                dW *= factor
        return dense_backward
    return wrap


def test_broken_dense_backward_is_caught_and_located():
    X, y = data(seed=8)
    layers = [fd.Dense(4, 6), fd.ReLU(), fd.Dense(6, 5), fd.Tanh(), fd.Dense(5, 3)]
    good = fd.Sequential(layers, l2=0.1, dtype="float64", backend=B, seed=4)
    bad = fd.Sequential([fd.Dense(4, 6), fd.ReLU(), fd.Dense(6, 5), fd.Tanh(), fd.Dense(5, 3)], l2=0.1,
                        dtype="float64", backend=broken_backend("dense_backward", scale_dW_of((6, 5), 1.5)),
                        seed=4)
    assert fd.gradcheck(good, X, y).verdict == "good"
    report = fd.gradcheck(bad, X, y)
    assert report.verdict == "bug", str(report)
    assert report.difference >= 1e-3
    assert report.worst_array == "layers[2].W"
    assert report.per_array["layers[2].W"] > 0.1
    # the other arrays are still right: the breakage is local to dW
    assert all(d < 1e-6 for name, d in report.per_array.items() if name != "layers[2].W"), str(report)
    assert "bug" in str(report)


def test_broken_kernels_by_wrapping_model_kernels():
    """Swap a model's kernels after construction (e.g. a suspect backend)."""
    X, y = data(seed=9)
    model = fd.Sequential([fd.Dense(4, 5, use_bias=False), fd.BatchNorm(5), fd.ReLU(), fd.Dense(5, 3)],
                          dtype="float64", backend=B, seed=5)

    def wrap(fn):
        def batchnorm_backward(Z, gamma, mean, inv_std, dout, dZ, dgamma, dbeta):
            fn(Z, gamma, mean, inv_std, dout, dZ, dgamma, dbeta)
            dgamma *= -1.0  # sign error
        return batchnorm_backward

    model.kernels = broken_backend("batchnorm_backward", wrap)
    report = fd.gradcheck(model, X, y)
    assert report.verdict == "bug"
    assert report.worst_array == "layers[1].gamma"
    assert report.per_array["layers[1].gamma"] == pytest.approx(1.0, rel=1e-6)  # ||2g|| / (2||g||)


def test_missing_l2_gradient_is_caught():
    """A backward that forgets the (lambda/m) W term while J includes it."""
    X, y = data(seed=10)

    def wrap(fn):
        def dense_backward(A_prev, W, out, dout, act, l2_over_m, dZ, dW, db, dA_prev):
            fn(A_prev, W, out, dout, act, 0.0, dZ, dW, db, dA_prev)
        return dense_backward

    model = fd.Sequential([fd.Dense(4, 6), fd.Tanh(), fd.Dense(6, 3)], l2=5.0, dtype="float64",
                          backend=broken_backend("dense_backward", wrap))
    report = fd.gradcheck(model, X, y)
    assert report.verdict == "bug"
    assert report.worst_array.endswith(".W")


# ----------------------------------------------------------------------------- worked examples


def test_verdict_thresholds_from_the_notes():
    """Notes 1.13: <= 1e-7 great; around 1e-5 look closer; >= 1e-3 almost surely a bug."""
    assert verdict_for(0.0) == "good"
    assert verdict_for(1e-7) == "good"
    assert verdict_for(1e-8) == "good"
    assert verdict_for(1e-5) == "check"
    assert verdict_for(2e-7) == "check"
    assert verdict_for(9.9e-4) == "check"
    assert verdict_for(1e-3) == "bug"
    assert verdict_for(0.5) == "bug"


def test_difference_formula_by_hand():
    """diff = ||approx - exact|| / (||approx|| + ||exact||), two-sided differences, eps 1e-7.

    J(theta) = theta^3 summed: dJ = 3 theta^2; the two-sided difference has error eps^2 theta."""
    from fastdl.gradcheck import _relative_difference

    approx = np.array([3.0, 4.0])
    exact = np.array([3.0, 4.0 + 1e-6])
    assert _relative_difference(approx, exact) == pytest.approx(1e-6 / (5.0 + np.linalg.norm(exact)))
    assert _relative_difference(np.zeros(3), np.zeros(3)) == 0.0
    theta = np.array([0.5, -1.2, 2.0])
    eps = 1e-7
    two_sided = ((theta + eps) ** 3 - (theta - eps) ** 3) / (2 * eps)
    one_sided = ((theta + eps) ** 3 - theta ** 3) / eps
    exact = 3 * theta ** 2
    # two-sided is far more accurate (O(eps^2) vs O(eps)), which is why the notes use it
    assert verdict_for(_relative_difference(two_sided, exact)) == "good"
    assert _relative_difference(two_sided, exact) < _relative_difference(one_sided, exact)
