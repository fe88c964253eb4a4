"""The training loop: batches, schedule, callbacks. Nothing else.

The per-step work is: gather a mini-batch into preallocated buffers, one
forward/backward through the kernels, one fused optimiser step.
"""
from __future__ import annotations

import math
import os
import sys
import time
import warnings
from typing import TYPE_CHECKING, Any, Callable, Iterable

import numpy as np

from ._validation import check_positive
from .callbacks import Callback
from .data import epoch_permutation
from .distributed import get_communicator
from .optim import Adam, Optimizer
from .schedules import Schedule, get_schedule

if TYPE_CHECKING:
    from .model import Sequential


class TrainingDiverged(FloatingPointError):
    """The cost or gradients became NaN or infinite during training."""


class History:
    """What :func:`fit` records.

    ``history`` maps ``'loss'``, ``'error'`` (training mini-batches, training
    mode, mean data loss without the L2 term), ``'cost'`` (mean ``J``
    including L2), ``'val_loss'``, ``'val_error'`` (inference mode on the
    validation set) and ``'lr'`` to per-epoch lists; ``batch_cost`` is ``J`` of
    every mini-batch (what the course plots).
    """

    def __init__(self) -> None:
        self.history: dict[str, list[float]] = {}
        self.batch_cost: list[float] = []
        self.epoch: list[int] = []
        self.time: float = 0.0
        #: per parameter array: {'weight': [norm per epoch], 'grad': [norm of the epoch's last batch gradient]}
        self.norms: dict[str, dict[str, list[float]]] = {}

    def record(self, epoch: int, logs: dict[str, float]) -> None:
        self.epoch.append(epoch)
        for k, v in logs.items():
            self.history.setdefault(k, []).append(float(v))

    def __getitem__(self, key: str) -> list[float]:
        return self.history[key]

    def __repr__(self) -> str:
        last = {k: round(v[-1], 5) for k, v in self.history.items() if v}
        return f"History(epochs={len(self.epoch)}, last={last})"


def _batches(m: int, batch_size: int) -> list[tuple[int, int]]:
    return [(s, min(s + batch_size, m)) for s in range(0, m, batch_size)]


def fit(model: "Sequential", X, y, *, optimizer: Optimizer | None = None, epochs: int = 10,
        batch_size: int = 64, validation_data: tuple[Any, Any] | None = None,
        lr_schedule: "Schedule | str | None" = None, callbacks: Iterable[Callback] = (),
        verbose: int = 0, shuffle: bool = True,
        augment: "Callable[[np.ndarray, np.random.Generator], np.ndarray] | None" = None,
        initial_epoch: int = 0, checkpoint: "str | os.PathLike | None" = None, checkpoint_every: int = 1,
        resume: bool = False, distributed: "bool | Any" = False, sync_batchnorm: bool = False,
        fused: "bool | str" = "auto") -> History:
    """Train ``model`` with mini-batch gradient descent.

    Parameters
    ----------
    optimizer : Optimizer, default ``Adam()``
        Its state persists across calls (continue training by calling again).
    epochs, batch_size : int
        Each epoch shuffles (seeded by the model seed and epoch number) and
        cuts batches of ``batch_size``; the last may be smaller. ``batch_size``
        larger than the data is clipped (batch gradient descent).
    validation_data : (X_dev, y_dev), optional
        Evaluated in inference mode after each epoch (``val_loss``, ``val_error``).
    lr_schedule : Schedule or name, optional
        ``lr = schedule(optimizer.lr, epoch, step)``.
    callbacks : list of Callback
        e.g. ``EarlyStopping(patience=5)``.
    verbose : int
        0 silent; 1 a progress bar with the smoothed cost when stderr is a
        terminal; 2 one line per epoch.
    augment : callable, optional
        ``augment(X_batch, rng) -> X_batch`` applied to each training
        mini-batch (e.g. :func:`fastdl.augment.Augmenter`); ``rng`` is seeded
        by (model seed, step) so augmentation is reproducible.
    initial_epoch : int
        Epoch number to start from (continue a previous ``fit`` call: the
        shuffle order and schedule carry on instead of restarting).
    checkpoint : path, optional
        Save params, BatchNorm statistics, optimiser state, epoch/step
        counters and history there every ``checkpoint_every`` epochs,
        atomically (a kill mid-save keeps the previous checkpoint).
    resume : bool
        If ``checkpoint`` exists, load it and continue from the epoch after
        the one it saved; the result is bit-identical to an uninterrupted run
        (same seed, backend and thread count).
    distributed : bool or fastdl.distributed.Communicator
        Data-parallel training over MPI (run under ``mpiexec -n N``; see
        :mod:`fastdl.distributed`). ``True`` uses all ranks of the job. Rank
        0's parameters are broadcast; ``batch_size`` is per rank (global batch
        ``batch_size * N``); each step all-reduces the gradients once, so the
        result equals one process with the global batch (up to rounding; not
        with dropout or per-rank BatchNorm). Only rank 0 prints and
        checkpoints; callbacks run on every rank with identical logs.
    sync_batchnorm : bool
        With ``distributed``: BatchNorm uses the statistics of the global
        batch (two small all-reduces per BatchNorm layer and step) instead of
        each rank's own.
    fused : {'auto', True, False}
        Run each epoch as ONE compiled call (``FusedEpoch`` in :mod:`fastdl.backends.numba_backend`)
        instead of ~15 kernel calls per step. ``'auto'`` uses it when the
        model's backend is 'numba' and the model, optimiser and options allow
        it (softmax cross-entropy, no ``augment``, not distributed); the
        result is bit-identical to the per-layer numba path. ``True`` raises
        if it cannot be used; ``False`` never uses it. (``backend='auto'``
        runs the Cython kernels, which need no JIT compilation and whose
        per-call overhead is already small.)

    Returns
    -------
    History
    """
    X = model.check_X(X)
    m = X.shape[0]
    y = model.check_y(y, m)
    epochs = check_positive("epochs", epochs, integer=True, allow_zero=True)
    batch_size = check_positive("batch_size", batch_size, integer=True)
    comm = get_communicator(distributed)
    world = comm.size if comm is not None else 1
    if batch_size * world > m:
        ranks = f" (x {world} ranks)" if world > 1 else ""
        warnings.warn(f"batch_size={batch_size}{ranks} is larger than the {m} examples; using "
                      f"{-(-m // world)}", stacklevel=3)
        batch_size = -(-m // world)
    val = None
    if validation_data is not None:
        if not isinstance(validation_data, (tuple, list)) or len(validation_data) != 2:
            raise ValueError("validation_data must be a tuple (X_dev, y_dev)")
        Xv = model.check_X(validation_data[0])
        val = (Xv, model.check_y(validation_data[1], Xv.shape[0]))
    if optimizer is None:
        optimizer = Adam()
    if not isinstance(optimizer, Optimizer):
        raise TypeError(f"optimizer must be a fastdl optimizer (fd.Adam(...)), got {type(optimizer).__name__}")
    if optimizer.backend is None:
        optimizer.backend = model.kernels
    schedule = get_schedule(lr_schedule)
    callbacks = list(callbacks)

    initial_epoch = check_positive("initial_epoch", initial_epoch, integer=True, allow_zero=True)
    checkpoint_every = check_positive("checkpoint_every", checkpoint_every, integer=True)
    run_info = {"n_examples": m, "batch_size": batch_size, "shuffle": bool(shuffle)}
    if world > 1:
        run_info["world_size"] = world
    history = History()

    def _resume():
        if checkpoint is not None and resume and os.path.exists(checkpoint):
            from .checkpoint import load_checkpoint

            return load_checkpoint(checkpoint, model, optimizer, history, run_info)
        return None

    dp = None
    if comm is None:
        loaded = _resume()
        initial_epoch = initial_epoch if loaded is None else loaded
    else:  # every rank starts from rank 0's (possibly resumed) state
        from .distributed import DataParallel

        dp = DataParallel(comm, model, batch_size=batch_size, n_examples=m, sync_batchnorm=sync_batchnorm)
        dp.check_same_run(X, y, batch_size=batch_size, epochs=epochs, initial_epoch=initial_epoch,
                          shuffle=shuffle, sync_batchnorm=sync_batchnorm, validation=val is not None)
        initial_epoch = dp.broadcast_start(model, optimizer, history, initial_epoch, _resume)
        if comm.rank != 0:
            verbose, checkpoint = 0, None
    model.history = history
    model.stop_training = False
    logs0 = {"has_validation": val is not None}
    for cb in callbacks:
        cb.on_train_begin(model, logs0)

    # Mini-batch buffers, allocated once: a full batch and the smaller last one.
    # (distributed: this rank's shard of every global batch; a short last batch may leave it empty)
    spans = _batches(m, batch_size) if dp is None else dp.local_spans()
    xbuf = {e - s: np.empty((e - s, X.shape[1]), model.dtype) for s, e in spans[-1:] + spans[:1]}
    ybuf = {e - s: np.empty((e - s,) + y.shape[1:], y.dtype) for s, e in spans[-1:] + spans[:1]}
    pred_buf = np.empty(batch_size, np.int64)  # training-error count without per-step allocation
    wrong_buf = np.empty(batch_size, bool)
    aug_seed = model.seed if dp is None else dp.seed
    fused_epoch = _fused_epoch(fused, model, optimizer, augment, dp, batch_size, X.shape[1])
    batch_sizes = np.array([float(e - s) for s, e in spans])
    bar = _progress(verbose, len(spans) * max(epochs - initial_epoch, 0))
    ewa, ewa_beta, n_cost = 0.0, 0.98, 0
    if dp is not None:
        dp.limit_threads()  # several ranks on a node: each gets its share of the cores (restored below)
    t0 = time.perf_counter()
    try:
        for epoch in range(initial_epoch, epochs):
            # restored if this epoch diverges to non-finite values
            snapshot = (model.params.copy(), model.state.copy())
            perm = epoch_permutation(m, model.seed, epoch) if shuffle else np.arange(m)
            sum_loss = sum_cost = 0.0
            n_wrong = 0
            lr = optimizer.lr
            if fused_epoch is not None:
                lrs = schedule.rates(optimizer.lr, epoch, optimizer.t + 1, len(spans))
                costs, losses, n_wrong, diverged = fused_epoch.run(X, y, perm, lrs)
                n_ok = len(costs) - diverged
                if diverged:
                    history.batch_cost.extend(costs[:n_ok].tolist())
                    _diverged(model, snapshot, float(costs[-1]), epoch, float(lrs[n_ok]))
                history.batch_cost.extend(costs.tolist())
                # np.add.accumulate adds left to right from the first term: the same float
                # additions, in the same order, as the per-step loop below
                sum_loss = float(np.add.accumulate(losses * batch_sizes)[-1])
                sum_cost = float(np.add.accumulate(costs * batch_sizes)[-1])
                lr = float(lrs[-1])
                if bar is not None:
                    for J in costs.tolist():
                        n_cost += 1
                        ewa = ewa_beta * ewa + (1 - ewa_beta) * J
                    bar.set_postfix_str(f"epoch {epoch + 1}/{epochs} cost {ewa / (1 - ewa_beta ** n_cost):.4f}",
                                        refresh=False)
                    bar.update(len(spans))
            for i, (s, e) in enumerate(spans if fused_epoch is None else ()):
                xb, yb = xbuf[e - s], ybuf[e - s]
                X.take(perm[s:e], axis=0, out=xb)   # the methods: np.take's Python wrapper costs ~1 us a call
                y.take(perm[s:e], axis=0, out=yb)
                if augment is not None and e > s:
                    xb = _augmented(augment, xb, aug_seed, model.step_count, model)
                if dp is None:
                    data_loss, l2_term, logits = model._loss_and_grads(xb, yb, dropout=True, n_total=m,
                                                                       step=model.step_count)
                else:  # this rank's shard, then ONE all-reduce of model.grads
                    data_loss, l2_term, logits = dp.loss_and_grads(xb, yb, step=model.step_count, batch=i)
                J = data_loss + l2_term
                if not (math.isfinite(J) and model.kernels.all_finite(model.grads)):
                    _diverged(model, snapshot, J, epoch, lr)
                lr = schedule(optimizer.lr, epoch, optimizer.t + 1)
                optimizer.step(model.params, model.grads, lr=lr)
                model.step_count += 1
                history.batch_cost.append(J)
                sum_loss += data_loss * (e - s)
                sum_cost += J * (e - s)
                if model.loss.classifier and e > s:
                    n_wrong += model.loss.count_errors(logits, yb, pred_buf[:e - s], wrong_buf[:e - s])
                if bar is not None:
                    n_cost += 1
                    ewa = ewa_beta * ewa + (1 - ewa_beta) * J
                    bar.set_postfix_str(f"epoch {epoch + 1}/{epochs} cost {ewa / (1 - ewa_beta ** n_cost):.4f}",
                                        refresh=False)
                    bar.update(1)
            if dp is not None:  # global sums and batch costs on every rank (identical logs)
                sum_loss, sum_cost, n_wrong = dp.reduce_epoch(sum_loss, sum_cost, n_wrong, history)
            logs: dict[str, float] = {"loss": sum_loss / m, "cost": sum_cost / m, "lr": lr}
            if model.loss.classifier:
                logs["error"] = n_wrong / m
            if val is not None:
                ev = model.evaluate(*val) if dp is None else dp.evaluate(*val)
                logs["val_loss"] = ev["loss"]
                if "error" in ev:
                    logs["val_error"] = ev["error"]
            history.record(epoch, logs)
            with warnings.catch_warnings():
                if dp is not None and comm.rank != 0:  # the same arrays on every rank: warn once
                    warnings.simplefilter("ignore")
                _record_norms(model, history, epoch)
            if verbose >= 2:
                print(f"epoch {epoch + 1}/{epochs} " + " ".join(f"{k}={v:.4g}" for k, v in logs.items()),
                      flush=True)
            for cb in callbacks:
                cb.on_epoch_end(model, epoch, logs)
            if checkpoint is not None and ((epoch + 1) % checkpoint_every == 0 or epoch + 1 == epochs
                                           or model.stop_training):
                from .checkpoint import save_checkpoint

                save_checkpoint(checkpoint, model, optimizer, history, next_epoch=epoch + 1, run_info=run_info)
            if model.stop_training:
                break
    except BaseException as exc:
        if dp is not None and not isinstance(exc, TrainingDiverged):  # TrainingDiverged is raised on every rank
            from .distributed import abort_job

            abort_job(comm, exc)  # one failing rank must not leave the others blocked in a collective
        raise
    finally:
        if bar is not None:
            bar.close()
        if dp is not None:
            dp.close()
        history.time = time.perf_counter() - t0
    for cb in callbacks:
        cb.on_train_end(model, {})
    return history


def _fused_epoch(fused, model, optimizer, augment, dp, batch_size: int, n_features: int):
    """The compiled whole-epoch trainer when it applies (see ``fit(fused=...)``), else None."""
    if fused not in ("auto", True, False):
        raise ValueError(f"fused must be 'auto', True or False, got {fused!r}")
    if fused is False:
        return None
    reason = None
    if augment is not None:
        reason = "augment= needs a Python call per mini-batch"
    elif dp is not None:
        reason = "distributed training all-reduces between backward and update"
    elif model.backend_name != "numba":  # checked first: do not even import numba
        reason = f"backend {model.backend_name!r} (the fused epoch runs the numba kernels)"
    else:
        try:
            from .backends import numba_backend as numba_fused
        except ImportError as exc:
            reason = f"numba is not available ({exc})"
        else:
            reason = numba_fused.supports(model, optimizer)
    if reason is None:
        return numba_fused.FusedEpoch(model, optimizer, batch_size, n_features)
    if fused is True:
        raise ValueError(f"fused=True but the fused epoch cannot train this model: {reason}")
    return None


def _diverged(model, snapshot: tuple[np.ndarray, np.ndarray], J: float, epoch: int, lr: float) -> None:
    restored = ""
    if not (np.isfinite(model.params).all() and np.isfinite(model.state).all()):
        model.params[...], model.state[...] = snapshot
        restored = " Parameters were restored to the start of this epoch (the last finite ones)."
    what = f"cost became {J}" if not math.isfinite(J) else "gradients became NaN or infinite"
    raise TrainingDiverged(
        f"training diverged: {what} at epoch {epoch}, step {model.step_count + 1}. The learning rate "
        f"({lr:g}) is probably too high, or the inputs are badly scaled (standardise them).{restored}")


def _augmented(augment, xb: np.ndarray, seed: int, step: int, model) -> np.ndarray:
    rng = np.random.default_rng([seed, step, 0xA06])
    out = augment(xb, rng)
    if not isinstance(out, np.ndarray) or out.shape != xb.shape:
        raise ValueError(f"augment must return an array of shape {xb.shape}, got "
                         f"{getattr(out, 'shape', type(out).__name__)}")
    return np.ascontiguousarray(out, dtype=model.dtype)


VANISHING, EXPLODING = 1e-7, 1e3


def _record_norms(model, history: History, epoch: int) -> None:
    """Per-array weight and gradient norms; warn on vanishing or exploding gradients."""
    K = model.kernels
    for name, w, g in model.parameter_arrays():
        wn = math.sqrt(K.sum_squares(w))
        gn = math.sqrt(K.sum_squares(g))
        rec = history.norms.setdefault(name, {"weight": [], "grad": []})
        rec["weight"].append(wn)
        rec["grad"].append(gn)
        if not math.isfinite(gn) or gn > EXPLODING * max(wn, 1.0):
            warnings.warn(f"exploding gradient in {name} at epoch {epoch}: |grad| = {gn:.3g}, "
                          f"|weights| = {wn:.3g}; lower the learning rate or add BatchNorm", RuntimeWarning,
                          stacklevel=3)
        elif name.endswith(".W") and gn < VANISHING * max(wn, 1.0):
            warnings.warn(f"vanishing gradient in {name} at epoch {epoch}: |grad| = {gn:.3g}, "
                          f"|weights| = {wn:.3g}; consider ReLU, He init or BatchNorm", RuntimeWarning,
                          stacklevel=3)


def _progress(verbose: int, total: int):
    if verbose < 1 or not sys.stderr.isatty():
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is a dependency, but training must not need it
        return None
    return tqdm(total=total, unit="batch", leave=False, file=sys.stderr)
