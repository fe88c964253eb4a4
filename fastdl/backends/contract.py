"""The kernel contract: the one list every backend implements.

Every backend (``reference``, ``numba``, ``cython``) is a module exposing
functions with exactly these names and signatures. The reference module is
the oracle; a faster backend may implement any subset and the rest falls
back to the reference (see :mod:`fastdl.backends`).

Conventions shared by all kernels
---------------------------------
* ``m`` rows are examples; every 2-D array is C-contiguous.
* Float arrays share one dtype per call: float32 or float64 (the model's).
  Scalars (``lr``, ``eps``, ``keep_prob``, ...) are Python floats/ints.
  Internal reductions (losses, sums of squares, BatchNorm statistics) are
  accumulated in float64 and the results cast back to the array dtype.
* Outputs are caller-owned arrays, written in full (never ``+=`` into
  stale memory). Kernels allocate nothing the caller must keep.
* An *empty* array (``size == 0``) in an optional output slot means "do not
  compute this": a Dense layer without bias passes ``b``/``db`` of shape
  ``(0,)``; the first layer passes ``dA_prev`` of shape ``(0, 0)``; a loss
  evaluated without gradient passes ``dZ`` of shape ``(0, 0)``.
* Aliasing allowed where stated ("may alias"); otherwise arrays are
  distinct.
* Errors: class labels outside ``[0, k)`` raise ``ValueError`` (never wrap
  around); a batch of 0 rows is an error for BatchNorm; unknown activation
  codes raise ``ValueError``. ``keep_prob`` is validated by the layer, not
  the kernel.
* Exactness: dropout masks are bit-identical in every backend; every other
  output agrees with the reference to rounding (about 1e-5 relative in
  float32, 1e-12 in float64; ``tests/test_conformance.py``).
* Activation codes: ``IDENTITY=0, RELU=1, TANH=2, SIGMOID=3``. Derivatives
  are taken from the activation *output* ``A`` (ReLU: ``A > 0``, so 0 at 0;
  tanh: ``1 - A**2``; sigmoid: ``A * (1 - A)``), so ``Z`` is never stored.

Kernels (name: arguments -> return; what is written)
----------------------------------------------------
Dense
  ``dense_forward(A_prev (m,n_in), W (n_in,n_out), b (n_out,)|(0,), act, out (m,n_out), precision=0) -> None``
      ``out = g(A_prev @ W + b)``.
  ``dense_backward(A_prev, W, out, dout (m,n_out), act, l2_over_m, dZ (m,n_out),
  dW (n_in,n_out), db (n_out,)|(0,), dA_prev (m,n_in)|(0,0), precision=0) -> None``
      ``dZ = dout * g'(out)`` (``dZ`` may alias ``dout``);
      ``dW = A_prev.T @ dZ + l2_over_m * W``; ``db = dZ.sum(0)``;
      ``dA_prev = dZ @ W.T``.
  ``precision`` (``fastdl.plan.PRECISION_*``): 0 = the dtype's GEMMs; 1 = bf16
  (float32 arrays only): both operands of each of the three products are
  rounded to bfloat16 (nearest, ties to even; NaN stays NaN) and the products
  accumulate in float32 (docs/spec.md "Mixed precision"); the bias add,
  activations and the L2 term (float32 ``W``) are unchanged. A backend
  without bf16 GEMMs raises ``NotImplementedError`` for 1. Callers pass
  ``precision`` only when it is not 0.
Activations (a standalone activation layer, e.g. after BatchNorm)
  ``activation_forward(Z, act, out) -> None``  (``out`` may alias ``Z``)
  ``activation_backward(out, dout, act, dZ) -> None``  (``dZ`` may alias ``dout``)
BatchNorm (per feature over the batch; docs/spec.md "Batch normalisation")
  ``batchnorm_forward_train(Z (m,n), gamma (n,), beta (n,), eps, momentum,
  running_mean (n,), running_var (n,), mean (n,), inv_std (n,), out (m,n)) -> None``
      writes ``mean``, ``inv_std = 1/sqrt(var + eps)`` (biased var), ``out``;
      updates ``running_* = momentum*running_* + (1-momentum)*batch_*`` in place.
  ``batchnorm_forward_infer(Z, gamma, beta, running_mean, running_var, eps, out) -> None``
      (``out`` may alias ``Z``)
  ``batchnorm_backward(Z, gamma, mean, inv_std, dout, dZ, dgamma, dbeta) -> None``
      ``dgamma = sum(dout*x_hat)``, ``dbeta = sum(dout)``,
      ``dZ = gamma*inv_std/m * (m*dout - dbeta - x_hat*dgamma)``; ``dZ`` may
      alias ``dout`` (pass 2 reads each element once before writing it).
Losses (return the MEAN loss over the m rows as a Python float; no L2 term)
  ``softmax_cross_entropy(Z (m,k), y int64 (m,), dZ (m,k)|(0,0), w=None) -> float``
      ``logsumexp(z) - z_y``; ``dZ = (softmax(Z) - onehot(y)) / m``.
  ``softmax(Z, out) -> None``  (row-wise, max-shifted; ``out`` may alias ``Z``)
  ``sigmoid_bce(Z (m,k), y float 0/1 of Z's dtype, (m,) when k == 1 else (m,k), dZ (m,k)|(0,0), w=None) -> float``
      per output ``max(z,0) - z*y + log1p(exp(-|z|))``, a row's loss is the SUM
      over its k outputs (k > 1: multilabel); ``dZ = (sigmoid(z) - y) / m``.
  ``mse(Yhat (m,k), Y (m,k) of Yhat's dtype, dZ (m,k)|(0,0), w=None) -> float``
      ``0.5 * ||yhat - y||^2`` per row; ``dZ = (yhat - y) / m``.
  ``poisson(Z (m,k), Y (m,k) of Z's dtype, finite and >= 0, dZ (m,k)|(0,0), w=None) -> float``
      log link: per output the half Poisson deviance ``exp(z) - y*z + xlogy(y, y) - y``
      (``xlogy(0, 0) = 0``), a row's loss is the SUM over its k outputs;
      ``dZ = (exp(z) - y) / m``. Evaluated in float64 per element whatever the
      dtype; ``exp`` overflows to inf (a divergence the callers' checks catch).
  Per-example weights ``w`` (float64 ``(m,)``; ``None`` or size 0 = unweighted,
  exactly the formulas above; scikit-learn's rule, board 22:20/22:13):
  ``sw = sum(w)`` added left to right in float64 from 0.0 (``np.add.accumulate``,
  not NumPy's pairwise ``np.sum``); loss ``= sum_i(w_i L_i) / sw``;
  ``dZ_i = (w_i / sw) * g_i`` with ``g_i`` the row's unit gradient
  (``softmax(z_i) - onehot(y_i)``, ``sigmoid(z_i) - y_i``, ``yhat_i - y_i``, ``exp(z_i) - y_i``).
  ``sw == 0`` (a batch of zero weights) gives loss 0 and ``dZ = 0``. Callers
  pass ``w`` only when weighted.
Dropout (inverted; counter-based mask, see below)
  ``dropout_forward(A (m,n), keep_prob, seed, step, layer, mask uint8 (m,n), out (m,n)) -> None``
      ``mask = dropout bits``; ``out = A * mask / keep_prob`` (``out`` may alias ``A``).
  ``dropout_backward(dout, mask, keep_prob, dA) -> None``  (``dA`` may alias ``dout``)
Optimisers (one fused pass over flat 1-D arrays). The caller computes the
step's coefficients once (``fastdl.plan.step_coefficients``: ``c1``, ``c2``
fold the learning rate and the bias corrections; docs/spec.md "Optimisers")
  ``sgd_step(params, grads, lr) -> None``
      ``params -= lr * grads``
  ``momentum_step(params, grads, v, beta, c1) -> None``  (the course's EWA form)
      ``v = beta*v + (1-beta)*grads; params -= c1 * v``
  ``nesterov_step(params, grads, v, mu, c1, nesterov: bool) -> None``  (scikit-learn's SGD momentum)
      ``v = mu*v - c1*grads; params += mu*v - c1*grads`` if ``nesterov`` else ``params += v``
  ``rmsprop_step(params, grads, s, lr, beta2, eps) -> None``
      ``s = beta2*s + (1-beta2)*grads**2; params -= lr * grads / (sqrt(s) + eps)``
  ``adam_step(params, grads, v, s, beta1, beta2, eps, c1, c2) -> None``
      ``v = beta1*v + (1-beta1)*grads; s = beta2*s + (1-beta2)*grads**2;
      params -= c1 * v / (sqrt(c2 * s) + eps)``
Reductions
  ``sum_squares(x 1-D) -> float``  (the L2 cost, accumulated in float64)
  ``all_finite(x 1-D) -> bool``  (no NaN or inf: fit's per-step divergence check)

The dropout generator (bit-for-bit identical in every backend)
--------------------------------------------------------------
All arithmetic is on unsigned 64-bit integers modulo 2**64::

    mix64(x):  x ^= x >> 30; x *= 0xBF58476D1CE4E5B9
               x ^= x >> 27; x *= 0x94D049BB133111EB
               x ^= x >> 31
    G    = 0x9E3779B97F4A7C15
    key  = mix64(mix64(mix64(seed + G) ^ step) ^ layer)
    bits(e) = mix64(key + (e + 1) * G) >> 32          # e = i*n + j, row-major
    keep(e) = bits(e) < threshold,  threshold = uint64(keep_prob * 2**32)

``keep_prob * 2**32`` is computed in float64 and truncated. Each element's
bit depends only on (seed, step, layer, e), never on threads or chunking.
``keep_prob == 1`` is handled by the caller (the layer is the identity and
draws nothing).
"""
from __future__ import annotations

IDENTITY, RELU, TANH, SIGMOID = 0, 1, 2, 3
ACTIVATION_CODES = {"identity": IDENTITY, "relu": RELU, "tanh": TANH, "sigmoid": SIGMOID}

KERNELS: tuple[str, ...] = (
    "dense_forward",
    "dense_backward",
    "activation_forward",
    "activation_backward",
    "batchnorm_forward_train",
    "batchnorm_forward_infer",
    "batchnorm_backward",
    "softmax_cross_entropy",
    "softmax",
    "sigmoid_bce",
    "mse",
    "poisson",
    "dropout_forward",
    "dropout_backward",
    "sgd_step",
    "momentum_step",
    "nesterov_step",
    "rmsprop_step",
    "adam_step",
    "sum_squares",
    "all_finite",
)

MIX_C1 = 0xBF58476D1CE4E5B9
MIX_C2 = 0x94D049BB133111EB
GOLDEN = 0x9E3779B97F4A7C15
MASK64 = (1 << 64) - 1


def mix64_int(x: int) -> int:
    """splitmix64 finaliser on a Python int (used to derive per-call keys)."""
    x &= MASK64
    x ^= x >> 30
    x = (x * MIX_C1) & MASK64
    x ^= x >> 27
    x = (x * MIX_C2) & MASK64
    x ^= x >> 31
    return x


def dropout_key(seed: int, step: int, layer: int) -> int:
    """The 64-bit key of one dropout call, as the contract defines it."""
    return mix64_int(mix64_int(mix64_int(seed + GOLDEN) ^ (step & MASK64)) ^ (layer & MASK64))


def keep_threshold(keep_prob: float) -> int:
    """Integer threshold on the 32 high bits: keep when bits < threshold."""
    return int(float(keep_prob) * 4294967296.0)


# --------------------------------------------------------------------------- the typed contract
# Appended by the backend-registry owner (helper V); the kernel list and docstring above belong
# to the plan owner. tests/test_backend_boundary.py checks that this Protocol, the reference
# kernels and every backend's kernels have the same names, parameters, order and defaults.

from typing import Protocol, runtime_checkable  # noqa: E402

import numpy as _np  # noqa: E402

Array = _np.ndarray


@runtime_checkable
class KernelContract(Protocol):
    """What every backend provides, kernel by kernel (semantics: the module docstring above).

    A backend module (``reference``, ``numba``, ``cython``) implements a subset
    as plain functions; a :class:`fastdl.backends.Backend` implements all of
    them (missing ones fall back to the reference) as validated entry points,
    with the raw functions under ``backend.unchecked``.
    """

    def dense_forward(self, A_prev: Array, W: Array, b: Array, act: int, out: Array,
                      precision: int = 0) -> None: ...

    def dense_backward(self, A_prev: Array, W: Array, out: Array, dout: Array, act: int, l2_over_m: float,
                       dZ: Array, dW: Array, db: Array, dA_prev: Array, precision: int = 0) -> None: ...

    def activation_forward(self, Z: Array, act: int, out: Array) -> None: ...

    def activation_backward(self, out: Array, dout: Array, act: int, dZ: Array) -> None: ...

    def batchnorm_forward_train(self, Z: Array, gamma: Array, beta: Array, eps: float, momentum: float,
                                running_mean: Array, running_var: Array, mean: Array, inv_std: Array,
                                out: Array) -> None: ...

    def batchnorm_forward_infer(self, Z: Array, gamma: Array, beta: Array, running_mean: Array,
                                running_var: Array, eps: float, out: Array) -> None: ...

    def batchnorm_backward(self, Z: Array, gamma: Array, mean: Array, inv_std: Array, dout: Array, dZ: Array,
                           dgamma: Array, dbeta: Array) -> None: ...

    def softmax_cross_entropy(self, Z: Array, y: Array, dZ: Array, w: Array | None = None) -> float: ...

    def softmax(self, Z: Array, out: Array) -> None: ...

    def sigmoid_bce(self, Z: Array, y: Array, dZ: Array, w: Array | None = None) -> float: ...

    def mse(self, Yhat: Array, Y: Array, dZ: Array, w: Array | None = None) -> float: ...

    def poisson(self, Z: Array, Y: Array, dZ: Array, w: Array | None = None) -> float: ...

    def dropout_forward(self, A: Array, keep_prob: float, seed: int, step: int, layer: int, mask: Array,
                        out: Array) -> None: ...

    def dropout_backward(self, dout: Array, mask: Array, keep_prob: float, dA: Array) -> None: ...

    def sgd_step(self, params: Array, grads: Array, lr: float) -> None: ...

    def momentum_step(self, params: Array, grads: Array, v: Array, beta: float, c1: float) -> None: ...

    def nesterov_step(self, params: Array, grads: Array, v: Array, mu: float, c1: float,
                      nesterov: bool) -> None: ...

    def rmsprop_step(self, params: Array, grads: Array, s: Array, lr: float, beta2: float, eps: float) -> None: ...

    def adam_step(self, params: Array, grads: Array, v: Array, s: Array, beta1: float, beta2: float, eps: float,
                  c1: float, c2: float) -> None: ...

    def sum_squares(self, x: Array) -> float: ...

    def all_finite(self, x: Array) -> bool: ...
