"""The reference backend: plain NumPy, straight from docs/spec.md.

Written for clarity, not speed; it is the oracle every compiled backend is
tested against. Signatures and semantics: :mod:`fastdl.backends.contract`.
"""
from __future__ import annotations

import numpy as np

from .contract import GOLDEN, IDENTITY, MIX_C1, MIX_C2, RELU, SIGMOID, TANH, dropout_key, keep_threshold

# --------------------------------------------------------------------------- activations


def _apply_activation(Z: np.ndarray, act: int, out: np.ndarray) -> None:
    if act == IDENTITY:
        if out is not Z:
            out[...] = Z
    elif act == RELU:
        np.maximum(Z, 0, out=out)
    elif act == TANH:
        np.tanh(Z, out=out)
    elif act == SIGMOID:
        # Stable for large |z|: exp of a non-positive number only.
        e = np.exp(-np.abs(Z))
        out[...] = np.where(Z >= 0, 1 / (1 + e), e / (1 + e))
    else:
        raise ValueError(f"unknown activation code {act}")


def _activation_grad(A: np.ndarray, dA: np.ndarray, act: int, dZ: np.ndarray) -> None:
    if act == IDENTITY:
        if dZ is not dA:
            dZ[...] = dA
    elif act == RELU:
        np.multiply(dA, A > 0, out=dZ)
    elif act == TANH:
        np.multiply(dA, 1 - A * A, out=dZ)
    elif act == SIGMOID:
        np.multiply(dA, A * (1 - A), out=dZ)
    else:
        raise ValueError(f"unknown activation code {act}")


def activation_forward(Z: np.ndarray, act: int, out: np.ndarray) -> None:
    _apply_activation(Z, act, out)


def activation_backward(out: np.ndarray, dout: np.ndarray, act: int, dZ: np.ndarray) -> None:
    _activation_grad(out, dout, act, dZ)


# --------------------------------------------------------------------------- dense


def round_to_bf16(x: np.ndarray) -> np.ndarray:
    """``x`` (float32) rounded to the nearest bfloat16, ties to even, returned as float32 values.

    bfloat16 is the upper half of a float32: add half an ulp of the lower 16
    bits (minus one when the kept part is even, for ties to even) and clear
    them. NaN stays NaN (the carry could turn a NaN payload into infinity);
    infinities and values that round past the largest bfloat16 become inf.
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    u = x.view(np.uint32)
    rounded = (u + (np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1)))) & np.uint32(0xFFFF0000)
    out = rounded.view(np.float32)
    return np.where(np.isnan(x), x, out)


def _gemm_operands(precision: int, *arrays: np.ndarray) -> tuple[np.ndarray, ...]:
    # precision 1 (bf16, docs/spec.md "Mixed precision"): both operands of every Dense GEMM rounded
    # to bfloat16; the float32 GEMM of the rounded values is then the exact-product emulation.
    if precision == 0:
        return arrays
    if precision != 1:
        raise ValueError(f"unknown precision code {precision} (0 = fp32, 1 = bf16)")
    if any(a.dtype != np.float32 for a in arrays):
        raise ValueError("precision=1 (bf16) needs float32 arrays")
    return tuple(round_to_bf16(a) for a in arrays)


def dense_forward(A_prev, W, b, act: int, out, precision: int = 0) -> None:
    A_g, W_g = _gemm_operands(precision, A_prev, W)
    np.matmul(A_g, W_g, out=out)
    if b.size:
        out += b
    _apply_activation(out, act, out)


def dense_backward(A_prev, W, out, dout, act: int, l2_over_m: float, dZ, dW, db, dA_prev,
                   precision: int = 0) -> None:
    _activation_grad(out, dout, act, dZ)
    A_g, dZ_g, W_g = _gemm_operands(precision, A_prev, dZ, W)
    np.matmul(A_g.T, dZ_g, out=dW)
    if l2_over_m != 0.0:
        dW += l2_over_m * W  # the float32 W, also in bf16 mode
    if db.size:
        db[...] = dZ.sum(axis=0, dtype=np.float64)
    if dA_prev.size:
        np.matmul(dZ_g, W_g.T, out=dA_prev)


# --------------------------------------------------------------------------- batchnorm


def batchnorm_forward_train(Z, gamma, beta, eps: float, momentum: float,
                            running_mean, running_var, mean, inv_std, out) -> None:
    Z64 = Z.astype(np.float64)
    mu = Z64.mean(axis=0)
    var = ((Z64 - mu) ** 2).mean(axis=0)
    mean[...] = mu
    inv_std[...] = 1.0 / np.sqrt(var + eps)
    out[...] = gamma * ((Z64 - mu) / np.sqrt(var + eps)) + beta
    running_mean[...] = momentum * running_mean + (1 - momentum) * mu
    running_var[...] = momentum * running_var + (1 - momentum) * var


def batchnorm_forward_infer(Z, gamma, beta, running_mean, running_var, eps: float, out) -> None:
    out[...] = gamma * (Z - running_mean) / np.sqrt(running_var + eps) + beta


def batchnorm_backward(Z, gamma, mean, inv_std, dout, dZ, dgamma, dbeta) -> None:
    m = Z.shape[0]
    x_hat = (Z.astype(np.float64) - mean) * inv_std
    dy = dout.astype(np.float64)
    dg = (dy * x_hat).sum(axis=0)
    db = dy.sum(axis=0)
    dgamma[...] = dg
    dbeta[...] = db
    dZ[...] = gamma * inv_std / m * (m * dy - db - x_hat * dg)


# --------------------------------------------------------------------------- losses


def softmax(Z, out) -> None:
    shifted = Z - Z.max(axis=1, keepdims=True)
    e = np.exp(shifted)
    out[...] = e / e.sum(axis=1, keepdims=True)


def _weighted(w) -> bool:
    return w is not None and w.size > 0


def _weight_sum(w: np.ndarray) -> float:
    # left to right from 0.0, as every backend adds it (the contract)
    return float(np.add.accumulate(w.astype(np.float64))[-1]) if w.size else 0.0


def _mean_loss(per_row: np.ndarray, w) -> float:
    if not _weighted(w):
        return float(np.mean(per_row)) if per_row.size else float("nan")
    sw = _weight_sum(w)
    return float(np.dot(w, per_row) / sw) if sw != 0.0 else 0.0


def _row_scale(m: int, w) -> np.ndarray | float:
    """What multiplies each row's unit gradient: 1/m, or w_i/sum(w) (0 when the weights sum to 0)."""
    if not _weighted(w):
        return 1.0 / m if m else 0.0
    sw = _weight_sum(w)
    return (w / sw)[:, None] if sw != 0.0 else np.zeros((m, 1))


def softmax_cross_entropy(Z, y, dZ, w=None) -> float:
    m, k = Z.shape
    if m and (y.min() < 0 or y.max() >= k):  # a negative id would silently index from the end
        raise ValueError(f"softmax_cross_entropy: labels must be class ids in [0, {k}); "
                         f"got values in [{y.min()}, {y.max()}]")
    Z64 = Z.astype(np.float64)
    zmax = Z64.max(axis=1, keepdims=True) if m else np.zeros((0, 1))
    lse = np.log(np.exp(Z64 - zmax).sum(axis=1)) + zmax[:, 0]
    loss = _mean_loss(lse - Z64[np.arange(m), y], w)
    if dZ.size:
        p = np.exp(Z64 - lse[:, None])
        p[np.arange(m), y] -= 1.0
        dZ[...] = p * _row_scale(m, w) if _weighted(w) else p / m
    return loss


def sigmoid_bce(Z, y, dZ, w=None) -> float:
    # k >= 1 independent outputs (multilabel): a row's loss is the SUM over its k outputs
    m, k = Z.shape
    z = Z.astype(np.float64)
    t = y.astype(np.float64).reshape(m, k)
    per_row = (np.maximum(z, 0) - z * t + np.log1p(np.exp(-np.abs(z)))).sum(axis=1)
    loss = _mean_loss(per_row, w)
    if dZ.size:
        p = np.empty_like(z)
        _apply_activation(z, SIGMOID, p)
        dZ[...] = (p - t) * _row_scale(m, w) if _weighted(w) else (p - t) / m
    return loss


def mse(Yhat, Y, dZ, w=None) -> float:
    m = Yhat.shape[0]
    diff = Yhat.astype(np.float64) - Y
    if _weighted(w):
        loss = _mean_loss(0.5 * np.sum(diff * diff, axis=1), w)
    else:
        loss = float(0.5 * np.sum(diff * diff) / m)
    if dZ.size:
        dZ[...] = diff * _row_scale(m, w) if _weighted(w) else diff / m
    return loss


def poisson(Z, Y, dZ, w=None) -> float:
    # log link; per output the half Poisson deviance, a row's loss is the SUM over its k outputs
    m = Z.shape[0]
    z = Z.astype(np.float64)
    t = Y.astype(np.float64)
    with np.errstate(over="ignore"):          # exp overflow -> inf: a divergence the caller detects
        mu = np.exp(z)
    pos = t > 0
    xlogy = np.zeros_like(t)
    xlogy[pos] = t[pos] * np.log(t[pos])
    with np.errstate(invalid="ignore"):       # inf - inf when z overflows: NaN, also a divergence
        loss = _mean_loss((mu - t * z + (xlogy - t)).sum(axis=1), w)
        if dZ.size:
            dZ[...] = (mu - t) * _row_scale(m, w) if _weighted(w) else (mu - t) / m
    return loss


# --------------------------------------------------------------------------- dropout


def _mix64(x: np.ndarray) -> np.ndarray:
    # uint64 array arithmetic wraps modulo 2**64, as the contract requires.
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(MIX_C1)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(MIX_C2)
    return x ^ (x >> np.uint64(31))


def dropout_mask(seed: int, step: int, layer: int, keep_prob: float, mask) -> None:
    """Fill the uint8 ``mask`` with the contract's keep bits (1 = keep)."""
    key = np.uint64(dropout_key(seed, step, layer))
    e = np.arange(1, mask.size + 1, dtype=np.uint64)
    bits = _mix64(key + e * np.uint64(GOLDEN)) >> np.uint64(32)
    mask.reshape(-1)[...] = bits < np.uint64(keep_threshold(keep_prob))


def dropout_forward(A, keep_prob: float, seed: int, step: int, layer: int, mask, out) -> None:
    dropout_mask(seed, step, layer, keep_prob, mask)
    out[...] = A * mask / A.dtype.type(keep_prob)


def dropout_backward(dout, mask, keep_prob: float, dA) -> None:
    dA[...] = dout * mask / dout.dtype.type(keep_prob)


# --------------------------------------------------------------------------- optimisers


# The caller computes the step's coefficients c1, c2 once (fastdl.plan.step_coefficients).
def sgd_step(params, grads, lr: float) -> None:
    params -= lr * grads


def momentum_step(params, grads, v, beta: float, c1: float) -> None:
    v[...] = beta * v + (1 - beta) * grads
    params -= c1 * v


def nesterov_step(params, grads, v, mu: float, c1: float, nesterov: bool) -> None:
    # scikit-learn's SGD momentum (sklearn/neural_network/_stochastic_optimizers.py)
    v[...] = mu * v - c1 * grads
    if nesterov:
        params += mu * v - c1 * grads
    else:
        params += v


def rmsprop_step(params, grads, s, lr: float, beta2: float, eps: float) -> None:
    s[...] = beta2 * s + (1 - beta2) * grads * grads
    params -= lr * grads / (np.sqrt(s) + eps)


def adam_step(params, grads, v, s, beta1: float, beta2: float, eps: float, c1: float, c2: float) -> None:
    # c1 = lr/(1-beta1^t), c2 = 1/(1-beta2^t): p -= lr * v_hat / (sqrt(s_hat) + eps)
    v[...] = beta1 * v + (1 - beta1) * grads
    s[...] = beta2 * s + (1 - beta2) * grads * grads
    params -= c1 * v / (np.sqrt(c2 * s) + eps)


# --------------------------------------------------------------------------- reductions


def sum_squares(x) -> float:
    # Not np.dot: a threaded BLAS call on a small vector costs milliseconds on a busy machine.
    x64 = x.astype(np.float64)
    return float(np.sum(x64 * x64))


def all_finite(x) -> bool:
    return bool(np.isfinite(x).all())
