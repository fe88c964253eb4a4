"""Kernel backends behind one typed contract (:class:`fastdl.backends.contract.KernelContract`).

``get_backend(name)`` returns a :class:`Backend` with one entry point per
kernel of the contract:

* ``backend.<kernel>(...)``: the validated public entry point. Arrays of the
  wrong dtype, shape, layout, alignment or byte order are refused with a
  :class:`~fastdl.backends.validate.KernelArgumentError` (a ``ValueError``)
  naming the argument; nothing is written (:mod:`fastdl.backends.validate`).
* ``backend.unchecked.<kernel>(...)``: the raw kernel, for the executors and
  layers, which build their buffers themselves (no per-call overhead).
* ``backend.epoch_executor(plan, batch_size, opt_spec)``: the backend's
  whole-epoch executor of a :class:`fastdl.plan.Plan`, or ``None`` where it
  has none (then ``fit`` runs the per-layer path).

``reference`` implements every kernel; ``numba`` and ``cython`` implement
what they implement and the rest falls back to the reference. ``auto`` picks,
per kernel, the first available backend of a measured preference order
(:mod:`fastdl.backends.auto`), and imports only the backends it picks.

Nothing is loaded and no setting is changed by ``import fastdl``: a compiled
backend is imported the first time it is asked for, and the load-time
settings of its runtimes are applied just before that
(:mod:`fastdl.backends.runtime`). Run-time settings (threads, BLAS, the Numba
kernels' parallel thresholds) are changed for a block of code with
:func:`use`. :func:`info` reports all of it.
"""
from __future__ import annotations

import contextlib
import importlib
import sys
from dataclasses import dataclass, field, replace
from types import ModuleType, SimpleNamespace
from typing import Any, Callable, Iterator

from . import reference, runtime, validate
from .contract import KERNELS, KernelContract

BACKEND_NAMES: tuple[str, ...] = ("reference", "numba", "cython")
# Module paths per backend, first importable wins.
_MODULES: dict[str, tuple[str, ...]] = {
    "reference": ("fastdl.backends.reference",),
    "numba": ("fastdl.backends.numba",),
    "cython": ("fastdl.backends.cython_backend",),
}
_NATIVE = {"numba", "cython"}   # backends that load libgomp (and possibly MKL)
_cache: dict[str, "Backend"] = {}
_modules: dict[str, ModuleType] = {}
_import_errors: dict[str, str] = {}


class BackendUnavailable(RuntimeError):
    """Raised when a backend is asked for by name but cannot be loaded."""


@dataclass(frozen=True)
class BackendConfig:
    """Run-time settings of a backend; change them for a block with :func:`use`.

    ``threads``: thread count of the kernels' OpenMP regions, the BLAS and
    Numba's ``prange`` (``None``: the runtimes' own settings, i.e.
    ``OMP_NUM_THREADS`` etc.). ``blas``: ``"mkl"`` or ``"openblas"`` for the
    compiled backends' GEMMs (``None``: ``FASTDL_BLAS``, default MKL when
    installed). ``parallel``: ``False`` runs every Numba kernel serially.
    ``thresholds``: the Numba kernels' work sizes (elements) from which their
    multi-threaded variant runs, as ``{name: size}`` (names:
    ``fastdl.backends.numba.THRESHOLD_NAMES``). Results never depend on
    any of these (bit-identical), only speed does.
    """

    threads: int | None = None
    blas: str | None = None
    parallel: bool = True
    thresholds: dict[str, int] = field(default_factory=dict)


def _load_module(name: str) -> ModuleType | None:
    if name in _modules:
        return _modules[name]
    if name in _import_errors:
        return None
    if name in _NATIVE:
        runtime.prepare_openmp()   # before libgomp is loaded by the extension or Numba's omp layer
    errors = []
    for path in _MODULES[name]:
        try:
            mod = importlib.import_module(path)
        except ImportError as exc:  # missing numba or compiled extension
            if isinstance(exc, ModuleNotFoundError) and exc.name == path and len(_MODULES[name]) > 1:
                continue    # this layout of the backend does not exist; try the next one
            errors.append(f"{type(exc).__name__}: {exc}")
            break
        _modules[name] = mod
        return mod
    _import_errors[name] = "; ".join(errors) or f"none of {_MODULES[name]} found"
    return None


def available_backends() -> list[str]:
    """Names of the backends that load on this machine (imports each one)."""
    return [n for n in BACKEND_NAMES if _load_module(n) is not None]


class Backend(KernelContract):
    """A resolved set of kernels: ``backend.dense_forward(...)`` and so on (see the module docstring).

    ``sources`` maps each kernel to the backend that provides it; ``config``
    holds the run-time settings (:class:`BackendConfig`, changed with :func:`use`).
    """

    def __init__(self, name: str, kernels: dict[str, Callable], sources: dict[str, str],
                 executor_order: tuple[str, ...] = ()):
        missing = set(KERNELS) - set(kernels)
        if missing:
            raise ValueError(f"backend {name!r} lacks kernel(s) {sorted(missing)}")
        self.name = name
        self.sources = dict(sources)
        self.config = BackendConfig()
        self._executor_order = tuple(executor_order)
        #: the raw kernels, without argument checks: for executors, which build their own buffers
        self.unchecked = SimpleNamespace(**kernels)
        for k in KERNELS:
            # Instance attributes: a plain function call, no bound-method indirection.
            setattr(self, k, validate.checked(k, kernels[k], getattr(reference, k)))

    def epoch_executor(self, plan: Any, batch_size: int, opt_spec: Any) -> Any:
        """The whole-epoch executor of ``plan`` (a :class:`fastdl.plan.EpochExecutor`), or ``None``.

        Forwards to the ``epoch_executor`` function of the first backend of
        :attr:`executor_source`'s order that provides one (``auto``: Cython,
        then Numba); ``None`` when none does (then run the per-layer path).
        """
        src = self.executor_source
        if src is None:
            return None
        return _modules[src].epoch_executor(plan, batch_size, opt_spec)

    def bf16_cores(self) -> SimpleNamespace | None:
        """The Dense cores for bf16 GEMM operands rounded once per step (docs/spec.md section 13), or None.

        ``round_bf16(src, dst)``, ``dense_forward_bf16``, ``dense_backward_bf16`` and ``bf16_gemm_packs``
        (whether a product shape runs on a kernel that packs its operands itself) of the backend that
        runs both ``dense_forward`` and ``dense_backward`` (Cython, Numba); None when it has none (the
        reference, a mixed choice): the per-layer executor then rounds inside every GEMM (the same bits).
        """
        src = self.sources.get("dense_forward")
        mod = _modules.get(src) if src == self.sources.get("dense_backward") else None
        fns = {n: getattr(mod, n, None)
               for n in ("round_bf16", "dense_forward_bf16", "dense_backward_bf16", "bf16_gemm_packs")}
        return SimpleNamespace(**fns) if all(callable(f) for f in fns.values()) else None

    @property
    def executor_source(self) -> str | None:
        """Which backend's whole-epoch executor :meth:`epoch_executor` uses (loads it on first call)."""
        for src in self._executor_order:
            mod = _load_module(src)
            if mod is not None and callable(getattr(mod, "epoch_executor", None)):
                return src
        return None

    def __repr__(self) -> str:
        return f"Backend({self.name!r})"


def _build(name: str) -> Backend:
    from .auto import EXECUTOR_ORDER, choose

    if name == "auto":
        sources = choose(_load_module)
        return Backend(name, {k: getattr(_load_module(src), k) for k, src in sources.items()}, sources,
                       EXECUTOR_ORDER)
    if name not in BACKEND_NAMES:
        raise ValueError(f"unknown backend {name!r}; choose one of {BACKEND_NAMES + ('auto',)}")
    mod = _load_module(name)
    if mod is None:
        raise BackendUnavailable(f"backend {name!r} is not available here ({_import_errors[name]}); "
                                 f"use backend='auto' or one of {available_backends()}")
    sources = {k: (name if callable(getattr(mod, k, None)) else "reference") for k in KERNELS}
    kernels = {k: getattr(mod if src == name else reference, k) for k, src in sources.items()}
    return Backend(name, kernels, sources, (name,) if name != "reference" else ())


def get_backend(name: "str | Backend" = "auto") -> Backend:
    """Return the kernels of backend ``name`` ('auto', 'reference', 'numba', 'cython')."""
    if isinstance(name, Backend):
        return name
    if not isinstance(name, str):
        raise TypeError(f"backend must be a name (str), got {type(name).__name__}")
    if name not in _cache:
        _cache[name] = _build(name)
    return _cache[name]


# --------------------------------------------------------------------------- run-time settings


def _numba_module(b: Backend) -> ModuleType | None:
    return _modules.get("numba") if "numba" in b.sources.values() or b.executor_source == "numba" else None


def _apply(b: Backend, cfg: BackendConfig, stack: contextlib.ExitStack) -> None:
    """Apply ``cfg`` to the runtimes ``b`` uses; register the undo of each change on ``stack``."""
    native = set(b.sources.values()) & _NATIVE or (b.executor_source is not None)
    if cfg.blas is not None:
        if not native:
            raise ValueError(f"blas={cfg.blas!r}: backend {b.name!r} runs no compiled GEMM (the reference "
                             f"backend uses NumPy's BLAS)")
        from . import blas

        before = blas.select()
        blas.select(cfg.blas)
        stack.callback(blas.select, before)
    nb = _numba_module(b)
    if cfg.parallel is not True or cfg.thresholds:
        if nb is None:
            raise ValueError(f"parallel/thresholds set the Numba kernels' multi-threading; backend {b.name!r} "
                             f"runs none")
        # The Numba package keeps its thresholds in a context variable (per thread / task).
        stack.enter_context(nb.use_thresholds(nb.threshold_array(cfg.parallel, **cfg.thresholds)))
    if cfg.threads is not None:
        from threadpoolctl import threadpool_limits

        # OpenMP (the Cython kernels, MKL's GNU layer) and every BLAS loaded in the process.
        stack.enter_context(threadpool_limits(limits=cfg.threads))
        if nb is not None:
            import numba

            before_n = numba.get_num_threads()
            numba.set_num_threads(min(cfg.threads, numba.config.NUMBA_NUM_THREADS))
            stack.callback(numba.set_num_threads, before_n)


@contextlib.contextmanager
def use(backend: "str | Backend" = "auto", *, threads: int | None = None, blas: str | None = None,
        parallel: bool | None = None, thresholds: dict[str, int] | None = None) -> Iterator[Backend]:
    """Change a backend's run-time settings for the duration of a ``with`` block.

    Example::

        with fd.backends.use("numba", threads=1, parallel=False) as K:
            model.fit(X, y)          # a model built with backend="numba"

    Like Thinc's ``use_ops``, but for settings: every model on ``backend``
    sees them inside the block, and the previous settings come back on exit
    (also after an exception). ``threads`` limits OpenMP, BLAS and Numba
    threads; ``blas`` picks the GEMM library of the compiled backends
    (``"mkl"``/``"openblas"``); ``parallel=False`` and ``thresholds`` (keys of
    ``fastdl.backends.numba.THRESHOLD_NAMES``) control when the Numba kernels
    use threads; they are scoped per thread (a context variable). Thread counts
    and the BLAS choice are process-wide in the native runtimes, so those two
    are too: do not enter ``use`` blocks that change them from several threads
    at once. Results do not depend on them.
    Yields the :class:`Backend`; ``backend.config`` shows the settings in force.
    """
    b = get_backend(backend)
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads must be a positive int, got {threads!r}")
    if blas is not None and blas not in ("mkl", "openblas"):
        raise ValueError(f"blas must be 'mkl' or 'openblas', got {blas!r}")
    old = b.config
    new = replace(old, threads=old.threads if threads is None else threads,
                  blas=old.blas if blas is None else blas,
                  parallel=old.parallel if parallel is None else bool(parallel),
                  thresholds=dict(old.thresholds, **(thresholds or {})))
    with contextlib.ExitStack() as stack:
        _apply(b, new, stack)
        b.config = new
        try:
            yield b
        finally:
            b.config = old


# --------------------------------------------------------------------------- reporting


def info(name: str = "auto") -> dict[str, dict[str, str]]:
    """Which backend runs each kernel for backend ``name``, and why; the settings in force.

    Returns a dict of dicts of strings:

    * ``{kernel: {"backend": ..., "why": ...}}`` for every kernel of the contract;
    * ``"epoch_executor"``: ``{"backend": <name or "none">, "why": ...}``;
    * ``"unavailable:<backend>"``: ``{"backend": <backend>, "why": <import error>}``;
    * ``"env:<VAR>"``: ``{"value": ..., "status": ...}`` for each load-time
      variable of :mod:`fastdl.backends.runtime` (applied / user value kept /
      not applied: the runtime was already loaded by another library / not yet);
    * ``"blas"``: the GEMM library of the compiled backends (once loaded);
    * ``"config"``: the backend's run-time settings (:class:`BackendConfig`).
    """
    from .auto import DEFAULT_ORDER, EXECUTOR_ORDER, PREFERENCE

    b = get_backend(name)
    out: dict[str, dict[str, str]] = {}
    for k, src in b.sources.items():
        if name == "auto":
            order = PREFERENCE.get(k, DEFAULT_ORDER)
            why = f"first available in the measured order {order} (fastdl/backends/auto.py)"
        elif src == name:
            why = f"implemented by the {name} backend"
        else:
            why = f"not implemented by the {name} backend: falls back to {src}"
        out[k] = {"backend": src, "why": why}
    ex = b.executor_source
    order = EXECUTOR_ORDER if name == "auto" else b._executor_order
    out["epoch_executor"] = {"backend": ex or "none",
                             "why": (f"first of {order} with a whole-epoch executor" if ex else
                                     f"no whole-epoch executor among {order or '()'}: fit runs the per-layer path")}
    for n, err in _import_errors.items():
        out[f"unavailable:{n}"] = {"backend": n, "why": err}
    for var, rep in runtime.report().items():
        out[f"env:{var}"] = rep
    blas = sys.modules.get("fastdl.backends.blas")
    if blas is not None and "provider" in getattr(blas, "_state", {}):
        out["blas"] = blas.info()
    else:
        out["blas"] = {"provider": "not loaded", "library": "", "why": "no compiled GEMM has run yet"}
    cfg = b.config
    out["config"] = {"threads": str(cfg.threads), "blas": str(cfg.blas), "parallel": str(cfg.parallel),
                     "thresholds": str(dict(cfg.thresholds))}
    return out


__all__ = ["Backend", "BackendConfig", "BackendUnavailable", "BACKEND_NAMES", "KERNELS", "KernelContract",
           "available_backends", "get_backend", "info", "reference", "use"]
