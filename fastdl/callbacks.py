"""Callbacks hooked into :func:`fastdl.training.fit` (defined in :mod:`fastdl.training.callbacks`).

See that module for the hooks, the built-in callbacks fit adds and the rule
that matches checkpointed callback states to the callbacks of a resumed fit.
"""
from .training.callbacks import Callback, Checkpointer, EarlyStopping, NormRecorder, ProgressBar, is_stateful

__all__ = ["Callback", "Checkpointer", "EarlyStopping", "NormRecorder", "ProgressBar", "is_stateful"]
