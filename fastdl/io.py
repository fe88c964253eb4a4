"""Model files: one ``.npz`` archive, no pickle, written atomically, read defensively.

Members (each a ``.npy`` file inside an uncompressed zip, as ``np.savez``
writes them): ``format`` (magic string), ``version``, ``config`` (the
architecture as JSON), ``params``, ``state`` (BatchNorm running statistics),
``step_count``, optionally ``metadata`` (JSON) and the optimiser
(``optimizer`` JSON plus ``opt.<name>`` arrays). Training checkpoints
(:mod:`fastdl.checkpoint`) add ``checkpoint`` and ``history`` (UTF-8 JSON),
``history.batch_cost`` and ``cb.<position>.<name>`` (callback arrays).

Reading never trusts the file (README "Guarantees"): the zip directory is
checked first (known member names, no duplicates, stored or deflated only,
no encryption, explicit size caps, bounded inflation), then every array's
``.npy`` header is checked against the shape and dtype the architecture
implies, and only then is any data read, straight into its final array.
Whatever is wrong raises :class:`ModelFileError` naming the member and the
problem.
"""
from __future__ import annotations

import json
import math
import os
import re
import struct
import zipfile
import zlib
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from ._atomic import atomic_write

MAGIC = "fastdl-model"
VERSION = 1

# ---------------------------------------------------------------------------- limits
# Uncompressed member sizes in bytes. Text members written by np.savez are UTF-32 ('<U'),
# 4 bytes per character; checkpoint JSON members are UTF-8 bytes.
MAX_MEMBERS = 4096
MAX_SMALL_BYTES = 4096                 # format, version, step_count
MAX_CONFIG_BYTES = 16 << 20            # architecture JSON: ~4M characters, far beyond any real model
MAX_OPTIMIZER_BYTES = 1 << 20          # optimiser type, config and t
MAX_METADATA_BYTES = 256 << 20         # user metadata (e.g. a standardizer of 10^6 features)
MAX_CHECKPOINT_BYTES = 64 << 20        # run info, schedule and callback configs/values
#: per-epoch history (loss, error, cost, val_*, lr and per-array norms), UTF-8 JSON: about
#: 10^6 epochs of the usual logs, or 2*10^5 epochs with the norms of 10 arrays
MAX_HISTORY_BYTES = 128 << 20
#: the cost of every mini-batch (float64 array): 10^8 steps (800 MB); never more than step_count
MAX_HISTORY_STEPS = 10 ** 8
MAX_JSON_DEPTH = 32                    # nesting of any JSON member (configs are 4 deep)
MAX_NPY_HEADER = 4096                  # bytes of a .npy header (numpy writes 128)
#: a deflated member may expand at most this many times (real float data: < 1.2x); members
#: up to INFLATE_FREE bytes are exempt. Bounds the memory any file can make a reader use.
MAX_INFLATE_RATIO = 64
INFLATE_FREE = 1 << 20
#: callback arrays together may hold at most this many times the model's params + state
#: (EarlyStopping keeps one copy of each) plus a constant
CALLBACK_ARRAY_FACTOR = 4
CALLBACK_ARRAY_EXTRA = 1 << 20

_NAME = r"[A-Za-z_][A-Za-z0-9_]{0,63}"
_CB_MEMBER = re.compile(rf"cb\.(\d{{1,6}})\.({_NAME})")
_OPT_MEMBER = re.compile(rf"opt\.({_NAME})")
_MODEL_MEMBERS = ("format", "version", "config", "params", "state", "step_count", "metadata", "optimizer")
_CHECKPOINT_MEMBERS = ("checkpoint", "history", "history.batch_cost")
#: dtypes a callback array may have
CALLBACK_DTYPES = ("float32", "float64", "int64", "int32", "uint8", "bool")


class ModelFileError(ValueError):
    """The file is not a readable fastdl model (corrupt, foreign, hostile or incompatible)."""


# ---------------------------------------------------------------------------- writing


def _text(s: str) -> np.ndarray:
    return np.array(s)  # 0-d '<U' array: what every fastdl version reads


def model_arrays(model, *, optimizer=None, metadata: dict[str, Any] | None = None) -> dict[str, np.ndarray]:
    """The members of ``model``'s file (shared with checkpoints)."""
    arrays: dict[str, np.ndarray] = {
        "format": _text(MAGIC),
        "version": np.array(VERSION, dtype=np.int64),
        "config": _text(json.dumps(model.get_config())),
        "params": model.params,
        "state": model.state,
        "step_count": np.array(model.step_count, dtype=np.int64),
    }
    if metadata is not None:
        try:
            arrays["metadata"] = _text(json.dumps(metadata))
        except (TypeError, ValueError) as exc:
            raise TypeError(f"metadata must be JSON-serialisable: {exc}") from None
    if optimizer is not None:
        sd = optimizer.state_dict()
        arrays["optimizer"] = _text(json.dumps({"type": sd["type"], "config": sd["config"], "t": sd["t"]}))
        for name, arr in sd["arrays"].items():
            arrays[f"opt.{name}"] = arr
    return arrays


def write_members(path: "str | os.PathLike", arrays: dict[str, np.ndarray]) -> None:
    """Write ``arrays`` as an uncompressed npz at ``path``, atomically (see :mod:`fastdl._atomic`)."""
    atomic_write(path, lambda f: np.savez(f, **arrays))


def save_model(model, path: "str | os.PathLike", *, optimizer=None,
               metadata: dict[str, Any] | None = None) -> None:
    """Save ``model`` (architecture, params, BatchNorm statistics) to ``path``.

    ``optimizer`` adds its state (for resuming training); ``metadata`` is any
    JSON-serialisable dict (e.g. a fitted standardizer) returned by
    :func:`load_metadata`. The directory must exist (``FileNotFoundError``
    otherwise, like ``np.save``); the write is atomic.
    """
    write_members(path, model_arrays(model, optimizer=optimizer, metadata=metadata))


# ---------------------------------------------------------------------------- reading


def _json_depth(text: str) -> int:
    """Maximum bracket nesting of a JSON text, without parsing it (strings skipped)."""
    stripped = re.sub(r'"(?:[^"\\]|\\.)*"', "", text)
    if not stripped:
        return 0
    b = np.frombuffer(stripped.encode("utf-8", "surrogatepass"), np.uint8)
    step = ((b == 0x5B) | (b == 0x7B)).astype(np.int32) - ((b == 0x5D) | (b == 0x7D)).astype(np.int32)
    return int(np.cumsum(step).max(initial=0))


def parse_json(text: str, what: str, *, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """``json.loads`` that refuses deep nesting and raises ModelFileError naming ``what``."""
    depth = _json_depth(text)
    if depth > max_depth:
        raise ModelFileError(f"{what} is nested {depth} levels deep (at most {max_depth} allowed)")
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError; huge ints too
        raise ModelFileError(f"{what} is not valid JSON ({type(exc).__name__}: {exc})") from None


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


class Archive:
    """One model or checkpoint file, opened once; its zip directory checked on open.

    Members are read on demand, each after its ``.npy`` header has been
    checked against the caller's expectation. Use as a context manager.
    """

    def __init__(self, path: "str | os.PathLike"):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"no model file at {str(self.path)!r}")
        self._f: BinaryIO = open(self.path, "rb")  # PermissionError etc. propagate as they are
        try:
            self._open()
        except BaseException:
            self._f.close()
            raise

    # -- directory ---------------------------------------------------------------
    def _err(self, msg: str) -> ModelFileError:
        return ModelFileError(f"{self.path}: {msg}")

    def _open(self) -> None:
        f = self._f
        f.seek(0, os.SEEK_END)
        self.size = f.tell()
        f.seek(0)
        head = f.read(512)
        f.seek(0)
        if head.startswith(b"\x93NUMPY"):
            raise self._err("is a bare .npy array, not a fastdl model file")
        if not head.startswith(b"PK"):
            raise self._err(f"is not a fastdl model file ({_describe(head)})")
        try:
            self.zip = zipfile.ZipFile(f)
            infos = self.zip.infolist()
        except Exception as exc:  # noqa: BLE001 - zipfile parsing untrusted bytes: any failure means a bad file
            raise self._err(f"is not a readable fastdl model file (damaged zip archive: "
                            f"{type(exc).__name__}: {exc})") from None
        if len(infos) > MAX_MEMBERS:
            raise self._err(f"has {len(infos)} members (a fastdl file has at most {MAX_MEMBERS})")
        self.members: dict[str, zipfile.ZipInfo] = {}
        has_format = any(i.filename == "format.npy" for i in infos)
        for info in infos:
            name = info.filename
            if not name.endswith(".npy"):
                raise self._err(f"is not a fastdl model file (unexpected member {name[:80]!r})")
            key = name[:-4]
            if key in self.members:
                raise self._err(f"has the member {name!r} twice")
            if not (key in _MODEL_MEMBERS or key in _CHECKPOINT_MEMBERS or _OPT_MEMBER.fullmatch(key)
                    or _CB_MEMBER.fullmatch(key)):
                if not has_format:
                    raise self._err("is not a fastdl model file (missing 'format' marker; "
                                    f"it holds {name[:80]!r})")
                raise self._err(f"has an unknown member {name[:80]!r} (not part of a fastdl model file)")
            if info.flag_bits & 0x1:
                raise self._err(f"member {name!r} is encrypted (fastdl files never are)")
            if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
                raise self._err(f"member {name!r} uses zip compression method {info.compress_type}; "
                                "fastdl reads stored or deflated members only")
            if info.compress_size > self.size or info.header_offset > self.size:
                raise self._err(f"member {name!r} claims {info.compress_size} bytes at offset "
                                f"{info.header_offset} of a {self.size}-byte file (truncated or damaged)")
            if info.compress_type == zipfile.ZIP_STORED and info.file_size != info.compress_size:
                raise self._err(f"stored member {name!r} declares {info.file_size} bytes but holds "
                                f"{info.compress_size}")
            if (info.compress_type == zipfile.ZIP_DEFLATED and info.file_size > INFLATE_FREE
                    and info.file_size > MAX_INFLATE_RATIO * info.compress_size):
                raise self._err(f"member {name!r} would expand {info.compress_size} compressed bytes to "
                                f"{info.file_size} (more than {MAX_INFLATE_RATIO}x: a decompression bomb, "
                                "refused before decompressing)")
            self.members[key] = info
        if "format" not in self.members:
            raise self._err("is not a fastdl model file (missing 'format' marker)")

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> "Archive":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __contains__(self, key: str) -> bool:
        return key in self.members

    # -- members -------------------------------------------------------------------
    def _header(self, key: str):
        """(stream, shape, dtype, fortran_order, data_bytes) of member ``key``, data not yet read."""
        info = self.members[key]
        try:
            fp = self.zip.open(info)
        except (zipfile.BadZipFile, OSError, EOFError, ValueError, struct.error, NotImplementedError,
                RuntimeError, zlib.error) as exc:
            raise self._err(f"member {key!r} cannot be opened ({type(exc).__name__}: {exc})") from None
        try:
            version = np.lib.format.read_magic(fp)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(fp, max_header_size=MAX_NPY_HEADER)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(fp, max_header_size=MAX_NPY_HEADER)
            else:
                raise ValueError(f"unsupported .npy format version {version}")
            hlen = fp.tell()
        except Exception as exc:  # noqa: BLE001 - numpy evaluates the untrusted header text: any failure is a bad file
            fp.close()
            raise self._err(f"member {key!r} has an invalid .npy header ({type(exc).__name__}: {exc})") from None
        if dtype.hasobject:
            fp.close()
            raise self._err(f"member {key!r} holds Python objects (dtype {dtype}); fastdl files never do")
        if not all(_is_int(d) and d >= 0 for d in shape) or len(shape) > 8:
            fp.close()
            raise self._err(f"member {key!r} has an invalid shape {shape!r}")
        n = math.prod(shape)
        nbytes = n * dtype.itemsize
        if hlen + nbytes != info.file_size:
            fp.close()
            raise self._err(f"member {key!r} declares shape {shape} of {dtype} ({nbytes} bytes) but the "
                            f"archive says {info.file_size - hlen} data bytes")
        return fp, shape, dtype, fortran, nbytes

    def _read_into(self, key: str, fp, out: np.ndarray, nbytes: int) -> None:
        """Read exactly ``nbytes`` from ``fp`` into ``out``'s memory and verify the member's CRC."""
        view = memoryview(out.reshape(-1).view(np.uint8)) if nbytes else memoryview(b"")
        try:
            pos = 0
            while pos < nbytes:
                chunk = fp.read(min(nbytes - pos, 1 << 24))
                if not chunk:
                    raise EOFError(f"data ends after {pos} of {nbytes} bytes")
                view[pos:pos + len(chunk)] = chunk
                pos += len(chunk)
            if fp.read(1):  # also makes zipfile check the CRC at the end of the member
                raise ValueError("more data than the header declares")
        except (zipfile.BadZipFile, OSError, EOFError, ValueError, zlib.error, struct.error) as exc:
            raise self._err(f"member {key!r} is damaged ({type(exc).__name__}: {exc})") from None
        finally:
            fp.close()

    def array(self, key: str, shape: tuple[int, ...], dtype: "np.dtype | str", *,
              out: np.ndarray | None = None) -> np.ndarray:
        """Member ``key`` as an array of exactly ``shape`` and ``dtype`` (byte order may differ in the file).

        With ``out`` the data is read straight into it (nothing else allocated).
        """
        if key not in self.members:
            raise self._err(f"is missing {key!r}")
        dtype = np.dtype(dtype)
        fp, fshape, fdtype, fortran, nbytes = self._header(key)
        if fdtype != dtype and fdtype != dtype.newbyteorder():
            fp.close()
            raise self._err(f"{key!r} is {fdtype} but {dtype} was expected")
        if tuple(fshape) != tuple(shape):
            fp.close()
            raise self._err(f"{key!r} has shape {tuple(fshape)} but the architecture needs {tuple(shape)}")
        native = fdtype == dtype
        if out is not None and native and not fortran and out.flags.c_contiguous:
            self._read_into(key, fp, out, nbytes)
            return out
        buf = np.empty(math.prod(fshape), fdtype)
        self._read_into(key, fp, buf, nbytes)
        arr = buf.reshape(fshape, order="F" if fortran else "C").astype(dtype, order="C", copy=False)
        if out is not None:
            out[...] = arr
            return out
        return arr if arr.flags.c_contiguous else arr.copy(order="C")  # (ascontiguousarray makes 0-d 1-d)

    def header(self, key: str) -> tuple[tuple[int, ...], np.dtype]:
        """(shape, dtype) of member ``key`` without reading its data."""
        fp, shape, dtype, _, _ = self._header(key)
        fp.close()
        return tuple(shape), dtype

    def any_array(self, key: str, *, dtypes: tuple[str, ...], max_elements: int) -> np.ndarray:
        """Member ``key`` in any of ``dtypes`` (native order) with at most ``max_elements`` elements."""
        if key not in self.members:
            raise self._err(f"is missing {key!r}")
        shape, dtype = self.header(key)
        if dtype.newbyteorder("=").name not in dtypes:
            raise self._err(f"{key!r} is {dtype}; allowed: {', '.join(dtypes)}")
        if math.prod(shape) > max_elements:
            raise self._err(f"{key!r} has {math.prod(shape)} elements (at most {max_elements} allowed)")
        return self.array(key, shape, dtype.newbyteorder("="))

    def text(self, key: str, max_bytes: int) -> str:
        """A text member: a 0-d unicode array (np.savez of a str) or a 1-d uint8 array of UTF-8."""
        if key not in self.members:
            raise self._err(f"is missing {key!r}")
        info = self.members[key]
        if info.file_size > max_bytes + MAX_NPY_HEADER:
            raise self._err(f"{key!r} is {info.file_size} bytes (at most {max_bytes} allowed)")
        fp, shape, dtype, _, nbytes = self._header(key)
        if nbytes > max_bytes:
            fp.close()
            raise self._err(f"{key!r} is {nbytes} bytes (at most {max_bytes} allowed)")
        if dtype.kind == "U" and shape == ():
            buf = np.empty((), dtype)
            self._read_into(key, fp, buf, nbytes)
            try:
                return str(buf.astype(dtype.newbyteorder("=")))
            except (ValueError, UnicodeError) as exc:
                raise self._err(f"{key!r} is not valid text ({exc})") from None
        if dtype == np.uint8 and len(shape) == 1:
            buf = np.empty(shape, np.uint8)
            self._read_into(key, fp, buf, nbytes)
            try:
                return buf.tobytes().decode("utf-8")
            except UnicodeDecodeError as exc:
                raise self._err(f"{key!r} is not valid UTF-8 ({exc})") from None
        fp.close()
        raise self._err(f"{key!r} must be a string, but holds an array of shape {shape} and dtype {dtype}")

    def json(self, key: str, max_bytes: int) -> Any:
        """A JSON member, size- and depth-capped."""
        return parse_json(self.text(key, max_bytes), f"{self.path}: {key!r}")

    def int_scalar(self, key: str, *, lo: int = 0, hi: int = 2 ** 62) -> int:
        """A 0-d integer member in ``[lo, hi]``."""
        if key not in self.members:
            raise self._err(f"is missing {key!r}")
        if self.members[key].file_size > MAX_SMALL_BYTES:
            raise self._err(f"{key!r} is {self.members[key].file_size} bytes; it should be one integer")
        shape, dtype = self.header(key)
        if shape != () or dtype.kind not in "iu":
            raise self._err(f"{key!r} must be one integer, but holds an array of shape {shape} and "
                            f"dtype {dtype}")
        v = int(self.array(key, (), dtype.newbyteorder("=")))
        if not lo <= v <= hi:
            raise self._err(f"{key!r} is {v}, outside [{lo}, {hi}]")
        return v

    # -- the parts every reader checks ---------------------------------------------
    def check_marker(self) -> None:
        """The format marker and version, or ModelFileError."""
        try:
            marker = self.text("format", MAX_SMALL_BYTES)
        except ModelFileError as exc:
            raise self._err(f"is not a fastdl model file (bad 'format' marker: {exc})") from None
        if marker != MAGIC:
            raise self._err(f"is not a fastdl model file (wrong 'format' marker {marker[:40]!r})")
        if "version" not in self:
            raise self._err(f"has no format 'version'; this fastdl reads version {VERSION}")
        version = self.int_scalar("version", lo=-(2 ** 62))
        if version != VERSION:
            raise self._err(f"has format version {version}; this fastdl reads version {VERSION}")

    def config(self) -> dict[str, Any]:
        """The architecture JSON, checked for its basic structure."""
        config = parse_json(self.text("config", MAX_CONFIG_BYTES), f"{self.path}: holds an invalid architecture: "
                            "'config'")
        layers = config.get("layers") if isinstance(config, dict) else None
        if not isinstance(layers, list) or not layers or not all(
                isinstance(d, dict) and isinstance(d.get("type"), str) and isinstance(d.get("config"), dict)
                for d in layers):
            raise self._err("holds an invalid architecture: 'config' must be an object with a non-empty "
                            "'layers' list of {'type': str, 'config': {...}}")
        return config

    def step_count(self) -> int:
        return self.int_scalar("step_count") if "step_count" in self else 0

    def optimizer_header(self) -> dict[str, Any] | None:
        """The optimiser's JSON (type, config, t), validated, or None if the file has none."""
        if "optimizer" not in self:
            if any(k.startswith("opt.") for k in self.members):
                raise self._err("has optimizer arrays but no 'optimizer' description")
            return None
        d = self.json("optimizer", MAX_OPTIMIZER_BYTES)
        from .optim import OPTIMIZERS

        classes = {c.__name__: c for c in OPTIMIZERS.values()}
        if not isinstance(d, dict) or not isinstance(d.get("type"), str) or not isinstance(d.get("config"), dict):
            raise self._err("holds an invalid optimizer state: 'optimizer' must be an object with 'type' (str), "
                            "'config' (object) and 't' (int)")
        if d["type"] not in classes:
            raise self._err(f"holds an invalid optimizer state: unknown optimizer type {d['type'][:40]!r} "
                            f"(known: {sorted(classes)})")
        t = d.get("t")
        if not _is_int(t) or not 0 <= t <= 2 ** 53:
            raise self._err(f"holds an invalid optimizer state: step count t={t!r} (must be an integer >= 0)")
        names = classes[d["type"]].state_names
        present = sorted(k[4:] for k in self.members if k.startswith("opt."))
        unknown = sorted(set(present) - set(names))
        if unknown:
            raise self._err(f"has optimizer arrays {unknown} that {d['type']} does not use")
        if (t > 0 or present) and sorted(names) != present:
            missing = sorted(set(names) - set(present))
            raise self._err(f"is missing optimizer state {', '.join('opt.' + m for m in missing)} "
                            f"({d['type']} after {t} steps needs {', '.join(names)})")
        d["cls"] = classes[d["type"]]
        return d

    def optimizer_arrays(self, names, n: int, dtype: np.dtype) -> dict[str, np.ndarray]:
        """The ``opt.<name>`` arrays, each of shape (n,), finite (and ``s`` non-negative)."""
        out = {}
        for name in names:
            key = f"opt.{name}"
            if key not in self:
                continue
            shape, fdtype = self.header(key)
            if shape != (n,) or fdtype.kind != "f":
                raise self._err(f"optimizer state {name!r} has shape {shape} and dtype {fdtype}, expected "
                                f"({n},) of {dtype}: it belongs to another model")
            arr = self.array(key, (n,), fdtype.newbyteorder("=")).astype(dtype, copy=False)
            if not np.isfinite(arr).all():
                raise self._err(f"optimizer state {name!r} contains NaN or infinite values")
            if name == "s" and (arr < 0).any():
                raise self._err("optimizer state 's' (squared-gradient average) has negative entries")
            out[name] = arr
        return out


def _describe(head: bytes) -> str:
    """What a non-zip file looks like, for the error message."""
    if not head:
        return "the file is empty"
    sample = head[:256]
    try:
        text = sample.decode("utf-8")
    except UnicodeDecodeError as exc:
        text = sample[:exc.start].decode("utf-8") if exc.start > len(sample) - 4 else None
    if text is not None and all(c.isprintable() or c in "\r\n\t" for c in text):
        first = text.splitlines()[0][:40] if text.strip() else ""
        return f"it is a text file starting {first!r}; fastdl model files are zip archives"
    return f"not a zip archive; it starts with bytes {head[:8]!r}"


def _expected_sizes(arc: Archive, config: dict[str, Any]) -> tuple[int, int, np.dtype]:
    """(n_params, n_state, dtype) that ``config`` implies, without allocating the model."""
    from .layers import layer_from_config

    n_params = n_state = 0
    for i, d in enumerate(config["layers"]):
        try:
            layer = layer_from_config(d["type"], d["config"])
            n_params += sum(math.prod(s) for _, s in layer.param_specs())
            n_state += sum(math.prod(s) for _, s in layer.state_specs())
        except Exception as exc:  # noqa: BLE001 - any bad layer config is a bad file, named as such
            raise arc._err(f"holds an invalid architecture: layers[{i}] ({str(d['type'])[:40]}): "
                           f"{type(exc).__name__}: {exc}") from None
    if config.get("dtype") not in ("float32", "float64"):
        raise arc._err(f"holds an invalid architecture: dtype {config.get('dtype')!r} "
                       "(must be 'float32' or 'float64')")
    return n_params, n_state, np.dtype(config["dtype"])


def build_model(arc: Archive, config: dict[str, Any], backend) -> Any:
    """A model with the file's architecture, params, state and step count (all checked)."""
    from .backends import get_backend
    from .model import Sequential

    kernels = get_backend(backend)  # an unavailable backend is the caller's problem, not the file's
    n_params, n_state, dtype = _expected_sizes(arc, config)
    # headers first: a wrong size is refused before anything is allocated or decompressed
    for key, n in (("params", n_params), ("state", n_state)):
        if key not in arc:
            raise arc._err(f"is missing {key!r}")
        shape, fdtype = arc.header(key)
        if shape != (n,):
            raise arc._err(f"{key!r} has shape {shape} but the architecture needs ({n},) "
                           "(another model's weights, or a corrupt/too large declaration)")
        if fdtype != dtype and fdtype != dtype.newbyteorder():
            raise arc._err(f"{key!r} is {fdtype} but the architecture says {dtype}")
    cfg = dict(config)
    cfg.setdefault("precision", "fp32")  # files written before mixed precision existed are float32
    try:
        model = Sequential.from_config(cfg, backend=kernels)
    except Exception as exc:  # noqa: BLE001 - a config the model refuses is an invalid file
        raise arc._err(f"holds an invalid architecture: {type(exc).__name__}: {exc}") from None
    if model.params.shape != (n_params,) or model.state.shape != (n_state,):
        raise arc._err("holds an architecture whose parameter layout this fastdl cannot rebuild")
    for key, target in (("params", model.params), ("state", model.state)):
        arc.array(key, target.shape, target.dtype, out=target)
        if not np.isfinite(target).all():
            raise arc._err(f"{key!r} contains NaN or infinite values")
    model.step_count = arc.step_count()
    return model


def load_model(path: "str | os.PathLike", backend: str = "auto"):
    """Load a model saved by :meth:`Sequential.save` (or the model of a training checkpoint).

    Raises ``FileNotFoundError`` if there is no file and :class:`ModelFileError`
    naming the problem for anything that is not a valid fastdl model file.
    See :func:`load_optimizer` for its optimiser.
    """
    with Archive(path) as arc:
        arc.check_marker()
        check_members(arc)
        return build_model(arc, arc.config(), backend)


def check_members(arc: Archive) -> None:
    """Every member is one this file's optimiser / checkpoint parts declare (no strays)."""
    arc.optimizer_header()
    extra = [k for k in arc.members if k in _CHECKPOINT_MEMBERS or k.startswith("cb.")]
    if extra:
        from .checkpoint import _read_run, callback_members

        if "checkpoint" not in arc:
            raise arc._err(f"has checkpoint members {sorted(extra)[:5]} but no 'checkpoint' description")
        declared = set(callback_members(_read_run(arc)["callbacks"]))
        stray = sorted(k for k in extra if k.startswith("cb.") and k not in declared)
        if stray:
            raise arc._err(f"has callback arrays {stray[:5]} that no callback state declares")


def load_optimizer(path: "str | os.PathLike"):
    """The optimiser saved with the model at ``path``, or None if none was saved."""
    from .optim import optimizer_from_state

    with Archive(path) as arc:
        arc.check_marker()
        d = arc.optimizer_header()
        if d is None:
            return None
        if "params" not in arc:
            raise arc._err("is missing 'params'")
        shape, dtype = arc.header("params")
        if len(shape) != 1 or dtype.kind != "f":
            raise arc._err(f"'params' has shape {shape} and dtype {dtype}; expected a 1-d float array")
        arrays = arc.optimizer_arrays(d["cls"].state_names, shape[0], dtype.newbyteorder("="))
        try:
            return optimizer_from_state({"type": d["type"], "config": d["config"], "t": d["t"], "arrays": arrays})
        except (ValueError, TypeError, KeyError) as exc:
            raise arc._err(f"holds an invalid optimizer state: {type(exc).__name__}: {exc}") from None


def load_metadata(path: "str | os.PathLike") -> dict[str, Any]:
    """The metadata dict saved with the model (empty if none)."""
    with Archive(path) as arc:
        arc.check_marker()
        if "metadata" not in arc:
            return {}
        meta = arc.json("metadata", MAX_METADATA_BYTES)
        if not isinstance(meta, dict):
            raise arc._err(f"'metadata' must be a JSON object, not {type(meta).__name__}")
        return meta


__all__ = ["MAGIC", "VERSION", "ModelFileError", "load_metadata", "load_model", "load_optimizer", "save_model"]
