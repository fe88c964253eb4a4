"""bfloat16 mixed precision (docs/spec.md "Mixed precision (bfloat16)", issue 13).

Products of two bfloat16 values are exact in float32, so every implementation (MKL's native bf16
GEMM, the rounding fallback, the Numba and Cython kernels and epoch executors) must agree with
"round the operands, multiply in float64" to float32 accumulation error, not to bf16 tolerance.
Then: float64 + bf16 refused, save/load, checkpoint + resume bit-exact, gradcheck, search, CLI, MPI,
the no-bf16-unit warning. Nothing here depends on the CPU having a bf16 unit (the native-GEMM cases
skip without MKL's bf16 GEMM; the unit is monkeypatched where it matters) or on timing.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest

import fastdl as fd
from fastdl.backends import blas
from fastdl.backends import reference as ref_kernels
from fastdl.backends.contract import ACTIVATION_CODES as ACTS

_blas = pytest.importorskip("fastdl._kernels._blas")


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


@pytest.fixture(params=["native", "avx512", "emulate"])
def bf16_impl(request):
    """Run a test with MKL's bf16 GEMM (when MKL has it), fastdl's AVX512-BF16 kernel for every product (when the
    CPU has the instruction) and the rounding fallback."""
    blas.select()
    addr = int(blas._state.get("mkl_bf16") or 0)
    if request.param == "native" and not addr:
        pytest.skip("MKL's cblas_gemm_bf16bf16f32 is not available")
    if request.param == "avx512" and not _blas.bf16_kernel_available():
        pytest.skip("no AVX512_BF16 on this CPU (or fastdl's AVX512-BF16 kernel not in this build)")
    before = _blas.bf16_gemm_routed()
    _blas.set_bf16_gemm(addr if request.param == "native" else 0)
    kernel_before = _blas.set_bf16_kernel(2 if request.param == "avx512" else 0)
    yield request.param
    _blas.set_bf16_gemm(addr if before else 0)
    _blas.set_bf16_kernel(kernel_before)


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


# ------------------------------------------------------------------------------------------------------------
# Conformance of every bf16 path with the reference emulation (issue 13), and the rest of the library with bf16.
# Tolerances are float32-accumulation ones: a compiled path and the emulation multiply the SAME bf16 operands
# exactly and differ only in the order of the float32 sums (~K * 2^-24 of the sum of |terms|). The bf16-vs-fp32
# difference is ~2^-8 relative, so these tests fail if a path multiplies unrounded operands.

COMPILED = ("cython", "numba")


def _compiled_backend(name: str):
    """The compiled backend, or a skip when it is not installed/built on this machine."""
    try:
        return fd.get_backend(name)
    except (ImportError, ValueError) as exc:
        pytest.skip(f"backend {name!r} unavailable: {exc}")


def _quiet(fn, *a, **kw):
    with warnings.catch_warnings():   # "no bfloat16 unit" on CPUs without one: bf16 is still correct there
        warnings.simplefilter("ignore", UserWarning)
        return fn(*a, **kw)


def _exact_product(A: np.ndarray, B: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(round(A) @ round(B) in float64, the float32-accumulation error bound of any implementation)."""
    a, b = round_bf16(A).astype(np.float64), round_bf16(B).astype(np.float64)
    K = A.shape[1]
    return a @ b, (np.abs(a) @ np.abs(b)) * 2 * (K + 2) * 2.0 ** -24 + 1e-35


@pytest.mark.parametrize("backend", COMPILED)
@pytest.mark.parametrize("act", ["identity", "relu", "tanh", "sigmoid"])
@pytest.mark.parametrize("m,n_in,n_out", [(1, 45, 33), (1, 1, 1), (67, 45, 33), (3, 517, 9), (130, 257, 65)])
def test_dense_kernels_match_the_emulation(bf16_impl, backend, act, m, n_in, n_out):
    """Forward Z = XW, dW = X^T dZ (+ (l2/m) W in float32), dX = dZ W^T of each compiled backend, with MKL's bf16
    GEMM and with the rounding fallback, against round-then-multiply; batch 1 and odd shapes."""
    K = _compiled_backend(backend)
    rng = np.random.default_rng(m * 7919 + n_in * 31 + n_out)
    A = (rng.standard_normal((m, n_in)) * 1.37).astype(np.float32)   # low mantissa bits set: rounding matters
    W = (rng.standard_normal((n_in, n_out)) / np.sqrt(n_in)).astype(np.float32)
    b = rng.standard_normal(n_out).astype(np.float32)
    dout = rng.standard_normal((m, n_out)).astype(np.float32)
    code = ACTS[act]
    out = np.full((m, n_out), np.nan, np.float32)
    K.dense_forward(A, W, b, code, out, 1)
    Z, bound = _exact_product(A, W)
    Zb = Z + b
    f = {"identity": lambda z: z, "relu": lambda z: np.maximum(z, 0), "tanh": np.tanh,
         "sigmoid": lambda z: 1 / (1 + np.exp(-z))}[act]
    # the activations are 1-Lipschitz: the GEMM's bound carries over, plus a few ulps of the function itself
    assert np.all(np.abs(out - f(Zb)) <= bound + 8 * 2.0 ** -24 * (np.abs(f(Zb)) + 1)), \
        f"{backend} bf16 forward is not round-then-multiply"
    if m * n_in > 4:  # it really rounded: fp32 operands give a result much farther away than the emulation's
        assert np.abs(out - f(A.astype(np.float64) @ W + b)).max() > 50 * np.abs(out - f(Zb)).max()
    out_ref = np.empty_like(out)
    ref_kernels.dense_forward(A, W, b, code, out_ref, 1)
    assert np.all(np.abs(out_ref - f(Zb)) <= bound + 8 * 2.0 ** -24 * (np.abs(f(Zb)) + 1))   # the oracle too
    l2 = 0.05
    dZ, dW, db, dA = (np.full(s, np.nan, np.float32) for s in ((m, n_out), W.shape, b.shape, A.shape))
    K.dense_backward(A, W, out_ref, dout, code, l2, dZ, dW, db, dA, 1)
    rZ, rW, rb, rA = (np.empty_like(x) for x in (dZ, dW, db, dA))
    ref_kernels.dense_backward(A, W, out_ref, dout, code, l2, rZ, rW, rb, rA, 1)
    # elementwise in float32: act'(out) may be computed as 1 - out^2 or (1 - out)(1 + out): a few ulps of |dout|
    assert np.all(np.abs(dZ - rZ) <= 4 * 2.0 ** -24 * np.abs(dout) * (1 + out_ref.astype(np.float64) ** 2))
    # dW, dX from the backend's own dZ (identical to the reference's up to an ulp of tanh/sigmoid')
    gW, bW = _exact_product(A.T, dZ)
    assert np.all(np.abs(dW - (gW + l2 * W)) <= bW + 2 * 2.0 ** -24 * np.abs(l2 * W) + 1e-30)
    gA, bA = _exact_product(dZ, W.T)
    assert np.all(np.abs(dA - gA) <= bA)
    np.testing.assert_allclose(db, dZ.astype(np.float64).sum(0), rtol=0,
                               atol=float(np.abs(dZ).sum() * (m + 2) * 2.0 ** -24) + 1e-30)
    # and the reference kernels (the oracle) meet the same bound: both sides are float32 accumulation
    assert np.all(np.abs(rW - (gW + l2 * W)) <= 2 * bW + 2 * 2.0 ** -24 * np.abs(l2 * W) + 1e-30)


@pytest.mark.parametrize("backend", ("reference",) + COMPILED)
def test_float64_with_bf16_is_refused(backend):
    K = fd.get_backend(backend) if backend == "reference" else _compiled_backend(backend)
    A, W, b = np.ones((4, 3)), np.ones((3, 2)), np.zeros(2)
    with pytest.raises(ValueError, match="float32"):
        K.dense_forward(A, W, b, 0, np.empty((4, 2)), 1)
    with pytest.raises(ValueError, match="float32"):
        K.dense_backward(A, W, np.ones((4, 2)), np.ones((4, 2)), 0, 0.0, np.empty((4, 2)), np.empty((3, 2)),
                         np.empty(2), np.empty((4, 3)), 1)
    with pytest.raises(ValueError, match=r"bf16.*needs dtype='float32'"):
        fd.Sequential([fd.Dense(3, 2)], precision="bf16", dtype="float64", backend=backend)
    bf = _quiet(fd.Sequential, [fd.Dense(3, 2)], precision="bf16", backend=backend)
    with pytest.raises(ValueError, match="float32"):
        bf.copy(dtype="float64")
    assert bf.copy(dtype="float64", precision="fp32").precision == "fp32"


def _net(backend: str, precision: str = "bf16", seed: int = 3, n_features: int = 9, k: int = 3, **kw):
    """BatchNorm + dropout + L2, odd widths: every op kind of the plan next to the bf16 Dense GEMMs."""
    return _quiet(fd.Sequential, [
        fd.Dense(n_features, 13, use_bias=False), fd.BatchNorm(13), fd.ReLU(), fd.Dropout(keep_prob=0.75),
        fd.Dense(13, 7), fd.Tanh(), fd.Dense(7, k)], l2=0.2, precision=precision, backend=backend, seed=seed, **kw)


def _data(m: int, n_features: int = 9, k: int = 3, seed: int = 0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((m, n_features)) * 1.37).astype(np.float32), rng.integers(0, k, m)


@pytest.mark.parametrize("backend", COMPILED)
@pytest.mark.parametrize("m", [1, 29, 300])
def test_per_layer_gradients_match_the_reference(bf16_impl, backend, m):
    """A whole model's gradient (BN, dropout, L2, tanh) on each compiled per-layer path vs the emulation."""
    _compiled_backend(backend)
    X, y = _data(m)
    r = _net("reference")
    Jr = r.compute_gradients(X, y)
    f = _net("reference", "fp32")
    f.compute_gradients(X, y)
    c = _net(backend)
    Jc = c.compute_gradients(X, y)
    scale = float(np.abs(r.grads).max())
    assert Jc == pytest.approx(Jr, rel=1e-5)
    np.testing.assert_allclose(c.grads, r.grads, rtol=0, atol=1e-5 * scale)
    # ... while fp32 GEMMs are far off: the test can tell bf16 from fp32
    assert np.abs(f.grads - r.grads).max() > 20 * 1e-5 * scale


@pytest.mark.parametrize("backend", COMPILED)
def test_native_and_fallback_agree_on_a_model(backend):
    """MKL's bf16 GEMM and round + sgemm: the same model gradient to float32 accumulation error."""
    _compiled_backend(backend)
    blas.select()
    addr = int(blas._state.get("mkl_bf16") or 0)
    if not addr:
        pytest.skip("MKL's cblas_gemm_bf16bf16f32 is not available")
    X, y = _data(200, seed=5)
    before = _blas.bf16_gemm_routed()
    grads = []
    try:
        for route in (addr, 0):
            _blas.set_bf16_gemm(route)
            c = _net(backend)
            c.compute_gradients(X, y)
            grads.append(c.grads.copy())
    finally:
        _blas.set_bf16_gemm(addr if before else 0)
    np.testing.assert_allclose(grads[0], grads[1], rtol=0, atol=1e-5 * float(np.abs(grads[1]).max()))


def _train(model, X, y, *, fused, epochs=2, batch_size=16, **kw):
    opt = fd.Adam(lr=1e-2)
    h = model.fit(X, y, optimizer=opt, epochs=epochs, batch_size=batch_size, fused=fused, **kw)
    return h, opt


@pytest.mark.parametrize("backend", COMPILED)
def test_epoch_executor_bit_identical_to_per_layer(bf16_impl, backend):
    """The whole-epoch executor with bf16 = its backend's per-layer path, bit for bit (BN, dropout, L2, Adam,
    a short last batch of 1 row)."""
    _compiled_backend(backend)
    X, y = _data(49, seed=2)
    a, b = _net(backend), _net(backend)
    ha, oa = _train(a, X, y, fused=True)
    hb, ob = _train(b, X, y, fused=False)
    assert a.params.tobytes() == b.params.tobytes() and a.state.tobytes() == b.state.tobytes()
    for k in oa.state:
        assert oa.state[k].tobytes() == ob.state[k].tobytes()
    assert ha.batch_cost == hb.batch_cost and ha["loss"] == hb["loss"]
    # bf16 really ran: the fp32 model trains to other parameters
    c = _net(backend, "fp32")
    _train(c, X, y, fused=False)
    assert np.abs(c.params - a.params).max() > 1e-4


def test_gemm_choice_by_environment():
    """FASTDL_BF16_GEMM=emulate|native|auto picks the implementation at load (fresh interpreters)."""
    code = "from fastdl.backends import blas; print(blas.info()['bf16_gemm'])"
    env = {k: v for k, v in os.environ.items() if k != "FASTDL_BF16_GEMM"}
    def run(value: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                              env=dict(env, FASTDL_BF16_GEMM=value))
    p = run("emulate")
    assert p.returncode == 0 and "rounding fallback" in p.stdout, p.stderr
    p = run("bogus")
    assert p.returncode != 0 and "FASTDL_BF16_GEMM must be one of auto, native, avx512, emulate" in p.stderr
    blas.select()
    p = run("native")
    if blas._state.get("mkl_bf16"):
        assert p.returncode == 0 and "cblas_gemm_bf16bf16f32" in p.stdout, p.stderr
    else:
        assert "cblas_gemm_bf16bf16f32" in p.stdout + p.stderr   # named in the error / info
    p = run("auto")
    expect_native = (bool(blas._state.get("mkl_bf16")) and blas.cpu_bf16_unit() != ""
                     and blas.cpu_vendor() == "GenuineIntel")
    assert p.returncode == 0 and ("cblas_gemm_bf16bf16f32" in p.stdout) == expect_native, p.stdout + p.stderr


# ------------------------------------------------------------------------------- the library keeps working


def test_save_load_keeps_the_precision(tmp_path):
    X, y = _data(40)
    m = _net("auto")
    _train(m, X, y, fused="auto", epochs=1)
    m.save(tmp_path / "m.npz")
    back = _quiet(fd.load, tmp_path / "m.npz")
    assert back.precision == "bf16" and all(op.precision == 1 for op in back.plan.ops if op.kind == m.plan.ops[0].kind)
    assert back.params.tobytes() == m.params.tobytes()
    np.testing.assert_array_equal(back.decision_function(X), m.decision_function(X))


@pytest.mark.parametrize("backend", COMPILED)
@pytest.mark.parametrize("fused", [True, False])
def test_checkpoint_resume_is_bit_exact(tmp_path, fused, backend):
    """An interrupted bf16 run resumed from its checkpoint = the uninterrupted run, bit for bit (each compiled
    backend, its epoch executor and its per-layer path)."""
    _compiled_backend(backend)
    X, y = _data(70, seed=4)

    class CrashAt(fd.Callback):
        def on_epoch_end(self, model, epoch, logs):
            if epoch == 1:
                raise KeyboardInterrupt

    straight = _net(backend)
    hs, os_ = _train(straight, X, y, fused=fused, epochs=4)
    ck = tmp_path / "ck.npz"
    first = _net(backend)
    with pytest.raises(KeyboardInterrupt):
        _train(first, X, y, fused=fused, epochs=4, checkpoint=ck, callbacks=[CrashAt()])
    again = _net(backend)
    again.params[...] += 1.0   # other initial values: everything comes from the checkpoint
    hr, or_ = _train(again, X, y, fused=fused, epochs=4, checkpoint=ck, resume=True)
    assert again.params.tobytes() == straight.params.tobytes()
    assert again.state.tobytes() == straight.state.tobytes()
    assert again.step_count == straight.step_count and or_.t == os_.t
    for k in os_.state:
        assert or_.state[k].tobytes() == os_.state[k].tobytes()
    assert hr["loss"] == hs["loss"]


def test_gradcheck_checks_the_float64_copy():
    """bf16 rounding is not differentiable: fd.gradcheck checks the float64 fp32 copy (documented), so a correct
    bf16 model passes at float64 tolerance and the model itself is left untouched."""
    X, y = _data(6)
    m = _net("auto")
    before = m.params.copy()
    res = fd.gradcheck(m, X, y)
    assert res.difference < 1e-6
    assert m.params.tobytes() == before.tobytes() and m.precision == "bf16" and m.dtype == np.float32
    assert "float64" in fd.gradcheck.__doc__ and "bf16" in fd.gradcheck.__doc__


def test_search_over_precision():
    from fastdl.search import Choice, search

    X, y = _data(120, seed=6)
    Xd, yd = _data(40, seed=7)
    r = _quiet(search, {"precision": Choice(["fp32", "bf16"]), "epochs": 1, "hidden": (8,)}, X, y,
               validation_data=(Xd, yd), n_trials=4, seed=0)
    seen = {t.settings["precision"] for t in r.trials}
    assert seen == {"fp32", "bf16"}, seen


def test_cli_trains_and_saves_a_bf16_model(tmp_path, capsys):
    from fastdl.cli import main

    out = tmp_path / "m.npz"
    rc = _quiet(main, ["train", "--epochs", "1", "--verbose", "0", "--hidden", "16", "--precision", "bf16",
                       "--save", str(out)])
    assert rc == 0, capsys.readouterr().err
    assert _quiet(fd.load, out).precision == "bf16"
    rc = main(["train", "--epochs", "1", "--verbose", "0", "--precision", "bf16", "--dtype", "float64"])
    assert rc == 2 and "--precision bf16 needs --dtype float32" in capsys.readouterr().err


def test_warns_once_per_process_without_a_bf16_unit():
    """On a CPU without AMX / AVX512-BF16 (simulated: cpu_bf16_unit() == ''), bf16 warns once per process that it
    is slower than float32; with a unit (simulated) it does not warn. Fresh interpreters: 'once' is process state."""
    code = textwrap.dedent("""
        import sys, warnings
        import fastdl as fd
        from fastdl.backends import blas
        blas.cpu_bf16_unit = lambda: sys.argv[1]
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            for _ in range(3):
                fd.Sequential([fd.Dense(3, 2)], precision="bf16")
            fd.Sequential([fd.Dense(3, 2)])
        msgs = [str(x.message) for x in w if "bfloat16" in str(x.message)]
        print(len(msgs), w[0].filename if msgs else "", msgs[0] if msgs else "")
    """)
    none = subprocess.run([sys.executable, "-c", code, ""], capture_output=True, text=True, timeout=120)
    assert none.returncode == 0, none.stderr
    n, _, text = none.stdout.strip().partition(" ")
    assert n == "1", none.stdout
    assert "-c" in text or "<string>" in text     # stacklevel: attributed to the user's line, not fastdl's
    assert "slower than float32" in text and "AMX" in text
    for unit in ("AMX", "AVX512-BF16"):
        has = subprocess.run([sys.executable, "-c", code, unit], capture_output=True, text=True, timeout=120)
        assert has.returncode == 0 and has.stdout.startswith("0"), has.stdout + has.stderr


_MPI_WORKER = textwrap.dedent('''
    import json, os, sys
    import numpy as np
    import fastdl as fd
    from fastdl import distributed as D

    out = sys.argv[1]
    comm = D.world()
    reduced = []                      # (dtype, size) of every all-reduce of a gradient-sized buffer
    real = comm.allreduce
    def spy(buf):
        reduced.append((buf.dtype.str, buf.size))
        return real(buf)
    comm.allreduce = spy
    X, y = fd.datasets.load_digits()
    X = ((X - X.mean(0)) / (X.std(0) + 1e-8)).astype(np.float32)
    m = fd.Sequential([fd.Dense(64, 32, use_bias=False), fd.BatchNorm(32), fd.ReLU(), fd.Dense(32, 10)],
                      precision="bf16", seed=3, l2=0.1)
    m.fit(X[:600], y[:600], optimizer=fd.Adam(lr=3e-3), epochs=2, batch_size=64, distributed=comm,
          sync_batchnorm=True)
    n = m.params.size
    np.savez(os.path.join(out, f"rank{comm.rank}.npz"), params=m.params, state=m.state,
             grad_dtypes=np.array([d for d, s in reduced if s == n]))
''')


def test_mpi_reduces_float32_gradients(tmp_path):
    """Two MPI ranks training a bf16 model: the gradients all-reduced are the float32 master gradients, and the
    ranks end bit-identical."""
    import shutil

    pytest.importorskip("mpi4py")
    mpiexec = shutil.which("mpiexec") or os.path.join(os.path.dirname(sys.executable), "mpiexec")
    if not os.path.exists(mpiexec):
        pytest.skip("no mpiexec (the mpich wheel of the test extra provides it)")
    script = tmp_path / "worker.py"
    script.write_text(_MPI_WORKER)
    env = dict(os.environ, OMP_NUM_THREADS="1", NUMBA_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    p = subprocess.run([mpiexec, "-n", "2", sys.executable, str(script), str(tmp_path)], capture_output=True,
                       text=True, timeout=180, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    r0, r1 = (np.load(tmp_path / f"rank{r}.npz") for r in (0, 1))
    assert r0["params"].dtype == np.float32
    assert r0["params"].tobytes() == r1["params"].tobytes() and r0["state"].tobytes() == r1["state"].tobytes()
    steps = 2 * -(-600 // 128)   # global batch 128 over 2 ranks
    assert list(r0["grad_dtypes"]) == ["<f4"] * steps, r0["grad_dtypes"]


def test_no_unit_warning_in_process(monkeypatch):
    """The same rule in this process (monkeypatched unit and once-flag): attributed to the caller's line."""
    import fastdl.model as fm

    monkeypatch.setattr(blas, "cpu_bf16_unit", lambda: "")
    monkeypatch.setattr(fm, "_BF16_WARNED", False)
    with pytest.warns(UserWarning, match="no bfloat16 matrix unit") as rec:
        fd.Sequential([fd.Dense(3, 2)], precision="bf16", backend="reference")
    assert rec[0].filename == __file__
    with warnings.catch_warnings():
        warnings.simplefilter("error")          # once per process: no second warning
        fd.Sequential([fd.Dense(3, 2)], precision="bf16", backend="reference")
        monkeypatch.setattr(fm, "_BF16_WARNED", False)
        monkeypatch.setattr(blas, "cpu_bf16_unit", lambda: "AVX512-BF16")
        fd.Sequential([fd.Dense(3, 2)], precision="bf16", backend="reference")   # a unit: no warning


def test_without_mkl_the_fallback_runs_on_openblas(tmp_path):
    """No MKL (FASTDL_BLAS=openblas: SciPy's OpenBLAS, no bf16 GEMM): round + sgemm, same bound (fresh process)."""
    pytest.importorskip("fastdl.backends.cython_backend", reason="Cython extensions not built")
    code = textwrap.dedent("""
        import numpy as np, fastdl as fd
        from fastdl.backends import blas
        rng = np.random.default_rng(1)
        A = (rng.standard_normal((37, 300)) * 1.37).astype(np.float32)
        W = (rng.standard_normal((300, 29)) / 17).astype(np.float32)
        out = np.empty((37, 29), np.float32)
        fd.get_backend("cython").dense_forward(A, W, np.zeros(29, np.float32), 0, out, 1)
        np.save(__import__("sys").argv[1], out)
        print(blas.info()["provider"], "|", blas.info()["bf16_gemm"])
    """)
    path = str(tmp_path / "out.npy")
    env = {k: v for k, v in os.environ.items() if k not in ("FASTDL_BLAS", "FASTDL_BF16_GEMM")}
    p = subprocess.run([sys.executable, "-c", code, path], capture_output=True, text=True, timeout=120,
                       env=dict(env, FASTDL_BLAS="openblas"))
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("openblas |") and "rounding fallback" in p.stdout, p.stdout
    out = np.load(path)
    rng = np.random.default_rng(1)
    A = (rng.standard_normal((37, 300)) * 1.37).astype(np.float32)
    W = (rng.standard_normal((300, 29)) / 17).astype(np.float32)
    Z, bound = _exact_product(A, W)
    assert np.all(np.abs(out - Z) <= bound)
    assert np.abs(out - A.astype(np.float64) @ W).max() > 50 * np.abs(out - Z).max()


def test_gemm_deterministic_across_processes():
    """Resume bit-exactness needs the same bits in a new process: under fastdl's MKL settings (MKL_CBWR, GNU
    threading, per-call thread counts) the bf16 GEMM of a multi-threaded size gives identical bytes run to run."""
    code = textwrap.dedent("""
        import hashlib, numpy as np
        from fastdl.backends import blas
        blas.select()
        from fastdl._kernels import _blas
        rng = np.random.default_rng(0)
        A = rng.standard_normal((512, 784)).astype(np.float32)
        B = rng.standard_normal((784, 1024)).astype(np.float32)
        C = np.empty((512, 1024), np.float32)
        _blas.gemm_bf16(A, B, C)
        print(_blas.bf16_gemm_routed(), hashlib.sha256(C.tobytes()).hexdigest())
    """)
    runs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
            for _ in range(2)]
    assert all(p.returncode == 0 for p in runs), runs[0].stderr
    assert runs[0].stdout == runs[1].stdout


_SCRATCH_CHILD = """
import threading
import numpy as np
from fastdl.backends import blas
from fastdl._kernels import _blas
blas.select()
assert not _blas.bf16_gemm_packs(1024, 1024, 1024), "this test needs the rounding fallback"
A = np.ones((1024, 1024), np.float32); B = A.copy()

def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20

def work():
    _blas.gemm_bf16(A, B, np.empty_like(A))   # 2 x 4 MB of this thread's scratch

work(); work()
before = rss_mb()
for _ in range(60):                          # 60 short-lived threads: 480 MB if each kept its scratch
    t = threading.Thread(target=work); t.start(); t.join()
print(rss_mb() - before)
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc/self/statm (Linux)")
def test_fallback_scratch_is_freed_when_a_thread_exits():
    # the rounding fallback keeps per-thread scratch; a thread that exits must not leave it behind
    env = dict(os.environ, FASTDL_BF16_GEMM="emulate", OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1",
               MKL_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", _SCRATCH_CHILD], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert float(r.stdout.strip().splitlines()[-1]) < 120, r.stdout
