"""The Numba whole-epoch executor: every mini-batch of an epoch in ONE compiled call.

For small networks a step's cost is per-call overhead, not arithmetic (the
per-layer path makes ~15 Python-level kernel calls per step). Here the
plan's encoded tables (``iprog`` / ``fprog``, :mod:`fastdl.plan`) are
interpreted inside one compiled function that gathers each batch, runs the
forward, the loss, the backward, the divergence check and the optimiser
update. It calls the same compiled cores as the public kernels (the
``*_impl`` functions) with the same serial/parallel decisions (the same
threshold array), in the per-layer executor's order, so it computes the same
bits as ``backend="numba"`` per layer (tests/test_numba_epoch.py).

It reads ONLY the plan (never a model, layer or optimiser object): ops,
widths, offsets, loss kind, L2 (``l2``, ``l2_scale``, ``dense_weights``),
each Dense op's precision (bf16 GEMMs, docs/spec.md section 13); the optimiser comes as an :class:`~fastdl.plan.OptimizerSpec`.
Conventions shared with every executor (docs/spec.md): ``m_l2`` is
``n_total`` (``l2_scale='dataset'``), else ``sum(w)`` of the batch (left to
right) when weighted, else the batch's rows; ``l2_term = l2 / (2 m_l2) *
((0 + ssq(W_0)) + ssq(W_1) + ...)`` computed after the backward; ``J = loss +
l2_term``; errors: softmax argmax (first maximum) != y, BCE ``(z > 0) != y``
per output (a row is wrong if any output is), none for MSE and Poisson.
"""
from __future__ import annotations

import math

import numpy as np

from ...plan import (
    F_EPS, F_KEEP, F_MOMENTUM, H_BETA1, H_BETA2, H_EPS, I_ACT, I_DX, I_INV, I_KIND, I_LAYER, I_MASK, I_MEAN, I_NIN,
    I_NOUT, I_OUT, I_P0, I_P1, I_PREC, I_S0, L2_DATASET, LOSS_POISSON, LOSS_SIGMOID_BCE, LOSS_SOFTMAX_CE,
    OP_ACTIVATION, OP_BATCHNORM, OP_DENSE, OptimizerSpec, Plan,
)
from ..contract import TANH
from ._cache import jit as _jit
from ._chunks import (T_ACT_CHEAP, T_ACT_TRANS, T_BIAS_ACT, T_BN, T_DROPOUT, T_SOFTMAX, T_SSQ, current_thresholds,
                      parts)
from .batchnorm import batchnorm_backward_impl, batchnorm_train_impl, bn_backward_scratch_size, bn_train_scratch_size
from .dense import activation_backward_impl, activation_forward_impl, dense_backward_impl, dense_forward_impl
from .dense import dense_backward_bf16_impl, dense_forward_bf16_impl, round_bf16_into
from .dense import bf16_gemm_packs
from ...plan import I_OUTR, I_WR, I_XR, route_bf16
from .dropout import dropout_backward_impl, dropout_forward_impl, key_of, threshold_of
from .losses import mse_impl, poisson_impl, sigmoid_bce_impl, softmax_cross_entropy_impl, weight_sum
from .optim import all_finite_impl, optimizer_step, sum_squares_impl


@_jit
def _view2(buf, off, m, n):
    return buf[off:off + m * n].reshape((m, n))


@_jit
def _forward(X, iprog, fprog, params, state, ws, masks, m, seed, step, thr, empty1, scratch, w_fused):
    """Training-mode forward of an m-row batch; returns the output view (the logits)."""
    x = X
    for j in range(iprog.shape[0]):
        kind = iprog[j, I_KIND]
        nin = iprog[j, I_NIN]
        nout = iprog[j, I_NOUT]
        out = _view2(ws, iprog[j, I_OUT], m, nout)
        size = m * nout
        if kind == OP_DENSE:
            p0 = iprog[j, I_P0]
            W = params[p0:p0 + nin * nout].reshape((nin, nout))
            b = params[iprog[j, I_P1]:iprog[j, I_P1] + nout] if iprog[j, I_P1] >= 0 else empty1
            act = iprog[j, I_ACT]
            if iprog[j, I_PREC] == 1 and iprog[j, I_XR] >= 0:   # bf16, operands rounded once (spec section 13)
                Wr = _view2(ws, iprog[j, I_WR], nin, nout)
                if not w_fused:   # else written after the optimiser's update (_train_epoch)
                    round_bf16_into(W, Wr)
                outr = _view2(ws, iprog[j, I_OUTR], m, nout) if iprog[j, I_OUTR] >= 0 else ws[:0].reshape((0, 0))
                dense_forward_bf16_impl(x, _view2(ws, iprog[j, I_XR], m, nin), j == 0 or iprog[j - 1, I_OUTR] < 0,
                                        Wr, b, act, out, outr, act >= TANH and size >= thr[T_BIAS_ACT])
            else:
                dense_forward_impl(x, W, b, act, out, act >= TANH and size >= thr[T_BIAS_ACT], iprog[j, I_PREC])
        elif kind == OP_BATCHNORM:
            p0 = iprog[j, I_P0]
            s0 = iprog[j, I_S0]
            batchnorm_train_impl(x, params[p0:p0 + nout], params[p0 + nout:p0 + 2 * nout], fprog[j, F_EPS],
                                 fprog[j, F_MOMENTUM], state[s0:s0 + nout], state[s0 + nout:s0 + 2 * nout],
                                 ws[iprog[j, I_MEAN]:iprog[j, I_MEAN] + nout],
                                 ws[iprog[j, I_INV]:iprog[j, I_INV] + nout], out, parts(m), scratch,
                                 size >= thr[T_BN])
        elif kind == OP_ACTIVATION:
            act = iprog[j, I_ACT]
            activation_forward_impl(x, act, out, size >= (thr[T_ACT_TRANS] if act >= TANH else thr[T_ACT_CHEAP]))
        else:  # OP_DROPOUT (emitted only when keep_prob < 1)
            kp = fprog[j, F_KEEP]
            mask = masks[iprog[j, I_MASK]:iprog[j, I_MASK] + size].reshape((m, nout))
            dropout_forward_impl(x, key_of(seed, step, iprog[j, I_LAYER]), threshold_of(kp), kp, mask, out,
                                 size >= thr[T_DROPOUT])
        x = out
    return x


@_jit
def _backward(X, iprog, fprog, params, grads, ws, masks, m, dlogits, l2_over_m, thr, empty1, empty2, scratch):
    dout = dlogits
    for j in range(iprog.shape[0] - 1, -1, -1):
        kind = iprog[j, I_KIND]
        nin = iprog[j, I_NIN]
        nout = iprog[j, I_NOUT]
        x = X if j == 0 else _view2(ws, iprog[j - 1, I_OUT], m, nin)
        out = _view2(ws, iprog[j, I_OUT], m, nout)
        has_dx = iprog[j, I_DX] >= 0
        dx = _view2(ws, iprog[j, I_DX], m, nin) if has_dx else empty2
        size = m * nout
        if kind == OP_DENSE:
            p0 = iprog[j, I_P0]
            W = params[p0:p0 + nin * nout].reshape((nin, nout))
            dW = grads[p0:p0 + nin * nout].reshape((nin, nout))
            db = grads[iprog[j, I_P1]:iprog[j, I_P1] + nout] if iprog[j, I_P1] >= 0 else empty1
            if iprog[j, I_PREC] == 1 and iprog[j, I_XR] >= 0:   # round_bf16(dZ) in place: both GEMMs' operand
                dense_backward_bf16_impl(_view2(ws, iprog[j, I_XR], m, nin), W, _view2(ws, iprog[j, I_WR], nin, nout),
                                         out, dout, iprog[j, I_ACT], l2_over_m, dW, db, dx)
            else:
                dense_backward_impl(x, W, out, dout, iprog[j, I_ACT], l2_over_m, dout, dW, db, dx, iprog[j, I_PREC])
        elif kind == OP_BATCHNORM:
            p0 = iprog[j, I_P0]
            batchnorm_backward_impl(x, params[p0:p0 + nout], ws[iprog[j, I_MEAN]:iprog[j, I_MEAN] + nout],
                                    ws[iprog[j, I_INV]:iprog[j, I_INV] + nout], dout, dx, grads[p0:p0 + nout],
                                    grads[p0 + nout:p0 + 2 * nout], parts(m), scratch, size >= thr[T_BN])
        elif kind == OP_ACTIVATION:
            if has_dx:
                activation_backward_impl(out, dout, iprog[j, I_ACT], dx, size >= thr[T_ACT_CHEAP])
        elif has_dx:  # OP_DROPOUT
            mask = masks[iprog[j, I_MASK]:iprog[j, I_MASK] + size].reshape((m, nout))
            dropout_backward_impl(dout, mask, fprog[j, F_KEEP], dx, size >= thr[T_DROPOUT])
        dout = dx


@_jit
def _loss(loss_kind, logits, yb, dlog, wb, thr):
    """The mean (or weighted mean) data loss; dlog = its gradient. Labels are validated by the caller."""
    if loss_kind == LOSS_SOFTMAX_CE:
        loss, _ = softmax_cross_entropy_impl(logits, yb, dlog, wb, logits.size >= thr[T_SOFTMAX])
        return loss
    if loss_kind == LOSS_SIGMOID_BCE:
        return sigmoid_bce_impl(logits, yb, dlog, wb)
    if loss_kind == LOSS_POISSON:
        return poisson_impl(logits, yb, dlog, wb)
    return mse_impl(logits, yb, dlog, wb)


@_jit
def _errors(loss_kind, logits, yb):
    """Wrong predictions of the batch (classifiers; 0 for the regression losses)."""
    m, k = logits.shape
    wrong = 0
    if loss_kind == LOSS_SOFTMAX_CE:
        for r in range(m):
            row = logits[r]
            best = 0
            for c in range(1, k):
                if row[c] > row[best]:
                    best = c
            if best != yb[r]:
                wrong += 1
    elif loss_kind == LOSS_SIGMOID_BCE:
        t = yb.reshape(yb.size)
        for r in range(m):
            row = logits[r]
            for c in range(k):
                if (1.0 if row[c] > 0 else 0.0) != t[r * k + c]:   # the per-layer rule: (z > 0) != y
                    wrong += 1
                    break
    return wrong


@_jit
def _gather(X, y, w, perm, s0, m, ky, xbuf, ybuf, wbuf):
    """Rows perm[s0:s0+m] of X, y (ky elements a row) and w into the batch buffers; returns their views."""
    n_in = X.shape[1]
    xb = xbuf[:m * n_in].reshape((m, n_in))
    yf = y.reshape(y.size)
    yb = ybuf[:m * ky]
    for r in range(m):
        src = perm[s0 + r]
        xr = X[src]
        dst = xb[r]
        for c in range(n_in):
            dst[c] = xr[c]
        for c in range(ky):
            yb[r * ky + c] = yf[src * ky + c]
    wb = wbuf[:0]
    if w.shape[0] != 0:
        wb = wbuf[:m]
        for r in range(m):
            wb[r] = w[perm[s0 + r]]
    return xb, yb, wb


@_jit
def _train_epoch(X, y, ky, w, perm, batch_size, iprog, fprog, dense_w, loss_kind, l2, l2_dataset, n_total,
                 params, grads, state, ws, dlog_off, masks, xbuf, ybuf, wbuf, scratch,
                 opt_kind, v, s, hyper, coef1, coef2, step0, seed, thr, costs, losses):
    """Run every mini-batch of one epoch; returns (steps done, wrong predictions, status) (plan.EpochExecutor)."""
    N = X.shape[0]
    k = iprog[iprog.shape[0] - 1, I_NOUT]
    empty1 = params[:0]
    empty2 = ws[:0].reshape((0, 0))
    n_batches = (N + batch_size - 1) // batch_size
    wrong = 0
    # bf16 plans: round_bf16(params) lives at ws[pr:pr + P] (plan.Layout.params_r = a Dense op's I_WR - I_P0)
    P = params.shape[0]
    pr = -1
    for j in range(iprog.shape[0]):
        if iprog[j, I_KIND] == OP_DENSE and iprog[j, I_PREC] == 1 and iprog[j, I_WR] >= 0:
            pr = iprog[j, I_WR] - iprog[j, I_P0]
    # small models without L2: round every W right after the update; else each Dense rounds its W in _forward
    w_fused = pr >= 0 and l2 == 0.0 and P <= 262144
    if w_fused:
        round_bf16_into(params, ws[pr:pr + P])     # the first step's rounded W
    for bi in range(n_batches):
        s0 = bi * batch_size
        m = min(batch_size, N - s0)
        xb, yb, wb = _gather(X, y, w, perm, s0, m, ky, xbuf, ybuf, wbuf)
        logits = _forward(xb, iprog, fprog, params, state, ws, masks, m, seed, step0 + bi, thr, empty1, scratch,
                          w_fused)
        dlog = _view2(ws, dlog_off, m, k)
        loss = _loss(loss_kind, logits, yb, dlog, wb, thr)     # yb flat: every branch types for every loss
        if l2_dataset and n_total != 0:
            m_l2 = np.float64(n_total)
        elif wb.shape[0] != 0:
            m_l2 = weight_sum(wb)
        else:
            m_l2 = np.float64(m)
        l2_on = l2 != 0.0 and m_l2 != 0.0     # weights summing to 0: no L2 term or gradient either
        _backward(xb, iprog, fprog, params, grads, ws, masks, m, dlog, l2 / m_l2 if l2_on else 0.0, thr, empty1,
                  empty2, scratch)
        l2_term = 0.0
        if l2_on:
            ss = 0.0
            for d in range(dense_w.shape[0]):
                W = params[dense_w[d, 0]:dense_w[d, 1]]
                ss += sum_squares_impl(W, W.size >= thr[T_SSQ])
            l2_term = l2 / (2.0 * m_l2) * ss
        J = loss + l2_term
        costs[bi] = J
        losses[bi] = loss
        wrong += _errors(loss_kind, logits, yb)
        if not (math.isfinite(J) and all_finite_impl(grads)):
            return bi, wrong, 1
        optimizer_step(opt_kind, params, grads, v, s, hyper[H_BETA1], hyper[H_BETA2], hyper[H_EPS], coef1[bi],
                       coef2[bi], thr)
        if w_fused:   # bf16: the next step's round_bf16(W), right after the update (params still in cache)
            # (one pass: a blocked step + rounding, as kernels/_epoch.pyx does, was slower here: each
            # optimizer_step call costs ~0.15 us; S: 9.3 vs 6.6 us per step for Adam + rounding)
            round_bf16_into(params, ws[pr:pr + P])
    if not (all_finite_impl(params) and all_finite_impl(state)):
        return n_batches, wrong, 2
    return n_batches, wrong, 0


def _need(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(f"NumbaEpochExecutor.run_epoch: {msg}")


class NumbaEpochExecutor:
    """The compiled epoch of one ``(plan, batch_size, optimiser kind)`` (implements plan.EpochExecutor).

    Owns the workspace, dropout-mask, batch and BatchNorm scratch buffers;
    ``run_epoch`` allocates nothing per step.
    """

    def __init__(self, plan: Plan, batch_size: int, opt_spec: OptimizerSpec):
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not plan.ops:
            raise ValueError("the plan has no ops")
        lay = plan.layout(int(batch_size))
        if (lay.iprog[:, I_PREC] != 0).any() and np.dtype(plan.dtype) != np.float32:
            raise ValueError(f"precision=1 (bf16 GEMMs) needs a float32 plan, got {np.dtype(plan.dtype)}")
        self.plan, self.batch_size, self.opt_spec = plan, int(batch_size), opt_spec
        # bf16 Dense ops whose GEMMs go to a packing kernel keep the per-GEMM rounding (plan.route_bf16)
        self.iprog, self.fprog = route_bf16(lay.iprog, self.batch_size, bf16_gemm_packs), lay.fprog
        B, dt = self.batch_size, np.dtype(plan.dtype)
        k = plan.n_outputs
        self.ws = np.zeros(lay.ws_size, dt)
        self.dlog_off = plan.dlogits_offset(B)
        self.masks = np.zeros(max(lay.mask_size, 1), np.uint8)
        self.xbuf = np.empty(B * plan.n_features, dt)
        self.y_per_row = 1 if plan.loss == LOSS_SOFTMAX_CE else k     # targets: a class id, or k floats
        self.ybuf = np.empty(B * self.y_per_row, np.int64 if plan.loss == LOSS_SOFTMAX_CE else dt)
        self.wbuf = np.empty(B)
        P = int(parts(B))     # the partitions of a full batch: the most any batch uses
        widths = [int(r[I_NOUT]) for r in lay.iprog if r[I_KIND] == OP_BATCHNORM]
        self.scratch = np.empty(max([max(bn_train_scratch_size(n, P), bn_backward_scratch_size(n, P))
                                     for n in widths] + [1]))
        self.hyper = opt_spec.hyper_array()

    def run_epoch(self, X: np.ndarray, y: np.ndarray, w: np.ndarray, perm: np.ndarray,
                  params: np.ndarray, grads: np.ndarray, state: np.ndarray, v: np.ndarray, s: np.ndarray,
                  c1: np.ndarray, c2: np.ndarray, step0: int, seed: int, n_total: int,
                  costs: np.ndarray, losses: np.ndarray) -> tuple[int, int, int]:
        """Train every mini-batch of one epoch in ``perm`` order (see :class:`fastdl.plan.EpochExecutor`)."""
        plan = self.plan
        dt = np.dtype(plan.dtype)
        N = X.shape[0] if X.ndim == 2 else -1
        _need(X.ndim == 2 and X.shape[1] == plan.n_features and X.dtype == dt and X.flags.c_contiguous,
              f"X must be a C-contiguous ({'N'}, {plan.n_features}) {dt} array, got {X.shape} {X.dtype}")
        ydt = np.int64 if plan.loss == LOSS_SOFTMAX_CE else dt
        _need(y.dtype == ydt and y.flags.c_contiguous and y.shape[0] == N and y.size == N * self.y_per_row,
              f"y must be a C-contiguous {np.dtype(ydt)} array of {N} rows x {self.y_per_row}, "
              f"got {y.shape} {y.dtype}")
        _need(w.size == 0 or (w.shape == (N,) and w.dtype == np.float64 and w.flags.c_contiguous),
              f"w must be empty or float64 ({N},), got {w.shape} {w.dtype}")
        n_steps = (N + self.batch_size - 1) // self.batch_size
        _need(perm.shape == (N,) and perm.dtype == np.int64,
              f"perm must be int64 ({N},), got {perm.shape} {perm.dtype}")
        # O(N) once per epoch: the compiled loop indexes with these without bounds checks
        _need(N == 0 or (0 <= perm.min() and perm.max() < N), f"perm has row indices outside [0, {N})")
        if plan.loss == LOSS_SOFTMAX_CE and N:
            _need(0 <= y.min() and y.max() < plan.n_outputs,
                  f"y must hold class ids in [0, {plan.n_outputs}), got values in [{y.min()}, {y.max()}]")
        for name, arr, size in (("params", params, plan.n_params), ("grads", grads, plan.n_params),
                                ("state", state, plan.n_state)):
            _need(arr.shape == (size,) and arr.dtype == dt and arr.flags.c_contiguous,
                  f"{name} must be a C-contiguous {dt} array of {size}, got {arr.shape} {arr.dtype}")
        for name in self.opt_spec.state_names:
            arr = v if name == "v" else s
            _need(arr.shape == (plan.n_params,) and arr.dtype == dt,
                  f"optimiser state {name} must be {dt} ({plan.n_params},), got {arr.shape} {arr.dtype}")
        for name, arr in (("c1", c1), ("c2", c2), ("costs", costs), ("losses", losses)):
            _need(arr.dtype == np.float64 and arr.ndim == 1 and arr.shape[0] >= n_steps,
                  f"{name} must be float64 with >= {n_steps} entries (one per step), got {arr.shape} {arr.dtype}")
        v = v if "v" in self.opt_spec.state_names else params[:0]
        s = s if "s" in self.opt_spec.state_names else params[:0]
        done, wrong, status = _train_epoch(
            X, y, self.y_per_row, w if w.size else self.wbuf[:0], perm, self.batch_size, self.iprog, self.fprog,
            plan.dense_weights, plan.loss, float(plan.l2), plan.l2_scale == L2_DATASET, int(n_total),
            params, grads, state, self.ws, self.dlog_off, self.masks, self.xbuf, self.ybuf, self.wbuf,
            self.scratch, self.opt_spec.kind, v, s, self.hyper, c1, c2, int(step0), int(seed),
            current_thresholds(), costs, losses)
        return int(done), int(wrong), int(status)

    def compile(self) -> None:
        """Compile (or load from fastdl's cache) the epoch for this plan's dtypes, on tiny data.

        Touches none of the caller's arrays. Both the serial and the parallel
        variants are part of the one compiled function.
        """
        plan = self.plan
        dt = np.dtype(plan.dtype)
        n = 2
        X = np.zeros((n, plan.n_features), dt)
        if plan.loss == LOSS_SOFTMAX_CE:
            y = np.zeros(n, np.int64)
        else:
            y = np.zeros(n * self.y_per_row, dt).reshape((n, -1) if self.y_per_row > 1 else (n,))
        params = np.zeros(plan.n_params, dt)
        state = np.ones(plan.n_state, dt)
        opt = np.zeros(plan.n_params, dt)
        ones = np.ones(n)
        perm = np.arange(n, dtype=np.int64)
        saved = self.ws.copy(), self.masks.copy()
        for w in (np.empty(0), ones):
            self.run_epoch(X, y, w, perm, params, np.zeros_like(params), state, opt, opt.copy(),
                           np.zeros(n), np.zeros(n), 0, 0, n, np.empty(n), np.empty(n))
        self.ws[:], self.masks[:] = saved


__all__ = ["NumbaEpochExecutor"]
