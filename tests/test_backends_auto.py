"""The backend registry: 'auto' choice (lazy), clean fallback when a backend is missing, the epoch
executor forwarding, info(), and run-time settings scoped by fd.backends.use()."""
from __future__ import annotations

import sys

import numpy as np
import pytest

import fastdl as fd
from fastdl import backends
from fastdl.backends import auto
from fastdl.backends.contract import KERNELS

COMPILED = [b for b in backends.available_backends() if b != "reference"]


def test_choose_falls_back_in_order() -> None:
    assert set(auto.choose(["reference"]).values()) == {"reference"}
    assert set(auto.choose(["reference", "numba"]).values()) == {"numba"}
    both = auto.choose(["reference", "numba", "cython"])
    assert set(both) == set(KERNELS)
    assert all(both[k] == auto.PREFERENCE.get(k, auto.DEFAULT_ORDER)[0] for k in KERNELS)


def test_choose_loads_lazily_and_only_what_it_needs() -> None:
    """A backend later in the order is never loaded when an earlier one provides every kernel."""
    full = type(sys)("full")
    for k in KERNELS:
        setattr(full, k, lambda *a: None)
    partial = type(sys)("partial")          # implements one kernel only
    partial.sum_squares = lambda x: 0.0
    asked: list[str] = []

    def load(name):
        asked.append(name)
        return {"cython": full, "numba": full}.get(name)

    assert set(auto.choose(load).values()) == {"cython"}
    assert "numba" not in asked and "reference" not in asked

    asked.clear()
    got = auto.choose(lambda n: asked.append(n) or {"cython": partial, "numba": None}.get(n))
    assert got["sum_squares"] == "cython" and got["dense_forward"] == "reference"


MISSING_CYTHON = """
import numpy as np
import pytest
import fastdl as fd
from fastdl import backends
backends._MODULES["cython"] = ("fastdl._no_such_compiled_module",)
with pytest.raises(backends.BackendUnavailable, match="cython.*not available"):
    backends.get_backend("cython")
K = backends.get_backend("auto")
assert "cython" not in K.sources.values(), K.sources
assert K.executor_source in (None, "numba"), K.executor_source
info = backends.info("auto")
assert info["unavailable:cython"]["backend"] == "cython"
assert "_no_such_compiled_module" in info["unavailable:cython"]["why"]
rng = np.random.default_rng(0)
for hidden in ([3], [5, 4]):      # one and two hidden layers: the whole-epoch executor runs both
    layers, d = [], 4
    for h in hidden:
        layers += [fd.Dense(d, h), fd.ReLU()]
        d = h
    model = fd.Sequential(layers + [fd.Dense(d, 2)], backend="auto")
    model.fit(rng.standard_normal((16, 4)), rng.integers(0, 2, 16), epochs=2, batch_size=8, verbose=0)
    assert np.isfinite(model.params).all()
print("OK")
"""


def test_missing_backend_is_a_clear_error_and_auto_still_works() -> None:
    """Without the Cython extension, auto runs on Numba (executor included) or the reference.
    In a subprocess: the import failure is simulated before anything loads, and a crash in a
    compiled executor fails this test instead of killing the test run."""
    import subprocess

    proc = subprocess.run([sys.executable, "-c", MISSING_CYTHON], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), (
        f"exit code {proc.returncode}\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")


def test_info_says_which_and_why() -> None:
    info = backends.info("reference")
    assert {info[k]["backend"] for k in KERNELS} == {"reference"}
    assert info["epoch_executor"]["backend"] == "none" and "per-layer" in info["epoch_executor"]["why"]
    for name in backends.available_backends():
        entries = backends.info(name)
        for k in KERNELS:
            assert entries[k]["backend"] in backends.BACKEND_NAMES and entries[k]["why"]
        for var in ("OMP_WAIT_POLICY", "MKL_CBWR", "MKL_THREADING_LAYER"):
            assert entries[f"env:{var}"]["status"]
        assert set(entries["config"]) == {"threads", "blas", "parallel", "thresholds"}


def test_unknown_backend_name() -> None:
    with pytest.raises(ValueError, match="unknown backend 'gpu'"):
        backends.get_backend("gpu")


# ----------------------------------------------------------------------------- epoch executors


def test_epoch_executor_forwards_to_the_backend_module(monkeypatch) -> None:
    calls = []
    fake = type(sys)("fake_backend")
    for k in KERNELS:
        setattr(fake, k, getattr(backends.reference, k))
    fake.epoch_executor = lambda plan, bs, opt: calls.append((plan, bs, opt)) or "EXECUTOR"
    monkeypatch.setitem(backends._modules, "numba", fake)
    monkeypatch.setattr(backends, "_cache", {})
    K = backends.get_backend("numba")
    assert K.executor_source == "numba"
    assert K.epoch_executor("PLAN", 32, "OPT") == "EXECUTOR" and calls == [("PLAN", 32, "OPT")]
    assert backends.get_backend("reference").epoch_executor("PLAN", 32, "OPT") is None


def test_auto_prefers_the_cython_executor_then_numba(monkeypatch) -> None:
    with_ex, without = type(sys)("with"), type(sys)("without")
    with_ex.epoch_executor = lambda *a: "numba-executor"
    monkeypatch.setitem(backends._modules, "cython", without)
    monkeypatch.setitem(backends._modules, "numba", with_ex)
    K = backends.Backend("auto", {k: getattr(backends.reference, k) for k in KERNELS},
                         {k: "reference" for k in KERNELS}, auto.EXECUTOR_ORDER)
    assert K.executor_source == "numba" and K.epoch_executor(None, 1, None) == "numba-executor"
    without.epoch_executor = lambda *a: "cython-executor"
    assert K.executor_source == "cython" and K.epoch_executor(None, 1, None) == "cython-executor"


# ----------------------------------------------------------------------------- run-time settings: use()


@pytest.mark.parametrize("name", COMPILED)
def test_use_threads_is_scoped(name: str) -> None:
    from threadpoolctl import threadpool_info

    K = backends.get_backend(name)
    K.sum_squares(np.ones(4))                       # runtimes loaded
    before = [(p["filepath"], p["num_threads"]) for p in threadpool_info()]
    with backends.use(name, threads=1) as B:
        assert B is K and K.config.threads == 1
        inside = threadpool_info()
        assert inside and all(p["num_threads"] == 1 for p in inside)
        if "numba" in K.sources.values():
            import numba

            assert numba.get_num_threads() == 1
    assert [(p["filepath"], p["num_threads"]) for p in threadpool_info()] == before
    assert K.config.threads is None


@pytest.mark.skipif("numba" not in COMPILED, reason="numba not available")
def test_use_parallel_and_thresholds_are_scoped_and_restored_after_an_error() -> None:
    nb = backends._load_module("numba")
    default = nb.current_thresholds().copy()
    with pytest.raises(RuntimeError, match="boom"):
        with backends.use("numba", parallel=False):
            assert (nb.current_thresholds() >= 1 << 62).all()
            raise RuntimeError("boom")
    np.testing.assert_array_equal(nb.current_thresholds(), default)
    with backends.use("numba", thresholds={"adam": 0}) as K:
        assert K.config.thresholds == {"adam": 0}
        assert nb.current_thresholds()[list(nb.THRESHOLD_NAMES).index("adam")] == 0
    np.testing.assert_array_equal(nb.current_thresholds(), default)
    with pytest.raises(ValueError, match="unknown threshold"):
        with backends.use("numba", thresholds={"nope": 1}):
            pass


@pytest.mark.parametrize("name", COMPILED)
def test_use_blas_is_scoped(name: str) -> None:
    from fastdl.backends import blas

    K = backends.get_backend(name)
    before = blas.select()
    rng = np.random.default_rng(0)
    A, W = rng.standard_normal((9, 7)).astype(np.float32), rng.standard_normal((7, 5)).astype(np.float32)
    out = np.empty((9, 5), np.float32)
    with backends.use(name, blas="openblas"):
        assert blas.select() == "openblas"
        K.dense_forward(A, W, np.zeros(5, np.float32), 0, out)
        np.testing.assert_allclose(out, A @ W, rtol=1e-5, atol=1e-5)
    assert blas.select() == before


def test_use_refuses_settings_a_backend_does_not_have() -> None:
    with pytest.raises(ValueError, match="threads must be a positive int"):
        with backends.use("reference", threads=0):
            pass
    with pytest.raises(ValueError, match="blas must be 'mkl' or 'openblas'"):
        with backends.use("reference", blas="atlas"):
            pass
    with pytest.raises(ValueError, match="runs no compiled GEMM"):
        with backends.use("reference", blas="openblas"):
            pass
    with pytest.raises(ValueError, match="Numba kernels' multi-threading; backend 'reference' runs none"):
        with backends.use("reference", parallel=False):
            pass
