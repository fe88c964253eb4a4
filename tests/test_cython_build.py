"""Tests specific to the Cython build (kernels/*.pyx -> fastdl._kernels).

Kernel-by-kernel agreement with the reference is tests/test_conformance.py
(parametrised over every available backend, "cython" included). Here: how
the extensions were built and what the build must guarantee.

* ``openmp_enabled()`` and the kernels' own ``build_info()`` agree;
* results do not depend on the number of OpenMP threads (dropout masks,
  float64 reductions), checked in subprocesses with OMP_NUM_THREADS=1 and 2;
* arguments off the fast path (strided, mixed dtypes, int32 labels) are a
  ValueError naming the validated entry point (no silent conversion);
* slow: the serial build (FASTDL_NO_OPENMP=1) compiles and passes a kernel
  check, and a wheel carries the compiled modules and runs without the .pyx
  sources (both build from a copy of the source tree in a temp dir).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import pytest

from fastdl.backends import reference
from fastdl.backends.contract import KERNELS, RELU, SIGMOID, TANH

cy = pytest.importorskip("fastdl.backends.cython_backend", reason="Cython extensions not built")

ROOT = Path(__file__).resolve().parents[1]
EXT_MODULES = ("_blas", "_dense", "_batchnorm", "_losses", "_dropout", "_optim", "_epoch")

# Run in a fresh interpreter against the package under ``root``: drop the
# editable-install finder (it would map ``fastdl`` back to the source tree).
BOOT = ("import sys\n"
        "sys.meta_path[:] = [f for f in sys.meta_path\n"
        "                    if not getattr(f, '__module__', '').startswith('__editable__')]\n"
        "sys.path.insert(0, {root!r})\n")


def _run(code: str, root: Path | None = None, env: dict | None = None, cwd: Path | None = None) -> str:
    full = (BOOT.format(root=str(root)) if root is not None else "") + textwrap.dedent(code)
    # cwd outside the source tree: ``python -c`` puts the cwd first on sys.path
    proc = subprocess.run([sys.executable, "-c", full], capture_output=True, text=True, timeout=600,
                          env={**os.environ, **(env or {})}, cwd=str(cwd or tempfile.gettempdir()))
    assert proc.returncode == 0, f"subprocess failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


# --------------------------------------------------------------------------- build info


def test_backend_exposes_every_kernel():
    for k in KERNELS:
        assert callable(getattr(cy, k)), k


def test_openmp_enabled_reported():
    from fastdl._build_info import openmp_enabled

    info = cy.build_info()
    assert isinstance(openmp_enabled(), bool)
    assert info["openmp"] is openmp_enabled()      # _build_info and the kernels built alike
    assert info["max_threads"] >= 1
    if not info["openmp"]:
        assert info["max_threads"] == 1
    assert isinstance(info["simd_dispatch"], bool)


# --------------------------------------------------------------------------- threads

THREAD_PROBE = """
import hashlib, json
import numpy as np
from fastdl.backends import cython_backend as cy, reference
rng = np.random.default_rng(0)
out = {"max_threads": cy.build_info()["max_threads"]}
def h(*arrays):
    d = hashlib.sha256()
    for a in arrays:
        d.update(np.ascontiguousarray(a).tobytes())
    return d.hexdigest()
# dropout above the parallel threshold; also the reference mask
A = rng.standard_normal((1100, 1000)).astype(np.float32)
mask, o = np.empty(A.shape, np.uint8), np.empty_like(A)
cy.dropout_forward(A, 0.7, 12345, 6, 2, mask, o)
ref_mask = np.empty_like(mask)
reference.dropout_mask(12345, 6, 2, 0.7, ref_mask)
out["mask"] = h(mask, o)
out["mask_is_reference"] = bool(np.array_equal(mask, ref_mask))
# float64 reductions
x = rng.standard_normal(3_000_001).astype(np.float32)
out["sum_squares"] = cy.sum_squares(x).hex()
Z = (rng.standard_normal((12000, 100)) * 5).astype(np.float32)
y = rng.integers(0, 100, 12000)
dZ = np.empty_like(Z)
out["sce"] = [cy.softmax_cross_entropy(Z, y, dZ).hex(), h(dZ)]
Y = rng.standard_normal((12000, 100)).astype(np.float32)
out["mse"] = cy.mse(Z, Y, dZ).hex()
z1 = Z[:, :1].copy(); t = (rng.random(12000) < 0.5).astype(np.float32)
out["bce"] = cy.sigmoid_bce(np.repeat(z1, 12, axis=0), np.repeat(t, 12), np.empty((12000 * 12, 1), np.float32)).hex()
n = 700
B = (rng.standard_normal((1600, n)) + 3).astype(np.float32)
g, b = np.ones(n, np.float32), np.zeros(n, np.float32)
rm, rv, mu, istd, o2 = np.zeros(n, np.float32), np.ones(n, np.float32), np.empty(n, np.float32), np.empty(n, np.float32), np.empty_like(B)
cy.batchnorm_forward_train(B, g, b, 1e-5, 0.9, rm, rv, mu, istd, o2)
dg, db, dZ2 = np.empty(n, np.float32), np.empty(n, np.float32), np.empty_like(B)
cy.batchnorm_backward(B, g, mu, istd, o2, dZ2, dg, db)
out["bn"] = h(mu, istd, o2, rm, rv, dg, db, dZ2)
# a wide layer: the old kernel's statistics tile height depended on each thread's columns
n = 4100
B = rng.standard_normal((512, n)).astype(np.float32); B[0] += 1e3
g, b = np.ones(n, np.float32), np.zeros(n, np.float32)
rm, rv, mu, istd, o2 = np.zeros(n, np.float32), np.ones(n, np.float32), np.empty(n, np.float32), np.empty(n, np.float32), np.empty_like(B)
cy.batchnorm_forward_train(B, g, b, 1e-5, 0.9, rm, rv, mu, istd, o2)
dg, db, dZ2 = np.empty(n, np.float32), np.empty(n, np.float32), np.empty_like(B)
cy.batchnorm_backward(B, g, mu, istd, o2, dZ2, dg, db)
out["bn_wide"] = h(mu, istd, o2, rm, rv, dg, db, dZ2)
xf = rng.standard_normal(3_000_001).astype(np.float32); xf[2_999_000] = np.inf
out["all_finite"] = [cy.all_finite(x), cy.all_finite(xf)]
p = rng.standard_normal(1 << 20).astype(np.float32); gr = rng.standard_normal(1 << 20).astype(np.float32)
v, s = np.zeros_like(p), np.zeros_like(p)
for step in (1, 2, 3):
    cy.adam_step(p, gr, v, s, 1e-3, 0.9, 0.999, 1e-8, step)
out["adam"] = h(p, v, s)
print(json.dumps(out))
"""


def test_results_independent_of_thread_count():
    runs = {}
    for nt in ("1", "2"):
        env = {"OMP_NUM_THREADS": nt, "OPENBLAS_NUM_THREADS": "1"}
        runs[nt] = json.loads(_run(THREAD_PROBE, env=env).strip().splitlines()[-1])
    if cy.build_info()["openmp"]:
        assert runs["1"]["max_threads"] == 1 and runs["2"]["max_threads"] == 2
    assert runs["1"]["mask_is_reference"] and runs["2"]["mask_is_reference"]
    for key in runs["1"]:
        if key != "max_threads":
            assert runs["1"][key] == runs["2"][key], f"{key} depends on the number of threads"


# --------------------------------------------------------------------------- parallel paths

# Sizes above every kernel's parallel threshold (the conformance suite mostly
# stays below them): with 2+ OpenMP threads these run the threaded drivers.
BIG_M, BIG_N = 2100, 520        # 1,092,000 elements


def _close(actual, expected, dtype, scale=None):
    rtol = 1e-5 if dtype == np.float32 else 1e-12
    scale = float(np.max(np.abs(expected))) if scale is None else scale
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * max(scale, 1e-30))


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_parallel_sizes_match_reference(dtype):
    rng = np.random.default_rng(2)
    R = lambda *shape: rng.standard_normal(shape).astype(dtype)  # noqa: E731
    Z, D = R(BIG_M, BIG_N), R(BIG_M, BIG_N)
    for act in (RELU, TANH, SIGMOID):
        outs = []
        for be in (cy, reference):
            a, d = np.full_like(Z, np.nan), np.full_like(Z, np.nan)
            be.activation_forward(Z, act, a)
            be.activation_backward(a, D, act, d)
            outs.append((a, d))
        for x, y in zip(*outs):
            _close(x, y, dtype)
    # BatchNorm train / backward / inference
    n = BIG_N
    g, b = R(n) + dtype(1), R(n)
    outs = []
    for be in (cy, reference):
        rm, rv = np.zeros(n, dtype), np.ones(n, dtype)
        mu, istd, o, o2 = np.empty(n, dtype), np.empty(n, dtype), np.empty_like(Z), np.empty_like(Z)
        be.batchnorm_forward_train(Z + dtype(2), g, b, 1e-5, 0.9, rm, rv, mu, istd, o)
        be.batchnorm_forward_infer(Z, g, b, rm, rv, 1e-5, o2)
        dZ, dg, db = np.empty_like(Z), np.empty(n, dtype), np.empty(n, dtype)
        be.batchnorm_backward(Z + dtype(2), g, mu, istd, D, dZ, dg, db)
        outs.append((rm, rv, mu, istd, o, o2, dZ, dg, db))
    for x, y in zip(*outs):
        _close(x, y, dtype, scale=float(np.max(np.abs(y))) * BIG_M)
    # losses
    L = R(BIG_M * 4, 130) * dtype(4)
    yl = rng.integers(0, 130, BIG_M * 4)
    zb, tb = R(140000, 1) * dtype(3), (rng.random(140000) < 0.5).astype(dtype)
    outs = []
    for be in (cy, reference):
        d1, sm, d3 = np.empty_like(L), np.empty_like(L), np.empty_like(L)
        d2 = np.empty_like(zb)
        losses = [be.softmax_cross_entropy(L, yl, d1), be.sigmoid_bce(zb, tb, d2), be.mse(L, L * dtype(0.5), d3)]
        be.softmax(L, sm)
        outs.append((np.array(losses), d1, d2, d3, sm))
    for x, y in zip(*outs):
        _close(x, y, dtype)
    # dropout
    outs = []
    for be in (cy, reference):
        mk, o, dA = np.empty(Z.shape, np.uint8), np.empty_like(Z), np.empty_like(Z)
        be.dropout_forward(Z, 0.65, 99, 5, 1, mk, o)
        be.dropout_backward(D, mk, 0.65, dA)
        outs.append((mk, o, dA))
    np.testing.assert_array_equal(outs[0][0], outs[1][0])
    for x, y in zip(outs[0][1:], outs[1][1:]):
        _close(x, y, dtype)
    # optimisers, sum_squares
    p0, gr = R(BIG_M * BIG_N), R(BIG_M * BIG_N)
    outs = []
    for be in (cy, reference):
        p = p0.copy()
        st = [np.zeros_like(p0) for _ in range(5)]
        for t in (1, 2):
            be.sgd_step(p, gr, 0.1)
            be.momentum_step(p, gr, st[0], 0.9, 0.1 / (1 - 0.9 ** t))
            be.rmsprop_step(p, gr, st[1], 0.01, 0.99, 1e-8)
            be.adam_step(p, gr, st[2], st[3], 0.9, 0.999, 1e-8, 0.01 / (1 - 0.9 ** t), 1 / (1 - 0.999 ** t))
            be.nesterov_step(p, gr, st[4], 0.9, 0.01, t == 2)
        outs.append((p, *st, np.array([be.sum_squares(p)])))
    for x, y in zip(*outs):
        _close(x, y, dtype)


# --------------------------------------------------------------------------- fallback


def _pair(a):
    return a.copy(), a.copy()


def test_off_fast_path_is_rejected_not_converted():
    # the raw kernels (backend.unchecked, the executors' entry points) take exactly the contract's
    # arrays: anything else is a ValueError pointing at the validated entry point, never a silent
    # conversion or a slow reference fallback (issue 14, item 3)
    rng = np.random.default_rng(1)
    A = rng.standard_normal((40, 30)).astype(np.float32)[:, ::2]          # strided
    W = np.asfortranarray(rng.standard_normal((15, 8)).astype(np.float32))  # Fortran order
    b = rng.standard_normal(8).astype(np.float32)
    o = np.full((40, 8), np.nan)                                            # float64 out for float32 in
    calls = [
        lambda: cy.dense_forward(A, W, b, TANH, o),
        lambda: cy.softmax_cross_entropy(rng.standard_normal((16, 5)).astype(np.float32),
                                         rng.integers(0, 5, 16).astype(np.int32), np.empty((16, 5), np.float32)),
        lambda: cy.momentum_step(rng.standard_normal(50), rng.standard_normal(100)[::2], np.zeros(50), 0.9, 0.1),
        lambda: cy.dropout_forward(np.ones((7, 9)), 0.5, 1, 2, 3, np.zeros((7, 9), bool), np.empty((7, 9))),
        lambda: cy.batchnorm_forward_train(np.ones((4, 3), np.float32), *[np.ones(3, np.float32)] * 2, 1e-5, 0.9,
                                           *[np.ones(3)] * 4, np.empty((4, 3), np.float32)),
        lambda: cy.sum_squares(np.arange(5)),
    ]
    for call in calls:
        with pytest.raises(ValueError, match=r"fastdl.get_backend\('cython'\)"):
            call()
    assert np.isnan(o).all()   # nothing written


def test_bad_shapes_are_rejected_not_written():
    # a mismatched output is rejected before anything is written
    A = np.ones((4, 3), np.float32)
    W = np.ones((3, 2), np.float32)
    with pytest.raises((ValueError, IndexError)):
        cy.dense_forward(A, W, np.zeros(0, np.float32), RELU, np.empty((4, 5), np.float32))
    with pytest.raises(IndexError):
        cy.softmax_cross_entropy(np.zeros((2, 3), np.float32), np.array([0, 3]), np.empty((2, 3), np.float32))


# --------------------------------------------------------------------------- builds (slow)

KERNEL_CHECK = """
import numpy as np
import fastdl
from fastdl._build_info import openmp_enabled
from fastdl.backends import cython_backend as cy, reference as ref, get_backend
assert cy.__file__.startswith({root!r}), cy.__file__
assert get_backend("cython").sources == {{k: "cython" for k in get_backend("cython").sources}}
rng = np.random.default_rng(0)
def close(a, b, dt):
    np.testing.assert_allclose(a, b, rtol=1e-5 if dt == np.float32 else 1e-12,
                               atol=(1e-5 if dt == np.float32 else 1e-12) * max(1.0, float(np.max(np.abs(b)))))
for dt in (np.float32, np.float64):
    R = lambda *s: rng.standard_normal(s).astype(dt)
    A, W, b, dout = R(300, 70), R(70, 40), R(40), R(300, 40)
    for act in (0, 1, 2, 3):
        outs = []
        for be in (cy, ref):
            o, dZ, dW, db, dA = (np.empty((300, 40), dt), np.empty((300, 40), dt), np.empty_like(W),
                                 np.empty_like(b), np.empty_like(A))
            be.dense_forward(A, W, b, act, o)
            be.dense_backward(A, W, o, dout, act, 0.01, dZ, dW, db, dA)
            a2 = np.empty_like(A); be.activation_forward(A, act, a2)
            d2 = np.empty_like(A); be.activation_backward(a2, A, act, d2)
            outs.append((o, dZ, dW, db, dA, a2, d2))
        for x, y in zip(*outs):
            close(x, y, dt)
    Z, g, bt = R(300, 70) + 3, R(70), R(70)
    res = []
    for be in (cy, ref):
        rm, rv = np.zeros(70, dt), np.ones(70, dt)
        mu, istd, o, o2 = np.empty(70, dt), np.empty(70, dt), np.empty_like(Z), np.empty_like(Z)
        be.batchnorm_forward_train(Z, g, bt, 1e-5, 0.9, rm, rv, mu, istd, o)
        be.batchnorm_forward_infer(Z, g, bt, rm, rv, 1e-5, o2)
        dZ, dg, dbt = np.empty_like(Z), np.empty(70, dt), np.empty(70, dt)
        be.batchnorm_backward(Z, g, mu, istd, A, dZ, dg, dbt)
        res.append((rm, rv, mu, istd, o, o2, dZ, dg, dbt))
    for x, y in zip(*res):
        close(x, y, dt)
    L, y = R(300, 12) * 4, rng.integers(0, 12, 300)
    yb, Y = (rng.random(300) < 0.5).astype(dt), R(300, 12)
    res = []
    for be in (cy, ref):
        d1, d2, d3, sm = np.empty_like(L), np.empty((300, 1), dt), np.empty_like(L), np.empty_like(L)
        l1 = be.softmax_cross_entropy(L, y, d1)
        l2 = be.sigmoid_bce(L[:, :1].copy(), yb, d2)
        l3 = be.mse(L, Y, d3)
        be.softmax(L, sm)
        mk, do, dA = np.empty(L.shape, np.uint8), np.empty_like(L), np.empty_like(L)
        be.dropout_forward(L, 0.6, 7, 8, 9, mk, do)
        be.dropout_backward(Y, mk, 0.6, dA)
        res.append((np.array([l1, l2, l3]), d1, d2, d3, sm, mk, do, dA))
    for x, y2 in zip(*res):
        close(x, y2, dt)
    res = []
    p0, gr = R(1001), R(1001)
    for be in (cy, ref):
        p = p0.copy()
        st = [np.zeros(1001, dt) for _ in range(5)]
        for t in (1, 2):
            be.sgd_step(p, gr, 0.1)
            be.momentum_step(p, gr, st[0], 0.9, 0.1 / (1 - 0.9 ** t))
            be.rmsprop_step(p, gr, st[1], 0.01, 0.99, 1e-8)
            be.adam_step(p, gr, st[2], st[3], 0.9, 0.999, 1e-8, 0.01 / (1 - 0.9 ** t), 1 / (1 - 0.999 ** t))
            be.nesterov_step(p, gr, st[4], 0.9, 0.01, t == 1)
        res.append((p, *st, np.array([be.sum_squares(p)])))
    for x, y2 in zip(*res):
        close(x, y2, dt)
# the whole-epoch executor runs from this build too
model = fastdl.Sequential([fastdl.Dense(12, 16), fastdl.BatchNorm(16), fastdl.ReLU(),
                           fastdl.Dropout(keep_prob=0.8), fastdl.Dense(16, 12)], backend="cython", l2=0.1)
opt = fastdl.optim.Adam()
ex = cy.epoch_executor(model.plan, 32, opt.spec())
v, s = opt.ensure_state(model.params)
from fastdl.plan import step_coefficients
c1, c2 = step_coefficients(opt.spec(), np.full(10, 1e-3), 0)
costs, losses = np.empty(10), np.empty(10)
done, wrong, status = ex.run_epoch(L.astype(np.float32), y, np.empty(0), rng.permutation(300), model.params,
                                   model.grads, model.state, v, s, c1, c2, 0, 0, 300, costs, losses)
assert (done, status) == (10, 0) and np.isfinite(costs).all(), (done, status)
print("KERNELS OK", openmp_enabled(), cy.build_info()["openmp"])
"""


def _copy_source(dst: Path) -> Path:
    """The sources a build needs (no generated .c, no compiled .so)."""
    dst.mkdir(parents=True)
    for name in ("setup.py", "pyproject.toml", "README.md", "MANIFEST.in"):
        shutil.copy2(ROOT / name, dst / name)
    shutil.copytree(ROOT / "kernels", dst / "kernels", ignore=shutil.ignore_patterns("*.c", "*.html"))
    shutil.copytree(ROOT / "fastdl", dst / "fastdl",
                    ignore=shutil.ignore_patterns("*.so", "*.pyd", "__pycache__", "*.nbi", "*.nbc"))
    return dst


@pytest.mark.slow
def test_serial_build_without_openmp(tmp_path):
    src = _copy_source(tmp_path / "src")
    env = {**os.environ, "FASTDL_NO_OPENMP": "1"}
    proc = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace", "-j", "2"], cwd=src, env=env,
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "building extensions without OpenMP" in proc.stdout + proc.stderr
    assert "-fopenmp" not in proc.stdout + proc.stderr
    out = _run(KERNEL_CHECK.format(root=str(src)), root=src, cwd=tmp_path)
    assert "KERNELS OK False False" in out


@pytest.mark.slow
def test_wheel_ships_compiled_kernels(tmp_path):
    pytest.importorskip("build")
    src = _copy_source(tmp_path / "src")
    dist = tmp_path / "dist"
    proc = subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(dist)],
                          cwd=src, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    (wheel,) = dist.glob("fastdl-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for mod in EXT_MODULES:
        assert any(n.startswith(f"fastdl/_kernels/{mod}.") and n.endswith((".so", ".pyd")) for n in names), mod
    assert "fastdl/_kernels/__init__.py" in names
    assert "fastdl/backends/cython_backend.py" in names
    assert not [n for n in names if n.endswith((".pyx", ".pxd", ".c"))]
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    out = _run(KERNEL_CHECK.format(root=str(site)), root=site, cwd=tmp_path)
    assert "KERNELS OK" in out
