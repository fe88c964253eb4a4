"""Callbacks hooked into :func:`fastdl.training.fit`."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

from ._validation import check_positive

if TYPE_CHECKING:
    from .model import Sequential


class Callback:
    """Override any hook. Set ``model.stop_training = True`` to stop after this epoch."""

    def on_train_begin(self, model: "Sequential", logs: dict[str, Any]) -> None:
        pass

    def on_epoch_end(self, model: "Sequential", epoch: int, logs: dict[str, Any]) -> None:
        pass

    def on_train_end(self, model: "Sequential", logs: dict[str, Any]) -> None:
        pass


class EarlyStopping(Callback):
    """Stop when ``monitor`` has not improved for ``patience`` epochs (SPEC.md).

    With ``restore_best`` the parameters and BatchNorm statistics of the best
    epoch are put back when training ends (whether it stopped early or not).
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

    def on_train_begin(self, model, logs):
        if self.monitor.startswith("val_") and not logs.get("has_validation"):
            raise ValueError(f"EarlyStopping monitors {self.monitor!r} but fit() got no validation_data")
        self.best = math.inf if self.mode == "min" else -math.inf
        self.best_epoch = -1
        self.wait = 0
        self.stopped_epoch: int | None = None
        self._best_params: np.ndarray | None = None
        self._best_state: np.ndarray | None = None

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
