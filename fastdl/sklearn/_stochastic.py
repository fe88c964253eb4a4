"""The stochastic solvers ('sgd', 'adam', 'rmsprop'): scikit-learn's epoch loop over fastdl's executors."""
from __future__ import annotations

import math
import warnings

import numpy as np
import scipy.sparse as sp
from sklearn.exceptions import ConvergenceWarning
from sklearn.model_selection import train_test_split
from sklearn.utils import gen_batches

from .. import optim as _optim
from ._callbacks import NoImprovementStopping
from ._common import NONFINITE_MSG, _Diverged, _rows


class _ScikitSGD(_optim.Optimizer):
    """scikit-learn's SGD rule for ``momentum=1.0``, which scikit-learn accepts and ``fd.ClassicalMomentum``
    refuses (``[0, 1)``): ``v = mu v - lr g; p += mu v - lr g`` (Nesterov) or ``p += v``, in NumPy."""

    state_names = ("v",)

    def __init__(self, lr: float = 0.001, momentum: float = 0.9, nesterov: bool = True, backend=None):
        super().__init__(lr, backend)
        self.momentum = float(momentum)
        self.nesterov = bool(nesterov)

    def get_config(self):
        return {"lr": self.lr, "momentum": self.momentum, "nesterov": self.nesterov}

    def step(self, params, grads, lr=None):
        self._ensure_state(params, grads)
        self.t += 1
        lr = self.lr if lr is None else lr
        v = self.state["v"]
        v *= self.momentum
        v -= lr * grads
        if self.nesterov:
            params += self.momentum * v - lr * grads
        else:
            params += v


class _OptimizerView:
    """``est._optimizer.learning_rate``: what scikit-learn's own tests read."""

    def __init__(self, opt):
        self._opt = opt

    @property
    def learning_rate(self) -> float:
        return self._opt.lr


class _StochasticSolver:
    """``_BaseMLP``'s stochastic-solver methods (a mixin; the estimator's attributes are scikit-learn's)."""

    def _make_optimizer(self, backend) -> _optim.Optimizer:
        lr = float(self.learning_rate_init)
        if self.solver == "adam":
            return _optim.Adam(lr, beta1=self.beta_1, beta2=self.beta_2, eps=self.epsilon, backend=backend)
        if self.solver == "rmsprop":
            return _optim.RMSprop(lr, beta2=self.beta_2, eps=self.epsilon, backend=backend)
        if self.momentum < 1.0:  # scikit-learn's rule (classical or Nesterov), the same update as its MLP
            return _optim.ClassicalMomentum(lr, momentum=self.momentum, nesterov=bool(self.nesterovs_momentum),
                                            backend=backend)
        return _ScikitSGD(lr, momentum=self.momentum, nesterov=bool(self.nesterovs_momentum), backend=backend)

    @property
    def _optimizer(self):
        """scikit-learn's private ``_optimizer.learning_rate`` (its tests read it); see ``optimizer_``."""
        if "optimizer_" not in self.__dict__:
            raise AttributeError("_optimizer")
        return _OptimizerView(self.optimizer_)

    def _fit_stochastic(self, X, targets, Y, sw, incremental: bool) -> None:
        model = self.model_
        if not hasattr(self, "loss_curve_"):  # continuing an L-BFGS fit with a stochastic solver
            self.loss_curve_, self._no_improvement_count = [], 0
            self.best_loss_, self.validation_scores_, self.best_validation_score_ = (
                (None, [], -np.inf) if self.early_stopping else (np.inf, None, None))
        if not incremental or "optimizer_" not in self.__dict__:
            self.optimizer_ = self._make_optimizer(model.backend_name)
        opt = self.optimizer_
        if self.early_stopping and incremental:
            raise ValueError("partial_fit does not support early_stopping=True")
        adaptive = self.learning_rate == "adaptive" and self.solver in ("sgd", "rmsprop")
        stopper = self.__dict__.get("_stopper")
        if stopper is None or not incremental:
            stopper = NoImprovementStopping(mode="max" if self.early_stopping else "min", tol=self.tol,
                                            n_iter_no_change=self.n_iter_no_change, adaptive=adaptive,
                                            verbose=bool(self.verbose))
            if self.early_stopping:
                stopper.best = self.best_validation_score_
            elif self.best_loss_ is not None:
                stopper.best = self.best_loss_
            self._stopper = stopper
        stopper.no_improvement_count = self._no_improvement_count
        # the settings may have changed through set_params between calls
        stopper.tol, stopper.n_iter_no_change, stopper.adaptive = self.tol, self.n_iter_no_change, adaptive
        early = bool(self.early_stopping)
        if early:
            # scikit-learn's split: stratified on the binarised labels when there is one output
            stratify = Y if (self._is_classifier and self.n_outputs_ == 1) else None
            arrays = [X, targets, Y] + ([sw] if sw is not None else [])
            split = train_test_split(*arrays, random_state=self._random_state,
                                     test_size=self.validation_fraction, stratify=stratify)
            X_train, X_val, t_train, _, _, Y_val = split[:6]
            sw_train, sw_val = (split[6], split[7]) if sw is not None else (None, None)
            if X_val.shape[0] < 2:
                raise ValueError("The validation set is too small. Increase 'validation_fraction' or the size "
                                 "of your dataset.")
            y_val = self._val_targets(Y_val)
            self._best_params = model.params.copy()
            self._best_state = model.state.copy()
        else:
            X_train, t_train, sw_train = X, targets, sw
            X_val = y_val = sw_val = None
        n = X_train.shape[0]
        idx = np.arange(n)
        if self.batch_size == "auto":
            bs = min(200, n)
        else:
            if self.batch_size > n:
                warnings.warn("Got `batch_size` less than 1 or larger than sample size. It is going to be clipped")
            bs = int(np.clip(self.batch_size, 1, n))
        if not sp.issparse(X_train):
            X_train = np.ascontiguousarray(X_train, dtype=model.dtype)
        t_train = np.ascontiguousarray(t_train)
        lr_rule = self.learning_rate if self.solver in ("sgd", "rmsprop") else "constant"
        runner = self._epoch_runner(model, opt, X_train, bs)
        self.n_iter_ = 0
        try:
            for _ in range(self.max_iter):
                if self.shuffle:
                    # = sklearn.utils.shuffle(idx, random_state=rs) (same draws), without its ~0.5 ms of checks
                    p = np.arange(n)
                    self._random_state.shuffle(p)
                    idx = idx[p]
                diverged = False
                if runner is not None:
                    acc, diverged = runner(idx if self.shuffle else np.arange(n), X_train, t_train, sw_train)
                else:
                    acc = 0.0
                    for sl in gen_batches(n, bs):
                        rows = idx[sl] if self.shuffle else sl
                        xb = _rows(X_train, rows, model.dtype)
                        yb = t_train[rows]
                        kw = {}
                        if sw_train is not None:
                            kw["weights"] = np.ascontiguousarray(sw_train[rows])
                        data_loss, l2_term, _ = model._loss_and_grads(xb, yb, dropout=True, n_total=n,
                                                                      step=model.step_count, **kw)
                        J = data_loss + l2_term
                        if not math.isfinite(J):
                            diverged = True
                            break
                        opt.step(model.params, model.grads, lr=opt.lr)
                        model.step_count += 1
                        acc += J * (sl.stop - sl.start)
                if diverged:
                    # scikit-learn keeps iterating on NaN; nothing can recover, so stop here: with
                    # early stopping the best epoch's parameters are restored below, else ValueError
                    if not early:
                        raise _Diverged
                    self.n_iter_ += 1
                    self.loss_ = np.nan
                    self.loss_curve_.append(np.nan)
                    self.validation_scores_.append(np.nan)
                    break
                self.n_iter_ += 1
                self.loss_ = acc / n
                self.t_ += n
                self.loss_curve_.append(self.loss_)
                if self.verbose:
                    print("Iteration %d, loss = %.8f" % (self.n_iter_, self.loss_))
                if early:
                    score = self._score(X_val, y_val, sw_val)
                    self.validation_scores_.append(score)
                    if self.verbose:
                        print("Validation score: %f" % score)
                    if stopper.update(score):
                        self.best_validation_score_ = score
                        self._best_params = model.params.copy()
                        self._best_state = model.state.copy()
                else:
                    stopper.update(self.loss_)
                    self.best_loss_ = stopper.best
                self._no_improvement_count = stopper.no_improvement_count
                if lr_rule == "invscaling":
                    opt.lr = float(self.learning_rate_init) / (self.t_ + 1) ** self.power_t
                if stopper.triggered():
                    stop = stopper.trigger(opt)
                    self._no_improvement_count = stopper.no_improvement_count
                    if stop:
                        break
                if incremental:
                    break
                if self.n_iter_ == self.max_iter:
                    warnings.warn("Stochastic Optimizer: Maximum iterations (%d) reached and the optimization "
                                  "hasn't converged yet." % self.max_iter, ConvergenceWarning)
        except _Diverged:
            if early:  # pragma: no cover - handled in the loop
                model.params[...] = self._best_params
            raise ValueError(NONFINITE_MSG) from None
        except KeyboardInterrupt:
            warnings.warn("Training interrupted by user.")
        if early:
            model.params[...] = self._best_params
            model.state[...] = self._best_state

    #: run dense epochs through the backend's compiled epoch executor when it has one (tests switch it off
    #: to compare with the per-step path)
    _use_epoch_executor = True

    def _epoch_runner(self, model, opt, X_train, bs):
        """A function running one epoch in one compiled call (``backend.epoch_executor``), or None.

        Same batches, order and updates as the per-step loop (the executors are tested bit-identical to
        their backend's per-layer path); sparse input and optimisers without a plan spec use the loop.
        """
        if not self._use_epoch_executor or sp.issparse(X_train):
            return None
        spec_fn, ensure = getattr(opt, "spec", None), getattr(opt, "ensure_state", None)
        get_ex = getattr(model.kernels, "epoch_executor", None)
        if spec_fn is None or ensure is None or get_ex is None or isinstance(opt, _ScikitSGD):
            return None
        from ..plan import step_coefficients

        try:
            ex = get_ex(model.plan, bs, spec_fn())
        except (NotImplementedError, ValueError, TypeError):
            return None
        if ex is None:
            return None
        n = X_train.shape[0]
        n_steps = -(-n // bs)
        rows = np.array([min(bs, n - i * bs) for i in range(n_steps)], np.float64)
        costs, losses = np.empty(n_steps), np.empty(n_steps)
        empty = np.empty(0, np.float64)

        def run(perm, X, t, sw):
            spec = spec_fn()
            arrays = dict(zip(spec.state_names, ensure(model.params)))
            v = arrays.get("v", model.params[:0])
            s = arrays.get("s", model.params[:0])
            c1, c2 = step_coefficients(spec, np.full(n_steps, float(opt.lr)), opt.t)
            done, _, status = ex.run_epoch(X, t, empty if sw is None else np.ascontiguousarray(sw, np.float64),
                                           np.ascontiguousarray(perm, np.int64),
                                           model.params, model.grads, model.state, v, s, c1, c2,
                                           model.step_count, model.seed, n, costs, losses)
            opt.t += done
            model.step_count += done
            if status != 0:
                return math.nan, True
            # the per-step loop's left-to-right float sum of J * rows
            return float(np.add.accumulate(costs * rows)[-1]), False

        return run
