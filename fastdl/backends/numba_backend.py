"""TEMPORARY re-export shim (helper N): the Numba backend is the package :mod:`fastdl.backends.numba`.

Kept only until the remaining importers (tests/test_conformance.py, tests/test_blas.py,
benchmarks/conftest.py) import ``fastdl.backends.numba``; then deleted. No code of its own.
"""
from __future__ import annotations

from .numba import *  # noqa: F401,F403
from .numba import DEFAULT_THRESHOLDS as PARALLEL_THRESHOLDS  # noqa: F401
from .numba import __all__ as _all
from .numba.dense import _numpy_gemm_standins  # noqa: F401

__all__ = list(_all) + ["PARALLEL_THRESHOLDS"]
