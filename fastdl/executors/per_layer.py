"""The per-layer executor: a :class:`~fastdl.plan.Plan` run op by op through the kernel contract.

One Python call per op and kernel (``backend.unchecked.<kernel>``: the raw
kernels; this executor builds every buffer itself, so the argument checks of
the public entry points would only cost time). It runs on every backend,
the reference included, and is the path each whole-epoch executor is
tested bit-identical against, so it fixes the exact float expressions of a
step (board, helper C, 22:20):

* ``m_l2`` (the ``m`` of ``lambda/(2m)``): ``n_total`` with
  ``l2_scale='dataset'`` (when known), else the batch's summed weights
  ``sw`` (weighted), else the batch's rows;
* ``l2_over_m = l2 / m_l2`` (times ``grad_scale`` for a data-parallel shard);
* ``l2_term = 0.0 if l2 == 0 else l2 / (2.0 * m_l2) * ss`` with
  ``ss = ((0.0 + sum_squares(W_0)) + sum_squares(W_1)) + ...`` in
  ``plan.dense_weights`` order, computed after the backward pass;
* weights: ``sw`` is the left-to-right float64 sum of the batch's weights
  (``np.add.accumulate``); the loss kernels take the raw weights.
  A batch whose weights sum to 0 contributes nothing: loss 0, zero data
  gradient, no L2 term and no L2 gradient.

Memory: ONE flat workspace per batch size (``plan.layout(m)``: every op's
output, dX, BatchNorm batch statistics and the loss gradient are views at
the layout's offsets) plus one uint8 buffer for the dropout masks; a
bounded number of sizes is cached. A training step allocates no arrays.

Synchronised BatchNorm (data-parallel training) is computed here in NumPy
(float64 sums, one all-reduce of per-feature sums in forward and one in
backward), see :func:`sync_batchnorm_forward`.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from ..plan import I_OUTR, I_WR, I_XR, route_bf16
from ..plan import (I_DX, I_INV, I_MASK, I_MEAN, I_OUT, LOSS_KERNELS, LOSS_SIGMOID_BCE, OP_ACTIVATION,
                    OP_BATCHNORM, OP_DENSE, OP_DROPOUT, L2_DATASET, REGRESSION_LOSSES, Plan)

#: batch sizes whose workspaces are kept (fit needs two: the full and the last batch)
MAX_WORKSPACES = 8


class _Workspace:
    """The buffers of one batch size: views into one flat array (and the mask buffer)."""

    __slots__ = ("m", "flat", "mask_buf", "out", "dx", "mean", "inv_std", "mask", "dlogits", "inputs",
                 "active", "count", "params_r", "xr", "wr", "outr", "round_in")

    def __init__(self, plan: Plan, m: int, packs=None):
        lay = plan.layout(m)
        self.m = m
        self.flat = np.empty(lay.ws_size, plan.dtype)
        self.mask_buf = np.empty(lay.mask_size, np.uint8)
        flat, n_ops = self.flat, len(plan.ops)
        self.out: list[Any] = [None] * n_ops
        self.dx: list[Any] = [None] * n_ops
        self.mean: list[Any] = [None] * n_ops
        self.inv_std: list[Any] = [None] * n_ops
        self.mask: list[Any] = [None] * n_ops
        for j, op in enumerate(plan.ops):
            row = lay.iprog[j]
            o = int(row[I_OUT])
            self.out[j] = flat[o:o + m * op.n_out].reshape(m, op.n_out)
            if row[I_DX] >= 0:
                d = int(row[I_DX])
                self.dx[j] = flat[d:d + m * op.n_in].reshape(m, op.n_in)
            if op.kind == OP_BATCHNORM:
                self.mean[j] = flat[int(row[I_MEAN]):int(row[I_MEAN]) + op.n_out]
                self.inv_std[j] = flat[int(row[I_INV]):int(row[I_INV]) + op.n_out]
            if op.kind == OP_DROPOUT:
                k = int(row[I_MASK])
                self.mask[j] = self.mask_buf[k:k + m * op.n_out].reshape(m, op.n_out)
        d = lay.ws_size - m * plan.n_outputs
        self.dlogits = flat[d:].reshape(m, plan.n_outputs)
        # bf16 (docs/spec.md section 13): round_bf16(params), each Dense input's rounded copy, and where a
        # Dense writes its rounded output (the next Dense's input copy); None for fp32 plans / other ops
        pr = lay.params_r
        self.params_r = flat[pr:pr + plan.n_params] if pr >= 0 else None
        # ops whose GEMMs run on a packing kernel keep the per-GEMM rounding (xr[j] None; plan.route_bf16)
        iprog = route_bf16(lay.iprog, m, packs) if packs is not None and pr >= 0 else lay.iprog
        self.xr: list[Any] = [None] * n_ops
        self.wr: list[Any] = [None] * n_ops
        self.outr: list[Any] = [None] * n_ops
        self.round_in = [True] * n_ops
        for j, op in enumerate(plan.ops):
            row = iprog[j]
            if row[I_XR] >= 0:
                self.xr[j] = flat[int(row[I_XR]):int(row[I_XR]) + m * op.n_in].reshape(m, op.n_in)
                self.wr[j] = flat[int(row[I_WR]):int(row[I_WR]) + op.n_in * op.n_out].reshape(op.n_in, op.n_out)
            if row[I_OUTR] >= 0:
                self.outr[j] = flat[int(row[I_OUTR]):int(row[I_OUTR]) + m * op.n_out].reshape(m, op.n_out)
                self.round_in[j + 1] = False    # op j writes op j+1's rounded input
        self.inputs: list[Any] = [None] * (n_ops + 1)  # input of op j; inputs[n_ops] = the logits
        self.active = [False] * n_ops                  # dropout op j applied in the last forward
        self.count = [0.0] * n_ops                     # synchronised BatchNorm: global rows


class PerLayerExecutor:
    """Runs ``plan`` on the flat ``params`` / ``grads`` / ``state`` of a model with ``kernels``.

    Built by :class:`fastdl.Sequential` (``model.executor``); reads only the
    plan and the flat arrays, never layers or optimisers.
    """

    def __init__(self, plan: Plan, kernels, params: np.ndarray, grads: np.ndarray, state: np.ndarray):
        self.plan = plan
        self.kernels = kernels
        self.K = kernels.unchecked
        self.params, self.grads, self.state = params, grads, state
        dt = plan.dtype
        self._empty1 = np.empty(0, dt)
        self._empty2 = np.empty((0, 0), dt)
        self._loss_kernel = getattr(self.K, LOSS_KERNELS[plan.loss])
        # Batch-size independent part of every op, bound once: (kind, arrays..., scalars...)
        ops = []
        for op in plan.ops:
            n_in, n_out = op.n_in, op.n_out
            if op.kind == OP_DENSE:
                W = params[op.p0:op.p0 + n_in * n_out].reshape(n_in, n_out)
                dW = grads[op.p0:op.p0 + n_in * n_out].reshape(n_in, n_out)
                b = params[op.p1:op.p1 + n_out] if op.p1 >= 0 else self._empty1
                db = grads[op.p1:op.p1 + n_out] if op.p1 >= 0 else self._empty1
                ops.append((OP_DENSE, W, b, dW, db, op.act, op.precision))
            elif op.kind == OP_BATCHNORM:
                n = n_out
                ops.append((OP_BATCHNORM, params[op.p0:op.p0 + n], params[op.p0 + n:op.p0 + 2 * n],
                            grads[op.p0:op.p0 + n], grads[op.p0 + n:op.p0 + 2 * n],
                            state[op.s0:op.s0 + n], state[op.s0 + n:op.s0 + 2 * n], op.eps, op.momentum))
            elif op.kind == OP_ACTIVATION:
                ops.append((OP_ACTIVATION, op.act))
            elif op.kind == OP_DROPOUT:
                ops.append((OP_DROPOUT, op.keep_prob, op.layer))
            else:  # pragma: no cover - compile_plan emits only these kinds
                raise ValueError(f"unknown op kind {op.kind} in the plan")
        self._ops = tuple(ops)
        self._dense_W = tuple(params[int(a):int(b)] for a, b in plan.dense_weights)
        # bf16 with each GEMM operand rounded once per step (docs/spec.md section 13) when the backend has
        # the cores (Cython, Numba); else every bf16 GEMM rounds its operands itself (the same bits)
        bf16 = any(op.kind == OP_DENSE and op.precision for op in plan.ops)
        self._bf16 = kernels.bf16_cores() if bf16 and hasattr(kernels, "bf16_cores") else None
        self._workspaces: dict[int, _Workspace] = {}
        self._error_buffers: dict[int, tuple] = {}

    # ----------------------------------------------------------------- buffers
    def workspace(self, m: int) -> _Workspace:
        """The buffers for batches of ``m`` rows (allocated on first use, then reused)."""
        ws = self._workspaces.get(m)
        if ws is None:
            if len(self._workspaces) >= MAX_WORKSPACES:  # bound memory when predicting on many sizes
                self._workspaces.clear()
            ws = self._workspaces[m] = _Workspace(self.plan, m,
                                                  self._bf16.bf16_gemm_packs if self._bf16 is not None else None)
        return ws

    # ----------------------------------------------------------------- forward
    def forward(self, X: np.ndarray, *, training: bool, dropout: bool = False, seed: int = 0, step: int = 0,
                comm=None) -> np.ndarray:
        """The logits of ``X`` (a view into the workspace: copy it to keep it).

        ``training``: BatchNorm uses (and updates the running averages with)
        the batch statistics, over ``comm`` when given; ``dropout`` applies
        the masks of ``(seed, step, layer)``.
        """
        K = self.K
        ws = self.workspace(X.shape[0])
        inputs, outs = ws.inputs, ws.out
        x = X
        bf = self._bf16
        for j, op in enumerate(self._ops):
            inputs[j] = x
            kind = op[0]
            if kind == OP_DENSE:
                _, W, b, _, _, act, prec = op
                out = outs[j]
                if prec and bf is not None and ws.xr[j] is not None:
                    bf.round_bf16(W, ws.wr[j])    # once per forward: this step's backward reuses it
                    bf.dense_forward_bf16(x, ws.xr[j], ws.round_in[j], ws.wr[j], b, act, out, ws.outr[j])
                elif prec:
                    K.dense_forward(x, W, b, act, out, prec)
                else:  # fp32: the 5-argument call every backend has always accepted
                    K.dense_forward(x, W, b, act, out)
                x = out
            elif kind == OP_BATCHNORM:
                _, gamma, beta, _, _, rmean, rvar, eps, momentum = op
                out = outs[j]
                if not training:
                    K.batchnorm_forward_infer(x, gamma, beta, rmean, rvar, eps, out)
                elif comm is not None:
                    ws.count[j] = sync_batchnorm_forward(x, gamma, beta, eps, momentum, rmean, rvar, ws.mean[j],
                                                         ws.inv_std[j], out, comm)
                else:
                    K.batchnorm_forward_train(x, gamma, beta, eps, momentum, rmean, rvar, ws.mean[j],
                                              ws.inv_std[j], out)
                x = out
            elif kind == OP_ACTIVATION:
                out = outs[j]
                K.activation_forward(x, op[1], out)
                x = out
            else:  # OP_DROPOUT: the identity unless dropout is on (inference, gradient checking)
                ws.active[j] = dropout
                if dropout:
                    out = outs[j]
                    K.dropout_forward(x, op[1], seed, step, op[2], ws.mask[j], out)
                    x = out
        inputs[len(self._ops)] = x
        return x

    # ---------------------------------------------------------------- backward
    def backward(self, m: int, l2_over_m: float, comm=None) -> None:
        """Backpropagate the workspace's loss gradient (``dlogits``) into ``grads``.

        Uses the inputs/outputs of the last :meth:`forward` on ``m`` rows.
        ``l2_over_m`` is the weight-decay factor added to every Dense ``dW``.
        """
        K = self.K
        ws = self.workspace(m)
        inputs, dxs = ws.inputs, ws.dx
        dout = ws.dlogits
        for j in range(len(self._ops) - 1, -1, -1):
            op = self._ops[j]
            kind = op[0]
            x, out = inputs[j], inputs[j + 1]
            if kind == OP_DENSE:
                _, W, _, dW, db, act, prec = op
                dx = dxs[j] if j > 0 else self._empty2
                # dZ overwrites dout in place (the contract allows it): dout is consumed here.
                if prec and self._bf16 is not None and ws.xr[j] is not None:   # rounded input, W; dZ in place
                    self._bf16.dense_backward_bf16(ws.xr[j], W, ws.wr[j], out, dout, act, l2_over_m, dout, dW, db,
                                                   dx)
                elif prec:
                    K.dense_backward(x, W, out, dout, act, l2_over_m, dout, dW, db, dx, prec)
                else:
                    K.dense_backward(x, W, out, dout, act, l2_over_m, dout, dW, db, dx)
                dout = dx
            elif kind == OP_BATCHNORM:
                # dZ is needed even for a first op: dgamma/dbeta come from the same kernel.
                _, gamma, _, dgamma, dbeta, _, _, _, _ = op
                dx = dxs[j]
                if comm is not None:
                    sync_batchnorm_backward(x, gamma, ws.mean[j], ws.inv_std[j], ws.count[j], dout, dx, dgamma,
                                            dbeta, comm)
                else:
                    K.batchnorm_backward(x, gamma, ws.mean[j], ws.inv_std[j], dout, dx, dgamma, dbeta)
                dout = dx
            elif j == 0:  # an activation or dropout first op: nothing to learn, no dX needed
                break
            elif kind == OP_ACTIVATION:
                dx = dxs[j]
                K.activation_backward(out, dout, op[1], dx)
                dout = dx
            elif ws.active[j]:  # OP_DROPOUT
                dx = dxs[j]
                K.dropout_backward(dout, ws.mask[j], op[1], dx)
                dout = dx

    # --------------------------------------------------------------- one step
    def sum_squares_of_weights(self) -> float:
        """``sum ||W||^2`` over the Dense weights, added in ``plan.dense_weights`` order from 0.0."""
        ss = 0.0
        for W in self._dense_W:
            ss = ss + self.K.sum_squares(W)
        return ss

    def l2_term(self, m_l2: float) -> float:
        """``lambda/(2 m_l2) * sum ||W||^2`` (0.0 without L2)."""
        l2 = self.plan.l2
        if l2 == 0.0 or m_l2 == 0:
            return 0.0
        return l2 / (2.0 * m_l2) * self.sum_squares_of_weights()

    def loss_and_grads(self, X: np.ndarray, y: np.ndarray, *, dropout: bool, n_total: int | None, step: int,
                       seed: int, m_l2: float | None = None, grad_scale: float = 1.0, comm=None,
                       weights: np.ndarray | None = None) -> tuple[float, float, np.ndarray]:
        """Training-mode forward, loss and backward on validated arrays; fills ``grads``.

        Returns ``(data_loss, l2_term, logits)`` (``J`` is the sum of the first
        two; ``logits`` is a workspace view). See the module docstring for
        ``m_l2``, the weights and the L2 expressions, and
        :meth:`fastdl.Sequential._loss_and_grads` for the data-parallel arguments.
        """
        m = X.shape[0]
        plan = self.plan
        sw = None
        if weights is not None:
            sw = float(np.add.accumulate(weights)[-1]) if m else 0.0
        if m_l2 is None:
            if plan.l2_scale == L2_DATASET and n_total:
                m_l2 = n_total
            else:
                m_l2 = sw if sw is not None else m
        l2_over_m = plan.l2 / m_l2 * grad_scale if (plan.l2 != 0.0 and m_l2 != 0) else 0.0
        logits = self.forward(X, training=True, dropout=dropout, seed=seed, step=step, comm=comm)
        ws = self.workspace(m)
        dlogits = ws.dlogits
        if weights is None:
            data_loss = self._loss_kernel(logits, y, dlogits)
        else:
            data_loss = self._loss_kernel(logits, y, dlogits, weights)
        if grad_scale != 1.0:
            dlogits *= grad_scale
        self.backward(m, l2_over_m, comm)
        return data_loss, self.l2_term(m_l2), logits

    def loss(self, Z: np.ndarray, y: np.ndarray, weights: np.ndarray | None = None) -> float:
        """Mean (or weighted mean) data loss of outputs ``Z`` (no gradient, no L2 term)."""
        if weights is None:
            return self._loss_kernel(Z, y, self._empty2)
        return self._loss_kernel(Z, y, self._empty2, weights)

    def predict_logits(self, X: np.ndarray, batch_size: int) -> np.ndarray:
        """Inference-mode outputs of ``X`` in chunks of ``batch_size`` rows (a new array)."""
        out = np.empty((X.shape[0], self.plan.n_outputs), self.plan.dtype)
        for start in range(0, X.shape[0], batch_size):
            out[start:start + batch_size] = self.forward(X[start:start + batch_size], training=False)
            self._workspaces[min(batch_size, X.shape[0] - start)].inputs[0] = None  # do not keep X alive
        return out

    def wrong_predictions(self, Z: np.ndarray, y: np.ndarray) -> np.ndarray:
        """A bool view ``(m,)`` marking the misclassified rows of outputs ``Z`` (no allocation).

        The rule by ``plan.loss``: softmax cross-entropy: ``argmax(z) != y``
        (the first maximum); binary cross-entropy: ``(z > 0) != y`` (k outputs:
        any of the row's labels).
        """
        m, k = Z.shape
        bufs = self._error_buffers.get(m)
        if bufs is None:
            if len(self._error_buffers) >= MAX_WORKSPACES:
                self._error_buffers.clear()
            bufs = self._error_buffers[m] = (np.empty(m, np.int64), np.empty(m, np.bool_),
                                             np.empty((m, k), np.bool_) if k > 1 else None)
        pred, wrong, labels = bufs
        if self.plan.loss == LOSS_SIGMOID_BCE and k > 1:  # multilabel: wrong if any label is wrong
            np.greater(Z, 0, out=labels)
            np.not_equal(labels, y, out=labels)
            labels.any(axis=1, out=wrong)
        elif self.plan.loss == LOSS_SIGMOID_BCE:
            np.greater(Z[:, 0], 0, out=wrong)
            np.not_equal(wrong, y, out=wrong)
        elif self.plan.loss in REGRESSION_LOSSES:
            raise TypeError(f"regression loss {LOSS_KERNELS[self.plan.loss]!r} has no classification error")
        else:
            Z.argmax(axis=1, out=pred)   # ndarray methods and ufuncs: no Python-level wrappers per step
            np.not_equal(pred, y, out=wrong)
        return wrong

    def count_errors(self, Z: np.ndarray, y: np.ndarray) -> int:
        """Number of misclassified rows of outputs ``Z`` against labels ``y``."""
        return int(np.count_nonzero(self.wrong_predictions(Z, y)))

    # ----------------------------------------------------- data-parallel help
    def phantom_sync_batchnorm(self, comm) -> None:
        """Take part in the synchronised-BatchNorm collectives of one step with zero rows.

        A rank whose shard of a short last batch is empty must still join the
        all-reduces of the ranks that have rows (one per BatchNorm op forward,
        one backward), or they would block.
        """
        dt = self.plan.dtype
        bn = [(j, op) for j, op in enumerate(self._ops) if op[0] == OP_BATCHNORM]
        saved = []
        for j, op in bn:
            _, gamma, beta, _, _, rmean, rvar, eps, momentum = op
            n = gamma.size
            mean, inv_std = np.empty(n, dt), np.empty(n, dt)
            empty = np.empty((0, n), dt)
            count = sync_batchnorm_forward(empty, gamma, beta, eps, momentum, rmean, rvar, mean, inv_std, empty,
                                           comm)
            saved.append((op, mean, inv_std, count, empty))
        for op, mean, inv_std, count, empty in reversed(saved):
            _, gamma, _, dgamma, dbeta, _, _, _, _ = op
            sync_batchnorm_backward(empty, gamma, mean, inv_std, count, empty, empty, dgamma, dbeta, comm)


# Synchronised BatchNorm (data-parallel training, fastdl.distributed): the statistics of the
# GLOBAL batch from one all-reduce of per-feature sums in forward and one in backward. NumPy,
# float64 sums; accepts 0-row shards (a rank with no rows still takes part in the collectives).
def sync_batchnorm_forward(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, eps: float, momentum: float,
                           running_mean: np.ndarray, running_var: np.ndarray, mean: np.ndarray,
                           inv_std: np.ndarray, out: np.ndarray, comm) -> float:
    """BatchNorm training forward with the statistics of the batch over all ranks of ``comm``.

    Writes ``mean``, ``inv_std`` and ``out``, updates the running averages
    (identically on every rank) and returns the global row count (for the
    backward pass).
    """
    n = gamma.size
    # Shifted sums (shift = running mean, identical on every rank and close to the batch mean)
    # avoid the cancellation of sum(x^2)/M - mean^2.
    shift = running_mean.astype(np.float64)
    d = x.astype(np.float64) - shift
    red = np.empty(2 * n + 1, np.float64)
    d.sum(axis=0, out=red[:n])
    np.einsum("ij,ij->j", d, d, out=red[n:2 * n])
    red[2 * n] = x.shape[0]
    comm.allreduce(red)
    count = float(red[2 * n])
    dmu = red[:n] / count
    mu = shift + dmu
    var = np.maximum(red[n:2 * n] / count - dmu * dmu, 0.0)
    inv = 1.0 / np.sqrt(var + eps)
    mean[...] = mu
    inv_std[...] = inv
    running_mean[...] = momentum * running_mean + (1 - momentum) * mu
    running_var[...] = momentum * running_var + (1 - momentum) * var
    if x.shape[0]:
        d -= dmu  # x - mu
        d *= gamma * inv
        d += beta
        out[...] = d
    return count


def sync_batchnorm_backward(x: np.ndarray, gamma: np.ndarray, mean: np.ndarray, inv_std: np.ndarray, count: float,
                            dout: np.ndarray, dx: np.ndarray, dgamma: np.ndarray, dbeta: np.ndarray, comm) -> None:
    """BatchNorm backward with the global sums of ``dout`` and ``dout * x_hat`` over ``comm``.

    ``dgamma`` / ``dbeta`` receive this rank's share only: the all-reduce of
    the whole gradient vector adds the other ranks'.
    """
    n = gamma.size
    x_hat = (x.astype(np.float64) - mean) * inv_std
    dy = dout.astype(np.float64)
    red = np.empty(2 * n, np.float64)
    dy.sum(axis=0, out=red[:n])
    np.einsum("ij,ij->j", dy, x_hat, out=red[n:])
    dbeta[...] = red[:n]
    dgamma[...] = red[n:]
    comm.allreduce(red)
    if x.shape[0]:
        x_hat *= red[n:]
        x_hat += red[:n]
        dy *= count
        dy -= x_hat
        dy *= gamma.astype(np.float64) * inv_std / count
        dx[...] = dy
