"""fastdl.sklearn.MLPClassifier vs scikit-learn's MLPClassifier: same data, same settings.

    python benchmarks/bench_sklearn.py                 # all data sets, 5 runs each (3 for the large one)
    python benchmarks/bench_sklearn.py --repeats 3 --datasets digits wine --dtype float32

Both estimators get identical parameters (``hidden_layer_sizes=(100,)``,
``solver='adam'``, ``random_state=0``, defaults otherwise; ``max_iter=200``,
or 30 for the large synthetic set) on the same standardised 75/25 split.
fastdl.sklearn reproduces scikit-learn's initialisation, shuffles and
stopping rule, so both run (nearly) the same number of epochs: the time
ratio is the speed of one epoch. Reported: the median wall time of
``--repeats`` fits (runs of the two libraries interleaved, so a noisy
neighbour hits both), the ratio of the medians, test accuracy and
``n_iter_``. scikit-learn runs twice per repeat: with its BLAS's default
thread count, and limited to one BLAS thread (threadpoolctl), which is
often faster for these small GEMMs, especially on a busy machine.
The CPU model is printed with the table.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
import warnings

import numpy as np


def _datasets(names):
    from sklearn.datasets import load_breast_cancer, load_digits, load_wine, make_classification

    makers = {
        "digits": lambda: load_digits(return_X_y=True),
        "breast_cancer": lambda: load_breast_cancer(return_X_y=True),
        "wine": lambda: load_wine(return_X_y=True),
        "synthetic_20k": lambda: make_classification(n_samples=20000, n_features=100, n_informative=40,
                                                     n_classes=5, random_state=0),
    }
    for name in names:
        yield name, makers[name]()


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def run(names, repeats: int, dtype: str, backend: str) -> list[dict]:
    import sklearn.neural_network as skn
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits  # a scikit-learn dependency

    import fastdl.sklearn as fds

    rows = []
    for name, (X, y) in _datasets(names):
        Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=0.25, random_state=0, stratify=y)
        sc = StandardScaler().fit(Xtr)
        Xtr, Xte = sc.transform(Xtr).astype(dtype), sc.transform(Xte).astype(dtype)
        params = dict(hidden_layer_sizes=(100,), solver="adam", random_state=0,
                      max_iter=30 if name.startswith("synthetic") else 200)
        reps = max(1, repeats if not name.startswith("synthetic") else min(repeats, 3))
        times = {"fastdl": [], "sklearn": [], "sklearn_1t": []}
        result = {}
        for _ in range(reps):
            for lib, cls, extra, threads in (("fastdl", fds.MLPClassifier, {"backend": backend}, None),
                                             ("sklearn", skn.MLPClassifier, {}, None),
                                             ("sklearn_1t", skn.MLPClassifier, {}, 1)):
                est = cls(**params, **extra)
                with warnings.catch_warnings(), threadpool_limits(threads):
                    warnings.simplefilter("ignore", ConvergenceWarning)
                    t0 = time.perf_counter()
                    est.fit(Xtr, ytr)
                    times[lib].append(time.perf_counter() - t0)
                result[lib] = (float(est.score(Xte, yte)), int(est.n_iter_))
        med = {k: statistics.median(v) for k, v in times.items()}
        rows.append({"dataset": name, "n_train": int(Xtr.shape[0]), "n_features": int(Xtr.shape[1]),
                     "dtype": dtype, "max_iter": params["max_iter"], "repeats": reps,
                     "fastdl_s": med["fastdl"], "sklearn_s": med["sklearn"], "sklearn_1t_s": med["sklearn_1t"],
                     "speedup": med["sklearn"] / med["fastdl"], "speedup_1t": med["sklearn_1t"] / med["fastdl"],
                     "fastdl_acc": result["fastdl"][0], "sklearn_acc": result["sklearn"][0],
                     "fastdl_iter": result["fastdl"][1], "sklearn_iter": result["sklearn"][1],
                     "fastdl_times": times["fastdl"], "sklearn_times": times["sklearn"],
                     "sklearn_1t_times": times["sklearn_1t"]})
        r = rows[-1]
        print(f"{name}: fastdl {r['fastdl_s']:.3f}s  sklearn {r['sklearn_s']:.3f}s  x{r['speedup']:.1f}  "
              f"sklearn 1 BLAS thread {r['sklearn_1t_s']:.3f}s x{r['speedup_1t']:.1f}  "
              f"acc {r['fastdl_acc']:.4f} / {r['sklearn_acc']:.4f}  iters {r['fastdl_iter']} / "
              f"{r['sklearn_iter']}", flush=True)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| data set (train rows x features) | dtype | fastdl.sklearn | scikit-learn | speed-up | "
             "scikit-learn, 1 BLAS thread | speed-up | accuracy fastdl / sklearn | epochs fastdl / sklearn |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['dataset']} ({r['n_train']} x {r['n_features']}) | {r['dtype']} | "
                     f"{r['fastdl_s']:.3f} s | {r['sklearn_s']:.3f} s | {r['speedup']:.1f}x | "
                     f"{r['sklearn_1t_s']:.3f} s | {r['speedup_1t']:.1f}x | "
                     f"{r['fastdl_acc']:.3f} / {r['sklearn_acc']:.3f} | {r['fastdl_iter']} / {r['sklearn_iter']} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", nargs="+", default=["digits", "breast_cancer", "wine", "synthetic_20k"])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dtype", default="float64", choices=["float64", "float32"])
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--json", help="also write the rows (with every run's time) to this file")
    args = ap.parse_args(argv)
    import sklearn

    import fastdl

    rows = run(args.datasets, args.repeats, args.dtype, args.backend)
    print()
    print(f"CPU: {_cpu()}; fastdl {fastdl.__version__} backend={args.backend}; scikit-learn {sklearn.__version__}; "
          f"numpy {np.__version__}")
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cpu": _cpu(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
