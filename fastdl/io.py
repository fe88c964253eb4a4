"""Model files: one ``.npz`` archive, no pickle, written atomically.

Contents: ``format`` (magic string), ``version``, ``config`` (the
architecture as JSON), ``params``, ``state`` (BatchNorm running statistics),
optionally ``metadata`` (JSON) and the optimiser (``optimizer`` JSON plus
``opt.<name>`` arrays).
"""
from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from ._atomic import atomic_write
from .optim import Optimizer, optimizer_from_state

MAGIC = "fastdl-model"
VERSION = 1


class ModelFileError(ValueError):
    """The file is not a readable fastdl model (corrupt, foreign or incompatible)."""


def save_model(model, path: "str | os.PathLike", *, optimizer: Optimizer | None = None,
               metadata: dict[str, Any] | None = None) -> None:
    """Save ``model`` (architecture, params, BatchNorm statistics) to ``path``.

    ``optimizer`` adds its state (for resuming training); ``metadata`` is any
    JSON-serialisable dict (e.g. a fitted standardizer) returned by
    :func:`load_metadata`.
    """
    arrays: dict[str, np.ndarray] = {
        "format": np.array(MAGIC),
        "version": np.array(VERSION, dtype=np.int64),
        "config": np.array(json.dumps(model.get_config())),
        "params": model.params,
        "state": model.state,
        "step_count": np.array(model.step_count, dtype=np.int64),
    }
    if metadata is not None:
        arrays["metadata"] = np.array(json.dumps(metadata))
    if optimizer is not None:
        sd = optimizer.state_dict()
        arrays["optimizer"] = np.array(json.dumps({"type": sd["type"], "config": sd["config"], "t": sd["t"]}))
        for name, arr in sd["arrays"].items():
            arrays[f"opt.{name}"] = arr
    atomic_write(path, lambda f: np.savez(f, **arrays))


def _read(path) -> dict[str, np.ndarray]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no model file at {str(path)!r}")
    try:
        z = np.load(path, allow_pickle=False)
        if not isinstance(z, np.lib.npyio.NpzFile):  # a bare .npy is an ndarray (no context manager)
            raise ModelFileError(f"{path} is a bare .npy array, not a fastdl model file")
        with z:
            data = {k: z[k] for k in z.files}
    except ModelFileError:
        raise
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError) as exc:
        raise ModelFileError(f"{path} is not a readable fastdl model file ({type(exc).__name__}: {exc})") from None
    if data.get("format") is None or str(data["format"]) != MAGIC:
        raise ModelFileError(f"{path} is not a fastdl model file (missing or wrong 'format' marker)")
    version = int(data.get("version", -1))
    if version != VERSION:
        raise ModelFileError(f"{path} has format version {version}; this fastdl reads version {VERSION}")
    for key in ("config", "params", "state"):
        if key not in data:
            raise ModelFileError(f"{path} is missing {key!r}")
    return data


def load_model(path: "str | os.PathLike", backend: str = "auto"):
    """Load a model saved by :meth:`Sequential.save` (see :func:`load_optimizer` for its optimiser)."""
    from .model import Sequential

    from .layers import layer_from_config

    data = _read(path)
    try:
        config = json.loads(str(data["config"]))
        # Check the declared sizes against the stored arrays BEFORE allocating anything,
        # so a corrupt or hostile architecture cannot trigger a huge allocation.
        n_declared = sum(int(np.prod(shape)) for d in config["layers"]
                         for _, shape in layer_from_config(d["type"], d["config"]).param_specs())
        if n_declared != data["params"].size:
            raise ModelFileError(f"{path}: 'params' has shape {data['params'].shape} but the architecture needs "
                                 f"({n_declared},) (another model's weights, or a corrupt/too large declaration)")
        model = Sequential.from_config(config, backend=backend)
    except ModelFileError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ModelFileError(f"{path} holds an invalid architecture: {exc}") from None
    for key, target in (("params", model.params), ("state", model.state)):
        arr = data[key]
        if arr.ndim != 1 or arr.shape != target.shape:
            raise ModelFileError(f"{path}: {key!r} has shape {arr.shape} but the architecture needs "
                                 f"{target.shape}")
        if arr.dtype != target.dtype:
            raise ModelFileError(f"{path}: {key!r} is {arr.dtype} but the architecture says {target.dtype}")
        if not np.isfinite(arr).all():
            raise ModelFileError(f"{path}: {key!r} contains NaN or infinite values")
        target[...] = arr
    model.step_count = int(data.get("step_count", 0))
    return model


def load_optimizer(path: "str | os.PathLike") -> Optimizer | None:
    """The optimiser saved with the model at ``path``, or None if none was saved."""
    data = _read(path)
    if "optimizer" not in data:
        return None
    try:
        d = json.loads(str(data["optimizer"]))
        d["arrays"] = {k[4:]: v for k, v in data.items() if k.startswith("opt.")}
        opt = optimizer_from_state(d)
    except (ValueError, KeyError, TypeError) as exc:
        raise ModelFileError(f"{path} holds an invalid optimizer state: {exc}") from None
    n = data["params"].size
    for name, arr in opt.state.items():
        if arr.shape != (n,):
            raise ModelFileError(f"{path}: optimizer state {name!r} has shape {arr.shape}, expected ({n},)")
    return opt


def load_metadata(path: "str | os.PathLike") -> dict[str, Any]:
    """The metadata dict saved with the model (empty if none)."""
    data = _read(path)
    if "metadata" not in data:
        return {}
    return json.loads(str(data["metadata"]))
