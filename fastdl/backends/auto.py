"""How ``backend="auto"`` chooses a backend for each kernel.

The preference order per kernel comes from benchmark measurements on this
class of machine (see ``benchmarks/README.md``). A backend that is not
available is skipped, so the choice always succeeds (reference last).
"""
from __future__ import annotations

from .contract import KERNELS

# Default order when a kernel has no measured entry.
DEFAULT_ORDER: tuple[str, ...] = ("numba", "cython", "reference")

# kernel -> preference order, filled from benchmark results.
PREFERENCE: dict[str, tuple[str, ...]] = {}


def choose(available: list[str]) -> dict[str, str]:
    """Map every kernel to the first available backend in its preference order."""
    out = {}
    for k in KERNELS:
        order = PREFERENCE.get(k, DEFAULT_ORDER)
        out[k] = next((b for b in order if b in available), "reference")
    return out
