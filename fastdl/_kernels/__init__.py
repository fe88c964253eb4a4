"""Compiled Cython kernels (sources in ``kernels/*.pyx``).

Used through :mod:`fastdl.backends.cython_backend`; not a public API.
"""
