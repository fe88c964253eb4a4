"""Epoch runners: one per execution mode, each returning the same :class:`EpochResult`.

* :class:`PerLayerRunner` - the readable path: per mini-batch, the model's
  forward/backward through the kernel contract, then ONE optimiser kernel.
  Every backend (the reference one included) runs it.
* :class:`FusedRunner` - a whole epoch in ONE compiled call of the backend's
  epoch executor (``backend.epoch_executor(plan, batch_size, opt_spec)``:
  Numba and Cython; see :class:`fastdl.plan.EpochExecutor`).
* :class:`AugmentRunner` - a Python ``augment`` callable needs the batch in
  Python: per step, the augmented batch goes through ONE compiled call of the
  epoch executor (forward + loss + backward + update, ``perm = arange``).
* :class:`DataParallelRunner` - MPI: compiled forward + backward on this
  rank's shard, the all-reduce in Python, a compiled update.

Every runner computes the step's learning rate with the schedule and the
optimiser's per-step scalars with :func:`fastdl.plan.step_coefficients`
(through the optimiser or directly), advances ``optimizer.t`` and
``model.step_count``, and never returns non-finite parameters or statistics:
on divergence it restores the epoch-start snapshot (parameters, BatchNorm
statistics, optimiser state and step count together) and raises
:class:`TrainingDiverged`.
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from ..plan import OptimizerSpec, step_coefficients
from .history import TrainingDiverged

if TYPE_CHECKING:
    from ..model import Sequential
    from ..optim import Optimizer
    from ..schedules import Schedule

#: on_batch(batch index of the last batch done, costs of the batches since the previous call)
OnBatch = Callable[[int, np.ndarray], None]


@dataclass
class EpochResult:
    """One epoch as every runner reports it."""

    costs: np.ndarray   # J of every mini-batch (float64; distributed: of the global batch)
    sum_loss: float     # sum over batches of mean data loss x batch weight (rows or summed sample weights)
    sum_cost: float     # the same for J
    n_wrong: int        # misclassified training rows (classifiers)
    lr: float           # learning rate of the epoch's last update


@dataclass
class Setup:
    """What every runner needs, validated once by :func:`fit`."""

    model: "Sequential"
    optimizer: "Optimizer"
    schedule: "Schedule"
    X: np.ndarray
    y: np.ndarray
    w: np.ndarray | None          # per-example weights (scikit-learn's rule) or None
    batch_size: int
    epochs: int
    augment: Any = None
    dp: Any = None                # fastdl.distributed.DataParallel or None

    @property
    def m(self) -> int:
        return self.X.shape[0]


def batch_spans(m: int, batch_size: int) -> list[tuple[int, int]]:
    """``(start, stop)`` into the epoch permutation of every mini-batch; the last may be shorter."""
    return [(s, min(s + batch_size, m)) for s in range(0, m, batch_size)]


def optimizer_spec(optimizer: "Optimizer") -> OptimizerSpec:
    """``optimizer.spec()``: the optimiser as data, for the epoch executors."""
    return optimizer.spec()


class _Snapshot:
    """Parameters, BatchNorm statistics, optimiser state and step count at one moment (epoch start)."""

    def __init__(self, model: "Sequential", optimizer: "Optimizer"):
        self.model, self.optimizer = model, optimizer
        self.params, self.state = model.params.copy(), model.state.copy()
        self.opt_state = {k: v.copy() for k, v in optimizer.state.items()}
        self.t, self.step_count = optimizer.t, model.step_count

    def restore(self) -> None:
        m, o = self.model, self.optimizer
        m.params[...], m.state[...] = self.params, self.state
        for k in list(o.state):
            if k not in self.opt_state:
                del o.state[k]
        for k, v in self.opt_state.items():
            if k in o.state and o.state[k].shape == v.shape:
                o.state[k][...] = v  # in place: executors may hold these arrays
            else:
                o.state[k] = v.copy()
        o.t, m.step_count = self.t, self.step_count


def _all_finite(K, a: np.ndarray) -> bool:
    return a.size == 0 or bool(K.all_finite(a))


class Runner:
    """Base class: trains one epoch at a time (see the module docstring)."""

    #: short name, for messages and tests ('per-layer', 'fused', 'augment', 'data-parallel')
    mode = "?"

    def __init__(self, setup: Setup):
        self.s = setup
        self.spans = batch_spans(setup.m, setup.batch_size)
        self.row_counts = np.array([float(e - s) for s, e in self.spans])

    def compile(self, verbose: int = 0) -> float:
        """One-time compilation before the timed loop; returns the seconds it took."""
        return 0.0

    def run_epoch(self, epoch: int, perm: np.ndarray, on_batch: OnBatch | None) -> EpochResult:
        raise NotImplementedError

    def evaluate(self, X: np.ndarray, y: np.ndarray) -> dict[str, float]:
        """Inference-mode metrics on validation data."""
        return self.s.model.evaluate(X, y)

    # -- shared bookkeeping ------------------------------------------------------------------
    def _batch_weights(self, perm: np.ndarray) -> np.ndarray:
        """Each batch's weight in the epoch means: its rows, or its summed sample weights."""
        if self.s.w is None:
            return self.row_counts
        starts = np.array([s for s, _ in self.spans], np.intp)
        return np.add.reduceat(self.s.w[perm], starts)

    def _result(self, perm, costs: np.ndarray, losses: np.ndarray, n_wrong: int, lr: float) -> EpochResult:
        bw = self._batch_weights(perm)
        # np.add.accumulate adds left to right: the same sums, bit for bit, whichever runner ran
        return EpochResult(costs, float(np.add.accumulate(losses * bw)[-1]),
                           float(np.add.accumulate(costs * bw)[-1]), int(n_wrong), float(lr))

    def _check_end(self, snap: _Snapshot, epoch: int, lr: float) -> None:
        """No epoch ends with non-finite parameters or BatchNorm statistics (the last update included)."""
        model = self.s.model
        K = model.kernels
        if not _all_finite(K, model.params):
            self._diverged(snap, epoch, len(self.spans), "the parameters became NaN or infinite in the update",
                           lr)
        if not _all_finite(K, model.state):
            self._diverged(snap, epoch, len(self.spans), "the BatchNorm running statistics became NaN or "
                           "infinite", lr)

    def _diverged(self, snap: _Snapshot, epoch: int, step: int, what: str, lr: float) -> None:
        snap.restore()
        e, n = epoch + 1, len(self.spans)
        raise TrainingDiverged(
            f"training diverged at epoch {e}, step {step} of {n}: {what}. The learning rate ({lr:g}) is "
            f"probably too high, or the inputs are badly scaled (standardise them). The parameters, "
            f"BatchNorm statistics, optimiser state and step count are those of the start of epoch {e} "
            f"(the last finite state).", epoch=e, step=step)


class PerLayerRunner(Runner):
    """Per mini-batch: gather, (augment,) forward/backward through the kernels, one optimiser step.

    Calls ``on_batch`` after every step.
    """

    mode = "per-layer"

    def __init__(self, setup: Setup):
        super().__init__(setup)
        s = setup
        X, y, model = s.X, s.y, s.model
        spans = self._spans()
        # mini-batch buffers, allocated once: a full batch and the smaller last one
        ends = spans[-1:] + spans[:1]
        self.xbuf = {e - b: np.empty((e - b, X.shape[1]), model.dtype) for b, e in ends}
        self.ybuf = {e - b: np.empty((e - b,) + y.shape[1:], y.dtype) for b, e in ends}
        self.wbuf = {e - b: np.empty(e - b, np.float64) for b, e in ends} if s.w is not None else None
        self.costs = np.empty(len(spans))
        self.losses = np.empty(len(spans))
        self.aug_seed = model.seed if s.dp is None else s.dp.seed

    def _spans(self) -> list[tuple[int, int]]:
        return self.spans

    def _loss_and_grads(self, i: int, xb, yb, wb):
        kw = {} if wb is None else {"weights": wb}
        return self.s.model._loss_and_grads(xb, yb, dropout=True, n_total=self.s.m,
                                            step=self.s.model.step_count, **kw)

    def _finish(self, perm, n_wrong: int, lr: float) -> EpochResult:
        return self._result(perm, self.costs, self.losses, n_wrong, lr)

    def run_epoch(self, epoch: int, perm: np.ndarray, on_batch: OnBatch | None) -> EpochResult:
        s = self.s
        model, opt, X, y = s.model, s.optimizer, s.X, s.y
        K = model.kernels
        classifier = model.loss.classifier
        snap = _Snapshot(model, opt)
        costs, losses = self.costs, self.losses
        n_wrong, lr = 0, opt.lr
        for i, (b, e) in enumerate(self._spans()):
            xb, yb = self.xbuf[e - b], self.ybuf[e - b]
            X.take(perm[b:e], axis=0, out=xb)   # the methods: np.take's Python wrapper costs ~1 us a call
            y.take(perm[b:e], axis=0, out=yb)
            wb = None if s.w is None else s.w.take(perm[b:e], out=self.wbuf[e - b])
            if s.augment is not None and e > b:
                xb = augmented(s.augment, xb, self.aug_seed, model.step_count, model.dtype)
            data_loss, l2_term, logits = self._loss_and_grads(i, xb, yb, wb)
            J = data_loss + l2_term
            if not (math.isfinite(J) and K.all_finite(model.grads)):
                what = f"the cost became {J}" if not math.isfinite(J) else "the gradients became NaN or infinite"
                self._diverged(snap, epoch, i + 1, what, lr)
            lr = s.schedule(opt.lr, epoch, opt.t + 1)
            opt.step(model.params, model.grads, lr=lr)
            model.step_count += 1
            costs[i], losses[i] = J, data_loss
            if classifier and e > b:
                n_wrong += model.count_errors(logits, yb)
            if on_batch is not None:
                on_batch(i, costs[i:i + 1])
        res = self._finish(perm, n_wrong, lr)
        # after _finish: data-parallel ranks check the averaged statistics, all alike
        self._check_end(snap, epoch, lr)
        return res


class DataParallelRunner(PerLayerRunner):
    """MPI data parallelism: per step, this rank's shard forward/backward (compiled kernels),
    ONE all-reduce of the gradients (Python), one optimiser kernel. Calls ``on_batch`` per step
    with this rank's cost; the epoch's costs and sums are then global (one more all-reduce)."""

    mode = "data-parallel"

    def __init__(self, setup: Setup):
        if setup.w is not None:
            raise ValueError("sample_weight is not supported with distributed training")
        self._local = setup.dp.local_spans()  # this rank's shard of every global batch
        super().__init__(setup)
        self.spans = self._local  # one entry per global batch (this rank's rows of it; maybe empty)
        self.row_counts = np.array([float(e - s) for s, e in self._local])

    def _spans(self) -> list[tuple[int, int]]:
        return self._local

    def _loss_and_grads(self, i, xb, yb, wb):
        return self.s.dp.loss_and_grads(xb, yb, step=self.s.model.step_count, batch=i)

    def _finish(self, perm, n_wrong, lr):
        local = self._result(perm, self.costs, self.losses, n_wrong, lr)
        costs = self.costs.copy()
        sum_loss, sum_cost, n_wrong = self.s.dp.reduce_epoch(local.sum_loss, local.sum_cost, n_wrong, costs)
        return EpochResult(costs, sum_loss, sum_cost, n_wrong, lr)

    def evaluate(self, X, y):
        return self.s.dp.evaluate(X, y)


class _ExecutorRunner(Runner):
    """Shared by the runners over a compiled epoch executor."""

    def __init__(self, setup: Setup, executor):
        super().__init__(setup)
        self.ex = executor
        self.spec = optimizer_spec(setup.optimizer)
        self.empty = setup.model.params[:0]
        self.w = setup.w if setup.w is not None else np.empty(0, np.float64)
        n = len(self.spans)
        self.costs, self.losses = np.empty(n), np.empty(n)

    def compile(self, verbose: int = 0) -> float:
        """Run the executor's one-time JIT compilation (announced when ``verbose``)."""
        compile_ = getattr(self.ex, "compile", None)
        if compile_ is None:
            return 0.0
        numba = "numba" in (type(self.ex).__module__ or "")
        if verbose and numba:
            print("fastdl: compiling the Numba kernels for this model (once; cached on disk) ...",
                  file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        compile_()
        dt = time.perf_counter() - t0
        if verbose and numba:
            print(f"fastdl: compiled in {dt:.1f} s (not counted as training time)", file=sys.stderr, flush=True)
        return dt

    def _coefficients(self, epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        opt = self.s.optimizer
        lrs = self.s.schedule.rates(opt.lr, epoch, opt.t + 1, len(self.spans))
        c1, c2 = step_coefficients(self.spec, lrs, opt.t)
        return lrs, c1, c2

    def _call(self, X, y, w, perm, c1, c2, costs, losses) -> tuple[int, int, int]:
        s = self.s
        model, opt = s.model, s.optimizer
        opt._ensure_state(model.params, model.grads)
        v = opt.state.get("v", self.empty)
        sv = opt.state.get("s", self.empty)
        done, wrong, status = self.ex.run_epoch(X, y, w, perm, model.params, model.grads, model.state, v, sv,
                                                c1, c2, model.step_count, model.seed, s.m, costs, losses)
        opt.t += done
        model.step_count += done
        return done, wrong, status

    def _status(self, snap, epoch: int, done: int, status: int, lrs: np.ndarray, offset: int = 0) -> None:
        if status == 1:   # step `done` (0-based) had a non-finite cost or gradients; not applied
            self._diverged(snap, epoch, offset + done + 1, "the cost or gradients became NaN or infinite",
                           float(lrs[min(offset + done, len(lrs) - 1)]))
        if status == 2:   # the update of step `done - 1` (0-based) made the parameters non-finite
            self._diverged(snap, epoch, offset + done, "the parameters became NaN or infinite in the update",
                           float(lrs[offset + done - 1]))


class FusedRunner(_ExecutorRunner):
    """The whole epoch in ONE compiled call. Calls ``on_batch`` once per epoch, with every batch's cost."""

    mode = "fused"

    def run_epoch(self, epoch, perm, on_batch):
        snap = _Snapshot(self.s.model, self.s.optimizer)
        lrs, c1, c2 = self._coefficients(epoch)
        done, wrong, status = self._call(self.s.X, self.s.y, self.w, perm, c1, c2, self.costs, self.losses)
        self._status(snap, epoch, done, status, lrs)
        self._check_end(snap, epoch, float(lrs[-1]))
        if on_batch is not None:
            on_batch(len(self.spans) - 1, self.costs)
        return self._result(perm, self.costs, self.losses, wrong, float(lrs[-1]))


class AugmentRunner(_ExecutorRunner):
    """Per step: the Python ``augment`` callable, then ONE compiled call (forward, loss, backward,
    update) of the epoch executor on the augmented batch. Calls ``on_batch`` after every step."""

    mode = "augment"

    def __init__(self, setup: Setup, executor):
        super().__init__(setup, executor)
        B, X, y = setup.batch_size, setup.X, setup.y
        self.xbuf = np.empty((B, X.shape[1]), X.dtype)
        self.ybuf = np.empty((B,) + y.shape[1:], y.dtype)
        self.wbuf = np.empty(B, np.float64) if setup.w is not None else None
        self.iota = np.arange(B, dtype=np.int64)

    def run_epoch(self, epoch, perm, on_batch):
        s = self.s
        snap = _Snapshot(s.model, s.optimizer)
        lrs, c1, c2 = self._coefficients(epoch)
        n_wrong = 0
        for i, (b, e) in enumerate(self.spans):
            k = e - b
            xb, yb = self.xbuf[:k], self.ybuf[:k]
            s.X.take(perm[b:e], axis=0, out=xb)
            s.y.take(perm[b:e], axis=0, out=yb)
            wb = self.w if s.w is None else s.w.take(perm[b:e], out=self.wbuf[:k])
            xa = augmented(s.augment, xb, s.model.seed, s.model.step_count, s.model.dtype)
            done, wrong, status = self._call(xa, yb, wb, self.iota[:k], c1[i:i + 1], c2[i:i + 1],
                                             self.costs[i:i + 1], self.losses[i:i + 1])
            self._status(snap, epoch, done, status, lrs, offset=i)
            n_wrong += wrong
            if on_batch is not None:
                on_batch(i, self.costs[i:i + 1])
        self._check_end(snap, epoch, float(lrs[-1]))
        return self._result(perm, self.costs, self.losses, n_wrong, float(lrs[-1]))


def augmented(augment, xb: np.ndarray, seed: int, step: int, dtype) -> np.ndarray:
    """``augment(xb, rng)`` with ``rng`` keyed by (seed, step): reproducible, resumable."""
    rng = np.random.default_rng([seed, step, 0xA06])
    out = augment(xb, rng)
    if not isinstance(out, np.ndarray) or out.shape != xb.shape:
        raise ValueError(f"augment must return an array of shape {xb.shape}, got "
                         f"{getattr(out, 'shape', type(out).__name__)}")
    return np.ascontiguousarray(out, dtype=dtype)


def _executor(setup: Setup):
    """``(executor, None)`` or ``(None, why there is none)``."""
    model = setup.model
    K = model.kernels
    try:
        ex = K.epoch_executor(model.plan, setup.batch_size, optimizer_spec(setup.optimizer))
    except ImportError as exc:  # an executor whose compiled module is not built/installed
        return None, f"the epoch executor of backend {K.name!r} is not available ({exc})"
    except NotImplementedError as exc:  # a plan feature this executor does not run yet
        return None, f"the epoch executor of backend {K.name!r} cannot run this model ({exc})"
    if ex is None:
        return None, f"backend {K.name!r} has no compiled epoch executor"
    return ex, None


def make_runner(setup: Setup, fused: "bool | str") -> Runner:
    """The runner for this fit (see ``fit(fused=...)``)."""
    if fused not in ("auto", True, False):
        raise ValueError(f"fused must be 'auto', True or False, got {fused!r}")
    if setup.dp is not None:
        if fused is True:
            raise ValueError("fused=True but the fused epoch cannot train this model: distributed training "
                             "all-reduces between backward and update")
        return DataParallelRunner(setup)
    if fused is False:
        return PerLayerRunner(setup)
    ex, reason = _executor(setup)
    if ex is None:
        if fused is True:
            raise ValueError(f"fused=True but the fused epoch cannot train this model: {reason}")
        return PerLayerRunner(setup)
    return AugmentRunner(setup, ex) if setup.augment is not None else FusedRunner(setup, ex)
