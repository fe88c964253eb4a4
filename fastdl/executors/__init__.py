"""Executors of a :class:`fastdl.plan.Plan`.

* :mod:`fastdl.executors.per_layer`: the plan op by op through the kernel
  contract (every backend, the reference included); the readable one, and
  the path every whole-epoch executor is tested bit-identical against.
* Whole-epoch executors live with their backends (``backend.epoch_executor``).
"""
from __future__ import annotations

from .per_layer import PerLayerExecutor, sync_batchnorm_backward, sync_batchnorm_forward

__all__ = ["PerLayerExecutor", "sync_batchnorm_backward", "sync_batchnorm_forward"]
