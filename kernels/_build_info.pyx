# cython: language_level=3
"""Facts about how the compiled extensions were built."""

cdef extern from *:
    """
    #ifndef FASTDL_OPENMP
    #define FASTDL_OPENMP 0
    #endif
    """
    int FASTDL_OPENMP

def openmp_enabled() -> bool:
    """True when the extensions were compiled with OpenMP."""
    return bool(FASTDL_OPENMP)
