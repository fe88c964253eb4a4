"""The validated public kernel entry points (fastdl.backends.validate): one rule on every backend.

Each refusal must be a ValueError naming the argument, and must leave every output untouched.
The hypothesis fuzz of the same rule (in a subprocess) is in tests/test_fuzz.py.
"""
from __future__ import annotations

import numpy as np
import pytest

from fastdl import backends
from fastdl.backends import available_backends, get_backend, reference
from fastdl.backends.contract import KERNELS, RELU
from fastdl.backends.validate import SPECS, KernelArgumentError

NAMES = available_backends() + ["auto"]


def _misaligned(shape, dtype) -> np.ndarray:
    dt = np.dtype(dtype)
    buf = np.zeros(int(np.prod(shape)) * dt.itemsize + 1, np.uint8)
    out = buf[1:].view(dt).reshape(shape)
    assert not out.flags.aligned
    return out


@pytest.fixture(params=NAMES)
def K(request):
    return get_backend(request.param)


def _refused(fn, *args, match: str, untouched=()):
    before = [a.copy() for a in untouched]
    with pytest.raises(ValueError, match=match) as info:
        fn(*args)
    assert isinstance(info.value, KernelArgumentError)
    for a, b in zip(untouched, before):
        np.testing.assert_array_equal(a, b)   # a refusal writes nothing
    return info.value


# ----------------------------------------------------------------------------- the examples


def test_activation_forward_into_a_smaller_output_is_refused(K) -> None:
    """Issue 14 item 3: numba wrote 129 floats past a (299, 129) output and the process aborted."""
    big = np.full((301, 129), 7.0, np.float32)
    out = big[:299]
    _refused(K.activation_forward, np.ones((300, 129), np.float32), RELU, out,
             match=r"activation_forward: 'out' has shape \(299, 129\) but 'Z' sets m = 300", untouched=[big])


def test_dense_forward_on_fortran_order_is_refused(K) -> None:
    """Issue 14 item 3: numba returned wrong numbers for Fortran-order arrays."""
    rng = np.random.default_rng(0)
    A, W = rng.standard_normal((5, 3)), rng.standard_normal((3, 4))
    out = np.full((5, 4), 3.0)
    _refused(K.dense_forward, np.asfortranarray(A), W, np.zeros(4), RELU, out,
             match="'A_prev' is not C-contiguous", untouched=[out])
    _refused(K.dense_forward, A, np.asfortranarray(W), np.zeros(4), RELU, out,
             match="'W' is not C-contiguous", untouched=[out])
    K.dense_forward(A, W, np.zeros(4), RELU, out)    # the same values, C order: accepted and right
    np.testing.assert_allclose(out, np.maximum(A @ W, 0), rtol=1e-12)


def test_dropout_forward_with_a_strided_mask_is_refused(K) -> None:
    """Issue 14 item 3: reference and cython left a non-contiguous mask unwritten."""
    base = np.full((4, 12), 9, np.uint8)
    out = np.full((4, 6), 2.0, np.float32)
    _refused(K.dropout_forward, np.ones((4, 6), np.float32), 0.5, 1, 2, 3, base[:, ::2], out,
             match="'mask' is not C-contiguous", untouched=[base, out])


def test_big_endian_after_a_misaligned_call_is_refused(K) -> None:
    """Issue 14 item 3: after a misaligned call, a big-endian array gave sum_squares 9.97e-80."""
    x = np.arange(1.0, 35.0)
    mis = _misaligned(x.shape, np.float64)
    mis[...] = x
    _refused(K.sum_squares, mis, match="'x' is not aligned")
    _refused(K.sum_squares, x.astype(">f8"), match="'x' is in non-native byte order")
    assert K.sum_squares(x) == pytest.approx(float(np.sum(x * x)), rel=1e-12)
    assert float(np.sum(x * x)) == 13685.0


# ----------------------------------------------------------------------------- each part of the rule


def test_dtypes(K) -> None:
    Z = np.ones((3, 4))
    _refused(K.activation_forward, Z, 0, np.empty((3, 4), np.float32),
             match="'out' is float32 but 'Z' is float64: every float array of one call has the same dtype")
    _refused(K.activation_forward, Z.astype(np.float16), 0, np.empty((3, 4), np.float16),
             match="'Z' must be float32 or float64, got float16")
    _refused(K.softmax_cross_entropy, Z, np.zeros(3, np.int32), np.empty((3, 4)),
             match="'y' must be int64 class labels, got int32")
    _refused(K.dropout_backward, Z, np.ones((3, 4), bool), 0.5, np.empty((3, 4)),
             match="'mask' must be a uint8 mask, got bool")
    _refused(K.mse, Z, Z, np.empty((3, 4)), np.ones(3, np.float32),
             match="'w' must be float64 per-example weights, got float32")
    _refused(K.sum_squares, [1.0, 2.0], match="'x' must be a numpy.ndarray, got list")


def test_shapes_name_the_argument(K) -> None:
    rng = np.random.default_rng(1)
    A, W, out = rng.standard_normal((6, 5)), rng.standard_normal((5, 3)), np.zeros((6, 3))
    dZ, dW, db, dA = np.zeros((6, 3)), np.zeros((5, 3)), np.zeros(3), np.zeros((6, 5))
    _refused(K.dense_forward, A, W, np.zeros(4), 0, out, match=r"'b' has shape \(4,\) but 'W' sets n_out = 3")
    _refused(K.dense_forward, A, W[:4], np.zeros(3), 0, out, match=r"'W' has shape \(4, 3\) but 'A_prev' sets n_in = 5")
    _refused(K.dense_backward, A, W, out, out.copy(), 0, 0.0, dZ, dW, db, np.zeros((6, 4)),
             match=r"'dA_prev' has shape \(6, 4\)", untouched=[dZ, dW, db])
    _refused(K.dense_backward, A, W, out, out.copy(), 0, 0.0, dZ, np.zeros((5, 2)), db, dA,
             match=r"'dW' has shape \(5, 2\)", untouched=[dZ, db, dA])
    _refused(K.sigmoid_bce, np.zeros((6, 2)), np.zeros(6), np.zeros((6, 2)),
             match=r"'y' is 1-D, which needs one output column, but 'Z' has k = 2 columns")
    _refused(K.sigmoid_bce, np.zeros((6, 2)), np.zeros((6, 3)), np.zeros((6, 2)),
             match=r"'y' has shape \(6, 3\) but 'Z' sets k = 2")
    _refused(K.adam_step, np.zeros(5), np.zeros(4), np.zeros(5), np.zeros(5), 0.9, 0.999, 1e-8, 0.1, 1.0,
             match=r"'grads' has shape \(4,\) but 'params' sets p = 5")
    _refused(K.batchnorm_forward_train, np.zeros((0, 3)), np.ones(3), np.zeros(3), 1e-5, 0.9, np.zeros(3),
             np.ones(3), np.zeros(3), np.zeros(3), np.zeros((0, 3)), match="every dimension must be at least 1")
    _refused(K.activation_forward, np.zeros(4), 0, np.zeros(4), match=r"'Z' must be 2-D")


def test_optional_outputs_may_be_empty(K) -> None:
    rng = np.random.default_rng(2)
    Z = rng.standard_normal((5, 3))
    y = rng.integers(0, 3, 5)
    loss = K.softmax_cross_entropy(Z, y, np.empty((0, 0)))
    assert loss == pytest.approx(reference.softmax_cross_entropy(Z, y, np.empty((0, 0))), rel=1e-10)
    assert K.softmax_cross_entropy(Z, y, np.empty((5, 3)), None) == pytest.approx(loss, rel=1e-12)
    assert K.sum_squares(np.empty(0)) == 0.0 and K.all_finite(np.empty(0, np.float32))
    out = np.empty((5, 2))
    K.dense_forward(Z, np.ones((3, 2)), np.empty(0), 0, out)      # no bias
    np.testing.assert_allclose(out, Z @ np.ones((3, 2)), rtol=1e-12)


def test_layout_and_writeability(K) -> None:
    Z = np.ones((4, 6))
    ro = np.zeros((4, 6))
    ro.setflags(write=False)
    _refused(K.activation_forward, Z, 0, ro, match="'out' is an output and must be writeable")
    _refused(K.activation_forward, Z[:, ::2], 0, np.zeros((4, 3)), match="'Z' is not C-contiguous")
    _refused(K.activation_forward, Z.T, 0, np.zeros((6, 4)), match="'Z' is not C-contiguous")
    mis = _misaligned((4, 6), np.float64)
    _refused(K.activation_forward, Z, 0, mis, match="'out' is not aligned")
    _refused(K.activation_forward, Z.astype(">f8"), 0, np.zeros((4, 6)), match="'Z' is in non-native byte order")
    p = np.ones(8, ">f4")
    _refused(K.sgd_step, p, np.ones(8, np.float32), 0.1, match="'params' is in non-native byte order",
             untouched=[p])


def test_aliasing_only_where_the_contract_allows(K) -> None:
    rng = np.random.default_rng(3)
    Z = rng.standard_normal((4, 5))
    want = np.maximum(Z, 0)
    K.activation_forward(Z, RELU, Z)         # "out may alias Z": in place is fine
    np.testing.assert_array_equal(Z, want)
    buf = rng.standard_normal((5, 5))
    _refused(K.activation_forward, buf[:4], RELU, buf[1:], match="output 'out' overlaps 'Z'", untouched=[buf])
    p = rng.standard_normal(6)
    _refused(K.sgd_step, p, p, 0.1, match="output 'params' overlaps 'grads'; 'params' must not share memory",
             untouched=[p])
    A, W = rng.standard_normal((3, 3)), rng.standard_normal((3, 3))
    _refused(K.dense_forward, A, W, np.zeros(3), 0, A, match="output 'out' overlaps 'A_prev'", untouched=[A])


def test_scalars(K) -> None:
    Z, out = np.ones((2, 3)), np.zeros((2, 3))
    _refused(K.activation_forward, Z, 7, out, match="'act' must be an activation code 0-3", untouched=[out])
    _refused(K.activation_forward, Z, True, out, match="'act' must be an integer, got bool")
    _refused(K.activation_forward, Z, 1.0, out, match="'act' must be an integer, got float")
    _refused(K.dense_forward, Z, np.ones((3, 3)), np.zeros(3), 0, out[:, :3], 2,
             match="'precision' must be 0 .* or 1")
    mask = np.zeros((2, 3), np.uint8)
    _refused(K.dropout_forward, Z, 0.0, 1, 2, 3, mask, out, match=r"'keep_prob' must be in \(0, 1\]")
    _refused(K.dropout_forward, Z, 1.5, 1, 2, 3, mask, out, match=r"'keep_prob' must be in \(0, 1\]")
    _refused(K.dropout_forward, Z, 0.5, 1.0, 2, 3, mask, out, match="'seed' must be an integer, got float")
    K.dropout_forward(Z, 0.5, -1, 2, 3, mask, out)     # any integer: the generator works modulo 2**64
    m2, o2 = np.empty_like(mask), np.empty_like(out)
    reference.dropout_forward(Z, 0.5, -1, 2, 3, m2, o2)
    np.testing.assert_array_equal(mask, m2)
    _refused(K.sgd_step, np.ones(3), np.ones(3), "0.1", match="'lr' must be a real number, got str")
    _refused(K.nesterov_step, np.ones(3), np.ones(3), np.zeros(3), 0.9, 0.1, 1, match="'nesterov' must be a bool")
    K.sgd_step(p := np.ones(3), np.ones(3), np.float32(0.5))       # NumPy scalars are converted
    np.testing.assert_array_equal(p, 0.5)


def test_labels_out_of_range(K) -> None:
    Z, dZ = np.zeros((3, 4)), np.full((3, 4), 5.0)
    _refused(K.softmax_cross_entropy, Z, np.array([0, -1, 2]), dZ, match=r"class ids in \[0, 4\); got values in \[-1, 2\]",
             untouched=[dZ])
    _refused(K.softmax_cross_entropy, Z, np.array([0, 4, 2]), dZ, match=r"got values in \[0, 4\]", untouched=[dZ])


def test_argument_count_and_keywords(K) -> None:
    Z, out = np.ones((2, 3)), np.zeros((2, 3))
    K.activation_forward(Z=Z, act=0, out=out)
    np.testing.assert_array_equal(out, Z)
    _refused(K.activation_forward, Z, 0, match=r"missing argument\(s\) \['out'\]")
    with pytest.raises(ValueError, match="unexpected keyword argument 'outt'"):
        K.activation_forward(Z, 0, outt=out)
    _refused(K.activation_forward, Z, 0, out, out, match="takes 3 arguments")


def test_validated_entries_compute_what_the_raw_kernels_compute(K) -> None:
    rng = np.random.default_rng(4)
    for dt in (np.float32, np.float64):
        A, W, b = (rng.standard_normal(s).astype(dt) for s in ((7, 5), (5, 3), (3,)))
        o1, o2 = np.empty((7, 3), dt), np.empty((7, 3), dt)
        K.dense_forward(A, W, b, 2, o1)
        K.unchecked.dense_forward(A, W, b, 2, o2)
        np.testing.assert_array_equal(o1, o2)
        Z, y = rng.standard_normal((7, 4)).astype(dt), rng.integers(0, 4, 7)
        d1, d2 = np.empty_like(Z), np.empty_like(Z)
        assert K.softmax_cross_entropy(Z, y, d1) == K.unchecked.softmax_cross_entropy(Z, y, d2)
        np.testing.assert_array_equal(d1, d2)


def test_unchecked_are_the_raw_module_functions() -> None:
    """The executors' path has no validation layer at all: same function objects as the modules'."""
    for name in available_backends():
        mod = backends._load_module(name)
        K = get_backend(name)
        for k in KERNELS:
            raw = getattr(mod, k, None) if K.sources[k] == name else getattr(reference, k)
            assert getattr(K.unchecked, k) is raw, (name, k)
            assert getattr(K, k) is not raw and getattr(K, k).__wrapped__ is raw


def test_every_kernel_argument_has_a_rule() -> None:
    import inspect

    for k in KERNELS:
        params = inspect.signature(getattr(reference, k)).parameters
        assert set(params) <= set(SPECS[k]), (k, set(params) - set(SPECS[k]))
