"""Training: :func:`fit` (the epoch loop), the epoch runners, the built-in callbacks and :class:`History`.

* :mod:`fastdl.training.fit` - ``fit`` itself;
* :mod:`fastdl.training.runners` - one epoch runner per execution mode (per-layer, fused epoch,
  augment, data-parallel), all returning an :class:`EpochResult`;
* :mod:`fastdl.training.callbacks` - the callback API and the built-in callbacks (progress, norms,
  checkpoints, early stopping), re-exported by :mod:`fastdl.callbacks`;
* :mod:`fastdl.training.history` - :class:`History` and :class:`TrainingDiverged`.
"""
from .history import History, TrainingDiverged
from .runners import EpochResult
from .fit import fit

__all__ = ["EpochResult", "History", "TrainingDiverged", "fit"]
