"""Layers: they know shapes and which kernels to call; kernels know arithmetic.

A layer's trainable arrays (``W``, ``b``, ``gamma``, ``beta``) are views into
the model's flat ``params`` vector and its gradients (``dW``...) views into
``grads``; BatchNorm's running statistics are views into the model's flat
``state``. Layers never allocate in a training step: their work buffers come
from ``allocate`` once per batch size.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ._validation import check_choice, check_positive, check_unit_interval
from .backends.contract import ACTIVATION_CODES, IDENTITY
from .initializers import INITS, init_weights

EMPTY_1D: dict[np.dtype, np.ndarray] = {}
EMPTY_2D: dict[np.dtype, np.ndarray] = {}


def _empty1(dtype) -> np.ndarray:
    dt = np.dtype(dtype)
    if dt not in EMPTY_1D:
        EMPTY_1D[dt] = np.empty(0, dtype=dt)
    return EMPTY_1D[dt]


def _empty2(dtype) -> np.ndarray:
    dt = np.dtype(dtype)
    if dt not in EMPTY_2D:
        EMPTY_2D[dt] = np.empty((0, 0), dtype=dt)
    return EMPTY_2D[dt]


@dataclass
class StepContext:
    """What a forward pass needs to know besides the data."""

    training: bool
    dropout: bool  # apply dropout (training and not switched off for gradcheck)
    seed: int
    step: int
    l2_over_m: float = 0.0
    #: a fastdl.distributed.Communicator: BatchNorm synchronises its batch statistics over it (None: local)
    comm: Any = None


class Layer:
    """Base class. Subclasses declare arrays and call kernels."""

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

    def allocate(self, m: int, n_in: int, dtype: np.dtype, need_dx: bool) -> dict[str, np.ndarray]:
        return {}

    def forward(self, K, x: np.ndarray, buf: dict, ctx: StepContext) -> np.ndarray:
        raise NotImplementedError

    def backward(self, K, x: np.ndarray, out: np.ndarray, dout: np.ndarray, buf: dict,
                 ctx: StepContext, need_dx: bool) -> np.ndarray | None:
        raise NotImplementedError

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
        Weight initialisation (SPEC.md); biases start at zero.
    use_bias : bool
        Set False before BatchNorm (its ``beta`` plays the bias).
    """

    def __init__(self, n_in: int, n_out: int, init: str = "he", use_bias: bool = True):
        self.n_in = check_positive("n_in", n_in, integer=True)
        self.n_out = check_positive("n_out", n_out, integer=True)
        self.init = check_choice("init", init, INITS)
        self.use_bias = bool(use_bias)
        #: activation fused into this layer by the model (an activation layer right after it)
        self.activation = IDENTITY

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

    def allocate(self, m, n_in, dtype, need_dx):
        buf = {"out": np.empty((m, self.n_out), dtype)}
        if need_dx:
            buf["dx"] = np.empty((m, self.n_in), dtype)
        return buf

    def forward(self, K, x, buf, ctx):
        b = self.b if self.use_bias else _empty1(x.dtype)
        K.dense_forward(x, self.W, b, self.activation, buf["out"])
        return buf["out"]

    def backward(self, K, x, out, dout, buf, ctx, need_dx):
        db = self.db if self.use_bias else _empty1(x.dtype)
        dx = buf["dx"] if need_dx else _empty2(x.dtype)
        # dZ overwrites dout in place (allowed by the contract): dout is consumed here.
        K.dense_backward(x, self.W, out, dout, self.activation, ctx.l2_over_m, dout, self.dW, db, dx)
        return buf["dx"] if need_dx else None


class BatchNorm(Layer):
    """Batch normalisation of the pre-activation ``Z`` per feature (SPEC.md).

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

    def allocate(self, m, n_in, dtype, need_dx):
        n = self.n_features
        buf = {"out": np.empty((m, n), dtype), "mean": np.empty(n, dtype), "inv_std": np.empty(n, dtype)}
        if need_dx:
            buf["dx"] = np.empty((m, n), dtype)
        return buf

    def forward(self, K, x, buf, ctx):
        if ctx.training and ctx.comm is not None:
            self._sync_forward(x, buf, ctx.comm)
        elif ctx.training:
            K.batchnorm_forward_train(x, self.gamma, self.beta, self.eps, self.momentum,
                                      self.running_mean, self.running_var, buf["mean"], buf["inv_std"],
                                      buf["out"])
        else:
            K.batchnorm_forward_infer(x, self.gamma, self.beta, self.running_mean, self.running_var,
                                      self.eps, buf["out"])
        return buf["out"]

    def backward(self, K, x, out, dout, buf, ctx, need_dx):
        # dZ is needed even for a first layer: dgamma/dbeta come from the same kernel.
        dx = buf["dx"] if need_dx else dout
        if ctx.comm is not None:
            self._sync_backward(x, dout, dx, buf, ctx.comm)
        else:
            K.batchnorm_backward(x, self.gamma, buf["mean"], buf["inv_std"], dout, dx, self.dgamma, self.dbeta)
        return buf["dx"] if need_dx else None

    # Synchronised BatchNorm (data-parallel training, fastdl.distributed): the statistics of the
    # GLOBAL batch from one all-reduce of per-feature sums in forward and one in backward. NumPy,
    # float64 sums; accepts 0-row shards (a rank with no rows still takes part in the collectives).
    def _sync_forward(self, x, buf, comm) -> None:
        n = self.n_features
        # Shifted sums (shift = running mean, identical on every rank and close to the batch mean)
        # avoid the cancellation of sum(x^2)/M - mean^2.
        shift = self.running_mean.astype(np.float64)
        d = x.astype(np.float64) - shift
        red = np.empty(2 * n + 1, np.float64)
        d.sum(axis=0, out=red[:n])
        np.einsum("ij,ij->j", d, d, out=red[n:2 * n])
        red[2 * n] = x.shape[0]
        comm.allreduce(red)
        count = red[2 * n]
        dmu = red[:n] / count
        mu = shift + dmu
        var = np.maximum(red[n:2 * n] / count - dmu * dmu, 0.0)
        inv_std = 1.0 / np.sqrt(var + self.eps)
        buf["mean"][...] = mu
        buf["inv_std"][...] = inv_std
        buf["count"] = count
        self.running_mean[...] = self.momentum * self.running_mean + (1 - self.momentum) * mu
        self.running_var[...] = self.momentum * self.running_var + (1 - self.momentum) * var
        if x.shape[0]:
            d -= dmu  # x - mu
            d *= self.gamma * inv_std
            d += self.beta
            buf["out"][...] = d

    def _sync_backward(self, x, dout, dx, buf, comm) -> None:
        n = self.n_features
        x_hat = (x.astype(np.float64) - buf["mean"]) * buf["inv_std"]
        dy = dout.astype(np.float64)
        red = np.empty(2 * n, np.float64)
        dy.sum(axis=0, out=red[:n])
        np.einsum("ij,ij->j", dy, x_hat, out=red[n:])
        # this rank's share of dbeta/dgamma: the all-reduce of model.grads adds the others'
        self.dbeta[...] = red[:n]
        self.dgamma[...] = red[n:]
        comm.allreduce(red)
        if x.shape[0]:
            count = buf["count"]
            x_hat *= red[n:]
            x_hat += red[:n]
            dy *= count
            dy -= x_hat
            dy *= self.gamma.astype(np.float64) * buf["inv_std"] / count
            dx[...] = dy


class Activation(Layer):
    """Element-wise activation. Fused into a preceding Dense layer when possible."""

    name = "identity"

    def __init__(self):
        self.code = ACTIVATION_CODES[self.name]

    def allocate(self, m, n_in, dtype, need_dx):
        buf = {"out": np.empty((m, n_in), dtype)}
        if need_dx:
            buf["dx"] = np.empty((m, n_in), dtype)
        return buf

    def forward(self, K, x, buf, ctx):
        K.activation_forward(x, self.code, buf["out"])
        return buf["out"]

    def backward(self, K, x, out, dout, buf, ctx, need_dx):
        if not need_dx:
            return None
        K.activation_backward(out, dout, self.code, buf["dx"])
        return buf["dx"]


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
        self.index = 0  # position in the model, set by the model (part of the mask key)

    def get_config(self):
        return {"keep_prob": self.keep_prob}

    def allocate(self, m, n_in, dtype, need_dx):
        if self.keep_prob == 1.0:
            return {}
        buf = {"out": np.empty((m, n_in), dtype), "mask": np.empty((m, n_in), np.uint8)}
        if need_dx:
            buf["dx"] = np.empty((m, n_in), dtype)
        return buf

    def forward(self, K, x, buf, ctx):
        buf["active"] = ctx.dropout and self.keep_prob < 1.0
        if not buf["active"]:
            return x
        K.dropout_forward(x, self.keep_prob, ctx.seed, ctx.step, self.index, buf["mask"], buf["out"])
        return buf["out"]

    def backward(self, K, x, out, dout, buf, ctx, need_dx):
        if not need_dx:
            return None
        if not buf.get("active"):
            return dout
        K.dropout_backward(dout, buf["mask"], self.keep_prob, buf["dx"])
        return buf["dx"]


LAYER_TYPES: dict[str, type[Layer]] = {
    cls.__name__: cls for cls in (Dense, BatchNorm, ReLU, Tanh, Sigmoid, Identity, Dropout)
}


def layer_from_config(kind: str, config: dict[str, Any]) -> Layer:
    """Rebuild a layer from ``(type name, get_config())``."""
    if kind not in LAYER_TYPES:
        raise ValueError(f"unknown layer type {kind!r} in model file; known: {sorted(LAYER_TYPES)}")
    return LAYER_TYPES[kind](**config)
