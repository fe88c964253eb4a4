"""The Sequential model: plumbing between layers, kernels and flat arrays.

All trainable arrays live in one flat vector ``params`` (gradients in
``grads``, same layout); BatchNorm running statistics in ``state``. The
layers' ``W``, ``b``, ``gamma``, ``beta`` are views into them, so an
optimiser, a checkpoint or a gradient check deals with one array.
"""
from __future__ import annotations

import copy
from typing import Any, Iterable

import numpy as np

from . import _validation as V
from .backends import Backend, get_backend
from .layers import Activation, BatchNorm, Dense, Dropout, Layer, StepContext
from .losses import Loss, get_loss

L2_SCALES = ("batch", "dataset")
PREDICT_BATCH = 4096  # rows per inference chunk: bounds work memory on big inputs


class Sequential:
    """A stack of layers trained on one loss.

    Parameters
    ----------
    layers : list of Layer
        ``Dense``, ``BatchNorm``, ``ReLU``/``Tanh``/``Sigmoid``/``Identity``,
        ``Dropout``. An activation right after a ``Dense`` is fused into it.
    loss : {'softmax_cross_entropy', 'binary_cross_entropy', 'mse'}
        Applied to the last layer's raw outputs (logits for cross-entropies).
    l2 : float
        ``lambda`` of the L2 penalty on Dense weights (SPEC.md):
        ``J = mean loss + lambda/(2m) * sum ||W||^2``.
    l2_scale : {'batch', 'dataset'}
        ``'batch'`` (the course's definition, default): ``m`` is the
        mini-batch size, so the effective strength changes with
        ``batch_size`` (like scikit-learn's ``alpha``). ``'dataset'``: ``m``
        is the training-set size ``N`` (batch-size independent).
    dtype : {'float32', 'float64'}
    backend : {'auto', 'reference', 'numba', 'cython'}
    seed : int
        Fixes initialisation, shuffling and dropout masks.
    """

    def __init__(self, layers: Iterable[Layer], *, loss: str = "softmax_cross_entropy", l2: float = 0.0,
                 l2_scale: str = "batch", dtype: str = "float32", backend: "str | Backend" = "auto",
                 seed: int = 0):
        layers = list(layers)
        if not layers:
            raise ValueError("a Sequential model needs at least one layer")
        for i, layer in enumerate(layers):
            if not isinstance(layer, Layer):
                raise TypeError(f"layers[{i}] is {type(layer).__name__}, not a fastdl layer")
            if getattr(layer, "_owner", None) is not None:
                raise ValueError(f"layers[{i}] ({layer!r}) already belongs to another model; create a new layer")
        self.layers = layers
        self.loss: Loss = get_loss(loss)
        self.l2 = V.check_positive("l2", l2, allow_zero=True)
        self.l2_scale = V.check_choice("l2_scale", l2_scale, L2_SCALES)
        self.dtype = V.check_dtype(dtype)
        self.seed = V.check_positive("seed", seed, integer=True, allow_zero=True)
        self.backend_name = backend if isinstance(backend, str) else backend.name
        self.kernels: Backend = get_backend(backend)
        self.step_count = 0  # training steps taken: part of the dropout key
        self.stop_training = False
        self.history = None
        self._check_shapes()
        self._build_ops()
        self._allocate_flat()
        for i, layer in enumerate(self.layers):
            layer._owner = self
            layer.initialize(self.seed, i)
        self._workspaces: dict[int, list[dict]] = {}

    # ------------------------------------------------------------------ build
    def _check_shapes(self) -> None:
        dim = None
        self.n_features: int | None = None
        for i, layer in enumerate(self.layers):
            need = layer.input_dim()
            if need is not None:
                if dim is None:
                    self.n_features = need
                elif need != dim:
                    raise ValueError(f"layers[{i}] {layer!r} expects {need} inputs but the previous "
                                     f"layer outputs {dim}")
            dim = layer.output_dim(dim if dim is not None else need)
        if self.n_features is None:
            raise ValueError("the model has no Dense or BatchNorm layer: its input width is unknown")
        self.n_outputs = dim
        self.loss.check_output_dim(dim)
        if self.loss.name != "mse" and isinstance(self.layers[-1], Activation):
            raise ValueError(f"loss {self.loss.name!r} applies its own output function to logits: "
                             f"remove the final {type(self.layers[-1]).__name__} layer")

    def _build_ops(self) -> None:
        """The execution plan: layers in order, activations fused into a preceding Dense."""
        self._ops: list[Layer] = []
        for i, layer in enumerate(self.layers):
            if isinstance(layer, Dropout):
                layer.index = i
            if (isinstance(layer, Activation) and self._ops and isinstance(self._ops[-1], Dense)
                    and self._ops[-1].activation == 0 and self.layers[i - 1] is self._ops[-1]):
                self._ops[-1].activation = layer.code
                continue
            self._ops.append(layer)

    def _allocate_flat(self) -> None:
        p_specs = [(li, n, s) for li, layer in enumerate(self.layers) for n, s in layer.param_specs()]
        s_specs = [(li, n, s) for li, layer in enumerate(self.layers) for n, s in layer.state_specs()]
        n_params = sum(int(np.prod(s)) for _, _, s in p_specs)
        n_state = sum(int(np.prod(s)) for _, _, s in s_specs)
        self.params = np.zeros(n_params, self.dtype)
        self.grads = np.zeros(n_params, self.dtype)
        self.state = np.zeros(n_state, self.dtype)
        self.param_slices: list[tuple[str, slice]] = []
        views: list[tuple[dict, dict, dict]] = [({}, {}, {}) for _ in self.layers]
        off = 0
        for li, name, shape in p_specs:
            size = int(np.prod(shape))
            views[li][0][name] = self.params[off:off + size].reshape(shape)
            views[li][1][name] = self.grads[off:off + size].reshape(shape)
            self.param_slices.append((f"layers[{li}].{name}", slice(off, off + size)))
            off += size
        off = 0
        for li, name, shape in s_specs:
            size = int(np.prod(shape))
            views[li][2][name] = self.state[off:off + size].reshape(shape)
            off += size
        for layer, (p, g, s) in zip(self.layers, views):
            layer.bind(p, g, s)
        self._dense = [layer for layer in self.layers if isinstance(layer, Dense)]

    # -------------------------------------------------------------- workspace
    def _workspace(self, m: int) -> list[dict]:
        ws = self._workspaces.get(m)
        if ws is None:
            ws = []
            dim = self.n_features
            for j, op in enumerate(self._ops):
                ws.append(op.allocate(m, dim, self.dtype, need_dx=j > 0))
                dim = op.output_dim(dim)
            ws.append({"dlogits": np.empty((m, self.n_outputs), self.dtype), "inputs": [None] * len(self._ops)})
            if len(self._workspaces) > 8:  # bound memory when predicting on many sizes
                self._workspaces.clear()
            self._workspaces[m] = ws
        return ws

    # ------------------------------------------------------------- core math
    def _forward(self, X: np.ndarray, ctx: StepContext) -> np.ndarray:
        ws = self._workspace(X.shape[0])
        inputs = ws[-1]["inputs"]
        x = X
        for j, op in enumerate(self._ops):
            inputs[j] = x
            x = op.forward(self.kernels, x, ws[j], ctx)
        ws[-1]["outputs"] = x
        return x

    def _backward(self, ctx: StepContext, m: int) -> None:
        ws = self._workspace(m)
        inputs = ws[-1]["inputs"]
        dout = ws[-1]["dlogits"]
        out = ws[-1]["outputs"]
        for j in range(len(self._ops) - 1, -1, -1):
            op = self._ops[j]
            x = inputs[j]
            # output of op j is the input of op j+1 (or the logits)
            out_j = inputs[j + 1] if j + 1 < len(self._ops) else out
            dout = op.backward(self.kernels, x, out_j, dout, ws[j], ctx, need_dx=j > 0)

    def l2_cost(self, m: int) -> float:
        """``lambda/(2m) * sum ||W||_F^2`` over Dense weights."""
        if self.l2 == 0.0:
            return 0.0
        ss = sum(self.kernels.sum_squares(layer.W.reshape(-1)) for layer in self._dense)
        return self.l2 / (2.0 * m) * ss

    def _loss_and_grads(self, X: np.ndarray, y: np.ndarray, *, dropout: bool, n_total: int | None,
                        step: int, m_l2: int | None = None, grad_scale: float = 1.0, seed: int | None = None,
                        comm=None) -> tuple[float, float, np.ndarray]:
        """Training-mode forward + backward on validated arrays.

        Returns (mean data loss, L2 term, logits); ``J`` is the sum of the first two.
        Data-parallel shards (:mod:`fastdl.distributed`) also pass ``m_l2`` (the
        global batch size as the L2 ``m``), ``grad_scale`` (rows of this shard over
        the global batch: multiplies the whole gradient, L2 part included; the
        returned losses are unscaled), ``seed`` (this rank's dropout seed) and
        ``comm`` (synchronised BatchNorm statistics).
        """
        m = X.shape[0]
        if m_l2 is None:
            m_l2 = n_total if (self.l2_scale == "dataset" and n_total) else m
        ctx = StepContext(training=True, dropout=dropout, seed=self.seed if seed is None else seed, step=step,
                          l2_over_m=self.l2 / m_l2 * grad_scale, comm=comm)
        logits = self._forward(X, ctx)
        dlogits = self._workspace(m)[-1]["dlogits"]
        data_loss = self.loss(self.kernels, logits, y, dlogits)
        if grad_scale != 1.0:
            dlogits *= grad_scale
        self._backward(ctx, m)
        return data_loss, self.l2_cost(m_l2), logits

    # ------------------------------------------------------------ public API
    def check_X(self, X) -> np.ndarray:
        """Validate and convert inputs to this model's dtype (C-contiguous, finite)."""
        return V.as_float_matrix(X, self.dtype, self.n_features)

    def check_y(self, y, m: int) -> np.ndarray:
        """Validate and convert targets for this model's loss."""
        return self.loss.prepare_targets(y, m, self.n_outputs, self.dtype)

    def compute_gradients(self, X, y, *, dropout: bool = True, n_total: int | None = None) -> float:
        """Training-mode forward and backward on ``(X, y)``.

        Fills ``model.grads`` and returns ``J`` including the L2 term (SPEC.md).
        BatchNorm uses batch statistics and updates its running averages;
        dropout uses the mask of the current ``step_count`` unless
        ``dropout=False``. ``n_total`` is the training-set size for
        ``l2_scale='dataset'``.
        """
        X = self.check_X(X)
        y = self.check_y(y, X.shape[0])
        data_loss, l2_term, _ = self._loss_and_grads(X, y, dropout=dropout, n_total=n_total,
                                                      step=self.step_count)
        return data_loss + l2_term

    def decision_function(self, X, batch_size: int = PREDICT_BATCH) -> np.ndarray:
        """Raw outputs of the last layer (logits) in inference mode."""
        X = self.check_X(X)
        ctx = StepContext(training=False, dropout=False, seed=self.seed, step=self.step_count)
        out = np.empty((X.shape[0], self.n_outputs), self.dtype)
        for start in range(0, X.shape[0], batch_size):
            out[start:start + batch_size] = self._forward(X[start:start + batch_size], ctx)
        return out

    def predict_proba(self, X) -> np.ndarray:
        """Class probabilities ``(m, n_classes)`` (``(m, 2)`` for binary cross-entropy)."""
        return self.loss.proba(self.kernels, self.decision_function(X))

    def predict(self, X) -> np.ndarray:
        """Class ids (classification) or outputs (mse)."""
        return self.loss.predict_from_outputs(self.decision_function(X))

    def evaluate(self, X, y, batch_size: int = PREDICT_BATCH) -> dict[str, float]:
        """Inference-mode metrics: ``loss`` (mean data loss, no L2 term) and,
        for classifiers, ``accuracy`` and ``error`` (= 1 - accuracy)."""
        X = self.check_X(X)
        y = self.check_y(y, X.shape[0])
        Z = self.decision_function(X, batch_size)
        empty = np.empty((0, 0), self.dtype)
        loss = self.loss(self.kernels, Z, y, empty)
        out = {"loss": float(loss)}
        if self.loss.classifier:
            acc = float(np.mean(self.loss.predict_from_outputs(Z) == y.astype(np.int64)))
            out.update(accuracy=acc, error=1.0 - acc)
        return out

    def fit(self, X, y, **kwargs):
        """Train with mini-batch gradient descent; see :func:`fastdl.training.fit`."""
        from .training import fit

        return fit(self, X, y, **kwargs)

    def save(self, path, optimizer=None) -> None:
        """Write the model (and optionally the optimiser state) atomically; see :mod:`fastdl.io`."""
        from .io import save_model

        save_model(self, path, optimizer=optimizer)

    def to_onnx(self, path, opset: int = 17, *, fold_batchnorm: bool = True) -> None:
        """Write the inference graph as ONNX (float32, dynamic batch), atomically; see :mod:`fastdl.onnx`."""
        from .onnx import export

        export(self, path, opset=opset, fold_batchnorm=fold_batchnorm)

    # ------------------------------------------------------------- utilities
    def get_config(self) -> dict[str, Any]:
        """The architecture as plain JSON-able data."""
        return {
            "layers": [{"type": type(layer).__name__, "config": layer.get_config()} for layer in self.layers],
            "loss": self.loss.name, "l2": self.l2, "l2_scale": self.l2_scale,
            "dtype": self.dtype.name, "seed": self.seed,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any], backend: "str | Backend" = "auto", **overrides) -> "Sequential":
        """Build a fresh model from :meth:`get_config` output."""
        from .layers import layer_from_config

        kw = {k: config[k] for k in ("loss", "l2", "l2_scale", "dtype", "seed")}
        kw.update(overrides)
        layers = [layer_from_config(d["type"], d["config"]) for d in config["layers"]]
        return cls(layers, backend=backend, **kw)

    def copy(self, *, dtype: str | None = None, backend: "str | Backend | None" = None) -> "Sequential":
        """An independent copy (optionally in another dtype or backend) with the same values."""
        new = Sequential.from_config(copy.deepcopy(self.get_config()),
                                     backend=backend if backend is not None else self.kernels,
                                     **({"dtype": dtype} if dtype else {}))
        new.params[...] = self.params
        new.state[...] = self.state
        new.step_count = self.step_count
        return new

    def parameter_arrays(self) -> list[tuple[str, np.ndarray, np.ndarray]]:
        """``(name, value view, gradient view)`` for every trainable array, in flat order."""
        return [(name, self.params[sl], self.grads[sl]) for name, sl in self.param_slices]

    def summary(self) -> str:
        """A table of layers, output widths and parameter counts."""
        lines = [f"{'#':>3}  {'layer':<58} {'out':>6} {'params':>9}"]
        dim = self.n_features
        for i, layer in enumerate(self.layers):
            dim = layer.output_dim(dim)
            n = sum(int(np.prod(s)) for _, s in layer.param_specs())
            lines.append(f"{i:>3}  {layer!r:<58} {dim:>6} {n:>9}")
        lines.append(f"total parameters: {self.params.size} ({self.dtype.name}), loss={self.loss.name}, "
                     f"l2={self.l2}, backend={self.backend_name}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (f"Sequential({len(self.layers)} layers, {self.params.size} params, loss={self.loss.name!r}, "
                f"dtype={self.dtype.name!r}, backend={self.backend_name!r})")


__all__ = ["Sequential", "Dense", "BatchNorm", "Dropout"]
