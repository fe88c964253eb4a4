"""The Numba backend: every kernel of :mod:`fastdl.backends.contract`, JIT-compiled, and the
whole-epoch executor of a :class:`fastdl.plan.Plan` (:mod:`.epoch`).

Signatures and semantics are exactly those of :mod:`fastdl.backends.reference`
(the oracle); ``tests/test_conformance.py`` checks every kernel against it.

Layout: :mod:`._cache` (fastdl's own cache directory, keyed by all kernel
sources), :mod:`._math` (vectorisable exp/tanh/log), :mod:`._chunks` (the one
serial/parallel chunk driver and the thresholds), :mod:`.dense`,
:mod:`.batchnorm`, :mod:`.losses`, :mod:`.dropout`, :mod:`.optim`,
:mod:`.epoch`. Every kernel has a ``*_impl`` compiled core that takes the
serial/parallel decision as an argument; the public functions here make that
decision from :func:`current_thresholds` and call it; the epoch executor
calls the same cores with the same decisions, so it computes the same bits
as the per-layer path.

How it is built
---------------
* Every compiled function is ``njit(error_model="numpy")`` with fastdl's
  cache (:mod:`._cache`). ``error_model="numpy"`` gives IEEE division (x/0 ->
  inf/NaN, as in NumPy) and lets LLVM vectorise loops that divide. No
  ``fastmath``: NaN and Inf propagate as in NumPy and multiply-adds are not
  fused, so element-wise arithmetic written in the reference's operation
  order gives the same bits. Exceptions: ``contract`` inside the private
  exp/tanh/log polynomials (only more accurate), ``reassoc`` in the float64
  sum helpers so that they vectorise (the order is then fixed by the compiled
  code, not by threads).
* Inner loops run over ``range(n)`` of 1-D views, so Numba drops wrap-around
  checks and LLVM vectorises them.
* Reductions (losses, ``sum_squares``, BatchNorm statistics, ``db``) are
  accumulated in float64, over partitions that depend on the shapes only.
* Scalars are cast to the array dtype inside the kernels, so float32 kernels
  stay in float32.
"""
from __future__ import annotations

import os

from ..runtime import prepare_openmp

# OMP_WAIT_POLICY before libgomp loads (fastdl.backends.runtime): first, before anything can start a prange
# region, also when this package is imported directly (fastdl/_augment_numba.py) rather than via the registry
prepare_openmp()

import numpy as np  # noqa: E402
import numba  # noqa: E402

# Numba's own order is tbb, omp, workqueue; the tbb package comes with MKL (fastdl[mkl]) and would
# then give prange a second thread pool beside the libgomp one of the Cython kernels and MKL. OpenMP
# first keeps one runtime; an explicit user choice wins.
if not {"NUMBA_THREADING_LAYER", "NUMBA_THREADING_LAYER_PRIORITY"} & set(os.environ):
    numba.config.THREADING_LAYER_PRIORITY = ["omp", "tbb", "workqueue"]

from ..contract import IDENTITY, RELU, SIGMOID, TANH  # noqa: E402
from ._chunks import (  # noqa: E402
    DEFAULT_THRESHOLDS, ROWS_PER_PART, THRESHOLD_NAMES, current_thresholds, set_parallel, threshold_array,
    use_thresholds,
)
from .batchnorm import batchnorm_backward, batchnorm_forward_infer, batchnorm_forward_train  # noqa: E402
from .dense import activation_backward, activation_forward, dense_backward, dense_forward  # noqa: E402
from .dense import bf16_gemm_packs, dense_backward_bf16, dense_forward_bf16, round_bf16  # noqa: E402, F401
from .dropout import dropout_backward, dropout_forward  # noqa: E402
from .losses import mse, poisson, sigmoid_bce, softmax, softmax_cross_entropy  # noqa: E402
from .optim import (  # noqa: E402
    adam_step, all_finite, momentum_step, nesterov_step, rmsprop_step, sgd_step, sum_squares,
)

KERNEL_NAMES: tuple[str, ...] = (
    "dense_forward", "dense_backward", "activation_forward", "activation_backward",
    "batchnorm_forward_train", "batchnorm_forward_infer", "batchnorm_backward",
    "softmax_cross_entropy", "softmax", "sigmoid_bce", "mse", "poisson",
    "dropout_forward", "dropout_backward",
    "sgd_step", "momentum_step", "rmsprop_step", "adam_step", "nesterov_step", "sum_squares", "all_finite",
)

#: the kernels as they are: no argument checks (the validated entry points are
#: ``fastdl.get_backend("numba").<kernel>``, fastdl/backends/validate.py); what executors call
UNCHECKED: dict = {name: globals()[name] for name in KERNEL_NAMES}


def epoch_executor(plan, batch_size: int, opt_spec):
    """The whole-epoch executor of ``plan`` (see :mod:`.epoch`)."""
    from .epoch import NumbaEpochExecutor

    return NumbaEpochExecutor(plan, batch_size, opt_spec)


def warmup(dtypes=(np.float32, np.float64)) -> None:
    """Compile (or load from fastdl's cache) every kernel for ``dtypes``, serial and parallel.

    Optional: kernels compile on first use anyway. Useful before timing.
    """
    for enabled in (False, True):
        with use_thresholds(threshold_array(enabled, **({k: 0 for k in THRESHOLD_NAMES} if enabled else {}))):
            for dt in dtypes:
                _warmup_one(np.dtype(dt))


def _warmup_one(dt) -> None:
    m, n = 2 * ROWS_PER_PART, 9               # m gives the losses two row partitions
    rng = np.random.default_rng(0)
    A = rng.standard_normal((m, n)).astype(dt)
    W = rng.standard_normal((n, n)).astype(dt)
    b = np.zeros(n, dt)
    out = np.empty((m, n), dt)
    for act in (IDENTITY, RELU, TANH, SIGMOID):
        dense_forward(A, W, b, act, out)
        dense_forward(A, W, b[:0], act, out)
        activation_forward(A, act, out)
        activation_backward(out, A, act, out.copy())
    dense_backward(A, W, out, out.copy(), RELU, 0.1, np.empty_like(out), np.empty_like(W), b.copy(),
                   np.empty_like(A))
    dense_backward(A, W, out, out.copy(), RELU, 0.0, np.empty_like(out), np.empty_like(W), b[:0],
                   np.empty((0, 0), dt))
    g1 = np.ones(n, dt)
    st = [np.ones(n, dt) for _ in range(4)]
    batchnorm_forward_train(A, g1, b, 1e-5, 0.9, st[0], st[1], st[2], st[3], out)
    batchnorm_forward_infer(A, g1, b, st[0], st[1], 1e-5, out)
    batchnorm_backward(A, g1, st[2], st[3], out.copy(), np.empty_like(out), st[0], st[1])
    y = np.zeros(m, np.int64)
    w = np.ones(m)
    for ww in (w, w[:0]):
        softmax_cross_entropy(A, y, np.empty_like(A), ww)
        softmax_cross_entropy(A, y, np.empty((0, 0), dt), ww)
    softmax(A, out)
    mask = np.empty((m, n), np.uint8)
    dropout_forward(A, 0.5, 0, 1, 0, mask, out)
    dropout_backward(out, mask, 0.5, np.empty_like(out))
    p = A.reshape(-1).copy()
    gr = A.reshape(-1)
    v, s = np.zeros_like(p), np.zeros_like(p)
    sgd_step(p, gr, 0.1)
    momentum_step(p, gr, v, 0.9, 0.1)
    rmsprop_step(p, gr, s, 0.1, 0.999, 1e-8)
    adam_step(p, gr, v, s, 0.9, 0.999, 1e-8, 0.1, 1.0)
    nesterov_step(p, gr, v, 0.9, 0.1, True)
    sum_squares(p)
    all_finite(p)
    Zb = np.zeros((4, 1), dt)
    for ww in (np.ones(4), w[:0]):
        sigmoid_bce(Zb, np.zeros(4, dt), np.empty_like(Zb), ww)
        sigmoid_bce(Zb, np.zeros(4, dt), np.empty((0, 0), dt), ww)
        mse(Zb, Zb, np.empty_like(Zb), ww)
        mse(Zb, Zb, np.empty((0, 0), dt), ww)
        poisson(Zb, Zb, np.empty_like(Zb), ww)
        poisson(Zb, Zb, np.empty((0, 0), dt), ww)


__all__ = list(KERNEL_NAMES) + [
    "DEFAULT_THRESHOLDS", "THRESHOLD_NAMES", "UNCHECKED", "current_thresholds", "epoch_executor", "set_parallel",
    "threshold_array", "use_thresholds", "warmup",
]
