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

# Default order for every kernel without an entry in PREFERENCE: Cython first (no JIT at
# start-up). Measured (raw kernels, float32, medians in us; numba/cython > 1: Cython faster):
#   pytest benchmarks/test_bench_kernels.py --benchmark-only --benchmark-min-rounds=5 \
#          --benchmark-max-time=0.3      (sigmoid-BCE row: --benchmark-min-rounds=15)
#   AMD EPYC (Zen 4), 2 cores shared with other jobs (absolute times inflated; same-run ratios)
#   kernel (shape)                        cython     numba   numba/cython
#   softmax-CE loss+grad 128x10              2.8       7.1       2.53
#   softmax-CE loss+grad 512x1000          346       458         1.32
#   sigmoid-BCE loss+grad 4096x1             7.4      80.3      10.9
#   mse loss+grad 512x10                     2.2       2.5       1.11
#   softmax 512x1000                       338       440         1.30
#   activation relu fwd+bwd 512x2048       751       942         1.25
#   activation tanh fwd+bwd 512x2048      3362      3550         1.06
#   batchnorm fwd+bwd 128x512               41.7      48.0       1.15
#   batchnorm fwd+bwd 512x4096            4815      5725         1.19
#   batchnorm infer 512x4096               897      1004         1.12
#   dropout fwd+bwd 128x4096               227       331         1.45
#   dropout fwd+bwd 512x4096              4977      6205         1.25
#   sgd / rmsprop 1M                   108 / 382  111 / 433    1.02 / 1.13
#   adam 1M / 16M                     617 / 66817  674 / 65295  1.09 / 0.98
#   sum_squares 1M / 16M             101 / 7990   93 / 8908    0.93 / 1.11
#   second run, after the GEMM entry point's small-product fix (29e10c4), --benchmark-min-rounds=15:
#   momentum 1M plain / bias-corrected  522 / 589  454 / 578    0.87 / 0.98
#   dense fwd+bwd 128x784->512 relu      8499      7924         0.93
#   dense fwd+bwd 512x2048->2048 relu  380472    347969         0.91
# Every row is a Cython win or within the run-to-run noise of this shared machine (the rows under
# 1 are memory-bound passes and BLAS-bound GEMMs, which both backends run through the same GEMM
# entry point), so no kernel has a PREFERENCE entry: Cython-first also keeps the per-layer path on
# the same kernels as Cython's whole-epoch executor (bit-identical fused and per-layer runs).
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
