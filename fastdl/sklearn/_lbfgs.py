"""``solver='lbfgs'``: full-batch L-BFGS (scipy) over the flat parameters, and scikit-learn's gradient hook."""
from __future__ import annotations

import math
import warnings

import numpy as np
import scipy.optimize
from sklearn.exceptions import ConvergenceWarning

from ..layers import BatchNorm
from ._common import PREDICT_CHUNK, _check_sample_weight, _MaxFun, _rows


class _LBFGSSolver:
    """``_BaseMLP``'s L-BFGS methods (a mixin)."""

    def _fit_lbfgs(self, X, targets, sw) -> None:
        """Full-batch L-BFGS (scipy) over the flat parameters; dropout off, BatchNorm statistics frozen."""
        model = self.model_
        has_bn = any(isinstance(lay, BatchNorm) for lay in model.layers)
        n = X.shape[0]
        # chunks bound the workspace on big or sparse inputs; BatchNorm and weights need the whole batch
        chunk = n if (has_bn or sw is not None) else max(PREDICT_CHUNK, 1)
        spans = [(s, min(s + chunk, n)) for s in range(0, n, chunk)]
        dense_X = None
        if len(spans) == 1:
            dense_X = _rows(X, slice(0, n), model.dtype)
        targets = np.ascontiguousarray(targets)
        grad64 = np.empty(model.params.size, np.float64)
        counter = {"n": 0, "best": (math.inf, None)}
        max_fun = int(self.max_fun)

        def loss_grad(theta):
            if counter["n"] >= max_fun:  # honour max_fun strictly (scipy may overshoot within a line search)
                raise _MaxFun
            counter["n"] += 1
            model.params[...] = theta
            saved = model.state.copy()
            if dense_X is not None:
                kw = {"weights": sw} if sw is not None else {}
                data_loss, l2_term, _ = model._loss_and_grads(dense_X, targets, dropout=False, n_total=n,
                                                              step=model.step_count, **kw)
                J = data_loss + l2_term
                grad64[...] = model.grads
            else:
                J = 0.0
                grad64[...] = 0.0
                for s, e in spans:
                    frac = (e - s) / n
                    data_loss, l2_term, _ = model._loss_and_grads(
                        _rows(X, slice(s, e), model.dtype), targets[s:e], dropout=False, n_total=n,
                        step=model.step_count, m_l2=n, grad_scale=frac)
                    J += data_loss * frac
                    np.add(grad64, model.grads, out=grad64)
                J += l2_term
            model.state[...] = saved  # frozen during the line search
            if math.isfinite(J) and J < counter["best"][0]:
                counter["best"] = (J, np.array(theta, copy=True))
            return J, grad64.copy()

        it = {"n": 0}

        def callback(*args):
            it["n"] += 1
            if self.verbose:
                print("Iteration %d, loss = %.8f" % (it["n"], counter["best"][0]))

        theta0 = model.params.astype(np.float64)
        try:
            res = scipy.optimize.minimize(loss_grad, theta0, method="L-BFGS-B", jac=True, callback=callback,
                                          options={"maxfun": max_fun, "maxiter": int(self.max_iter),
                                                   "gtol": float(self.tol)})
            theta, fun, nit = res.x, float(res.fun), int(res.nit)
            if res.status != 0:
                warnings.warn(f"lbfgs failed to converge after {nit} iteration(s) (status={res.status}): "
                              f"{res.message}. Increase the number of iterations (max_iter) or the number of "
                              "function evaluations (max_fun), or scale the data.", ConvergenceWarning)
        except _MaxFun:
            best_J, theta = counter["best"]
            if theta is None:
                theta = model.params.astype(np.float64)
            fun, nit = best_J, it["n"]
            warnings.warn(f"lbfgs failed to converge after {nit} iteration(s): max_fun={max_fun} function "
                          "evaluations reached. Increase max_fun or scale the data.", ConvergenceWarning)
        self.n_iter_ = min(nit, int(self.max_iter))
        self.loss_ = fun
        model.params[...] = theta
        if has_bn:
            self._batchnorm_population_statistics(dense_X, targets, sw, n)
        self.t_ = getattr(self, "t_", 0)

    def _batchnorm_population_statistics(self, X, targets, sw, n) -> None:
        """After full-batch L-BFGS: running statistics := the full batch's statistics at the final parameters.

        One training-mode pass updates ``running = momentum*running + (1-momentum)*batch``; solving for
        ``batch`` gives every BatchNorm layer's exact full-batch mean and variance.
        """
        model = self.model_
        bns = [lay for lay in model.layers if isinstance(lay, BatchNorm)]
        before = [(lay.running_mean.astype(np.float64), lay.running_var.astype(np.float64)) for lay in bns]
        kw = {"weights": sw} if sw is not None else {}
        model._loss_and_grads(X, targets, dropout=False, n_total=n, step=model.step_count, **kw)
        for lay, (rm0, rv0) in zip(bns, before):
            mom = float(lay.momentum)
            lay.running_mean[...] = (lay.running_mean - mom * rm0) / (1.0 - mom)
            lay.running_var[...] = np.maximum((lay.running_var - mom * rv0) / (1.0 - mom), 0.0)

    # scikit-learn's private gradient helper (its test_mlp.py checks gradients through it)
    def _loss_grad_lbfgs(self, packed_coef_inter, X, y, sample_weight, *buffers):
        """Loss and gradient at scikit-learn's packed parameters (all ``coefs_`` then all ``intercepts_``).

        ``y`` is scikit-learn's binarised target matrix; the trailing work buffers are ignored.
        """
        model = self.model_
        order = self._sklearn_order()
        model.params[order] = packed_coef_inter
        X = _rows(X, slice(0, X.shape[0]), model.dtype)
        y = np.asarray(y)
        if y.ndim == 1:
            y = y.reshape(-1, 1)
        targets = self._targets(y)
        kw = {"weights": _check_sample_weight(sample_weight, X.shape[0])} if sample_weight is not None else {}
        saved = model.state.copy()
        data_loss, l2_term, _ = model._loss_and_grads(X, targets, dropout=False, n_total=X.shape[0],
                                                      step=model.step_count, **kw)
        model.state[...] = saved
        return data_loss + l2_term, model.grads[order].astype(np.float64)

    def _sklearn_order(self) -> np.ndarray:
        """Indices into ``model_.params`` in scikit-learn's packing order."""
        base = self.model_.params
        idx = []
        for arr in self.coefs_ + self.intercepts_:
            off = (arr.__array_interface__["data"][0] - base.__array_interface__["data"][0]) // base.itemsize
            idx.append(np.arange(off, off + arr.size))
        return np.concatenate(idx)
