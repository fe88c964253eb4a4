"""scikit-learn's own MLP test module, run against fastdl.sklearn.

The installed scikit-learn's ``sklearn/neural_network/tests/test_mlp.py`` is
read, its ``from sklearn.neural_network import MLPClassifier, MLPRegressor``
is pointed at :mod:`fastdl.sklearn`, and its tests are collected here. A
test that cannot pass would be listed in ``EXCEPTIONS`` and marked
``xfail(strict=True)`` with the reason (and in the README's "scikit-learn
drop-in" section); with scikit-learn 1.9.1 the list is empty.
"""
from __future__ import annotations

import importlib.util
import pathlib

import pytest

pytest.importorskip("sklearn")
import sklearn  # noqa: E402

SUITE = pathlib.Path(sklearn.__file__).parent / "neural_network" / "tests" / "test_mlp.py"
IMPORT = "from sklearn.neural_network import MLPClassifier, MLPRegressor"

#: test name -> why it cannot pass (each is xfail(strict=True))
EXCEPTIONS: dict[str, str] = {}

if not SUITE.exists():  # pragma: no cover - scikit-learn installed without its tests
    pytest.skip(f"{SUITE} is not installed", allow_module_level=True)

_source = SUITE.read_text()
if IMPORT not in _source:  # pragma: no cover - a future scikit-learn changed the import
    raise RuntimeError(f"cannot find {IMPORT!r} in {SUITE}: update tests/test_sklearn_mlp_suite.py")
_source = _source.replace(IMPORT, "from fastdl.sklearn import MLPClassifier, MLPRegressor")
exec(compile(_source, str(SUITE), "exec"), globals())  # noqa: S102 - the installed scikit-learn's test file


@pytest.fixture
def global_random_seed():
    """scikit-learn's conftest fixture (its default seed, 42)."""
    return 42


def _mark_exceptions(namespace: dict) -> None:
    for name, why in EXCEPTIONS.items():
        if name in namespace:
            namespace[name] = pytest.mark.xfail(reason=why, strict=True)(namespace[name])


_mark_exceptions(globals())
