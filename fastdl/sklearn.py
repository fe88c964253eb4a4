"""scikit-learn drop-ins: :class:`MLPClassifier` and :class:`MLPRegressor` trained by fastdl.

>>> from fastdl.sklearn import MLPClassifier
>>> clf = MLPClassifier(hidden_layer_sizes=(64,), random_state=0).fit(X, y)   # doctest: +SKIP

They take scikit-learn's parameters with scikit-learn's meaning and
reproduce its training procedure step for step: the same Glorot-uniform
initialisation drawn from ``random_state``, the same per-epoch shuffle, the
same mini-batches (``batch_size='auto'`` = ``min(200, n_samples)``), the same
``alpha`` L2 term (``alpha/(2m)·Σ‖W‖²`` with ``m`` the mini-batch size, or its
summed ``sample_weight``), the same stopping rule (``tol``,
``n_iter_no_change``, ``early_stopping``) and learning-rate rules. Only the
arithmetic runs in fastdl's compiled kernels, so switching from
scikit-learn changes the speed, not the training behaviour. Known
differences (documented, small):

* ``solver='adam'``: fastdl adds ``epsilon`` to ``sqrt(v̂)`` (the bias-corrected
  second moment, as in the Adam paper and PyTorch); scikit-learn adds it to
  the uncorrected ``sqrt(v)``, i.e. its effective ε is ``ε/sqrt(1-β₂ᵗ)``
  (larger during the first ~1/(1-β₂) steps). With the default ε = 1e-8 the
  difference is far below the gradient scale.
* multi-output regression: ``loss_`` is fastdl's ``½‖ŷ-y‖²`` summed over the
  outputs (scikit-learn averages it over the outputs but trains on the
  summed gradient, so the updates are the same).
* ``solver='rmsprop'`` and the options ``batchnorm``, ``keep_prob``,
  ``backend`` and ``precision`` are fastdl's own.

Unpickling an estimator runs code like any pickle: load only pickles you
trust. fastdl's own model files (``model_.save``) stay pickle-free.
"""
from __future__ import annotations

import copy
import math
import numbers
import warnings
from typing import Any

import numpy as np

try:
    import scipy.optimize
    import scipy.sparse as sp
    from scipy.special import expit
    from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.metrics import accuracy_score, r2_score
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import LabelBinarizer
    from sklearn.utils import check_random_state, gen_batches
    from sklearn.utils.metaestimators import available_if
    from sklearn.utils.multiclass import check_classification_targets, type_of_target, unique_labels
    from sklearn.utils.validation import check_is_fitted, column_or_1d, validate_data
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("fastdl.sklearn needs scikit-learn >= 1.6: pip install 'fastdl[sklearn]'") from exc

from . import optim as _optim
from .callbacks import Callback
from .layers import BatchNorm, Dense, Dropout, Identity, ReLU, Sigmoid, Tanh
from .model import Sequential

__all__ = ["MLPClassifier", "MLPRegressor", "NoImprovementStopping"]

ACTIVATIONS = {"identity": Identity, "logistic": Sigmoid, "tanh": Tanh, "relu": ReLU}
SOLVERS = ("lbfgs", "sgd", "adam", "rmsprop")
LOSSES = {"squared_error": "mse", "poisson": "poisson"}   # MLPRegressor's loss -> fastdl's loss
LEARNING_RATES = ("constant", "invscaling", "adaptive")
NONFINITE_MSG = ("Solver produced non-finite parameter weights. The input data may contain large values and "
                 "need to be preprocessed.")
PREDICT_CHUNK = 4096  # rows densified / evaluated at a time (bounds memory on sparse and large inputs)


# ----------------------------------------------------------------------------- stopping / adaptive rate
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


class _ScikitSGD(_optim.Optimizer):
    """scikit-learn's SGD rule for ``momentum=1.0``, which scikit-learn accepts and ``fd.ClassicalMomentum``
    refuses (``[0, 1)``): ``v = mu v - lr g; p += mu v - lr g`` (Nesterov) or ``p += v``, in NumPy."""

    state_names = ("v",)

    def __init__(self, lr: float = 0.001, momentum: float = 0.9, nesterov: bool = True, backend=None):
        super().__init__(lr, backend)
        self.momentum = float(momentum)
        self.nesterov = bool(nesterov)

    def get_config(self):
        return {"lr": self.lr, "momentum": self.momentum, "nesterov": self.nesterov}

    def step(self, params, grads, lr=None):
        self._ensure_state(params, grads)
        self.t += 1
        lr = self.lr if lr is None else lr
        v = self.state["v"]
        v *= self.momentum
        v -= lr * grads
        if self.nesterov:
            params += self.momentum * v - lr * grads
        else:
            params += v


class _OptimizerView:
    """``est._optimizer.learning_rate``: what scikit-learn's own tests read."""

    def __init__(self, opt):
        self._opt = opt

    @property
    def learning_rate(self) -> float:
        return self._opt.lr


# ----------------------------------------------------------------------------- helpers
def _rows(X, idx, dtype) -> np.ndarray:
    """Rows ``idx`` (index array or slice) of dense or sparse ``X`` as a C-contiguous ``dtype`` array.

    Sparse input is densified here, one mini-batch at a time.
    """
    if sp.issparse(X):
        return np.ascontiguousarray(X[idx].toarray(), dtype=dtype)
    if isinstance(idx, slice):
        return np.ascontiguousarray(X[idx], dtype=dtype)
    return X.take(idx, axis=0)


def _check_sample_weight(sample_weight, n: int, dtype=np.float64) -> np.ndarray | None:
    if sample_weight is None:
        return None
    if isinstance(sample_weight, numbers.Number):
        return np.full(n, float(sample_weight), np.float64)
    sw = np.asarray(sample_weight)
    if sw.ndim != 1:
        raise ValueError(f"Sample weights must be 1D array or scalar, got shape {sw.shape}")
    if sw.shape[0] != n:
        raise ValueError(f"sample_weight.shape == ({sw.shape[0]},), expected ({n},)!")
    try:
        sw = sw.astype(np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"sample_weight must be numeric: {exc}") from exc
    if not np.isfinite(sw).all():
        raise ValueError("sample_weight must be finite (no NaN or infinity)")
    if (sw < 0).any():
        raise ValueError("sample_weight must be non-negative")
    if sw.sum() <= 0:
        raise ValueError("Sample weights must contain at least one non-zero number (all weights are zero).")
    return np.ascontiguousarray(sw)


class _Diverged(Exception):
    pass


class _MaxFun(Exception):
    pass


# ----------------------------------------------------------------------------- base estimator
class _BaseMLP(BaseEstimator):
    """Shared machinery of :class:`MLPClassifier` and :class:`MLPRegressor`."""

    _is_classifier = False

    # ------------------------------------------------------------ validation
    def _validate_hyperparameters(self) -> list[int]:
        def number(name, lo=None, hi=None, lo_open=False, hi_open=False, integer=False, allow_inf=False):
            v = getattr(self, name)
            ok_type = isinstance(v, numbers.Integral) if integer else isinstance(v, numbers.Real)
            if isinstance(v, bool) or not ok_type:
                if not (allow_inf and isinstance(v, numbers.Real) and v == np.inf):
                    kind = "an int" if integer else "a float"
                    raise ValueError(f"The '{name}' parameter of {type(self).__name__} must be {kind}, got {v!r}.")
            if allow_inf and v == np.inf:
                return
            if (lo is not None and (v < lo or (lo_open and v == lo))) or \
                    (hi is not None and (v > hi or (hi_open and v == hi))):
                lo_s = "" if lo is None else f"{'>' if lo_open else '>='} {lo}"
                hi_s = "" if hi is None else f"{'<' if hi_open else '<='} {hi}"
                raise ValueError(f"The '{name}' parameter of {type(self).__name__} must be "
                                 f"{' and '.join(s for s in (lo_s, hi_s) if s)}, got {v!r}.")

        def choice(name, options):
            v = getattr(self, name)
            if not isinstance(v, str) or v not in options:
                raise ValueError(f"The '{name}' parameter of {type(self).__name__} must be one of "
                                 f"{sorted(options)}, got {v!r}.")

        hls = self.hidden_layer_sizes
        if isinstance(hls, numbers.Integral) and not isinstance(hls, bool):
            hidden = [int(hls)]
        else:
            try:
                hidden = [int(h) for h in hls]
            except TypeError:
                raise ValueError("The 'hidden_layer_sizes' parameter must be an int or a sequence of ints, "
                                 f"got {hls!r}.") from None
            if any(not isinstance(h, numbers.Integral) or isinstance(h, bool) for h in hls):
                raise ValueError(f"hidden_layer_sizes must hold ints, got {hls!r}.")
        if any(h <= 0 for h in hidden):
            raise ValueError(f"hidden_layer_sizes must be > 0, got {hidden}.")
        choice("activation", ACTIVATIONS)
        choice("solver", SOLVERS)
        choice("learning_rate", LEARNING_RATES)
        number("alpha", lo=0)
        if not (isinstance(self.batch_size, str) and self.batch_size == "auto"):
            number("batch_size", lo=1, integer=True)
        number("learning_rate_init", lo=0, lo_open=True)
        number("power_t", lo=0)
        number("max_iter", lo=1, integer=True)
        number("tol", lo=0)
        number("momentum", lo=0, hi=1)
        number("validation_fraction", lo=0, hi=1, hi_open=True)
        number("beta_1", lo=0, hi=1, hi_open=True)
        number("beta_2", lo=0, hi=1, hi_open=True)
        number("epsilon", lo=0, lo_open=True)
        number("n_iter_no_change", lo=1, integer=True, allow_inf=True)
        number("max_fun", lo=1, integer=True)
        for name in ("shuffle", "warm_start", "nesterovs_momentum", "early_stopping", "batchnorm"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise ValueError(f"The '{name}' parameter of {type(self).__name__} must be a bool, "
                                 f"got {getattr(self, name)!r}.")
        kp = self.keep_prob
        kps = list(kp) if np.ndim(kp) else [kp] * len(hidden)
        if len(kps) != len(hidden):
            raise ValueError(f"keep_prob has {len(kps)} entries but there are {len(hidden)} hidden layers")
        for k in kps:
            if isinstance(k, bool) or not isinstance(k, numbers.Real) or not 0 < k <= 1:
                raise ValueError(f"keep_prob must be in (0, 1], got {k!r}")
        choice("precision", ("fp32", "bf16"))
        if not isinstance(self.backend, str):
            raise ValueError(f"backend must be a backend name (str), got {self.backend!r}")
        return hidden

    # ------------------------------------------------------------ the network
    def _keep_probs(self, n_hidden: int) -> list[float]:
        kp = self.keep_prob
        return [float(k) for k in kp] if np.ndim(kp) else [float(kp)] * n_hidden

    def _build_model(self, layer_units: list[int], dtype, seed: int, batchnorm: bool,
                     keep_probs: list[float]) -> Sequential:
        layers = []
        act = ACTIVATIONS[self.activation]
        for i in range(len(layer_units) - 2):
            layers.append(Dense(layer_units[i], layer_units[i + 1], use_bias=not batchnorm))
            if batchnorm:
                layers.append(BatchNorm(layer_units[i + 1]))
            layers.append(act())
            if keep_probs[i] < 1.0:
                layers.append(Dropout(keep_prob=keep_probs[i]))
        layers.append(Dense(layer_units[-2], layer_units[-1]))
        kw: dict[str, Any] = {"precision": self.precision} if self.precision != "fp32" else {}
        return Sequential(layers, loss=self._fd_loss(layer_units[-1]), l2=float(self.alpha),
                          dtype=np.dtype(dtype).name, backend=self.backend, seed=seed, **kw)

    def _bind_attributes(self) -> None:
        """``coefs_``/``intercepts_``: views of the model's flat parameters (edits write through)."""
        model = self.model_
        self.coefs_, self.intercepts_ = [], []
        layers = model.layers
        for i, layer in enumerate(layers):
            if isinstance(layer, Dense):
                self.coefs_.append(layer.W)
                if layer.use_bias:
                    self.intercepts_.append(layer.b)
                else:  # batchnorm=True: BatchNorm's beta plays the bias of this hidden layer
                    bn = next(lay for lay in layers[i + 1:] if isinstance(lay, BatchNorm))
                    self.intercepts_.append(bn.beta)

    def _attributes_are_views(self) -> bool:
        model = getattr(self, "model_", None)
        coefs = getattr(self, "coefs_", None)
        ints = getattr(self, "intercepts_", None)
        if model is None or not isinstance(coefs, list) or not isinstance(ints, list):
            return False
        dense = [lay for lay in model.layers if isinstance(lay, Dense)]
        if len(coefs) != len(dense) or len(ints) != len(dense):
            return False
        return all(isinstance(c, np.ndarray) and np.may_share_memory(c, model.params) for c in coefs + ints)

    def _model_from_attributes(self) -> None:
        """Rebuild ``model_`` from user-assigned ``coefs_``/``intercepts_`` (scikit-learn lets users set them)."""
        coefs = [np.asarray(c) for c in self.coefs_]
        ints = [np.asarray(b) for b in self.intercepts_]
        units = [coefs[0].shape[0]] + [c.shape[1] for c in coefs]
        dtype = coefs[0].dtype if coefs[0].dtype in (np.float32, np.float64) else np.float64
        hidden = units[1:-1]
        self.model_ = self._build_model(units, dtype, 0, False, [1.0] * len(hidden))
        dense = [lay for lay in self.model_.layers if isinstance(lay, Dense)]
        for lay, c, b in zip(dense, coefs, ints):
            lay.W[...] = c.reshape(lay.W.shape)
            lay.b[...] = np.reshape(b, lay.b.shape)
        self.n_layers_ = len(units)
        self.n_outputs_ = units[-1]
        self._bind_attributes()

    def _glorot_init(self, rs: np.random.RandomState) -> None:
        """scikit-learn's initialisation, drawn in its order from its RandomState (same start as its MLP)."""
        factor = 2.0 if self.activation == "logistic" else 6.0
        dense = [lay for lay in self.model_.layers if isinstance(lay, Dense)]
        for lay in dense:
            bound = np.sqrt(factor / (lay.n_in + lay.n_out))
            W = rs.uniform(-bound, bound, (lay.n_in, lay.n_out))
            b = rs.uniform(-bound, bound, lay.n_out)
            lay.W[...] = W
            if lay.use_bias:
                lay.b[...] = b

    # ------------------------------------------------------------ data
    def _forward(self, X) -> np.ndarray:
        """Raw outputs (logits) in inference mode; sparse X densified a chunk at a time."""
        model = self.model_
        if not sp.issparse(X):
            X = np.ascontiguousarray(X, dtype=model.dtype)
            return model.decision_function(X)
        out = np.empty((X.shape[0], model.n_outputs), model.dtype)
        for s in range(0, X.shape[0], PREDICT_CHUNK):
            out[s:s + PREDICT_CHUNK] = model.decision_function(_rows(X, slice(s, s + PREDICT_CHUNK), model.dtype))
        return out

    def _prepare_X(self, X):
        if sp.issparse(X):
            return X.tocsr()
        return np.ascontiguousarray(X)

    # ------------------------------------------------------------ fitting
    def _fit(self, X, y, sample_weight=None, incremental: bool = False):
        hidden = self._validate_hyperparameters()
        has_coefs = hasattr(self, "coefs_")
        first_pass = not has_coefs or (not self.warm_start and not incremental)
        X, Y = self._validate_input(X, y, incremental, reset=first_pass)
        X = self._prepare_X(X)
        n_samples = X.shape[0]
        sw = _check_sample_weight(sample_weight, n_samples)
        if Y.ndim == 1:
            Y = Y.reshape(-1, 1)
        self._random_state = check_random_state(self.random_state)
        layer_units = [X.shape[1]] + hidden + [Y.shape[1]]
        if first_pass:
            # bf16 GEMMs round float32 operands: a bf16 network is float32 whatever X's dtype
            dtype = np.float32 if self.precision == "bf16" else X.dtype
            self._initialize(Y, layer_units, dtype, hidden)
        else:
            if not self._attributes_are_views():
                self._model_from_attributes()
            if self.coefs_[0].shape[0] != X.shape[1]:
                raise ValueError(f"X has {X.shape[1]} features, but the network expects {self.coefs_[0].shape[0]}")
            if Y.shape[1] != self.n_outputs_:
                raise ValueError(f"y has {Y.shape[1]} outputs, but the network was fitted with {self.n_outputs_}")
            fitted_hidden = [c.shape[1] for c in self.coefs_[:-1]]
            if fitted_hidden != hidden:
                raise ValueError(f"hidden_layer_sizes is {tuple(hidden)} but the fitted network has "
                                 f"{tuple(fitted_hidden)}: continuing (warm_start / partial_fit) needs the same "
                                 "architecture; set warm_start=False to train a new network")
        targets = self._targets(Y)
        if self.solver == "lbfgs":
            self._fit_lbfgs(X, targets, sw)
        else:
            self._fit_stochastic(X, targets, Y, sw, incremental)
        if not np.isfinite(self.model_.params).all():
            raise ValueError(NONFINITE_MSG)
        return self

    def _initialize(self, Y, layer_units, dtype, hidden) -> None:
        self.n_iter_ = 0
        self.t_ = 0
        self.n_outputs_ = Y.shape[1]
        self.n_layers_ = len(layer_units)
        self.out_activation_ = self._out_activation()
        # Dropout masks need a seed: drawn from random_state only when dropout is on, so that without
        # dropout the RandomState sequence (initialisation, shuffles) is exactly scikit-learn's.
        keep = self._keep_probs(len(hidden))
        seed = int(self._random_state.randint(2 ** 31 - 1)) if min(keep, default=1.0) < 1.0 else 0
        self.model_ = self._build_model(layer_units, dtype, seed, bool(self.batchnorm), keep)
        self._glorot_init(self._random_state)
        self._bind_attributes()
        for name in ("optimizer_", "_stopper"):
            self.__dict__.pop(name, None)
        if self.solver != "lbfgs":
            self.loss_curve_ = []
            self._no_improvement_count = 0
            if self.early_stopping:
                self.validation_scores_ = []
                self.best_validation_score_ = -np.inf
                self.best_loss_ = None
            else:
                self.best_loss_ = np.inf
                self.validation_scores_ = None
                self.best_validation_score_ = None

    def _make_optimizer(self, backend) -> _optim.Optimizer:
        lr = float(self.learning_rate_init)
        if self.solver == "adam":
            return _optim.Adam(lr, beta1=self.beta_1, beta2=self.beta_2, eps=self.epsilon, backend=backend)
        if self.solver == "rmsprop":
            return _optim.RMSprop(lr, beta2=self.beta_2, eps=self.epsilon, backend=backend)
        if self.momentum < 1.0:  # scikit-learn's rule (classical or Nesterov), the same update as its MLP
            return _optim.ClassicalMomentum(lr, momentum=self.momentum, nesterov=bool(self.nesterovs_momentum),
                                            backend=backend)
        return _ScikitSGD(lr, momentum=self.momentum, nesterov=bool(self.nesterovs_momentum), backend=backend)

    @property
    def _optimizer(self):
        """scikit-learn's private ``_optimizer.learning_rate`` (its tests read it); see ``optimizer_``."""
        if "optimizer_" not in self.__dict__:
            raise AttributeError("_optimizer")
        return _OptimizerView(self.optimizer_)

    def _fit_stochastic(self, X, targets, Y, sw, incremental: bool) -> None:
        model = self.model_
        if not hasattr(self, "loss_curve_"):  # continuing an L-BFGS fit with a stochastic solver
            self.loss_curve_, self._no_improvement_count = [], 0
            self.best_loss_, self.validation_scores_, self.best_validation_score_ = (
                (None, [], -np.inf) if self.early_stopping else (np.inf, None, None))
        if not incremental or "optimizer_" not in self.__dict__:
            self.optimizer_ = self._make_optimizer(model.backend_name)
        opt = self.optimizer_
        if self.early_stopping and incremental:
            raise ValueError("partial_fit does not support early_stopping=True")
        adaptive = self.learning_rate == "adaptive" and self.solver in ("sgd", "rmsprop")
        stopper = self.__dict__.get("_stopper")
        if stopper is None or not incremental:
            stopper = NoImprovementStopping(mode="max" if self.early_stopping else "min", tol=self.tol,
                                            n_iter_no_change=self.n_iter_no_change, adaptive=adaptive,
                                            verbose=bool(self.verbose))
            if self.early_stopping:
                stopper.best = self.best_validation_score_
            elif self.best_loss_ is not None:
                stopper.best = self.best_loss_
            self._stopper = stopper
        stopper.no_improvement_count = self._no_improvement_count
        # the settings may have changed through set_params between calls
        stopper.tol, stopper.n_iter_no_change, stopper.adaptive = self.tol, self.n_iter_no_change, adaptive
        early = bool(self.early_stopping)
        if early:
            # scikit-learn's split: stratified on the binarised labels when there is one output
            stratify = Y if (self._is_classifier and self.n_outputs_ == 1) else None
            arrays = [X, targets, Y] + ([sw] if sw is not None else [])
            split = train_test_split(*arrays, random_state=self._random_state,
                                     test_size=self.validation_fraction, stratify=stratify)
            X_train, X_val, t_train, _, _, Y_val = split[:6]
            sw_train, sw_val = (split[6], split[7]) if sw is not None else (None, None)
            if X_val.shape[0] < 2:
                raise ValueError("The validation set is too small. Increase 'validation_fraction' or the size "
                                 "of your dataset.")
            y_val = self._val_targets(Y_val)
            self._best_params = model.params.copy()
            self._best_state = model.state.copy()
        else:
            X_train, t_train, sw_train = X, targets, sw
            X_val = y_val = sw_val = None
        n = X_train.shape[0]
        idx = np.arange(n)
        if self.batch_size == "auto":
            bs = min(200, n)
        else:
            if self.batch_size > n:
                warnings.warn("Got `batch_size` less than 1 or larger than sample size. It is going to be clipped")
            bs = int(np.clip(self.batch_size, 1, n))
        if not sp.issparse(X_train):
            X_train = np.ascontiguousarray(X_train, dtype=model.dtype)
        t_train = np.ascontiguousarray(t_train)
        lr_rule = self.learning_rate if self.solver in ("sgd", "rmsprop") else "constant"
        runner = self._epoch_runner(model, opt, X_train, bs)
        self.n_iter_ = 0
        try:
            for _ in range(self.max_iter):
                if self.shuffle:
                    # = sklearn.utils.shuffle(idx, random_state=rs) (same draws), without its ~0.5 ms of checks
                    p = np.arange(n)
                    self._random_state.shuffle(p)
                    idx = idx[p]
                diverged = False
                if runner is not None:
                    acc, diverged = runner(idx if self.shuffle else np.arange(n), X_train, t_train, sw_train)
                else:
                    acc = 0.0
                    for sl in gen_batches(n, bs):
                        rows = idx[sl] if self.shuffle else sl
                        xb = _rows(X_train, rows, model.dtype)
                        yb = t_train[rows]
                        kw = {}
                        if sw_train is not None:
                            kw["weights"] = np.ascontiguousarray(sw_train[rows])
                        data_loss, l2_term, _ = model._loss_and_grads(xb, yb, dropout=True, n_total=n,
                                                                      step=model.step_count, **kw)
                        J = data_loss + l2_term
                        if not math.isfinite(J):
                            diverged = True
                            break
                        opt.step(model.params, model.grads, lr=opt.lr)
                        model.step_count += 1
                        acc += J * (sl.stop - sl.start)
                if diverged:
                    # scikit-learn keeps iterating on NaN; nothing can recover, so stop here: with
                    # early stopping the best epoch's parameters are restored below, else ValueError
                    if not early:
                        raise _Diverged
                    self.n_iter_ += 1
                    self.loss_ = np.nan
                    self.loss_curve_.append(np.nan)
                    self.validation_scores_.append(np.nan)
                    break
                self.n_iter_ += 1
                self.loss_ = acc / n
                self.t_ += n
                self.loss_curve_.append(self.loss_)
                if self.verbose:
                    print("Iteration %d, loss = %.8f" % (self.n_iter_, self.loss_))
                if early:
                    score = self._score(X_val, y_val, sw_val)
                    self.validation_scores_.append(score)
                    if self.verbose:
                        print("Validation score: %f" % score)
                    if stopper.update(score):
                        self.best_validation_score_ = score
                        self._best_params = model.params.copy()
                        self._best_state = model.state.copy()
                else:
                    stopper.update(self.loss_)
                    self.best_loss_ = stopper.best
                self._no_improvement_count = stopper.no_improvement_count
                if lr_rule == "invscaling":
                    opt.lr = float(self.learning_rate_init) / (self.t_ + 1) ** self.power_t
                if stopper.triggered():
                    stop = stopper.trigger(opt)
                    self._no_improvement_count = stopper.no_improvement_count
                    if stop:
                        break
                if incremental:
                    break
                if self.n_iter_ == self.max_iter:
                    warnings.warn("Stochastic Optimizer: Maximum iterations (%d) reached and the optimization "
                                  "hasn't converged yet." % self.max_iter, ConvergenceWarning)
        except _Diverged:
            if early:  # pragma: no cover - handled in the loop
                model.params[...] = self._best_params
            raise ValueError(NONFINITE_MSG) from None
        except KeyboardInterrupt:
            warnings.warn("Training interrupted by user.")
        if early:
            model.params[...] = self._best_params
            model.state[...] = self._best_state

    #: run dense epochs through the backend's compiled epoch executor when it has one (tests switch it off
    #: to compare with the per-step path)
    _use_epoch_executor = True

    def _epoch_runner(self, model, opt, X_train, bs):
        """A function running one epoch in one compiled call (``backend.epoch_executor``), or None.

        Same batches, order and updates as the per-step loop (the executors are tested bit-identical to
        their backend's per-layer path); sparse input and optimisers without a plan spec use the loop.
        """
        if not self._use_epoch_executor or sp.issparse(X_train):
            return None
        spec_fn, ensure = getattr(opt, "spec", None), getattr(opt, "ensure_state", None)
        get_ex = getattr(model.kernels, "epoch_executor", None)
        if spec_fn is None or ensure is None or get_ex is None or isinstance(opt, _ScikitSGD):
            return None
        from .plan import step_coefficients

        try:
            ex = get_ex(model.plan, bs, spec_fn())
        except (NotImplementedError, ValueError, TypeError):
            return None
        if ex is None:
            return None
        n = X_train.shape[0]
        n_steps = -(-n // bs)
        rows = np.array([min(bs, n - i * bs) for i in range(n_steps)], np.float64)
        costs, losses = np.empty(n_steps), np.empty(n_steps)
        empty = np.empty(0, np.float64)

        def run(perm, X, t, sw):
            spec = spec_fn()
            arrays = dict(zip(spec.state_names, ensure(model.params)))
            v = arrays.get("v", model.params[:0])
            s = arrays.get("s", model.params[:0])
            c1, c2 = step_coefficients(spec, np.full(n_steps, float(opt.lr)), opt.t)
            done, _, status = ex.run_epoch(X, t, empty if sw is None else np.ascontiguousarray(sw, np.float64),
                                           np.ascontiguousarray(perm, np.int64),
                                           model.params, model.grads, model.state, v, s, c1, c2,
                                           model.step_count, model.seed, n, costs, losses)
            opt.t += done
            model.step_count += done
            if status != 0:
                return math.nan, True
            # the per-step loop's left-to-right float sum of J * rows
            return float(np.add.accumulate(costs * rows)[-1]), False

        return run

    def _fit_lbfgs(self, X, targets, sw) -> None:
        """Full-batch L-BFGS (scipy) over the flat parameters; dropout off, BatchNorm statistics frozen."""
        model = self.model_
        has_bn = any(isinstance(lay, BatchNorm) for lay in model.layers)
        n = X.shape[0]
        # chunks bound the workspace on big or sparse inputs; BatchNorm and weights need the whole batch
        chunk = n if (has_bn or sw is not None) else max(PREDICT_CHUNK, 1)
        spans = [(s, min(s + chunk, n)) for s in range(0, n, chunk)]
        dense_X = None
        if len(spans) == 1:
            dense_X = _rows(X, slice(0, n), model.dtype)
        targets = np.ascontiguousarray(targets)
        grad64 = np.empty(model.params.size, np.float64)
        counter = {"n": 0, "best": (math.inf, None)}
        max_fun = int(self.max_fun)

        def loss_grad(theta):
            if counter["n"] >= max_fun:  # honour max_fun strictly (scipy may overshoot within a line search)
                raise _MaxFun
            counter["n"] += 1
            model.params[...] = theta
            saved = model.state.copy()
            if dense_X is not None:
                kw = {"weights": sw} if sw is not None else {}
                data_loss, l2_term, _ = model._loss_and_grads(dense_X, targets, dropout=False, n_total=n,
                                                              step=model.step_count, **kw)
                J = data_loss + l2_term
                grad64[...] = model.grads
            else:
                J = 0.0
                grad64[...] = 0.0
                for s, e in spans:
                    frac = (e - s) / n
                    data_loss, l2_term, _ = model._loss_and_grads(
                        _rows(X, slice(s, e), model.dtype), targets[s:e], dropout=False, n_total=n,
                        step=model.step_count, m_l2=n, grad_scale=frac)
                    J += data_loss * frac
                    np.add(grad64, model.grads, out=grad64)
                J += l2_term
            model.state[...] = saved  # frozen during the line search
            if math.isfinite(J) and J < counter["best"][0]:
                counter["best"] = (J, np.array(theta, copy=True))
            return J, grad64.copy()

        it = {"n": 0}

        def callback(*args):
            it["n"] += 1
            if self.verbose:
                print("Iteration %d, loss = %.8f" % (it["n"], counter["best"][0]))

        theta0 = model.params.astype(np.float64)
        try:
            res = scipy.optimize.minimize(loss_grad, theta0, method="L-BFGS-B", jac=True, callback=callback,
                                          options={"maxfun": max_fun, "maxiter": int(self.max_iter),
                                                   "gtol": float(self.tol)})
            theta, fun, nit = res.x, float(res.fun), int(res.nit)
            if res.status != 0:
                warnings.warn(f"lbfgs failed to converge after {nit} iteration(s) (status={res.status}): "
                              f"{res.message}. Increase the number of iterations (max_iter) or the number of "
                              "function evaluations (max_fun), or scale the data.", ConvergenceWarning)
        except _MaxFun:
            best_J, theta = counter["best"]
            if theta is None:
                theta = model.params.astype(np.float64)
            fun, nit = best_J, it["n"]
            warnings.warn(f"lbfgs failed to converge after {nit} iteration(s): max_fun={max_fun} function "
                          "evaluations reached. Increase max_fun or scale the data.", ConvergenceWarning)
        self.n_iter_ = min(nit, int(self.max_iter))
        self.loss_ = fun
        model.params[...] = theta
        if has_bn:
            self._batchnorm_population_statistics(dense_X, targets, sw, n)
        self.t_ = getattr(self, "t_", 0)

    def _batchnorm_population_statistics(self, X, targets, sw, n) -> None:
        """After full-batch L-BFGS: running statistics := the full batch's statistics at the final parameters.

        One training-mode pass updates ``running = momentum*running + (1-momentum)*batch``; solving for
        ``batch`` gives every BatchNorm layer's exact full-batch mean and variance.
        """
        model = self.model_
        bns = [lay for lay in model.layers if isinstance(lay, BatchNorm)]
        before = [(lay.running_mean.astype(np.float64), lay.running_var.astype(np.float64)) for lay in bns]
        kw = {"weights": sw} if sw is not None else {}
        model._loss_and_grads(X, targets, dropout=False, n_total=n, step=model.step_count, **kw)
        for lay, (rm0, rv0) in zip(bns, before):
            mom = float(lay.momentum)
            lay.running_mean[...] = (lay.running_mean - mom * rm0) / (1.0 - mom)
            lay.running_var[...] = np.maximum((lay.running_var - mom * rv0) / (1.0 - mom), 0.0)

    # scikit-learn's private gradient helper (its test_mlp.py checks gradients through it)
    def _loss_grad_lbfgs(self, packed_coef_inter, X, y, sample_weight, *buffers):
        """Loss and gradient at scikit-learn's packed parameters (all ``coefs_`` then all ``intercepts_``).

        ``y`` is scikit-learn's binarised target matrix; the trailing work buffers are ignored.
        """
        model = self.model_
        order = self._sklearn_order()
        model.params[order] = packed_coef_inter
        X = _rows(X, slice(0, X.shape[0]), model.dtype)
        y = np.asarray(y)
        if y.ndim == 1:
            y = y.reshape(-1, 1)
        targets = self._targets(y)
        kw = {"weights": _check_sample_weight(sample_weight, X.shape[0])} if sample_weight is not None else {}
        saved = model.state.copy()
        data_loss, l2_term, _ = model._loss_and_grads(X, targets, dropout=False, n_total=X.shape[0],
                                                      step=model.step_count, **kw)
        model.state[...] = saved
        return data_loss + l2_term, model.grads[order].astype(np.float64)

    def _sklearn_order(self) -> np.ndarray:
        """Indices into ``model_.params`` in scikit-learn's packing order."""
        base = self.model_.params
        idx = []
        for arr in self.coefs_ + self.intercepts_:
            off = (arr.__array_interface__["data"][0] - base.__array_interface__["data"][0]) // base.itemsize
            idx.append(np.arange(off, off + arr.size))
        return np.concatenate(idx)

    # ------------------------------------------------------------ pickling
    def __getstate__(self):
        state = self.__dict__.copy()
        views = self._attributes_are_views()
        model = state.pop("model_", None)
        if views:  # rebuilt as views of the restored model (pickle would store independent copies)
            state.pop("coefs_", None)
            state.pop("intercepts_", None)
        if model is not None:
            state["_fastdl_model"] = {"config": model.get_config(), "backend": model.backend_name,
                                      "params": model.params.copy(), "state": model.state.copy(),
                                      "step_count": model.step_count}
        opt = state.get("optimizer_")
        if opt is not None and not isinstance(opt.backend, (str, type(None))):
            opt = copy.copy(opt)
            opt.backend = getattr(opt.backend, "name", None)
            state["optimizer_"] = opt
        return state

    def __setstate__(self, state):
        saved = state.pop("_fastdl_model", None)
        self.__dict__.update(state)
        if saved is not None:
            model = Sequential.from_config(saved["config"], backend=saved["backend"])
            model.params[...] = saved["params"]
            model.state[...] = saved["state"]
            model.step_count = saved["step_count"]
            self.model_ = model
            if "coefs_" not in state:
                self._bind_attributes()

    # ------------------------------------------------------------ misc
    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.sparse = True
        return tags


def _partial_fit_guard(est) -> bool:
    if est.solver == "lbfgs":
        raise AttributeError(f"partial_fit is only available for stochastic optimizers. {est.solver} is not "
                             "stochastic.")
    return True


_COMMON_DOC = """
    Parameters (scikit-learn's, same meaning)
    -----------------------------------------
    hidden_layer_sizes : int or sequence of int, default=(100,)
    activation : {'identity', 'logistic', 'tanh', 'relu'}, default='relu'
    solver : {'lbfgs', 'sgd', 'adam', 'rmsprop'}, default='adam'
        'sgd' uses scikit-learn's momentum rule (classical, or Nesterov with
        ``nesterovs_momentum=True``): the same updates. 'adam' differs in one
        place: ``epsilon`` is added to the bias-corrected ``sqrt(v_hat)``
        (scikit-learn adds it to the uncorrected ``sqrt(v)``). 'rmsprop'
        (fastdl's) uses ``beta_2`` and ``epsilon``. 'lbfgs' is full-batch
        L-BFGS (scipy) over the flat parameters.
    alpha : float, default=1e-4
        L2 strength: ``alpha/(2m)·Σ‖W‖²`` with ``m`` the mini-batch size (its
        summed ``sample_weight``), scikit-learn's definition.
    batch_size : int or 'auto', default='auto' (``min(200, n_samples)``)
    learning_rate : {'constant', 'invscaling', 'adaptive'}, default='constant'
        For 'sgd' (and 'rmsprop'). 'adaptive' is :class:`NoImprovementStopping`
        (a stateful callback): divide the rate by 5 after ``n_iter_no_change``
        epochs without improvement by ``tol``; stop below 1e-6.
    learning_rate_init, power_t, max_iter, shuffle, random_state, tol, verbose,
    warm_start, momentum, nesterovs_momentum, early_stopping, validation_fraction,
    beta_1, beta_2, epsilon, n_iter_no_change, max_fun
        As in scikit-learn (``max_fun`` is a strict cap on L-BFGS evaluations).

    fastdl's own
    ------------
    batchnorm : bool, default=False
        BatchNorm after every hidden Dense layer (the Dense layers then have no
        bias). ``coefs_[i]`` stay the Dense weights; ``intercepts_[i]`` of a
        hidden layer is its BatchNorm's ``beta`` (the shift that replaces the
        bias); ``gamma`` and the running statistics live in ``model_`` only, so
        ``coefs_``/``intercepts_`` alone do not reproduce the predictions.
        With 'lbfgs' the running statistics are the full training set's
        statistics at the final parameters (frozen during the line search).
    keep_prob : float or sequence of float, default=1.0
        Inverted dropout after each hidden activation (1.0 = off; 'lbfgs'
        trains without dropout).
    backend : {'auto', 'reference', 'numba', 'cython'}, default='auto'
    precision : {'fp32', 'bf16'}, default='fp32'
        bf16 GEMMs (operands rounded to bfloat16, float32 accumulation) on
        backends that support them; the network is then float32 whatever X's dtype.

    Attributes
    ----------
    coefs_, intercepts_ : list of ndarray
        Views of ``model_.params`` (writes go to the network).
    model_ : fastdl.Sequential
        The fitted network (its dtype is X's: float64 or float32).
    optimizer_ : fastdl optimizer (stochastic solvers)
    n_iter_, loss_, loss_curve_, best_loss_, validation_scores_,
    best_validation_score_, t_, n_features_in_, feature_names_in_, n_layers_,
    n_outputs_, out_activation_
        As in scikit-learn.
"""


class MLPClassifier(ClassifierMixin, _BaseMLP):
    """Multi-layer perceptron classifier: scikit-learn's ``MLPClassifier``, trained by fastdl.

    Binary (one logistic output), multiclass (softmax) and multilabel
    (one logistic output per label) targets; any hashable labels.
    """

    __doc__ += _COMMON_DOC
    _is_classifier = True

    def __init__(self, hidden_layer_sizes=(100,), activation="relu", *, solver="adam", alpha=0.0001,
                 batch_size="auto", learning_rate="constant", learning_rate_init=0.001, power_t=0.5,
                 max_iter=200, shuffle=True, random_state=None, tol=1e-4, verbose=False, warm_start=False,
                 momentum=0.9, nesterovs_momentum=True, early_stopping=False, validation_fraction=0.1,
                 beta_1=0.9, beta_2=0.999, epsilon=1e-8, n_iter_no_change=10, max_fun=15000,
                 batchnorm=False, keep_prob=1.0, backend="auto", precision="fp32"):
        self.hidden_layer_sizes = hidden_layer_sizes
        self.activation = activation
        self.solver = solver
        self.alpha = alpha
        self.batch_size = batch_size
        self.learning_rate = learning_rate
        self.learning_rate_init = learning_rate_init
        self.power_t = power_t
        self.max_iter = max_iter
        self.shuffle = shuffle
        self.random_state = random_state
        self.tol = tol
        self.verbose = verbose
        self.warm_start = warm_start
        self.momentum = momentum
        self.nesterovs_momentum = nesterovs_momentum
        self.early_stopping = early_stopping
        self.validation_fraction = validation_fraction
        self.beta_1 = beta_1
        self.beta_2 = beta_2
        self.epsilon = epsilon
        self.n_iter_no_change = n_iter_no_change
        self.max_fun = max_fun
        self.batchnorm = batchnorm
        self.keep_prob = keep_prob
        self.backend = backend
        self.precision = precision

    # ------------------------------------------------------------ targets
    def _fd_loss(self, n_out: int) -> str:
        return "softmax_cross_entropy" if self.out_activation_ == "softmax" else "binary_cross_entropy"

    def _out_activation(self) -> str:
        return "softmax" if self._label_binarizer.y_type_ == "multiclass" else "logistic"

    def _targets(self, Y: np.ndarray) -> np.ndarray:
        """Binarised Y -> what the fastdl loss takes: class ids (softmax) or 0/1 floats (logistic)."""
        dtype = self.model_.dtype if hasattr(self, "model_") else np.float64
        if self.out_activation_ == "softmax":
            return np.ascontiguousarray(np.argmax(Y, axis=1), dtype=np.int64)
        if Y.shape[1] == 1:
            return np.ascontiguousarray(Y[:, 0], dtype=dtype)
        return np.ascontiguousarray(Y, dtype=dtype)

    def _val_targets(self, Y_val):
        return self._label_binarizer.inverse_transform(Y_val)

    def _validate_input(self, X, y, incremental, reset):
        X, y = validate_data(self, X, y, accept_sparse=["csr", "csc"], multi_output=True,
                             dtype=(np.float64, np.float32), reset=reset)
        if y.ndim == 2 and y.shape[1] == 1:
            y = column_or_1d(y, warn=True)
        check_classification_targets(y)
        if (not hasattr(self, "classes_")) or (not self.warm_start and not incremental):
            self._label_binarizer = LabelBinarizer()
            self._label_binarizer.fit(y)
            self.classes_ = self._label_binarizer.classes_
        else:
            classes = unique_labels(y)
            if self.warm_start:
                if set(classes) != set(self.classes_):
                    raise ValueError("warm_start can only be used where `y` has the same classes as in the "
                                     f"previous call to fit. Previously got {self.classes_}, `y` has {classes}")
            elif len(np.setdiff1d(classes, self.classes_, assume_unique=True)):
                raise ValueError(f"`y` has classes not in `self.classes_`. `self.classes_` has {self.classes_}. "
                                 f"'y' has {classes}.")
        if not hasattr(self, "out_activation_") or reset:
            self.out_activation_ = self._out_activation()
        Y = self._label_binarizer.transform(y).astype(bool)
        return X, Y

    # ------------------------------------------------------------ API
    def fit(self, X, y, sample_weight=None):
        """Fit the network to data ``X`` and labels ``y`` (scikit-learn's semantics).

        Parameters
        ----------
        X : {array-like, sparse matrix} of shape (n_samples, n_features)
        y : array-like of shape (n_samples,) or (n_samples, n_labels) (multilabel indicator)
        sample_weight : array-like of shape (n_samples,), optional
            Weights each example's loss and gradient; the batch's loss and L2
            term are divided by its summed weights (scikit-learn's rule).
        """
        return self._fit(X, y, sample_weight=sample_weight, incremental=False)

    def _check_solver(self):
        return _partial_fit_guard(self)

    def partial_fit(self, X, y, sample_weight=None, classes=None):
        """One epoch over ``(X, y)``; ``classes`` is required on the first call (scikit-learn's rule)."""
        _partial_fit_guard(self)
        first = not hasattr(self, "classes_")
        if first:
            if classes is None:
                raise ValueError("classes must be passed on the first call to partial_fit.")
            self._label_binarizer = LabelBinarizer()
            if type_of_target(y).startswith("multilabel"):
                self._label_binarizer.fit(y)
            else:
                self._label_binarizer.fit(classes)
            self.classes_ = self._label_binarizer.classes_
        elif classes is not None and not np.array_equal(np.unique(classes), self.classes_):
            raise ValueError(f"`classes={np.unique(classes)}` is not the same as on the last call to "
                             f"partial_fit, was: {self.classes_}")
        return self._fit(X, y, sample_weight=sample_weight, incremental=True)

    def _proba_from_logits(self, Z: np.ndarray) -> np.ndarray:
        if self.out_activation_ == "softmax":
            Z = Z - Z.max(axis=1, keepdims=True)
            np.exp(Z, out=Z)
            Z /= Z.sum(axis=1, keepdims=True)
            return Z
        return expit(Z)

    def _check_X_predict(self, X):
        check_is_fitted(self)
        if not self._attributes_are_views():
            self._model_from_attributes()
        return validate_data(self, X, accept_sparse=["csr", "csc"], dtype=(np.float64, np.float32), reset=False)

    def _predict(self, X, check_input=True):
        if check_input:
            X = self._check_X_predict(X)
        y_pred = self._proba_from_logits(self._forward(X))
        if self.n_outputs_ == 1:
            y_pred = y_pred.ravel()
        return self._label_binarizer.inverse_transform(y_pred)

    def predict(self, X):
        """Predicted labels (n_samples,), or a 0/1 indicator matrix for multilabel."""
        return self._predict(X)

    def predict_proba(self, X):
        """Class probabilities (n_samples, n_classes) in ``classes_`` order."""
        X = self._check_X_predict(X)
        y_pred = self._proba_from_logits(self._forward(X))
        if self.n_outputs_ == 1:
            y_pred = y_pred.ravel()
            return np.vstack([1 - y_pred, y_pred]).T
        return y_pred

    def predict_log_proba(self, X):
        """``log(predict_proba(X))``."""
        p = self.predict_proba(X)
        return np.log(p, out=p)

    def _score(self, X, y, sample_weight=None):
        y_pred = self._predict(X, check_input=False)
        if np.issubdtype(y_pred.dtype, np.floating) and not np.isfinite(y_pred).all():
            return np.nan
        return accuracy_score(y, y_pred, sample_weight=sample_weight)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.classifier_tags.multi_label = True
        return tags


class MLPRegressor(RegressorMixin, _BaseMLP):
    """Multi-layer perceptron regressor: scikit-learn's ``MLPRegressor``, trained by fastdl.

    ``loss='squared_error'`` (default): ``½‖ŷ - y‖²``, identity output.
    ``loss='poisson'`` (scikit-learn >= 1.7): the half Poisson deviance with
    a log link, ``out_activation_ = 'exp'`` (``predict`` returns
    ``exp(z)``); targets must be ``>= 0``. ``loss_`` is scikit-learn's
    (``poisson_loss``, including its constant ``xlogy(y, y) - y``).
    Single or multiple outputs.
    """

    __doc__ += _COMMON_DOC

    def __init__(self, loss="squared_error", hidden_layer_sizes=(100,), activation="relu", *, solver="adam",
                 alpha=0.0001, batch_size="auto", learning_rate="constant", learning_rate_init=0.001,
                 power_t=0.5, max_iter=200, shuffle=True, random_state=None, tol=1e-4, verbose=False,
                 warm_start=False, momentum=0.9, nesterovs_momentum=True, early_stopping=False,
                 validation_fraction=0.1, beta_1=0.9, beta_2=0.999, epsilon=1e-8, n_iter_no_change=10,
                 max_fun=15000, batchnorm=False, keep_prob=1.0, backend="auto", precision="fp32"):
        self.loss = loss
        self.hidden_layer_sizes = hidden_layer_sizes
        self.activation = activation
        self.solver = solver
        self.alpha = alpha
        self.batch_size = batch_size
        self.learning_rate = learning_rate
        self.learning_rate_init = learning_rate_init
        self.power_t = power_t
        self.max_iter = max_iter
        self.shuffle = shuffle
        self.random_state = random_state
        self.tol = tol
        self.verbose = verbose
        self.warm_start = warm_start
        self.momentum = momentum
        self.nesterovs_momentum = nesterovs_momentum
        self.early_stopping = early_stopping
        self.validation_fraction = validation_fraction
        self.beta_1 = beta_1
        self.beta_2 = beta_2
        self.epsilon = epsilon
        self.n_iter_no_change = n_iter_no_change
        self.max_fun = max_fun
        self.batchnorm = batchnorm
        self.keep_prob = keep_prob
        self.backend = backend
        self.precision = precision

    def _validate_hyperparameters(self):
        if not isinstance(self.loss, str) or self.loss not in LOSSES:
            raise ValueError(f"The 'loss' parameter of {type(self).__name__} must be a str among "
                             f"{sorted(LOSSES)}. Got {self.loss!r} instead.")
        return super()._validate_hyperparameters()

    def _fd_loss(self, n_out: int) -> str:
        return LOSSES[self.loss]

    def _out_activation(self) -> str:
        return "exp" if self.loss == "poisson" else "identity"

    def _targets(self, Y: np.ndarray) -> np.ndarray:
        dtype = self.model_.dtype if hasattr(self, "model_") else np.float64
        return np.ascontiguousarray(Y, dtype=dtype)

    def _val_targets(self, Y_val):
        return Y_val[:, 0] if Y_val.shape[1] == 1 else Y_val

    def _validate_input(self, X, y, incremental, reset):
        X, y = validate_data(self, X, y, accept_sparse=["csr", "csc"], multi_output=True, y_numeric=True,
                             dtype=(np.float64, np.float32), reset=reset)
        if y.ndim == 2 and y.shape[1] == 1:
            y = column_or_1d(y, warn=True)
        if self.loss == "poisson" and (y < 0).any():
            # scikit-learn's GLMs' message (its MLP would train on NaN losses); the log link needs y >= 0
            raise ValueError(f"Some value(s) of y are out of the valid range of the loss 'poisson': y must be "
                             f">= 0, got {int(np.count_nonzero(y < 0))} negative value(s).")
        if not hasattr(self, "out_activation_") or reset:
            self.out_activation_ = self._out_activation()
        return X, y

    def fit(self, X, y, sample_weight=None):
        """Fit the network to ``X`` and targets ``y`` (n_samples,) or (n_samples, n_outputs)."""
        return self._fit(X, y, sample_weight=sample_weight, incremental=False)

    def _check_solver(self):
        return _partial_fit_guard(self)

    def partial_fit(self, X, y, sample_weight=None):
        """One epoch over ``(X, y)`` (stochastic solvers only)."""
        _partial_fit_guard(self)
        return self._fit(X, y, sample_weight=sample_weight, incremental=True)

    def _predict(self, X, check_input=True):
        if check_input:
            check_is_fitted(self)
            if not self._attributes_are_views():
                self._model_from_attributes()
            X = validate_data(self, X, accept_sparse=["csr", "csc"], dtype=(np.float64, np.float32), reset=False)
        y_pred = self._forward(X)
        if self.out_activation_ == "exp":   # loss='poisson': the log link's rate
            with np.errstate(over="ignore"):
                np.exp(y_pred, out=y_pred)
        return y_pred.ravel() if y_pred.shape[1] == 1 else y_pred

    def predict(self, X):
        """Predicted values (n_samples,) or (n_samples, n_outputs), in the model's dtype."""
        return self._predict(X)

    def _score(self, X, y, sample_weight=None):
        y_pred = self._predict(X, check_input=False)
        if not np.isfinite(y_pred).all():
            return np.nan
        return r2_score(y, y_pred, sample_weight=sample_weight)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.positive_only = self.loss == "poisson"
        return tags


# scikit-learn's convention: no partial_fit attribute when solver='lbfgs' (hasattr(est, "partial_fit") is False)
for _cls in (MLPClassifier, MLPRegressor):
    _cls.partial_fit = available_if(lambda est: est._check_solver())(_cls.partial_fit)
del _cls
