"""The backend boundary (issue 12 item 3): backends see arrays and plans, never models or training code;
and the kernel contract is typed (contract.KernelContract) and met by every backend."""
from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

import pytest

import fastdl
from fastdl.backends import Backend, available_backends, get_backend, reference
from fastdl.backends.contract import KERNELS, KernelContract

ROOT = Path(fastdl.__file__).resolve().parent
REPO = ROOT.parent
FORBIDDEN = ("fastdl.model", "fastdl.layers", "fastdl.optim", "fastdl.training", "fastdl.executors")


def _module_name(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(source: str, module: str, is_package: bool) -> list[tuple[int, str]]:
    """Every module a Python source imports, at any depth (functions, classes, try blocks), as
    absolute dotted names (relative imports resolved against ``module``); ``from a import b``
    yields both ``a`` and ``a.b`` (b may be a submodule). ``importlib.import_module("x")`` and
    ``__import__("x")`` with a constant name count too."""
    package = module if is_package else module.rpartition(".")[0]
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            found.append((node.lineno, mod))
            found += [(node.lineno, f"{mod}.{a.name}") for a in node.names if a.name != "*"]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
            if name in ("import_module", "__import__"):
                found.append((node.lineno, node.args[0].value))
    return found


_CY_IMPORT = re.compile(r"^\s*(?:from\s+([\w.]+)\s+c?import\s+([\w, ().*]+)|c?import\s+([\w., ]+))")


def cython_imports(source: str) -> list[tuple[int, str]]:
    """``import``/``cimport``/``from ... (c)import`` lines of a .pyx/.pxd file (absolute names)."""
    found = []
    for i, line in enumerate(source.splitlines(), 1):
        mt = _CY_IMPORT.match(line)
        if not mt:
            continue
        if mt.group(1):
            found.append((i, mt.group(1)))
            names = re.findall(r"\w+", mt.group(2).split(" as ")[0])
            found += [(i, f"{mt.group(1)}.{n}") for n in names]
        else:
            found += [(i, n.strip().split(" as ")[0]) for n in mt.group(3).split(",")]
    return found


def _bad(mods: list[tuple[int, str]]) -> list[tuple[int, str]]:
    return [(ln, m) for ln, m in mods if any(m == f or m.startswith(f + ".") for f in FORBIDDEN)]


def test_the_import_walker_finds_imports_at_any_depth() -> None:
    """The checker itself can fail: nested, relative and dynamic imports are all seen."""
    src = ("import numpy\n"
           "def f():\n"
           "    from .. import layers\n"
           "    class C:\n"
           "        def g(self):\n"
           "            from ...fastdl.optim import Adam\n"
           "            import fastdl.training.fit\n"
           "    try:\n"
           "        from ..model import Sequential\n"
           "    except ImportError:\n"
           "        importlib.import_module('fastdl.executors.per_layer')\n")
    bad = _bad(imported_modules(src, "fastdl.backends.numba_backend", is_package=False))
    assert {m for _, m in bad} == {"fastdl.layers", "fastdl.optim", "fastdl.optim.Adam", "fastdl.training.fit",
                                   "fastdl.model", "fastdl.model.Sequential", "fastdl.executors.per_layer"}
    # a relative import inside a package's __init__ resolves against the package itself
    assert ("fastdl.backends.numba.epoch" in
            [m for _, m in imported_modules("from .epoch import X\n", "fastdl.backends.numba", is_package=True)])
    assert _bad(cython_imports("from fastdl.model import Sequential\ncimport numpy as cnp\n")) == [
        (1, "fastdl.model"), (1, "fastdl.model.Sequential")]


def test_nothing_under_backends_or_kernels_imports_model_layers_optim_or_training() -> None:
    files = sorted((ROOT / "backends").rglob("*.py"))
    assert len(files) >= 6
    problems = []
    for path in files:
        mods = imported_modules(path.read_text(encoding="utf-8"), _module_name(path), path.name == "__init__.py")
        problems += [f"{path.relative_to(REPO)}:{ln}: imports {m}" for ln, m in _bad(mods)]
    kernels = REPO / "kernels"
    cy = sorted(kernels.rglob("*.pyx")) + sorted(kernels.rglob("*.pxd")) if kernels.is_dir() else []
    for path in cy:
        problems += [f"{path.relative_to(REPO)}:{ln}: imports {m}"
                     for ln, m in _bad(cython_imports(path.read_text(encoding="utf-8")))]
    assert not problems, "the backends must not know the model:\n" + "\n".join(problems)


# ----------------------------------------------------------------------------- the typed contract


def _params(fn) -> list[tuple[str, bool]]:
    """(name, has a default) of each parameter, without ``self``."""
    ps = [p for p in inspect.signature(fn).parameters.values() if p.name != "self"]
    return [(p.name, p.default is not inspect.Parameter.empty) for p in ps]


def test_protocol_lists_every_kernel_with_the_reference_signature() -> None:
    declared = {n for n, v in vars(KernelContract).items() if callable(v) and not n.startswith("_")}
    assert declared == set(KERNELS)
    for k in KERNELS:
        proto = inspect.signature(getattr(KernelContract, k))
        ref = inspect.signature(getattr(reference, k))
        assert _params(getattr(KernelContract, k)) == _params(getattr(reference, k)), (k, proto, ref)
        for p in ref.parameters.values():      # and the same defaults
            assert proto.parameters[p.name].default == p.default, (k, p.name)


@pytest.mark.parametrize("name", available_backends())
def test_every_backend_module_meets_the_protocol(name: str) -> None:
    """Each kernel a backend implements has the contract's parameters, in order (defaults may be
    backend objects, e.g. an empty weights array, but optional exactly where the contract is)."""
    from fastdl import backends

    mod = backends._load_module(name)
    implemented = [k for k in KERNELS if callable(getattr(mod, k, None))]
    assert implemented, name
    for k in implemented:
        assert _params(getattr(mod, k)) == _params(getattr(KernelContract, k)), (name, k)


@pytest.mark.parametrize("name", available_backends() + ["auto"])
def test_backend_objects_are_kernel_contracts(name: str) -> None:
    K = get_backend(name)
    assert isinstance(K, Backend) and isinstance(K, KernelContract)
    for k in KERNELS:
        assert _params(getattr(K, k)) == _params(getattr(reference, k))
        assert callable(getattr(K.unchecked, k))
