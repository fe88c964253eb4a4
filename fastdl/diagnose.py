"""Bias / variance diagnosis (docs/spec.md "Bias / variance diagnosis", notes 1.2-1.3).

>>> import fastdl as fd
>>> d = fd.diagnose(train_error=0.01, dev_error=0.11)
>>> d.verdict
'high variance'
>>> d.recommendations[0]
'get more training data'

The rule
--------
``avoidable_bias = train_error - optimal_error`` and
``variance = dev_error - train_error``. A gap is *high* when it is larger
than ``threshold`` (an absolute difference of error rates, default 0.02 =
2 percentage points; a pair ``(bias_threshold, variance_threshold)`` sets
them separately). With the default the SPEC examples come out as the notes
say: (1%, 11%) high variance; (15%, 16%) high bias; (15%, 30%) both;
(0.5%, 1%) neither; and with an optimal error of 15%, (15%, 16%) neither.

Errors are fractions in [0, 1] (0.11 for 11%), as ``model.evaluate`` returns.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from typing import Any, Mapping

__all__ = ["Diagnosis", "diagnose", "DEFAULT_THRESHOLD", "HIGH_BIAS", "HIGH_VARIANCE", "HIGH_BIAS_AND_VARIANCE",
           "NEITHER", "BIAS_RECOMMENDATIONS", "VARIANCE_RECOMMENDATIONS"]

DEFAULT_THRESHOLD = 0.02

HIGH_BIAS = "high bias"
HIGH_VARIANCE = "high variance"
HIGH_BIAS_AND_VARIANCE = "high bias and high variance"
NEITHER = "neither"

#: Fix bias first (SPEC order): bigger network, train longer, another architecture.
BIAS_RECOMMENDATIONS: tuple[str, ...] = (
    "use a bigger network (more hidden layers or more units per layer)",
    "train longer (more epochs, or a better optimiser such as Adam, or a tuned learning rate)",
    "try another architecture",
)
#: Then variance: more data, regularisation (L2, dropout, augmentation), another architecture.
VARIANCE_RECOMMENDATIONS: tuple[str, ...] = (
    "get more training data",
    "regularise: increase L2 (l2=...)",
    "regularise: add dropout (lower keep_prob)",
    "regularise: augment the data (fit(..., augment=fd.augment.Augmenter(...)))",
    "try another architecture",
)


def _error(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number (a fraction such as 0.11 for 11%), got {type(value).__name__}")
    v = float(value)
    if not 0.0 <= v <= 1.0:  # also rejects NaN
        hint = f" (did you mean {v / 100:g}?)" if 1.0 < v <= 100.0 else ""
        raise ValueError(f"{name} must be an error rate in [0, 1], got {value!r}{hint}")
    return v


def _thresholds(threshold: Any) -> tuple[float, float]:
    pair = tuple(threshold) if isinstance(threshold, (tuple, list)) else (threshold, threshold)
    if len(pair) != 2:
        raise ValueError(f"threshold must be a number or a pair (bias, variance), got {threshold!r}")
    out = []
    for name, t in zip(("bias threshold", "variance threshold"), pair):
        if isinstance(t, bool) or not isinstance(t, numbers.Real) or not 0.0 <= float(t) < 1.0:
            raise ValueError(f"{name} must be a number in [0, 1), got {t!r}")
        out.append(float(t))
    return out[0], out[1]


@dataclass(frozen=True)
class Diagnosis:
    """The result of :func:`diagnose`.

    Attributes
    ----------
    train_error, dev_error, optimal_error : float
    avoidable_bias : float
        ``train_error - optimal_error``.
    variance : float
        ``dev_error - train_error``.
    high_bias, high_variance : bool
        ``avoidable_bias > bias_threshold``, ``variance > variance_threshold``.
    verdict : str
        ``'high bias'``, ``'high variance'``, ``'high bias and high variance'``
        or ``'neither'``.
    recommendations : tuple of str
        What to try, in order: bias remedies first, then variance remedies.
    bias_threshold, variance_threshold : float
    notes : tuple of str
        Remarks on unusual inputs (train error below the optimal error, dev
        error below the train error).
    """

    train_error: float
    dev_error: float
    optimal_error: float
    avoidable_bias: float
    variance: float
    high_bias: bool
    high_variance: bool
    verdict: str
    recommendations: tuple[str, ...]
    bias_threshold: float
    variance_threshold: float
    notes: tuple[str, ...] = field(default=())

    @classmethod
    def from_errors(cls, train_error: float, dev_error: float, optimal_error: float = 0.0, *,
                    threshold: "float | tuple[float, float]" = DEFAULT_THRESHOLD) -> "Diagnosis":
        """Diagnose from train, dev and optimal (Bayes / human) error rates."""
        tr = _error("train_error", train_error)
        dv = _error("dev_error", dev_error)
        opt = _error("optimal_error", optimal_error)
        tb, tv = _thresholds(threshold)
        bias, var = tr - opt, dv - tr
        # Compare rounded gaps so 0.15 - 0.13 == 0.02 is "not above 0.02" despite float noise.
        high_bias = round(bias, 12) > tb
        high_var = round(var, 12) > tv
        if high_bias and high_var:
            verdict = HIGH_BIAS_AND_VARIANCE
        elif high_bias:
            verdict = HIGH_BIAS
        elif high_var:
            verdict = HIGH_VARIANCE
        else:
            verdict = NEITHER
        recs: list[str] = []
        if high_bias:
            recs.extend(BIAS_RECOMMENDATIONS)
        if high_var:
            recs.extend(r for r in VARIANCE_RECOMMENDATIONS if r not in recs)
        notes = []
        if bias < 0:
            notes.append(f"train error is {-bias:.2%} below the optimal error: the optimal (Bayes/human) "
                         "error estimate may be too high, or the model memorises the training set")
        if var < 0:
            notes.append(f"dev error is {-var:.2%} below the train error: a small or easier dev set "
                         "(or, from a History, a train error measured in training mode with dropout on)")
        return cls(tr, dv, opt, bias, var, high_bias, high_var, verdict, tuple(recs), tb, tv, tuple(notes))

    @classmethod
    def from_history(cls, history: Any, optimal_error: float = 0.0, *, epoch: int = -1,
                     threshold: "float | tuple[float, float]" = DEFAULT_THRESHOLD) -> "Diagnosis":
        """Diagnose from a :class:`fastdl.History` of ``fit(..., validation_data=...)``.

        Uses ``history['error']`` and ``history['val_error']`` at ``epoch``
        (default: the last). Note that ``error`` is measured on the training
        mini-batches during the epoch, in training mode (dropout on); for the
        textbook numbers evaluate the trained model on the train and dev sets
        (:meth:`from_model`).
        """
        h = getattr(history, "history", history)
        if not isinstance(h, Mapping):
            raise TypeError(f"expected a fastdl History (or its .history dict), got {type(history).__name__}")
        for key in ("error", "val_error"):
            if not h.get(key):
                raise ValueError(f"the history has no {key!r}: train a classifier with "
                                 "fit(..., validation_data=(X_dev, y_dev))")
        try:
            tr, dv = h["error"][epoch], h["val_error"][epoch]
        except IndexError:
            raise ValueError(f"epoch {epoch} out of range for a history of {len(h['error'])} epochs") from None
        return cls.from_errors(tr, dv, optimal_error, threshold=threshold)

    @classmethod
    def from_model(cls, model: Any, train_data: tuple[Any, Any], dev_data: tuple[Any, Any],
                   optimal_error: float = 0.0, *,
                   threshold: "float | tuple[float, float]" = DEFAULT_THRESHOLD) -> "Diagnosis":
        """Evaluate a trained classifier (inference mode) on ``(X_train, y_train)`` and ``(X_dev, y_dev)``."""
        tr = model.evaluate(*train_data)
        dv = model.evaluate(*dev_data)
        if "error" not in tr:
            raise ValueError("diagnosis needs error rates: the model is not a classifier")
        return cls.from_errors(tr["error"], dv["error"], optimal_error, threshold=threshold)

    # ----------------------------------------------------------------- output
    def as_dict(self) -> dict[str, Any]:
        """Plain data (JSON-able)."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}

    def __str__(self) -> str:
        tb, tv = self.bias_threshold, self.variance_threshold
        lines = [
            f"bias/variance diagnosis: {self.verdict}" + (" (no high bias, no high variance)"
                                                          if self.verdict == NEITHER else ""),
            f"  train error {self.train_error:.2%}, dev error {self.dev_error:.2%}, "
            f"optimal error {self.optimal_error:.2%}",
            f"  avoidable bias {self.avoidable_bias:+.2%} ({'high' if self.high_bias else 'ok'}, "
            f"threshold {tb:.2%})",
            f"  variance       {self.variance:+.2%} ({'high' if self.high_variance else 'ok'}, "
            f"threshold {tv:.2%})",
        ]
        lines += [f"  note: {n}" for n in self.notes]
        if self.recommendations:
            both = self.high_bias and self.high_variance
            lines.append("  try, in order" + (" (fix bias first, then variance):" if both else ":"))
            lines += [f"    {i}. {r}" for i, r in enumerate(self.recommendations, 1)]
        else:
            lines.append("  no change needed: check the error on the test set")
        return "\n".join(lines)


def diagnose(train_error: Any, dev_error: "float | None" = None, optimal_error: float = 0.0, *,
             threshold: "float | tuple[float, float]" = DEFAULT_THRESHOLD) -> Diagnosis:
    """Bias / variance diagnosis with recommendations (docs/spec.md, notes 1.2-1.3).

    Parameters
    ----------
    train_error : float, History, Sequential or mapping
        The training error rate in [0, 1] (with ``dev_error``). Or, alone: a
        :class:`fastdl.History` with ``error`` / ``val_error`` (the last
        epoch is used), a trained model whose ``.history`` has them, or a
        mapping ``{'train': {'error': ...}, 'dev': {'error': ...}}`` (e.g.
        ``model.evaluate`` results).
    dev_error : float
        The dev (validation) error rate in [0, 1].
    optimal_error : float
        Optimal (Bayes) error, e.g. human-level error; default 0.
    threshold : float or (float, float)
        A gap counts as high when larger than this absolute difference of
        error rates (default 0.02); a pair gives (bias, variance) thresholds.

    Returns
    -------
    Diagnosis
        ``avoidable_bias``, ``variance``, ``verdict``, ``recommendations``;
        ``print`` it for a readable report.

    Examples
    --------
    >>> [diagnose(t, d).verdict for t, d in [(0.01, 0.11), (0.15, 0.16), (0.15, 0.30), (0.005, 0.01)]]
    ['high variance', 'high bias', 'high bias and high variance', 'neither']
    >>> diagnose(0.15, 0.16, optimal_error=0.15).verdict
    'neither'
    """
    if dev_error is None:
        obj = train_error
        if isinstance(obj, Mapping) and "train" in obj and "dev" in obj:
            tr, dv = obj["train"], obj["dev"]
            tr = tr["error"] if isinstance(tr, Mapping) else tr
            dv = dv["error"] if isinstance(dv, Mapping) else dv
            return Diagnosis.from_errors(tr, dv, optimal_error, threshold=threshold)
        if isinstance(obj, Mapping) or hasattr(obj, "batch_cost"):
            return Diagnosis.from_history(obj, optimal_error, threshold=threshold)
        hist = getattr(obj, "history", None)
        if hist is not None and hasattr(hist, "batch_cost"):
            return Diagnosis.from_history(hist, optimal_error, threshold=threshold)
        raise TypeError("diagnose() needs train_error and dev_error, or a History / trained model / "
                        f"{{'train': ..., 'dev': ...}} mapping; got {type(obj).__name__} alone")
    return Diagnosis.from_errors(train_error, dev_error, optimal_error, threshold=threshold)
