"""Which BLAS runs the GEMMs of the compiled backends (Numba and Cython).

Both backends call the row-major wrappers of ``fastdl._kernels._blas``,
which forward to a Fortran ``sgemm_`` / ``dgemm_``:

* ``"mkl"``: Intel MKL, used when the ``mkl`` package is installed
  (``pip install "fastdl[mkl]"``). Its float32 GEMM is 10-30% faster than
  OpenBLAS's at the training shapes on AVX-512 CPUs (benchmarks/RESULTS.md),
  which is most of the time of a medium or large MLP step. It is loaded with
  ``MKL_THREADING_LAYER=GNU`` (it then shares libgomp, the OpenMP runtime of
  the Numba and Cython kernels, instead of starting a second thread pool)
  and ``MKL_CBWR=AUTO`` (conditional numerical reproducibility: the same
  results from run to run with the same thread count, whatever the memory
  alignment of the arrays: resumed training stays bit-identical).
  An explicit user setting of either variable wins; see :mod:`fastdl.backends.runtime`
  (what was applied is reported by ``fastdl.backends.info()``).
* ``"openblas"``: SciPy's OpenBLAS (``scipy.linalg.cython_blas``), always
  available.

Chosen once per process, when a compiled backend is first imported, from
``FASTDL_BLAS``: ``auto`` (default: MKL when installed), ``mkl`` (an error
if it is not installed) or ``openblas``. The reference backend always uses
NumPy's own BLAS. Thread counts follow ``threadpoolctl`` / ``MKL_NUM_THREADS``
/ ``OPENBLAS_NUM_THREADS`` as usual.
"""
from __future__ import annotations

import ctypes
import glob
import os
import sys
import sysconfig

from . import runtime

PROVIDERS = ("mkl", "openblas")
_state: dict[str, object] = {}


def _mkl_candidates() -> list[str]:
    """Where the ``mkl`` wheel (or a system MKL) puts ``libmkl_rt``."""
    dirs = [os.path.join(sys.prefix, "lib"), os.path.join(sysconfig.get_paths()["data"], "lib")]
    try:
        import site

        dirs.append(os.path.join(site.getuserbase(), "lib"))
    except Exception:  # pragma: no cover - site without user base
        pass
    found: list[str] = []
    for d in dict.fromkeys(dirs):
        found += sorted(glob.glob(os.path.join(d, "libmkl_rt.so*")), reverse=True)   # Linux
        found += sorted(glob.glob(os.path.join(d, "libmkl_rt*.dylib")), reverse=True)
    found += sorted(glob.glob(os.path.join(sys.prefix, "Library", "bin", "mkl_rt*.dll")), reverse=True)
    return found


def _load_mkl() -> tuple[int, int, int, tuple[int, int], str]:
    """dlopen MKL (GNU threading, reproducible mode).

    Returns the addresses of sgemm_, dgemm_, MKL_Set_Num_Threads_Local, the JIT GEMM pair, and the path.

    (The lower-case mkl_set_num_threads_local exported by libmkl_rt is the Fortran entry, by reference.)
    """
    # MKL_THREADING_LAYER=GNU, MKL_INTERFACE_LAYER=LP64 (32-bit ints, as the wrappers pass), MKL_CBWR=AUTO,
    # each unless the user set it (reported by fastdl.backends.info()).
    runtime.prepare_mkl()
    errors = []
    for path in _mkl_candidates():
        try:
            lib = ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
            s = ctypes.cast(lib.sgemm_, ctypes.c_void_p).value
            d = ctypes.cast(lib.dgemm_, ctypes.c_void_p).value
            t = ctypes.cast(lib.MKL_Set_Num_Threads_Local, ctypes.c_void_p).value
        except (OSError, AttributeError) as e:
            errors.append(f"{path}: {e}")
            continue
        try:  # JIT kernels for small float32 products (MKL >= 2019 u3)
            jit = (ctypes.cast(lib.mkl_cblas_jit_create_sgemm, ctypes.c_void_p).value,
                   ctypes.cast(lib.mkl_jit_get_sgemm_ptr, ctypes.c_void_p).value)
        except AttributeError:
            jit = (0, 0)
        _state["mkl_lib"] = lib   # keep it loaded
        try:  # bfloat16 GEMM (MKL >= 2020): native on AMX / AVX512-BF16 units
            _state["mkl_bf16"] = ctypes.cast(lib.cblas_gemm_bf16bf16f32, ctypes.c_void_p).value
        except AttributeError:
            _state["mkl_bf16"] = 0
        return s, d, t, jit, path
    raise ImportError("MKL not found (pip install 'fastdl[mkl]')"
                      + (f"; tried: {'; '.join(errors)}" if errors else ""))


def select(choice: str | None = None) -> str:
    """Pick the BLAS (once per process unless ``choice`` is given); returns its name."""
    runtime.prepare_openmp()   # the extensions link libgomp: its load-time settings first
    from fastdl._kernels import _blas

    if choice is None and "provider" in _state:
        return str(_state["provider"])
    choice = (choice or os.environ.get("FASTDL_BLAS", "auto")).strip().lower()
    if choice not in ("auto",) + PROVIDERS:
        raise ValueError(f"FASTDL_BLAS must be one of auto, mkl, openblas; got {choice!r}")
    provider, path = "openblas", ""
    if choice == "auto" and not _mkl_is_fast_here():
        _state["mkl_error"] = (f"MKL not used on this {cpu_vendor() or 'unknown'} CPU: its sgemm takes a generic "
                               "path there, SciPy's OpenBLAS is faster (FASTDL_BLAS=mkl forces it)")
    elif choice in ("auto", "mkl"):
        try:
            s, d, t, jit, path = _load_mkl()
            _blas.set_fortran_gemm(s, d, t, *jit)
            provider = "mkl"
        except ImportError as e:
            if choice == "mkl":
                raise
            _state["mkl_error"] = str(e)
    if provider == "openblas":
        _blas.set_fortran_gemm(0, 0)
    _state["provider"], _state["path"] = provider, path
    _select_bf16(_blas, provider)
    return provider


BF16_CHOICES = ("auto", "native", "avx512", "emulate")


def cpu_bf16_unit() -> str:
    """The CPU's bfloat16 matrix unit: ``'AMX'``, ``'AVX512-BF16'`` or ``''`` (none; from /proc/cpuinfo)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:   # not Linux: ask CPUID through fastdl's kernel (AVX512-BF16 only; AMX needs Linux's flags)
        try:
            from fastdl._kernels import _blas

            return "AVX512-BF16" if _blas.bf16_kernel_available() else ""
        except ImportError:   # extensions not built: assume none (the fallback is always correct)
            return ""
    if "amx_bf16" in flags:
        return "AMX"
    if "avx512_bf16" in flags:
        return "AVX512-BF16"
    return ""


def cpu_vendor() -> str:
    """``vendor_id`` from /proc/cpuinfo (``'GenuineIntel'``, ``'AuthenticAMD'``, ...) or ``''``."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("vendor_id")), "")
    except OSError:
        return ""


def _mkl_is_fast_here() -> bool:
    # MKL runs its AVX-512 / AMX kernels on Intel CPUs only. On an AMD EPYC (Zen 4) its sgemm was
    # 1.3-1.7x slower than SciPy's OpenBLAS in whole training epochs (M 28.8k vs 36.8k, L 2.8k vs
    # 4.8k samples/s, same run, 2 threads; S level), so 'auto' keeps OpenBLAS there. An unknown
    # vendor (non-Linux: no /proc/cpuinfo) keeps the previous default, MKL.
    return cpu_vendor() in ("GenuineIntel", "")


def _select_bf16(_blas, provider: str) -> None:
    """Route ``bf16gemm_rm`` (the bf16 GEMM of both compiled backends) from ``FASTDL_BF16_GEMM``.

    ``auto``: MKL's ``cblas_gemm_bf16bf16f32`` on Intel CPUs with a bf16 unit (MKL runs its AMX /
    AVX512-BF16 code on Intel only); else fastdl's own AVX512-BF16 kernel (kernels/fastdl_bf16gemm.h)
    when the CPU has the instruction, for products above ``_blas.bf16_kernel_threshold()`` multiply-adds
    (below, its packing costs more than it saves); else, and for the small products, the rounding
    fallback (operands rounded to bf16, float32 GEMM). ``native``: MKL's (an error without it);
    ``avx512``: fastdl's kernel for every product (an error without the instruction); ``emulate``: the
    fallback only. Every choice computes the same bf16 products with float32 accumulation (they differ
    in summation order only); the choice depends on the CPU and the shape, never on timing.
    """
    # Measured on an AMD EPYC Zen 4 with AVX512-BF16 (benchmarks/bf16_ceiling.py): MKL's bf16 GEMM was
    # 2-5% slower than the fallback there, fastdl's kernel ~2x faster than both on the L shapes.
    choice = os.environ.get("FASTDL_BF16_GEMM", "auto").strip().lower()
    if choice not in BF16_CHOICES:
        raise ValueError(f"FASTDL_BF16_GEMM must be one of {', '.join(BF16_CHOICES)}; got {choice!r}")
    unit = cpu_bf16_unit()
    address = int(_state.get("mkl_bf16") or 0) if provider == "mkl" else 0
    use = address != 0 and (choice == "native"
                            or (choice == "auto" and unit != "" and cpu_vendor() == "GenuineIntel"))
    if choice == "native" and not address:
        raise ImportError("FASTDL_BF16_GEMM=native needs MKL's cblas_gemm_bf16bf16f32 (pip install 'fastdl[mkl]')")
    own = _blas.bf16_kernel_available()
    if choice == "avx512" and not own:
        raise ImportError("FASTDL_BF16_GEMM=avx512 needs a CPU with AVX512_BF16 (and fastdl built by GCC >= 10 "
                          "or Clang >= 9 for x86-64); this one has none")
    mode = 2 if choice == "avx512" else (1 if choice == "auto" and own and not use else 0)
    _blas.set_bf16_gemm(address if use else 0)
    _blas.set_bf16_kernel(mode)
    _state["bf16_unit"] = unit or ("AVX512-BF16" if own else "")
    if use:
        impl = "MKL cblas_gemm_bf16bf16f32"
    elif mode == 2:
        impl = "fastdl AVX512-BF16 kernel (vdpbf16ps), every product"
    elif mode == 1:
        impl = (f"fastdl AVX512-BF16 kernel (vdpbf16ps) for products above {_blas.bf16_kernel_threshold():,} "
                "multiply-adds; smaller: rounding fallback (operands rounded to bfloat16, float32 GEMM)")
    else:
        impl = "rounding fallback: operands rounded to bfloat16, float32 GEMM"
    _state["bf16_impl"] = impl


def _mkl_serial_after_fork() -> None:
    # MKL's GNU threading layer is libgomp, which is not fork-safe: a fork()ed child whose
    # parent ran a parallel region can hang in its next one. Children run MKL on one thread
    # (like the Numba kernels, see fastdl.backends.numba._chunks._serial_after_fork).
    if _state.get("provider") == "mkl":
        _state["mkl_lib"].MKL_Set_Num_Threads(1)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_mkl_serial_after_fork)


def rowmajor_addresses() -> tuple[int, int]:
    """The addresses of the row-major ``sgemm_rm`` / ``dgemm_rm`` (after :func:`select`)."""
    from fastdl._kernels import _blas

    select()
    return _blas.rowmajor_addresses()


def info() -> dict[str, str]:
    """The BLAS the compiled kernels use: ``{'provider': ..., 'library': ..., 'why': ...}``."""
    try:
        provider = select()
    except ImportError as e:   # extension not built, or a forced choice (FASTDL_BLAS / FASTDL_BF16_GEMM) missing
        return {"provider": "unavailable", "library": "", "why": str(e), "bf16_gemm": f"unavailable: {e}",
                "bf16_unit": cpu_bf16_unit() or "none"}
    if provider == "mkl":
        why = f"FASTDL_BLAS={os.environ.get('FASTDL_BLAS', 'auto')}: MKL found"
    else:
        why = (f"FASTDL_BLAS={os.environ.get('FASTDL_BLAS', 'auto')}"
               + (f"; {_state['mkl_error']}" if "mkl_error" in _state else ""))
    lib = str(_state.get("path") or "scipy.linalg.cython_blas")
    unit = _state.get("bf16_unit") or "none (no AMX or AVX512-BF16: bf16 is slower than float32 here)"
    return {"provider": provider, "library": lib, "why": why, "bf16_gemm": str(_state.get("bf16_impl", "")),
            "bf16_unit": str(unit)}
