"""Settings the native runtimes read once, at load time: applied just before fastdl loads them.

``import fastdl`` changes no environment variable and no thread or BLAS
setting. The first time fastdl itself is about to load a native runtime, it
sets, unless the user already did:

* ``OMP_WAIT_POLICY=PASSIVE`` for libgomp (the OpenMP runtime of the Cython
  kernels and of Numba's ``omp`` threading layer): by default libgomp's idle
  threads spin for milliseconds after every parallel region, on the cores the
  BLAS threads and other processes need next (measured on 2 shared cores: a
  2-thread region then waits a scheduler timeslice, ~10 ms, for its worker;
  benchmarks/README.md). A passive policy costs a futex wake-up per region,
  which the kernels' size thresholds absorb. Applied by
  :func:`prepare_openmp`, called before a compiled backend is imported.
* ``MKL_THREADING_LAYER=GNU`` (MKL shares libgomp instead of starting a
  second thread pool), ``MKL_INTERFACE_LAYER=LP64`` (32-bit integers, as
  fastdl's GEMM wrappers pass) and ``MKL_CBWR=AUTO`` (conditional numerical
  reproducibility: the same bits from run to run at a given thread count,
  whatever the arrays' alignment, which bit-exact resume relies on).
  Applied by :func:`prepare_mkl`, called just before fastdl dlopens MKL.

A variable the user set is never changed ("user value kept"). A runtime that
another library loaded first has already read its environment, so setting a
variable then would do nothing: it is left alone and reported as "not
applied: libgomp was already loaded by another library (<path>)".
:func:`report` (and :func:`fastdl.backends.info`) says what happened to each.
"""
from __future__ import annotations

import os
import threading

OPENMP_DEFAULTS: dict[str, str] = {"OMP_WAIT_POLICY": "PASSIVE"}
MKL_DEFAULTS: dict[str, str] = {"MKL_THREADING_LAYER": "GNU", "MKL_INTERFACE_LAYER": "LP64", "MKL_CBWR": "AUTO"}

_lock = threading.Lock()
_status: dict[str, dict[str, str]] = {}
_PENDING = {"OMP_WAIT_POLICY": "not yet: applied when a compiled backend (numba, cython) is first loaded",
            "MKL_THREADING_LAYER": "not yet: applied when fastdl first loads MKL",
            "MKL_INTERFACE_LAYER": "not yet: applied when fastdl first loads MKL",
            "MKL_CBWR": "not yet: applied when fastdl first loads MKL"}


def loaded_libraries(prefix: str) -> list[str]:
    """Paths of the shared libraries mapped into this process whose file name starts with ``prefix``.

    Linux: ``/proc/self/maps``. Elsewhere: the library is looked up by name with
    ``RTLD_NOLOAD`` (found only if already loaded); an empty list if neither works.
    """
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as f:
            paths = {line.split(None, 5)[5].strip() for line in f if line.count(" ") >= 5 and "/" in line}
        return sorted(p for p in paths if os.path.basename(p).startswith(prefix))
    except (OSError, IndexError):
        pass
    noload = getattr(os, "RTLD_NOLOAD", None)
    if noload is None:  # pragma: no cover - Windows: no RTLD_NOLOAD; assume not loaded
        return []
    import ctypes

    names = {"libgomp.so": ["libgomp.so.1", "libgomp.1.dylib"],
             "libmkl_rt": ["libmkl_rt.so.2", "libmkl_rt.so", "libmkl_rt.2.dylib"]}.get(prefix, [])
    found = []
    for n in names:
        try:
            ctypes.CDLL(n, mode=noload)
            found.append(n)
        except OSError:
            continue
    return found


def _apply(defaults: dict[str, str], already: list[str], runtime: str) -> None:
    for var, value in defaults.items():
        if var in _status:
            continue
        user = os.environ.get(var)
        if user is not None:
            _status[var] = {"value": user, "status": f"user value kept ({var}={user})"}
        elif already:
            _status[var] = {"value": "", "status": f"not applied: {runtime} was already loaded by another "
                                                   f"library ({already[0]})"}
        else:
            os.environ[var] = value
            _status[var] = {"value": value, "status": f"applied ({var}={value}) before fastdl loaded {runtime}"}


def prepare_openmp() -> None:
    """Set ``OMP_WAIT_POLICY`` (unless set) before fastdl first loads libgomp. Idempotent, thread-safe."""
    if "OMP_WAIT_POLICY" in _status:
        return
    with _lock:
        # Only a runtime with libgomp's own soname is the one fastdl's extensions and Numba link to;
        # vendored copies (libgomp-<hash>.so in other wheels) are separate runtimes.
        _apply(OPENMP_DEFAULTS, loaded_libraries("libgomp.so"), "libgomp")


def prepare_mkl() -> None:
    """Set the MKL variables (unless set) just before fastdl dlopens MKL. Idempotent, thread-safe."""
    if "MKL_CBWR" in _status:
        return
    with _lock:
        _apply(MKL_DEFAULTS, loaded_libraries("libmkl_rt"), "MKL")


def report() -> dict[str, dict[str, str]]:
    """What happened to each load-time variable: ``{var: {"value": ..., "status": ...}}``."""
    out = {}
    for var in (*OPENMP_DEFAULTS, *MKL_DEFAULTS):
        out[var] = dict(_status.get(var) or {"value": os.environ.get(var, ""), "status": _PENDING[var]})
    return out


__all__ = ["MKL_DEFAULTS", "OPENMP_DEFAULTS", "loaded_libraries", "prepare_mkl", "prepare_openmp", "report"]
