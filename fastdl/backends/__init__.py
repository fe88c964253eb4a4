"""Kernel backends behind one contract (see :mod:`fastdl.backends.contract`).

``get_backend(name)`` returns a :class:`Backend`: an object with one
attribute per kernel of the contract. ``reference`` implements everything;
``numba`` and ``cython`` override what they implement and any missing kernel
falls back to the reference. ``auto`` picks, per kernel, the fastest backend
available on this machine (see :mod:`fastdl.backends.auto`).
"""
from __future__ import annotations

import importlib
import os

# libgomp (Numba's "omp" threading layer and the Cython kernels' OpenMP: one runtime per
# process) lets idle threads spin for milliseconds after each parallel region by default;
# on a shared or oversubscribed machine that stalls the next region and OpenBLAS's threads
# by 10x or more (benchmarks/README.md). A passive policy costs a futex wake-up per region,
# which the kernels' size thresholds absorb. Set here, before any backend can load libgomp;
# an explicit user setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
from types import ModuleType, SimpleNamespace
from typing import Callable

from . import reference
from .contract import KERNELS

BACKEND_NAMES: tuple[str, ...] = ("reference", "numba", "cython")
_MODULES = {
    "reference": "fastdl.backends.reference",
    "numba": "fastdl.backends.numba_backend",
    "cython": "fastdl.backends.cython_backend",
}
_cache: dict[str, "Backend"] = {}
_import_errors: dict[str, str] = {}


class BackendUnavailable(RuntimeError):
    """Raised when a backend is asked for by name but cannot be loaded."""


class Backend:
    """A resolved set of kernels: ``backend.dense_forward(...)`` and so on.

    ``sources`` maps each kernel name to the backend that provides it.
    """

    def __init__(self, name: str, kernels: dict[str, Callable], sources: dict[str, str]):
        self.name = name
        self.sources = dict(sources)
        for k, fn in kernels.items():
            setattr(self, k, fn)
        #: the same kernels without argument checks: for executors, which build their own buffers
        self.unchecked = SimpleNamespace(**kernels)

    def __repr__(self) -> str:
        return f"Backend({self.name!r})"


def _load_module(name: str) -> ModuleType | None:
    if name in _import_errors:
        return None
    try:
        return importlib.import_module(_MODULES[name])
    except ImportError as exc:  # missing numba or compiled extension
        _import_errors[name] = f"{type(exc).__name__}: {exc}"
        return None


def available_backends() -> list[str]:
    """Names of the backends that load on this machine."""
    return [n for n in BACKEND_NAMES if _load_module(n) is not None]


def _build(name: str) -> Backend:
    if name == "auto":
        from .auto import choose

        sources = choose(available_backends())
    else:
        if name not in BACKEND_NAMES:
            raise ValueError(f"unknown backend {name!r}; choose one of {BACKEND_NAMES + ('auto',)}")
        mod = _load_module(name)
        if mod is None:
            raise BackendUnavailable(f"backend {name!r} is not available here ({_import_errors[name]}); "
                                     f"use backend='auto' or one of {available_backends()}")
        sources = {k: (name if hasattr(mod, k) else "reference") for k in KERNELS}
    kernels = {k: getattr(_load_module(src), k) for k, src in sources.items()}
    return Backend(name, kernels, sources)


def get_backend(name: "str | Backend" = "auto") -> Backend:
    """Return the kernels of backend ``name`` ('auto', 'reference', 'numba', 'cython')."""
    if isinstance(name, Backend):
        return name
    if not isinstance(name, str):
        raise TypeError(f"backend must be a name (str), got {type(name).__name__}")
    if name not in _cache:
        _cache[name] = _build(name)
    return _cache[name]


def info(name: str = "auto") -> dict[str, dict[str, str]]:
    """Which backend runs each kernel for backend ``name``, and why.

    Returns ``{kernel: {"backend": ..., "why": ...}}``; backends that failed to
    load appear as ``{"unavailable:<backend>": {"backend": <backend>, "why": <error>}}``.
    """
    from .auto import DEFAULT_ORDER, PREFERENCE

    b = get_backend(name)
    avail = available_backends()
    out: dict[str, dict[str, str]] = {}
    for k, src in b.sources.items():
        if name == "auto":
            order = PREFERENCE.get(k, DEFAULT_ORDER)
            why = (f"fastest available in the measured order {order} (fastdl/backends/auto.py); "
                   f"available here: {avail}")
        elif src == name:
            why = f"implemented by the {name} backend"
        else:
            why = f"not implemented by the {name} backend: falls back to {src}"
        out[k] = {"backend": src, "why": why}
    for n, err in _import_errors.items():
        out[f"unavailable:{n}"] = {"backend": n, "why": err}
    return out


__all__ = ["Backend", "BackendUnavailable", "BACKEND_NAMES", "KERNELS", "available_backends",
           "get_backend", "info", "reference"]
