"""How ``backend="auto"`` chooses a backend for each kernel.

The preference order per kernel comes from benchmark measurements on this
class of machine (see ``benchmarks/README.md``). A backend that is not
available is skipped, so the choice always succeeds (reference last).
"""
from __future__ import annotations

from .contract import KERNELS

# Default order when a kernel has no entry below. Cython first: in the kernel benchmarks
# (benchmarks/README.md, same run, medians) every Cython kernel is as fast as the Numba one
# or faster (softmax-CE 128x10 2.8 us vs 6.0 us; sigmoid-BCE, MSE, softmax 1.5-5x; dense,
# dropout, optimisers within +-10%), and it costs no JIT compilation at start-up.
DEFAULT_ORDER: tuple[str, ...] = ("cython", "numba", "reference")

# kernel -> preference order where the measurements favour another backend. None today:
# BatchNorm fwd+bwd is the closest (128x512: numba 89 us vs cython 97 us; 512x4096: cython
# 4.6 ms vs numba 4.8 ms), within the run-to-run noise of this machine.
PREFERENCE: dict[str, tuple[str, ...]] = {}


def choose(available: list[str]) -> dict[str, str]:
    """Map every kernel to the first available backend in its preference order."""
    out = {}
    for k in KERNELS:
        order = PREFERENCE.get(k, DEFAULT_ORDER)
        out[k] = next((b for b in order if b in available), "reference")
    return out
