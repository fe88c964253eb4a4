"""Callbacks hooked into :func:`fastdl.training.fit`, and the built-in ones fit adds itself.

Hooks, in the order fit calls them: ``on_train_begin`` (once), then per
epoch ``on_batch_end`` (at the granularity the runner has, see
:class:`Callback`) and ``on_epoch_end``, then ``on_train_end`` (once, only
when training ends normally: last epoch or ``model.stop_training``).

Built-in callbacks, added by ``fit`` in this order around the user's:
:class:`NormRecorder` (always), :class:`ProgressBar` (``verbose >= 1``),
the user's callbacks, :class:`Checkpointer` (``checkpoint=``, last: it
saves after every other callback, so after ``EarlyStopping`` restored the
best weights).

Resume (``fit(checkpoint=..., resume=True)``): a callback is *stateful* when
its class overrides :meth:`Callback.state_dict`. The checkpoint holds the
state of every stateful callback, tagged with its type and its position
among the stateful callbacks. On resume the stateful callbacks passed to
``fit`` must be the same types in the same order (a mismatch raises
``ValueError`` naming the positions and types); stateless callbacks
(loggers, the built-ins) are not saved and may be added or removed freely.
States are loaded right after ``on_train_begin``.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
import warnings
from typing import TYPE_CHECKING, Any, Iterable

import numpy as np

from .._validation import check_positive

if TYPE_CHECKING:
    from ..model import Sequential


class Callback:
    """Override any hook. Set ``model.stop_training = True`` to stop after this epoch.

    ``on_batch_end(model, batch, logs)``: ``logs['costs']`` holds the costs
    ``J`` of the mini-batches trained since the previous call and
    ``logs['size']`` their number of examples (``costs`` is a view of the
    runner's buffer, valid during the call: copy it to keep it); ``batch`` is the index (in
    the epoch, from 0) of the last of them. Per-step runners (per-layer,
    ``augment``, distributed) call it after every mini-batch; the fused
    runner (a whole epoch in one compiled call) once per epoch with every
    batch's cost. Only callbacks that override it are called (so it costs
    nothing otherwise).
    """

    def on_train_begin(self, model: "Sequential", logs: dict[str, Any]) -> None:
        pass

    def on_batch_end(self, model: "Sequential", batch: int, logs: dict[str, Any]) -> None:
        pass

    def on_epoch_end(self, model: "Sequential", epoch: int, logs: dict[str, Any]) -> None:
        pass

    def on_train_end(self, model: "Sequential", logs: dict[str, Any]) -> None:
        pass

    def get_config(self) -> dict[str, Any]:
        """The constructor arguments (JSON-able); saved next to the state in checkpoints."""
        return {}

    def state_dict(self) -> dict[str, Any] | None:
        """The state to checkpoint: ``{'values': JSON-able, 'arrays': {name: ndarray}}``, or None (stateless).

        Override it together with :meth:`load_state_dict` in a callback that
        carries state across epochs, so ``resume=True`` continues it exactly.
        """
        return None

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (called after ``on_train_begin``)."""


def is_stateful(cb: Callback) -> bool:
    """A callback is checkpointed when its class overrides ``state_dict``."""
    return type(cb).state_dict is not Callback.state_dict


def _enc(x: float) -> float | str:
    """JSON has no inf/nan: such values are stored as strings."""
    return float(x) if math.isfinite(x) else repr(float(x))


class EarlyStopping(Callback):
    """Stop when ``monitor`` has not improved for ``patience`` epochs (docs/spec.md).

    With ``restore_best`` the parameters and BatchNorm statistics of the best
    epoch are put back when training ends (whether it stopped early or not).
    Its state (best value and epoch, wait counter, stopped epoch, best
    arrays) is checkpointed, so a resumed run stops where an uninterrupted
    one would.
    """

    def __init__(self, monitor: str = "val_loss", patience: int = 5, min_delta: float = 0.0,
                 restore_best: bool = True, mode: str = "min"):
        self.monitor = monitor
        self.patience = check_positive("patience", patience, integer=True, allow_zero=True)
        self.min_delta = check_positive("min_delta", min_delta, allow_zero=True)
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        self.mode = mode
        self.restore_best = bool(restore_best)
        self._reset()

    def _reset(self) -> None:
        self.best = math.inf if self.mode == "min" else -math.inf
        self.best_epoch = -1
        self.wait = 0
        self.stopped_epoch: int | None = None
        self._best_params: np.ndarray | None = None
        self._best_state: np.ndarray | None = None

    def get_config(self):
        return {"monitor": self.monitor, "patience": self.patience, "min_delta": self.min_delta,
                "restore_best": self.restore_best, "mode": self.mode}

    def state_dict(self):
        arrays = {}
        if self._best_params is not None:
            arrays = {"best_params": self._best_params, "best_state": self._best_state}
        return {"values": {"best": _enc(self.best), "best_epoch": self.best_epoch, "wait": self.wait,
                           "stopped_epoch": self.stopped_epoch}, "arrays": arrays}

    def load_state_dict(self, state):
        v, a = state["values"], state.get("arrays", {})
        self.best = float(v["best"])
        self.best_epoch, self.wait = int(v["best_epoch"]), int(v["wait"])
        self.stopped_epoch = None if v["stopped_epoch"] is None else int(v["stopped_epoch"])
        self._best_params = np.array(a["best_params"]) if "best_params" in a else None
        self._best_state = np.array(a["best_state"]) if "best_state" in a else None

    def on_train_begin(self, model, logs):
        if self.monitor.startswith("val_") and not logs.get("has_validation"):
            raise ValueError(f"EarlyStopping monitors {self.monitor!r} but fit() got no validation_data")
        self._reset()

    def _improved(self, value: float) -> bool:
        if self.mode == "min":
            return value < self.best - self.min_delta
        return value > self.best + self.min_delta

    def on_epoch_end(self, model, epoch, logs):
        if self.monitor not in logs:
            raise KeyError(f"EarlyStopping: {self.monitor!r} not in logs {sorted(logs)}")
        value = float(logs[self.monitor])
        if self._improved(value):
            self.best, self.best_epoch, self.wait = value, epoch, 0
            if self.restore_best:
                self._best_params = model.params.copy()
                self._best_state = model.state.copy()
        else:
            self.wait += 1
            if self.wait >= self.patience:
                self.stopped_epoch = epoch
                model.stop_training = True

    def on_train_end(self, model, logs):
        if self.restore_best and self._best_params is not None:
            model.params[...] = self._best_params
            model.state[...] = self._best_state


# ------------------------------------------------------------------------------ built-in callbacks
def _user_stacklevel() -> int:
    """The ``stacklevel`` that points a warning at the first frame outside fastdl (the user's fit call)."""
    pkg = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(pkg):
        frame, level = frame.f_back, level + 1
    return level


class NormRecorder(Callback):
    """Per-array weight and gradient norms into ``model.history.norms``; warns once per fit.

    The gradient norm is that of the epoch's last mini-batch. A gradient
    norm above ``EXPLODING`` x max(|W|, 1) (or non-finite) is reported as
    exploding, one of a Dense weight below ``VANISHING`` x max(|W|, 1) as
    vanishing: a ``RuntimeWarning`` at the user's ``fit`` call, at most once
    per fit.
    """

    VANISHING, EXPLODING = 1e-7, 1e3

    def __init__(self, warn: bool = True):
        self.warn = warn
        self._warned = False

    def on_train_begin(self, model, logs):
        self._warned = False

    def on_epoch_end(self, model, epoch, logs):
        K = model.kernels
        history = model.history
        problem = None
        for name, w, g in model.parameter_arrays():
            wn = math.sqrt(K.sum_squares(w))
            gn = math.sqrt(K.sum_squares(g))
            rec = history.norms.setdefault(name, {"weight": [], "grad": []})
            rec["weight"].append(wn)
            rec["grad"].append(gn)
            scale = max(wn, 1.0) if math.isfinite(wn) else 1.0
            if problem is None and (not math.isfinite(gn) or gn > self.EXPLODING * scale):
                problem = (f"exploding gradient in {name} at epoch {epoch + 1}: |grad| = {gn:.3g}, "
                           f"|weights| = {wn:.3g}; lower the learning rate, clip the inputs' scale "
                           "(standardise them) or add BatchNorm")
            elif problem is None and name.endswith(".W") and gn < self.VANISHING * scale:
                problem = (f"vanishing gradient in {name} at epoch {epoch + 1}: |grad| = {gn:.3g}, "
                           f"|weights| = {wn:.3g}; consider ReLU, He init or BatchNorm")
        if problem is not None and self.warn and not self._warned:
            self._warned = True
            warnings.warn(problem + " (warned once per fit)", RuntimeWarning, stacklevel=_user_stacklevel())


def _in_notebook() -> bool:
    """True inside a Jupyter/IPython kernel (where stderr is not a terminal but tqdm.auto draws a widget)."""
    ipython = sys.modules.get("IPython")
    if ipython is None:
        return False
    try:
        shell = ipython.get_ipython()
    except Exception:  # noqa: BLE001 - any failure means: not a notebook
        return False
    return shell is not None and hasattr(shell, "kernel")


def _format_logs(logs: dict[str, Any]) -> str:
    return " ".join(f"{k}={v:.4g}" for k, v in logs.items() if isinstance(v, (int, float)))


class ProgressBar(Callback):
    """What ``verbose`` shows.

    ``verbose=1``: a ``tqdm.auto`` bar (a widget in notebooks) counting
    examples over the whole fit, kept on screen at the end, with the epoch,
    the smoothed cost (bias-corrected EWA, beta 0.98, of the batch costs)
    and the last validation metrics. The bar is updated as the runner
    reports batches (per step, or per epoch on the fused runner); counting
    examples keeps the ETA sane from the first update on. Without a
    terminal or notebook (a log file, CI) it prints one line per epoch
    instead. ``verbose=2``: one line per epoch always.
    """

    def __init__(self, epochs: int, n_examples: int, *, initial_epoch: int = 0, verbose: int = 1,
                 beta: float = 0.98, file=None):
        self.epochs, self.n_examples, self.initial_epoch = epochs, n_examples, initial_epoch
        self.verbose, self.beta = verbose, beta
        self.file = file
        self.bar = None

    def _want_bar(self) -> bool:
        if self.verbose != 1:
            return False
        stream = self.file if self.file is not None else sys.stderr
        return bool(getattr(stream, "isatty", lambda: False)()) or _in_notebook()

    def on_train_begin(self, model, logs):
        self.bar, self._ewa, self._n, self._epoch = None, 0.0, 0, self.initial_epoch
        self._t_epoch, self._t_postfix = time.perf_counter(), -math.inf
        self._val = ""
        if self._want_bar():
            try:
                from tqdm.auto import tqdm
            except ImportError:  # tqdm is a dependency, but training must not need it
                tqdm = None
            if tqdm is not None:
                total = max(self.epochs - self.initial_epoch, 0) * self.n_examples
                self.bar = tqdm(total=total, unit="ex", unit_scale=True, leave=True, dynamic_ncols=True,
                                file=self.file if self.file is not None else sys.stderr)

    def _postfix(self, extra: str = "") -> None:
        cost = self._ewa / (1 - self.beta ** self._n) if self._n else float("nan")
        self.bar.set_postfix_str(f"epoch {self._epoch + 1}/{self.epochs} cost {cost:.4f}{extra}", refresh=False)

    def on_batch_end(self, model, batch, logs):
        b, ewa = self.beta, self._ewa
        costs = logs["costs"]
        for J in costs.tolist():
            ewa = b * ewa + (1 - b) * J
        self._ewa, self._n = ewa, self._n + len(costs)
        if self.bar is not None:
            now = time.perf_counter()
            if now - self._t_postfix >= 0.1:  # formatting per step would cost ~4% of a small step
                self._postfix(self._val)
                self._t_postfix = now
            self.bar.update(logs["size"])

    def on_epoch_end(self, model, epoch, logs):
        self._epoch = epoch
        if self.bar is not None:
            self._val = "".join(f" {k} {v:.4f}" for k, v in logs.items() if k.startswith("val_"))
            self._postfix(self._val)
            self._epoch = epoch + 1 if epoch + 1 < self.epochs else epoch
            self.bar.refresh()
        else:
            now = time.perf_counter()
            print(f"epoch {epoch + 1}/{self.epochs} {_format_logs(logs)} ({now - self._t_epoch:.2f} s)",
                  file=self.file if self.file is not None else sys.stdout, flush=True)
            self._t_epoch = now

    def close(self) -> None:
        """Close the bar (also when training stops with an exception)."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def on_train_end(self, model, logs):
        self.close()


def _states(stateful: list[Callback]) -> list[dict[str, Any]]:
    out = []
    for pos, cb in enumerate(stateful):
        st = cb.state_dict() or {}
        out.append({"type": type(cb).__name__, "position": pos, "config": cb.get_config(),
                    "values": st.get("values", {}), "arrays": dict(st.get("arrays", {}))})
    return out


def restore_callback_states(callbacks: Iterable[Callback], saved: list[dict[str, Any]], source: str) -> None:
    """Load ``saved`` states into the stateful ones of ``callbacks`` (the matching rule: module docstring)."""
    callbacks = list(callbacks)
    stateful = [(i, cb) for i, cb in enumerate(callbacks) if is_stateful(cb)]
    have = [type(cb).__name__ for _, cb in stateful]
    want = [d.get("type") for d in sorted(saved, key=lambda d: d.get("position", 0))]
    if have != want:
        def fmt(names, idx=None):
            return ", ".join(f"[{p}] {n}" + (f" (callbacks[{idx[p]}])" if idx else "")
                             for p, n in enumerate(names)) or "none"
        raise ValueError(
            f"{source} holds the state of the stateful callbacks {fmt(want)}, but this fit got "
            f"{fmt(have, [i for i, _ in stateful])}"
            " (matched by position among the stateful callbacks and by type); pass the same stateful "
            "callbacks in the same order to resume, or start without resume=True")
    for (i, cb), d in zip(stateful, sorted(saved, key=lambda d: d.get("position", 0))):
        config = json.loads(json.dumps(cb.get_config()))
        if d.get("config", config) != config:
            warnings.warn(f"callbacks[{i}] {type(cb).__name__} has config {config}, but the checkpointed one had "
                          f"{d.get('config')}: the resumed run will not reproduce the interrupted one",
                          RuntimeWarning, stacklevel=_user_stacklevel())
        try:
            cb.load_state_dict({"values": d.get("values", {}), "arrays": d.get("arrays", {})})
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
            from ..io import ModelFileError

            raise ModelFileError(f"{source}: the saved state of callbacks[{i}] {type(cb).__name__} is malformed "
                                 f"({type(exc).__name__}: {exc})") from exc


class Checkpointer(Callback):
    """Saves the training state every ``every`` epochs, and a final one (``finished``) when training ends.

    Added by ``fit(checkpoint=path)`` as the LAST callback: the final save
    comes after every other ``on_train_end`` (``EarlyStopping(restore_best=
    True)`` has put the best weights back) and records why training ended
    (``'early_stop'``: ``model.stop_training``; ``'completed'``: the last
    epoch), so resuming it returns at once with that state (see ``fit``).
    Saves are atomic (a kill mid-save keeps the previous checkpoint). The
    state of every stateful callback of ``callbacks`` (and of the schedule,
    if it has ``state_dict``) goes with it.
    """

    def __init__(self, path: "str | os.PathLike", *, every: int, epochs: int, optimizer, run_info: dict,
                 callbacks: Iterable[Callback] = (), schedule=None):
        self.path, self.every, self.epochs = path, every, epochs
        self.optimizer, self.run_info, self.schedule = optimizer, run_info, schedule
        self.stateful = [cb for cb in callbacks if is_stateful(cb)]
        self.next_epoch: int | None = None

    def save(self, model, *, next_epoch: int, finished: "bool | str") -> None:
        schedule_state = self.schedule.state_dict() if hasattr(self.schedule, "state_dict") else None
        save_training_state(self.path, model, self.optimizer, model.history, next_epoch=next_epoch,
                            run_info=self.run_info, callback_states=_states(self.stateful), finished=finished,
                            schedule_state=schedule_state)

    def on_train_begin(self, model, logs):
        self.next_epoch = logs.get("initial_epoch", 0)

    def on_epoch_end(self, model, epoch, logs):
        self.next_epoch = epoch + 1
        # the last epoch and an early stop are saved by on_train_end, after every callback's
        if (epoch + 1) % self.every == 0 and epoch + 1 < self.epochs and not model.stop_training:
            self.save(model, next_epoch=epoch + 1, finished=False)

    def on_train_end(self, model, logs):
        why = "early_stop" if model.stop_training else "completed"
        self.save(model, next_epoch=self.next_epoch, finished=why)


class CallbackList:
    """The callbacks of one fit, in call order; the hook the runners call per batch."""

    def __init__(self, model: "Sequential", row_counts: np.ndarray, callbacks: list[Callback]):
        self.model, self.callbacks = model, callbacks
        self.per_batch = [cb for cb in callbacks if type(cb).on_batch_end is not Callback.on_batch_end]
        self._rows = np.concatenate([[0.0], np.cumsum(row_counts)])  # examples before each batch
        if not self.per_batch:
            self.on_batch = None  # runners then skip the per-batch call altogether

    def on_batch(self, batch: int, costs: np.ndarray) -> None:
        logs = {"costs": costs, "size": int(self._rows[batch + 1] - self._rows[batch + 1 - len(costs)])}
        for cb in self.per_batch:
            cb.on_batch_end(self.model, batch, logs)

    def on_train_begin(self, logs: dict[str, Any]) -> None:
        for cb in self.callbacks:
            cb.on_train_begin(self.model, logs)

    def on_epoch_end(self, epoch: int, logs: dict[str, Any]) -> None:
        for cb in self.callbacks:
            cb.on_epoch_end(self.model, epoch, logs)

    def on_train_end(self, logs: dict[str, Any]) -> None:
        for cb in self.callbacks:
            cb.on_train_end(self.model, logs)

    def close(self) -> None:
        """Training stopped with an exception: close what is open (progress bars)."""
        for cb in self.callbacks:
            if isinstance(cb, ProgressBar):
                cb.close()


# ------------------------------------------------------------------------------ checkpoint calls
def save_training_state(path, model, optimizer, history, *, next_epoch: int, run_info: dict,
                        callback_states: list[dict], finished: "bool | str", schedule_state: dict | None) -> None:
    """``fastdl.checkpoint.save_checkpoint`` with the callback states."""
    from ..checkpoint import save_checkpoint

    save_checkpoint(path, model, optimizer, history, next_epoch=next_epoch, run_info=run_info,
                    callback_states=callback_states, finished=finished, schedule_state=schedule_state)


def load_training_state(path, model, optimizer, history, run_info: dict):
    """``fastdl.checkpoint.load_checkpoint``: a ``ResumeInfo`` (next_epoch, callback_states, finished,
    schedule_state)."""
    from ..checkpoint import load_checkpoint

    return load_checkpoint(path, model, optimizer, history, run_info)
