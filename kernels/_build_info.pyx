# cython: language_level=3
"""Facts about how the compiled extensions were built."""

cdef extern from "fastdl_build_info.h":
    int FASTDL_OPENMP

def openmp_enabled() -> bool:
    """True when the extensions were compiled with OpenMP."""
    return bool(FASTDL_OPENMP)
