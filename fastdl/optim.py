"""Optimisers over the flat parameter vector (docs/spec.md "Optimisers").

Each optimiser owns its state arrays (same size and dtype as ``params``),
computes its per-step coefficients with :mod:`fastdl.plan` and calls ONE fused
kernel per step. ``t`` counts updates from 1.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from ._validation import check_positive, check_unit_interval
from .backends import Backend, get_backend
from .plan import (OPT_ADAM, OPT_CLASSICAL_MOMENTUM, OPT_MOMENTUM, OPT_NESTEROV, OPT_RMSPROP, OPT_SGD,
                   OptimizerSpec, step_scalars)


class Optimizer:
    """Base class: ``step(params, grads)`` updates ``params`` in place.

    An optimiser is its hyperparameters (:meth:`spec`, a
    :class:`fastdl.plan.OptimizerSpec`), a step count ``t`` and state arrays
    (``state``: e.g. Adam's ``v`` and ``s``, same size and dtype as
    ``params``). Each step computes its coefficients once
    (:func:`fastdl.plan.step_scalars`) and calls ONE fused kernel.
    """

    state_names: tuple[str, ...] = ()
    kind: int = OPT_SGD

    def __init__(self, lr: float, backend: "str | Backend | None" = None):
        self.lr = check_positive("lr", lr)
        self.t = 0
        self.backend = backend
        self.state: dict[str, np.ndarray] = {}

    def spec(self) -> OptimizerSpec:
        """The optimiser as data (kind + hyperparameters) for executors."""
        key = (self.kind, self._hyper(), self._bias_correction())
        cached = self.__dict__.get("_spec")
        if cached is None or cached[0] != key:  # rebuilt only when a hyperparameter was changed
            cached = self._spec = (key, OptimizerSpec(*key))
        return cached[1]

    def _hyper(self) -> tuple[float, float, float]:
        return (0.0, 0.0, 0.0)

    def _bias_correction(self) -> bool:
        return False

    # -- state ------------------------------------------------------------
    def _kernels(self) -> Backend:
        return get_backend(self.backend if self.backend is not None else "auto")

    def _ensure_state(self, params: np.ndarray, grads: np.ndarray) -> None:
        # The training loop passes the same arrays every step: checked once, then only identities.
        bound = self.__dict__.get("_bound")
        if bound is not None and bound[0] is params and bound[1] is grads:
            state = self.state
            if all(state.get(name) is arr for name, arr in zip(self.state_names, bound[2])):
                return
        self._check_state(params, grads)
        self._bound = (params, grads, tuple(self.state[name] for name in self.state_names))

    def _check_state(self, params: np.ndarray, grads: np.ndarray) -> None:
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

    def ensure_state(self, params: np.ndarray, grads: np.ndarray | None = None) -> list[np.ndarray]:
        """Allocate (or check) the state arrays for ``params``; returns them in ``spec().state_names`` order.

        For executors that run the optimiser kernel themselves (whole-epoch executors).
        """
        self._ensure_state(params, params if grads is None else grads)
        return [self.state[name] for name in self.state_names]

    def reset(self) -> None:
        """Forget the step count and moment estimates."""
        self.t = 0
        self.state = {}
        self._bound = None

    def step(self, params: np.ndarray, grads: np.ndarray, lr: float | None = None) -> None:
        """Apply one update with learning rate ``lr`` (default ``self.lr``)."""
        self._ensure_state(params, grads)
        t = self.t + 1
        c1, c2 = step_scalars(self.spec(), self.lr if lr is None else lr, t)
        self.t = t
        self._update(self._kernels().unchecked, params, grads, c1, c2)

    def _update(self, K, params, grads, c1: float, c2: float) -> None:
        """One call of the optimiser's kernel with this step's coefficients."""
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

    kind = OPT_SGD

    def __init__(self, lr: float = 0.01, backend=None):
        super().__init__(lr, backend)

    def _update(self, K, params, grads, c1, c2):
        K.sgd_step(params, grads, c1)


class Momentum(Optimizer):
    """Gradient descent with momentum (the course's EWA form): ``v = beta v + (1-beta) dW; W -= lr v``.

    PyTorch's ``SGD(momentum=beta)`` uses ``v = beta v + dW``: the same up to
    ``lr`` scaled by ``1 - beta``. ``bias_correction`` divides by ``1 - beta^t``.
    scikit-learn's momentum (``v = mu v - lr dW``, optionally Nesterov) is
    :class:`ClassicalMomentum`.
    """

    state_names = ("v",)
    kind = OPT_MOMENTUM

    def __init__(self, lr: float = 0.01, beta: float = 0.9, bias_correction: bool = False, backend=None):
        super().__init__(lr, backend)
        self.beta = check_unit_interval("beta", beta, closed_right=False, open_left=False)
        self.bias_correction = bool(bias_correction)

    def _hyper(self):
        return (self.beta, 0.0, 0.0)

    def _bias_correction(self):
        return self.bias_correction

    def get_config(self):
        return {"lr": self.lr, "beta": self.beta, "bias_correction": self.bias_correction}

    def _update(self, K, params, grads, c1, c2):
        K.momentum_step(params, grads, self.state["v"], self.beta, c1)


class ClassicalMomentum(Optimizer):
    """scikit-learn's SGD momentum: ``v = mu v - lr dW``; ``W += mu v - lr dW`` (Nesterov) or ``W += v``.

    The rule of ``MLPClassifier(solver='sgd', momentum=mu, nesterovs_momentum=...)``
    (docs/spec.md "Optimisers"). It is not the course's EWA form (:class:`Momentum`):
    here ``v`` accumulates ``lr``-scaled gradients without the ``1 - mu`` factor.

    Parameters
    ----------
    lr : float
        Learning rate (scikit-learn's ``learning_rate_init`` times its schedule).
    momentum : float in [0, 1)
        ``mu``; 0 is plain gradient descent.
    nesterov : bool
        Nesterov's accelerated gradient (scikit-learn's default ``nesterovs_momentum=True``).
    """

    state_names = ("v",)

    def __init__(self, lr: float = 0.001, momentum: float = 0.9, nesterov: bool = True, backend=None):
        super().__init__(lr, backend)
        self.momentum = check_unit_interval("momentum", momentum, closed_right=False, open_left=False)
        self.nesterov = bool(nesterov)

    @property
    def kind(self) -> int:  # type: ignore[override]
        return OPT_NESTEROV if self.nesterov else OPT_CLASSICAL_MOMENTUM

    def _hyper(self):
        return (self.momentum, 0.0, 0.0)

    def get_config(self):
        return {"lr": self.lr, "momentum": self.momentum, "nesterov": self.nesterov}

    def _update(self, K, params, grads, c1, c2):
        K.nesterov_step(params, grads, self.state["v"], self.momentum, c1, self.nesterov)


class RMSprop(Optimizer):
    """``s = beta2 s + (1-beta2) dW^2; W -= lr dW / (sqrt(s) + eps)``."""

    state_names = ("s",)
    kind = OPT_RMSPROP

    def __init__(self, lr: float = 0.001, beta2: float = 0.999, eps: float = 1e-8, backend=None):
        super().__init__(lr, backend)
        self.beta2 = check_unit_interval("beta2", beta2, closed_right=False, open_left=False)
        self.eps = check_positive("eps", eps)

    def _hyper(self):
        return (0.0, self.beta2, self.eps)

    def get_config(self):
        return {"lr": self.lr, "beta2": self.beta2, "eps": self.eps}

    def _update(self, K, params, grads, c1, c2):
        K.rmsprop_step(params, grads, self.state["s"], c1, self.beta2, self.eps)


class Adam(Optimizer):
    """Adam with bias correction (docs/spec.md "Optimisers"); defaults lr 1e-3, betas 0.9/0.999, eps 1e-8.

    ``W -= c1 v / (sqrt(c2 s) + eps)`` with ``c1 = lr/(1-beta1^t)``, ``c2 = 1/(1-beta2^t)``: ``eps``
    is added to the bias-corrected ``sqrt(s_hat)`` (the course and PyTorch; scikit-learn adds it
    to ``sqrt(s)``, which differs slightly early in training).
    """

    state_names = ("v", "s")
    kind = OPT_ADAM

    def __init__(self, lr: float = 0.001, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8,
                 backend=None):
        super().__init__(lr, backend)
        self.beta1 = check_unit_interval("beta1", beta1, closed_right=False, open_left=False)
        self.beta2 = check_unit_interval("beta2", beta2, closed_right=False, open_left=False)
        self.eps = check_positive("eps", eps)

    def _hyper(self):
        return (self.beta1, self.beta2, self.eps)

    def get_config(self):
        return {"lr": self.lr, "beta1": self.beta1, "beta2": self.beta2, "eps": self.eps}

    def _update(self, K, params, grads, c1, c2):
        K.adam_step(params, grads, self.state["v"], self.state["s"], self.beta1, self.beta2, self.eps, c1, c2)


OPTIMIZERS: dict[str, type[Optimizer]] = {"sgd": SGD, "momentum": Momentum, "rmsprop": RMSprop, "adam": Adam,
                                          "classical_momentum": ClassicalMomentum}


def get_optimizer(name: str, **kwargs) -> Optimizer:
    """Build an optimiser by name ('sgd', 'momentum', 'rmsprop', 'adam', 'classical_momentum')."""
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
