"""fastdl's Numba cache (fastdl/backends/numba/_cache.py): per-user, keyed by all kernel sources, scoped to fastdl.

Each scenario runs in a subprocess with its own HOME / XDG_CACHE_HOME (and
NUMBA_CACHE_DIR where stated), compiles a few fastdl kernels, and then
looks at where the cache files went.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("numba")

import fastdl  # noqa: E402
from fastdl.backends.numba import _cache  # noqa: E402

PKG = Path(fastdl.__file__).resolve().parent

# compiles two small kernels (a reduction with its chunk driver, a loss) and an augmentation warp
SCRIPT = textwrap.dedent("""
    import json, os, sys
    import numpy as np
    import numba
    from fastdl.backends import numba as nb
    from fastdl.backends.numba import _cache
    from fastdl.backends.numba.optim import sum_squares_impl
    env_before = dict(os.environ)
    x = np.arange(10.0)
    assert nb.sum_squares(x) == 285.0
    nb.sigmoid_bce(np.zeros((3, 1)), np.ones(3), np.empty((0, 0)))
    print(json.dumps({"dir": str(_cache.cache_dir()), "key": _cache.current_key(),
                      "hits": sum(sum_squares_impl.stats.cache_hits.values()),
                      "config_cache_dir": numba.config.CACHE_DIR, "env_same": env_before == dict(os.environ)}))
""")


def _cache_files(root: Path) -> set[str]:
    return {str(p) for p in root.rglob("*") if p.suffix in (".nbi", ".nbc")}


def _run(tmp_path: Path, script: str = SCRIPT, **env_extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("NUMBA_CACHE_DIR", "XDG_CACHE_HOME")}
    env.update({"HOME": str(tmp_path / "home"), "XDG_CACHE_HOME": str(tmp_path / "xdg"), "NUMBA_NUM_THREADS": "1",
                "OMP_NUM_THREADS": "1", **env_extra})
    (tmp_path / "home").mkdir(exist_ok=True)
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=900,
                         cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_cache_goes_to_the_per_user_dir_never_into_the_package(tmp_path):
    before = _cache_files(PKG)
    first = _run(tmp_path)
    assert _cache_files(PKG) == before, "fastdl wrote Numba cache files inside the package"
    cdir = Path(first["dir"])
    assert cdir.parent == tmp_path / "xdg" / "fastdl" / "numba"
    assert cdir.name == first["key"] == _cache.source_key(_cache._read_sources())
    names = {p.name for p in cdir.iterdir()}
    assert any(n.startswith("optim.sum_squares_impl-") and n.endswith(".nbi") for n in names), sorted(names)
    assert any(n.startswith("_chunks.optim._ssq.run-") for n in names), "the chunk driver has its own cache entry"
    assert first["env_same"] and first["config_cache_dir"] in ("", None)
    # a second process loads what the first compiled
    assert _run(tmp_path)["hits"] >= 1


def test_without_xdg_the_cache_is_under_home_dot_cache(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("NUMBA_CACHE_DIR", "XDG_CACHE_HOME")}
    env["HOME"] = str(tmp_path)
    assert _cache.cache_root(env) == tmp_path / ".cache" / "fastdl" / "numba"
    env["XDG_CACHE_HOME"] = "relative/dir"          # the XDG spec: relative paths are ignored
    assert _cache.cache_root(env) == tmp_path / ".cache" / "fastdl" / "numba"


def test_numba_cache_dir_is_respected_when_the_user_set_it(tmp_path):
    user = tmp_path / "user_numba_cache"
    res = _run(tmp_path, NUMBA_CACHE_DIR=str(user))
    assert Path(res["dir"]) == user / "fastdl" / res["key"]
    assert _cache_files(user / "fastdl")
    assert not (tmp_path / "xdg" / "fastdl").exists()
    assert res["config_cache_dir"] == str(user)      # the user's setting, untouched


def test_user_functions_keep_numbas_own_cache_location(tmp_path):
    # fastdl's locator is attached to fastdl's functions only: a user's cache=True function is cached
    # where Numba always puts it (its own __pycache__), not in fastdl's directory
    (tmp_path / "usermod.py").write_text("from numba import njit\n\n@njit(cache=True)\ndef f(x):\n    return x + 1\n")
    script = SCRIPT.replace("env_before = dict(os.environ)",
                            "env_before = dict(os.environ)\nsys.path.insert(0, os.getcwd())\nimport usermod\n"
                            "assert usermod.f(1) == 2")
    res = _run(tmp_path, script)
    assert any("usermod.f-" in p for p in _cache_files(tmp_path / "__pycache__"))
    assert not any("usermod" in p for p in _cache_files(Path(res["dir"])))


def test_unwritable_cache_dir_compiles_without_caching(tmp_path):
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("x")                           # XDG_CACHE_HOME is a file: no directory can be made
    before = _cache_files(PKG)
    res = _run(tmp_path, XDG_CACHE_HOME=str(blocker))
    assert res["hits"] == 0
    assert _cache_files(PKG) == before


def test_the_key_covers_every_source_and_the_toolchain():
    srcs = [b"def a(): pass\n", b"def b(): pass\n"]
    k = _cache.source_key(srcs, versions=("numba 1", "py 3"))
    assert k == _cache.source_key(list(srcs), versions=("numba 1", "py 3"))          # deterministic
    assert k != _cache.source_key([srcs[0], b"def b(): return 1\n"], versions=("numba 1", "py 3"))
    assert k != _cache.source_key(srcs[::-1], versions=("numba 1", "py 3"))
    assert k != _cache.source_key(srcs, versions=("numba 2", "py 3"))
    assert k != _cache.source_key(srcs + [b""], versions=("numba 1", "py 3"))
    # every module of the numba package (and the augmentation warps) is part of the key
    pkg_files = {f"backends/numba/{p.name}" for p in (PKG / "backends" / "numba").glob("*.py")}
    assert pkg_files <= set(_cache.KERNEL_SOURCES)
    assert "_augment_numba.py" in _cache.KERNEL_SOURCES
    assert all((PKG / rel).is_file() for rel in _cache.KERNEL_SOURCES)


def test_fastdl_njit_refuses_numbas_own_cache_flag():
    with pytest.raises(ValueError, match="cache"):
        _cache.fastdl_njit(cache=True)


def test_stale_key_directories_are_pruned_and_nothing_else(tmp_path):
    import time

    now = time.time()
    old, recent, keep = tmp_path / ("a" * 24), tmp_path / ("b" * 24), tmp_path / ("c" * 24)
    other = tmp_path / "not-a-key"
    for d in (old, recent, keep, other):
        d.mkdir()
        (d / "x.nbi").write_text("x")
    day = 86400.0
    os.utime(old, (now - 40 * day, now - 40 * day))
    os.utime(keep, (now - 40 * day, now - 40 * day))
    os.utime(other, (now - 40 * day, now - 40 * day))
    os.utime(recent, (now - 2 * day, now - 2 * day))
    assert _cache.prune_stale(tmp_path, keep=keep.name, now=now) == [old]
    assert not old.exists() and recent.exists() and keep.exists() and other.exists()


def test_concurrent_saves_of_two_signatures_never_cross_wire(tmp_path):
    # numba's own numbering let two processes write the same data file for different signatures
    # (an index entry then pointed at another signature's machine code: a segfault)
    a = _cache.KeyedIndexDataCacheFile(str(tmp_path), "mod.f-1.py311", "stamp")
    b = _cache.KeyedIndexDataCacheFile(str(tmp_path), "mod.f-1.py311", "stamp")
    a.save(("sig1", "cpu"), {"code": 1})
    b.save(("sig2", "cpu"), {"code": 2})
    assert a.load(("sig1", "cpu")) == {"code": 1} and a.load(("sig2", "cpu")) == {"code": 2}
    names = {p.name for p in tmp_path.glob("*.nbc")}
    assert len(names) == 2
    # an index that points a key at another key's data (the old race) is a miss, not foreign code
    overloads = a._load_index()
    overloads[("sig2", "cpu")] = overloads[("sig1", "cpu")]
    a._save_index(overloads)
    assert b.load(("sig2", "cpu")) is None and b.load(("sig1", "cpu")) == {"code": 1}
    # a truncated data file is a miss too
    path = tmp_path / overloads[("sig1", "cpu")]
    path.write_bytes(path.read_bytes()[:5])
    assert a.load(("sig1", "cpu")) is None
