"""The execution plan: a model compiled, in ONE place, to what every executor runs.

``compile_plan(model)`` is the only code in fastdl that knows the op order
(an activation right after a Dense is fused into it), where each array lives
in the flat ``params`` / ``grads`` / ``state`` vectors, which weights carry
the L2 term, how errors are counted (the loss kind) and the numeric
precision of the GEMMs. ``plan.layout(batch_size)`` adds the offsets of
every work buffer in ONE flat workspace and encodes the plan as the integer
and float tables that compiled executors read (``iprog``, ``fprog``).

``OptimizerSpec`` is the optimiser as data (kind + hyperparameters) and
:func:`step_coefficients` computes each step's scalars once, for the
caller of the optimiser kernel (Thinc's ``Ops.adam`` convention), in the
form that keeps the ε placement of ``docs/spec.md``:

    Adam:     c1 = lr / (1 - beta1**t),  c2 = 1 / (1 - beta2**t)
              v = b1 v + (1-b1) g;  s = b2 s + (1-b2) g^2;  p -= c1 v / (sqrt(c2 s) + eps)
    Momentum: c1 = lr / (1 - beta**t) with bias correction, else lr
              v = b v + (1-b) g;  p -= c1 v
    RMSprop, SGD: c1 = lr
    Nesterov / classical momentum (scikit-learn's rule): c1 = lr
              v = mu v - c1 g;  p += mu v - c1 g (nesterov) or p += v (classical)

``t`` counts updates from 1; ``beta**t`` is Python's float power (the same
bits on every executor).

Executors (see ``docs/design.md``):
* the per-layer executor (:mod:`fastdl.executors.per_layer`) runs the plan
  op by op through the kernel contract (every backend, reference included);
* epoch executors run a whole epoch in one compiled call over ``iprog`` /
  ``fprog``: Numba (:mod:`fastdl.backends.numba.epoch`) and Cython
  (``fastdl._kernels._epoch``). Both implement :class:`EpochExecutor`.

Slots for what is added on top of the plan: ``precision`` per Dense op and
per plan (``PRECISION_FP32`` / ``PRECISION_BF16``), per-example weights
(``w`` passed to ``run_epoch``; empty = unweighted, see :func:`weighted_mean_rule`),
optimiser variants (``OPT_*`` kinds), stateful callbacks (``fastdl.callbacks``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

if TYPE_CHECKING:  # plan.py is the only module besides the model that reads layers
    from .model import Sequential
    from .optim import Optimizer

# ---------------------------------------------------------------- op kinds
OP_DENSE, OP_BATCHNORM, OP_ACTIVATION, OP_DROPOUT = 1, 2, 3, 4

# integer columns of iprog (one row per op); -1 = absent
I_KIND = 0      # OP_*
I_NIN = 1       # input width
I_NOUT = 2      # output width
I_ACT = 3       # activation code (contract.IDENTITY..SIGMOID) of a Dense (fused) or activation op
I_P0 = 4        # params offset: Dense W (n_in x n_out, row-major) / BatchNorm gamma (beta follows at +n)
I_P1 = 5        # params offset: Dense b, or -1 without bias
I_S0 = 6        # state offset: BatchNorm running_mean (running_var follows at +n)
I_OUT = 7       # workspace offset of the op's output (batch_size x n_out)
I_DX = 8        # workspace offset of dX (batch_size x n_in), -1 when not needed
I_MEAN = 9      # workspace offset of BatchNorm batch mean (n_out)
I_INV = 10      # workspace offset of BatchNorm inv_std (n_out)
I_MASK = 11     # mask-buffer offset of a Dropout op (uint8, batch_size x n_out)
I_LAYER = 12    # index of the layer in model.layers (the dropout key's `layer`)
I_PREC = 13     # PRECISION_* of a Dense op's three GEMMs
# bf16 Dense ops (docs/spec.md section 13: each GEMM operand rounded to bfloat16 ONCE per step), else -1:
I_XR = 14       # workspace offset of round_bf16(input) (batch_size x n_in): the operand of Z = XW and dW
I_WR = 15       # workspace offset of round_bf16(W) (n_in x n_out): Layout.params_r + the W's params offset
I_OUTR = 16     # a Dense op followed by a bf16 Dense: where its activation pass writes round_bf16(output)
                # (= the next op's I_XR; that op then does not round its input itself)
N_ICOLS = 17

# float columns of fprog
F_KEEP = 0      # Dropout keep_prob
F_EPS = 1       # BatchNorm eps
F_MOMENTUM = 2  # BatchNorm momentum (running = momentum*running + (1-momentum)*batch)
N_FCOLS = 3

# ---------------------------------------------------------------- losses
LOSS_SOFTMAX_CE, LOSS_SIGMOID_BCE, LOSS_MSE, LOSS_POISSON = 0, 1, 2, 3
LOSS_CODES = {"softmax_cross_entropy": LOSS_SOFTMAX_CE, "binary_cross_entropy": LOSS_SIGMOID_BCE,
              "mse": LOSS_MSE, "poisson": LOSS_POISSON}
#: regression losses (no classification error); targets (m, k) floats of the model's dtype
REGRESSION_LOSSES = (LOSS_MSE, LOSS_POISSON)

# ---------------------------------------------------------------- precision
PRECISION_FP32, PRECISION_BF16 = 0, 1
PRECISION_CODES = {"fp32": PRECISION_FP32, "bf16": PRECISION_BF16}

# ---------------------------------------------------------------- optimisers
OPT_SGD, OPT_MOMENTUM, OPT_RMSPROP, OPT_ADAM, OPT_CLASSICAL_MOMENTUM, OPT_NESTEROV = 0, 1, 2, 3, 4, 5
# hyper array (float64, N_H): what the kernels need besides the per-step coefficients
H_BETA1 = 0     # Adam beta1 / Momentum beta / classical & Nesterov momentum mu
H_BETA2 = 1     # Adam / RMSprop beta2
H_EPS = 2       # Adam / RMSprop eps
N_H = 3

# l2 scale codes
L2_BATCH, L2_DATASET = 0, 1

#: the loss kernel of the contract that each LOSS_* code runs
LOSS_KERNELS = {LOSS_SOFTMAX_CE: "softmax_cross_entropy", LOSS_SIGMOID_BCE: "sigmoid_bce", LOSS_MSE: "mse",
                LOSS_POISSON: "poisson"}
MAX_CACHED_LAYOUTS = 16


@dataclass(frozen=True)
class OpSpec:
    """One op of the plan (backend independent)."""

    kind: int
    n_in: int
    n_out: int
    layer: int                 # index in model.layers
    act: int = 0
    p0: int = -1               # see I_P0
    p1: int = -1               # see I_P1
    s0: int = -1               # see I_S0
    keep_prob: float = 1.0
    eps: float = 0.0
    momentum: float = 0.0
    precision: int = PRECISION_FP32


@dataclass(frozen=True)
class OptimizerSpec:
    """An optimiser as data: its kind and hyperparameters (no state, no step count)."""

    kind: int
    hyper: tuple[float, float, float] = (0.0, 0.0, 0.0)   # H_BETA1, H_BETA2, H_EPS
    bias_correction: bool = False                         # Momentum only

    def hyper_array(self) -> np.ndarray:
        return np.array(self.hyper, np.float64)

    @property
    def state_names(self) -> tuple[str, ...]:
        """Which state arrays the kernel updates (each params-sized)."""
        return {OPT_SGD: (), OPT_MOMENTUM: ("v",), OPT_RMSPROP: ("s",), OPT_ADAM: ("v", "s"),
                OPT_CLASSICAL_MOMENTUM: ("v",), OPT_NESTEROV: ("v",)}[self.kind]


def _one_minus_pow(beta: float, t0: int, n: int) -> np.ndarray:
    # Python's float ** int for every step: np.power may differ in the last bit
    return np.array([1.0 - beta ** t for t in range(t0 + 1, t0 + n + 1)])


def step_coefficients(spec: OptimizerSpec, lrs: np.ndarray, t0: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-step scalars ``(c1, c2)`` for steps ``t0+1 .. t0+len(lrs)`` (see the module docstring).

    The ONE place that turns a learning rate and a step count into what the
    optimiser kernels take: the epoch executors call it with a whole epoch,
    ``Optimizer.step`` with one step through :func:`step_scalars` (the same
    formulas on Python floats: the same bits, without array overhead per step).
    """
    lrs = np.asarray(lrs, np.float64)
    n = lrs.size
    c2 = np.zeros(n)
    if spec.kind == OPT_ADAM:
        c1 = lrs / _one_minus_pow(spec.hyper[H_BETA1], t0, n)
        c2 = 1.0 / _one_minus_pow(spec.hyper[H_BETA2], t0, n)
    elif spec.kind == OPT_MOMENTUM and spec.bias_correction:
        c1 = lrs / _one_minus_pow(spec.hyper[H_BETA1], t0, n)
    else:
        c1 = lrs.copy()
    return c1, c2


def step_scalars(spec: OptimizerSpec, lr: float, t: int) -> tuple[float, float]:
    """``(c1, c2)`` of the single step ``t`` (counted from 1): :func:`step_coefficients` for one step.

    Python float arithmetic is IEEE double arithmetic, so each value has the
    same bits as the corresponding entry of ``step_coefficients(spec, [lr], t - 1)``
    (``tests/test_plan.py`` checks it).
    """
    lr = float(lr)
    if spec.kind == OPT_ADAM:
        return lr / (1.0 - spec.hyper[H_BETA1] ** t), 1.0 / (1.0 - spec.hyper[H_BETA2] ** t)
    if spec.kind == OPT_MOMENTUM and spec.bias_correction:
        return lr / (1.0 - spec.hyper[H_BETA1] ** t), 0.0
    return lr, 0.0


@dataclass(frozen=True)
class Layout:
    """The plan at one batch size: encoded tables and buffer sizes."""

    batch_size: int
    iprog: np.ndarray          # (n_ops, N_ICOLS) int64
    fprog: np.ndarray          # (n_ops, N_FCOLS) float64
    ws_size: int               # elements of the one float workspace (model dtype)
    mask_size: int             # bytes of the uint8 dropout-mask buffer
    params_r: int = -1         # bf16 plans: workspace offset of round_bf16(params) (n_params), else -1


@dataclass(frozen=True)
class Plan:
    """A model compiled for execution. Immutable; rebuilt when the model changes."""

    ops: tuple[OpSpec, ...]
    n_features: int
    n_outputs: int
    n_params: int
    n_state: int
    dtype: np.dtype
    loss: int                          # LOSS_*
    l2: float                          # lambda
    l2_scale: int                      # L2_BATCH / L2_DATASET
    dense_weights: np.ndarray          # (k, 2) int64 [start, stop) of every Dense W in params (the L2 term)
    precision: int = PRECISION_FP32
    _layouts: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def classifier(self) -> bool:
        return self.loss not in REGRESSION_LOSSES

    def l2_m(self, batch_rows: float, n_total: int) -> float:
        """The ``m`` of ``lambda/(2m)``: the batch's rows (or summed weights), or the training-set size."""
        return float(n_total) if self.l2_scale == L2_DATASET else float(batch_rows)

    def layout(self, batch_size: int) -> Layout:
        """Workspace offsets for batches of up to ``batch_size`` rows (cached)."""
        lay = self._layouts.get(batch_size)
        if lay is not None:
            return lay
        B = int(batch_size)
        ops = self.ops
        iprog = np.full((len(ops), N_ICOLS), -1, np.int64)
        fprog = np.zeros((len(ops), N_FCOLS), np.float64)
        ws = mask = 0
        for j, op in enumerate(ops):
            row = iprog[j]
            row[I_KIND], row[I_NIN], row[I_NOUT], row[I_LAYER] = op.kind, op.n_in, op.n_out, op.layer
            row[I_ACT], row[I_P0], row[I_P1], row[I_S0], row[I_PREC] = op.act, op.p0, op.p1, op.s0, op.precision
            fprog[j, F_KEEP], fprog[j, F_EPS], fprog[j, F_MOMENTUM] = op.keep_prob, op.eps, op.momentum
            if op.kind == OP_BATCHNORM:
                row[I_MEAN], row[I_INV] = ws, ws + op.n_out
                ws += 2 * op.n_out
            if op.kind == OP_DROPOUT:
                row[I_MASK] = mask
                mask += B * op.n_out
            row[I_OUT] = ws
            ws += B * op.n_out
            # A BatchNorm first op gets a dX too: its dZ is not needed, but written in place into
            # dout it would take the kernels' slow aliased path.
            if j > 0 or op.kind == OP_BATCHNORM:
                row[I_DX] = ws
                ws += B * op.n_in
        # bf16: the rounded operands (fp32 plans: none, their layout is unchanged). dZ is rounded in place.
        # round_bf16(params) is one params-sized region (the epoch executors write it in the optimiser's pass);
        # a Dense op's rounded W is the view at its W's offset.
        pr = -1
        if any(op.kind == OP_DENSE and op.precision == PRECISION_BF16 for op in ops):
            pr, ws = ws, ws + self.n_params
        for j, op in enumerate(ops):
            if op.kind == OP_DENSE and op.precision == PRECISION_BF16:
                iprog[j, I_XR], iprog[j, I_WR] = ws, pr + op.p0
                ws += B * op.n_in
                if j > 0 and ops[j - 1].kind == OP_DENSE:
                    iprog[j - 1, I_OUTR] = iprog[j, I_XR]
        # the loss gradient (B x n_outputs) lives at the end of the workspace
        lay = Layout(B, iprog, fprog, ws + B * self.n_outputs, mask, pr)
        if len(self._layouts) >= MAX_CACHED_LAYOUTS:  # inference on many input sizes must not grow memory
            self._layouts.clear()
        self._layouts[batch_size] = lay
        return lay

    def dlogits_offset(self, batch_size: int) -> int:
        """Workspace offset of the loss gradient ``dZ`` of the last op."""
        return self.layout(batch_size).ws_size - int(batch_size) * self.n_outputs

    def describe(self) -> list[dict[str, Any]]:
        """The ops as plain dicts (for ``docs``, debugging and tests)."""
        return [dict(op.__dict__) for op in self.ops]


def route_bf16(iprog: np.ndarray, batch_size: int, packs) -> np.ndarray:
    """``iprog`` for an executor: bf16 Dense ops whose GEMMs take a kernel that packs (and rounds) its
    operands itself lose their rounded-operand columns (``I_XR = I_WR = -1``, the Dense before them
    ``I_OUTR = -1``) and run the per-GEMM rounding path instead; the others keep them.

    ``packs(M, N, K)``: whether a bf16 product of that shape goes to such a kernel (the three GEMMs of a
    Dense op have the same ``M * N * K``). Only speed depends on this: both paths compute the same bits
    (docs/spec.md section 13), so a route changed later needs no new table.
    """
    out = iprog.copy()
    for j in range(out.shape[0]):
        if out[j, I_XR] >= 0 and packs(int(batch_size), int(out[j, I_NOUT]), int(out[j, I_NIN])):
            out[j, I_XR] = out[j, I_WR] = -1
            if j > 0:
                out[j - 1, I_OUTR] = -1
    return out


def _flat_offsets(layers, specs: str) -> tuple[dict[tuple[int, str], int], int]:
    """Offsets of every ``(layer index, array name)`` in one flat vector, in model order, and its size."""
    offsets: dict[tuple[int, str], int] = {}
    off = 0
    for li, layer in enumerate(layers):
        for name, shape in getattr(layer, specs)():
            offsets[(li, name)] = off
            off += int(np.prod(shape))
    return offsets, off


def compile_plan(model: "Sequential") -> Plan:
    """Compile ``model`` into its :class:`Plan` (the one place that derives the op order).

    Fusion rule: an activation layer directly after a Dense layer becomes that
    Dense op's ``act``. A Dropout with ``keep_prob == 1`` is the identity and
    emits no op.
    """
    from .layers import Activation, BatchNorm, Dense, Dropout

    p_off, n_params = _flat_offsets(model.layers, "param_specs")
    s_off, n_state = _flat_offsets(model.layers, "state_specs")
    precision = PRECISION_CODES[getattr(model, "precision", "fp32")]

    ops: list[OpSpec] = []
    dim = model.n_features
    for li, layer in enumerate(model.layers):
        n_in = dim
        n_out = layer.output_dim(dim)
        dim = n_out
        if isinstance(layer, Dense):
            ops.append(OpSpec(OP_DENSE, n_in, n_out, li, p0=p_off[(li, "W")], p1=p_off.get((li, "b"), -1),
                              precision=precision))
        elif isinstance(layer, BatchNorm):
            ops.append(OpSpec(OP_BATCHNORM, n_in, n_out, li, p0=p_off[(li, "gamma")],
                              s0=s_off[(li, "running_mean")], eps=float(layer.eps),
                              momentum=float(layer.momentum)))
        elif isinstance(layer, Activation):
            prev = ops[-1] if ops else None
            if prev is not None and prev.kind == OP_DENSE and prev.act == 0 and prev.layer == li - 1:
                ops[-1] = OpSpec(**{**prev.__dict__, "act": layer.code})
            else:
                ops.append(OpSpec(OP_ACTIVATION, n_in, n_out, li, act=layer.code))
        elif isinstance(layer, Dropout):
            if layer.keep_prob < 1.0:
                ops.append(OpSpec(OP_DROPOUT, n_in, n_out, li, keep_prob=float(layer.keep_prob)))
        else:  # pragma: no cover - Sequential accepts fastdl layers only
            raise TypeError(f"layer {type(layer).__name__} has no op in the execution plan")
    dense = [(p_off[(li, "W")], p_off[(li, "W")] + layer.n_in * layer.n_out)
             for li, layer in enumerate(model.layers) if isinstance(layer, Dense)]
    return Plan(ops=tuple(ops), n_features=model.n_features, n_outputs=model.n_outputs, n_params=n_params,
                n_state=n_state, dtype=np.dtype(model.dtype), loss=LOSS_CODES[model.loss.name],
                l2=float(model.l2), l2_scale=L2_DATASET if model.l2_scale == "dataset" else L2_BATCH,
                dense_weights=np.array(dense, np.int64).reshape(-1, 2), precision=precision)


class EpochExecutor(Protocol):
    """What a whole-epoch executor offers (Numba and Cython implement it).

    Built once per ``(plan, batch_size, optimiser kind)`` by the backend:
    ``backend.epoch_executor(plan, batch_size, opt_spec)``; it owns the
    workspace, mask and batch buffers and allocates nothing per step.
    """

    def run_epoch(self, X: np.ndarray, y: np.ndarray, w: np.ndarray, perm: np.ndarray,
                  params: np.ndarray, grads: np.ndarray, state: np.ndarray, v: np.ndarray, s: np.ndarray,
                  c1: np.ndarray, c2: np.ndarray, step0: int, seed: int, n_total: int,
                  costs: np.ndarray, losses: np.ndarray) -> tuple[int, int, int]:
        """Train every mini-batch of one epoch in ``perm`` order.

        ``X`` (N, n_features) and ``y`` (int64 class ids (N,) / float (N,) 0-1 / float (N, k)) are
        validated, C-contiguous arrays of the plan's dtype (y: int64 for softmax). ``w``: per-example
        weights (N,) float64, or an empty array (unweighted). ``v``/``s``: optimiser state (empty when
        the kind has none). ``c1``/``c2``: per-step coefficients (:func:`step_coefficients`).
        ``step0``: the global step count before the epoch (dropout key); ``n_total``: N for
        ``l2_scale='dataset'``. Writes each step's cost ``J`` and mean data loss into ``costs`` /
        ``losses``. Returns ``(steps_done, wrong_predictions, status)``: status 0 fine; 1 the cost or
        gradients of step ``steps_done`` were not finite (the optimiser was NOT applied for it);
        2 the parameters after the update of step ``steps_done - 1`` were not finite.
        """
        ...


def weighted_mean_rule() -> str:
    """The per-example weight convention (scikit-learn's), for docs and error messages."""
    return ("with weights w: loss = sum(w_i L_i) / sum(w), dZ_i = w_i (...) / sum(w), and the L2 term's "
            "m is sum(w) of the batch (l2_scale='batch'); unweighted is w_i = 1")
