"""scikit-learn's MLP stopping rule and adaptive learning rate as a stateful fastdl callback."""
from __future__ import annotations

import math
from typing import Any

from .. import optim as _optim
from ..callbacks import Callback


class NoImprovementStopping(Callback):
    """scikit-learn's MLP stopping rule and ``learning_rate='adaptive'``, as a stateful callback.

    After every epoch the monitored value (``logs[monitor]``) is compared with
    the best so far: it counts as *no improvement* when it is not better by at
    least ``tol`` (``mode='min'``: ``value > best - tol``; ``'max'``:
    ``value < best + tol``). When the count exceeds ``n_iter_no_change``:
    with ``adaptive=True`` and ``optimizer.lr > min_lr`` the learning rate is
    divided by ``factor`` (5, like scikit-learn) and the count restarts;
    otherwise training stops (``model.stop_training = True``).

    Works with :func:`fastdl.training.fit` too (``callbacks=[...]``): it
    changes ``optimizer.lr`` between epochs, which every schedule composes
    with. Its state (count, best value, learning rate) round-trips through
    :meth:`state_dict` / :meth:`load_state_dict`, so checkpoints resume it.
    """

    def __init__(self, optimizer: "_optim.Optimizer | None" = None, *, monitor: str = "cost", mode: str = "min",
                 tol: float = 1e-4, n_iter_no_change: float = 10, adaptive: bool = False, factor: float = 5.0,
                 min_lr: float = 1e-6, verbose: bool = False):
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        self.optimizer = optimizer
        self.monitor = monitor
        self.mode = mode
        self.tol = float(tol)
        self.n_iter_no_change = n_iter_no_change
        self.adaptive = bool(adaptive)
        self.factor = float(factor)
        self.min_lr = float(min_lr)
        self.verbose = verbose
        self.reset()

    def reset(self) -> None:
        """Forget the best value and the count (a new ``fit``)."""
        self.no_improvement_count = 0
        self.best = math.inf if self.mode == "min" else -math.inf
        self.stopped = False
        self.message = ""

    def on_train_begin(self, model, logs):
        self.stopped = False

    def update(self, value: float) -> bool:
        """Count ``value`` (scikit-learn's ``_update_no_improvement_count``); True if it is the best so far."""
        if self.mode == "min":
            self.no_improvement_count = self.no_improvement_count + 1 if value > self.best - self.tol else 0
            better = value < self.best
        else:
            self.no_improvement_count = self.no_improvement_count + 1 if value < self.best + self.tol else 0
            better = value > self.best
        if better:
            self.best = float(value)
        return better

    def triggered(self) -> bool:
        return self.no_improvement_count > self.n_iter_no_change

    def trigger(self, optimizer=None) -> bool:
        """scikit-learn's ``trigger_stopping``: True to stop; else the rate was divided and the count reset."""
        optimizer = optimizer if optimizer is not None else self.optimizer
        what = "Validation score" if self.mode == "max" else "Training loss"
        msg = (f"{what} did not improve more than tol={self.tol:f} for {self.n_iter_no_change} "
               "consecutive epochs.")
        if not self.adaptive or optimizer is None:
            self.message = msg + " Stopping."
        elif optimizer.lr <= self.min_lr:
            self.message = msg + " Learning rate too small. Stopping."
        else:
            optimizer.lr /= self.factor
            self.no_improvement_count = 0
            if self.verbose:
                print(msg + f" Setting learning rate to {optimizer.lr:f}")
            return False
        if self.verbose:
            print(self.message)
        self.stopped = True
        return True

    def on_epoch_end(self, model, epoch, logs):
        if self.monitor not in logs:
            raise KeyError(f"NoImprovementStopping: {self.monitor!r} not in logs {sorted(logs)}")
        self.update(float(logs[self.monitor]))
        if self.triggered() and self.trigger():
            model.stop_training = True

    def get_config(self) -> dict[str, Any]:
        """The constructor arguments except the optimiser (JSON-able; saved with checkpoints)."""
        n = self.n_iter_no_change
        return {"monitor": self.monitor, "mode": self.mode, "tol": self.tol,
                "n_iter_no_change": n if math.isfinite(n) else repr(float(n)), "adaptive": self.adaptive,
                "factor": self.factor, "min_lr": self.min_lr}

    def state_dict(self) -> dict[str, Any]:
        """JSON-able values (count, best, stopped, learning rate); no arrays."""
        # JSON has no infinity: the initial best (+-inf) is stored as its repr, read back by float()
        best = self.best if math.isfinite(self.best) else repr(float(self.best))
        values = {"no_improvement_count": int(self.no_improvement_count), "best": best,
                  "stopped": bool(self.stopped)}
        if self.optimizer is not None:
            values["lr"] = float(self.optimizer.lr)
        return {"values": values, "arrays": {}}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        v = d["values"]
        self.no_improvement_count = int(v["no_improvement_count"])
        self.best = float(v["best"])
        self.stopped = bool(v["stopped"])
        if self.optimizer is not None and "lr" in v:
            self.optimizer.lr = float(v["lr"])
