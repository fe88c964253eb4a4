"""``fit``: the loop over epochs. Runners train the epochs, callbacks do everything else."""
from __future__ import annotations

import os
import time
import warnings
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, Callable, Iterable

import numpy as np

from .._atomic import check_target
from .._validation import check_positive
from ..data import epoch_permutation
from ..distributed import get_communicator
from ..optim import Adam, Optimizer
from ..schedules import Schedule, get_schedule
from .callbacks import Callback, CallbackList, Checkpointer, NormRecorder, ProgressBar
from .callbacks import _user_stacklevel, load_training_state, restore_callback_states
from .history import History, TrainingDiverged
from .runners import EpochResult, Runner, Setup, make_runner

if TYPE_CHECKING:
    from ..model import Sequential


def fit(model: "Sequential", X, y, *, optimizer: Optimizer | None = None, epochs: int = 10,
        batch_size: int = 64, validation_data: tuple[Any, Any] | None = None,
        lr_schedule: "Schedule | str | None" = None, callbacks: Iterable[Callback] = (),
        verbose: int = 0, shuffle: bool = True,
        augment: "Callable[[np.ndarray, np.random.Generator], np.ndarray] | None" = None,
        initial_epoch: int = 0, checkpoint: "str | os.PathLike | None" = None, checkpoint_every: int = 1,
        resume: bool = False, distributed: "bool | Any" = False, sync_batchnorm: bool = False,
        fused: "bool | str" = "auto", sample_weight=None) -> History:
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
        e.g. ``EarlyStopping(patience=5)``; see :mod:`fastdl.callbacks` for the
        hooks, the built-in callbacks and how their state is checkpointed.
    verbose : int
        0 silent; 1 a progress bar (terminal or notebook; kept on screen) with
        the epoch, smoothed cost and last validation metrics, or one line per
        epoch when there is neither; 2 one line per epoch. With the Numba
        backend the one-time kernel compilation is announced (it is not
        counted in ``History.time``: see ``History.compile_time``).
    augment : callable, optional
        ``augment(X_batch, rng) -> X_batch`` applied to each training
        mini-batch (e.g. :func:`fastdl.augment.Augmenter`); ``rng`` is seeded
        by (model seed, step) so augmentation is reproducible.
    initial_epoch : int
        Epoch number to start from (continue a previous ``fit`` call: the
        shuffle order and schedule carry on instead of restarting).
    checkpoint : path, optional
        Save params, BatchNorm statistics, optimiser state, epoch/step
        counters, history and the state of stateful callbacks there every
        ``checkpoint_every`` epochs and when training ends (after every
        callback's ``on_train_end``, marked finished), atomically.
    resume : bool
        If ``checkpoint`` exists, load it (callback states included) and
        continue from the epoch after the one it saved; the result is
        bit-identical to an uninterrupted run (same seed, backend and thread
        count). A checkpoint of a run that stopped early returns at once with
        its final state; so does one of a run that completed its epochs,
        unless ``epochs`` is now larger: then training continues (Keras-like).
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
        batch instead of each rank's own.
    fused : {'auto', True, False}
        ``'auto'`` runs each epoch as ONE compiled call of the backend's epoch
        executor wherever the backend has one (Cython, the default
        ``backend='auto'``; Numba), bit-identical to the per-layer path of
        that backend; with ``augment``, one compiled call per mini-batch.
        ``True`` raises if no executor can be used (reference backend,
        ``distributed``); ``False`` always runs the per-layer path. The fused
        runner calls ``on_batch_end`` once per epoch (with every batch's cost).
    sample_weight : array (m,), optional
        Per-example weights (scikit-learn's rule: the loss and the L2 ``m`` of
        a batch use the sum of its weights). Not with ``distributed``.

    Returns
    -------
    History
    """
    s, val, comm = _setup(model, X, y, optimizer, epochs, batch_size, validation_data, lr_schedule, augment,
                          distributed, sync_batchnorm, sample_weight)
    initial_epoch = check_positive("initial_epoch", initial_epoch, integer=True, allow_zero=True)
    checkpoint_every = check_positive("checkpoint_every", checkpoint_every, integer=True)
    user = list(callbacks)
    if checkpoint is not None and (comm is None or comm.rank == 0):
        check_target(checkpoint)  # a typo in the directory must not cost the whole run
    history = History()
    run_info = {"n_examples": s.m, "batch_size": s.batch_size, "shuffle": bool(shuffle)}
    if comm is not None and comm.size > 1:
        run_info["world_size"] = comm.size
    if s.dp is not None:
        s.dp.check_same_run(s.X, s.y, batch_size=s.batch_size, epochs=epochs, initial_epoch=initial_epoch,
                            shuffle=shuffle, sync_batchnorm=sync_batchnorm, validation=val is not None)
    resumed = _resume(s, checkpoint if resume else None, history, run_info, initial_epoch)
    initial_epoch = resumed.next_epoch if resumed is not None else initial_epoch
    if comm is not None and comm.rank != 0:
        verbose, checkpoint = 0, None  # rank 0 prints and checkpoints
    model.history, model.stop_training = history, False
    if resumed is not None and (resumed.finished == "early_stop"
                                or (resumed.finished and epochs <= resumed.next_epoch)):
        if verbose:  # the run ended: its final state, no more training
            print(f"checkpoint {checkpoint}: the run had finished after {resumed.next_epoch} epochs "
                  f"({resumed.finished}); returning its final state", flush=True)
        restore_callback_states(user, resumed.callback_states, f"checkpoint {checkpoint}")
        return history
    runner = make_runner(s, fused)
    history.compile_time = runner.compile(verbose)
    builtin_first = [NormRecorder(warn=comm is None or comm.rank == 0)]  # warn once, on rank 0 only
    if verbose:
        builtin_first.append(ProgressBar(epochs, int(runner.row_counts.sum()), initial_epoch=initial_epoch,
                                         verbose=verbose))
    builtin_last = [] if checkpoint is None else [  # last: saves after every other callback
        Checkpointer(checkpoint, every=checkpoint_every, epochs=epochs, optimizer=s.optimizer,
                     run_info=run_info, callbacks=user, schedule=s.schedule)]
    cbs = CallbackList(model, runner.row_counts, builtin_first + user + builtin_last)
    cbs.on_train_begin({"has_validation": val is not None, "initial_epoch": initial_epoch, "epochs": epochs})
    if resumed is not None:
        restore_callback_states(user, resumed.callback_states, f"checkpoint {checkpoint}")
        if resumed.schedule_state is not None and hasattr(s.schedule, "load_state_dict"):
            s.schedule.load_state_dict(resumed.schedule_state)
    if s.dp is not None:
        s.dp.limit_threads()  # several ranks on a node: each gets its share of the cores (restored below)
    t0 = time.perf_counter()
    try:
        for epoch in range(initial_epoch, epochs):
            perm = epoch_permutation(s.m, model.seed, epoch) if shuffle else np.arange(s.m)
            res = runner.run_epoch(epoch, perm, cbs.on_batch)
            history.batch_cost.extend(res.costs.tolist())
            logs = _epoch_logs(s, runner, res, val)
            history.record(epoch, logs)
            cbs.on_epoch_end(epoch, logs)
            if model.stop_training:
                break
    except BaseException as exc:
        cbs.close()
        if s.dp is not None and not isinstance(exc, TrainingDiverged):  # TrainingDiverged: raised on every rank
            from ..distributed import abort_job

            abort_job(comm, exc)  # one failing rank must not leave the others blocked in a collective
        raise
    finally:
        history.time = time.perf_counter() - t0
        if s.dp is not None:
            s.dp.close()
    cbs.on_train_end({})
    return history


def _setup(model, X, y, optimizer, epochs, batch_size, validation_data, lr_schedule, augment, distributed,
           sync_batchnorm, sample_weight) -> tuple[Setup, tuple | None, Any]:
    """Validate fit's arguments once; build the data-parallel bookkeeping."""
    X = model.check_X(X)
    m = X.shape[0]
    y = model.check_y(y, m)
    w = model.check_sample_weight(sample_weight, m) if sample_weight is not None else None
    epochs = check_positive("epochs", epochs, integer=True, allow_zero=True)
    batch_size = check_positive("batch_size", batch_size, integer=True)
    comm = get_communicator(distributed)
    world = comm.size if comm is not None else 1
    if batch_size * world > m:
        ranks = f" (x {world} ranks)" if world > 1 else ""
        warnings.warn(f"batch_size={batch_size}{ranks} is larger than the {m} examples; using "
                      f"{-(-m // world)}", stacklevel=_user_stacklevel())
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
    dp = None
    if comm is not None:
        from ..distributed import DataParallel

        dp = DataParallel(comm, model, batch_size=batch_size, n_examples=m, sync_batchnorm=sync_batchnorm)
    s = Setup(model, optimizer, get_schedule(lr_schedule), X, y, w, batch_size, epochs, augment, dp)
    return s, val, comm


def _resume(s: Setup, path, history: History, run_info: dict, initial_epoch: int):
    """Load the checkpoint at ``path`` if it exists (rank 0; then broadcast): its ResumeInfo or None."""
    info = None

    def load():
        nonlocal info
        if path is not None and os.path.exists(path):
            info = load_training_state(path, s.model, s.optimizer, history, run_info)
            return info.next_epoch
        return None

    if s.dp is None:
        load()
        return info
    s.dp.broadcast_start(s.model, s.optimizer, history, initial_epoch, load)  # every rank: rank 0's state
    msg = None if info is None else (info.next_epoch, info.callback_states, info.finished, info.schedule_state)
    msg = s.dp.comm.bcast_object(msg)
    if msg is None:
        return None
    return SimpleNamespace(next_epoch=int(msg[0]), callback_states=msg[1], finished=bool(msg[2]),
                           schedule_state=msg[3])


def _epoch_logs(s: Setup, runner: Runner, res: EpochResult, val) -> dict[str, float]:
    """The epoch's means (weighted by rows or sample weights) and validation metrics."""
    total = float(s.m) if s.w is None else float(np.add.accumulate(s.w)[-1])
    logs: dict[str, float] = {"loss": res.sum_loss / total, "cost": res.sum_cost / total, "lr": res.lr}
    if s.model.loss.classifier:
        logs["error"] = res.n_wrong / s.m
    if val is not None:
        ev = runner.evaluate(*val)
        logs["val_loss"] = ev["loss"]
        if "error" in ev:
            logs["val_error"] = ev["error"]
    return logs
