"""The Sequential model: plumbing between layers, kernels and flat arrays.

All trainable arrays live in one flat vector ``params`` (gradients in
``grads``, same layout); BatchNorm running statistics in ``state``. The
layers' ``W``, ``b``, ``gamma``, ``beta`` are views into them, so an
optimiser, a checkpoint or a gradient check deals with one array.
"""
from __future__ import annotations

import copy
import warnings
from typing import Any, Iterable

import numpy as np

from . import _validation as V
from .backends import Backend, get_backend
from .executors.per_layer import PerLayerExecutor
from .layers import Activation, Layer
from .losses import Loss, get_loss
from .plan import PRECISION_CODES, Plan, compile_plan

L2_SCALES = ("batch", "dataset")
PRECISIONS = tuple(PRECISION_CODES)  # ('fp32', 'bf16')
PREDICT_BATCH = 4096  # rows per inference chunk: bounds work memory on big inputs


_BF16_WARNED = False  # the no-bfloat16-unit warning is given once per process


def _warn_if_no_bf16_unit() -> None:
    global _BF16_WARNED
    from .backends import blas  # through the module attribute: tests monkeypatch blas.cpu_bf16_unit

    if _BF16_WARNED or blas.cpu_bf16_unit():
        return
    _BF16_WARNED = True
    warnings.warn("this CPU has no bfloat16 matrix unit (AMX or AVX512-BF16): precision='bf16' trains "
                  "correctly but slower than float32", UserWarning, stacklevel=3)


class Sequential:
    """A stack of layers trained on one loss.

    Parameters
    ----------
    layers : list of Layer
        ``Dense``, ``BatchNorm``, ``ReLU``/``Tanh``/``Sigmoid``/``Identity``,
        ``Dropout``. An activation right after a ``Dense`` is fused into it.
    loss : {'softmax_cross_entropy', 'binary_cross_entropy', 'mse', 'poisson'}
        Applied to the last layer's raw outputs (logits for cross-entropies;
        the log rate for ``'poisson'``, whose ``predict`` is ``exp(z)``,
        targets ``>= 0``, docs/spec.md "Activations and losses").
    l2 : float
        ``lambda`` of the L2 penalty on Dense weights (docs/spec.md "Cost and L2"):
        ``J = mean loss + lambda/(2m) * sum ||W||^2``.
    l2_scale : {'batch', 'dataset'}
        ``'batch'`` (the course's definition, default): ``m`` is the
        mini-batch size (with per-example weights: their sum over the
        batch), so the effective strength changes with ``batch_size`` (like
        scikit-learn's ``alpha``). ``'dataset'``: ``m`` is the training-set
        size ``N`` (batch-size independent).
    dtype : {'float32', 'float64'}
    precision : {'fp32', 'bf16'}
        ``'bf16'``: every Dense GEMM (forward and backward) multiplies
        bfloat16-rounded operands with float32 accumulation; parameters,
        gradients, optimiser state and everything else stay float32
        (docs/spec.md "Mixed precision"). Requires ``dtype='float32'``. On a
        CPU without a bfloat16 unit (AMX, AVX512-BF16) it warns once that it
        will be slower than float32. :func:`fastdl.gradcheck` checks such a
        model through its float64 fp32 copy (the gradient formulas are the same).
    backend : {'auto', 'reference', 'numba', 'cython'}
    seed : int
        Fixes initialisation, shuffling and dropout masks.

    Notes
    -----
    The model compiles itself once to ``model.plan`` (:mod:`fastdl.plan`:
    op order, offsets, loss, L2, precision) and runs it with
    ``model.executor`` (:class:`fastdl.executors.PerLayerExecutor`); whole-epoch
    executors run the same plan (``model.kernels.epoch_executor``).
    """

    def __init__(self, layers: Iterable[Layer], *, loss: str = "softmax_cross_entropy", l2: float = 0.0,
                 l2_scale: str = "batch", dtype: str = "float32", precision: str = "fp32",
                 backend: "str | Backend" = "auto", seed: int = 0):
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
        self._l2 = V.check_positive("l2", l2, allow_zero=True)
        self._l2_scale = V.check_choice("l2_scale", l2_scale, L2_SCALES)
        self.dtype = V.check_dtype(dtype)
        self.precision = V.check_choice("precision", precision, PRECISIONS)
        if self.precision == "bf16" and self.dtype != np.float32:
            raise ValueError(f"precision='bf16' needs dtype='float32' (the float32 master copy of the "
                             f"parameters), got dtype={self.dtype.name!r}; use precision='fp32' with float64")
        if self.precision == "bf16":
            _warn_if_no_bf16_unit()
        self.seed = V.check_positive("seed", seed, integer=True, allow_zero=True)
        self.backend_name = backend if isinstance(backend, str) else backend.name
        self.kernels: Backend = get_backend(backend)
        self.step_count = 0  # training steps taken: part of the dropout key
        self.stop_training = False
        self.history = None
        self._check_shapes()
        self._allocate_flat()
        for i, layer in enumerate(self.layers):
            layer._owner = self
            layer.initialize(self.seed, i)
        self._compile()

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

    def _allocate_flat(self) -> None:
        # The same flat order as fastdl.plan.compile_plan's offsets (tests/test_plan.py checks it).
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

    def _compile(self) -> None:
        """(Re)build ``plan`` and the per-layer ``executor`` (after a change of ``l2`` / ``l2_scale``)."""
        self.plan: Plan = compile_plan(self)
        self.executor = PerLayerExecutor(self.plan, self.kernels, self.params, self.grads, self.state)

    @property
    def l2(self) -> float:
        """``lambda`` of the L2 term; setting it recompiles the plan."""
        return self._l2

    @l2.setter
    def l2(self, value: float) -> None:
        self._l2 = V.check_positive("l2", value, allow_zero=True)
        self._compile()

    @property
    def l2_scale(self) -> str:
        """``'batch'`` or ``'dataset'`` (the L2 term's ``m``); setting it recompiles the plan."""
        return self._l2_scale

    @l2_scale.setter
    def l2_scale(self, value: str) -> None:
        self._l2_scale = V.check_choice("l2_scale", value, L2_SCALES)
        self._compile()

    # ------------------------------------------------------------- core math
    def l2_cost(self, m: float) -> float:
        """``lambda/(2m) * sum ||W||_F^2`` over Dense weights (``plan.dense_weights``)."""
        return self.executor.l2_term(m)

    def _loss_and_grads(self, X: np.ndarray, y: np.ndarray, *, dropout: bool, n_total: int | None,
                        step: int, m_l2: float | None = None, grad_scale: float = 1.0, seed: int | None = None,
                        comm=None, weights: np.ndarray | None = None) -> tuple[float, float, np.ndarray]:
        """Training-mode forward + backward on validated arrays (fills ``grads``).

        Returns (mean data loss, L2 term, logits); ``J`` is the sum of the first two;
        the logits are a view into the executor's workspace (valid until the next call).
        ``weights``: validated per-example weights (float64 ``(m,)``, see
        :meth:`check_sample_weight`) or None.
        Data-parallel shards (:mod:`fastdl.distributed`) also pass ``m_l2`` (the
        global batch size as the L2 ``m``), ``grad_scale`` (rows of this shard over
        the global batch: multiplies the whole gradient, L2 part included; the
        returned losses are unscaled), ``seed`` (this rank's dropout seed) and
        ``comm`` (synchronised BatchNorm statistics).
        """
        return self.executor.loss_and_grads(X, y, dropout=dropout, n_total=n_total, step=step,
                                            seed=self.seed if seed is None else seed, m_l2=m_l2,
                                            grad_scale=grad_scale, comm=comm, weights=weights)

    def count_errors(self, logits: np.ndarray, y: np.ndarray) -> int:
        """Misclassified rows of ``logits`` against validated labels ``y`` (classifiers; no allocation)."""
        return self.executor.count_errors(logits, y)

    # ------------------------------------------------------------ public API
    def check_X(self, X) -> np.ndarray:
        """Validate and convert inputs to this model's dtype (C-contiguous, finite)."""
        return V.as_float_matrix(X, self.dtype, self.n_features)

    def check_y(self, y, m: int) -> np.ndarray:
        """Validate and convert targets for this model's loss."""
        return self.loss.prepare_targets(y, m, self.n_outputs, self.dtype)

    def check_sample_weight(self, sample_weight, m: int) -> np.ndarray | None:
        """Validate per-example weights: ``None`` (unweighted) or float64 ``(m,)``, finite, ``>= 0``,
        with a positive sum (scikit-learn's rule, :func:`fastdl.plan.weighted_mean_rule`)."""
        if sample_weight is None:
            return None
        try:
            w = np.ascontiguousarray(sample_weight, dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"sample_weight must be numbers, one per example: {exc}") from None
        if w.ndim != 1 or w.shape[0] != m:
            raise ValueError(f"sample_weight must have shape ({m},) (one weight per example), got {w.shape}")
        if not np.isfinite(w).all():
            raise ValueError("sample_weight contains NaN or infinite values")
        if m and w.min() < 0:
            raise ValueError(f"sample_weight must be >= 0, got a minimum of {w.min():g}")
        if m and not w.sum() > 0:
            raise ValueError("sample_weight sums to 0: at least one example needs a positive weight")
        return w

    def compute_gradients(self, X, y, *, dropout: bool = True, n_total: int | None = None,
                          sample_weight=None) -> float:
        """Training-mode forward and backward on ``(X, y)``.

        Fills ``model.grads`` and returns ``J`` including the L2 term
        (docs/spec.md "Cost and L2 regularisation"). BatchNorm uses batch
        statistics and updates its running averages; dropout uses the mask of
        the current ``step_count`` unless ``dropout=False``. ``n_total`` is the
        training-set size for ``l2_scale='dataset'``. ``sample_weight``
        (``(m,)``, ``>= 0``): ``J = sum(w_i L_i)/sum(w) + lambda/(2 sum(w)) sum ||W||^2``
        (scikit-learn's rule; with ``l2_scale='dataset'`` the L2 ``m`` stays ``n_total``).
        """
        X = self.check_X(X)
        y = self.check_y(y, X.shape[0])
        w = self.check_sample_weight(sample_weight, X.shape[0])
        data_loss, l2_term, _ = self._loss_and_grads(X, y, dropout=dropout, n_total=n_total,
                                                      step=self.step_count, weights=w)
        return data_loss + l2_term

    def decision_function(self, X, batch_size: int = PREDICT_BATCH) -> np.ndarray:
        """Raw outputs of the last layer (logits) in inference mode."""
        X = self.check_X(X)
        batch_size = int(V.check_positive("batch_size", batch_size, integer=True))
        return self.executor.predict_logits(X, batch_size)

    def predict_proba(self, X) -> np.ndarray:
        """Class probabilities ``(m, n_classes)`` (``(m, 2)`` for binary cross-entropy)."""
        return self.loss.proba(self.kernels, self.decision_function(X))

    def predict(self, X) -> np.ndarray:
        """Class ids (classification) or outputs (mse)."""
        return self.loss.predict_from_outputs(self.decision_function(X))

    def evaluate(self, X, y, batch_size: int = PREDICT_BATCH, sample_weight=None) -> dict[str, float]:
        """Inference-mode metrics: ``loss`` (mean data loss, no L2 term) and,
        for classifiers, ``accuracy`` and ``error`` (= 1 - accuracy).

        With ``sample_weight`` every metric is the weighted mean over the examples
        (``sum(w_i x_i) / sum(w)``, as scikit-learn's ``score``).
        """
        X = self.check_X(X)
        y = self.check_y(y, X.shape[0])
        w = self.check_sample_weight(sample_weight, X.shape[0])
        Z = self.decision_function(X, batch_size)
        out = {"loss": float(self.executor.loss(Z, y, w))}
        if self.loss.classifier:
            wrong = self.executor.wrong_predictions(Z, y)
            err = float(np.mean(wrong)) if w is None else float(np.dot(w, wrong) / w.sum())
            out.update(accuracy=1.0 - err, error=err)
        return out

    def fit(self, X, y, **kwargs):
        """Train with mini-batch gradient descent; see :func:`fastdl.training.fit`."""
        from .training import fit

        return fit(self, X, y, **kwargs)

    def save(self, path, optimizer=None) -> None:
        """Write the model (and optionally the optimiser state) atomically; see :mod:`fastdl.io`."""
        from .io import save_model

        save_model(self, path, optimizer=optimizer)

    def to_onnx(self, path, opset: int = 17, *, fold_batchnorm: bool = True, standardizer=None) -> None:
        """Write the inference graph as ONNX (float32, dynamic batch), atomically; see :mod:`fastdl.onnx`.

        ``standardizer``: put the input standardisation in the graph (it then takes raw features)."""
        from .onnx import export

        export(self, path, opset=opset, fold_batchnorm=fold_batchnorm, standardizer=standardizer)

    # ------------------------------------------------------------- utilities
    def get_config(self) -> dict[str, Any]:
        """The architecture as plain JSON-able data."""
        return {
            "layers": [{"type": type(layer).__name__, "config": layer.get_config()} for layer in self.layers],
            "loss": self.loss.name, "l2": self.l2, "l2_scale": self.l2_scale,
            "dtype": self.dtype.name, "precision": self.precision, "seed": self.seed,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any], backend: "str | Backend" = "auto", **overrides) -> "Sequential":
        """Build a fresh model from :meth:`get_config` output."""
        from .layers import layer_from_config

        kw = {k: config[k] for k in ("loss", "l2", "l2_scale", "dtype", "seed")}
        kw["precision"] = config.get("precision", "fp32")  # files written before precision existed: fp32
        kw.update(overrides)
        layers = [layer_from_config(d["type"], d["config"]) for d in config["layers"]]
        return cls(layers, backend=backend, **kw)

    def copy(self, *, dtype: str | None = None, backend: "str | Backend | None" = None,
             precision: str | None = None) -> "Sequential":
        """An independent copy (optionally in another dtype, backend or precision) with the same values."""
        overrides = {k: v for k, v in (("dtype", dtype), ("precision", precision)) if v}
        new = Sequential.from_config(copy.deepcopy(self.get_config()),
                                     backend=backend if backend is not None else self.kernels, **overrides)
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
        prec = f", precision={self.precision}" if self.precision != "fp32" else ""
        lines.append(f"total parameters: {self.params.size} ({self.dtype.name}{prec}), loss={self.loss.name}, "
                     f"l2={self.l2}, backend={self.backend_name}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (f"Sequential({len(self.layers)} layers, {self.params.size} params, loss={self.loss.name!r}, "
                f"dtype={self.dtype.name!r}, precision={self.precision!r}, backend={self.backend_name!r})")


__all__ = ["Sequential"]
