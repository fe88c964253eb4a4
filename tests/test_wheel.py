"""The wheel: built from a clean copy of the sources, installed in a fresh virtual environment,
it trains the digits with the Cython kernels and needs no compilation at run time."""
from __future__ import annotations

import os
import subprocess
import sys
import venv
from pathlib import Path

import pytest
from test_cython_build import _copy_source  # the sources a build needs, nothing generated


TRAIN = """
import sys, time
t0 = time.perf_counter()
import fastdl as fd
from fastdl.data import Standardizer, train_dev_test_split
assert "site-packages" in fd.__file__, fd.__file__        # the installed wheel, not the source tree
X, y = fd.datasets.load_digits()
Xtr, Xdv, Xte, ytr, ydv, yte = train_dev_test_split(X, y, seed=0, stratify=True)
sc = Standardizer().fit(Xtr)
model = fd.Sequential([fd.Dense(64, 128, use_bias=False), fd.BatchNorm(128), fd.ReLU(), fd.Dropout(keep_prob=0.9),
                       fd.Dense(128, 10)], l2=1e-3, backend="cython", seed=0)
assert set(model.kernels.sources.values()) == {"cython"}, model.kernels.sources
t1 = time.perf_counter()
model.fit(sc.transform(Xtr), ytr, optimizer=fd.Adam(3e-3), epochs=1, batch_size=32)
first_epoch = time.perf_counter() - t1
model.fit(sc.transform(Xtr), ytr, optimizer=fd.Adam(3e-3), epochs=25, batch_size=32, initial_epoch=1)
acc = model.evaluate(sc.transform(Xte), yte)["accuracy"]
print(f"ACCURACY {acc:.4f} FIRST_EPOCH {first_epoch:.3f} NUMBA_LOADED {'numba' in sys.modules}")
"""


@pytest.mark.slow
def test_wheel_in_fresh_venv_trains_digits_with_cython(tmp_path: Path) -> None:
    pytest.importorskip("build")
    src = _copy_source(tmp_path / "src")
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(dist)],
                   cwd=src, check=True, capture_output=True, timeout=1800)
    (wheel,) = dist.glob("fastdl-*.whl")
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)  # no system site-packages: only what the wheel declares
    py = env_dir / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    proc = subprocess.run([str(py), "-m", "pip", "install", "-q", str(wheel)], capture_output=True, text=True,
                          timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    out = subprocess.run([str(py), "-c", TRAIN], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                         env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    line = next(ln for ln in out.stdout.splitlines() if ln.startswith("ACCURACY"))
    fields = line.split()
    assert float(fields[1]) >= 0.95
    assert fields[5] == "False", "the Cython path must not load (let alone compile with) Numba"
