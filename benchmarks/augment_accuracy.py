"""Does augmentation help on the 8x8 digits? Mean test accuracy over seeds (issue 16).

The README's model and fit call (64-128 BatchNorm ReLU Dropout(keep 0.9) 10,
Adam 3e-3, batch 32, InverseTimeDecay(0.1), early stopping on the dev set
with patience 5 and best-epoch restore; the README's stratified split, seed 0,
test set 360 examples: one example is 0.28 point), trained on the full
training set and on its first quarter, with no augmentation and with each
candidate augmenter. Prints a Markdown table: mean test accuracy (%) over the
seeds, its standard deviation, and the difference to no augmentation.

    python benchmarks/augment_accuracy.py                  # the default set, 5 seeds, 40 epochs
    python benchmarks/augment_accuracy.py --seeds 3 --only none for_digits
"""
from __future__ import annotations

import argparse
import time

import numpy as np

import fastdl as fd
from fastdl import augment as A


def candidates(scaler) -> dict:
    """name -> augmenter factory (None = no augmentation)."""
    aug = A.Augmenter
    return {
        "none": None,
        "for_digits() (rotate 10 deg, translate 0.5 px, zoom 0.9-1.1, p=0.5)":
            lambda: A.for_digits(standardizer=scaler),
        "  the same, std_floor=None": lambda: A.for_digits(standardizer=scaler, std_floor=None),
        "  the same, p=1": lambda: A.for_digits(standardizer=scaler, p=1.0),
        "  the same + 1-pixel shifts": lambda: A.for_digits(standardizer=scaler, max_shift=1),
        "old for_digits (1-pixel shift + rotate 10 deg, p=1, std_floor=None)": lambda: aug(
            [A.RandomShift(1), A.RandomRotation(10)], image_shape=(8, 8), standardizer=scaler, std_floor=None),
        "old for_digits with std_floor=0.25": lambda: aug(
            [A.RandomShift(1), A.RandomRotation(10)], image_shape=(8, 8), standardizer=scaler),
    }


def run(name, factory, data, seed: int, epochs: int, n_train: int | None) -> float:
    Xtr, ytr, Xdv, ydv, Xte, yte = data
    if n_train is not None:
        Xtr, ytr = Xtr[:n_train], ytr[:n_train]
    model = fd.Sequential([
        fd.Dense(64, 128, init="he", use_bias=False), fd.BatchNorm(128, momentum=0.9, eps=1e-5),
        fd.ReLU(), fd.Dropout(keep_prob=0.9), fd.Dense(128, 10),
    ], loss="softmax_cross_entropy", l2=1e-3, dtype="float32", backend="auto", seed=seed)
    model.fit(Xtr, ytr, optimizer=fd.Adam(lr=3e-3), epochs=epochs, batch_size=32,
              validation_data=(Xdv, ydv), lr_schedule=fd.schedules.InverseTimeDecay(decay_rate=0.1),
              callbacks=[fd.EarlyStopping(patience=5, restore_best=True)], verbose=0,
              augment=None if factory is None else factory())
    return 100.0 * model.evaluate(Xte, yte)["accuracy"]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=5, help="model seeds 0..N-1 (default: %(default)s)")
    ap.add_argument("--epochs", type=int, default=40, help="epochs per fit (default: %(default)s)")
    ap.add_argument("--only", nargs="*", default=None, help="run only the candidates whose name starts so")
    args = ap.parse_args(argv)
    X, y = fd.datasets.load_digits()
    Xtr, Xdv, Xte, ytr, ydv, yte = fd.data.train_dev_test_split(X, y, seed=0, stratify=True)
    scaler = fd.data.Standardizer().fit(Xtr)
    Xtr, Xdv, Xte = (scaler.transform(a) for a in (Xtr, Xdv, Xte))
    data = (Xtr, ytr, Xdv, ydv, Xte, yte)
    sizes = {"full": None, "quarter": len(Xtr) // 4}
    cands = candidates(scaler)
    if args.only:
        cands = {k: v for k, v in cands.items() if any(k.strip().startswith(o) for o in args.only)}
    print(f"digits: train {len(Xtr)} (quarter {sizes['quarter']}), dev {len(Xdv)}, test {len(Xte)}; "
          f"{args.seeds} seeds, up to {args.epochs} epochs, early stopping on dev")
    results = {}
    t0 = time.perf_counter()
    for name, factory in cands.items():
        for size, n in sizes.items():
            accs = [run(name, factory, data, s, args.epochs, n) for s in range(args.seeds)]
            results[name, size] = np.array(accs)
            print(f"  {name[:60]:<60} {size:<8} {np.mean(accs):6.2f}  {np.round(accs, 2).tolist()}", flush=True)
    print(f"({time.perf_counter() - t0:.0f} s)\n")
    print("| augmentation | full training set | vs none | quarter | vs none |")
    print("|---|---|---|---|---|")
    for name in cands:
        row = [name]
        for size in sizes:
            a = results[name, size]
            row.append(f"{a.mean():.2f} ± {a.std(ddof=1) if len(a) > 1 else 0:.2f}")
            row.append("" if name == "none" or ("none", size) not in results
                       else f"{a.mean() - results['none', size].mean():+.2f}")
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
