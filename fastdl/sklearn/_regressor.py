"""``MLPRegressor``: scikit-learn's MLP regressor (squared error or Poisson) trained by fastdl."""
from __future__ import annotations

import numpy as np
from sklearn.base import RegressorMixin
from sklearn.metrics import r2_score
from sklearn.utils.metaestimators import available_if
from sklearn.utils.validation import check_is_fitted, column_or_1d, validate_data

from ._base import _COMMON_DOC, _BaseMLP
from ._common import LOSSES, _partial_fit_guard


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
                             f"{{{', '.join(map(repr, LOSSES))}}}. Got {self.loss!r} instead.")
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

    @available_if(lambda est: est._check_solver())   # no partial_fit attribute with 'lbfgs' (scikit-learn's rule)
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
