"""Peer implementations for the peer-comparison benchmarks (issue #5).

Shared by ``benchmarks/test_bench_peers.py`` (timed) and
``benchmarks/accuracy_vs_torch.py`` (accuracy, not timed).

Every trainer built here has the same shape: ``trainer.epoch()`` runs one
pass over the in-memory float32 data in mini-batches taken **in order**
(forward, softmax cross-entropy, backward, Adam) and returns only once the
work is done (JAX's asynchronous dispatch is blocked on). ``trainer.n_samples``
is the number of examples one ``epoch()`` trains on.

Peers are imported lazily, so a missing peer only skips its own benchmarks.

Thread control
--------------
``FASTDL_BENCH_THREADS=n`` (or ``pytest --threads n``, which sets it) limits
every library to ``n`` threads:

* environment, set when this module is imported, which must happen before
  numpy/numba/torch/jax are (the benchmarks' conftest imports it in
  ``pytest_configure``; a script imports it first): ``OMP_NUM_THREADS``
  (Cython/OpenMP, PyTorch's OpenMP), ``OPENBLAS_NUM_THREADS``,
  ``MKL_NUM_THREADS``, ``NUMBA_NUM_THREADS`` and, for ``n == 1``,
  ``XLA_FLAGS=--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1``
  (read once, when jax is first imported). Current JAX (thunk runtime)
  ignores these flags and sizes its thread pool from the CPUs the process
  may run on, so for ``n`` below the CPU count the process is also pinned
  to its first ``n`` allowed CPUs (``os.sched_setaffinity``, inherited by
  every thread created afterwards): that is what limits JAX, and it caps
  every other library at ``n`` cores as well.
* at run time, after the libraries are loaded (``apply_thread_limits``):
  ``threadpoolctl.threadpool_limits(n)`` (every BLAS and OpenMP runtime
  loaded: NumPy's and SciPy's OpenBLAS, libgomp), ``torch.set_num_threads(n)``
  and ``numba.set_num_threads(n)``.
"""
from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Callable

THREADS_ENV = "FASTDL_BENCH_THREADS"
_THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS")
_XLA_ONE_THREAD = ("--xla_cpu_multi_thread_eigen=false", "intra_op_parallelism_threads=1")


def bench_threads() -> int | None:
    """The requested thread count, or None (libraries' defaults: every core)."""
    v = os.environ.get(THREADS_ENV, "").strip()
    if not v:
        return None
    n = int(v)
    if n < 1:
        raise ValueError(f"{THREADS_ENV} must be >= 1, got {v!r}")
    return n


def configure_thread_env(n: int | None) -> None:
    """Set the thread environment variables; must run BEFORE numpy/numba/torch/jax are imported.

    Importing this module does it (from ``FASTDL_BENCH_THREADS``) before it
    imports numpy; the conftest sets ``FASTDL_BENCH_THREADS`` from ``--threads``
    first.
    """
    if n is None:
        return
    os.environ[THREADS_ENV] = str(n)
    for var in _THREAD_VARS:
        os.environ[var] = str(n)
    if n == 1:
        flags = os.environ.get("XLA_FLAGS", "")
        add = [f for f in _XLA_ONE_THREAD if f.split("=")[0] not in flags]
        os.environ["XLA_FLAGS"] = " ".join([flags] + add).strip()
    # JAX >= 0.4.3x (thunk runtime) ignores those flags and sizes its pool from the CPUs this
    # process may run on, so restrict the affinity too (inherited by every thread created later).
    if hasattr(os, "sched_setaffinity"):
        cpus = sorted(os.sched_getaffinity(0))
        if n < len(cpus):
            os.sched_setaffinity(0, cpus[:n])
    late = [m for m in ("numpy", "numba", "torch", "jax") if m in sys.modules]
    if late:
        print(f"fastdl bench: note: {late} imported before the thread environment was set; the run-time "
              "limits (threadpoolctl, torch/numba set_num_threads) still apply, XLA_FLAGS may not",
              file=sys.stderr)


configure_thread_env(bench_threads())  # before numpy is imported, below

import numpy as np  # noqa: E402

# --------------------------------------------------------------------------- configs


@dataclass(frozen=True)
class Arch:
    """An MLP: ``dims`` widths; hidden layers ReLU; optional BN + dropout block."""

    dims: tuple[int, ...]
    bn_dropout: bool = False  # hidden: Dense(no bias) -> BatchNorm -> ReLU -> Dropout(keep)
    keep: float = 1.0
    l2: float = 0.0  # fastdl's lambda: J += lambda/(2m) sum ||W||^2, m = mini-batch size
    bn_momentum: float = 0.9  # fastdl convention (= PyTorch momentum 0.1)
    bn_eps: float = 1e-5


@dataclass(frozen=True)
class Config:
    name: str
    arch: Arch
    batch: int
    n_samples: int  # examples per timed round (one epoch); a multiple of batch
    n_quick: int  # the same in quick mode
    rounds: int  # timed rounds (epochs)
    lr: float = 1e-3
    description: str = ""

    def samples(self, quick: bool) -> int:
        return self.n_quick if quick else self.n_samples

    @property
    def flops_per_sample(self) -> float:
        """6 x sum(n_in x n_out): forward, dW and dX GEMMs (issue #5's rule)."""
        d = self.arch.dims
        return 6.0 * sum(a * b for a, b in zip(d[:-1], d[1:]))


CONFIGS: dict[str, Config] = {
    "S": Config("S", Arch((64, 128, 64, 10)), batch=32, n_samples=16384, n_quick=2048, rounds=7,
                description="64-128-64-10 ReLU, batch 32, softmax-CE, Adam"),
    "M": Config("M", Arch((784, 512, 256, 10), bn_dropout=True, keep=0.8, l2=1e-4), batch=128,
                n_samples=6144, n_quick=1024, rounds=7,
                description="784-512-256-10, hidden Dense(no bias)->BatchNorm->ReLU->Dropout(keep 0.8), "
                            "batch 128, L2 1e-4, Adam"),
    "L": Config("L", Arch((784, 2048, 2048, 10)), batch=512, n_samples=4096, n_quick=1024, rounds=5,
                description="784-2048-2048-10 ReLU, batch 512, Adam"),
}


def quick_mode() -> bool:
    """``FASTDL_BENCH_QUICK=1``: small epochs and 2 rounds (smoke test, not for numbers)."""
    return os.environ.get("FASTDL_BENCH_QUICK", "").strip() not in ("", "0", "false", "no")


def train_rounds(cfg: Config, epoch_seconds: float) -> int:
    """Timed rounds for one training benchmark: ``cfg.rounds``, reduced (to no
    fewer than 3) when they would take more than ``FASTDL_BENCH_BUDGET_S``
    seconds (default 12), so a slow peer cannot stretch the run."""
    budget = float(os.environ.get("FASTDL_BENCH_BUDGET_S", "12"))
    return max(3, min(cfg.rounds, int(budget / max(epoch_seconds, 1e-9))))


def selected_configs() -> list[str]:
    """``FASTDL_BENCH_CONFIGS=S,L`` restricts the training configs (default: all)."""
    v = os.environ.get("FASTDL_BENCH_CONFIGS", "").strip()
    if not v:
        return list(CONFIGS)
    names = [c.strip().upper() for c in v.split(",") if c.strip()]
    unknown = [c for c in names if c not in CONFIGS]
    if unknown:
        raise ValueError(f"FASTDL_BENCH_CONFIGS: unknown config(s) {unknown}; choose from {list(CONFIGS)}")
    return names


def make_data(n: int, n_in: int, n_classes: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, n_in), dtype=np.float32)
    y = rng.integers(0, n_classes, n).astype(np.int64)
    y[:n_classes] = np.arange(n_classes)  # every class present (scikit-learn needs them in the first fit)
    return X, y


def he_normal(rng: np.random.Generator, n_in: int, n_out: int) -> np.ndarray:
    return (rng.standard_normal((n_in, n_out)) * math.sqrt(2.0 / n_in)).astype(np.float32)


# --------------------------------------------------------------------------- threads

_limiter: Any = None


def apply_thread_limits() -> int:
    """Apply the requested limit to every library loaded so far; return the effective count.

    Idempotent and cheap: called again after each peer is imported.
    """
    global _limiter
    n = bench_threads()
    if n is not None:
        from threadpoolctl import threadpool_limits

        _limiter = threadpool_limits(limits=n)  # kept alive: the limit stays until restored
        if "torch" in sys.modules:
            import torch

            if torch.get_num_threads() != n:
                torch.set_num_threads(n)
        if "numba" in sys.modules:
            import numba

            numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
        return n
    return os.cpu_count() or 1


def thread_report() -> dict[str, Any]:
    """Thread settings and the BLAS/OpenMP libraries in use (threadpoolctl)."""
    from threadpoolctl import threadpool_info

    out: dict[str, Any] = {"requested_threads": bench_threads(), "cpu_count": os.cpu_count(),
                           "threadpools": [{k: d.get(k) for k in ("user_api", "internal_api", "prefix",
                                                                    "version", "num_threads",
                                                                    "threading_layer", "architecture",
                                                                    "filepath")}
                                           for d in threadpool_info()]}
    if "torch" in sys.modules:
        import torch

        out["torch_threads"] = torch.get_num_threads()
        out["torch_blas"] = "MKL" if torch.backends.mkl.is_available() else "other"
    if "numba" in sys.modules:
        import numba

        out["numba_threads"] = numba.get_num_threads()
        try:
            out["numba_threading_layer"] = numba.threading_layer()
        except ValueError:  # no parallel region has run yet
            out["numba_threading_layer"] = None
    if "fastdl.backends.blas" in sys.modules:
        from fastdl.backends import blas

        out["fastdl_blas"] = blas.info()
    out["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "")
    if hasattr(os, "sched_getaffinity"):
        out["cpu_affinity"] = sorted(os.sched_getaffinity(0))
    return out


def versions() -> dict[str, str | None]:
    import importlib.metadata as md
    import platform

    out: dict[str, str | None] = {"python": platform.python_version()}
    for dist in ("numpy", "scipy", "numba", "torch", "jax", "jaxlib", "optax", "scikit-learn",
                 "threadpoolctl", "fastdl", "pytest-benchmark"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            out[dist] = None
    return out


# --------------------------------------------------------------------------- base


class Trainer:
    """One implementation of one config: ``epoch()`` trains over all batches in order."""

    def __init__(self, cfg: Config, X: np.ndarray, y: np.ndarray):
        self.cfg = cfg
        self.X, self.y = X, y
        self.n_samples = X.shape[0]
        self.batch = cfg.batch
        assert self.n_samples % self.batch == 0, "n_samples must be a multiple of the batch size"
        self.n_steps = self.n_samples // self.batch

    def epoch(self) -> None:
        raise NotImplementedError


# --------------------------------------------------------------------------- fastdl


def fastdl_model(arch: Arch, backend: str = "auto", seed: int = 0, **model_kwargs):
    import fastdl as fd

    d = arch.dims
    layers: list = []
    for i in range(len(d) - 2):
        if arch.bn_dropout:
            layers += [fd.Dense(d[i], d[i + 1], init="he", use_bias=False),
                       fd.BatchNorm(d[i + 1], momentum=arch.bn_momentum, eps=arch.bn_eps), fd.ReLU()]
            if arch.keep < 1.0:
                layers.append(fd.Dropout(keep_prob=arch.keep))
        else:
            layers += [fd.Dense(d[i], d[i + 1], init="he"), fd.ReLU()]
    layers.append(fd.Dense(d[-2], d[-1], init="he"))
    return fd.Sequential(layers, loss="softmax_cross_entropy", l2=arch.l2, dtype="float32", backend=backend,
                         seed=seed, **model_kwargs)


@dataclass(frozen=True)
class FastdlVariant:
    """One fastdl way of training: a backend plus extra model / fit arguments."""

    impl: str
    backend: str
    model_kwargs: dict = field(default_factory=dict)
    fit_kwargs: dict = field(default_factory=dict)


# A fused / whole-step fastdl mode, once the model exposes one, is ONE line here, e.g.
#   FastdlVariant("fastdl-fused", "numba", fit_kwargs={"fused": True}),
# and it then appears in every training group (and summarize.py treats every
# impl starting with "fastdl" as fastdl).
EXTRA_FASTDL_VARIANTS: list[FastdlVariant] = [
    # what every user gets: backend="auto", fit's defaults
    FastdlVariant("fastdl-auto", "auto"),
    # fit's default (fused="auto") runs each epoch as one compiled call; this is the per-layer path
    FastdlVariant("fastdl-numba-layerwise", "numba", fit_kwargs={"fused": False}),
    # mixed precision (docs/spec.md "Mixed precision"): every Dense GEMM on bfloat16 operands
    FastdlVariant("fastdl-auto-bf16", "auto", model_kwargs={"precision": "bf16"}),
]


def fastdl_variants() -> list[FastdlVariant]:
    """Every available backend (``fastdl.backends.available_backends()``) + extra modes."""
    from fastdl.backends import available_backends

    avail = available_backends()
    return ([FastdlVariant(f"fastdl-{b}", b) for b in avail]
            + [v for v in EXTRA_FASTDL_VARIANTS if v.backend in avail or v.backend == "auto"])


class FastdlTrainer(Trainer):
    """fastdl's public path: ``model.fit(X, y, epochs=1, shuffle=False)`` per round.

    This includes fit's per-step bookkeeping (finite check of J and of the
    gradients, training error count), which the peers' bare loops do not do.
    """

    def __init__(self, cfg, X, y, variant: FastdlVariant, seed: int = 0):
        super().__init__(cfg, X, y)
        import fastdl as fd

        self.model = fastdl_model(cfg.arch, variant.backend, seed, **variant.model_kwargs)
        self.opt = fd.Adam(lr=cfg.lr)
        self.fit_kwargs = dict(variant.fit_kwargs)

    def epoch(self):
        self.model.fit(self.X, self.y, optimizer=self.opt, epochs=1, batch_size=self.batch, shuffle=False,
                       **self.fit_kwargs)


# --------------------------------------------------------------------------- PyTorch


def torch_mlp(arch: Arch, seed: int = 0):
    """The same architecture in PyTorch, He-normal weights and zero biases (fastdl's scheme)."""
    import torch
    from torch import nn

    g = torch.Generator().manual_seed(seed)
    d = arch.dims
    mods: list = []
    for i in range(len(d) - 2):
        if arch.bn_dropout:
            mods += [nn.Linear(d[i], d[i + 1], bias=False),
                     nn.BatchNorm1d(d[i + 1], eps=arch.bn_eps, momentum=1.0 - arch.bn_momentum), nn.ReLU()]
            if arch.keep < 1.0:
                mods.append(nn.Dropout(p=1.0 - arch.keep))
        else:
            mods += [nn.Linear(d[i], d[i + 1]), nn.ReLU()]
    mods.append(nn.Linear(d[-2], d[-1]))
    model = nn.Sequential(*mods)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear):
                m.weight.normal_(0.0, math.sqrt(2.0 / m.in_features), generator=g)
                if m.bias is not None:
                    m.bias.zero_()
    return model.float()


def torch_adam(model, arch: Arch, batch: int, lr: float, mode: str | None):
    """Adam with fastdl's L2 as PyTorch weight_decay = lambda/m on Linear weights only."""
    import torch
    from torch import nn

    decay = [m.weight for m in model.modules() if isinstance(m, nn.Linear)]
    ids = {id(p) for p in decay}
    rest = [p for p in model.parameters() if id(p) not in ids]
    groups = [{"params": decay, "weight_decay": arch.l2 / batch}, {"params": rest, "weight_decay": 0.0}]
    kw: dict[str, Any] = {}
    if mode == "foreach":
        kw["foreach"] = True
    elif mode == "fused":
        kw["fused"] = True
    return torch.optim.Adam(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8, **kw)


class TorchTrainer(Trainer):
    """PyTorch eager (Adam foreach or fused) or torch.compile of the whole train step."""

    def __init__(self, cfg, X, y, mode: str, seed: int = 0):
        super().__init__(cfg, X, y)
        import torch
        import torch.nn.functional as F

        torch.manual_seed(seed)
        self.mode = mode
        self.model = torch_mlp(cfg.arch, seed).train()
        opt_mode = {"foreach": "foreach", "fused": "fused", "compile": None, "autocast-bf16": "fused"}[mode]
        self.opt = torch_adam(self.model, cfg.arch, cfg.batch, cfg.lr, opt_mode)
        Xt, yt = torch.from_numpy(X), torch.from_numpy(y)
        self.batches = [(Xt[s:s + self.batch], yt[s:s + self.batch]) for s in range(0, self.n_samples, self.batch)]
        model, opt = self.model, self.opt

        autocast = mode == "autocast-bf16"

        def step(xb, yb):
            if autocast:  # PyTorch's one-line mixed precision: bf16 matmuls, float32 master weights
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    loss = F.cross_entropy(model(xb), yb)
            else:
                loss = F.cross_entropy(model(xb), yb)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss

        self.step = torch.compile(step) if mode == "compile" else step

    def epoch(self):
        step = self.step
        for xb, yb in self.batches:
            step(xb, yb)


# --------------------------------------------------------------------------- JAX


class JaxTrainer(Trainer):
    """JAX, the whole step (forward, loss, grad, optax.adam update) in one jit; buffers donated."""

    def __init__(self, cfg, X, y, seed: int = 0):
        super().__init__(cfg, X, y)
        import jax
        import jax.numpy as jnp
        import optax

        arch = cfg.arch
        d = arch.dims
        rng = np.random.default_rng(seed)
        params = []
        for i in range(len(d) - 1):
            layer = {"W": jnp.asarray(he_normal(rng, d[i], d[i + 1]))}
            hidden = i < len(d) - 2
            if hidden and arch.bn_dropout:
                layer["gamma"] = jnp.ones(d[i + 1], jnp.float32)
                layer["beta"] = jnp.zeros(d[i + 1], jnp.float32)
            else:
                layer["b"] = jnp.zeros(d[i + 1], jnp.float32)
            params.append(layer)
        bn_state = [(jnp.zeros(d[i + 1], jnp.float32), jnp.ones(d[i + 1], jnp.float32))
                    for i in range(len(d) - 2)] if arch.bn_dropout else []
        base_key = jax.random.key(seed)
        tx = optax.adam(cfg.lr, b1=0.9, b2=0.999, eps=1e-8)
        mom, eps, keep, l2 = arch.bn_momentum, arch.bn_eps, arch.keep, arch.l2

        def loss_fn(params, bn_state, xb, yb, key):
            h = xb
            new_state = []
            for i, layer in enumerate(params[:-1]):
                z = h @ layer["W"]
                if arch.bn_dropout:
                    mean = z.mean(0)
                    var = jnp.mean(jnp.square(z - mean), 0)
                    z = layer["gamma"] * ((z - mean) * jax.lax.rsqrt(var + eps)) + layer["beta"]
                    rm, rv = bn_state[i]
                    new_state.append((mom * rm + (1 - mom) * mean, mom * rv + (1 - mom) * var))
                else:
                    z = z + layer["b"]
                h = jax.nn.relu(z)
                if arch.bn_dropout and keep < 1.0:
                    mask = jax.random.bernoulli(jax.random.fold_in(key, i), keep, h.shape)
                    h = jnp.where(mask, h / keep, 0.0)
            logits = h @ params[-1]["W"] + params[-1]["b"]
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()
            if l2:
                loss = loss + l2 / (2 * xb.shape[0]) * sum(jnp.sum(jnp.square(p["W"])) for p in params)
            return loss, jax.lax.stop_gradient(new_state)

        def step(params, opt_state, bn_state, t, xb, yb):
            key = jax.random.fold_in(base_key, t)
            (loss, new_state), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, bn_state, xb, yb, key)
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, new_state, t + 1, loss

        self._step = jax.jit(step, donate_argnums=(0, 1, 2, 3))
        self.state = (params, tx.init(params), bn_state, jnp.zeros((), jnp.uint32))
        self.batches = [(jax.device_put(X[s:s + self.batch]), jax.device_put(y[s:s + self.batch].astype(np.int32)))
                        for s in range(0, self.n_samples, self.batch)]
        jax.block_until_ready(self.batches)

    def epoch(self):
        import jax

        params, opt_state, bn_state, t = self.state
        step = self._step
        for xb, yb in self.batches:
            params, opt_state, bn_state, t, loss = step(params, opt_state, bn_state, t, xb, yb)
        jax.block_until_ready((params, loss))
        self.state = (params, opt_state, bn_state, t)


# --------------------------------------------------------------------------- scikit-learn


def sklearn_expressible(arch: Arch) -> bool:
    """MLPClassifier has no BatchNorm, no dropout and one bias per layer."""
    return not arch.bn_dropout and arch.l2 == 0.0


class SklearnTrainer(Trainer):
    """MLPClassifier(solver='adam'); each ``fit`` call (warm_start, max_iter=1,
    shuffle=False) is one epoch over the batches in order."""

    def __init__(self, cfg, X, y, seed: int = 0):
        super().__init__(cfg, X, y)
        from sklearn.neural_network import MLPClassifier

        if not sklearn_expressible(cfg.arch):
            raise ValueError("not expressible in MLPClassifier")
        self.clf = MLPClassifier(hidden_layer_sizes=cfg.arch.dims[1:-1], activation="relu", solver="adam",
                                 alpha=0.0, batch_size=cfg.batch, learning_rate_init=cfg.lr, max_iter=1,
                                 shuffle=False, warm_start=True, early_stopping=False, tol=0.0,
                                 n_iter_no_change=10 ** 9, random_state=seed)

    def epoch(self):
        import warnings

        from sklearn.exceptions import ConvergenceWarning

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            self.clf.fit(self.X, self.y)

    @property
    def dtype(self):
        return self.clf.coefs_[0].dtype if hasattr(self.clf, "coefs_") else None


# --------------------------------------------------------------------------- plain NumPy


class NumpyTrainer(Trainer):
    """A hand-written forward / backward / Adam in plain NumPy (float32, in-place where natural)."""

    def __init__(self, cfg, X, y, seed: int = 0):
        super().__init__(cfg, X, y)
        arch = cfg.arch
        d = arch.dims
        rng = np.random.default_rng(seed)
        self.rng = np.random.default_rng(seed + 1)
        self.W = [he_normal(rng, d[i], d[i + 1]) for i in range(len(d) - 1)]
        nh = len(d) - 2
        self.b = [np.zeros(d[i + 1], np.float32) for i in range(len(d) - 1)]  # hidden b unused with BN
        self.gamma = [np.ones(d[i + 1], np.float32) for i in range(nh)]
        self.beta = [np.zeros(d[i + 1], np.float32) for i in range(nh)]
        self.rmean = [np.zeros(d[i + 1], np.float32) for i in range(nh)]
        self.rvar = [np.ones(d[i + 1], np.float32) for i in range(nh)]
        if arch.bn_dropout:
            self.params = self.W + self.gamma + self.beta + [self.b[-1]]
        else:
            self.params = self.W + self.b
        self.m1 = [np.zeros_like(p) for p in self.params]
        self.m2 = [np.zeros_like(p) for p in self.params]
        self.t = 0

    def step(self, xb: np.ndarray, yb: np.ndarray) -> float:
        arch = self.cfg.arch
        bn, keep, eps, mom = arch.bn_dropout, arch.keep, arch.bn_eps, arch.bn_momentum
        m = xb.shape[0]
        nh = len(self.W) - 1
        acts, caches = [xb], []
        h = xb
        for i in range(nh):
            z = h @ self.W[i]
            cache: dict[str, Any] = {}
            if bn:
                mu = z.mean(0)
                zc = z - mu
                var = np.mean(zc * zc, 0)
                inv = 1.0 / np.sqrt(var + np.float32(eps))
                xhat = zc * inv
                z = xhat * self.gamma[i] + self.beta[i]
                self.rmean[i] *= mom
                self.rmean[i] += (1 - mom) * mu
                self.rvar[i] *= mom
                self.rvar[i] += (1 - mom) * var
                cache.update(xhat=xhat, inv=inv)
            else:
                z += self.b[i]
            h = np.maximum(z, 0.0, out=z)
            cache["relu"] = h > 0
            if bn and keep < 1.0:
                mask = self.rng.random(h.shape, dtype=np.float32) < keep
                h = h * mask * np.float32(1.0 / keep)
                cache["mask"] = mask
            caches.append(cache)
            acts.append(h)
        logits = h @ self.W[-1] + self.b[-1]
        # softmax cross-entropy
        logits -= logits.max(1, keepdims=True)
        e = np.exp(logits)
        p = e / e.sum(1, keepdims=True)
        rows = np.arange(m)
        loss = float(-np.log(p[rows, yb]).mean())
        dz = p
        dz[rows, yb] -= 1.0
        dz *= np.float32(1.0 / m)
        # backward
        gW = [None] * len(self.W)
        gb_last = dz.sum(0)
        gb_hidden: list = [None] * nh
        ggamma: list = [None] * nh
        gbeta: list = [None] * nh
        l2m = np.float32(arch.l2 / m)
        for i in range(nh, -1, -1):
            gW[i] = acts[i].T @ dz
            if arch.l2:
                gW[i] += l2m * self.W[i]
            if i == 0:
                break
            dh = dz @ self.W[i].T
            c = caches[i - 1]
            if "mask" in c:
                dh *= c["mask"]
                dh *= np.float32(1.0 / keep)
            dh *= c["relu"]
            if bn:
                xhat = c["xhat"]
                dgamma = (dh * xhat).sum(0)
                dbeta = dh.sum(0)
                dz = (self.gamma[i - 1] * c["inv"] / m) * (m * dh - dbeta - xhat * dgamma)
                ggamma[i - 1], gbeta[i - 1] = dgamma, dbeta
            else:
                gb_hidden[i - 1] = dh.sum(0)
                dz = dh
        grads = (gW + ggamma + gbeta + [gb_last]) if bn else (gW + gb_hidden + [gb_last])
        self._adam(grads)
        return loss

    def _adam(self, grads, b1=0.9, b2=0.999, eps=1e-8):
        self.t += 1
        lr_t = self.cfg.lr * math.sqrt(1 - b2 ** self.t) / (1 - b1 ** self.t)
        eps_hat = eps * math.sqrt(1 - b2 ** self.t)
        for p, g, v, s in zip(self.params, grads, self.m1, self.m2):
            v *= b1
            v += (1 - b1) * g
            s *= b2
            s += (1 - b2) * (g * g)
            p -= lr_t * v / (np.sqrt(s) + eps_hat)

    def epoch(self):
        B = self.batch
        for s in range(0, self.n_samples, B):
            self.step(self.X[s:s + B], self.y[s:s + B])


# --------------------------------------------------------------------------- registry

#: peer impl id -> (importable module that must be present, builder)
PEER_IMPLS: dict[str, tuple[str, Callable[..., Trainer]]] = {
    "torch-eager-foreach": ("torch", lambda cfg, X, y: TorchTrainer(cfg, X, y, "foreach")),
    "torch-eager-fused": ("torch", lambda cfg, X, y: TorchTrainer(cfg, X, y, "fused")),
    "torch-compile": ("torch", lambda cfg, X, y: TorchTrainer(cfg, X, y, "compile")),
    "torch-autocast-bf16": ("torch", lambda cfg, X, y: TorchTrainer(cfg, X, y, "autocast-bf16")),
    "jax-jit": ("optax", lambda cfg, X, y: JaxTrainer(cfg, X, y)),
    "sklearn-mlp": ("sklearn", lambda cfg, X, y: SklearnTrainer(cfg, X, y)),
    "numpy": ("numpy", lambda cfg, X, y: NumpyTrainer(cfg, X, y)),
}
