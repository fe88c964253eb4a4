"""Layers: declarations (shapes, parameter and state specs, configuration, initialisation).

A model compiles its layers into an execution plan (:mod:`fastdl.plan`) and
an executor runs the plan through the kernels (:mod:`fastdl.executors`):
layers hold no work buffers and call no kernels. A layer's trainable arrays
(``W``, ``b``, ``gamma``, ``beta``) are views into the model's flat
``params`` vector and its gradients (``dW``...) views into ``grads``;
BatchNorm's running statistics are views into the model's flat ``state``.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from ._validation import check_choice, check_positive, check_unit_interval
from .backends.contract import ACTIVATION_CODES
from .initializers import INITS, init_weights

class Layer:
    """Base class. Subclasses declare their arrays, widths, configuration and initial values."""

    #: configuration the execution plan copies: changing it on a model's layer recompiles the plan
    _PLAN_FIELDS = frozenset({"keep_prob", "eps", "momentum"})

    def __setattr__(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)
        if name in self._PLAN_FIELDS:
            owner = self.__dict__.get("_owner")
            if owner is not None:
                owner._compile()

    #: (name, shape) of trainable arrays in flat order, set by subclasses.
    def param_specs(self) -> list[tuple[str, tuple[int, ...]]]:
        return []

    def state_specs(self) -> list[tuple[str, tuple[int, ...]]]:
        return []

    def output_dim(self, n_in: int | None) -> int | None:
        return n_in

    def input_dim(self) -> int | None:
        """The input width this layer requires, or None if it adapts."""
        return None

    def get_config(self) -> dict[str, Any]:
        return {}

    def bind(self, params: dict[str, np.ndarray], grads: dict[str, np.ndarray],
             state: dict[str, np.ndarray]) -> None:
        """Attach views into the model's flat arrays (called by the model)."""
        for name, view in params.items():
            setattr(self, name, view)
        for name, view in grads.items():
            setattr(self, "d" + name, view)
        for name, view in state.items():
            setattr(self, name, view)
        self.param_views = params
        self.grad_views = grads
        self.state_views = state

    def initialize(self, seed: int, index: int) -> None:
        """Set initial parameter values (deterministic in seed, index)."""

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({args})"


class Dense(Layer):
    """Fully connected layer ``Z = A_prev @ W + b`` with ``W`` of shape (n_in, n_out).

    Parameters
    ----------
    n_in, n_out : int
        Input and output widths.
    init : {'he', 'lecun', 'xavier', 'zeros'}
        Weight initialisation (docs/spec.md "Initialisation"); biases start at zero.
    use_bias : bool
        Set False before BatchNorm (its ``beta`` plays the bias).
    """

    def __init__(self, n_in: int, n_out: int, init: str = "he", use_bias: bool = True):
        self.n_in = check_positive("n_in", n_in, integer=True)
        self.n_out = check_positive("n_out", n_out, integer=True)
        self.init = check_choice("init", init, INITS)
        self.use_bias = bool(use_bias)

    def param_specs(self):
        specs = [("W", (self.n_in, self.n_out))]
        if self.use_bias:
            specs.append(("b", (self.n_out,)))
        return specs

    def input_dim(self):
        return self.n_in

    def output_dim(self, n_in):
        return self.n_out

    def get_config(self):
        return {"n_in": self.n_in, "n_out": self.n_out, "init": self.init, "use_bias": self.use_bias}

    def initialize(self, seed, index):
        init_weights(self.init, self.W, seed, index)
        if self.use_bias:
            self.b[...] = 0


class BatchNorm(Layer):
    """Batch normalisation of the pre-activation ``Z`` per feature (docs/spec.md "Batch normalisation").

    ``momentum`` follows the course: ``running = momentum*running +
    (1-momentum)*batch`` (PyTorch's ``momentum=0.1`` is this library's 0.9),
    and the running variance is the biased batch variance (PyTorch stores
    the unbiased one).
    """

    def __init__(self, n_features: int, momentum: float = 0.9, eps: float = 1e-5):
        self.n_features = check_positive("n_features", n_features, integer=True)
        self.momentum = check_unit_interval("momentum", momentum, closed_right=False, open_left=False)
        self.eps = check_positive("eps", eps)

    def param_specs(self):
        return [("gamma", (self.n_features,)), ("beta", (self.n_features,))]

    def state_specs(self):
        return [("running_mean", (self.n_features,)), ("running_var", (self.n_features,))]

    def input_dim(self):
        return self.n_features

    def get_config(self):
        return {"n_features": self.n_features, "momentum": self.momentum, "eps": self.eps}

    def initialize(self, seed, index):
        self.gamma[...] = 1
        self.beta[...] = 0
        self.running_mean[...] = 0
        self.running_var[...] = 1


class Activation(Layer):
    """Element-wise activation. Fused into a preceding Dense layer when possible (``fastdl.plan``)."""

    name = "identity"

    def __init__(self):
        self.code = ACTIVATION_CODES[self.name]


class ReLU(Activation):
    """``max(z, 0)``; derivative 0 at 0."""

    name = "relu"


class Tanh(Activation):
    """Hyperbolic tangent."""

    name = "tanh"


class Sigmoid(Activation):
    """Logistic sigmoid (as a hidden activation; losses take logits)."""

    name = "sigmoid"


class Identity(Activation):
    """No-op activation."""

    name = "identity"


class Dropout(Layer):
    """Inverted dropout: keep each unit with probability ``keep_prob``.

    Give exactly one of ``keep_prob`` (the course's convention: the fraction
    of units KEPT) or ``rate`` (Keras's and PyTorch's ``p``: the fraction
    DROPPED, ``rate = 1 - keep_prob``). Both are keyword-only because
    ``Dropout(0.2)`` means "drop 20%" to PyTorch/Keras users and "keep 20%"
    in the course.

    Training: ``A * D / keep_prob`` with ``D`` drawn from a counter-based
    generator keyed by (model seed, step, layer index, element): the mask is
    the same on every backend and thread count. Inference: the identity.
    """

    def __init__(self, *args: Any, keep_prob: float | None = None, rate: float | None = None):
        if args:
            raise TypeError(
                f"Dropout takes keyword arguments only, got Dropout({', '.join(map(repr, args))}): write "
                f"Dropout(keep_prob=p) to KEEP each unit with probability p (the course's convention), or "
                f"Dropout(rate=r) to DROP a fraction r (Keras's rate, PyTorch's p; rate = 1 - keep_prob)")
        if (keep_prob is None) == (rate is None):
            raise TypeError("Dropout needs exactly one of keep_prob= (fraction of units kept) or rate= "
                            f"(fraction dropped, = 1 - keep_prob); got keep_prob={keep_prob!r}, rate={rate!r}")
        if rate is not None:
            rate = check_unit_interval("rate", rate, closed_right=False, open_left=False)
            keep_prob = 1.0 - rate
        self.keep_prob = check_unit_interval("keep_prob", keep_prob)

    def get_config(self):
        return {"keep_prob": self.keep_prob}


LAYER_TYPES: dict[str, type[Layer]] = {
    cls.__name__: cls for cls in (Dense, BatchNorm, ReLU, Tanh, Sigmoid, Identity, Dropout)
}


def layer_from_config(kind: str, config: dict[str, Any]) -> Layer:
    """Rebuild a layer from ``(type name, get_config())``."""
    if kind not in LAYER_TYPES:
        raise ValueError(f"unknown layer type {kind!r} in model file; known: {sorted(LAYER_TYPES)}")
    return LAYER_TYPES[kind](**config)
