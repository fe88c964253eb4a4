"""bfloat16 GEMMs (docs/spec.md "Mixed precision"): the one `_blas` entry point against the emulation.

Products of two bfloat16 values are exact in float32, so every implementation (MKL's native bf16
GEMM, the rounding fallback) must agree with "round the operands, multiply in float64" to float32
accumulation error, not to bf16 tolerance. Nothing here depends on the CPU having a bf16 unit.
"""
from __future__ import annotations

import numpy as np
import pytest

_blas = pytest.importorskip("fastdl._kernels._blas")
from fastdl.backends import blas  # noqa: E402


def round_bf16(x: np.ndarray) -> np.ndarray:
    """Round float32 to the nearest bfloat16 (ties to even), as float32; NaN stays NaN."""
    u = np.ascontiguousarray(x, np.float32).view(np.uint32).astype(np.uint64)
    r = (((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16).astype(np.uint32).view(np.float32)
    return np.where(np.isnan(x), np.float32(np.nan), r)


def test_round_to_nearest_even():
    # 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties go to the even mantissa (1.0)
    x = np.array([1.0, 1 + 2 ** -8, 1 + 3 * 2 ** -8, -2.5, 3.0e38, np.inf, -np.inf, 1e-40], np.float32)
    y = x.copy()
    _blas.bf16_round(y)
    np.testing.assert_array_equal(y[:2], [1.0, 1.0])
    assert y[2] == np.float32(1 + 2 ** -6)
    np.testing.assert_array_equal(y, round_bf16(x))
    z = np.array([np.nan], np.float32)
    _blas.bf16_round(z)
    assert np.isnan(z[0])


@pytest.fixture(params=["native", "emulate"])
def bf16_impl(request):
    """Run a test with MKL's bf16 GEMM (when MKL has it) and with the rounding fallback."""
    blas.select()
    addr = int(blas._state.get("mkl_bf16") or 0)
    if request.param == "native" and not addr:
        pytest.skip("MKL's cblas_gemm_bf16bf16f32 is not available")
    before = _blas.bf16_gemm_routed()
    _blas.set_bf16_gemm(addr if request.param == "native" else 0)
    yield request.param
    _blas.set_bf16_gemm(addr if before else 0)


@pytest.mark.parametrize("M,N,K", [(1, 1, 1), (1, 10, 64), (37, 29, 53), (128, 130, 257), (3, 517, 9)])
@pytest.mark.parametrize("ta,tb", [(0, 0), (0, 1), (1, 0), (1, 1)])
def test_gemm_matches_emulation(bf16_impl, M, N, K, ta, tb):
    rng = np.random.default_rng(M * 1000 + N + K)
    A = rng.standard_normal((K, M) if ta else (M, K)).astype(np.float32)
    B = rng.standard_normal((N, K) if tb else (K, N)).astype(np.float32)
    C = np.full((M, N), np.nan, np.float32)
    _blas.gemm_bf16(A, B, C, ta, tb)
    a, b = round_bf16(A), round_bf16(B)
    ref = (a.T if ta else a).astype(np.float64) @ (b.T if tb else b).astype(np.float64)
    # float32 accumulation of K exact products: about K * 2^-24 of the sum of |terms|
    bound = (np.abs(a.T if ta else a).astype(np.float64) @ np.abs(b.T if tb else b)) * (K + 2) * 2.0 ** -24
    assert np.all(np.abs(C - ref) <= bound + 1e-30)
    assert not np.array_equal(C, (A.T if ta else A) @ (B.T if tb else B))  # it really rounded


def test_gemm_run_to_run_deterministic(bf16_impl):
    rng = np.random.default_rng(3)
    A = rng.standard_normal((128, 784)).astype(np.float32)
    B = rng.standard_normal((784, 512)).astype(np.float32)
    C1 = np.empty((128, 512), np.float32)
    C2 = np.empty_like(C1)
    _blas.gemm_bf16(A, B, C1)
    for _ in range(3):
        _blas.gemm_bf16(A, B, C2)
        np.testing.assert_array_equal(C1, C2)


def test_info_names_the_bf16_unit():
    info = blas.info()
    assert "bf16_gemm" in info and info["bf16_gemm"]
    assert blas.cpu_bf16_unit() in ("AMX", "AVX512-BF16", "")
