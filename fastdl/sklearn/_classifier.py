"""``MLPClassifier``: scikit-learn's MLP classifier trained by fastdl."""
from __future__ import annotations

import numpy as np
from scipy.special import expit
from sklearn.base import ClassifierMixin
from sklearn.metrics import accuracy_score
from sklearn.preprocessing import LabelBinarizer
from sklearn.utils.metaestimators import available_if
from sklearn.utils.multiclass import check_classification_targets, type_of_target, unique_labels
from sklearn.utils.validation import check_is_fitted, column_or_1d, validate_data

from ._base import _COMMON_DOC, _BaseMLP
from ._common import _partial_fit_guard


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

    @available_if(lambda est: est._check_solver())   # no partial_fit attribute with 'lbfgs' (scikit-learn's rule)
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
