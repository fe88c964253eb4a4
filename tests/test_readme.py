"""Every Python block of the README runs as written, on its own, in a fresh interpreter (issue 16).

Shell blocks (installs, ``mpiexec``, cibuildwheel) are not run. A block that
needs an optional extra is skipped, naming the extra, when that extra is not
installed. Each block runs in a temporary directory (blocks write files such
as ``model.fdl``).
"""
from __future__ import annotations

import ast
import importlib.util
import io
import os
import re
import subprocess
import sys
import tokenize
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCK = re.compile(r"^```python[ \t]*\n(.*?)^```", re.S | re.M)

#: module a block imports -> how to install it
EXTRAS = {"onnx": 'pip install "fastdl[onnx]"', "onnxruntime": 'pip install "fastdl[onnx]"',
          "mpi4py": 'pip install "fastdl[mpi]"', "dask": 'pip install "fastdl[dask]"',
          "distributed": 'pip install "fastdl[dask]"', "matplotlib": 'pip install "fastdl[plot]"',
          "sklearn": "pip install scikit-learn", "torch": 'pip install "fastdl[bench]"',
          "jax": 'pip install "fastdl[bench]"', "pandas": "pip install pandas"}
#: library features a block uses without importing their module
USES = {"distributed=True": "mpi4py", "fd.distributed": "mpi4py", "plot(": "matplotlib", "--plot": "matplotlib",
        "to_onnx": "onnx", "client=Client": "dask"}


def _blocks() -> list[tuple[int, str]]:
    text = README.read_text(encoding="utf-8")
    return [(text[:m.start()].count("\n") + 1, m.group(1)) for m in BLOCK.finditer(text)]


def _needed(code: str) -> list[str]:
    mods = set()
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Import):
            mods.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            mods.add(node.module.split(".")[0])
    mods.update(mod for trigger, mod in USES.items() if trigger in code)
    return sorted(m for m in mods if m in EXTRAS)


BLOCKS = _blocks()


def test_the_readme_has_python_blocks():
    assert len(BLOCKS) >= 4, "README.md lost its Python examples (or the ```python fences)"


@pytest.mark.parametrize("line, code", BLOCKS, ids=[f"line{line}" for line, _ in BLOCKS])
def test_block_has_no_placeholders(line, code):
    """No literal ``...`` standing for 'the rest' (a reader cannot run it), and valid Python."""
    compile(code, f"README.md:{line}", "exec")
    for tok in tokenize.generate_tokens(io.StringIO(code).readline):
        if tok.type == tokenize.OP and tok.string == "...":
            pytest.fail(f"README.md:{line + tok.start[0]}: literal '...' in a Python block")


@pytest.mark.parametrize("line, code", BLOCKS, ids=[f"line{line}" for line, _ in BLOCKS])
def test_block_runs_on_its_own(line, code, tmp_path):
    missing = [m for m in _needed(code) if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"README.md:{line} needs {', '.join(missing)}: {EXTRAS[missing[0]]}")
    env = {**os.environ, "MPLBACKEND": "Agg", "PYTHONDONTWRITEBYTECODE": "1"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, (f"README.md:{line}: the block failed (exit {proc.returncode}):\n"
                                  f"{proc.stderr[-3000:]}")


def test_detects_what_a_block_needs():
    assert _needed("import onnxruntime as ort\nimport fastdl as fd") == ["onnxruntime"]
    assert _needed("m.fit(X, y, distributed=True)") == ["mpi4py"]
    assert _needed("import numpy as np") == []
