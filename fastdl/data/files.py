"""Loaders for NPZ, CSV and IDX (MNIST-style) files, and the NPZ writer."""
from __future__ import annotations

import gzip
import io
import math
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
from numpy.typing import ArrayLike, DTypeLike

from .._atomic import atomic_write
from .errors import DataFormatError, _MissingKeyError

PathLike = Union[str, "os.PathLike[str]"]

def load_npz(path: PathLike, x_key: str = "X", y_key: Optional[str] = "y") -> tuple[np.ndarray, Optional[np.ndarray]]:
    """Load ``(X, y)`` from an ``.npz`` archive (never unpickles).

    ``y_key=None`` loads only X and returns ``(X, None)``.
    """
    with open(path, "rb") as f:
        magic = f.read(4)
    # np.load reports any non-numpy file as "pickled data": say what it is.
    if magic[:2] != b"PK":
        kind = "a single .npy array" if magic[:4] == b"\x93NUM" else "not a zip archive"
        raise DataFormatError(f"{path}: not an .npz archive ({kind})")
    try:
        archive = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as e:
        raise DataFormatError(f"{path}: cannot read as .npz ({e})") from None
    with archive:
        keys = list(archive.files)
        for key in (x_key, y_key):
            if key is not None and key not in keys:
                raise _MissingKeyError(
                    f"{path}: no array named {key!r}; available keys: {keys}. "
                    "Pass x_key= / y_key= to choose others"
                )
        try:
            X = archive[x_key]
            y = None if y_key is None else archive[y_key]
        except ValueError as e:
            raise DataFormatError(f"{path}: cannot load without pickle ({e})") from None
    if y is not None and (y.ndim == 0 or X.ndim == 0 or y.shape[0] != X.shape[0]):
        raise DataFormatError(f"{path}: {x_key!r} has shape {X.shape} but {y_key!r} has shape {y.shape}")
    return X, y


def save_npz(path: PathLike, X: ArrayLike, y: Optional[ArrayLike] = None, *,
             compress: bool = False) -> Path:
    """Write ``X`` (and ``y``) to ``path`` atomically, readable by :func:`load_npz`.

    Data goes to a temporary file in the same directory which then replaces
    ``path`` (``os.replace``), so readers never see a half-written file. The
    file is written at exactly ``path`` (no ``.npz`` is appended).
    """
    path = Path(path)
    arrays = {"X": np.asarray(X)}
    if y is not None:
        arrays["y"] = np.asarray(y)
    for k, a in arrays.items():
        if a.dtype.hasobject:
            raise ValueError(f"{k} has dtype object, which cannot be saved without pickle")
    atomic_write(path, lambda f: (np.savez_compressed if compress else np.savez)(f, **arrays))
    return path


def _open_text(path: PathLike) -> io.TextIOBase:
    if str(path).endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, "r", encoding="utf-8")


def _parse_float(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True


def _split_line(line: str, delimiter: Optional[str]) -> list[str]:
    return [c.strip() for c in (line.split() if delimiter is None else line.split(delimiter))]


def _data_lines(fh: io.TextIOBase, comments: str) -> Iterator[tuple[int, str]]:
    """(1-based line number, content) of non-blank lines, comments stripped."""
    for lineno, line in enumerate(fh, 1):
        if comments and comments in line:
            line = line[: line.index(comments)]
        line = line.strip()
        if line:
            yield lineno, line


def _find_csv_error(path: PathLike, delimiter: Optional[str], skip: int, comments: str) -> Optional[str]:
    """Slow scan naming the first bad line, run only after the fast parser failed."""
    ncols = None
    with _open_text(path) as fh:
        for lineno, line in _data_lines(fh, comments):
            if lineno <= skip:
                continue
            cells = _split_line(line, delimiter)
            if ncols is None:
                ncols = len(cells)
            elif len(cells) != ncols:
                return f"line {lineno} has {len(cells)} columns, expected {ncols}: {line[:80]!r}"
            for col, cell in enumerate(cells):
                if not _parse_float(cell):
                    shown = "an empty cell" if cell == "" else f"non-numeric cell {cell!r}"
                    return f"line {lineno}, column {col + 1}: {shown}"
    return None


def load_csv(
    path: PathLike,
    label_column: Optional[int] = -1,
    delimiter: Optional[str] = ",",
    skip_header: Optional[bool] = None,
    *,
    dtype: DTypeLike = np.float64,
    comments: str = "#",
) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """Load a numeric CSV (optionally gzipped, ``.gz``) as ``(X, y)``.

    Parameters
    ----------
    path : path
    label_column : int or None
        Column holding the label (negative counts from the end); ``None``
        returns every column in X and ``y=None``.
    delimiter : str or None
        Cell separator; ``None`` splits on whitespace.
    skip_header : bool or None
        ``None`` auto-detects: the first data line is a header when any of
        its cells is not a number (so an all-numeric header such as
        ``0,1,2`` needs ``skip_header=True``).
    dtype : dtype
        Dtype of X (float64 by default).
    comments : str
        Text after this marker is ignored; blank lines are skipped.

    Returns
    -------
    X : ndarray, shape (m, n_columns - 1)
    y : ndarray, shape (m,) or None
        int64 when every label is an integer value, float64 otherwise.

    Raises
    ------
    DataFormatError
        Non-numeric or empty cells and ragged rows, naming the line.
    """
    skip = 0
    first = None
    with _open_text(path) as fh:
        for lineno, line in _data_lines(fh, comments):
            first = (lineno, line)
            break
    if first is None:
        raise DataFormatError(f"{path}: no data rows")
    cells = _split_line(first[1], delimiter)
    if skip_header is None:
        skip_header = not all(_parse_float(c) for c in cells)
    if skip_header:
        skip = first[0]  # loadtxt's skiprows counts comment and blank lines too

    try:
        with _open_text(path) as fh, warnings.catch_warnings():
            # "input contained no data" is reported below as a DataFormatError.
            warnings.simplefilter("ignore", UserWarning)
            data = np.loadtxt(fh, delimiter=delimiter, skiprows=skip, dtype=np.float64,
                              comments=comments or None, ndmin=2)
    except ValueError as e:
        where = _find_csv_error(path, delimiter, skip, comments)
        raise DataFormatError(f"{path}: {where or e}") from None
    if data.shape[0] == 0:
        raise DataFormatError(f"{path}: no data rows after the header")

    if label_column is None:
        return data.astype(dtype, copy=False), None
    ncols = data.shape[1]
    if not -ncols <= label_column < ncols:
        raise ValueError(f"label_column={label_column} is out of range for {ncols} columns")
    col = label_column % ncols
    y = data[:, col]
    X = np.delete(data, col, axis=1).astype(dtype, copy=False)
    if np.all(np.isfinite(y)) and np.all(y == np.round(y)):
        y = y.astype(np.int64)
    return X, y.copy()


# IDX type codes (http://yann.lecun.com/exdb/mnist/): big-endian element types.
_IDX_DTYPES = {
    0x08: np.dtype("u1"),
    0x09: np.dtype("i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_GZIP_MAGIC = b"\x1f\x8b"
_CHUNK = 1 << 20


def _read_idx(path: PathLike) -> np.ndarray:
    """Read one IDX file (plain or gzip), checking the size before allocating."""
    path = os.fspath(path)
    with open(path, "rb") as raw:
        gz = raw.read(2) == _GZIP_MAGIC
    # Sniff the gzip magic as well as the extension: MNIST mirrors often
    # serve gzipped files under the plain name.
    is_gz = gz or path.endswith(".gz")
    opener = gzip.open if is_gz else open
    with opener(path, "rb") as f:
        try:
            head = f.read(4)
        except (OSError, EOFError) as e:
            raise DataFormatError(f"{path}: cannot decompress ({e})") from None
        if len(head) < 4:
            raise DataFormatError(f"{path}: truncated IDX file ({len(head)} bytes, no header)")
        if head[0] != 0 or head[1] != 0 or head[2] not in _IDX_DTYPES:
            raise DataFormatError(
                f"{path}: not an IDX file (bad magic number 0x{head.hex()}; expected "
                "0x0000TTNN with type TT in 08,09,0b,0c,0d,0e and NN dimensions)"
            )
        dtype, ndim = _IDX_DTYPES[head[2]], head[3]
        if ndim == 0:
            raise DataFormatError(f"{path}: IDX header declares 0 dimensions")
        dims_raw = f.read(4 * ndim)
        if len(dims_raw) < 4 * ndim:
            raise DataFormatError(f"{path}: truncated IDX header ({ndim} dimensions declared)")
        dims = tuple(int(d) for d in np.frombuffer(dims_raw, dtype=">u4"))
        # Python ints: no overflow however absurd the declared dims are.
        expected = math.prod(dims) * dtype.itemsize
        header = 4 + 4 * ndim
        if not is_gz:
            actual = os.fstat(f.fileno()).st_size - header
            if actual != expected:
                raise DataFormatError(_idx_size_msg(path, dims, dtype, expected, actual))
            data = np.fromfile(f, dtype=dtype, count=math.prod(dims))
        else:
            # The decompressed size is unknown up front: read in chunks, stop
            # one byte past the declared size, so memory follows the real data
            # and never an absurd header.
            buf = bytearray()
            try:
                while len(buf) <= expected:
                    chunk = f.read(min(_CHUNK, expected + 1 - len(buf)))
                    if not chunk:
                        break
                    buf += chunk
            except (OSError, EOFError) as e:
                raise DataFormatError(f"{path}: corrupt or truncated gzip stream ({e})") from None
            if len(buf) != expected:
                actual = f"more than {expected}" if len(buf) > expected else len(buf)
                raise DataFormatError(_idx_size_msg(path, dims, dtype, expected, actual))
            data = np.frombuffer(buf, dtype=dtype)
    if data.size != math.prod(dims):  # defensive: fromfile may stop short
        raise DataFormatError(f"{path}: truncated IDX data")
    return data.reshape(dims).astype(dtype.newbyteorder("="), copy=False)


def _idx_size_msg(path: str, dims: tuple, dtype: np.dtype, expected: int, actual: Any) -> str:
    return (f"{path}: IDX header declares dims {dims} of {dtype.name} ({expected} data bytes) "
            f"but the file holds {actual} data bytes (truncated or corrupt)")


def load_idx(
    images_path: PathLike,
    labels_path: Optional[PathLike] = None,
    *,
    flatten: bool = True,
    dtype: Optional[DTypeLike] = None,
) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """Load MNIST-style IDX files (``.gz`` or plain) as ``(X, y)``.

    Parameters
    ----------
    images_path : path
        IDX file of examples, shape ``(m, d1, d2, ...)`` as declared in the header.
    labels_path : path or None
        IDX file of ``m`` labels; ``None`` returns ``y=None``.
    flatten : bool
        Return X as ``(m, d1*d2*...)`` rows (what a dense network eats);
        ``False`` keeps the image shape, e.g. ``(m, 28, 28)``.
    dtype : dtype or None
        Convert X to this dtype; ``None`` keeps the stored type (uint8 for
        MNIST, the smallest in memory: scale it yourself, e.g. ``X / 255``).

    Returns
    -------
    X : ndarray
    y : ndarray of int64 (integer labels) or None
    """
    X = _read_idx(images_path)
    if flatten and X.ndim > 2:
        X = X.reshape(X.shape[0], -1)
    if dtype is not None:
        X = X.astype(dtype, copy=False)
    y = None
    if labels_path is not None:
        y = _read_idx(labels_path)
        if y.shape[0] != X.shape[0]:
            raise DataFormatError(
                f"{labels_path}: {y.shape[0]} labels for {X.shape[0]} examples in {images_path}"
            )
        if y.ndim == 1 and y.dtype.kind in "iu":
            y = y.astype(np.int64)
    return X, y


def _is_idx_name(name: str) -> bool:
    base = name[:-3] if name.endswith(".gz") else name
    # train-images-idx3-ubyte, train-images.idx3-ubyte, foo.idx
    return base.endswith(".idx") or ("idx" in base and base.endswith("-ubyte"))


def _guess_idx_labels(path: Path) -> Optional[Path]:
    name = path.name
    if "images" not in name:
        return None
    cand = path.with_name(name.replace("images", "labels").replace("idx3", "idx1"))
    return cand if cand != path and cand.exists() else None


def load_dataset(path: PathLike, **kwargs: Any) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """Load ``(X, y)`` from a file, choosing the loader by its name.

    ``.npz`` -> :func:`load_npz`; ``.csv``, ``.csv.gz``, ``.txt``, ``.tsv``
    (tab-separated) and their ``.gz`` -> :func:`load_csv`; ``.idx``,
    ``*-idx3-ubyte`` and the like (also ``.gz``) -> :func:`load_idx`, where an
    images file picks up its labels file (``images`` -> ``labels``, ``idx3`` ->
    ``idx1``) from the same directory unless ``labels_path`` is given.
    Keyword arguments go to the loader.
    """
    p = Path(path)
    name = p.name.lower()
    if name.endswith(".npz"):
        return load_npz(p, **kwargs)
    for ext in (".csv", ".txt", ".tsv"):
        if name.endswith(ext) or name.endswith(ext + ".gz"):
            if ext == ".tsv":
                kwargs.setdefault("delimiter", "\t")
            return load_csv(p, **kwargs)
    if _is_idx_name(name):
        if "labels_path" not in kwargs:
            kwargs["labels_path"] = _guess_idx_labels(p)
        return load_idx(p, **kwargs)
    raise ValueError(
        f"{path}: unknown data file type; supported: .npz, .csv/.txt/.tsv (optionally .gz), "
        ".idx and *-idxN-ubyte (optionally .gz)"
    )
