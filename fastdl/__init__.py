"""fastdl: fast CPU training of dense neural networks.

>>> import fastdl as fd
>>> model = fd.Sequential([fd.Dense(64, 32), fd.ReLU(), fd.Dense(32, 10)], seed=0)
"""
from __future__ import annotations

__version__ = "0.1.0"

from . import augment, backends, data, datasets, plotting, schedules
from .augment import Augmenter
from .backends import get_backend
from .callbacks import Callback, EarlyStopping
from .diagnose import Diagnosis, diagnose
from .gradcheck import GradcheckReport, gradcheck
from .io import ModelFileError, load_model as load
from .layers import BatchNorm, Dense, Dropout, Identity, ReLU, Sigmoid, Tanh
from .model import Sequential
from .optim import SGD, Adam, ClassicalMomentum, Momentum, Optimizer, RMSprop
from .search import Choice, IntUniform, LogUniform, OneMinusLogUniform, SearchResult, Uniform, search
from .smoothing import EWA, ewa
from .training import History, TrainingDiverged

__all__ = [
    "Adam", "BatchNorm", "Callback", "ClassicalMomentum", "Dense", "Dropout", "EarlyStopping", "GradcheckReport",
    "History",
    "Identity", "ModelFileError", "Momentum", "Optimizer", "RMSprop", "ReLU", "SGD", "Sequential", "Sigmoid",
    "Tanh", "TrainingDiverged", "backends", "data", "datasets", "get_backend", "gradcheck", "load",
    "schedules",
    # practitioner's toolkit (fd.search and fd.diagnose are the functions; their modules are
    # fastdl.search / fastdl.diagnose: `from fastdl.search import LogUniform`)
    "Augmenter", "Choice", "Diagnosis", "EWA", "IntUniform", "LogUniform", "OneMinusLogUniform", "SearchResult",
    "Uniform", "augment", "diagnose", "ewa", "plotting", "search",
]
