"""Training checkpoints: a model file plus the position of the training run.

A checkpoint is an ordinary model file (:mod:`fastdl.io`) holding the
optimiser state and, in its metadata, the next epoch, the step counter and
the history so far. Every random stream of ``fit`` is keyed by (seed, epoch)
or (seed, step), so these counters are the whole random-stream position.
"""
from __future__ import annotations

import json
import os
from typing import Any

from .io import ModelFileError, load_metadata, load_model, load_optimizer, save_model


def save_checkpoint(path: "str | os.PathLike", model, optimizer, history, *, next_epoch: int,
                    run_info: dict[str, Any]) -> None:
    """Atomically write the training state after ``next_epoch - 1`` epochs."""
    meta = {
        "checkpoint": {
            "next_epoch": next_epoch,
            "run": run_info,
            "history": history.history,
            "epochs": history.epoch,
            "batch_cost": history.batch_cost,
            "norms": history.norms,
        }
    }
    save_model(model, path, optimizer=optimizer, metadata=meta)


def load_checkpoint(path: "str | os.PathLike", model, optimizer, history, run_info: dict[str, Any]) -> int:
    """Restore ``model``, ``optimizer`` and ``history`` in place; return the epoch to continue from."""
    saved = load_model(path, backend=model.kernels)
    if json.dumps(saved.get_config(), sort_keys=True) != json.dumps(model.get_config(), sort_keys=True):
        raise ModelFileError(f"checkpoint {path} was written by a different model architecture or settings; "
                             "delete it or point checkpoint= elsewhere")
    meta = load_metadata(path).get("checkpoint")
    if meta is None:
        raise ModelFileError(f"{path} is a model file, not a training checkpoint")
    if meta["run"] != run_info:
        raise ModelFileError(f"checkpoint {path} comes from a run with {meta['run']}, but this run has "
                             f"{run_info}; resuming would not reproduce it")
    saved_opt = load_optimizer(path)
    if saved_opt is None or type(saved_opt) is not type(optimizer):
        raise ModelFileError(f"checkpoint {path} holds optimizer {type(saved_opt).__name__}, "
                             f"not {type(optimizer).__name__}")
    model.params[...] = saved.params
    model.state[...] = saved.state
    model.step_count = saved.step_count
    optimizer.t = saved_opt.t
    optimizer.state = {k: v.astype(model.dtype) for k, v in saved_opt.state.items()}
    history.history = {k: list(v) for k, v in meta["history"].items()}
    history.epoch = list(meta["epochs"])
    history.batch_cost = list(meta["batch_cost"])
    history.norms = meta["norms"]
    return int(meta["next_epoch"])
