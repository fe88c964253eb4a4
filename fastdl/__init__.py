"""fastdl: fast CPU training of dense neural networks.

>>> import fastdl as fd
>>> model = fd.Sequential([fd.Dense(64, 32), fd.ReLU(), fd.Dense(32, 10)], seed=0)
"""
from __future__ import annotations

__version__ = "0.1.0"

from . import backends, data, datasets, schedules
from .backends import get_backend
from .callbacks import Callback, EarlyStopping
from .gradcheck import GradcheckReport, gradcheck
from .io import ModelFileError, load_model as load
from .layers import BatchNorm, Dense, Dropout, Identity, ReLU, Sigmoid, Tanh
from .model import Sequential
from .optim import SGD, Adam, Momentum, Optimizer, RMSprop
from .training import History, TrainingDiverged

__all__ = [
    "Adam", "BatchNorm", "Callback", "Dense", "Dropout", "EarlyStopping", "GradcheckReport", "History",
    "Identity", "ModelFileError", "Momentum", "Optimizer", "RMSprop", "ReLU", "SGD", "Sequential", "Sigmoid",
    "Tanh", "TrainingDiverged", "backends", "data", "datasets", "get_backend", "gradcheck", "load",
    "schedules",
]
