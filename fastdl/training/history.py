"""What :func:`fastdl.training.fit` records, and the error it raises when training diverges."""
from __future__ import annotations


class TrainingDiverged(FloatingPointError):
    """The cost, gradients, parameters or BatchNorm statistics became NaN or infinite.

    When it is raised, the model's parameters and BatchNorm statistics, the
    optimiser's state (``v``, ``s``, ``t``) and ``model.step_count`` are all
    those of the start of the failing epoch (the last finite state fit saw).
    ``epoch`` and ``step`` number the failing epoch and its mini-batch from 1,
    as the progress display and ``verbose`` lines do (``None`` if unknown).
    """

    def __init__(self, message: str, *, epoch: int | None = None, step: int | None = None):
        super().__init__(message)
        self.epoch = epoch
        self.step = step


class History:
    """What :func:`fit` records.

    ``history`` maps ``'loss'``, ``'error'`` (training mini-batches, training
    mode, mean data loss without the L2 term), ``'cost'`` (mean ``J``
    including L2), ``'val_loss'``, ``'val_error'`` (inference mode on the
    validation set) and ``'lr'`` to per-epoch lists; ``batch_cost`` is ``J`` of
    every mini-batch (what the course plots); ``epoch`` the epoch numbers
    (from 0, ``initial_epoch`` first). ``time`` is the training time in
    seconds, without ``compile_time`` (the one-time compilation of the
    Numba kernels before the first epoch, 0 for compiled-ahead backends).
    """

    def __init__(self) -> None:
        self.history: dict[str, list[float]] = {}
        self.batch_cost: list[float] = []
        self.epoch: list[int] = []
        self.time: float = 0.0
        self.compile_time: float = 0.0
        #: per parameter array: {'weight': [norm per epoch], 'grad': [norm of the epoch's last batch gradient]}
        self.norms: dict[str, dict[str, list[float]]] = {}

    def record(self, epoch: int, logs: dict[str, float]) -> None:
        """Append one epoch's logs."""
        self.epoch.append(epoch)
        for k, v in logs.items():
            self.history.setdefault(k, []).append(float(v))

    def __getitem__(self, key: str) -> list[float]:
        return self.history[key]

    def __repr__(self) -> str:
        last = {k: round(v[-1], 5) for k, v in self.history.items() if v}
        return f"History(epochs={len(self.epoch)}, last={last})"
