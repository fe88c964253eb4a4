"""Training checkpoints: a model file plus everything needed to continue the run exactly.

A checkpoint is a model file (:mod:`fastdl.io`; ``fd.load`` reads its model)
with these extra members:

* ``checkpoint`` (UTF-8 JSON): the next epoch, the run's settings
  (``run_info``), whether and why training had ended (``finished``: false,
  ``"early_stop"`` or ``"completed"``), the schedule's state and, for every
  stateful callback, its
  type, position, config, JSON values and the names/shapes/dtypes of its
  arrays;
* ``history`` (UTF-8 JSON): the per-epoch logs, epoch numbers and norms;
* ``history.batch_cost`` (float64): the cost of every mini-batch so far;
* ``cb.<position>.<name>``: the callbacks' arrays (e.g. EarlyStopping's best
  weights).

The optimiser state (``optimizer``, ``opt.*``) and ``step_count`` are
required. Every random stream of ``fit`` is keyed by (seed, epoch) or
(seed, step), so the counters are the whole random-stream position.

:func:`load_checkpoint` opens the file once, checks every member's size
against the live model before reading anything, and changes the model,
optimiser and history only when the whole checkpoint is valid; any problem
raises :class:`~fastdl.io.ModelFileError` naming it.
"""
from __future__ import annotations

import json
import math
import os
import re
from typing import Any, NamedTuple

import numpy as np

from .io import (CALLBACK_ARRAY_EXTRA, CALLBACK_ARRAY_FACTOR, CALLBACK_DTYPES, MAX_CHECKPOINT_BYTES,
                 MAX_HISTORY_BYTES, MAX_HISTORY_STEPS, MAX_METADATA_BYTES, Archive, ModelFileError, _is_int,
                 model_arrays, write_members)

#: version of the checkpoint members' layout (inside a model file of fastdl.io.VERSION)
CHECKPOINT_VERSION = 2
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
_MAX_EPOCH = 2 ** 40
#: why a run ended: a callback stopped it, or it ran all its epochs
FINISHED = ("early_stop", "completed")


class ResumeInfo(NamedTuple):
    """Where a checkpointed run continues."""

    next_epoch: int
    #: ``[{"type", "position", "config", "values", "arrays": {name: ndarray}}, ...]``
    callback_states: list[dict[str, Any]]
    #: why training had ended when the checkpoint was written: ``"early_stop"`` (a callback
    #: stopped it), ``"completed"`` (it ran all its epochs) or ``False`` (interrupted / mid-run)
    finished: "bool | str"
    schedule_state: dict[str, Any] | None


def _utf8(obj: Any, what: str) -> np.ndarray:
    try:
        text = json.dumps(obj)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"checkpoint: {what} is not JSON-serialisable: {exc}") from None
    return np.frombuffer(text.encode("utf-8"), np.uint8)


def save_checkpoint(path: "str | os.PathLike", model, optimizer, history, *, next_epoch: int,
                    run_info: dict[str, Any], callback_states: list[dict[str, Any]] = (),
                    finished: "bool | str" = False, schedule_state: dict[str, Any] | None = None) -> None:
    """Atomically write the training state after ``next_epoch`` epochs (see the module docstring).

    ``finished``: ``False`` (more epochs to come), ``"early_stop"`` or
    ``"completed"`` (``True`` means ``"completed"``).

    ``callback_states``: one dict per stateful callback, ``{"type": class name,
    "position": i, "config": JSON-able, "values": JSON-able, "arrays": {name:
    ndarray}}`` (array names: identifiers of up to 64 characters).
    """
    if not _is_int(next_epoch) or not 0 <= next_epoch <= _MAX_EPOCH:
        raise ValueError(f"next_epoch must be an integer >= 0, got {next_epoch!r}")
    finished = _finished(finished)
    if finished is None:
        raise ValueError(f"finished must be False, 'early_stop' or 'completed', got {finished!r}")
    arrays = model_arrays(model, optimizer=optimizer)
    callbacks = []
    for i, st in enumerate(callback_states):
        if not isinstance(st, dict) or not isinstance(st.get("type"), str) or not _is_int(st.get("position")):
            raise TypeError(f"callback_states[{i}] must be a dict with 'type' (str) and 'position' (int)")
        pos = st["position"]
        if not 0 <= pos < 10 ** 6 or any(c["position"] == pos for c in callbacks):
            raise ValueError(f"callback_states[{i}]: position {pos} is negative, too large or repeated")
        declared = {}
        for name, arr in (st.get("arrays") or {}).items():
            if not isinstance(name, str) or not _NAME.fullmatch(name):
                raise ValueError(f"callback {st['type']} array name {name!r} must be an identifier "
                                 "of at most 64 characters")
            arr = np.ascontiguousarray(arr)
            if arr.dtype.name not in CALLBACK_DTYPES:
                raise TypeError(f"callback {st['type']} array {name!r} has dtype {arr.dtype}; "
                                f"checkpoints hold {', '.join(CALLBACK_DTYPES)}")
            arrays[f"cb.{pos}.{name}"] = arr
            declared[name] = {"shape": list(arr.shape), "dtype": arr.dtype.name}
        callbacks.append({"type": st["type"], "position": pos, "config": st.get("config", {}),
                          "values": st.get("values", {}), "arrays": declared})
    arrays["checkpoint"] = _utf8({"checkpoint_version": CHECKPOINT_VERSION, "next_epoch": next_epoch,
                                  "run": run_info, "finished": finished, "schedule_state": schedule_state,
                                  "callbacks": callbacks}, "run_info, schedule_state or a callback state")
    arrays["history"] = _utf8({"history": history.history, "epochs": list(history.epoch),
                               "norms": history.norms}, "the history")
    arrays["history.batch_cost"] = np.asarray(history.batch_cost, dtype=np.float64).reshape(-1)
    write_members(path, arrays)


# ---------------------------------------------------------------------------- loading


def _finished(value: Any) -> "bool | str | None":
    """The stored form of ``finished`` (False, 'early_stop', 'completed'), or None if invalid."""
    if value is True:
        return "completed"
    if value is False or value in FINISHED:
        return value
    return None


def _canonical(obj: Any) -> str:
    return json.dumps(json.loads(json.dumps(obj)), sort_keys=True)


def _check(cond: bool, arc: Archive, msg: str) -> None:
    if not cond:
        raise arc._err(msg)


def _number_list(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)


def _read_run(arc: Archive) -> dict[str, Any]:
    """The ``checkpoint`` member, structure-checked."""
    if "checkpoint" not in arc:
        if "metadata" in arc and arc.members["metadata"].file_size <= MAX_METADATA_BYTES:
            meta = arc.json("metadata", MAX_METADATA_BYTES)
            if isinstance(meta, dict) and "checkpoint" in meta:
                raise arc._err("is a checkpoint of an older fastdl, without callback states or the "
                               "'finished' flag: it cannot be resumed exactly; delete it (or load its "
                               "model with fd.load) and start the run again")
        raise arc._err("is a model file, not a training checkpoint (no 'checkpoint' member)")
    ck = arc.json("checkpoint", MAX_CHECKPOINT_BYTES)
    _check(isinstance(ck, dict), arc, "'checkpoint' must be a JSON object")
    for key in ("checkpoint_version", "next_epoch", "run", "finished", "schedule_state", "callbacks"):
        _check(key in ck, arc, f"'checkpoint' is missing {key!r}")
    _check(ck["checkpoint_version"] == CHECKPOINT_VERSION and _is_int(ck["checkpoint_version"]), arc,
           f"has checkpoint version {ck['checkpoint_version']!r}; this fastdl reads {CHECKPOINT_VERSION}")
    _check(_is_int(ck["next_epoch"]) and 0 <= ck["next_epoch"] <= _MAX_EPOCH, arc,
           f"'checkpoint' next_epoch={ck['next_epoch']!r} (must be an integer >= 0)")
    _check(isinstance(ck["run"], dict), arc, "'checkpoint' run must be an object")
    _check(_finished(ck["finished"]) is not None, arc,
           f"'checkpoint' finished={ck['finished']!r} (must be false, \"early_stop\" or \"completed\")")
    ck["finished"] = _finished(ck["finished"])
    _check(ck["schedule_state"] is None or isinstance(ck["schedule_state"], dict), arc,
           "'checkpoint' schedule_state must be an object or null")
    cbs = ck["callbacks"]
    _check(isinstance(cbs, list), arc, "'checkpoint' callbacks must be a list")
    seen = set()
    for i, d in enumerate(cbs):
        ok = (isinstance(d, dict) and isinstance(d.get("type"), str) and _is_int(d.get("position"))
              and 0 <= d["position"] < 10 ** 6 and "config" in d and "values" in d
              and isinstance(d.get("arrays"), dict))
        _check(ok, arc, f"'checkpoint' callbacks[{i}] must be an object with type (str), position (int >= 0), "
                        "config, values and arrays")
        _check(d["position"] not in seen, arc, f"'checkpoint' callbacks[{i}] repeats position {d['position']}")
        seen.add(d["position"])
        for name, spec in d["arrays"].items():
            ok = (_NAME.fullmatch(name) is not None and isinstance(spec, dict)
                  and spec.get("dtype") in CALLBACK_DTYPES and isinstance(spec.get("shape"), list)
                  and len(spec["shape"]) <= 8 and all(_is_int(s) and 0 <= s <= 2 ** 40 for s in spec["shape"]))
            _check(ok, arc, f"'checkpoint' callbacks[{i}] ({d['type'][:40]}) declares array {name[:70]!r} "
                            "with an invalid name, shape or dtype")
    return ck


def _read_history(arc: Archive, step_count: int) -> tuple[dict, np.ndarray]:
    h = arc.json("history", MAX_HISTORY_BYTES)
    ok = (isinstance(h, dict) and isinstance(h.get("history"), dict)
          and all(isinstance(k, str) and _number_list(v) for k, v in h["history"].items())
          and isinstance(h.get("epochs"), list) and all(_is_int(e) and e >= 0 for e in h["epochs"])
          and isinstance(h.get("norms"), dict)
          and all(isinstance(v, dict) and all(_number_list(x) for x in v.values()) for v in h["norms"].values()))
    _check(ok, arc, "'history' must hold 'history' ({name: [numbers]}), 'epochs' ([ints >= 0]) and "
                    "'norms' ({array: {kind: [numbers]}})")
    _check("history.batch_cost" in arc, arc, "is missing 'history.batch_cost'")
    shape, dtype = arc.header("history.batch_cost")
    _check(len(shape) == 1 and dtype.kind == "f" and dtype.itemsize == 8, arc,
           f"'history.batch_cost' must be a 1-d float64 array, not shape {shape} of {dtype}")
    _check(shape[0] <= min(step_count, MAX_HISTORY_STEPS), arc,
           f"'history.batch_cost' has {shape[0]} entries but only {step_count} steps were taken")
    return h, arc.array("history.batch_cost", shape, np.float64)


def callback_members(cbs: list[dict]) -> dict[str, tuple[dict, str, dict]]:
    """``{member name: (callback dict, array name, {"shape", "dtype"})}`` of validated callback entries."""
    return {f"cb.{d['position']}.{n}": (d, n, s) for d in cbs for n, s in d["arrays"].items()}


def _read_callback_arrays(arc: Archive, cbs: list[dict], budget: int) -> list[dict[str, Any]]:
    declared = callback_members(cbs)
    present = {k for k in arc.members if k.startswith("cb.")}
    _check(present <= set(declared), arc, f"has callback arrays {sorted(present - set(declared))[:5]} that "
                                          "no callback state declares")
    _check(set(declared) <= present, arc, f"is missing the callback arrays {sorted(set(declared) - present)[:5]}")
    total = sum(math.prod(s["shape"]) for _, _, s in declared.values())
    _check(total <= budget, arc, f"callback arrays hold {total} elements; at most {budget} are allowed "
                                 "for this model")
    out = [{"type": d["type"], "position": d["position"], "config": d["config"], "values": d["values"],
            "arrays": {}} for d in cbs]
    by_pos = {d["position"]: o for d, o in zip(cbs, out)}
    for key, (d, name, spec) in declared.items():
        by_pos[d["position"]]["arrays"][name] = arc.array(key, tuple(spec["shape"]), spec["dtype"])
    return sorted(out, key=lambda d: d["position"])


def checkpoint_info(path: "str | os.PathLike") -> dict[str, Any]:
    """What a checkpoint says about its run without loading it: ``next_epoch``, ``finished``, ``run``,
    ``step_count`` and the callbacks' ``type``/``position`` (ModelFileError if it is not a valid one)."""
    with Archive(path) as arc:
        arc.check_marker()
        ck = _read_run(arc)
        return {"next_epoch": ck["next_epoch"], "finished": ck["finished"], "run": ck["run"],
                "step_count": arc.step_count(),
                "callbacks": [{"type": d["type"], "position": d["position"]} for d in ck["callbacks"]]}


def load_checkpoint(path: "str | os.PathLike", model, optimizer, history, run_info: dict[str, Any]) -> ResumeInfo:
    """Restore ``model``, ``optimizer`` and ``history`` in place from the checkpoint at ``path``.

    The file must come from the same architecture, optimiser type and run
    settings (``run_info``), and hold every part of the state; otherwise
    :class:`~fastdl.io.ModelFileError` says what differs or is missing, and
    nothing is changed.
    """
    with Archive(path) as arc:
        arc.check_marker()
        config = arc.config()
        mine = model.get_config()
        if "precision" in mine and "precision" not in config:
            config = dict(config, precision="fp32")  # written before mixed precision: float32
        if _canonical(config) != _canonical(mine):
            raise ModelFileError(f"checkpoint {path} was written by a different model architecture or settings; "
                                 "delete it or point checkpoint= elsewhere")
        ck = _read_run(arc)
        if _canonical(ck["run"]) != _canonical(run_info):
            raise ModelFileError(f"checkpoint {path} comes from a run with {ck['run']}, but this run has "
                                 f"{run_info}; resuming would not reproduce it")
        _check("step_count" in arc, arc, "is missing 'step_count'")
        step_count = arc.step_count()
        opt = arc.optimizer_header()
        if opt is None or opt["type"] != type(optimizer).__name__:
            raise ModelFileError(f"checkpoint {path} holds optimizer {None if opt is None else opt['type']}, "
                                 f"not {type(optimizer).__name__}")
        hist, batch_cost = _read_history(arc, step_count)
        budget = CALLBACK_ARRAY_FACTOR * (model.params.size + model.state.size) + CALLBACK_ARRAY_EXTRA
        callback_states = _read_callback_arrays(arc, ck["callbacks"], budget)
        params = arc.array("params", model.params.shape, model.dtype)
        state = arc.array("state", model.state.shape, model.dtype)
        for key, arr in (("params", params), ("state", state)):
            _check(bool(np.isfinite(arr).all()), arc, f"{key!r} contains NaN or infinite values")
        opt_arrays = arc.optimizer_arrays(opt["cls"].state_names, model.params.size, model.dtype)
    # everything is valid: only now change the caller's objects
    model.params[...] = params
    model.state[...] = state
    model.step_count = step_count
    optimizer.t = opt["t"]
    optimizer.state = opt_arrays
    history.history = {k: list(v) for k, v in hist["history"].items()}
    history.epoch = list(hist["epochs"])
    history.batch_cost = batch_cost.tolist()
    history.norms = hist["norms"]
    return ResumeInfo(int(ck["next_epoch"]), callback_states, ck["finished"], ck["schedule_state"])


__all__ = ["CHECKPOINT_VERSION", "ResumeInfo", "checkpoint_info", "load_checkpoint", "save_checkpoint"]
