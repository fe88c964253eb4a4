"""Does bfloat16 training cost accuracy? fp32 vs bf16, same model, seeds and epochs (issue 13).

    python benchmarks/bf16_accuracy.py [--seeds 5] [--rows 100000] [--epochs 5] [--threads N] [--out FILE]

Two experiments, each fp32 vs precision="bf16" with everything else equal:

* digits: the README's quick-start model (BatchNorm + dropout + Adam, 40 epochs) on the bundled
  8x8 digits; test accuracy, mean over ``--seeds`` seeds (the test split has ~359 examples, so one
  example is 0.28 point);
* synthetic data that can be learnt (``sklearn.datasets.make_classification``: 784 features,
  10 classes, 64 informative) at the benchmark's M shape (784-512-256-10, BN + ReLU + dropout,
  batch 128) and L shape (784-2048-2048-10, batch 512); dev accuracy after the same epochs.

Prints a Markdown table (and writes it to ``--out``); the CPU and which unit ran the bf16 GEMMs
(``fastdl.backends.blas.info()``) are printed with it.
"""
from __future__ import annotations

import argparse
import platform

import numpy as np

import fastdl as fd


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def digits_model(precision: str, seed: int) -> fd.Sequential:
    return fd.Sequential([
        fd.Dense(64, 128, init="he", use_bias=False), fd.BatchNorm(128, momentum=0.9, eps=1e-5),
        fd.ReLU(), fd.Dropout(keep_prob=0.9), fd.Dense(128, 10),
    ], loss="softmax_cross_entropy", l2=1e-3, dtype="float32", precision=precision, seed=seed)


def digits(seeds: int) -> dict[str, list[float]]:
    """Test accuracy of the quick-start model per precision, one entry per seed (split and init)."""
    X, y = fd.datasets.load_digits()
    out: dict[str, list[float]] = {"fp32": [], "bf16": []}
    for seed in range(seeds):
        Xtr, Xdv, Xte, ytr, ydv, yte = fd.data.train_dev_test_split(X, y, seed=seed, stratify=True)
        sc = fd.data.Standardizer().fit(Xtr)
        Xtr, Xdv, Xte = (sc.transform(a) for a in (Xtr, Xdv, Xte))
        for precision in out:
            m = digits_model(precision, seed)
            m.fit(Xtr, ytr, optimizer=fd.Adam(lr=3e-3), epochs=40, batch_size=32,
                  lr_schedule=fd.schedules.InverseTimeDecay(decay_rate=0.1))
            out[precision].append(m.evaluate(Xte, yte)["accuracy"])
    return out


def mlp(dims: tuple[int, ...], bn_dropout: bool, precision: str, seed: int) -> fd.Sequential:
    layers: list = []
    for i in range(len(dims) - 2):
        if bn_dropout:
            layers += [fd.Dense(dims[i], dims[i + 1], use_bias=False), fd.BatchNorm(dims[i + 1]), fd.ReLU(),
                       fd.Dropout(keep_prob=0.9)]
        else:
            layers += [fd.Dense(dims[i], dims[i + 1]), fd.ReLU()]
    layers.append(fd.Dense(dims[-2], dims[-1]))
    return fd.Sequential(layers, l2=1e-4 if bn_dropout else 0.0, precision=precision, seed=seed)


def synthetic(rows: int, epochs: int, seed: int = 0) -> list[tuple[str, str, float, float]]:
    """(shape, precision, dev accuracy, training seconds) at the M and L shapes on learnable data."""
    from sklearn.datasets import make_classification

    X, y = make_classification(n_samples=rows, n_features=784, n_informative=64, n_redundant=64,
                               n_classes=10, n_clusters_per_class=2, class_sep=1.5, random_state=seed)
    X = X.astype(np.float32)
    n_dev = rows // 10
    Xtr, ytr, Xdv, ydv = X[n_dev:], y[n_dev:], X[:n_dev], y[:n_dev]
    sc = fd.data.Standardizer().fit(Xtr)
    Xtr, Xdv = sc.transform(Xtr), sc.transform(Xdv)
    res = []
    for name, dims, bn, batch in (("M", (784, 512, 256, 10), True, 128), ("L", (784, 2048, 2048, 10), False, 512)):
        for precision in ("fp32", "bf16"):
            m = mlp(dims, bn, precision, seed)
            hist = m.fit(Xtr, ytr, optimizer=fd.Adam(lr=1e-3), epochs=epochs, batch_size=batch)
            res.append((name, precision, m.evaluate(Xdv, ydv)["accuracy"], float(hist.time)))
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="kernel/BLAS threads (default: fastdl's)")
    ap.add_argument("--skip-synthetic", action="store_true", help="digits only")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    from fastdl.backends import blas

    with fd.backends.use("auto", threads=args.threads):
        bi = blas.info()
        lines = [f"CPU: {cpu_name()}; bf16 GEMMs: {bi.get('bf16_gemm')} (unit: {bi.get('bf16_unit')}); "
                 f"BLAS: {bi.get('provider')}; threads: {args.threads or 'default'}", ""]
        d = digits(args.seeds)
        f32, b16 = np.mean(d["fp32"]) * 100, np.mean(d["bf16"]) * 100
        per_seed = ", ".join(f"{a * 100:.1f}/{b * 100:.1f}" for a, b in zip(d["fp32"], d["bf16"]))
        lines += ["| data, model | fp32 | bf16 | bf16 − fp32 |", "|---|---:|---:|---:|",
                  f"| digits, README model, 40 epochs, test accuracy, mean of {args.seeds} seeds | {f32:.2f}% | "
                  f"{b16:.2f}% | {b16 - f32:+.2f} |"]
        notes = [f"digits per seed (fp32/bf16): {per_seed}"]
        if not args.skip_synthetic:
            syn = synthetic(args.rows, args.epochs)
            for shape in ("M", "L"):
                r = {p: (acc, t) for s, p, acc, t in syn if s == shape}
                lines.append(f"| make_classification {args.rows:,} rows (784 features, 10 classes), {shape} shape, "
                             f"{args.epochs} epochs, dev accuracy | {r['fp32'][0] * 100:.2f}% | "
                             f"{r['bf16'][0] * 100:.2f}% | {(r['bf16'][0] - r['fp32'][0]) * 100:+.2f} |")
                notes.append(f"{shape} training time (s, shared machine): fp32 {r['fp32'][1]:.1f}, "
                             f"bf16 {r['bf16'][1]:.1f}")
    verdict = "within" if abs(b16 - f32) <= 0.5 else "NOT within"
    notes.append(f"digits: bf16 mean is {verdict} 0.5 point of fp32 (issue 13)")
    text = "\n".join(lines + [""] + notes)
    print(text)
    if args.out:
        from fastdl._atomic import atomic_write

        atomic_write(args.out, lambda fh: fh.write((text + "\n").encode()))


if __name__ == "__main__":
    main()
