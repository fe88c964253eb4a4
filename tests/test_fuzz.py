"""Property-based fuzzing: random model configurations through compute_gradients and gradcheck, and
kernels fed strided, misaligned and extreme inputs. Always the reference's answer or a clear error."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import fastdl as fd
from fastdl.backends import available_backends, get_backend
from fastdl.backends import reference as ref

BACKENDS = available_backends()
COMPILED = [b for b in BACKENDS if b != "reference"]
SMOOTH = {"tanh": fd.Tanh, "sigmoid": fd.Sigmoid, "identity": fd.Identity}
ALL_ACTS = dict(SMOOTH, relu=fd.ReLU)


@st.composite
def configs(draw, acts=ALL_ACTS):
    n_in = draw(st.integers(1, 6))
    loss = draw(st.sampled_from(["softmax_cross_entropy", "binary_cross_entropy", "mse"]))
    n_out = {"softmax_cross_entropy": draw(st.integers(2, 4)), "binary_cross_entropy": 1,
             "mse": draw(st.integers(1, 3))}[loss]
    layers, d = [], n_in
    for _ in range(draw(st.integers(0, 2))):
        h = draw(st.integers(1, 5))
        bn = draw(st.booleans())
        layers.append(fd.Dense(d, h, init=draw(st.sampled_from(["he", "xavier", "lecun"])), use_bias=not bn))
        if bn:
            layers.append(fd.BatchNorm(h))
        layers.append(acts[draw(st.sampled_from(sorted(acts)))]())
        if draw(st.booleans()):
            layers.append(fd.Dropout(keep_prob=draw(st.sampled_from([0.5, 0.8, 1.0]))))
        d = h
    layers.append(fd.Dense(d, n_out))
    m = draw(st.integers(2, 6))
    l2 = draw(st.sampled_from([0.0, 0.1, 1.0]))
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((m, n_in))
    if loss == "softmax_cross_entropy":
        y = rng.integers(0, n_out, m)
    elif loss == "binary_cross_entropy":
        y = rng.integers(0, 2, m)
    else:
        y = rng.standard_normal((m, n_out))
    return dict(layers=layers, loss=loss, l2=l2, seed=seed), X, y


@settings(max_examples=40, deadline=None)
@given(configs(acts=SMOOTH))
def test_gradcheck_passes_on_random_smooth_models(case) -> None:
    kw, X, y = case
    model = fd.Sequential(kw.pop("layers"), dtype="float64", backend="reference", **kw)
    report = fd.gradcheck(model, X, y)
    assert report.difference < 1e-6, str(report)


@pytest.mark.parametrize("backend", COMPILED)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=configs())
def test_compiled_gradients_match_reference_on_random_models(backend: str, case) -> None:
    kw, X, y = case
    model = fd.Sequential(kw.pop("layers"), dtype="float64", backend="reference", **kw)
    other = model.copy(backend=backend)  # same parameters, BatchNorm statistics and step (dropout masks)
    J_ref = model.compute_gradients(X, y)
    J = other.compute_gradients(X, y)
    assert np.isfinite(J)
    np.testing.assert_allclose(J, J_ref, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(other.grads, model.grads, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(other.state, model.state, rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------- kernels, odd memory


def _strided(a: np.ndarray) -> np.ndarray:
    """A non-contiguous view holding the same values."""
    big = np.zeros(a.shape[:-1] + (2 * a.shape[-1],), a.dtype)
    big[..., ::2] = a
    return big[..., ::2]


def _misaligned(a: np.ndarray) -> np.ndarray:
    """A C-contiguous copy whose data pointer is not aligned to the item size."""
    buf = np.zeros(a.nbytes + 1, np.uint8)
    out = buf[1:].view(a.dtype).reshape(a.shape)
    out[...] = a
    assert not out.flags.aligned
    return out


@pytest.mark.parametrize("backend", COMPILED)
@pytest.mark.parametrize("layout", ["strided", "misaligned", "fortran"])
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(m=st.integers(1, 9), k=st.integers(2, 7), scale=st.sampled_from([1.0, 1e3, 1e-3]),
       dtype=st.sampled_from([np.float32, np.float64]))
def test_kernels_on_odd_memory_layouts_match_reference_or_refuse(backend, layout, m, k, scale, dtype) -> None:
    K = get_backend(backend)
    rng = np.random.default_rng(m * 31 + k)
    Z = (rng.standard_normal((m, k)) * scale).astype(dtype)
    y = rng.integers(0, k, m)
    odd = {"strided": _strided, "misaligned": _misaligned, "fortran": np.asfortranarray}[layout]
    if layout == "fortran":
        assume(m > 1 and k > 1)
    dZ_ref = np.empty_like(Z)
    loss_ref = ref.softmax_cross_entropy(Z, y, dZ_ref)
    dZ = np.empty_like(Z)
    try:
        loss = K.softmax_cross_entropy(odd(Z), y, dZ)
    except (TypeError, ValueError) as exc:  # a clear refusal is acceptable; a wrong answer is not
        assert str(exc)
    else:
        tol = 1e-4 if dtype == np.float32 else 1e-10
        np.testing.assert_allclose(loss, loss_ref, rtol=tol, atol=tol)
        np.testing.assert_allclose(dZ, dZ_ref, rtol=tol, atol=tol)
    mask_ref, out_ref = np.empty(Z.shape, np.uint8), np.empty_like(Z)
    ref.dropout_forward(Z, 0.7, 5, 6, 7, mask_ref, out_ref)
    mask, out = np.empty(Z.shape, np.uint8), np.empty_like(Z)
    try:
        K.dropout_forward(odd(Z), 0.7, 5, 6, 7, mask, out)
    except (TypeError, ValueError) as exc:
        assert str(exc)
    else:
        np.testing.assert_array_equal(mask, mask_ref)
        np.testing.assert_allclose(out, out_ref, rtol=1e-6)
    p0, g = rng.standard_normal(m * k).astype(dtype), odd(rng.standard_normal((1, m * k)).astype(dtype))[0]
    p_ref, v_ref, s_ref = p0.copy(), np.zeros_like(p0), np.zeros_like(p0)
    ref.adam_step(p_ref, np.ascontiguousarray(g), v_ref, s_ref, 1e-2, 0.9, 0.999, 1e-8, 1)
    p, v, s = p0.copy(), np.zeros_like(p0), np.zeros_like(p0)
    try:
        K.adam_step(p, g, v, s, 1e-2, 0.9, 0.999, 1e-8, 1)
    except (TypeError, ValueError) as exc:
        assert str(exc)
    else:
        # parameters are O(1): absolute tolerance, since an update can cancel a value to near zero
        np.testing.assert_allclose(p, p_ref, rtol=0, atol=1e-6 if dtype == np.float32 else 1e-12)
