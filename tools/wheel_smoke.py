"""Smoke check of an installed wheel (cibuildwheel's test-command), away from the source tree:
the Cython backend loads, is complete, and agrees with the reference on a few kernels."""
import numpy as np

from fastdl._build_info import openmp_enabled
from fastdl.backends import get_backend
from fastdl.backends import reference as ref

be = get_backend("cython")
assert set(be.sources.values()) == {"cython"}, be.sources
rng = np.random.default_rng(0)
Z = rng.standard_normal((300, 10)).astype(np.float32)
y = rng.integers(0, 10, 300)
d1, d2 = np.empty_like(Z), np.empty_like(Z)
l1, l2 = be.softmax_cross_entropy(Z, y, d1), ref.softmax_cross_entropy(Z, y, d2)
assert abs(l1 - l2) <= 1e-5 * abs(l2) and np.allclose(d1, d2, rtol=1e-5, atol=1e-7)
W, b = rng.standard_normal((10, 7)).astype(np.float32), np.zeros(7, np.float32)
o1, o2 = np.empty((300, 7), np.float32), np.empty((300, 7), np.float32)
be.dense_forward(Z, W, b, 1, o1)
ref.dense_forward(Z, W, b, 1, o2)
assert np.allclose(o1, o2, rtol=1e-5, atol=1e-5)
m1, m2 = np.empty((300, 10), np.uint8), np.empty((300, 10), np.uint8)
be.dropout_forward(Z, 0.7, 1, 2, 3, m1, d1)
ref.dropout_forward(Z, 0.7, 1, 2, 3, m2, d2)
assert (m1 == m2).all()
print("fastdl cython backend OK; openmp:", openmp_enabled())
