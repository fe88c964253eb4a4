"""Loss functions: target validation, the fused loss+gradient kernel, and predictions.

Every loss takes the last layer's *raw outputs* (logits for the two
cross-entropies) and applies its own output function, as in PyTorch's
``CrossEntropyLoss`` / ``BCEWithLogitsLoss``.
"""
from __future__ import annotations

import numpy as np

from . import _validation as V


class Loss:
    name: str = ""
    kernel: str = ""
    classifier: bool = True

    def check_output_dim(self, n_out: int) -> None:
        pass

    def prepare_targets(self, y, m: int, n_out: int, dtype: np.dtype) -> np.ndarray:
        raise NotImplementedError

    def __call__(self, K, Z: np.ndarray, y: np.ndarray, dZ: np.ndarray, w: np.ndarray | None = None) -> float:
        """Mean (with float64 weights ``w``: weighted mean) loss over the rows of ``Z``; writes ``dZ``
        unless it is empty. Training runs the loss through the plan (``fastdl.plan.LOSS_KERNELS``)."""
        if w is None:
            return getattr(K, self.kernel)(Z, y, dZ)
        return getattr(K, self.kernel)(Z, y, dZ, w)

    def proba(self, K, Z: np.ndarray) -> np.ndarray:
        raise TypeError(f"loss {self.name!r} has no class probabilities")

    def predict_from_outputs(self, Z: np.ndarray) -> np.ndarray:
        raise NotImplementedError


class SoftmaxCrossEntropy(Loss):
    name = "softmax_cross_entropy"
    kernel = "softmax_cross_entropy"

    def check_output_dim(self, n_out):
        if n_out < 2:
            raise ValueError("softmax_cross_entropy needs a last layer with >= 2 outputs; "
                             "for two classes with one output use loss='binary_cross_entropy'")

    def prepare_targets(self, y, m, n_out, dtype):
        return V.as_class_labels(y, m, n_out)

    def proba(self, K, Z):
        out = np.empty_like(Z)
        K.softmax(Z, out)
        return out

    def predict_from_outputs(self, Z):
        return Z.argmax(axis=1)


class BinaryCrossEntropy(Loss):
    """Sigmoid + binary cross-entropy on logits; ``k`` outputs are ``k`` independent labels (multilabel).

    One output: targets ``(m,)`` in {0, 1}, ``proba`` ``(m, 2)``. ``k > 1``: targets
    ``(m, k)`` in {0, 1}, a row's loss is the sum over its outputs (scikit-learn's
    multilabel log-loss), ``proba`` ``(m, k)`` and a row counts as an error if any
    of its labels is wrong (subset accuracy).
    """

    name = "binary_cross_entropy"
    kernel = "sigmoid_bce"

    def check_output_dim(self, n_out):
        if n_out < 1:
            raise ValueError(f"binary_cross_entropy needs a last layer with >= 1 outputs, got {n_out}")

    def prepare_targets(self, y, m, n_out, dtype):
        if n_out == 1:
            return V.as_binary_labels(y, m, dtype)
        if hasattr(y, "to_numpy"):
            y = y.to_numpy()
        arr = np.asarray(y)
        if arr.shape != (m, n_out):
            raise ValueError(f"y must have shape ({m}, {n_out}) (one 0/1 column per output) for "
                             f"binary_cross_entropy with {n_out} outputs, got {arr.shape}")
        if arr.dtype == object or arr.dtype.kind not in "biuf":
            raise TypeError(f"y must hold 0/1 numbers for binary_cross_entropy, got dtype {arr.dtype}")
        if not np.isin(arr, (0, 1)).all():
            raise ValueError("y must hold only 0 and 1 for binary cross-entropy; found values such as "
                             f"{arr[~np.isin(arr, (0, 1))][:3].tolist()}")
        return np.ascontiguousarray(arr, dtype=dtype)

    def proba(self, K, Z):
        p1 = np.empty_like(Z)
        K.activation_forward(Z, 3, p1)  # sigmoid
        if Z.shape[1] > 1:
            return p1  # (m, k): one probability per label
        return np.hstack([1 - p1, p1])  # (m, 2) like scikit-learn

    def predict_from_outputs(self, Z):
        if Z.shape[1] > 1:
            return (Z > 0).astype(np.int64)
        return (Z[:, 0] > 0).astype(np.int64)


class MeanSquaredError(Loss):
    name = "mse"
    kernel = "mse"
    classifier = False

    def prepare_targets(self, y, m, n_out, dtype):
        return V.as_regression_targets(y, m, n_out, dtype)

    def predict_from_outputs(self, Z):
        return Z.copy()


class Poisson(Loss):
    """Poisson regression with the log link: the prediction is ``exp(z)`` (a rate), targets are counts.

    The loss of one output is the half Poisson deviance
    ``exp(z) - y*z + (xlogy(y, y) - y)``, >= 0 and 0 at ``exp(z) = y``
    (scikit-learn's ``MLPRegressor(loss='poisson')``'s ``loss_``; PyTorch's
    ``PoissonNLLLoss(log_input=True)`` and Keras' ``Poisson`` leave out the
    constant ``xlogy(y, y) - y``, which has no gradient). A row's loss is the
    sum over its ``k`` outputs; ``dZ = (exp(z) - y) / m``. Targets must be
    finite and ``>= 0``.
    """

    name = "poisson"
    kernel = "poisson"
    classifier = False

    def prepare_targets(self, y, m, n_out, dtype):
        Y = V.as_regression_targets(y, m, n_out, dtype, loss="poisson")
        neg = Y < 0
        if neg.any():
            raise ValueError("y must be >= 0 for loss='poisson' (counts or rates; the prediction exp(z) is "
                             f"positive); found {int(neg.sum())} negative value(s) such as "
                             f"{Y[neg][:3].tolist()}")
        return Y

    def predict_from_outputs(self, Z):
        # the rate exp(z); an overflow to inf is the honest answer for z > log(max float)
        with np.errstate(over="ignore"):
            return np.exp(Z)


LOSSES: dict[str, type[Loss]] = {
    "softmax_cross_entropy": SoftmaxCrossEntropy,
    "binary_cross_entropy": BinaryCrossEntropy,
    "sigmoid_bce": BinaryCrossEntropy,
    "mse": MeanSquaredError,
    "poisson": Poisson,
}


def get_loss(name: str) -> Loss:
    """Loss object for ``name`` ('softmax_cross_entropy', 'binary_cross_entropy', 'mse', 'poisson')."""
    if isinstance(name, Loss):
        return name
    V.check_choice("loss", name, LOSSES)
    return LOSSES[name]()
