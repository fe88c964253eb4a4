"""fastdl's own Numba cache: a per-user directory keyed by a hash of ALL fastdl kernel sources.

Why not ``@njit(cache=True)``: Numba's default locators write the cache next
to the source (``site-packages/fastdl/**/__pycache__``; an uninstall leaves
it behind and the leftover directory shadows a later editable install) and
invalidate it per *file*, while fastdl's kernels call and inline each other
across files (a stale cached epoch calling recompiled kernels crashed).

Here every fastdl compiled function gets a :class:`_FastdlCache` (a Numba
``FunctionCache`` whose only locator is :class:`FastdlCacheLocator`):

* directory: ``$XDG_CACHE_HOME`` (or ``~/.cache``) ``/fastdl/numba/<key>/``,
  or ``$NUMBA_CACHE_DIR/fastdl/<key>/`` when the user set ``NUMBA_CACHE_DIR``;
* ``<key>`` hashes the sources of every fastdl module with compiled code
  (:data:`KERNEL_SOURCES`), the Numba, llvmlite and Python versions: any
  edit anywhere (editable installs change without a version bump) gives a
  fresh directory, so cross-module inlining can never load stale code;
* scoped to fastdl: nothing global changes (no ``NUMBA_CACHE_DIR``, no
  ``numba.config``), so the user's own ``cache=True`` functions are cached
  where Numba always puts them;
* key directories untouched for :data:`STALE_DAYS` are removed when a new
  one is created (:func:`prune_stale`);
* an unwritable cache directory disables caching (compiles every run) rather
  than falling back to the package directory.
"""
from __future__ import annotations

import hashlib
import os
import pickle
import sys
from pathlib import Path
from typing import Callable, Iterable

import llvmlite
import numba
from numba.core.caching import CompileResultCacheImpl, FunctionCache, IndexDataCacheFile, NullCache, _CacheLocator

_PKG = Path(__file__).resolve().parents[2]          # the fastdl package directory

#: every source file whose compiled code lands in this cache (relative to the fastdl package)
KERNEL_SOURCES: tuple[str, ...] = (
    "plan.py", "backends/contract.py",      # constants compiled into the kernels and the epoch executor
    "backends/numba/__init__.py", "backends/numba/_cache.py", "backends/numba/_math.py",
    "backends/numba/_chunks.py", "backends/numba/dense.py", "backends/numba/batchnorm.py",
    "backends/numba/losses.py", "backends/numba/dropout.py", "backends/numba/optim.py",
    "backends/numba/epoch.py", "_augment_numba.py",
)


def source_key(sources: Iterable[bytes], versions: Iterable[str] | None = None) -> str:
    """The cache directory name: a hash of the kernel sources and the toolchain versions.

    ``sources``: the bytes of each source file (in a fixed order); ``versions``
    defaults to this interpreter's Numba, llvmlite and Python versions.
    """
    h = hashlib.sha256()
    if versions is None:
        versions = (numba.__version__, llvmlite.__version__, sys.version, sys.platform)
    for v in versions:
        h.update(b"v\0" + str(v).encode() + b"\0")
    for src in sources:
        h.update(b"s\0" + hashlib.sha256(src).digest())
    return h.hexdigest()[:24]


def _read_sources() -> list[bytes]:
    out = []
    for rel in KERNEL_SOURCES:
        try:
            out.append((_PKG / rel).read_bytes())
        except OSError:          # a file not shipped: its absence is part of the key
            out.append(b"<missing " + rel.encode() + b">")
    return out


_KEY: str | None = None


def current_key() -> str:
    """The key of the installed sources (computed once per process)."""
    global _KEY
    if _KEY is None:
        _KEY = source_key(_read_sources())
    return _KEY


def cache_root(environ: "os._Environ[str] | dict[str, str] | None" = None) -> Path:
    """Where fastdl's Numba caches live (without the key): see the module docstring."""
    env = os.environ if environ is None else environ
    user_dir = env.get("NUMBA_CACHE_DIR")
    if user_dir:
        return Path(user_dir) / "fastdl"
    xdg = env.get("XDG_CACHE_HOME")
    home = Path(env["HOME"]) if env.get("HOME") else Path.home()
    base = Path(xdg) if xdg and os.path.isabs(xdg) else home / ".cache"
    return base / "fastdl" / "numba"


def cache_dir() -> Path:
    """This installation's cache directory: ``cache_root() / current_key()``."""
    return cache_root() / current_key()


#: key directories untouched for this long are removed when a new key directory is created
STALE_DAYS = 30.0


def prune_stale(root: Path, keep: str, max_age_days: float = STALE_DAYS, now: float | None = None) -> list[Path]:
    """Remove the key directories under ``root`` (other than ``keep``) not modified for ``max_age_days``.

    Each edit of the kernel sources gives a new directory; without this an
    editable install would collect them forever. A directory still in use by
    another installation is at worst recompiled. Returns what was removed.
    """
    import shutil
    import time

    now = time.time() if now is None else now
    removed = []
    try:
        entries = list(root.iterdir())
    except OSError:
        return removed
    for d in entries:
        if d.name == keep or not d.is_dir() or len(d.name) != 24:   # only fastdl key directories
            continue
        try:
            if now - d.stat().st_mtime > max_age_days * 86400.0:
                shutil.rmtree(d)
                removed.append(d)
        except OSError:      # another process removed or is using it: leave it
            continue
    return removed


_pruned = False


class FastdlCacheLocator(_CacheLocator):
    """Numba cache locator for fastdl's compiled functions (see the module docstring)."""

    def __init__(self, py_func, py_file):
        self._lineno = py_func.__code__.co_firstlineno
        self._cache_path = str(cache_dir())

    def get_cache_path(self) -> str:
        return self._cache_path

    def get_source_stamp(self) -> str:
        # the directory already encodes every source: the stamp only has to be stable
        return current_key()

    def get_disambiguator(self) -> str:
        return str(self._lineno)

    @classmethod
    def from_function(cls, py_func, py_file):
        global _pruned
        self = cls(py_func, py_file)
        fresh = not os.path.isdir(self._cache_path)
        try:
            self.ensure_cache_path()
        except OSError:
            return None
        if fresh and not _pruned:     # once per process, when this key's directory is new
            _pruned = True
            prune_stale(Path(self._cache_path).parent, keep=Path(self._cache_path).name)
        return self


class _FastdlCacheImpl(CompileResultCacheImpl):
    _locator_classes = [FastdlCacheLocator]


class KeyedIndexDataCacheFile(IndexDataCacheFile):
    """Numba's index + data files, safe for processes that compile the same functions at once.

    Numba numbers a function's data files 1, 2, ... and writes the index
    before the data: two processes saving two signatures at the same time
    can both take number N, and the index then points one signature at the
    other's machine code (seen: a segfault when several test runs shared
    the cache). Here a data file is named by a hash of its index key, written
    before the index, and carries its key, checked on load (a mismatch is a
    cache miss). A lost index update only costs a recompilation.
    """

    def _keyed_name(self, key) -> str:
        return self._data_name_pattern.replace("{number:d}", hashlib.sha256(repr(key).encode()).hexdigest()[:20])

    def save(self, key, data):
        name = self._keyed_name(key)
        self._save_data(name, (repr(key), data))
        overloads = self._load_index()
        if overloads.get(key) != name:
            overloads[key] = name
            self._save_index(overloads)

    def load(self, key):
        name = self._load_index().get(key)
        if name is None or name != self._keyed_name(key):
            return None
        try:
            tag, data = self._load_data(name)
        except (OSError, ValueError, TypeError, EOFError, pickle.UnpicklingError):  # removed/truncated: a miss
            return None
        return data if tag == repr(key) else None


class _FastdlCache(FunctionCache):
    _impl_class = _FastdlCacheImpl

    def __init__(self, py_func):
        super().__init__(py_func)
        self._cache_file = KeyedIndexDataCacheFile(cache_path=self._cache_path,
                                                   filename_base=self._impl.filename_base,
                                                   source_stamp=self._impl.locator.get_source_stamp())


def enable_cache(dispatcher):
    """Give one compiled function fastdl's cache (in place; returns the dispatcher)."""
    try:
        dispatcher._cache = _FastdlCache(dispatcher.py_func)
    except RuntimeError:          # no writable cache directory: compile every run
        dispatcher._cache = NullCache()
    return dispatcher


def fastdl_njit(**options) -> Callable:
    """``numba.njit(**options)`` with fastdl's cache (never ``cache=True``: see the module docstring)."""
    if options.pop("cache", False):
        raise ValueError("fastdl_njit caches by itself; do not pass cache=True")

    def deco(fn):
        return enable_cache(numba.njit(**options)(fn))
    return deco


# The four compile modes of fastdl's kernels. error_model="numpy": IEEE division (x/0 -> inf/NaN)
# and vectorisable divisions. fastmath only where stated (see fastdl/backends/numba/__init__.py).
jit = fastdl_njit(error_model="numpy")
pjit = fastdl_njit(error_model="numpy", parallel=True)
mjit = fastdl_njit(error_model="numpy", fastmath={"contract"})   # math polynomials only
rjit = fastdl_njit(error_model="numpy", fastmath={"reassoc"})    # float64 sums: vectorised order

__all__ = ["KERNEL_SOURCES", "STALE_DAYS", "FastdlCacheLocator", "KeyedIndexDataCacheFile", "prune_stale", "cache_dir", "cache_root", "current_key", "enable_cache",
           "fastdl_njit", "jit", "mjit", "pjit", "rjit", "source_key"]
