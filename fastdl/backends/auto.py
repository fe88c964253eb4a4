"""How ``backend="auto"`` chooses: a backend per kernel, and a whole-epoch executor.

Per kernel: the first backend of its preference order that loads and
implements the kernel; backends are imported in that order and only as far
as needed (with the Cython extension built, ``auto`` never imports Numba for
its kernels). The reference backend is last and always works.

Whole epoch (:meth:`fastdl.backends.Backend.epoch_executor`): Cython's
executor (a nogil C loop, no JIT), else Numba's, else none (the per-layer
path).
"""
from __future__ import annotations

from types import ModuleType
from typing import Callable

from .contract import KERNELS

# Default order for every kernel without an entry in PREFERENCE. Cython first: in the kernel
# benchmarks (benchmarks/test_bench_kernels.py; table in benchmarks/README.md, medians of one
# run) no Numba kernel is faster than its Cython counterpart beyond the run-to-run noise, and
# Cython costs no JIT compilation at start-up.
DEFAULT_ORDER: tuple[str, ...] = ("cython", "numba", "reference")

# kernel -> preference order, where the measurements favour another backend than DEFAULT_ORDER.
PREFERENCE: dict[str, tuple[str, ...]] = {}

EXECUTOR_ORDER: tuple[str, ...] = ("cython", "numba")


def choose(load: "Callable[[str], ModuleType | None] | list[str]") -> dict[str, str]:
    """Map every kernel to the first backend in its preference order that provides it.

    ``load(name)`` returns the backend's module or ``None`` if it cannot be
    loaded; it is called lazily, only for backends that are still needed.
    A list of available names is accepted too (each counted as implementing
    every kernel).
    """
    if isinstance(load, list):
        names = set(load)
        return {k: next((b for b in PREFERENCE.get(k, DEFAULT_ORDER) if b in names), "reference")
                for k in KERNELS}
    out = {}
    for k in KERNELS:
        for b in PREFERENCE.get(k, DEFAULT_ORDER):
            mod = load(b)
            if mod is not None and callable(getattr(mod, k, None)):
                out[k] = b
                break
        else:
            out[k] = "reference"
    return out
