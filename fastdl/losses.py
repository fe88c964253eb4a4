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

    def __call__(self, K, Z: np.ndarray, y: np.ndarray, dZ: np.ndarray) -> float:
        """Mean loss over the rows of ``Z``; writes ``dZ`` unless it is empty."""
        return getattr(K, self.kernel)(Z, y, dZ)

    def proba(self, K, Z: np.ndarray) -> np.ndarray:
        raise TypeError(f"loss {self.name!r} has no class probabilities")

    def predict_from_outputs(self, Z: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def count_errors(self, Z: np.ndarray, y: np.ndarray, pred: np.ndarray, wrong: np.ndarray) -> int:
        """Misclassified rows, using the caller's int64 ``pred`` and bool ``wrong`` buffers (no allocation)."""
        raise TypeError(f"loss {self.name!r} has no classification error")


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

    def count_errors(self, Z, y, pred, wrong):
        Z.argmax(axis=1, out=pred)   # ndarray methods and ufuncs: no Python-level wrappers per step
        np.not_equal(pred, y, out=wrong)
        return int(wrong.sum())


class BinaryCrossEntropy(Loss):
    name = "binary_cross_entropy"
    kernel = "sigmoid_bce"

    def check_output_dim(self, n_out):
        if n_out != 1:
            raise ValueError(f"binary_cross_entropy needs a last layer with 1 output, got {n_out}")

    def prepare_targets(self, y, m, n_out, dtype):
        return V.as_binary_labels(y, m, dtype)

    def proba(self, K, Z):
        p1 = np.empty_like(Z)
        K.activation_forward(Z, 3, p1)  # sigmoid
        return np.hstack([1 - p1, p1])  # (m, 2) like scikit-learn

    def predict_from_outputs(self, Z):
        return (Z[:, 0] > 0).astype(np.int64)

    def count_errors(self, Z, y, pred, wrong):
        np.greater(Z[:, 0], 0, out=wrong)
        np.not_equal(wrong, y, out=wrong)
        return int(np.count_nonzero(wrong))


class MeanSquaredError(Loss):
    name = "mse"
    kernel = "mse"
    classifier = False

    def prepare_targets(self, y, m, n_out, dtype):
        return V.as_regression_targets(y, m, n_out, dtype)

    def predict_from_outputs(self, Z):
        return Z.copy()


LOSSES: dict[str, type[Loss]] = {
    "softmax_cross_entropy": SoftmaxCrossEntropy,
    "binary_cross_entropy": BinaryCrossEntropy,
    "sigmoid_bce": BinaryCrossEntropy,
    "mse": MeanSquaredError,
}


def get_loss(name: str) -> Loss:
    """Loss object for ``name`` ('softmax_cross_entropy', 'binary_cross_entropy', 'mse')."""
    if isinstance(name, Loss):
        return name
    V.check_choice("loss", name, LOSSES)
    return LOSSES[name]()
