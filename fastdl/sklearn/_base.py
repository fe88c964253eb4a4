"""``_BaseMLP``: what :class:`MLPClassifier` and :class:`MLPRegressor` share (validation, the network,
fitting, pickling); the solvers are the mixins of ``_stochastic`` and ``_lbfgs``."""
from __future__ import annotations

import copy
import numbers
from typing import Any

import numpy as np
import scipy.sparse as sp
from sklearn.base import BaseEstimator
from sklearn.utils import check_random_state

from ..layers import BatchNorm, Dense, Dropout
from ..model import Sequential
from ._common import (ACTIVATIONS, LEARNING_RATES, NONFINITE_MSG, PREDICT_CHUNK, SOLVERS, _check_sample_weight,
                      _rows)
from ._lbfgs import _LBFGSSolver
from ._stochastic import _StochasticSolver


class _BaseMLP(_StochasticSolver, _LBFGSSolver, BaseEstimator):
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
            if self.model_.loss.name != self._fd_loss(Y.shape[1]):   # MLPRegressor's loss changed by set_params
                raise ValueError(f"loss={getattr(self, 'loss', None)!r} but the fitted network was trained on "
                                 f"fastdl's {self.model_.loss.name!r}: continuing (warm_start / partial_fit) "
                                 "needs the same loss; set warm_start=False to train a new network")
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
