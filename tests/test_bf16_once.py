"""bf16 with each GEMM operand rounded ONCE per step (docs/spec.md section 13, issue 13's S target).

The epoch executors (Cython, Numba) and the per-layer executor on those backends round W once per step, a
Dense layer's input once (for Z = XW and dW = X^T dZ) and dZ once (for dW and dX = dZ W^T), then multiply
with ``bf16gemm_pre_rm``; before, every GEMM rounded both its operands itself (``bf16gemm_rm``; still the
path of the reference backend, and of the per-layer executor with ``executor._bf16 = None``: the oracle
here). Rounding is idempotent, so both must give the SAME BITS: these tests compare them exactly
(``tobytes``), with every GEMM route this machine has
(rounding fallback, MKL's native bf16 GEMM, fastdl's AVX512-BF16 kernel), on odd shapes, batch 1,
BatchNorm, dropout, L2, Dense -> Dense without activation, an activation first, and widths above the
GEMM routing thresholds. Nothing here depends on the CPU model or on timing.
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest

import fastdl as fd
from fastdl import plan as _plan
from fastdl.backends import blas

_blas = pytest.importorskip("fastdl._kernels._blas")

COMPILED = ("cython", "numba")


def _round(x: np.ndarray) -> np.ndarray:
    y = np.ascontiguousarray(x, np.float32).copy()
    _blas.bf16_round(y)
    return y


@pytest.fixture(params=["emulate", "native", "avx512", "mixed"])
def route(request):
    """Each bf16 GEMM route: the rounding fallback, MKL's cblas_gemm_bf16bf16f32, fastdl's AVX512-BF16 kernel for
    every product, and for the large ones only ("mixed": in one model some Dense ops then run the per-GEMM
    rounding path, the others the rounded-once path, fastdl.plan.route_bf16)."""
    blas.select()
    addr = int(blas._state.get("mkl_bf16") or 0)
    before_mkl = _blas.bf16_gemm_routed()
    has_kernel = hasattr(_blas, "set_bf16_kernel") and _blas.bf16_kernel_available()
    before_k = _blas.bf16_kernel_mode() if has_kernel else 0
    if request.param == "native" and not addr:
        pytest.skip("MKL's cblas_gemm_bf16bf16f32 is not available")
    if request.param in ("avx512", "mixed") and not has_kernel:
        pytest.skip("fastdl's AVX512-BF16 GEMM is not available on this CPU/build")
    _blas.set_bf16_gemm(addr if request.param == "native" else 0)
    if has_kernel:
        _blas.set_bf16_kernel({"avx512": 2, "mixed": 1}.get(request.param, 0))
    yield request.param
    _blas.set_bf16_gemm(addr if before_mkl else 0)
    if has_kernel:
        _blas.set_bf16_kernel(before_k)


def _backend(name: str):
    try:
        return fd.get_backend(name)
    except (ImportError, ValueError) as exc:
        pytest.skip(f"backend {name!r} unavailable: {exc}")


# ------------------------------------------------------------------------------------------- the GEMM entry

@pytest.mark.parametrize("M,N,K", [(1, 1, 1), (1, 10, 64), (37, 29, 53), (130, 700, 600), (3, 517, 9)])
@pytest.mark.parametrize("ta,tb", [(0, 0), (0, 1), (1, 0), (1, 1)])
def test_pre_rounded_gemm_equals_rounding_gemm(route, M, N, K, ta, tb):
    rng = np.random.default_rng(M + 7 * N + 13 * K + ta + 2 * tb)
    A = _round(rng.standard_normal((K, M) if ta else (M, K)) * 1.37)
    B = _round(rng.standard_normal((N, K) if tb else (K, N)))
    C1, C2 = np.full((M, N), np.nan, np.float32), np.full((M, N), np.nan, np.float32)
    _blas.gemm_bf16(A, B, C1, ta, tb)
    _blas.gemm_bf16_pre(A, B, C2, ta, tb)
    assert C1.tobytes() == C2.tobytes()


def test_fast_rounding_has_the_reference_bits():
    """The 32-bit-lane rounding of the executors (C header and Numba) = _blas.bf16_round, special values too."""
    from fastdl.backends.numba.dense import round_bf16_into

    rng = np.random.default_rng(0)
    bits = np.concatenate([rng.integers(0, 2 ** 32, 200_000, dtype=np.uint64).astype(np.uint32),
                           np.array([0x7F800000, 0xFF800000, 0x7FC00000, 0x7F800001, 0xFFFFFFFF, 0x7FBFFFFF,
                                     0x00000001, 0x00008000, 0x00018000, 0x3F808000, 0x3F818000, 0x7F7FFFFF,
                                     0x80000000, 0], np.uint32)])
    x = bits.view(np.float32)
    want = _round(x)
    got = np.empty_like(x)
    round_bf16_into(x, got)
    assert got.view(np.uint32).tobytes() == want.view(np.uint32).tobytes()
    _dense = pytest.importorskip("fastdl._kernels._dense")
    Ar = np.empty((1, x.size), np.float32)
    out = np.empty((1, 1), np.float32)
    # the C rounding (fdl_bf16r) through the forward core's round-the-input step
    with np.errstate(all="ignore"):
        _dense.dense_forward_bf16(x.reshape(1, -1), Ar, True, np.zeros((x.size, 1), np.float32),
                                  np.empty(0, np.float32), 0, out)
    assert Ar.view(np.uint32).tobytes() == want.view(np.uint32).tobytes()


# ------------------------------------------------------------------------------------------- the Dense cores

SHAPES = [(1, 45, 33), (1, 1, 1), (67, 45, 33), (3, 517, 9), (130, 700, 600), (32, 64, 128)]


@pytest.mark.parametrize("m,n_in,n_out", SHAPES)
@pytest.mark.parametrize("act", [0, 1, 2, 3])
@pytest.mark.parametrize("has_b", [False, True])
def test_cython_cores_equal_the_per_gemm_kernels(route, m, n_in, n_out, act, has_b):
    _dense = pytest.importorskip("fastdl._kernels._dense")
    rng = np.random.default_rng(m * 31 + n_in * 7 + n_out + act)
    A = (rng.standard_normal((m, n_in)) * 1.37).astype(np.float32)
    W = (rng.standard_normal((n_in, n_out)) / np.sqrt(n_in)).astype(np.float32)
    b = rng.standard_normal(n_out).astype(np.float32) if has_b else np.empty(0, np.float32)
    dout = rng.standard_normal((m, n_out)).astype(np.float32)
    out = np.empty((m, n_out), np.float32)
    _dense.dense_forward(A, W, b, act, out, 1)
    Ar, out2, outr = np.empty_like(A), np.empty_like(out), np.empty_like(out)
    Wr = _round(W)
    _dense.dense_forward_bf16(A, Ar, True, Wr, b, act, out2, outr)
    assert out2.tobytes() == out.tobytes() and outr.tobytes() == _round(out).tobytes()
    assert Ar.tobytes() == _round(A).tobytes()
    out3 = np.empty_like(out)
    _dense.dense_forward_bf16(A, Ar, False, Wr, b, act, out3)   # input rounded by the producer
    assert out3.tobytes() == out.tobytes()
    for l2 in (0.0, 0.05):
        dZ, dW, dA = np.empty_like(out), np.empty_like(W), np.empty_like(A)
        db = np.empty(n_out if has_b else 0, np.float32)
        _dense.dense_backward(A, W, out, dout, act, l2, dZ, dW, db, dA, 1)
        dW2, dA2, db2 = np.empty_like(W), np.empty_like(A), np.empty_like(db)
        dZr = dout.copy()   # in place, as the epoch executor does
        _dense.dense_backward_bf16(Ar, W, Wr, out, dZr, act, l2, dZr, dW2, db2, dA2)
        assert dW2.tobytes() == dW.tobytes() and dA2.tobytes() == dA.tobytes() and db2.tobytes() == db.tobytes()
        assert dZr.tobytes() == _round(dZ).tobytes()


@pytest.mark.parametrize("m,n_in,n_out", SHAPES)
@pytest.mark.parametrize("act", [0, 1, 2, 3])
def test_numba_cores_equal_the_per_gemm_kernels(route, m, n_in, n_out, act):
    _backend("numba")
    from fastdl.backends.numba import dense as nd

    rng = np.random.default_rng(m * 31 + n_in * 7 + n_out + act)
    A = (rng.standard_normal((m, n_in)) * 1.37).astype(np.float32)
    W = (rng.standard_normal((n_in, n_out)) / np.sqrt(n_in)).astype(np.float32)
    b = rng.standard_normal(n_out).astype(np.float32)
    dout = rng.standard_normal((m, n_out)).astype(np.float32)
    out = np.empty((m, n_out), np.float32)
    nd.dense_forward(A, W, b, act, out, 1)
    Ar, out2, outr = np.empty_like(A), np.empty_like(out), np.empty_like(out)
    Wr = _round(W)
    nd.dense_forward_bf16_impl(A, Ar, True, Wr, b, act, out2, outr, False)
    assert out2.tobytes() == out.tobytes() and outr.tobytes() == _round(out).tobytes()
    for l2 in (0.0, 0.05):
        dZ, dW, dA, db = np.empty_like(out), np.empty_like(W), np.empty_like(A), np.empty_like(b)
        nd.dense_backward(A, W, out, dout, act, l2, dZ, dW, db, dA, 1)
        dW2, dA2, db2, dZr = np.empty_like(W), np.empty_like(A), np.empty_like(b), dout.copy()
        nd.dense_backward_bf16_impl(Ar, W, Wr, out, dZr, act, l2, dW2, db2, dA2)
        assert dW2.tobytes() == dW.tobytes() and dA2.tobytes() == dA.tobytes() and db2.tobytes() == db.tobytes()
        assert dZr.tobytes() == _round(dZ).tobytes()


# ------------------------------------------------------------------------------------------- the plan layout

def _layers(kind: str, nf: int, k: int):
    if kind == "bn":      # BatchNorm, dropout, tanh, a Dense without bias first
        return [fd.Dense(nf, 13, use_bias=False), fd.BatchNorm(13), fd.ReLU(), fd.Dropout(keep_prob=0.75),
                fd.Dense(13, 7), fd.Tanh(), fd.Dense(7, k)]
    if kind == "s":       # the benchmark's S shape: Dense+ReLU -> Dense+ReLU -> Dense (rounded outputs chained)
        return [fd.Dense(nf, 128), fd.ReLU(), fd.Dense(128, 64), fd.ReLU(), fd.Dense(64, k)]
    if kind == "chain":   # Dense -> Dense with no activation between, no biases
        return [fd.Dense(nf, 33, use_bias=False), fd.Dense(33, 17), fd.Sigmoid(), fd.Dense(17, k, use_bias=False)]
    if kind == "actfirst":  # an activation as the first op, dropout right after a Dense
        return [fd.Tanh(), fd.Dense(nf, 21), fd.Dropout(keep_prob=0.6), fd.Dense(21, k)]
    # "wide": products above the MKL / AVX512-BF16 routing thresholds (2^19 multiply-adds)
    return [fd.Dense(nf, 300), fd.Sigmoid(), fd.Dense(300, 257), fd.Dropout(keep_prob=0.8), fd.ReLU(),
            fd.Dense(257, k)]


def _model(kind, backend, precision="bf16", l2=0.0, nf=19, k=5, **kw):
    with warnings.catch_warnings():   # "no bfloat16 unit" on CPUs without one
        warnings.simplefilter("ignore", UserWarning)
        return fd.Sequential(_layers(kind, nf, k), l2=l2, precision=precision, backend=backend, seed=4, **kw)


def test_fp32_layouts_are_unchanged():
    """The rounded-operand buffers exist in bf16 plans only: an fp32 plan's workspace has no extra byte.
    A bf16 plan adds round_bf16(params) (n_params) and each Dense input's rounded copy (B x n_in)."""
    for kind in ("bn", "s", "chain", "actfirst", "wide"):
        f = _model(kind, "reference", "fp32").plan
        b = _model(kind, "reference", "bf16").plan
        lf, lb = f.layout(32), b.layout(32)
        assert (lf.iprog[:, [_plan.I_XR, _plan.I_WR, _plan.I_OUTR]] == -1).all()
        extra = b.n_params + sum(32 * op.n_in for op in b.ops if op.kind == _plan.OP_DENSE)
        assert lb.ws_size == lf.ws_size + extra and lf.params_r == -1 and lb.params_r >= 0
        np.testing.assert_array_equal(lf.iprog[:, :_plan.I_PREC], lb.iprog[:, :_plan.I_PREC])
        dense = [j for j, op in enumerate(b.ops) if op.kind == _plan.OP_DENSE]
        for j in dense:   # rounded W: the view of round_bf16(params) at the W's offset
            assert lb.iprog[j, _plan.I_WR] == lb.params_r + b.ops[j].p0
        for j in dense:   # a Dense followed by a Dense writes its rounded output into the next one's input copy
            nxt = lb.iprog[j + 1] if j + 1 < len(b.ops) else None
            if nxt is not None and nxt[_plan.I_KIND] == _plan.OP_DENSE:
                assert lb.iprog[j, _plan.I_OUTR] == nxt[_plan.I_XR]
            else:
                assert lb.iprog[j, _plan.I_OUTR] == -1


# ------------------------------------------------------------------------------------------- whole executors

def _data(m, nf, k, seed=1):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((m, nf)) * 1.37).astype(np.float32), rng.integers(0, k, m)


@pytest.mark.parametrize("backend", COMPILED)
@pytest.mark.parametrize("kind", ["bn", "s", "chain", "actfirst", "wide"])
@pytest.mark.parametrize("l2", [0.0, 0.3])
def test_epoch_executor_bit_identical_to_per_gemm_rounding(route, backend, kind, l2):
    """The epoch executor and the per-layer path (operands rounded once) = the per-layer path with every GEMM
    rounding its own operands (the semantics before), bit for bit: parameters, BatchNorm state, Adam state,
    costs; batches of 16 with a last batch of 1 row; then the predictions of the trained models."""
    _backend(backend)
    nf, k = (700, 4) if kind == "wide" else (19, 5)
    X, y = _data(33 if kind == "wide" else 49, nf, k)
    runs = []
    for fused, once in ((True, True), (False, True), (False, False)):
        m = _model(kind, backend, l2=l2, nf=nf, k=k)
        assert (m.executor._bf16 is not None) == (backend in COMPILED)
        if not once:   # the oracle: the per-layer path with every bf16 GEMM rounding its own operands
            m.executor._bf16 = None
        opt = fd.Adam(lr=1e-2)
        h = m.fit(X, y, optimizer=opt, epochs=2, batch_size=16, fused=fused)
        runs.append((m, opt, h))
    b, ob, hb = runs[2]
    for a, oa, ha in runs[:2]:   # the epoch executor and the per-layer path, both rounding each operand once
        assert a.params.tobytes() == b.params.tobytes() and a.state.tobytes() == b.state.tobytes()
        for key in oa.state:
            assert oa.state[key].tobytes() == ob.state[key].tobytes()
        assert ha.batch_cost == hb.batch_cost
    a = runs[0][0]
    assert a.decision_function(X).tobytes() == b.decision_function(X).tobytes()
    f = _model(kind, backend, "fp32", l2=l2, nf=nf, k=k)    # bf16 really ran
    f.fit(X, y, optimizer=fd.Adam(lr=1e-2), epochs=2, batch_size=16, fused=True)
    assert np.abs(f.params - a.params).max() > 1e-5


@pytest.mark.parametrize("backend", COMPILED)
@pytest.mark.parametrize("opt", ["sgd", "momentum", "rmsprop", "nesterov", "classical"])
def test_every_optimiser_writes_the_same_rounded_weights(backend, opt):
    """The optimiser step that also writes round_bf16(params) (block by block) = the per-layer step + rounding."""
    _backend(backend)
    make = {"sgd": lambda: fd.SGD(lr=0.05), "momentum": lambda: fd.Momentum(lr=0.05),
            "rmsprop": lambda: fd.RMSprop(lr=1e-3), "nesterov": lambda: fd.ClassicalMomentum(lr=0.05, nesterov=True),
            "classical": lambda: fd.ClassicalMomentum(lr=0.05, nesterov=False)}[opt]
    X, y = _data(37, 19, 5, seed=3)
    models = []
    for fused, once in ((True, True), (False, True), (False, False)):
        m = _model("s", backend)
        if not once:
            m.executor._bf16 = None
        m.fit(X, y, optimizer=make(), epochs=2, batch_size=8, fused=fused)
        models.append(m)
    assert models[0].params.tobytes() == models[2].params.tobytes() == models[1].params.tobytes()


def test_which_backends_round_once():
    """The reference backend (the emulation oracle) rounds inside each GEMM; Cython / Numba / auto have the cores."""
    assert _model("s", "reference").executor._bf16 is None
    assert _model("s", "reference", "fp32").executor._bf16 is None
    for name in COMPILED + ("auto",):
        try:
            fd.get_backend(name)
        except (ImportError, ValueError):
            continue
        assert _model("s", name).executor._bf16 is not None
        assert _model("s", name, "fp32").executor._bf16 is None    # fp32 plans: nothing changes


def test_route_bf16_table():
    """Dense ops whose products a packing kernel runs lose their rounded-operand columns, and so does the
    output rounding of the Dense before them; the others keep theirs; the plan's own table is untouched."""
    p = _model("s", "reference").plan
    lay = p.layout(32)
    before = lay.iprog.copy()
    big = _plan.route_bf16(lay.iprog, 32, lambda M, N, K: M * N * K > 32 * 19 * 128)   # only the 128x64 Dense
    np.testing.assert_array_equal(lay.iprog, before)
    dense = [j for j, op in enumerate(p.ops) if op.kind == _plan.OP_DENSE]
    assert big[dense[1], _plan.I_XR] == big[dense[1], _plan.I_WR] == big[dense[0], _plan.I_OUTR] == -1
    assert big[dense[0], _plan.I_XR] >= 0 and big[dense[2], _plan.I_XR] >= 0
    assert big[dense[1], _plan.I_OUTR] == big[dense[2], _plan.I_XR]
    np.testing.assert_array_equal(_plan.route_bf16(lay.iprog, 32, lambda M, N, K: False), before)
