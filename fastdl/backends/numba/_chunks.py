"""The ONE chunk driver of the Numba kernels, and the thresholds that choose serial or parallel.

Every kernel that can run multi-threaded is written once, as a *chunk*
function ``chunk(c, *args)`` that does the work of chunk ``c`` (a range of
elements, of rows, or one row partition of a reduction). :func:`chunked`
turns it into a compiled driver ``run(parallel, n_chunks, *args)`` that
calls the chunk for every ``c`` in ``range(n_chunks)``: in order on the
calling thread, or in a ``prange`` loop when ``parallel`` is true. The
partition is a function of the shapes only, never of the thread count, so
the two ways give the same bits.

Thresholds (elements from which a kernel uses its parallel variant) are not
module globals: they live in an int64 array (slots ``T_*``, names
:data:`THRESHOLD_NAMES`) that a backend object can hold and scope with
:func:`use_thresholds` (a context variable, so it is per thread / task).
The kernels' Python wrappers and the epoch executor read
:func:`current_thresholds`.
"""
from __future__ import annotations

import contextlib
import contextvars
import os
import threading
import types as pytypes
from typing import Iterator

import numpy as np
from numba import prange

from ._cache import jit as _jit, pjit as _pjit

# ------------------------------------------------------------------------------------ thresholds
# Work sizes (elements) from which the prange variant is used; below them the serial variant
# avoids the fork/join cost (tens of microseconds with a passive OpenMP wait policy). Chosen so
# that the serial time at the threshold is roughly 150-300 us on a 2-core machine
# (benchmarks/README.md). A kernel's result does not depend on the choice.
THRESHOLD_NAMES: tuple[str, ...] = (
    "bias_act",            # dense_forward's bias + tanh/sigmoid pass (relu/identity stay serial)
    "act_transcendental",  # activation_forward tanh / sigmoid
    "act_cheap",           # activation_forward relu / identity, activation_backward
    "batchnorm",           # batchnorm_forward_train, batchnorm_backward
    "batchnorm_infer",
    "softmax",             # softmax_cross_entropy, softmax
    "dropout",             # dropout_forward, dropout_backward
    "adam",
    "optimizer",           # sgd, momentum, rmsprop, nesterov
    "sum_squares",
)
(T_BIAS_ACT, T_ACT_TRANS, T_ACT_CHEAP, T_BN, T_BN_INFER, T_SOFTMAX, T_DROPOUT, T_ADAM, T_OPT,
 T_SSQ) = range(len(THRESHOLD_NAMES))
DEFAULT_THRESHOLDS: dict[str, int] = {
    "bias_act": 1 << 18, "act_transcendental": 1 << 18, "act_cheap": 1 << 20, "batchnorm": 1 << 18,
    "batchnorm_infer": 1 << 19, "softmax": 1 << 18, "dropout": 1 << 19, "adam": 1 << 18,
    "optimizer": 1 << 19, "sum_squares": 1 << 21,
}
NEVER = 1 << 62


def threshold_array(enabled: bool = True, **overrides: int) -> np.ndarray:
    """The thresholds as the int64 array the kernels read (slots in :data:`THRESHOLD_NAMES` order).

    ``enabled=False``: every kernel runs serially. ``overrides``: elements per
    name (e.g. ``adam=1 << 20``; 0 forces the parallel variant).
    """
    unknown = set(overrides) - set(THRESHOLD_NAMES)
    if unknown:
        raise ValueError(f"unknown threshold(s) {sorted(unknown)}; choose from {list(THRESHOLD_NAMES)}")
    vals = {**DEFAULT_THRESHOLDS, **{k: int(v) for k, v in overrides.items()}}
    arr = np.array([vals[k] if enabled else NEVER for k in THRESHOLD_NAMES], np.int64)
    if (arr < 0).any():
        raise ValueError(f"thresholds must be >= 0, got {dict(zip(THRESHOLD_NAMES, arr.tolist()))}")
    arr.setflags(write=False)       # shared between contexts: replace, never mutate
    return arr


_DEFAULT = threshold_array()
_SERIAL = threshold_array(False)
_current: contextvars.ContextVar[np.ndarray] = contextvars.ContextVar("fastdl_numba_thresholds",
                                                                      default=_DEFAULT)
_forked = False


def current_thresholds() -> np.ndarray:
    """The thresholds in effect here (all serial in a forked child: see below)."""
    return _SERIAL if _forked else _current.get()


@contextlib.contextmanager
def use_thresholds(thresholds: np.ndarray) -> Iterator[np.ndarray]:
    """Run the block with ``thresholds`` (from :func:`threshold_array`); restored on exit."""
    arr = np.asarray(thresholds, np.int64)
    if arr.shape != (len(THRESHOLD_NAMES),):
        raise ValueError(f"thresholds must have {len(THRESHOLD_NAMES)} slots {THRESHOLD_NAMES}, "
                         f"got shape {arr.shape}")
    arr = arr.copy()
    arr.setflags(write=False)
    token = _current.set(arr)
    try:
        yield arr
    finally:
        _current.reset(token)


def set_parallel(enabled: bool = True, **thresholds: int) -> None:
    """Set the thresholds of the current context (prefer the scoped :func:`use_thresholds`).

    ``set_parallel(False)``: every kernel runs serially; ``set_parallel(True,
    adam=1 << 20)``: the defaults with one override. Results are identical
    either way.
    """
    _current.set(threshold_array(enabled, **thresholds))


def _serial_after_fork() -> None:
    # GNU OpenMP is not fork-safe: a fork()ed child of a process that has run a parallel region
    # is terminated by Numba when it starts one. Children (multiprocessing's fork start method)
    # therefore run the serial variants; same results.
    global _forked
    _forked = True


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_serial_after_fork)

# ------------------------------------------------------------------------------------ partitions
CHUNK = 1 << 15            # elements per chunk of flat element-wise kernels
RED_CHUNK = 1 << 16        # elements per partial sum of sum_squares
ROWS_PER_PART = 64         # BatchNorm / loss rows per partial result (>=)
MAX_PARTS = 16


@_jit
def n_chunks(n, size):
    """How many chunks of ``size`` cover ``n``."""
    return (n + size - 1) // size


@_jit
def part_lo(m, P, p):
    """First row of part p when m rows are cut into P parts (p == P gives m)."""
    return (m * p) // P


@_jit
def parts(m):
    """Number of row partitions of a reduction over m rows (shape-only)."""
    return max(1, min(MAX_PARTS, m // ROWS_PER_PART))


@_jit
def rows_per_chunk(m, n):
    """Rows per chunk of a row-wise element pass (about CHUNK elements)."""
    return max(1, min(m, CHUNK // max(n, 1)))


@_jit
def flat_bounds(c, n, size):
    """[lo, hi) of chunk c of ``size`` elements over n."""
    lo = c * size
    return lo, min(n, lo + size)


_scratch_local = threading.local()


def scratch(size: int) -> np.ndarray:
    """A float64 work array of ``size`` elements, reused across calls (one per thread): the
    BatchNorm kernels' partial sums, so a training step allocates nothing."""
    buf = getattr(_scratch_local, "buf", None)
    if buf is None or buf.size < size:
        buf = np.empty(max(size, 1024))
        _scratch_local.buf = buf
    return buf[:size]


# ------------------------------------------------------------------------------------ the driver


def _parallel_template(nch, *args):
    for c in prange(nch):
        _chunk(c, *args)  # noqa: F821  (bound per chunk function by chunked())


def _run_template(parallel, nch, *args):
    if parallel:
        _par(nch, *args)  # noqa: F821
    else:
        for c in range(nch):
            _chunk(c, *args)  # noqa: F821


def _bind(template, name: str, qualname: str, env: dict):
    # A copy of the template whose globals name this chunk function. Not a closure: Numba's cache
    # key hashes a closure's cells by pickling them, which differs in every process (never a hit).
    fn = pytypes.FunctionType(template.__code__, {**globals(), **env}, name)
    fn.__qualname__ = qualname
    fn.__module__ = __name__
    return fn


def chunked(chunk):
    """Compile the driver ``run(parallel, n_chunks, *args)`` of a chunk function (see module docstring).

    Used as a decorator under ``@jit``: ``chunk`` is a compiled function
    ``chunk(c, *args)``. Each driver is cached under its own name
    (``<module>.<chunk>.run``).
    """
    base = f"{chunk.py_func.__module__.rsplit('.', 1)[-1]}.{chunk.py_func.__name__}"
    par = _pjit(_bind(_parallel_template, "par", base + ".par", {"_chunk": chunk}))
    run = _jit(_bind(_run_template, "run", base + ".run", {"_chunk": chunk, "_par": par}))
    run.chunk = chunk
    return run


__all__ = ["THRESHOLD_NAMES", "DEFAULT_THRESHOLDS", "NEVER", "CHUNK", "RED_CHUNK", "ROWS_PER_PART", "MAX_PARTS",
           "chunked", "current_thresholds", "flat_bounds", "n_chunks", "part_lo", "parts", "rows_per_chunk",
           "scratch", "set_parallel", "threshold_array", "use_thresholds"]
