"""Kernel benchmarks: every backend side by side, float32.

Run (not part of the normal test run)::

    pytest benchmarks/test_bench_kernels.py --benchmark-only \
        --benchmark-min-rounds=20 --benchmark-columns=median,iqr,min,rounds \
        --benchmark-sort=name

Each case is one ``benchmark.group`` (e.g. ``adam 16M``) holding one
benchmark per available backend (``reference`` included), so the table shows
the backends next to each other. Inputs are seeded; state-updating kernels
(optimisers, BatchNorm running statistics) just keep updating the same arrays.
Results and ratios are recorded in ``benchmarks/README.md``. To turn a run
saved with ``--benchmark-json=kernels.json`` into that table (medians, speed-up
over ``reference`` within the same run)::

    python benchmarks/test_bench_kernels.py kernels.json [more.json ...]
"""
from __future__ import annotations

import numpy as np
import pytest

from fastdl.backends import available_backends, get_backend
from fastdl.backends.contract import RELU, TANH

BACKENDS = available_backends()
DT = np.float32

backend_param = pytest.mark.parametrize("bname", BACKENDS)


def _randn(rng, shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(DT)


def _run(benchmark, group, fn, **extra):
    benchmark.group = group
    benchmark.extra_info.update(extra)
    fn()                          # untimed: compile / load from cache, touch the pages
    benchmark(fn)


# --------------------------------------------------------------------------- dense


@backend_param
@pytest.mark.parametrize("m,n_in,n_out", [(128, 784, 512), (512, 2048, 2048)], ids=["128x784-512", "512x2048-2048"])
def test_dense_fwd_bwd(benchmark, bname, m, n_in, n_out):
    be = get_backend(bname).unchecked   # the raw kernels (the validated entries cost a few us more a call)
    rng = np.random.default_rng(0)
    A = _randn(rng, (m, n_in))
    W = _randn(rng, (n_in, n_out), 1 / np.sqrt(n_in))
    b = _randn(rng, (n_out,))
    out = np.empty((m, n_out), DT)
    dout = _randn(rng, (m, n_out))
    dZ, dW, db, dA = np.empty_like(out), np.empty_like(W), np.empty_like(b), np.empty_like(A)

    def step():
        be.dense_forward(A, W, b, RELU, out)
        be.dense_backward(A, W, out, dout, RELU, 1e-4, dZ, dW, db, dA)

    _run(benchmark, f"dense fwd+bwd {m}x{n_in}->{n_out} relu", step)


@backend_param
@pytest.mark.parametrize("act,name", [(RELU, "relu"), (TANH, "tanh")], ids=["relu", "tanh"])
def test_activation_fwd_bwd(benchmark, bname, act, name):
    be = get_backend(bname).unchecked   # the raw kernels (the validated entries cost a few us more a call)
    rng = np.random.default_rng(1)
    Z = _randn(rng, (512, 2048))
    out, dout, dZ = np.empty_like(Z), _randn(rng, Z.shape), np.empty_like(Z)

    def step():
        be.activation_forward(Z, act, out)
        be.activation_backward(out, dout, act, dZ)

    _run(benchmark, f"activation {name} fwd+bwd 512x2048", step)


# --------------------------------------------------------------------------- batchnorm


def _bn_arrays(m, n, seed=2):
    rng = np.random.default_rng(seed)
    Z = _randn(rng, (m, n)) + DT(3)
    gamma, beta = np.ones(n, DT), np.zeros(n, DT)
    rm, rv = np.zeros(n, DT), np.ones(n, DT)
    mean, inv_std = np.empty(n, DT), np.empty(n, DT)
    out, dout, dZ = np.empty_like(Z), _randn(rng, (m, n)), np.empty_like(Z)
    dgamma, dbeta = np.empty(n, DT), np.empty(n, DT)
    return Z, gamma, beta, rm, rv, mean, inv_std, out, dout, dZ, dgamma, dbeta


@backend_param
@pytest.mark.parametrize("m,n", [(128, 512), (512, 4096)], ids=["128x512", "512x4096"])
def test_batchnorm_fwd_bwd(benchmark, bname, m, n):
    be = get_backend(bname).unchecked   # the raw kernels (the validated entries cost a few us more a call)
    Z, gamma, beta, rm, rv, mean, inv_std, out, dout, dZ, dgamma, dbeta = _bn_arrays(m, n)

    def step():
        be.batchnorm_forward_train(Z, gamma, beta, 1e-5, 0.9, rm, rv, mean, inv_std, out)
        be.batchnorm_backward(Z, gamma, mean, inv_std, dout, dZ, dgamma, dbeta)

    _run(benchmark, f"batchnorm fwd+bwd {m}x{n}", step)


@backend_param
def test_batchnorm_infer(benchmark, bname):
    be = get_backend(bname).unchecked   # the raw kernels (the validated entries cost a few us more a call)
    Z, gamma, beta, rm, rv, mean, inv_std, out, *_ = _bn_arrays(512, 4096)
    _run(benchmark, "batchnorm infer 512x4096",
         lambda: be.batchnorm_forward_infer(Z, gamma, beta, rm, rv, 1e-5, out))


# --------------------------------------------------------------------------- losses


@backend_param
@pytest.mark.parametrize("m,k", [(128, 10), (512, 1000)], ids=["128x10", "512x1000"])
def test_softmax_cross_entropy(benchmark, bname, m, k):
    be = get_backend(bname).unchecked   # the raw kernels (the validated entries cost a few us more a call)
    rng = np.random.default_rng(3)
    Z = _randn(rng, (m, k), 3.0)
    y = rng.integers(0, k, size=m).astype(np.int64)
    dZ = np.empty_like(Z)
    _run(benchmark, f"softmax-CE loss+grad {m}x{k}", lambda: be.softmax_cross_entropy(Z, y, dZ))


@backend_param
def test_softmax(benchmark, bname):
    be = get_backend(bname).unchecked   # the raw kernels (the validated entries cost a few us more a call)
    rng = np.random.default_rng(4)
    Z = _randn(rng, (512, 1000), 3.0)
    out = np.empty_like(Z)
    _run(benchmark, "softmax 512x1000", lambda: be.softmax(Z, out))


@backend_param
def test_sigmoid_bce(benchmark, bname):
    be = get_backend(bname).unchecked   # the raw kernels (the validated entries cost a few us more a call)
    rng = np.random.default_rng(5)
    Z = _randn(rng, (4096, 1), 3.0)
    y = rng.integers(0, 2, size=4096).astype(DT)
    dZ = np.empty_like(Z)
    _run(benchmark, "sigmoid-BCE loss+grad 4096x1", lambda: be.sigmoid_bce(Z, y, dZ))


@backend_param
def test_mse(benchmark, bname):
    be = get_backend(bname).unchecked   # the raw kernels (the validated entries cost a few us more a call)
    rng = np.random.default_rng(6)
    Yhat, Y = _randn(rng, (512, 10)), _randn(rng, (512, 10))
    dZ = np.empty_like(Yhat)
    _run(benchmark, "mse loss+grad 512x10", lambda: be.mse(Yhat, Y, dZ))


@backend_param
@pytest.mark.parametrize("m,k", [(512, 10), (4096, 1)], ids=["512x10", "4096x1"])
def test_poisson(benchmark, bname, m, k):
    be = get_backend(bname).unchecked   # the raw kernels (the validated entries cost a few us more a call)
    rng = np.random.default_rng(6)
    Z = _randn(rng, (m, k))
    Y = rng.poisson(1.5, size=(m, k)).astype(DT)
    dZ = np.empty_like(Z)
    _run(benchmark, f"poisson loss+grad {m}x{k}", lambda: be.poisson(Z, Y, dZ))


# --------------------------------------------------------------------------- dropout


@backend_param
@pytest.mark.parametrize("m,n", [(128, 4096), (512, 4096)], ids=["128x4096", "512x4096"])
def test_dropout_fwd_bwd(benchmark, bname, m, n):
    be = get_backend(bname).unchecked   # the raw kernels (the validated entries cost a few us more a call)
    rng = np.random.default_rng(7)
    A = _randn(rng, (m, n))
    mask, out = np.empty((m, n), np.uint8), np.empty_like(A)
    dout, dA = _randn(rng, (m, n)), np.empty_like(A)

    def step():
        be.dropout_forward(A, 0.8, 1234, 17, 2, mask, out)
        be.dropout_backward(dout, mask, 0.8, dA)

    _run(benchmark, f"dropout fwd+bwd {m}x{n}", step)


# --------------------------------------------------------------------------- optimisers

M1, M16 = 1 << 20, 1 << 24


def _opt_arrays(n, seed=8):
    rng = np.random.default_rng(seed)
    p = _randn(rng, (n,))
    g = _randn(rng, (n,), 1e-2)
    return p, g, np.zeros(n, DT), np.zeros(n, DT)


@backend_param
@pytest.mark.parametrize("n,label", [(M1, "1M"), (M16, "16M")])
def test_adam(benchmark, bname, n, label):
    be = get_backend(bname).unchecked   # the raw kernels (the validated entries cost a few us more a call)
    p, g, v, s = _opt_arrays(n)
    t = [0]

    def step():
        t[0] += 1
        be.adam_step(p, g, v, s, 1e-3, 0.9, 0.999, 1e-8, t[0])

    _run(benchmark, f"adam {label} f32", step)


@backend_param
def test_sgd(benchmark, bname):
    be = get_backend(bname).unchecked   # the raw kernels (the validated entries cost a few us more a call)
    p, g, _, _ = _opt_arrays(M1)
    _run(benchmark, "sgd 1M f32", lambda: be.sgd_step(p, g, 1e-3))


@backend_param
@pytest.mark.parametrize("bias_correction", [False, True], ids=["plain", "bias-corrected"])
def test_momentum(benchmark, bname, bias_correction):
    be = get_backend(bname).unchecked   # the raw kernels (the validated entries cost a few us more a call)
    p, g, v, _ = _opt_arrays(M1)
    t = [0]

    def step():
        t[0] += 1   # c1 = lr, or lr / (1 - beta^t) bias-corrected (plan.step_coefficients)
        be.momentum_step(p, g, v, 0.9, 1e-3 / (1 - 0.9 ** t[0]) if bias_correction else 1e-3)

    _run(benchmark, f"momentum 1M f32 ({'bias-corrected' if bias_correction else 'plain'})", step)


@backend_param
def test_rmsprop(benchmark, bname):
    be = get_backend(bname).unchecked   # the raw kernels (the validated entries cost a few us more a call)
    p, g, _, s = _opt_arrays(M1)
    _run(benchmark, "rmsprop 1M f32", lambda: be.rmsprop_step(p, g, s, 1e-3, 0.999, 1e-8))


# --------------------------------------------------------------------------- reductions


@backend_param
@pytest.mark.parametrize("n,label", [(M1, "1M"), (M16, "16M")])
def test_sum_squares(benchmark, bname, n, label):
    be = get_backend(bname).unchecked   # the raw kernels (the validated entries cost a few us more a call)
    x = _randn(np.random.default_rng(9), (n,))
    _run(benchmark, f"sum_squares {label} f32", lambda: be.sum_squares(x))


# --------------------------------------------------------------------------- ratio table


def ratio_table(paths: list[str]) -> str:
    """Markdown table of medians and speed-ups over ``reference`` (one cell per run, ``a / b``)."""
    import json
    from collections import defaultdict

    runs = []
    for path in paths:
        with open(path) as fh:
            data = json.load(fh)
        groups: dict[str, dict[str, float]] = defaultdict(dict)
        for b in data["benchmarks"]:
            groups[b["group"]][(b.get("params") or {}).get("bname", b["name"])] = b["stats"]["median"]
        runs.append(groups)
    names = [n for n in ("reference", "numba", "cython") if any(n in g for r in runs for g in r.values())]

    def fmt(x):
        return "-" if x is None else (f"{x * 1e3:.3f} ms" if x >= 1e-3 else f"{x * 1e6:.1f} us")

    head = ["kernel (float32)"] + [c for n in names for c in ([n] if n == "reference" else [n, f"{n} speed-up"])]
    lines = ["| " + " | ".join(head) + " |", "|---" + "|---:" * (len(head) - 1) + "|"]
    for group in sorted(runs[0]):
        cells = [group]
        for n in names:
            cells.append(" / ".join(fmt(r[group].get(n)) for r in runs))
            if n != "reference":
                cells.append(" / ".join(
                    f"{r[group]['reference'] / r[group][n]:.1f}x" if n in r[group] and "reference" in r[group]
                    else "-" for r in runs))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    import sys

    if len(sys.argv) < 2:
        sys.exit("usage: python benchmarks/test_bench_kernels.py RUN.json [RUN2.json ...]")
    print(ratio_table(sys.argv[1:]))
