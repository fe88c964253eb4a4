"""Peer comparison (issue #5): fastdl beside PyTorch, torch.compile, JAX, scikit-learn and NumPy.

Run everything (about 10-15 minutes on 2 cores) and write RESULTS.md + results.png::

    mkdir -p .benchmarks && python -m pytest benchmarks/test_bench_peers.py --benchmark-only \\
        --benchmark-json .benchmarks/peers.json && python benchmarks/summarize.py .benchmarks/peers.json

(pytest-benchmark does not create the JSON's directory.)

Options: ``--threads N`` (or ``FASTDL_BENCH_THREADS=N``) limits every library
to N threads (environment, threadpoolctl, torch/numba ``set_num_threads``, and
CPU affinity for JAX: see ``peers.py``); ``FASTDL_BENCH_QUICK=1`` is a smoke test
(small epochs, 2 rounds; add ``--benchmark-min-rounds=1 --benchmark-max-time=0.05``
for the kernel groups). ``FASTDL_BENCH_CONFIGS=S,L`` restricts the training
configs; select the rest with ``-k``: ``-k test_train``, ``-k vs_torch``, ``-k "jax or fastdl"``.

Groups (one ``benchmark.group`` each, every implementation side by side):

* ``train S`` / ``train M`` / ``train L``: steady-state training. One round is
  one epoch over in-memory float32 data, mini-batches in order; two untimed
  warm-up epochs (JIT, torch.compile, caches) come first. Rounds: the
  config's count (7, 7, 5), fewer (never below 3) for an implementation
  whose epoch is so slow that they would exceed ``FASTDL_BENCH_BUDGET_S``
  (default 12 s per benchmark). ``extra_info['samples_per_s']`` = examples
  per epoch / median epoch time.
* ``sgemm L``: NumPy float32 matmul at the L config's shapes (the 9 GEMMs
  of one step), ``extra_info['gflops']``; PyTorch's at the same shapes.
* ``vs-torch ...``: kernels against PyTorch, one call per round, float32.

A peer that is not installed is skipped (``pytest.importorskip``), never faked;
scikit-learn is skipped where the config is not expressible (M: BatchNorm, dropout).
"""
from __future__ import annotations

import gc
import time

import peers  # first: sets the thread environment before numpy & co are imported
import numpy as np
import pytest
from peers import CONFIGS, PEER_IMPLS

QUICK = peers.quick_mode()
TRAIN_CONFIGS = peers.selected_configs()
FASTDL = {v.impl: v for v in peers.fastdl_variants()}
TRAIN_IMPLS = list(FASTDL) + list(PEER_IMPLS)


def _info(benchmark, **kw):
    benchmark.extra_info.update(threads=peers.apply_thread_limits(), quick=QUICK, **kw)


def _median(benchmark) -> float:
    return benchmark.stats.stats.median


# --------------------------------------------------------------------------- training configs


def _build_trainer(impl: str, cfg, X, y):
    if impl in FASTDL:
        trainer = peers.FastdlTrainer(cfg, X, y, FASTDL[impl])
    else:
        module, build = PEER_IMPLS[impl]
        pytest.importorskip(module)
        if impl == "sklearn-mlp" and not peers.sklearn_expressible(cfg.arch):
            pytest.skip(f"config {cfg.name} is not expressible in MLPClassifier (BatchNorm / dropout / L2 on W only)")
        trainer = build(cfg, X, y)
    peers.apply_thread_limits()  # the implementation's libraries are loaded now
    return trainer


@pytest.mark.parametrize("impl", TRAIN_IMPLS)
@pytest.mark.parametrize("config", TRAIN_CONFIGS)
def test_train(benchmark, config, impl):
    cfg = CONFIGS[config]
    n = cfg.samples(QUICK)
    X, y = peers.make_data(n, cfg.arch.dims[0], cfg.arch.dims[-1], seed=0)
    trainer = _build_trainer(impl, cfg, X, y)
    try:
        trainer.epoch()  # untimed warm-up: JIT / torch.compile / allocations
    except Exception as exc:
        if impl == "torch-compile":
            pytest.skip(f"torch.compile failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
        raise
    t0 = time.perf_counter()
    trainer.epoch()  # second warm-up epoch, timed only to size the rounds
    rounds = 2 if QUICK else peers.train_rounds(cfg, time.perf_counter() - t0)
    benchmark.group = f"train {config}"
    benchmark.pedantic(trainer.epoch, rounds=rounds, iterations=1, warmup_rounds=0)
    med = _median(benchmark)
    extra = {}
    if impl == "sklearn-mlp":
        extra["sklearn_dtype"] = str(trainer.dtype)
    if impl in FASTDL:  # which backend really ran each kernel (a backend may fall back per kernel)
        extra["kernel_sources"] = dict(trainer.model.kernels.sources)
        extra["backend"] = FASTDL[impl].backend
    _info(benchmark, kind="train", impl=impl, config=config, description=cfg.description, n_samples=n,
          batch=cfg.batch, steps_per_round=trainer.n_steps, samples_per_s=n / med,
          us_per_step=med / trainer.n_steps * 1e6, gflops=n * cfg.flops_per_sample / med / 1e9, **extra)
    del trainer
    gc.collect()


# --------------------------------------------------------------------------- sgemm at the L shapes


def _gemm_shapes(dims, m):
    """(a, b, transpose_a, transpose_b) of the 9 GEMMs of a step: forward, dW, dX per layer."""
    out = []
    for n_in, n_out in zip(dims[:-1], dims[1:]):
        out.append(((m, n_in), (n_in, n_out), False, False))  # Z = A @ W
        out.append(((m, n_in), (m, n_out), True, False))  # dW = A.T @ dZ
        out.append(((m, n_out), (n_in, n_out), False, True))  # dA = dZ @ W.T
    return out


@pytest.mark.parametrize("impl", ["numpy", "torch"])
def test_sgemm_L(benchmark, impl):
    cfg = CONFIGS["L"]
    m = cfg.batch
    rng = np.random.default_rng(0)
    ops = []
    for sa, sb, ta, tb in _gemm_shapes(cfg.arch.dims, m):
        a = rng.standard_normal(sa, dtype=np.float32)
        b = rng.standard_normal(sb, dtype=np.float32)
        rows, cols = (sa[1] if ta else sa[0]), (sb[0] if tb else sb[1])
        ops.append((a, b, ta, tb, np.empty((rows, cols), np.float32)))
    if impl == "numpy":
        lib = "numpy " + np.__version__
        nops = [(a.T if ta else a, b.T if tb else b, c) for a, b, ta, tb, c in ops]

        def run():
            for a, b, c in nops:
                np.matmul(a, b, out=c)
    else:
        torch = _torch()
        lib = "torch " + torch.__version__
        tops = []
        for a, b, ta, tb, c in ops:
            at, bt = torch.from_numpy(a), torch.from_numpy(b)
            tops.append((at.T if ta else at, bt.T if tb else bt, torch.from_numpy(c)))

        def run():
            for a, b, c in tops:
                torch.mm(a, b, out=c)
    run()
    run()
    benchmark.group = "sgemm L"
    benchmark.pedantic(run, rounds=3 if QUICK else 15, iterations=1, warmup_rounds=1)
    flops = m * cfg.flops_per_sample
    _info(benchmark, kind="sgemm", impl=f"{impl}-sgemm", config="L", library=lib, flops_per_round=flops,
          gflops=flops / _median(benchmark) / 1e9)


# --------------------------------------------------------------------------- kernels vs PyTorch


def _kernel_impls(torch_variants):
    from fastdl.backends import available_backends

    return [f"fastdl-{b}" for b in available_backends()] + list(torch_variants)


def _torch():
    torch = pytest.importorskip("torch")
    peers.apply_thread_limits()
    return torch


def _fastdl_kernels(impl):
    from fastdl.backends import get_backend

    return get_backend(impl[len("fastdl-"):])


def _source(impl, *kernels):
    if not impl.startswith("fastdl"):
        return None
    return "/".join(_fastdl_kernels(impl).sources[k] for k in kernels)


def _kernel_bench(benchmark, group, impl, fn, source=None, **extra):
    if source is not None:  # the backend that really provides the kernel (fallbacks are per kernel)
        extra["kernel_source"] = source
    for _ in range(3):
        fn()  # JIT / page touching / allocator warm-up
    benchmark.group = f"vs-torch {group}"
    benchmark(fn)
    if impl.startswith("fastdl"):
        extra["backend"] = impl[len("fastdl-"):]
    _info(benchmark, kind="kernel", impl=impl, kernel=group, us_per_call=_median(benchmark) * 1e6, **extra)


@pytest.mark.parametrize("impl", _kernel_impls(["torch"]))
@pytest.mark.parametrize("shape", [(512, 4096), (128, 4096)], ids=["512x4096", "128x4096"])
def test_vs_torch_dropout_fwd(benchmark, shape, impl):
    rng = np.random.default_rng(0)
    A = rng.standard_normal(shape, dtype=np.float32)
    keep = 0.8
    if impl.startswith("fastdl"):
        K = _fastdl_kernels(impl)
        mask, out = np.empty(shape, np.uint8), np.empty_like(A)

        def fn():
            K.dropout_forward(A, keep, 0, 7, 1, mask, out)
    else:
        torch = _torch()
        F = torch.nn.functional
        x = torch.from_numpy(A)

        def fn():
            return F.dropout(x, p=1 - keep, training=True)
    _kernel_bench(benchmark, f"dropout fwd {shape[0]}x{shape[1]}", impl, fn,
                  source=_source(impl, "dropout_forward"), shape=list(shape))


@pytest.mark.parametrize("impl", _kernel_impls(["torch-autograd"]))
@pytest.mark.parametrize("shape", [(128, 10), (512, 1000)], ids=["128x10", "512x1000"])
def test_vs_torch_softmax_ce(benchmark, shape, impl):
    rng = np.random.default_rng(1)
    Z = rng.standard_normal(shape, dtype=np.float32)
    y = rng.integers(0, shape[1], shape[0]).astype(np.int64)
    if impl.startswith("fastdl"):
        K = _fastdl_kernels(impl)
        dZ = np.empty_like(Z)

        def fn():
            return K.softmax_cross_entropy(Z, y, dZ)
    else:
        torch = _torch()
        F = torch.nn.functional
        z = torch.from_numpy(Z.copy()).requires_grad_()
        yt = torch.from_numpy(y)

        def fn():
            z.grad = None
            loss = F.cross_entropy(z, yt)
            loss.backward()
            return loss
    _kernel_bench(benchmark, f"softmax-CE fwd+bwd {shape[0]}x{shape[1]}", impl, fn,
                  source=_source(impl, "softmax_cross_entropy"), shape=list(shape))


@pytest.mark.parametrize("impl", _kernel_impls(["torch-autograd"]))
@pytest.mark.parametrize("shape", [(128, 512), (512, 4096)], ids=["128x512", "512x4096"])
def test_vs_torch_batchnorm(benchmark, shape, impl):
    m, n = shape
    rng = np.random.default_rng(2)
    Z = rng.standard_normal(shape, dtype=np.float32) * 2 + 0.5
    dout = rng.standard_normal(shape, dtype=np.float32)
    gamma = rng.uniform(0.5, 1.5, n).astype(np.float32)
    beta = rng.standard_normal(n, dtype=np.float32)
    if impl.startswith("fastdl"):
        K = _fastdl_kernels(impl)
        rm, rv = np.zeros(n, np.float32), np.ones(n, np.float32)
        mean, inv_std, out = np.empty(n, np.float32), np.empty(n, np.float32), np.empty_like(Z)
        dZ, dgamma, dbeta = np.empty_like(Z), np.empty_like(gamma), np.empty_like(beta)

        def fn():
            K.batchnorm_forward_train(Z, gamma, beta, 1e-5, 0.9, rm, rv, mean, inv_std, out)
            K.batchnorm_backward(Z, gamma, mean, inv_std, dout, dZ, dgamma, dbeta)
    else:
        torch = _torch()
        F = torch.nn.functional
        x = torch.from_numpy(Z.copy()).requires_grad_()
        w = torch.from_numpy(gamma.copy()).requires_grad_()
        b = torch.from_numpy(beta.copy()).requires_grad_()
        rm, rv = torch.zeros(n), torch.ones(n)
        g = torch.from_numpy(dout)

        def fn():
            x.grad = w.grad = b.grad = None
            out = F.batch_norm(x, rm, rv, w, b, training=True, momentum=0.1, eps=1e-5)
            out.backward(g)
    _kernel_bench(benchmark, f"BatchNorm fwd+bwd {m}x{n}", impl, fn,
                  source=_source(impl, "batchnorm_forward_train", "batchnorm_backward"), shape=list(shape))


@pytest.mark.parametrize("impl", _kernel_impls(["torch-adam-foreach", "torch-adam-fused"]))
@pytest.mark.parametrize("n", [1 << 20, 1 << 24], ids=["1M", "16M"])
def test_vs_torch_adam(benchmark, n, impl):
    rng = np.random.default_rng(3)
    p0 = rng.standard_normal(n, dtype=np.float32)
    g0 = rng.standard_normal(n, dtype=np.float32) * np.float32(1e-2)
    lr, b1, b2, eps = 1e-3, 0.9, 0.999, 1e-8
    if impl.startswith("fastdl"):
        K = _fastdl_kernels(impl)
        p, v, s = p0, np.zeros_like(p0), np.zeros_like(p0)
        t = [0]

        def fn():
            t[0] += 1
            K.adam_step(p, g0, v, s, lr, b1, b2, eps, t[0])
    else:
        torch = _torch()
        param = torch.nn.Parameter(torch.from_numpy(p0))
        param.grad = torch.from_numpy(g0)
        kw = {"foreach": True} if impl.endswith("foreach") else {"fused": True}
        opt = torch.optim.Adam([param], lr=lr, betas=(b1, b2), eps=eps, **kw)
        fn = opt.step
    label = f"{n >> 20}M"
    _kernel_bench(benchmark, f"Adam {label} params", impl, fn, source=_source(impl, "adam_step"), n_params=n)
    del fn
    gc.collect()

