"""fastdl's own AVX512-BF16 GEMM (kernels/fastdl_bf16gemm.h, issue 13) and the routing of the bf16 GEMM.

The kernel computes C = alpha * round_bf16(op(A)) @ round_bf16(op(B)) + beta * C with vdpbf16ps (float32
accumulation). Products of two bf16 values are exact in float32, so it must agree with "round the operands,
multiply in float64" to float32 accumulation error. The kernel tests skip on CPUs without AVX512_BF16 (or
builds without the kernel); the routing and fallback tests run everywhere.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from fastdl.backends import blas

_blas = pytest.importorskip("fastdl._kernels._blas")

HAVE_KERNEL = _blas.bf16_kernel_available()
needs_kernel = pytest.mark.skipif(not HAVE_KERNEL, reason="this CPU has no AVX512_BF16 (or this build lacks "
                                  "fastdl's AVX512-BF16 kernel): nothing to run it on")


def round_bf16(x: np.ndarray) -> np.ndarray:
    """float32 rounded to the nearest bfloat16 (ties to even), as float32; NaN stays NaN."""
    u = np.ascontiguousarray(x, np.float32).view(np.uint32).astype(np.uint64)
    r = (((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16).astype(np.uint32).view(np.float32)
    return np.where(np.isnan(x), np.float32(np.nan), r)


@pytest.fixture
def kernel():
    """Route every bf16 product to fastdl's kernel (mode 2) for the test; restore the routing after."""
    blas.select()
    prev = _blas.set_bf16_kernel(2)
    addr = _blas.bf16_gemm_routed()
    try:
        yield
    finally:
        _blas.set_bf16_kernel(prev)
        assert _blas.bf16_gemm_routed() == addr


def _operands(rng, M, N, K, ta, tb, pad=0):
    """op(A) (M x K) and op(B) (K x N) as float32 arrays; with pad > 0, views of wider arrays (ld > cols)."""
    A = rng.standard_normal((K, M + pad) if ta else (M, K + pad)).astype(np.float32)
    B = rng.standard_normal((N, K + pad) if tb else (K, N + pad)).astype(np.float32)
    if pad:
        A = A[:, :M] if ta else A[:, :K]
        B = B[:, :K] if tb else B[:, :N]
    return A, B


def _reference(A, B, ta, tb):
    """(round(op(A)) @ round(op(B)) in float64, sum of |terms| in float64)."""
    a, b = round_bf16(A).astype(np.float64), round_bf16(B).astype(np.float64)
    a, b = (a.T if ta else a), (b.T if tb else b)
    return a @ b, np.abs(a) @ np.abs(b)


SIZES = [1, 2, 3, 17, 31, 33, 65, 129]


@needs_kernel
@pytest.mark.parametrize("ta,tb", [(0, 0), (0, 1), (1, 0), (1, 1)])
@pytest.mark.parametrize("M,N,K", [(1, 1, 1), (1, 33, 65), (1, 1, 129), (2, 3, 17), (3, 2, 2), (17, 31, 33),
                                   (31, 65, 3), (33, 17, 129), (65, 129, 31), (129, 33, 1), (14, 32, 64),
                                   (15, 64, 300), (200, 70, 257)])
def test_matches_emulation(kernel, M, N, K, ta, tb):
    rng = np.random.default_rng(M * 7919 + N * 31 + K + 2 * ta + tb)
    A, B = _operands(rng, M, N, K, ta, tb)
    C = np.full((M, N), np.nan, np.float32)   # beta = 0: C is not read (NaN there must not leak)
    _blas.gemm_bf16(A, B, C, ta, tb)
    ref, mag = _reference(A, B, ta, tb)
    # float32 accumulation of K exact products: at most ~K * 2^-24 of the sum of |terms|
    assert np.all(np.abs(C - ref) <= mag * (K + 2) * 2.0 ** -24 + 1e-30), np.abs(C - ref).max()
    if K > 1:   # it really rounded the operands (bf16 vs float32 differ by ~2^-8 relative)
        exact32 = (A.T if ta else A).astype(np.float64) @ (B.T if tb else B)
        assert np.abs(C - exact32).max() > 10 * np.abs(C - ref).max()


@needs_kernel
@pytest.mark.parametrize("ta,tb", [(0, 0), (0, 1), (1, 0), (1, 1)])
@pytest.mark.parametrize("alpha,beta", [(1.0, 1.0), (0.5, -2.0), (-1.25, 0.0), (0.0, 0.75)])
@pytest.mark.parametrize("M,N,K", [(1, 17, 33), (31, 65, 17), (129, 3, 66)])
def test_alpha_beta_and_leading_dimensions(kernel, M, N, K, ta, tb, alpha, beta):
    """C = alpha * op(A) op(B) + beta * C with every operand a view whose row stride exceeds its row (ld > cols)."""
    rng = np.random.default_rng(M + N + K)
    A, B = _operands(rng, M, N, K, ta, tb, pad=5)
    big = rng.standard_normal((M, N + 3)).astype(np.float32)
    before = big.copy()
    C = big[:, :N]
    C0 = C.copy()
    _blas.gemm_bf16(A, B, C, ta, tb, alpha=alpha, beta=beta)
    ref, mag = _reference(A, B, ta, tb)
    want = alpha * ref + beta * C0.astype(np.float64)
    tol = abs(alpha) * mag * (K + 2) * 2.0 ** -24 + np.abs(want) * 2.0 ** -23 + 1e-30
    assert np.all(np.abs(C - want) <= tol), np.abs(C - want).max()
    assert big[:, N:].tobytes() == before[:, N:].tobytes()   # the columns past N (ld > N) are untouched


@needs_kernel
def test_columns_beyond_n_are_untouched(kernel):
    """Masked stores: a C view with ld > N keeps the columns past N (and tails of 32-column panels)."""
    rng = np.random.default_rng(5)
    for N in (1, 15, 16, 17, 33):
        A, B = _operands(rng, 19, N, 40, 0, 0)
        big = np.full((19, N + 40), 7.0, np.float32)
        _blas.gemm_bf16(A, B, big[:, :N])
        assert np.all(big[:, N:] == 7.0), N
        ref, mag = _reference(A, B, 0, 0)
        assert np.all(np.abs(big[:, :N] - ref) <= mag * 42 * 2.0 ** -24 + 1e-30)


@needs_kernel
def test_rounds_like_the_scalar_rounding(kernel):
    """Operand rounding is fdl_f32_to_bf16 bit for bit: ties to even, overflow to inf, inf, NaN (x * 1.0; not -0.0:
    the float32 accumulator starts at +0, so -0.0 * 1 + 0 = +0, as in any GEMM)."""
    x = np.array([1.0, 1 + 2 ** -8, 1 + 3 * 2 ** -8, -(1 + 2 ** -8), 1 + 2 ** -8 + 2 ** -20, -2.5, 3.0e38, 3.4e38,
                  -3.4e38, np.inf, -np.inf, 1.17549435e-38, 0.0, 123.456, -7.77e-10], np.float32)
    for ta in (0, 1):
        A = x.reshape(-1, 1) if not ta else x.reshape(1, -1).copy()
        C = np.empty((x.size, 3), np.float32)
        _blas.gemm_bf16(A, np.ones((1, 3), np.float32), C, ta, 0)
        want = round_bf16(x)
        for j in range(3):
            assert C[:, j].tobytes() == want.tobytes(), (C[:, j], want)
    A = np.array([[np.nan]], np.float32)
    C = np.empty((1, 1), np.float32)
    _blas.gemm_bf16(A, np.ones((1, 1), np.float32), C)
    assert np.isnan(C[0, 0])


@needs_kernel
def test_nan_and_inf_propagate(kernel):
    rng = np.random.default_rng(11)
    M, N, K = 29, 45, 70
    A, B = _operands(rng, M, N, K, 0, 0)
    A[3, 10] = np.nan          # row 3 of C: NaN
    A[7, 0] = np.inf           # row 7: +-inf where B[0, :] != 0 (no other inf in that row)
    B[5, 40] = np.inf          # column 40: inf times A[:, 5]; with A[7, 5] = 0 -> inf * 0 = NaN at (7, 40)
    A[7, 5] = 0.0
    C = np.zeros((M, N), np.float32)
    _blas.gemm_bf16(A, B, C)
    assert np.all(np.isnan(C[3]))
    want7 = np.where(B[0] > 0, np.inf, -np.inf)
    assert np.array_equal(C[7, :40], want7[:40]) and np.isnan(C[7, 40])
    rows = np.setdiff1d(np.arange(M), [3, 7])
    assert np.all(np.isinf(C[rows, 40]))
    ok = np.setdiff1d(np.arange(N), [40])
    assert np.all(np.isfinite(C[np.ix_(rows, ok)]))


@needs_kernel
def test_denormal_products_flush_to_zero(kernel):
    """vdpbf16ps flushes denormal results and treats bf16 denormal inputs as zero (docs/spec.md section 13):
    a product of 1e-20 * 1e-20 (1e-40, a float32 denormal) is 0 on the kernel, ~1e-40 on the float32 fallback."""
    A = np.full((3, 4), 1e-20, np.float32)
    B = np.full((4, 5), 1e-20, np.float32)
    C = np.empty((3, 5), np.float32)
    _blas.gemm_bf16(A, B, C)
    assert np.all(C == 0)
    _blas.set_bf16_kernel(0)
    _blas.gemm_bf16(A, B, C)
    assert np.all(C > 0) and np.all(C < 1.2e-38)   # the fallback keeps the denormal
    _blas.set_bf16_kernel(2)
    A = np.full((2, 2), 1e-39, np.float32)    # a bf16 denormal operand contributes nothing
    B = np.full((2, 2), 1e30, np.float32)
    _blas.gemm_bf16(A, B, C[:2, :2])
    assert np.all(C[:2, :2] == 0)


@needs_kernel
def test_pre_rounded_entry_is_the_same_kernel(kernel):
    """bf16gemm_pre_rm (operands already bf16) routes to the same kernel: bit-identical results."""
    rng = np.random.default_rng(2)
    for ta, tb in [(0, 0), (1, 0), (0, 1)]:
        A, B = _operands(rng, 67, 45, 91, ta, tb)
        A, B = round_bf16(A), round_bf16(B)
        C1, C2 = np.empty((67, 45), np.float32), np.empty((67, 45), np.float32)
        _blas.gemm_bf16(A, B, C1, ta, tb)
        _blas.gemm_bf16_pre(A, B, C2, ta, tb)
        assert C1.tobytes() == C2.tobytes()


@needs_kernel
def test_run_to_run_bit_identical(kernel):
    rng = np.random.default_rng(3)
    A, B = _operands(rng, 300, 530, 411, 0, 1)
    C1 = np.empty((300, 530), np.float32)
    _blas.gemm_bf16(A, B, C1, 0, 1)
    for _ in range(3):
        C2 = np.empty_like(C1)
        _blas.gemm_bf16(A, B, C2, 0, 1)
        assert C1.tobytes() == C2.tobytes()


_HASH_CODE = textwrap.dedent("""
    import hashlib, sys, numpy as np, fastdl as fd
    from fastdl.backends import blas
    blas.select()
    from fastdl._kernels import _blas
    rng = np.random.default_rng(0)
    out = []
    for (M, N, K, ta, tb) in [(512, 700, 300, 0, 0), (300, 256, 513, 1, 0), (129, 640, 255, 0, 1)]:
        A = rng.standard_normal((K, M) if ta else (M, K)).astype(np.float32)
        B = rng.standard_normal((N, K) if tb else (K, N)).astype(np.float32)
        C = np.empty((M, N), np.float32)
        with fd.backends.use("auto", threads=int(sys.argv[1])):
            _blas.gemm_bf16(A, B, C, ta, tb)
        out.append(hashlib.sha256(C.tobytes()).hexdigest()[:16])
    print(blas.info()["bf16_gemm"].split(" (")[0], *out)
""")


@needs_kernel
def test_bit_identical_across_thread_counts_and_processes():
    """The partition over threads never changes an element's summation order: 1 and 2 threads give the same
    bytes, in fresh processes (checkpoint resume must stay bit-exact)."""
    env = dict(os.environ, FASTDL_BF16_GEMM="avx512")
    runs = [subprocess.run([sys.executable, "-c", _HASH_CODE, str(t)], capture_output=True, text=True, timeout=180,
                           env=dict(env, OMP_NUM_THREADS=str(t))) for t in (1, 2, 2)]
    assert all(p.returncode == 0 for p in runs), [p.stderr for p in runs]
    outs = [p.stdout.split() for p in runs]
    assert outs[0][:3] == ["fastdl", "AVX512-BF16", "kernel"], outs[0]
    assert outs[0] == outs[1] == outs[2]


# ----------------------------------------------------------------------------------- routing (every machine)


def _info_in_subprocess(value: str) -> subprocess.CompletedProcess:
    code = "from fastdl.backends import blas; i = blas.info(); print(i['bf16_gemm'], '|', i['bf16_unit'])"
    env = {k: v for k, v in os.environ.items() if k != "FASTDL_BF16_GEMM"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env=dict(env, FASTDL_BF16_GEMM=value))


def test_forcing_the_kernel_by_environment():
    p = _info_in_subprocess("avx512")
    if HAVE_KERNEL:
        assert p.returncode == 0 and p.stdout.startswith("fastdl AVX512-BF16 kernel"), p.stdout + p.stderr
        assert "every product" in p.stdout and "| AVX512-BF16" in p.stdout
    else:   # info() reports the forced choice as unavailable, naming what is missing
        assert "AVX512_BF16" in p.stdout + p.stderr, p.stdout + p.stderr
    p = _info_in_subprocess("bogus")
    assert p.returncode != 0 and "auto, native, avx512, emulate" in p.stderr


def test_auto_routing_rule():
    """auto: MKL's bf16 GEMM on Intel with a unit; else fastdl's kernel when the CPU has AVX512_BF16 (above a
    size threshold); else the rounding fallback."""
    blas.select()
    mkl = (blas._state.get("provider") == "mkl" and bool(blas._state.get("mkl_bf16"))
           and blas.cpu_bf16_unit() != "" and blas.cpu_vendor() == "GenuineIntel")
    p = _info_in_subprocess("auto")
    assert p.returncode == 0, p.stderr
    if mkl:
        assert p.stdout.startswith("MKL cblas_gemm_bf16bf16f32")
    elif HAVE_KERNEL:
        assert p.stdout.startswith("fastdl AVX512-BF16 kernel") and "above" in p.stdout
        assert f"{_blas.bf16_kernel_threshold():,}" in p.stdout
    else:
        assert p.stdout.startswith("rounding fallback")
    p = _info_in_subprocess("emulate")
    assert p.returncode == 0 and p.stdout.startswith("rounding fallback"), p.stdout + p.stderr


def test_set_bf16_kernel_checks_its_argument():
    with pytest.raises(ValueError, match="mode must be 0, 1 or 2"):
        _blas.set_bf16_kernel(3)
    prev = _blas.bf16_kernel_mode()
    if HAVE_KERNEL:
        assert _blas.set_bf16_kernel(2) == prev and _blas.bf16_kernel_mode() == 2
        _blas.set_bf16_kernel(prev)
    else:
        with pytest.raises(RuntimeError, match="AVX512_BF16"):
            _blas.set_bf16_kernel(2)
        assert _blas.bf16_kernel_mode() == prev == 0


@needs_kernel
def test_threshold_picks_by_shape(kernel):
    """Mode 1 (auto): products up to the threshold take the float32 fallback, larger ones the kernel. Told apart
    by a denormal product, which only the kernel flushes (vdpbf16ps)."""
    _blas.set_bf16_kernel(1)
    t = _blas.bf16_kernel_threshold()
    small_k = max(1, t // (8 * 8))          # 8 x 8 x small_k <= t
    big_k = t // (8 * 8) + 1                # 8 x 8 x big_k > t
    for K, flushed in ((small_k, False), (big_k, True)):
        A = np.zeros((8, K), np.float32)
        B = np.zeros((K, 8), np.float32)
        A[:, 0], B[0, :] = 1e-20, 1e-20
        C = np.empty((8, 8), np.float32)
        _blas.gemm_bf16(A, B, C)
        assert np.all(C == 0) == flushed, (K, C[0, 0])


def test_gemm_bf16_rejects_rows_that_are_not_contiguous():
    A = np.ones((4, 6), np.float32)[:, ::2]
    with pytest.raises(ValueError, match="contiguous rows"):
        _blas.gemm_bf16(A, np.ones((3, 2), np.float32), np.empty((4, 2), np.float32))


def test_empty_k_scales_c_by_beta():
    C = np.full((2, 3), 4.0, np.float32)
    _blas.gemm_bf16(np.empty((2, 0), np.float32), np.empty((0, 3), np.float32), C, beta=0.5)
    assert np.all(C == 2.0)
    _blas.gemm_bf16(np.empty((2, 0), np.float32), np.empty((0, 3), np.float32), C)
    assert np.all(C == 0.0)



@needs_kernel
@pytest.mark.parametrize("backend", ["cython", "numba"])
def test_compiled_backends_run_the_kernel(kernel, backend):
    """Both compiled backends reach the kernel through bf16gemm_rm's address (Numba registers it as a symbol):
    a product of 1e-20 * 1e-20 is flushed to 0 by vdpbf16ps only, so the output shows which GEMM ran."""
    import fastdl as fd

    try:
        K = fd.get_backend(backend)
    except (ImportError, ValueError) as exc:
        pytest.skip(f"backend {backend!r} unavailable: {exc}")
    m, n_in, n_out = 40, 300, 50        # 600,000 multiply-adds: above the auto threshold too
    A = np.full((m, n_in), 1e-20, np.float32)
    W = np.full((n_in, n_out), 1e-20, np.float32)
    out = np.empty((m, n_out), np.float32)
    for mode, flushed in ((2, True), (0, False), (1, True)):
        _blas.set_bf16_kernel(mode)
        K.dense_forward(A, W, np.zeros(n_out, np.float32), 0, out, 1)
        assert np.all(out == 0) == flushed, (backend, mode, out[0, 0])


_FORK_CODE = textwrap.dedent("""
    import os, sys, numpy as np, fastdl as fd
    from fastdl.backends import blas
    blas.select()
    from fastdl._kernels import _blas
    _blas.set_bf16_kernel(2)
    rng = np.random.default_rng(4)
    A = rng.standard_normal((300, 400)).astype(np.float32)
    B = rng.standard_normal((400, 500)).astype(np.float32)
    C = np.empty((300, 500), np.float32)
    with fd.backends.use("auto", threads=2):
        _blas.gemm_bf16(A, B, C)          # the parent has run a 2-thread OpenMP region
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        C2 = np.empty_like(C)
        with fd.backends.use("auto", threads=2):
            _blas.gemm_bf16(A, B, C2)     # GNU OpenMP would hang here in a 2-thread region
        os.write(w, b"same" if C2.tobytes() == C.tobytes() else b"diff")
        os._exit(0)
    os.waitpid(pid, 0)
    print(os.read(r, 4).decode())
""")


@needs_kernel
@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork() on this platform")
def test_forked_child_runs_the_kernel_serially():
    """GNU OpenMP is not fork-safe: in a fork()ed child the kernel runs on the calling thread (same bits)."""
    p = subprocess.run([sys.executable, "-c", _FORK_CODE], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and p.stdout.strip() == "same", p.stdout + p.stderr


@needs_kernel
def test_concurrent_callers_get_the_same_bits(kernel):
    """Two Python threads calling the kernel at once (the GIL is released): one uses the helper threads, the
    other runs on its own thread; both get the bits of a lone call."""
    import threading

    import fastdl as fd

    rng = np.random.default_rng(6)
    shapes = [(300, 260, 211, 0, 0), (257, 300, 190, 1, 1)]
    ops = [_operands(rng, M, N, K, ta, tb) for M, N, K, ta, tb in shapes]
    want = []
    for (A, B), (M, N, K, ta, tb) in zip(ops, shapes):
        C = np.empty((M, N), np.float32)
        _blas.gemm_bf16(A, B, C, ta, tb)
        want.append(C.tobytes())
    errors = []

    def work(i: int) -> None:
        (A, B), (M, N, K, ta, tb) = ops[i], shapes[i]
        C = np.empty((M, N), np.float32)
        for _ in range(20):
            _blas.gemm_bf16(A, B, C, ta, tb)
            if C.tobytes() != want[i]:
                errors.append(i)

    with fd.backends.use("auto", threads=2):
        threads = [threading.Thread(target=work, args=(i,)) for i in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors
