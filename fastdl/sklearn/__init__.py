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

The package's modules, one job each: ``_common`` (the scikit-learn import,
constants, helpers), ``_callbacks`` (:class:`NoImprovementStopping`),
``_base`` (``_BaseMLP``: validation, the network, fitting, pickling),
``_stochastic`` and ``_lbfgs`` (the solvers, mixed into ``_BaseMLP``),
``_classifier`` and ``_regressor`` (the estimators).

Unpickling an estimator runs code like any pickle: load only pickles you
trust. fastdl's own model files (``model_.save``) stay pickle-free.
"""
from __future__ import annotations

from . import _common  # noqa: F401  (first: a clear ImportError without scikit-learn)
from ._base import _BaseMLP  # noqa: F401  (tests patch fastdl.sklearn._BaseMLP._use_epoch_executor)
from ._callbacks import NoImprovementStopping
from ._classifier import MLPClassifier
from ._common import _Diverged, _MaxFun  # noqa: F401  (fastdl.sklearn.<name> as before the package split)
from ._regressor import MLPRegressor
from ._stochastic import _OptimizerView, _ScikitSGD  # noqa: F401  (importable as before the split)

# Pickles name a class by module and qualified name: the classes an estimator's pickle can hold keep the
# public path fastdl.sklearn.<Name> (that of pickles written before fastdl/sklearn.py became a package).
for _cls in (MLPClassifier, MLPRegressor, NoImprovementStopping, _ScikitSGD):
    _cls.__module__ = __name__
del _cls

__all__ = ["MLPClassifier", "MLPRegressor", "NoImprovementStopping"]
