"""Data-parallel training over MPI (Horovod-style, through ``mpi4py``).

Launch N copies of the same program; each is one *rank*::

    mpiexec -n 4 python -m fastdl train --distributed ...
    mpiexec -n 4 python my_script.py          # my_script calls model.fit(..., distributed=True)

What :func:`fastdl.training.fit` does with ``distributed=True`` (or a
:class:`Communicator`):

* rank 0's parameters, BatchNorm statistics, step counter and optimiser
  state are broadcast once at the start (so every rank starts identical);
* every rank holds the whole training set and draws the same seeded
  permutation each epoch; global mini-batch ``i`` is
  ``perm[i*B*N:(i+1)*B*N]`` (``B`` = ``batch_size`` per rank) and rank ``r``
  takes the ``r``-th of N near-equal slices of it;
* after backward, ONE in-place all-reduce (sum) of the flat ``grads`` array.
  Each rank has already weighted its gradient by ``m_r / M`` (its rows over
  the global batch) and used ``M`` as the L2 ``m``, so the sum is exactly the
  gradient of the global batch's cost, unequal last-batch shards included;
* every rank then takes the same optimiser step on identical arrays;
* per-epoch loss/error (and every batch cost) are all-reduced once per epoch,
  and the validation set is evaluated in shards and reduced, so every rank
  logs identical numbers and callbacks (EarlyStopping) decide alike;
* dropout masks (and the ``augment`` stream) are keyed by a per-rank seed
  (:func:`rank_seed`; rank 0 keeps the model seed, so a 1-rank run equals a
  plain run);
* BatchNorm normalises with per-rank batch statistics by default; with
  ``sync_batchnorm=True`` the per-feature sums are all-reduced in the forward
  pass (shifted sum and sum of squares, count) and the backward pass
  (``sum dY``, ``sum dY*x_hat``), so the result equals one process on the
  global batch. Running averages are averaged over ranks every epoch in the
  per-rank mode (identical anyway in the synchronised mode);
* only rank 0 prints, checkpoints and (in the CLI) saves;
* an exception on any rank aborts the whole job (``MPI_Abort``) with a
  message naming the rank, instead of leaving the others blocked in a
  collective; every collective also has a timeout (default 30 minutes,
  ``FASTDL_MPI_TIMEOUT`` seconds or ``MPICommunicator(timeout=)``; 0 = none)
  after which the job is aborted with a message naming the collective and
  the rank(s) that stopped responding.

MPI comes from the optional extra: ``pip install "fastdl[mpi]"`` (``mpi4py``
plus the ``mpich`` wheel, which ships ``mpiexec``; no system MPI needed).
"""
from __future__ import annotations

import contextlib
import math
import os
import sys
import time
import traceback
from typing import Any, Iterator

import numpy as np

from .backends.contract import GOLDEN, MASK64, mix64_int

#: environment variables set by MPI launchers (MPICH/Hydra, Intel MPI, Open MPI, PMIx, Slurm)
_LAUNCHER_VARS = ("PMI_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "MPI_LOCALRANKID")


class DistributedError(RuntimeError):
    """MPI is missing or misused."""


# ---------------------------------------------------------------------------- communicators


class Communicator:
    """What data-parallel training needs from a process group.

    ``allreduce`` and ``bcast`` work in place on contiguous NumPy arrays.
    This base class is the trivial group of one process.
    """

    rank: int = 0
    size: int = 1
    name: str = "single"

    def allreduce(self, buf: np.ndarray) -> np.ndarray:
        """Sum ``buf`` over all ranks, in place; returns ``buf``."""
        return buf

    def bcast(self, buf: np.ndarray, root: int = 0) -> np.ndarray:
        """Overwrite ``buf`` with ``root``'s ``buf``, in place; returns ``buf``."""
        return buf

    def bcast_object(self, obj: Any, root: int = 0) -> Any:
        """``root``'s (picklable) ``obj`` on every rank."""
        return obj

    def barrier(self) -> None:
        pass

    def abort(self, message: str, code: int = 1) -> None:
        """Stop every rank of the job now (never returns)."""
        print(message, file=sys.stderr, flush=True)
        os._exit(code)

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    def __repr__(self) -> str:
        return f"{type(self).__name__}(rank={self.rank}, size={self.size})"


def _import_mpi():
    try:
        from mpi4py import MPI
    except ImportError as exc:
        raise DistributedError(
            "distributed training needs mpi4py and an MPI library: pip install 'fastdl[mpi]' "
            f"(mpi4py + the mpich wheel); import failed: {exc}") from None
    return MPI


#: seconds a collective may take by default before the job is aborted (PyTorch's process groups: 30 min)
DEFAULT_TIMEOUT = 1800.0
#: point-to-point tags of the heartbeat that names an unresponsive rank (on the job's communicator;
#: MPI guarantees tags up to 32767)
_HB_QUERY, _HB_REPLY = 32101, 32102
_KINDS = ("all-reduce", "broadcast", "object broadcast", "barrier")


def resolve_timeout(timeout: float | None = None) -> float | None:
    """The collective timeout in seconds, or None for none (blocking collectives).

    ``timeout`` if given, else the ``FASTDL_MPI_TIMEOUT`` environment variable,
    else :data:`DEFAULT_TIMEOUT` (30 minutes); 0 means no timeout.
    """
    source = "timeout"
    if timeout is None:
        env = os.environ.get("FASTDL_MPI_TIMEOUT", "").strip()
        if not env:
            return DEFAULT_TIMEOUT
        source = "FASTDL_MPI_TIMEOUT"
        try:
            timeout = float(env)
        except ValueError:
            raise ValueError(f"FASTDL_MPI_TIMEOUT must be a number of seconds (0 = no timeout), "
                             f"got {env!r}") from None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or math.isnan(timeout) or timeout < 0:
        raise ValueError(f"{source} must be a number of seconds >= 0 (0 = no timeout), got {timeout!r}")
    return None if timeout == 0 or math.isinf(timeout) else float(timeout)


class MPICommunicator(Communicator):
    """An MPI communicator (default ``MPI.COMM_WORLD``) through ``mpi4py``.

    Parameters
    ----------
    comm : mpi4py communicator, optional
    timeout : float, optional
        Seconds any collective (all-reduce, broadcast, object broadcast,
        barrier) may take before the whole job is aborted: a peer died
        without MPI noticing, was stopped, or is stuck. Default: the
        ``FASTDL_MPI_TIMEOUT`` environment variable, else 1800 s (like
        PyTorch's process groups); 0 = no timeout (blocking collectives).

    With a timeout, collectives are the non-blocking MPI calls completed by
    a polling loop (the measured cost is in the README). On a timeout the
    rank asks every other rank, point to point, which collective it is
    waiting in; the abort message names the collective, and the ranks that
    did not answer (stopped, dead, or busy outside fastdl's collectives) or
    that wait in a different collective.
    """

    name = "mpi"

    def __init__(self, comm=None, timeout: float | None = None):
        self.MPI = _import_mpi()
        self.comm = comm if comm is not None else self.MPI.COMM_WORLD
        self.rank = self.comm.Get_rank()
        self.size = self.comm.Get_size()
        self.timeout = resolve_timeout(timeout)
        self._seq = 0                      # collectives started by this rank (the same on every rank)
        self._kind = -1                    # index into _KINDS of the collective being waited for
        self._hb_out: list[Any] = []       # pending heartbeat sends (kept alive until complete)
        self._hb_buf = np.zeros(3, np.int64)

    # -- the polling loop -------------------------------------------------------------
    def _wait(self, req, kind: int, nbytes: int) -> None:
        """Complete ``req`` or abort the job after ``self.timeout`` seconds."""
        if req.Test():  # small messages are often done at once: no clock read at all
            return
        self._kind = kind
        start = time.monotonic()
        deadline = start + self.timeout
        next_hb = start + 0.05
        spins = 0
        while not req.Test():
            spins += 1
            if spins > 1000:  # after ~1000 polls (tens of us) stop burning the core another rank may need
                now = time.monotonic()
                if now >= next_hb:  # answer heartbeat queries of ranks that timed out (cheap, 20 Hz)
                    self._answer_heartbeats()
                    next_hb = now + 0.05
                if now > deadline:
                    self.abort(self._timeout_message(kind, nbytes))
                time.sleep(2e-5)
        self._kind = -1

    def _answer_heartbeats(self) -> None:
        MPI = self.MPI
        status = MPI.Status()
        while self.comm.Iprobe(source=MPI.ANY_SOURCE, tag=_HB_QUERY, status=status):
            q = np.empty(3, np.int64)
            self.comm.Recv(q, source=status.Get_source(), tag=_HB_QUERY)
            reply = np.array([self.rank, self._seq, self._kind], np.int64)
            self._hb_out.append((self.comm.Isend(reply, dest=status.Get_source(), tag=_HB_REPLY), reply))
        self._hb_out = [(r, b) for r, b in self._hb_out if not r.Test()]

    def _timeout_message(self, kind: int, nbytes: int) -> str:
        what = f"{_KINDS[kind]} #{self._seq}" + (f" of {nbytes} bytes" if nbytes else "")
        head = (f"fastdl.distributed: rank {self.rank}/{self.size}: {what} did not complete within "
                f"{self.timeout:g} s (FASTDL_MPI_TIMEOUT / timeout=)")
        try:
            diagnosis = self._heartbeat()
        except Exception as exc:  # noqa: BLE001 - the diagnosis is best effort; the abort is not
            diagnosis = f"(no heartbeat diagnosis: {type(exc).__name__}: {exc})"
        return f"{head}; {diagnosis}. Aborting the job."

    def _heartbeat(self, grace: float | None = None) -> str:
        """Ask every other rank where it is; say who did not answer or waits elsewhere."""
        MPI = self.MPI
        grace = min(10.0, max(1.0, self.timeout / 10)) if grace is None else grace
        others = [r for r in range(self.size) if r != self.rank]
        query = np.array([self.rank, self._seq, self._kind], np.int64)
        sends = [self.comm.Isend(query, dest=r, tag=_HB_QUERY) for r in others]
        answers: dict[int, tuple[int, int]] = {}
        status = MPI.Status()
        end = time.monotonic() + grace
        while len(answers) < len(others) and time.monotonic() < end:
            if self.comm.Iprobe(source=MPI.ANY_SOURCE, tag=_HB_REPLY, status=status):
                a = np.empty(3, np.int64)
                self.comm.Recv(a, source=status.Get_source(), tag=_HB_REPLY)
                answers[int(a[0])] = (int(a[1]), int(a[2]))
            else:
                self._answer_heartbeats()
                time.sleep(1e-3)
        del sends  # never waited for: the job is about to be aborted
        silent = [r for r in others if r not in answers]
        elsewhere = [f"rank {r} waits in {_KINDS[k] if 0 <= k < len(_KINDS) else 'no collective'} #{seq}"
                     for r, (seq, k) in sorted(answers.items()) if (seq, k) != (self._seq, self._kind)]
        parts = []
        if silent:
            parts.append(f"rank{'s' if len(silent) > 1 else ''} {', '.join(map(str, silent))} did not answer a "
                         f"heartbeat within {grace:g} s (stopped, dead, or busy outside fastdl's collectives)")
        parts.extend(elsewhere)
        if not parts:
            parts.append("every rank answered from this same collective (MPI itself is stuck)")
        return "; ".join(parts)

    # -- collectives ------------------------------------------------------------------
    def allreduce(self, buf: np.ndarray) -> np.ndarray:
        if self.size == 1:
            return buf
        MPI = self.MPI
        self._seq += 1
        if self.timeout is None:
            self.comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
        else:
            self._wait(self.comm.Iallreduce(MPI.IN_PLACE, buf, op=MPI.SUM), 0, buf.nbytes)
        return buf

    def bcast(self, buf: np.ndarray, root: int = 0) -> np.ndarray:
        if self.size == 1:
            return buf
        self._seq += 1
        if self.timeout is None:
            self.comm.Bcast(buf, root=root)
        else:
            self._wait(self.comm.Ibcast(buf, root=root), 1, buf.nbytes)
        return buf

    def bcast_object(self, obj: Any, root: int = 0) -> Any:
        if self.size == 1:
            return obj
        if self.timeout is None:
            self._seq += 1
            return self.comm.bcast(obj, root=root)
        import pickle  # between the ranks of one job only (as mpi4py's own bcast does); never in files

        data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL) if self.rank == root else b""
        n = np.array([len(data)], np.int64)
        self._seq += 1
        self._wait(self.comm.Ibcast(n, root=root), 2, n.nbytes)
        buf = np.frombuffer(bytearray(data), np.uint8) if self.rank == root else np.empty(int(n[0]), np.uint8)
        self._seq += 1
        self._wait(self.comm.Ibcast(buf, root=root), 2, buf.nbytes)
        return obj if self.rank == root else pickle.loads(buf.tobytes())

    def barrier(self) -> None:
        if self.size == 1:
            return
        self._seq += 1
        if self.timeout is None:
            self.comm.Barrier()
        else:
            self._wait(self.comm.Ibarrier(), 3, 0)

    def abort(self, message: str, code: int = 1) -> None:
        print(message, file=sys.stderr, flush=True)
        # MPI_Abort makes the launcher kill every rank at once; give its I/O forwarder a moment to
        # pass the message on first (without this it was lost in about 1 run in 4).
        time.sleep(0.5)
        self.comm.Abort(code)
        os._exit(code)  # pragma: no cover - Abort does not return


_world: Communicator | None = None


def launched_by_mpi() -> bool:
    """True when this process was started by an MPI launcher (``mpiexec``, ``srun``)."""
    return any(v in os.environ for v in _LAUNCHER_VARS)


def world(timeout: float | None = None) -> Communicator:
    """The communicator of all ranks of this job (``MPI.COMM_WORLD``), created once.

    ``timeout``: seconds a collective may take (see :class:`MPICommunicator`;
    default ``FASTDL_MPI_TIMEOUT`` or 30 minutes, 0 = none); passing it again
    changes the existing communicator's timeout.

    Without MPI installed this raises :class:`DistributedError` if the process
    was started by ``mpiexec``, and otherwise returns the one-process group.
    """
    global _world
    if _world is None:
        try:
            _world = MPICommunicator(timeout=timeout)
        except DistributedError:
            if launched_by_mpi():
                raise
            _world = Communicator()
    elif timeout is not None and isinstance(_world, MPICommunicator):
        _world.timeout = resolve_timeout(timeout)
    return _world


def get_communicator(distributed: "bool | Communicator | None") -> Communicator | None:
    """Resolve ``fit(distributed=...)``: None/False -> None, True -> :func:`world`."""
    if distributed is None or distributed is False:
        return None
    if distributed is True:
        return world()
    if isinstance(distributed, Communicator):
        return distributed
    raise TypeError("distributed must be True/False or a fastdl.distributed.Communicator, "
                    f"got {type(distributed).__name__}")


def rank() -> int:
    """This process's rank (0 without MPI). Use ``if fd.distributed.rank() == 0: model.save(...)``."""
    return world().rank if (launched_by_mpi() or _world is not None) else 0


def size() -> int:
    """Number of ranks (1 without MPI)."""
    return world().size if (launched_by_mpi() or _world is not None) else 1


def rank_seed(seed: int, rank: int) -> int:
    """The dropout/augmentation seed of ``rank``: ``seed`` itself on rank 0, a splitmix64 mix otherwise."""
    if rank == 0:
        return seed
    return mix64_int((seed & MASK64) ^ mix64_int(GOLDEN * (rank + 1))) >> 1  # 63 bits: a valid int64


def abort_job(comm: Communicator | None, exc: BaseException) -> None:
    """Abort every rank of the job because ``exc`` was raised on this one (no-op for one process)."""
    if comm is None or comm.size == 1:
        return
    tb = "".join(traceback.format_exception(exc))
    comm.abort(f"{tb}\nfastdl.distributed: rank {comm.rank} of {comm.size} failed with "
               f"{type(exc).__name__}: {exc}\nfastdl.distributed: aborting all {comm.size} ranks (MPI_Abort)")


@contextlib.contextmanager
def abort_on_error(comm: Communicator | None, collective: tuple[type[BaseException], ...] = ()) -> Iterator[None]:
    """Turn an exception on one rank into an abort of the whole job.

    A rank that raises while the others wait in a collective would leave them
    blocked forever; instead print the traceback with the rank and call
    ``MPI_Abort`` (mpiexec then stops every rank and exits non-zero).
    Exceptions in ``collective`` are raised by every rank at the same point
    (e.g. ``TrainingDiverged``, decided on all-reduced gradients) and
    propagate normally.
    """
    if comm is None or comm.size == 1:
        yield
        return
    try:
        yield
    except collective:
        raise
    except BaseException as exc:  # noqa: BLE001 - anything, including KeyboardInterrupt
        abort_job(comm, exc)
        raise


# ---------------------------------------------------------------------------- threads per rank

#: thread settings a user may have chosen; when any is set, fastdl leaves thread counts alone
_THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS")
#: ranks on this node, as MPI launchers report it (MPICH/Intel MPI, Open MPI, PMIx)
_LOCAL_SIZE_VARS = ("MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE", "PMIX_LOCAL_SIZE")


def local_ranks() -> int | None:
    """Number of ranks on this node, from the launcher's environment (None if it does not say)."""
    for v in _LOCAL_SIZE_VARS:
        try:
            n = int(os.environ.get(v, ""))
        except ValueError:
            continue
        if n > 0:
            return n
    return None


def threads_per_rank(comm: Communicator) -> int | None:
    """Cores of this node divided by its ranks, or None to leave thread counts alone.

    Several ranks on one node, each with a BLAS and a Numba pool as wide as the
    node, oversubscribe the cores many times over (measured: a 2-rank step 10x
    slower on 2 cores). Like ``torchrun``, fastdl then limits each rank's pools
    unless the user set one of OMP/OPENBLAS/MKL/NUMBA_NUM_THREADS.
    """
    if comm.size == 1 or any(v in os.environ for v in _THREAD_VARS):
        return None
    local = local_ranks()
    if not local or local == 1:
        return None
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cores = os.cpu_count() or 1
    return max(1, cores // local)


def _limit_threads(n: int | None):
    """Limit BLAS/OpenMP and Numba thread pools to ``n``; returns a function that restores them."""
    if n is None:
        return lambda: None
    restore = []
    try:
        from threadpoolctl import threadpool_limits

        limiter = threadpool_limits(limits=n)
        restore.append(limiter.restore_original_limits)
    except Exception:  # noqa: BLE001 - threadpoolctl missing or confused: keep going with the defaults
        pass
    numba = sys.modules.get("numba")
    if numba is not None:
        try:
            old = numba.get_num_threads()
            numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
            restore.append(lambda: numba.set_num_threads(old))
        except Exception:  # noqa: BLE001
            pass

    def undo():
        for fn in reversed(restore):
            fn()
    return undo


# ---------------------------------------------------------------------------- training helper


def shard(start: int, stop: int, rank: int, size: int) -> tuple[int, int]:
    """Rank ``rank``'s slice of ``range(start, stop)`` split into ``size`` near-equal parts."""
    n = stop - start
    return start + n * rank // size, start + n * (rank + 1) // size


class DataParallel:
    """Per-fit bookkeeping of data-parallel training (used by :func:`fastdl.training.fit`)."""

    def __init__(self, comm: Communicator, model, *, batch_size: int, n_examples: int,
                 sync_batchnorm: bool = False):
        from .layers import BatchNorm

        self.comm = comm
        self.model = model
        self.rank, self.size = comm.rank, comm.size
        self.n_examples = n_examples
        self.global_batch = batch_size * self.size
        self.seed = rank_seed(model.seed, self.rank)
        self.bn_layers = [layer for layer in model.layers if isinstance(layer, BatchNorm)]
        self.sync_batchnorm = bool(sync_batchnorm) and self.size > 1 and bool(self.bn_layers)
        self.bn_comm = comm if self.sync_batchnorm else None
        self.global_sizes: list[int] = []
        self._weighted_loss: list[float] = []
        self._l2_terms: list[float] = []
        self.threads = threads_per_rank(comm)
        self._restore_threads = lambda: None

    def limit_threads(self) -> None:
        """Give each rank its share of the node's cores (see :func:`threads_per_rank`) until :meth:`close`."""
        self._restore_threads = _limit_threads(self.threads)

    def close(self) -> None:
        """Restore the thread pools (called by fit when it ends)."""
        self._restore_threads()
        self._restore_threads = lambda: None

    # -- start ----------------------------------------------------------------
    def local_spans(self) -> list[tuple[int, int]]:
        """This rank's ``(start, stop)`` into the epoch permutation for every global batch."""
        m, G = self.n_examples, self.global_batch
        spans = []
        self.global_sizes = []
        for s in range(0, m, G):
            e = min(s + G, m)
            self.global_sizes.append(e - s)
            spans.append(shard(s, e, self.rank, self.size))
        return spans

    def broadcast_start(self, model, optimizer, history, initial_epoch: int, load) -> int:
        """Make every rank start from rank 0's state; returns the epoch to start from.

        ``load()`` runs on rank 0 only (resume from a checkpoint) and returns
        the epoch to continue from or None; an exception there is re-raised on
        every rank (no rank is left waiting).
        """
        payload: Any = None
        if self.rank == 0:
            try:
                loaded = load()
                payload = ("ok", {
                    "initial_epoch": initial_epoch if loaded is None else loaded,
                    "step_count": model.step_count,
                    "optimizer": optimizer.state_dict(),
                    "history": (history.history, history.epoch, history.batch_cost, history.norms)
                    if loaded is not None else None,
                })
            except Exception as exc:  # noqa: BLE001 - re-raised on every rank below
                payload = ("error", exc)
        payload = self.comm.bcast_object(payload)
        if payload[0] == "error":
            raise payload[1]  # on every rank alike
        info = payload[1]
        with abort_on_error(self.comm):
            self.comm.bcast(model.params)
            self.comm.bcast(model.state)
            if self.rank != 0:
                model.step_count = info["step_count"]
                if info["optimizer"]["arrays"] or info["optimizer"]["t"]:
                    optimizer.load_state_dict(info["optimizer"])
                else:
                    optimizer.reset()
                if info["history"] is not None:
                    h, ep, bc, nm = info["history"]
                    history.history = {k: list(v) for k, v in h.items()}
                    history.epoch, history.batch_cost, history.norms = list(ep), list(bc), nm
        return int(info["initial_epoch"])

    def check_same_run(self, X: np.ndarray, y: np.ndarray, **settings: Any) -> None:
        """Raise ValueError on EVERY rank if the ranks disagree on the data or the settings.

        Ranks with different data sizes or batch sizes would call different
        numbers of collectives and block. Rank 0's values are broadcast, each
        rank flags what differs, and one all-reduce of the flags lets every
        rank decide alike.
        """
        import zlib

        rows = np.ascontiguousarray(np.concatenate([X[:256].reshape(-1).view(np.uint8),
                                                    X[-256:].reshape(-1).view(np.uint8)]))
        ys = np.ascontiguousarray(y).reshape(-1).view(np.uint8)
        sig = {"n_examples": X.shape[0], "n_features": X.shape[1], "n_params": self.model.params.size,
               "data_crc": zlib.crc32(rows), "labels_crc": zlib.crc32(ys)}
        sig.update({k: float(v) for k, v in settings.items()})
        v = np.array(list(sig.values()), np.float64)
        v0 = self.comm.bcast(v.copy())
        flags = (v != v0).astype(np.float64)
        self.comm.allreduce(flags)
        bad = [name for j, name in enumerate(sig) if flags[j]]
        if bad:
            raise ValueError(f"fastdl.distributed: the {self.size} ranks disagree on {', '.join(bad)} "
                             f"(rank {self.rank} has " + ", ".join(f"{n}={sig[n]:g}" for n in bad) + "); "
                             "every rank must call fit with the same data and arguments")

    # -- one step ---------------------------------------------------------------
    def loss_and_grads(self, xb: np.ndarray, yb: np.ndarray, *, step: int, batch: int):
        """Forward/backward on this rank's shard, then ONE all-reduce of ``model.grads``.

        Returns (local mean data loss, L2 term with the global ``m``, local logits or None).
        """
        model = self.model
        M = self.global_sizes[batch]
        m_r = xb.shape[0]
        m_l2 = self.n_examples if model.l2_scale == "dataset" else M
        if m_r == 0:  # a short last batch with fewer rows than ranks
            model.grads[...] = 0
            if self.bn_comm is not None:
                self._phantom_sync_bn()
            data_loss, logits = 0.0, None
            l2_term = model.l2_cost(m_l2)
        else:
            data_loss, l2_term, logits = model._loss_and_grads(
                xb, yb, dropout=True, n_total=self.n_examples, step=step, m_l2=m_l2, grad_scale=m_r / M,
                seed=self.seed, comm=self.bn_comm)
            if not math.isfinite(data_loss):
                model.grads[0] = np.nan  # every rank then sees non-finite gradients and stops alike
        self.comm.allreduce(model.grads)
        self._weighted_loss.append(data_loss * m_r / M)
        self._l2_terms.append(l2_term)
        return data_loss, l2_term, logits

    def _phantom_sync_bn(self) -> None:
        """Take part in the synchronised-BatchNorm collectives with zero rows."""
        self.model.executor.phantom_sync_batchnorm(self.comm)

    # -- end of epoch -------------------------------------------------------------
    def reduce_epoch(self, sum_loss: float, sum_cost: float, n_wrong: int,
                     costs: np.ndarray) -> tuple[float, float, int]:
        """One all-reduce of the epoch's sums, every batch cost and (per-rank BN) the running statistics.

        ``costs`` (this rank's per-batch costs) is overwritten with the costs of the global batches.
        """
        k = len(self._weighted_loss)
        avg_state = self.size > 1 and not self.sync_batchnorm and self.model.state.size > 0
        ns = self.model.state.size if avg_state else 0
        buf = np.empty(3 + k + ns, np.float64)
        buf[0], buf[1], buf[2] = sum_loss, sum_cost, n_wrong
        buf[3:3 + k] = self._weighted_loss
        if avg_state:
            buf[3 + k:] = self.model.state
        self.comm.allreduce(buf)
        if k:
            costs[:k] = buf[3:3 + k] + np.asarray(self._l2_terms)
        if avg_state:
            self.model.state[...] = buf[3 + k:] / self.size
        self._weighted_loss.clear()
        self._l2_terms.clear()
        return float(buf[0]), float(buf[1]), int(round(buf[2]))

    def evaluate(self, X: np.ndarray, y: np.ndarray) -> dict[str, float]:
        """``model.evaluate`` with the rows split over ranks and the sums all-reduced."""
        n = X.shape[0]
        lo, hi = shard(0, n, self.rank, self.size)
        buf = np.zeros(3, np.float64)
        classifier = self.model.loss.classifier
        if hi > lo:
            ev = self.model.evaluate(X[lo:hi], y[lo:hi])
            buf[0] = ev["loss"] * (hi - lo)
            if classifier:
                buf[1] = round(ev["error"] * (hi - lo))
        buf[2] = hi - lo
        self.comm.allreduce(buf)
        out = {"loss": float(buf[0] / buf[2])}
        if classifier:
            out["error"] = float(buf[1] / buf[2])
            out["accuracy"] = 1.0 - out["error"]
        return out


__all__ = [
    "Communicator", "DEFAULT_TIMEOUT", "DataParallel", "DistributedError", "MPICommunicator", "abort_job",
    "abort_on_error", "resolve_timeout",
    "get_communicator", "launched_by_mpi", "local_ranks", "rank", "rank_seed", "shard", "size",
    "threads_per_rank", "world",
]

