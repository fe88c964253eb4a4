"""Optimisers over the flat parameter vector (SPEC.md "Optimisers").

Each optimiser owns its state arrays (same size and dtype as ``params``) and
calls ONE fused kernel per step. ``t`` counts updates from 1.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from ._validation import check_positive, check_unit_interval
from .backends import Backend, get_backend


class Optimizer:
    """Base class: ``step(params, grads)`` updates ``params`` in place."""

    state_names: tuple[str, ...] = ()

    def __init__(self, lr: float, backend: "str | Backend | None" = None):
        self.lr = check_positive("lr", lr)
        self.t = 0
        self.backend = backend
        self.state: dict[str, np.ndarray] = {}

    # -- state ------------------------------------------------------------
    def _kernels(self) -> Backend:
        return get_backend(self.backend if self.backend is not None else "auto")

    def _ensure_state(self, params: np.ndarray, grads: np.ndarray) -> None:
        if not isinstance(params, np.ndarray) or params.ndim != 1 or not params.flags.c_contiguous:
            raise ValueError("params must be a flat, contiguous 1-D array (use model.params)")
        if grads.shape != params.shape or grads.dtype != params.dtype:
            raise ValueError(f"grads {grads.shape}/{grads.dtype} do not match params "
                             f"{params.shape}/{params.dtype}")
        for name in self.state_names:
            arr = self.state.get(name)
            if arr is None:
                self.state[name] = np.zeros_like(params)
            elif arr.shape != params.shape:
                raise ValueError(f"optimizer state {name!r} has {arr.size} entries but params has "
                                 f"{params.size}: this optimizer was used with another model; "
                                 "create a new optimizer or call reset()")
            elif arr.dtype != params.dtype:
                self.state[name] = arr.astype(params.dtype)

    def reset(self) -> None:
        """Forget the step count and moment estimates."""
        self.t = 0
        self.state = {}

    def step(self, params: np.ndarray, grads: np.ndarray, lr: float | None = None) -> None:
        """Apply one update with learning rate ``lr`` (default ``self.lr``)."""
        self._ensure_state(params, grads)
        self.t += 1
        self._update(self._kernels(), params, grads, self.lr if lr is None else lr)

    def _update(self, K: Backend, params, grads, lr: float) -> None:
        raise NotImplementedError

    # -- serialisation ----------------------------------------------------
    def get_config(self) -> dict[str, Any]:
        return {"lr": self.lr}

    def state_dict(self) -> dict[str, Any]:
        """Config, step count and state arrays (for checkpoints)."""
        return {"type": type(self).__name__, "config": self.get_config(), "t": self.t,
                "arrays": {k: v.copy() for k, v in self.state.items()}}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        if d.get("type") != type(self).__name__:
            raise ValueError(f"state is for {d.get('type')}, not {type(self).__name__}")
        self.t = int(d["t"])
        self.state = {k: np.array(v) for k, v in d["arrays"].items()}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({args})"


class SGD(Optimizer):
    """Plain gradient descent: ``W -= lr * dW``."""

    def __init__(self, lr: float = 0.01, backend=None):
        super().__init__(lr, backend)

    def _update(self, K, params, grads, lr):
        K.sgd_step(params, grads, lr)


class Momentum(Optimizer):
    """Gradient descent with momentum (EWA form): ``v = beta v + (1-beta) dW; W -= lr v``.

    PyTorch's ``SGD(momentum=beta)`` uses ``v = beta v + dW``: the same up to
    ``lr`` scaled by ``1 - beta``. ``bias_correction`` divides by ``1 - beta^t``.
    """

    state_names = ("v",)

    def __init__(self, lr: float = 0.01, beta: float = 0.9, bias_correction: bool = False, backend=None):
        super().__init__(lr, backend)
        self.beta = check_unit_interval("beta", beta, closed_right=False, open_left=False)
        self.bias_correction = bool(bias_correction)

    def get_config(self):
        return {"lr": self.lr, "beta": self.beta, "bias_correction": self.bias_correction}

    def _update(self, K, params, grads, lr):
        K.momentum_step(params, grads, self.state["v"], lr, self.beta, self.t, self.bias_correction)


class RMSprop(Optimizer):
    """``s = beta2 s + (1-beta2) dW^2; W -= lr dW / (sqrt(s) + eps)``."""

    state_names = ("s",)

    def __init__(self, lr: float = 0.001, beta2: float = 0.999, eps: float = 1e-8, backend=None):
        super().__init__(lr, backend)
        self.beta2 = check_unit_interval("beta2", beta2, closed_right=False, open_left=False)
        self.eps = check_positive("eps", eps)

    def get_config(self):
        return {"lr": self.lr, "beta2": self.beta2, "eps": self.eps}

    def _update(self, K, params, grads, lr):
        K.rmsprop_step(params, grads, self.state["s"], lr, self.beta2, self.eps)


class Adam(Optimizer):
    """Adam with bias correction (SPEC.md); defaults lr 1e-3, betas 0.9/0.999, eps 1e-8."""

    state_names = ("v", "s")

    def __init__(self, lr: float = 0.001, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8,
                 backend=None):
        super().__init__(lr, backend)
        self.beta1 = check_unit_interval("beta1", beta1, closed_right=False, open_left=False)
        self.beta2 = check_unit_interval("beta2", beta2, closed_right=False, open_left=False)
        self.eps = check_positive("eps", eps)

    def get_config(self):
        return {"lr": self.lr, "beta1": self.beta1, "beta2": self.beta2, "eps": self.eps}

    def _update(self, K, params, grads, lr):
        K.adam_step(params, grads, self.state["v"], self.state["s"], lr, self.beta1, self.beta2,
                    self.eps, self.t)


OPTIMIZERS: dict[str, type[Optimizer]] = {"sgd": SGD, "momentum": Momentum, "rmsprop": RMSprop, "adam": Adam}


def get_optimizer(name: str, **kwargs) -> Optimizer:
    """Build an optimiser by name ('sgd', 'momentum', 'rmsprop', 'adam')."""
    key = name.lower()
    if key not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {sorted(OPTIMIZERS)}")
    return OPTIMIZERS[key](**kwargs)


def optimizer_from_state(d: dict[str, Any]) -> Optimizer:
    """Rebuild an optimiser from :meth:`Optimizer.state_dict` output."""
    cls = {c.__name__: c for c in OPTIMIZERS.values()}.get(d.get("type"))
    if cls is None:
        raise ValueError(f"unknown optimizer type {d.get('type')!r}")
    opt = cls(**d["config"])
    opt.load_state_dict(d)
    return opt
