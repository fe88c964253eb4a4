"""The backend registry: 'auto' choice, clean fallback when a backend is missing, info()."""
from __future__ import annotations

import numpy as np
import pytest

import fastdl as fd
from fastdl import backends
from fastdl.backends import auto
from fastdl.backends.contract import KERNELS


def test_choose_falls_back_in_order() -> None:
    assert set(auto.choose(["reference"]).values()) == {"reference"}
    assert set(auto.choose(["reference", "numba"]).values()) == {"numba"}
    both = auto.choose(["reference", "numba", "cython"])
    assert set(both) == set(KERNELS)
    assert all(both[k] == auto.PREFERENCE.get(k, auto.DEFAULT_ORDER)[0] for k in KERNELS)


def test_missing_backend_is_a_clear_error_and_auto_still_works(monkeypatch) -> None:
    monkeypatch.setitem(backends._MODULES, "cython", "fastdl._no_such_compiled_module")
    monkeypatch.setattr(backends, "_cache", {})
    monkeypatch.setattr(backends, "_import_errors", {})
    with pytest.raises(backends.BackendUnavailable, match="cython.*not available"):
        backends.get_backend("cython")
    K = backends.get_backend("auto")
    assert "cython" not in K.sources.values()
    info = backends.info("auto")
    assert info["unavailable:cython"]["backend"] == "cython"
    model = fd.Sequential([fd.Dense(4, 3), fd.ReLU(), fd.Dense(3, 2)], backend="auto")
    rng = np.random.default_rng(0)
    model.fit(rng.standard_normal((16, 4)), rng.integers(0, 2, 16), epochs=1, batch_size=8)


def test_info_says_which_and_why() -> None:
    info = backends.info("reference")
    assert {v["backend"] for k, v in info.items() if not k.startswith("unavailable:")} == {"reference"}
    for name in backends.available_backends():
        for k in KERNELS:
            entry = backends.info(name)[k]
            assert entry["backend"] in backends.BACKEND_NAMES and entry["why"]


def test_unknown_backend_name() -> None:
    with pytest.raises(ValueError, match="unknown backend 'gpu'"):
        backends.get_backend("gpu")
