"""The BLAS behind the compiled backends' GEMMs (fastdl.backends.blas, kernels/_blas.pyx)."""
from __future__ import annotations

import ctypes
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

blas = pytest.importorskip("fastdl.backends.blas")
pytest.importorskip("fastdl._kernels._blas", reason="Cython extensions not built")

HAVE_MKL = bool(blas._mkl_candidates())


def _run(code: str, **env: str) -> str:
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=600, env={**os.environ, **env})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_info_names_the_provider_and_why() -> None:
    info = blas.info()
    assert info["provider"] in blas.PROVIDERS
    assert info["why"].startswith("FASTDL_BLAS=")
    choice = os.environ.get("FASTDL_BLAS", "auto")
    want_mkl = HAVE_MKL and (choice == "mkl" or (choice == "auto" and blas._mkl_is_fast_here()))
    assert info["provider"] == ("mkl" if want_mkl else "openblas")


def test_unknown_choice_is_refused() -> None:
    with pytest.raises(ValueError, match="auto, mkl, openblas.*'atlas'"):
        blas.select("atlas")


def test_asking_for_missing_mkl_is_a_clear_error(monkeypatch) -> None:
    before = blas.select()
    monkeypatch.setattr(blas, "_mkl_candidates", lambda: [])
    try:
        with pytest.raises(ImportError, match=r"MKL not found \(pip install 'fastdl\[mkl\]'\)"):
            blas.select("mkl")
        assert blas.select("auto") == "openblas"   # auto falls back
    finally:
        monkeypatch.undo()
        blas.select(before)


KERNEL_CHECK = """
import numpy as np
import fastdl.backends as B
from fastdl.backends import blas, reference
print("PROVIDER", blas.select())
rng = np.random.default_rng(0)
for name in ("cython", "numba"):
    K = B.get_backend(name)
    for dt, tol in ((np.float32, 2e-5), (np.float64, 1e-12)):
        for m, nin, nout in ((1, 3, 2), (7, 33, 17), (130, 300, 65), (64, 1100, 1000)):
            A = rng.standard_normal((m, nin)).astype(dt)
            W = rng.standard_normal((nin, nout)).astype(dt)
            b = rng.standard_normal(nout).astype(dt)
            out, ref = np.empty((m, nout), dt), np.empty((m, nout), dt)
            K.dense_forward(A, W, b, 1, out)
            reference.dense_forward(A, W, b, 1, ref)
            assert np.allclose(out, ref, rtol=tol, atol=tol * np.abs(ref).max()), (name, dt, m, nin, nout)
            dout = rng.standard_normal((m, nout)).astype(dt)
            got = [np.empty((m, nout), dt), np.empty((nin, nout), dt), np.empty(nout, dt), np.empty((m, nin), dt)]
            exp = [np.empty_like(g) for g in got]
            K.dense_backward(A, W, out, dout, 1, 0.01, *got)
            reference.dense_backward(A, W, ref, dout, 1, 0.01, *exp)
            for g, e in zip(got, exp):
                assert np.allclose(g, e, rtol=tol, atol=tol * max(1.0, np.abs(e).max())), (name, dt, m, nin, nout)
print("KERNELS OK")
"""


def test_openblas_provider_kernels_match_reference() -> None:
    out = _run(KERNEL_CHECK, FASTDL_BLAS="openblas")
    assert "PROVIDER openblas" in out and "KERNELS OK" in out


@pytest.mark.skipif(not HAVE_MKL, reason="the mkl package is not installed (pip install 'fastdl[mkl]')")
def test_mkl_provider_kernels_match_reference() -> None:
    out = _run(KERNEL_CHECK, FASTDL_BLAS="mkl")
    assert "PROVIDER mkl" in out and "KERNELS OK" in out


@pytest.mark.skipif(not HAVE_MKL, reason="the mkl package is not installed (pip install 'fastdl[mkl]')")
def test_mkl_results_do_not_depend_on_memory_alignment() -> None:
    # MKL_CBWR=AUTO: without it MKL may pick other kernels for differently aligned
    # operands, and a resumed run would not be bit-identical to an uninterrupted one
    out = _run("""
        import numpy as np
        import fastdl.backends as B
        from fastdl.backends import blas
        assert blas.select() == "mkl"
        K = B.get_backend("cython")
        rng = np.random.default_rng(1)
        A0 = rng.standard_normal((256, 700)).astype(np.float32)
        W0 = rng.standard_normal((700, 300)).astype(np.float32)
        results = []
        for shift in range(4):   # 4-byte steps: every alignment a float32 array can have
            bufA = np.empty(A0.size + 16, np.float32)[shift:shift + A0.size].reshape(A0.shape)
            bufW = np.empty(W0.size + 16, np.float32)[3 - shift:3 - shift + W0.size].reshape(W0.shape)
            bufA[...] = A0
            bufW[...] = W0
            out = np.empty((256, 300), np.float32)
            K.dense_forward(bufA, bufW, np.zeros(300, np.float32), 0, out)
            results.append(out.copy())
        assert all(np.array_equal(results[0], r) for r in results[1:])
        print("ALIGNMENT OK")
    """, FASTDL_BLAS="mkl")
    assert "ALIGNMENT OK" in out


def test_numpy_standins_compute_the_row_major_product() -> None:
    # the Numba backend's GEMMs when fastdl._kernels is not built
    from fastdl.backends.numba import dense as nb

    s_addr, d_addr = nb._numpy_gemm_standins()
    rng = np.random.default_rng(2)
    for dt, addr, ct in ((np.float32, s_addr, ctypes.c_float), (np.float64, d_addr, ctypes.c_double)):
        fn = ctypes.CFUNCTYPE(None, *([ctypes.c_int] * 5), ct, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p,
                              ctypes.c_int, ct, ctypes.c_void_p, ctypes.c_int)(addr)
        for ta in (0, 1):
            for tb in (0, 1):
                for beta in (0.0, 1.0):
                    M, N, K = 5, 4, 3
                    A = rng.standard_normal((K, M) if ta else (M, K)).astype(dt)
                    B = rng.standard_normal((N, K) if tb else (K, N)).astype(dt)
                    C = rng.standard_normal((M, N)).astype(dt)
                    expected = (A.T if ta else A) @ (B.T if tb else B) + beta * C
                    fn(ta, tb, M, N, K, 1.0, A.ctypes.data, A.shape[1], B.ctypes.data, B.shape[1], beta,
                       C.ctypes.data, N)
                    np.testing.assert_allclose(C, expected, rtol=1e-5)
        C = np.full((2, 3), np.nan, dt)   # K = 0: an empty sum, beta = 0 overwrites
        fn(0, 0, 2, 3, 0, 1.0, C.ctypes.data, 1, C.ctypes.data, 3, 0.0, C.ctypes.data, 3)
        assert (C == 0).all()


@pytest.mark.skipif(not HAVE_MKL or not hasattr(os, "fork"), reason="needs MKL and fork()")
def test_forked_child_runs_mkl_on_one_thread() -> None:
    out = _run("""
        import os
        import numpy as np
        import fastdl.backends as B
        from fastdl.backends import blas
        from threadpoolctl import threadpool_info
        assert blas.select() == "mkl"
        K = B.get_backend("cython")
        A = np.ones((512, 512), np.float32); out = np.empty_like(A)
        K.dense_forward(A, A, np.zeros(512, np.float32), 0, out)     # the parent runs MKL's threads
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            K.dense_forward(A, A, np.zeros(512, np.float32), 0, out)  # must not hang
            n = [i["num_threads"] for i in threadpool_info() if i["internal_api"] == "mkl"]
            os.write(w, f"{out[0, 0]:.0f} {n}".encode())
            os._exit(0)
        os.waitpid(pid, 0)
        print("CHILD", os.read(r, 100).decode())
    """, FASTDL_BLAS="mkl")
    assert "CHILD 512 [1]" in out


@pytest.mark.skipif(not HAVE_MKL, reason="the mkl package is not installed (pip install 'fastdl[mkl]')")
def test_mkl_jit_kernels_for_many_small_shapes() -> None:
    # 400 distinct small float32 products: each gets a JIT kernel until the 256-slot
    # table is full, then the plain sgemm; every result must be right, and a repeated
    # shape must give the same bits (the cached kernel)
    out = _run("""
        import numpy as np
        import fastdl.backends as B
        from fastdl.backends import blas
        assert blas.select() == "mkl"
        rng = np.random.default_rng(3)
        for name in ("cython", "numba"):
            K = B.get_backend(name)
            for i in range(400):
                m, k, n = 1 + i % 7, 2 + (i * 7) % 61, 1 + (i * 13) % 40
                A = rng.standard_normal((m, k)).astype(np.float32)
                W = rng.standard_normal((k, n)).astype(np.float32)
                out1, out2 = np.empty((m, n), np.float32), np.empty((m, n), np.float32)
                K.dense_forward(A, W, np.zeros(n, np.float32), 0, out1)
                K.dense_forward(A, W, np.zeros(n, np.float32), 0, out2)
                np.testing.assert_allclose(out1, A.astype(np.float64) @ W, rtol=1e-4, atol=1e-4)
                assert np.array_equal(out1, out2)
        print("JIT OK")
    """, FASTDL_BLAS="mkl")
    assert "JIT OK" in out


def test_forcing_missing_mkl_makes_the_compiled_backends_unavailable_with_the_reason() -> None:
    # FASTDL_BLAS=mkl is a promise: without MKL neither compiled backend silently runs something else
    out = _run("""
        from fastdl.backends import blas
        blas._mkl_candidates = lambda: []
        import fastdl.backends as B
        for name in ("numba", "cython"):
            try:
                B.get_backend(name)
            except B.BackendUnavailable as e:
                assert "MKL not found" in str(e), e
                print("UNAVAILABLE", name)
        K = B.get_backend("auto")
        assert set(K.sources.values()) == {"reference"}
    """, FASTDL_BLAS="mkl")
    assert "UNAVAILABLE numba" in out and "UNAVAILABLE cython" in out
