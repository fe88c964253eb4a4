# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""The Cython whole-epoch executor: one nogil C loop per epoch over fastdl.plan's encoding.

:class:`CythonEpochExecutor` reads only the plan (``plan.layout(B)``'s
``iprog`` / ``fprog``, ``dense_weights``, the loss code, ``l2`` /
``l2_scale``, the precision column) and an :class:`fastdl.plan.OptimizerSpec`;
it never sees a model, layer or optimiser object. For every mini-batch of
``perm`` it runs, without the GIL and without allocating:

gather rows -> forward (Dense + fused activation, BatchNorm (train),
activation, dropout) -> loss and dZ (softmax CE / sigmoid BCE / MSE / Poisson, optional
per-example weights) -> backward -> L2 term -> error count -> finite check ->
optimiser step (per-step c1/c2).

Each op calls the SAME compiled nogil core as the Cython backend's kernel
entry points (cimported through ``kernels/fastdl/_kernels/*.pxd``): the
per-layer path with ``backend='cython'`` and this executor run the same
machine code on the same buffers in the same order, so their results are
bit-identical; the scalars computed between kernels (``l2_over_m``, the L2
term, ``J``, the weights' sum) use the per-layer executor's expressions, in
float64, in the same order (see ``fastdl/plan.py`` and the board contract).
"""
cimport numpy as cnp
from libc.math cimport isfinite
from libc.stdint cimport int64_t, uint8_t, uint64_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy

from _kernel_common cimport data, dim, fastdl_max_threads, is_empty, is_int64, real, rtype, wtype
from fastdl._kernels._batchnorm cimport bn_backward_c, bn_forward_train_c, bn_work_size
from fastdl._kernels._dense cimport (activation_backward_c, activation_forward_c, dense_backward_bf16_c,
                                    dense_backward_c, dense_forward_bf16_c, dense_forward_c, round_bf16_c)
from fastdl._kernels._dropout cimport dropout_backward_c, dropout_forward_c, dropout_key_c
from fastdl._kernels._losses cimport bce_c, loss_buffer_size, mse_c, poisson_c, sce_c, seq_sum
from fastdl._kernels._optim cimport any_nonfinite_c, opt_step_c, opt_step_ssq_c, ssq_partials, sum_squares_c

import numpy as np

from fastdl import plan as _plan
from fastdl._kernels import _blas
from fastdl._kernels._optim import update_tasks

cnp.import_array()

# The plan's codes, read from fastdl.plan (the one encoding) at import.
cdef int OP_DENSE = _plan.OP_DENSE
cdef int OP_BATCHNORM = _plan.OP_BATCHNORM
cdef int OP_ACTIVATION = _plan.OP_ACTIVATION
cdef int OP_DROPOUT = _plan.OP_DROPOUT
cdef int LOSS_SOFTMAX_CE = _plan.LOSS_SOFTMAX_CE
cdef int LOSS_SIGMOID_BCE = _plan.LOSS_SIGMOID_BCE
cdef int LOSS_MSE = _plan.LOSS_MSE
cdef int LOSS_POISSON = _plan.LOSS_POISSON

_MASK64 = 0xFFFFFFFFFFFFFFFF


cdef struct Op:
    int kind
    int n_in
    int n_out
    int act
    int has_b
    int prec            # PRECISION_* of the Dense GEMMs
    uint64_t layer
    Py_ssize_t p0, p1, s0, out, dx, mean, inv, mask
    Py_ssize_t xr, wr, outr     # bf16: rounded input, rounded W, rounded output (the next Dense's xr); -1 = none
    double keep, eps, mom


cdef struct Run:
    # the plan at one batch size
    Op* ops
    int n_ops
    int loss
    int n_features
    int k
    Py_ssize_t B
    Py_ssize_t n_params
    Py_ssize_t dlog
    Py_ssize_t params_r     # bf16: workspace offset of round_bf16(params) (the GEMMs' W), else -1
    bint w_fused            # bf16: round_bf16(params) written in the optimiser's pass (opt_step_round)
    int64_t* dense          # (n_dense, 2) [start, stop) of every Dense W in params
    int n_dense
    double l2
    int l2_dataset
    # the optimiser
    int opt_kind
    double beta1, beta2, opt_eps
    # this epoch's arrays
    const void* X
    const void* y
    const double* w         # NULL: unweighted
    const int64_t* perm
    Py_ssize_t n_rows       # len(perm)
    Py_ssize_t n_X          # rows of X
    void* params
    void* grads
    void* state
    void* v
    void* s
    const double* c1
    const double* c2
    uint64_t step0
    uint64_t seed
    double n_total
    double* costs
    double* losses
    # executor-owned buffers
    void* ws
    uint8_t* masks
    void* xbuf
    void* ybuf
    double* wbuf
    double* rowbuf          # per-row losses / partial sums of the loss
    double* bnwork          # BatchNorm scratch
    double* ssqbuf          # sum_squares partials (one per BLOCK of every W)
    const int64_t* tasks    # the optimiser step's blocks (_optim.update_tasks), with L2
    Py_ssize_t n_tasks
    # results
    Py_ssize_t steps
    Py_ssize_t wrong
    int status


cdef inline Py_ssize_t argmax_row(const real* row, Py_ssize_t k) noexcept nogil:
    """First index of the maximum, a NaN counting as the maximum (NumPy's argmax)."""
    cdef Py_ssize_t c, best = 0
    if row[0] != row[0]:
        return 0
    for c in range(1, k):
        if row[c] > row[best]:
            best = c
        elif row[c] != row[c]:
            return c
    return best


cdef int check_indices(Run* r) noexcept nogil:
    """-1: a row index of perm outside [0, N); -2: a class label (of a row used) outside [0, k); else 0."""
    cdef Py_ssize_t i, src
    cdef const int64_t* y = <const int64_t*>r.y
    for i in range(r.n_rows):
        src = r.perm[i]
        if src < 0 or src >= r.n_X:
            return -1
        if r.loss == LOSS_SOFTMAX_CE and (y[src] < 0 or y[src] >= r.k):
            return -2
    return 0


cdef real* forward(Run* r, const real* xb, Py_ssize_t m, uint64_t step) noexcept nogil:
    """Training-mode forward of an m-row batch; returns the last op's output (the logits)."""
    cdef real* ws = <real*>r.ws
    cdef real* params = <real*>r.params
    cdef real* state = <real*>r.state
    cdef const real* x = xb
    cdef real* out = NULL
    cdef Op* op
    cdef int j
    cdef real scale
    for j in range(r.n_ops):
        op = &r.ops[j]
        out = ws + op.out
        if op.kind == OP_DENSE:
            if real is float:
                if op.prec == 1 and op.xr >= 0:   # bf16, each operand rounded once (docs/spec.md section 13)
                    if not r.w_fused:   # else the optimiser's pass wrote round_bf16(W) (run_epoch_c)
                        round_bf16_c(params + op.p0, ws + op.wr, <Py_ssize_t>op.n_in * op.n_out)
                    # the first op's input is gathered rounded (run_epoch_c); a Dense's is rounded by the Dense
                    # before it (outr), else here
                    dense_forward_bf16_c(x, ws + op.xr, j > 0 and r.ops[j - 1].outr < 0, ws + op.wr,
                                         params + op.p1 if op.has_b else NULL, op.has_b, op.act, out,
                                         ws + op.outr if op.outr >= 0 else NULL, <int>m, op.n_in, op.n_out)
                    x = out
                    continue
            dense_forward_c(x, params + op.p0, params + op.p1 if op.has_b else NULL, op.has_b, op.act, out,
                            <int>m, op.n_in, op.n_out, op.prec)
        elif op.kind == OP_BATCHNORM:
            bn_forward_train_c(x, params + op.p0, params + op.p0 + op.n_out, op.eps, op.mom, state + op.s0,
                               state + op.s0 + op.n_out, ws + op.mean, ws + op.inv, out, m, op.n_out, r.bnwork)
        elif op.kind == OP_ACTIVATION:
            activation_forward_c(x, out, m * op.n_out, op.act)
        else:  # dropout: the kernel entry point's key, threshold and scale
            if real is float:
                scale = <float>1.0 / <float>op.keep
            else:
                scale = 1.0 / op.keep
            dropout_forward_c(dropout_key_c(r.seed, step, op.layer), <uint64_t>(op.keep * 4294967296.0), x,
                              r.masks + op.mask, out, m * op.n_out, scale)
        x = out
    return out


cdef void backward(Run* r, const real* xb, Py_ssize_t m, double l2_over_m) noexcept nogil:
    cdef real* ws = <real*>r.ws
    cdef real* params = <real*>r.params
    cdef real* grads = <real*>r.grads
    cdef real* dout = ws + r.dlog
    cdef const real* x
    cdef real* dx
    cdef Op* op
    cdef int j
    cdef real scale
    for j in range(r.n_ops - 1, -1, -1):
        op = &r.ops[j]
        x = xb if j == 0 else ws + r.ops[j - 1].out
        dx = ws + op.dx if op.dx >= 0 else NULL
        if op.kind == OP_DENSE:    # dZ written in place into dout
            if real is float:
                if op.prec == 1 and op.xr >= 0:   # round_bf16(dZ) in place: both GEMMs' operand (db: unrounded)
                    dense_backward_bf16_c(ws + op.xr, params + op.p0, ws + op.wr, ws + op.out, dout, op.act,
                                          l2_over_m, dout, grads + op.p0, grads + op.p1 if op.has_b else NULL,
                                          op.has_b, dx, dx != NULL, <int>m, op.n_in, op.n_out)
                    dout = dx
                    continue
            dense_backward_c(x, params + op.p0, ws + op.out, dout, op.act, l2_over_m, dout, grads + op.p0,
                             grads + op.p1 if op.has_b else NULL, op.has_b, dx, dx != NULL,
                             <int>m, op.n_in, op.n_out, op.prec)
        elif op.kind == OP_BATCHNORM:
            bn_backward_c(x, params + op.p0, ws + op.mean, ws + op.inv, dout, dx, grads + op.p0,
                          grads + op.p0 + op.n_out, m, op.n_out, r.bnwork)
        elif op.kind == OP_ACTIVATION:
            if dx != NULL:
                activation_backward_c(ws + op.out, dout, dx, m * op.n_out, op.act)
        elif dx != NULL:
            if real is float:
                scale = <float>1.0 / <float>op.keep
            else:
                scale = 1.0 / op.keep
            dropout_backward_c(dout, r.masks + op.mask, dx, m * op.n_out, scale)
        dout = dx


cdef enum:
    OPT_ROUND_BLOCK = 1024      # params per block of the optimiser step + W rounding (L1-resident)
    OPT_ROUND_FUSED = 262144    # above: the optimiser's own (threaded) pass; each Dense rounds its W


cdef void opt_step_round(Run* r, real* params, real* grads, double c1, double c2) noexcept nogil:
    """bf16: the optimiser step block by block, each block rounded into round_bf16(params) while in L1.

    The same per-element update as one ``opt_step_c`` over all params (an elementwise kernel; the
    block boundaries change no bit, tests/test_bf16_once.py), without a second pass over W from L2.
    """
    cdef Py_ssize_t lo = 0, w, n = r.n_params
    cdef real* v = <real*>r.v
    cdef real* s = <real*>r.s
    while lo < n:
        w = n - lo if n - lo < OPT_ROUND_BLOCK else OPT_ROUND_BLOCK
        opt_step_c(r.opt_kind, params + lo, grads + lo, v + lo if v != NULL else NULL,
                   s + lo if s != NULL else NULL, w, r.beta1, r.beta2, r.opt_eps, c1, c2)
        if real is float:
            round_bf16_c(params + lo, <float*>r.ws + r.params_r + lo, w)
        lo += w


cdef void run_epoch_c(Run* r, real* typed) noexcept nogil:
    """Every mini-batch of the epoch (``typed`` only selects the float type)."""
    cdef const real* X = <const real*>r.X
    cdef real* xb = <real*>r.xbuf
    cdef real* params = <real*>r.params
    cdef real* grads = <real*>r.grads
    cdef real* logits
    cdef real* dlog = <real*>r.ws + r.dlog
    cdef const int64_t* yi = <const int64_t*>r.y
    cdef const real* yf = <const real*>r.y
    cdef int64_t* ybi = <int64_t*>r.ybuf
    cdef real* ybf = <real*>r.ybuf
    cdef Py_ssize_t nf = r.n_features, k = r.k, B = r.B
    cdef Py_ssize_t n_batches = (r.n_rows + B - 1) // B
    cdef Py_ssize_t bi, s0, m, i, c, src, wrong = 0
    cdef int max_nt = fastdl_max_threads(), d, bad
    cdef double loss, sw = 0.0, m_l2, l2_term, ss = 0.0, part, J
    cdef const double* wp = NULL
    cdef float* x0r = NULL
    if real is float:
        if r.ops[0].kind == OP_DENSE and r.ops[0].prec == 1 and r.ops[0].xr >= 0:
            x0r = <float*>r.ws + r.ops[0].xr
    if r.l2 != 0.0:
        # sum ||W||^2 of the first step; each optimiser step then returns that of the next one
        for d in range(r.n_dense):
            sum_squares_c(params + r.dense[2 * d], r.dense[2 * d + 1] - r.dense[2 * d], &part, r.ssqbuf)
            ss = ss + part
    if real is float:
        if r.w_fused:   # bf16: the first step's rounded W; each optimiser step then writes the next one's
            round_bf16_c(params, <float*>r.ws + r.params_r, r.n_params)
    for bi in range(n_batches):
        s0 = bi * B
        m = r.n_rows - s0 if r.n_rows - s0 < B else B
        for i in range(m):                      # gather the batch in perm order
            src = r.perm[s0 + i]
            if x0r != NULL:   # bf16 Dense first: only its rounded input is read (Z and dW), gathered rounded
                round_bf16_c(<const float*>X + src * nf, x0r + i * nf, nf)
            else:
                memcpy(xb + i * nf, X + src * nf, nf * sizeof(real))
            if r.loss == LOSS_SOFTMAX_CE:
                ybi[i] = yi[src]
            else:
                memcpy(ybf + i * k, yf + src * k, k * sizeof(real))
            if r.w != NULL:
                r.wbuf[i] = r.w[src]
        if r.w != NULL:
            wp = r.wbuf
            sw = seq_sum(wp, m)
        logits = forward(r, xb, m, r.step0 + <uint64_t>bi)
        if r.loss == LOSS_SOFTMAX_CE:
            loss = sce_c(logits, ybi, dlog, True, m, k, wp, sw, r.rowbuf, <real*>NULL, max_nt)
        elif r.loss == LOSS_SIGMOID_BCE:
            loss = bce_c(logits, <const real*>ybf, dlog, True, m, k, wp, sw, r.rowbuf)
        elif r.loss == LOSS_POISSON:
            loss = poisson_c(logits, <const real*>ybf, dlog, True, m, k, wp, sw, r.rowbuf)
        else:
            loss = mse_c(logits, <const real*>ybf, dlog, True, m, k, wp, sw, r.rowbuf)
        # the L2 term's m: the training-set size, the batch's summed weights, or its rows
        if r.l2_dataset and r.n_total > 0:
            m_l2 = r.n_total
        elif wp != NULL:
            m_l2 = sw
        else:
            m_l2 = <double>m
        # (all-zero weights: m_l2 = 0, no L2 gradient and no L2 term, as in the per-layer executor)
        backward(r, xb, m, r.l2 / m_l2 if (r.l2 != 0.0 and m_l2 != 0.0) else 0.0)
        l2_term = 0.0
        if r.l2 != 0.0 and m_l2 != 0.0:
            l2_term = r.l2 / (2.0 * m_l2) * ss
        J = loss + l2_term
        r.costs[bi] = J
        r.losses[bi] = loss
        if r.loss == LOSS_SOFTMAX_CE:
            for i in range(m):
                wrong += argmax_row(logits + i * k, k) != ybi[i]
        elif r.loss == LOSS_SIGMOID_BCE:
            for i in range(m):          # a row is wrong if any of its k labels is
                bad = 0
                for c in range(k):
                    bad |= (<real>(logits[i * k + c] > 0)) != ybf[i * k + c]
                wrong += bad
        if not isfinite(J) or any_nonfinite_c(grads, r.n_params):
            r.steps = bi
            r.wrong = wrong
            r.status = 1
            return
        if r.l2 != 0.0:   # the update and the next step's sum ||W||^2 in one pass over params
            opt_step_ssq_c(r.opt_kind, params, grads, <real*>r.v, <real*>r.s, r.n_params, r.beta1, r.beta2,
                           r.opt_eps, r.c1[bi], r.c2[bi], r.tasks, r.n_tasks, r.dense, r.n_dense, r.ssqbuf, &ss)
        elif r.w_fused:
            opt_step_round(r, params, grads, r.c1[bi], r.c2[bi])
        else:
            opt_step_c(r.opt_kind, params, grads, <real*>r.v, <real*>r.s, r.n_params, r.beta1, r.beta2,
                       r.opt_eps, r.c1[bi], r.c2[bi])
    r.steps = n_batches
    r.wrong = wrong
    r.status = 2 if any_nonfinite_c(params, r.n_params) else 0


# ---------------------------------------------------------------------------- Python side

cdef inline bint vec_of(object a, int t, Py_ssize_t n, bint writeable):
    return (wtype(a, 1) if writeable else rtype(a, 1)) == t and dim(a, 0) == n


cdef class CythonEpochExecutor:
    """A plan at one batch size and one optimiser kind, run one epoch per call (fastdl.plan.EpochExecutor).

    Owns the workspace, dropout masks and batch buffers (allocated here, once);
    ``run_epoch`` allocates only a few scratch buffers per EPOCH (their sizes
    depend on the thread count in force), nothing per step, and holds no GIL
    while it runs. Not re-entrant: one ``run_epoch`` at a time per executor.
    """

    cdef Op* ops
    cdef int n_ops
    cdef int64_t[:, ::1] dense_view
    cdef readonly object plan
    cdef readonly object opt_spec
    cdef readonly Py_ssize_t batch_size
    cdef readonly object dtype
    cdef object ws, masks, xbuf, ybuf, wbuf, dense, tasks
    cdef Py_ssize_t dlog_off
    cdef bint busy, has_v, has_s
    cdef int typenum, scratch_threads
    cdef Run base                   # the plan's part of the run, filled once
    cdef object bnwork, rowbuf, ssqbuf

    def __cinit__(self):
        self.ops = NULL

    def __init__(self, plan, Py_ssize_t batch_size, opt_spec):
        cdef Py_ssize_t j
        cdef Op* op
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        dt = np.dtype(plan.dtype)
        if dt != np.float32 and dt != np.float64:
            raise ValueError(f"the Cython epoch executor runs float32 or float64 plans, not {dt}")
        if plan.loss not in (LOSS_SOFTMAX_CE, LOSS_SIGMOID_BCE, LOSS_MSE, LOSS_POISSON):
            raise ValueError(f"unknown loss code {plan.loss} in the plan")
        if opt_spec.kind not in (_plan.OPT_SGD, _plan.OPT_MOMENTUM, _plan.OPT_RMSPROP, _plan.OPT_ADAM,
                                 _plan.OPT_CLASSICAL_MOMENTUM, _plan.OPT_NESTEROV):
            raise ValueError(f"unknown optimiser kind {opt_spec.kind}")
        lay = plan.layout(batch_size)
        # bf16 Dense ops whose GEMMs go to a packing kernel (MKL, fastdl's AVX512-BF16) take the per-GEMM
        # rounding path: rounded copies would be extra work there (fastdl.plan.route_bf16; the same bits)
        iprog, fprog = _plan.route_bf16(lay.iprog, batch_size, _blas.bf16_gemm_packs), lay.fprog
        precs = {int(p) for p, kind in zip(iprog[:, _plan.I_PREC], iprog[:, _plan.I_KIND]) if kind == OP_DENSE}
        if not precs <= {_plan.PRECISION_FP32, _plan.PRECISION_BF16}:
            raise ValueError(f"unknown precision code(s) {sorted(precs)} in the plan")
        if _plan.PRECISION_BF16 in precs and dt != np.float32:
            raise ValueError("precision='bf16' (bfloat16 GEMMs) needs a float32 plan")
        self.plan = plan
        self.opt_spec = opt_spec
        self.batch_size = batch_size
        self.dtype = dt
        self.n_ops = iprog.shape[0]
        if self.n_ops == 0:
            raise ValueError("the plan has no ops")
        self.ops = <Op*>malloc(self.n_ops * sizeof(Op))
        if self.ops == NULL:
            raise MemoryError()
        for j in range(self.n_ops):
            row, frow = iprog[j], fprog[j]
            op = &self.ops[j]
            op.kind = int(row[_plan.I_KIND])
            if op.kind not in (OP_DENSE, OP_BATCHNORM, OP_ACTIVATION, OP_DROPOUT):
                raise ValueError(f"op {j}: unknown kind {op.kind}")
            op.n_in = int(row[_plan.I_NIN])
            op.n_out = int(row[_plan.I_NOUT])
            op.act = int(row[_plan.I_ACT])
            op.prec = int(row[_plan.I_PREC]) if op.kind == OP_DENSE else 0
            op.p0 = int(row[_plan.I_P0])
            op.p1 = int(row[_plan.I_P1])
            op.has_b = op.p1 >= 0
            op.s0 = int(row[_plan.I_S0])
            op.out = int(row[_plan.I_OUT])
            op.dx = int(row[_plan.I_DX])
            op.mean = int(row[_plan.I_MEAN])
            op.inv = int(row[_plan.I_INV])
            op.mask = int(row[_plan.I_MASK])
            op.xr = int(row[_plan.I_XR])
            op.wr = int(row[_plan.I_WR])
            op.outr = int(row[_plan.I_OUTR])
            op.layer = <uint64_t>(int(row[_plan.I_LAYER]) & _MASK64)
            op.keep = float(frow[_plan.F_KEEP])
            op.eps = float(frow[_plan.F_EPS])
            op.mom = float(frow[_plan.F_MOMENTUM])
            if op.kind == OP_BATCHNORM and op.dx < 0:
                raise ValueError(f"op {j}: a BatchNorm op needs a dX buffer in the layout")
            if op.kind in (OP_ACTIVATION, OP_DENSE) and not 0 <= op.act <= 3:
                raise ValueError(f"op {j}: unknown activation code {op.act}")
            if op.kind == OP_DROPOUT and not 0.0 < op.keep <= 1.0:
                raise ValueError(f"op {j}: keep_prob must be in (0, 1], got {op.keep}")
        self.ws = np.zeros(lay.ws_size, dt)
        self.masks = np.zeros(max(lay.mask_size, 1), np.uint8)
        self.xbuf = np.zeros(batch_size * plan.n_features, dt)
        self.ybuf = (np.zeros(batch_size, np.int64) if plan.loss == LOSS_SOFTMAX_CE
                     else np.zeros(batch_size * plan.n_outputs, dt))
        self.wbuf = np.zeros(batch_size, np.float64)
        self.dlog_off = plan.dlogits_offset(batch_size)
        self.dense = np.ascontiguousarray(plan.dense_weights, np.int64).reshape(-1, 2)
        self.tasks = update_tasks(plan.n_params, self.dense)
        self.typenum = cnp.NPY_FLOAT if dt == np.float32 else cnp.NPY_DOUBLE
        names = opt_spec.state_names
        self.has_v = "v" in names
        self.has_s = "s" in names
        sizes = [ssq_partials(b - a) for a, b in self.dense.tolist()]
        self.rowbuf = np.empty(loss_buffer_size(batch_size, plan.n_outputs), np.float64)
        self.ssqbuf = np.empty(max(1, sum(sizes)), np.float64)    # >= every single W's partials too
        hyper = opt_spec.hyper
        r = &self.base
        r.ops = self.ops
        r.n_ops = self.n_ops
        r.loss = plan.loss
        r.n_features = plan.n_features
        r.k = plan.n_outputs
        r.B = batch_size
        r.n_params = plan.n_params
        r.dlog = self.dlog_off
        r.params_r = lay.params_r
        # round_bf16(params) in the optimiser's pass (block by block): small models without L2 that have a
        # Dense on the rounded-operand path; else each such Dense rounds its W in the forward
        r.w_fused = (lay.params_r >= 0 and plan.l2 == 0.0 and plan.n_params <= OPT_ROUND_FUSED
                     and bool((iprog[:, _plan.I_XR] >= 0).any()))
        r.dense = <int64_t*>data(self.dense)
        r.n_dense = self.dense.shape[0]
        r.l2 = float(plan.l2)
        r.l2_dataset = plan.l2_scale == _plan.L2_DATASET
        r.opt_kind = opt_spec.kind
        r.beta1 = float(hyper[_plan.H_BETA1])
        r.beta2 = float(hyper[_plan.H_BETA2])
        r.opt_eps = float(hyper[_plan.H_EPS])
        r.ws = data(self.ws)
        r.masks = <uint8_t*>data(self.masks)
        r.xbuf = data(self.xbuf)
        r.ybuf = data(self.ybuf)
        r.wbuf = <double*>data(self.wbuf)
        r.rowbuf = <double*>data(self.rowbuf)
        r.ssqbuf = <double*>data(self.ssqbuf)
        r.tasks = <const int64_t*>data(self.tasks)
        r.n_tasks = self.tasks.shape[0]
        self.bnwork = None
        self._scratch()

    def __dealloc__(self):
        free(self.ops)

    def compile(self) -> None:
        """Nothing to do: the executor is compiled ahead of time (the Numba one JIT-compiles here)."""
        return None

    cdef void _scratch(self):
        """(Re)size the scratch whose size depends on the thread count in force (BatchNorm)."""
        cdef Py_ssize_t j, need = 1
        cdef int nt = fastdl_max_threads()
        if self.bnwork is not None and nt <= self.scratch_threads:
            return
        for j in range(self.n_ops):
            if self.ops[j].kind == OP_BATCHNORM:
                need = max(need, bn_work_size(self.ops[j].n_out))
        self.bnwork = np.empty(need, np.float64)
        self.scratch_threads = nt
        self.base.bnwork = <double*>data(self.bnwork)

    def run_epoch(self, X, y, w, perm, params, grads, state, v, s, c1, c2, step0, seed, n_total, costs, losses):
        """Train every mini-batch of one epoch in ``perm`` order (see fastdl.plan.EpochExecutor.run_epoch).

        Returns ``(steps_done, wrong_predictions, status)``. The arguments are checked (dtypes, shapes,
        row indices, class labels) before any step runs: a ValueError leaves everything untouched.
        """
        cdef Run r
        cdef int t = self.typenum, rc = 0
        cdef Py_ssize_t N, n_rows, n_batches, B = self.batch_size, k = self.base.k, P = self.base.n_params
        cdef bint weighted, has_v = self.has_v, has_s = self.has_s
        # ---- arguments (C-level checks: this runs once per step in fit's augmentation mode)
        if rtype(X, 2) != t or dim(X, 1) != self.base.n_features:
            raise ValueError(f"X must be a C-contiguous {self.dtype} array of shape (N, {self.base.n_features})")
        N = dim(X, 0)
        if self.base.loss == LOSS_SOFTMAX_CE:
            if not (is_int64(y) and dim(y, 0) == N):
                raise ValueError(f"y must be a C-contiguous int64 array of shape ({N},) (class ids)")
        elif not ((rtype(y, 2) == t and dim(y, 0) == N and dim(y, 1) == k)
                  or (k == 1 and rtype(y, 1) == t and dim(y, 0) == N)):
            raise ValueError(f"y must be a C-contiguous {self.dtype} array of shape ({N}, {k})"
                             + (f" or ({N},)" if k == 1 else ""))
        weighted = not is_empty(w)
        if weighted and not vec_of(w, cnp.NPY_DOUBLE, N, False):
            raise ValueError(f"w must be a C-contiguous float64 array of shape ({N},), or empty (unweighted)")
        if not is_int64(perm):
            raise ValueError("perm must be a C-contiguous int64 array")
        n_rows = dim(perm, 0)
        n_batches = (n_rows + B - 1) // B
        if not (vec_of(params, t, P, True) and vec_of(grads, t, P, True)):
            raise ValueError(f"params and grads must be writeable C-contiguous {self.dtype} arrays of shape ({P},)")
        if not vec_of(state, t, self.plan.n_state, True):
            raise ValueError(f"state must be a writeable C-contiguous {self.dtype} array of shape "
                             f"({self.plan.n_state},)")
        if has_v and not vec_of(v, t, P, True):
            raise ValueError(f"optimiser state v must be a writeable C-contiguous {self.dtype} array of shape ({P},)")
        if has_s and not vec_of(s, t, P, True):
            raise ValueError(f"optimiser state s must be a writeable C-contiguous {self.dtype} array of shape ({P},)")
        if not (rtype(c1, 1) == cnp.NPY_DOUBLE and dim(c1, 0) >= n_batches and rtype(c2, 1) == cnp.NPY_DOUBLE
                and dim(c2, 0) >= n_batches):
            raise ValueError(f"c1 and c2 must be C-contiguous float64 arrays of at least {n_batches} elements")
        if not (wtype(costs, 1) == cnp.NPY_DOUBLE and dim(costs, 0) >= n_batches
                and wtype(losses, 1) == cnp.NPY_DOUBLE and dim(losses, 0) >= n_batches):
            raise ValueError(f"costs and losses must be writeable C-contiguous float64 arrays of at least "
                             f"{n_batches} elements")
        if step0 < 0:
            raise ValueError(f"step0 must be >= 0, got {step0}")
        if self.busy:   # the buffers are this object's: a second thread must use its own executor
            raise RuntimeError("this epoch executor is already running an epoch (in another thread); "
                               "create one executor per thread")
        self._scratch()
        # ---- the run
        r = self.base
        r.X = data(X)
        r.y = data(y)
        r.w = <const double*>data(w) if weighted else NULL
        r.perm = <const int64_t*>data(perm)
        r.n_rows = n_rows
        r.n_X = N
        r.params = data(params)
        r.grads = data(grads)
        r.state = data(state)
        r.v = data(v) if has_v else NULL
        r.s = data(s) if has_s else NULL
        r.c1 = <const double*>data(c1)
        r.c2 = <const double*>data(c2)
        r.step0 = <uint64_t>(int(step0) & _MASK64)
        r.seed = <uint64_t>(int(seed) & _MASK64)
        r.n_total = float(n_total) if n_total else 0.0
        r.costs = <double*>data(costs)
        r.losses = <double*>data(losses)
        r.steps = r.wrong = 0
        r.status = 0
        self.busy = True
        try:
            with nogil:
                rc = check_indices(&r)
                if rc == 0:
                    if t == cnp.NPY_FLOAT:
                        run_epoch_c(&r, <float*>NULL)
                    else:
                        run_epoch_c(&r, <double*>NULL)
        finally:
            self.busy = False
        if rc == -1:
            raise ValueError(f"perm indexes rows outside [0, {N})")
        if rc == -2:
            raise ValueError(f"class labels must be in [0, {k})")
        return int(r.steps), int(r.wrong), int(r.status)


def epoch_executor(plan, batch_size: int, opt_spec) -> CythonEpochExecutor:
    """The Cython whole-epoch executor of ``plan`` at ``batch_size`` for ``opt_spec``'s optimiser kind."""
    return CythonEpochExecutor(plan, batch_size, opt_spec)
