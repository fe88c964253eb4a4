"""Load-time settings (issue 12 item 3): ``import fastdl`` changes nothing global; the runtimes'
load-time variables are applied just before fastdl first loads them, keep the user's values, and are
reported by fd.backends.info(). Each case runs in a fresh interpreter."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from fastdl.backends import available_backends

COMPILED = [b for b in available_backends() if b != "reference"]
VARS = ("OMP_WAIT_POLICY", "MKL_THREADING_LAYER", "MKL_INTERFACE_LAYER", "MKL_CBWR")


def _run(code: str, **env: str | None) -> dict:
    full = {k: v for k, v in os.environ.items() if k not in VARS}
    full.update({k: v for k, v in env.items() if v is not None})
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=600, env=full)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


IMPORT_ONLY = """
import json, os, sys
import threadpoolctl
import numpy, scipy.linalg   # their own BLAS pools exist before fastdl: fastdl must not add or resize any
before_env = dict(os.environ)
before_pools = [(p["internal_api"], p["num_threads"]) for p in threadpoolctl.threadpool_info()]
import fastdl as fd
from fastdl.backends import runtime
after_pools = [(p["internal_api"], p["num_threads"]) for p in threadpoolctl.threadpool_info()]
print(json.dumps({"env_changed": sorted(set(os.environ.items()) ^ set(before_env.items())),
                  "pools_before": before_pools, "pools_after": after_pools,
                  "gomp": runtime.loaded_libraries("libgomp.so"), "mkl": runtime.loaded_libraries("libmkl_rt"),
                  "numba": "numba" in sys.modules,
                  "compiled": sorted(m for m in sys.modules if m.startswith("fastdl._kernels.")
                                     or m.startswith("fastdl.backends.numba") or m == "fastdl.backends.cython_backend"),
                  "report": runtime.report()}))
"""


def test_import_fastdl_leaves_the_environment_and_runtimes_alone() -> None:
    r = _run(IMPORT_ONLY)
    assert r["env_changed"] == []            # os.environ identical before/after
    assert r["pools_after"] == r["pools_before"]   # no thread pool loaded or resized
    assert r["gomp"] == [] and r["mkl"] == []      # libgomp / MKL not loaded by the import
    assert not r["numba"] and r["compiled"] == []
    assert all(v["status"].startswith("not yet") for v in r["report"].values()), r["report"]


def test_import_fastdl_leaves_a_users_settings_alone() -> None:
    r = _run(IMPORT_ONLY, OMP_WAIT_POLICY="ACTIVE", MKL_CBWR="COMPATIBLE")
    assert r["env_changed"] == []


FIRST_USE = """
import json, os, ctypes
import numpy as np
{preload}
before = dict(os.environ)
import fastdl as fd
K = fd.get_backend({backend!r})
x = np.arange(5.0)
K.sum_squares(x)
K.dense_forward(np.ones((3, 4)), np.ones((4, 2)), np.zeros(2), 0, np.empty((3, 2)))
info = fd.backends.info({backend!r})
print(json.dumps({{"env": {{k: os.environ.get(k) for k in {vars!r}}},
                  "info": {{k: v for k, v in info.items() if k.startswith("env:") or k == "blas"}}}}))
"""


@pytest.mark.parametrize("backend", COMPILED)
def test_settings_are_applied_at_first_use_and_reported(backend: str) -> None:
    r = _run(FIRST_USE.format(preload="", backend=backend, vars=VARS))
    assert r["env"]["OMP_WAIT_POLICY"] == "PASSIVE"
    assert r["info"]["env:OMP_WAIT_POLICY"]["status"].startswith("applied (OMP_WAIT_POLICY=PASSIVE)")
    if r["info"]["blas"]["provider"] == "mkl":
        assert r["env"]["MKL_CBWR"] == "AUTO" and r["env"]["MKL_THREADING_LAYER"] == "GNU"
        assert r["info"]["env:MKL_CBWR"]["status"].startswith("applied (MKL_CBWR=AUTO)")
    else:
        assert r["env"]["MKL_CBWR"] is None
        assert r["info"]["env:MKL_CBWR"]["status"].startswith("not yet")


@pytest.mark.parametrize("backend", COMPILED)
def test_user_values_are_kept_and_reported(backend: str) -> None:
    r = _run(FIRST_USE.format(preload="", backend=backend, vars=VARS), OMP_WAIT_POLICY="ACTIVE",
             MKL_CBWR="COMPATIBLE")
    assert r["env"]["OMP_WAIT_POLICY"] == "ACTIVE"
    assert r["info"]["env:OMP_WAIT_POLICY"] == {"value": "ACTIVE",
                                               "status": "user value kept (OMP_WAIT_POLICY=ACTIVE)"}
    assert r["env"]["MKL_CBWR"] == "COMPATIBLE"
    if r["info"]["blas"]["provider"] == "mkl":
        assert r["info"]["env:MKL_CBWR"]["status"] == "user value kept (MKL_CBWR=COMPATIBLE)"


@pytest.mark.parametrize("backend", COMPILED)
def test_libgomp_loaded_by_another_library_is_reported_not_applied(backend: str) -> None:
    """Another library (here: ctypes, standing in for e.g. a PyTorch import) loaded libgomp first:
    setting OMP_WAIT_POLICY then would do nothing, so fastdl leaves it and says so."""
    preload = "ctypes.CDLL('libgomp.so.1', mode=ctypes.RTLD_GLOBAL)"
    try:
        import ctypes

        ctypes.CDLL("libgomp.so.1")
    except OSError:
        pytest.skip("no libgomp.so.1 on this system")
    r = _run(FIRST_USE.format(preload=preload, backend=backend, vars=VARS))
    assert r["env"]["OMP_WAIT_POLICY"] is None
    status = r["info"]["env:OMP_WAIT_POLICY"]["status"]
    assert status.startswith("not applied: libgomp was already loaded by another library (") and "libgomp" in status


def test_auto_loads_only_what_it_uses() -> None:
    """With the Cython extension built, auto's kernels never import Numba."""
    r = _run("""
        import json, sys
        import fastdl as fd
        K = fd.get_backend("auto")
        print(json.dumps({"sources": sorted(set(K.sources.values())), "numba": "numba" in sys.modules}))
        """)
    if r["sources"] == ["cython"]:
        assert r["numba"] is False


@pytest.mark.parametrize("backend", COMPILED)
def test_mkl_loaded_by_another_library_is_reported_not_applied(backend: str) -> None:
    """Another library (e.g. an MKL-linked NumPy) loaded MKL first: its variables were read already."""
    from fastdl.backends import blas

    paths = blas._mkl_candidates()
    if not paths:
        pytest.skip("MKL not installed")
    preload = f"ctypes.CDLL({paths[0]!r}, mode=ctypes.RTLD_GLOBAL)"
    r = _run(FIRST_USE.format(preload=preload, backend=backend, vars=VARS), FASTDL_BLAS="mkl")
    for var in ("MKL_CBWR", "MKL_THREADING_LAYER"):
        assert r["env"][var] is None
        assert r["info"][f"env:{var}"]["status"].startswith("not applied: MKL was already loaded by another library (")
