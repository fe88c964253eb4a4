"""A whole training epoch in ONE compiled call (Numba).

For small networks the cost of a step is per-call overhead, not arithmetic:
the per-layer path makes ~15 Python-level kernel calls per step. Here the
model is encoded as arrays (layer kinds, widths, offsets into ``params``,
``state`` and one workspace) and interpreted inside a single ``@njit``
function that runs every mini-batch of an epoch: gather, forward, loss,
backward, divergence check, optimiser update. It calls the same compiled
kernels as :mod:`fastdl.backends.numba_backend` (GEMMs through BLAS), with
the same serial/parallel decisions, so it produces the same numbers as the
per-layer path with ``backend="numba"``.

Supported: Sequential models of Dense / BatchNorm / activation / Dropout
layers with ``softmax_cross_entropy``, any of the four optimisers, any
schedule. Everything else uses the per-layer path (see :func:`supports`).
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit

from . import numba_backend as nb
from .contract import GOLDEN, MIX_C1, MIX_C2

OP_DENSE, OP_BN, OP_ACT, OP_DROPOUT = 0, 1, 2, 3
OPT_SGD, OPT_MOMENTUM, OPT_RMSPROP, OPT_ADAM = 0, 1, 2, 3
# integer program columns
(I_KIND, I_NIN, I_NOUT, I_ACT, I_P0, I_P1, I_S0, I_S1, I_LAYER,
 I_OUT, I_DX, I_MASK, I_MEAN, I_INV, N_ICOLS) = range(15)
# float program columns
F_KEEP, F_MOMENTUM, F_EPS, N_FCOLS = 0, 1, 2, 3
# threshold slots (elements at which the prange variant is used)
T_BN, T_DROPOUT, T_OPT, T_SSQ, N_T = 0, 1, 2, 3, 4
# scalar slots of the optimiser
H_BETA1, H_BETA2, H_EPS, N_H = 0, 1, 2, 3

_jit = njit(cache=True, error_model="numpy")


# ----------------------------------------------------------------------------- helpers (compiled)


@_jit
def _mix64(x):
    x ^= x >> np.uint64(30)
    x *= np.uint64(MIX_C1)
    x ^= x >> np.uint64(27)
    x *= np.uint64(MIX_C2)
    x ^= x >> np.uint64(31)
    return x


@_jit
def _dropout_key(seed, step, layer):
    # contract.dropout_key in uint64 arithmetic (seed, step, layer >= 0)
    k = _mix64(np.uint64(seed) + np.uint64(GOLDEN))
    k = _mix64(k ^ np.uint64(step))
    return _mix64(k ^ np.uint64(layer))


@_jit
def _view2(buf, off, m, n):
    return buf[off:off + m * n].reshape((m, n))


@_jit
def _parts(m):
    return max(1, min(nb._MAX_PARTS, m // nb._ROWS_PER_PART))


@_jit
def _rows_per_chunk(m, n):
    return max(1, min(m, nb._CHUNK // max(n, 1)))


@_jit
def _tile_rows(n, itemsize):
    return max(1, nb._TILE_BYTES // max(1, n * itemsize))


@_jit
def _ssq(x, thr):
    if x.size >= thr:
        return nb._ssq_par(x)
    return nb._ssq_serial(x)


@_jit
def _forward(X, iprog, fprog, params, state, ws, masks, m, seed, step, thr, empty1):
    """Training-mode forward of an m-row batch; returns the logits view."""
    x = X
    for j in range(iprog.shape[0]):
        kind = iprog[j, I_KIND]
        nin = iprog[j, I_NIN]
        nout = iprog[j, I_NOUT]
        if kind == OP_DENSE:
            W = params[iprog[j, I_P0]:iprog[j, I_P0] + nin * nout].reshape((nin, nout))
            b = params[iprog[j, I_P1]:iprog[j, I_P1] + nout] if iprog[j, I_P1] >= 0 else empty1
            out = _view2(ws, iprog[j, I_OUT], m, nout)
            nb._dense_forward_serial(x, W, b, iprog[j, I_ACT], out)
            x = out
        elif kind == OP_BN:
            p0 = iprog[j, I_P0]
            s0 = iprog[j, I_S0]
            out = _view2(ws, iprog[j, I_OUT], m, nout)
            mean = ws[iprog[j, I_MEAN]:iprog[j, I_MEAN] + nout]
            inv = ws[iprog[j, I_INV]:iprog[j, I_INV] + nout]
            gamma = params[p0:p0 + nout]
            beta = params[p0 + nout:p0 + 2 * nout]
            rm = state[s0:s0 + nout]
            rv = state[s0 + nout:s0 + 2 * nout]
            P = _parts(m)
            tr = _tile_rows(nout, x.itemsize)
            if m * nout >= thr[T_BN]:
                nb._bn_train_par(x, gamma, beta, fprog[j, F_EPS], fprog[j, F_MOMENTUM], rm, rv, mean, inv, out,
                                 P, tr, _rows_per_chunk(m, nout))
            else:
                nb._bn_train_serial(x, gamma, beta, fprog[j, F_EPS], fprog[j, F_MOMENTUM], rm, rv, mean, inv,
                                    out, P, tr)
            x = out
        elif kind == OP_ACT:
            out = _view2(ws, iprog[j, I_OUT], m, nout)
            nb._act_fwd_serial(x, iprog[j, I_ACT], out)
            x = out
        else:  # dropout (only emitted when keep_prob < 1)
            out = _view2(ws, iprog[j, I_OUT], m, nout)
            mask = masks[iprog[j, I_MASK]:iprog[j, I_MASK] + m * nout].reshape((m, nout))
            key = _dropout_key(seed, step, iprog[j, I_LAYER])
            kp = fprog[j, F_KEEP]
            thr_keep = np.uint64(kp * 4294967296.0)
            if m * nout >= thr[T_DROPOUT]:
                nb._dropout_fwd_par(x, key, thr_keep, kp, mask, out)
            else:
                nb._dropout_fwd_serial(x, key, thr_keep, kp, mask, out)
            x = out
    return x


@_jit
def _backward(X, iprog, fprog, params, grads, ws, masks, m, dlogits, l2_over_m, empty1, empty2):
    dout = dlogits
    n_ops = iprog.shape[0]
    for j in range(n_ops - 1, -1, -1):
        kind = iprog[j, I_KIND]
        nin = iprog[j, I_NIN]
        nout = iprog[j, I_NOUT]
        x = X if j == 0 else _view2(ws, iprog[j - 1, I_OUT], m, nin)
        out = _view2(ws, iprog[j, I_OUT], m, nout)
        need_dx = j > 0
        dx = _view2(ws, iprog[j, I_DX], m, nin) if need_dx else empty2
        if kind == OP_DENSE:
            p0 = iprog[j, I_P0]
            W = params[p0:p0 + nin * nout].reshape((nin, nout))
            dW = grads[p0:p0 + nin * nout].reshape((nin, nout))
            db = grads[iprog[j, I_P1]:iprog[j, I_P1] + nout] if iprog[j, I_P1] >= 0 else empty1
            nb._dense_backward_impl(x, W, out, dout, iprog[j, I_ACT], l2_over_m, dout, dW, db, dx)
        elif kind == OP_BN:
            p0 = iprog[j, I_P0]
            mean = ws[iprog[j, I_MEAN]:iprog[j, I_MEAN] + nout]
            inv = ws[iprog[j, I_INV]:iprog[j, I_INV] + nout]
            target = dx if need_dx else dout
            nb._bn_bwd_serial(x, params[p0:p0 + nout], mean, inv, dout, target, grads[p0:p0 + nout],
                              grads[p0 + nout:p0 + 2 * nout], _parts(m))
        elif kind == OP_ACT:
            if need_dx:
                nb._act_bwd_serial(out, dout, iprog[j, I_ACT], dx)
        else:
            if need_dx:
                mask = masks[iprog[j, I_MASK]:iprog[j, I_MASK] + m * nout].reshape((m, nout))
                nb._dropout_bwd_serial(dout, mask, fprog[j, F_KEEP], dx)
        dout = dx


@_jit
def _optimizer_step(kind, params, grads, v, s, hyper, c1, c2, thr):
    big = params.size >= thr[T_OPT]
    if kind == OPT_ADAM:
        b1 = hyper[H_BETA1]
        b2 = hyper[H_BETA2]
        if big:
            nb._adam_par(params, grads, v, s, b1, 1 - b1, b2, 1 - b2, c1, c2, hyper[H_EPS])
        else:
            nb._adam_serial(params, grads, v, s, b1, 1 - b1, b2, 1 - b2, c1, c2, hyper[H_EPS])
    elif kind == OPT_MOMENTUM:
        b = hyper[H_BETA1]
        if big:
            nb._mom_par(params, grads, v, b, 1 - b, c1)
        else:
            nb._mom_serial(params, grads, v, b, 1 - b, c1)
    elif kind == OPT_RMSPROP:
        b2 = hyper[H_BETA2]
        if big:
            nb._rms_par(params, grads, s, c1, b2, 1 - b2, hyper[H_EPS])
        else:
            nb._rms_serial(params, grads, s, c1, b2, 1 - b2, hyper[H_EPS])
    else:
        if big:
            nb._sgd_par(params, grads, c1)
        else:
            nb._sgd_serial(params, grads, c1)


@_jit
def _train_epoch(X, y, perm, batch_size, iprog, fprog, dense_w, params, grads, state, ws, masks, xbuf, ybuf,
                 dlog_buf, opt_kind, v, s, hyper, coef1, coef2, l2, step0, seed, thr, costs, losses):
    """Run every mini-batch of one epoch. Returns (steps done, wrong predictions, status).

    status 0: fine; 1: the cost or the gradients of step ``steps done`` were not finite
    (the optimiser was not applied for that step).
    """
    N = X.shape[0]
    n_in = X.shape[1]
    k = dlog_buf.shape[0] // max(batch_size, 1)
    empty1 = params[:0]
    empty2 = ws[:0].reshape((0, 0))
    n_batches = (N + batch_size - 1) // batch_size
    wrong = 0
    for bi in range(n_batches):
        s0 = bi * batch_size
        m = min(batch_size, N - s0)
        xb = xbuf[:m * n_in].reshape((m, n_in))
        yb = ybuf[:m]
        for r in range(m):
            src = perm[s0 + r]
            yb[r] = y[src]
            xr = X[src]
            dst = xb[r]
            for c in range(n_in):
                dst[c] = xr[c]
        step = step0 + bi
        logits = _forward(xb, iprog, fprog, params, state, ws, masks, m, seed, step, thr, empty1)
        dlog = dlog_buf[:m * k].reshape((m, k))
        total, bad = nb._sce_serial(logits, yb, dlog, True, _parts(m))
        loss = total / m
        _backward(xb, iprog, fprog, params, grads, ws, masks, m, dlog, l2 / m, empty1, empty2)
        l2_term = 0.0
        if l2 != 0.0:
            ss = 0.0
            for d in range(dense_w.shape[0]):
                ss += _ssq(params[dense_w[d, 0]:dense_w[d, 1]], thr[T_SSQ])
            l2_term = l2 / (2.0 * m) * ss
        J = loss + l2_term
        costs[bi] = J
        losses[bi] = loss
        for r in range(m):
            row = logits[r]
            best = 0
            for c in range(1, k):
                if row[c] > row[best]:
                    best = c
            if best != yb[r]:
                wrong += 1
        if not (math.isfinite(J) and math.isfinite(_ssq(grads, thr[T_SSQ]))):
            return bi, wrong, 1
        _optimizer_step(opt_kind, params, grads, v, s, hyper, coef1[bi], coef2[bi], thr)
    return n_batches, wrong, 0


# ----------------------------------------------------------------------------- Python side


def supports(model, optimizer) -> str | None:
    """None if the fused epoch can train ``model`` with ``optimizer``, else the reason it cannot."""
    from ..layers import Activation, BatchNorm, Dense, Dropout
    from ..optim import SGD, Adam, Momentum, RMSprop

    if model.loss.name != "softmax_cross_entropy":
        return f"loss {model.loss.name!r} (fused path: softmax_cross_entropy only)"
    if model.l2_scale != "batch":
        return "l2_scale='dataset'"
    if type(optimizer) not in (SGD, Momentum, RMSprop, Adam):
        return f"optimizer {type(optimizer).__name__}"
    for op in model._ops:
        if not isinstance(op, (Dense, BatchNorm, Activation, Dropout)):
            return f"layer {type(op).__name__}"
    needed = ("dense_forward", "dense_backward", "activation_forward", "activation_backward",
              "batchnorm_forward_train", "batchnorm_backward", "softmax_cross_entropy", "dropout_forward",
              "dropout_backward", "sum_squares", "sgd_step", "momentum_step", "rmsprop_step", "adam_step")
    other = sorted({model.kernels.sources[k] for k in needed} - {"numba"})
    if other:
        return f"kernels from backend(s) {other} (the fused epoch uses the numba kernels)"
    return None


class FusedEpoch:
    """The compiled program of one model and batch size (built once per ``fit``)."""

    def __init__(self, model, optimizer, batch_size: int, n_features: int):
        from ..layers import Activation, BatchNorm, Dense, Dropout

        self.model = model
        self.optimizer = optimizer
        self.batch_size = batch_size
        dt = model.dtype
        offsets = {name: sl.start for name, sl in model.param_slices}
        state_off, off = {}, 0
        for li, layer in enumerate(model.layers):
            for name, shape in layer.state_specs():
                state_off[(li, name)] = off
                off += int(np.prod(shape))
        index = {id(layer): li for li, layer in enumerate(model.layers)}
        ops = [op for op in model._ops if not (isinstance(op, Dropout) and op.keep_prob == 1.0)]
        iprog = np.full((len(ops), N_ICOLS), -1, np.int64)
        fprog = np.zeros((len(ops), N_FCOLS), np.float64)
        B = batch_size
        ws_size = mask_size = 0
        dim = n_features
        for j, op in enumerate(ops):
            li = index[id(op)]
            nin = dim
            nout = op.output_dim(dim)
            row = iprog[j]
            row[I_NIN], row[I_NOUT], row[I_LAYER] = nin, nout, li
            if isinstance(op, Dense):
                row[I_KIND], row[I_ACT] = OP_DENSE, op.activation
                row[I_P0] = offsets[f"layers[{li}].W"]
                row[I_P1] = offsets.get(f"layers[{li}].b", -1)
            elif isinstance(op, BatchNorm):
                row[I_KIND] = OP_BN
                row[I_P0] = offsets[f"layers[{li}].gamma"]
                row[I_S0] = state_off[(li, "running_mean")]
                fprog[j, F_MOMENTUM], fprog[j, F_EPS] = op.momentum, op.eps
                row[I_MEAN], row[I_INV] = ws_size, ws_size + nout
                ws_size += 2 * nout
            elif isinstance(op, Activation):
                row[I_KIND], row[I_ACT] = OP_ACT, op.code
            else:
                row[I_KIND] = OP_DROPOUT
                fprog[j, F_KEEP] = op.keep_prob
                row[I_MASK] = mask_size
                mask_size += B * nout
            row[I_OUT] = ws_size
            ws_size += B * nout
            if j > 0:
                row[I_DX] = ws_size
                ws_size += B * nin
            dim = nout
        self.iprog, self.fprog = iprog, fprog
        self.ws = np.zeros(ws_size, dt)
        self.masks = np.zeros(max(mask_size, 1), np.uint8)
        self.xbuf = np.empty(B * n_features, dt)
        self.ybuf = np.empty(B, np.int64)
        self.dlog = np.empty(B * model.n_outputs, dt)
        self.dense_w = np.array([[offsets[f"layers[{index[id(layer)]}].W"],
                                  offsets[f"layers[{index[id(layer)]}].W"] + layer.W.size]
                                 for layer in model.layers if isinstance(layer, Dense)], np.int64).reshape(-1, 2)

    def _coefficients(self, lrs: np.ndarray, t0: int) -> tuple[np.ndarray, np.ndarray, int, np.ndarray]:
        """Per-step optimiser scalars, computed in Python exactly as the per-layer kernels do."""
        from ..optim import Adam, Momentum, RMSprop

        opt = self.optimizer
        n = lrs.size
        c1 = np.empty(n)
        c2 = np.zeros(n)
        hyper = np.zeros(N_H)
        if isinstance(opt, Adam):
            kind = OPT_ADAM
            hyper[:] = (opt.beta1, opt.beta2, opt.eps)
            for i in range(n):
                t = t0 + i + 1
                c1[i] = float(lrs[i]) / (1 - opt.beta1 ** t)
                c2[i] = 1.0 / (1 - opt.beta2 ** t)
        elif isinstance(opt, Momentum):
            kind = OPT_MOMENTUM
            hyper[H_BETA1] = opt.beta
            for i in range(n):
                t = t0 + i + 1
                c1[i] = float(lrs[i]) / (1 - opt.beta ** t) if opt.bias_correction else float(lrs[i])
        elif isinstance(opt, RMSprop):
            kind = OPT_RMSPROP
            hyper[H_BETA2], hyper[H_EPS] = opt.beta2, opt.eps
            c1[:] = lrs
        else:
            kind = 0
            c1[:] = lrs
        return c1, c2, kind, hyper

    def run(self, X: np.ndarray, y: np.ndarray, perm: np.ndarray, lrs: np.ndarray
            ) -> tuple[np.ndarray, np.ndarray, int, bool]:
        """Train one epoch. Returns (cost per step, data loss per step, wrong predictions, diverged)."""
        model, opt = self.model, self.optimizer
        opt._ensure_state(model.params, model.grads)
        n_steps = lrs.size
        c1, c2, kind, hyper = self._coefficients(lrs, opt.t)
        v = opt.state.get("v", model.params[:0])
        s = opt.state.get("s", model.params[:0])
        thr = np.array([nb._THR["batchnorm"], nb._THR["dropout"],
                        nb._THR["adam"] if kind == OPT_ADAM else nb._THR["optimizer"], nb._THR["sum_squares"]],
                       np.int64)
        costs = np.empty(n_steps)
        losses = np.empty(n_steps)
        done, wrong, status = _train_epoch(
            X, y, perm, self.batch_size, self.iprog, self.fprog, self.dense_w, model.params, model.grads,
            model.state, self.ws, self.masks, self.xbuf, self.ybuf, self.dlog, kind, v, s, hyper, c1, c2,
            float(model.l2), model.step_count, model.seed, thr, costs, losses)
        opt.t += done
        model.step_count += done
        return costs[:done + status], losses[:done + status], wrong, bool(status)
