"""Does augmentation help on the 8x8 digits? Mean test accuracy over seeds (issue 16).

The README's model and fit call (64-128 BatchNorm ReLU Dropout(keep 0.9) 10,
Adam 3e-3, batch 32, InverseTimeDecay(0.1), early stopping on the dev set
with patience 5 and best-epoch restore; the README's stratified split, seed 0
by default, test set 359 examples: one example is 0.28 point), trained on the
full training set and on its first quarter, with no augmentation and with
each candidate augmenter. Prints a Markdown table: mean test accuracy (%) over
the runs (model seeds x split seeds), its standard deviation, and the mean
paired difference to no augmentation (same split and seed) with its standard
error.

    python benchmarks/augment_accuracy.py                  # the README's split, 5 model seeds, 40 epochs
    python benchmarks/augment_accuracy.py --split-seeds 0 1 2 3 4 --seeds 3   # 15 runs per cell
    python benchmarks/augment_accuracy.py --seeds 3 --only none for_digits
"""
from __future__ import annotations

import argparse
import time

import numpy as np

import fastdl as fd
from fastdl import augment as A


def candidates() -> dict:
    """name -> augmenter factory taking the split's Standardizer (None = no augmentation)."""
    aug = A.Augmenter
    return {
        "none": None,
        "for_digits() (rotate 10 deg, translate 0.5 px, zoom 0.9-1.1, p=0.5)":
            lambda sc: A.for_digits(standardizer=sc),
        "  the same, std_floor=None": lambda sc: A.for_digits(standardizer=sc, std_floor=None),
        "  the same, p=1": lambda sc: A.for_digits(standardizer=sc, p=1.0),
        "  the same + 1-pixel shifts": lambda sc: A.for_digits(standardizer=sc, max_shift=1),
        "old for_digits (1-pixel shift + rotate 10 deg, p=1, std_floor=None)": lambda sc: aug(
            [A.RandomShift(1), A.RandomRotation(10)], image_shape=(8, 8), standardizer=sc, std_floor=None),
        "old for_digits with std_floor=0.25": lambda sc: aug(
            [A.RandomShift(1), A.RandomRotation(10)], image_shape=(8, 8), standardizer=sc),
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
    ap.add_argument("--seeds", type=int, default=5, help="model seeds 0..N-1 per split (default: %(default)s)")
    ap.add_argument("--split-seeds", type=int, nargs="+", default=[0],
                    help="seeds of the train/dev/test split (default: 0, the README's)")
    ap.add_argument("--epochs", type=int, default=40, help="epochs per fit (default: %(default)s)")
    ap.add_argument("--only", nargs="*", default=None, help="run only the candidates whose name starts so")
    args = ap.parse_args(argv)
    X, y = fd.datasets.load_digits()
    splits = []
    for ss in args.split_seeds:
        Xtr, Xdv, Xte, ytr, ydv, yte = fd.data.train_dev_test_split(X, y, seed=ss, stratify=True)
        scaler = fd.data.Standardizer().fit(Xtr)
        Xtr, Xdv, Xte = (scaler.transform(a) for a in (Xtr, Xdv, Xte))
        splits.append((scaler, (Xtr, ytr, Xdv, ydv, Xte, yte)))
    n_tr = len(splits[0][1][0])
    sizes = {"full": None, "quarter": n_tr // 4}
    cands = candidates()
    if args.only:
        cands = {k: v for k, v in cands.items() if any(k.strip().startswith(o) for o in args.only)}
    n_runs = len(splits) * args.seeds
    print(f"digits, split seeds {args.split_seeds}: train {n_tr} (quarter {sizes['quarter']}), "
          f"dev {len(splits[0][1][2])}, test {len(splits[0][1][4])}; {args.seeds} model seeds per split "
          f"({n_runs} runs per cell), up to {args.epochs} epochs, early stopping on dev")
    results = {}
    t0 = time.perf_counter()
    for name, factory in cands.items():
        for size, n in sizes.items():
            accs = [run(name, None if factory is None else (lambda f=factory, sc=sc: f(sc)), data, s, args.epochs, n)
                    for sc, data in splits for s in range(args.seeds)]
            results[name, size] = np.array(accs)
            print(f"  {name[:60]:<60} {size:<8} {np.mean(accs):6.2f}  {np.round(accs, 2).tolist()}", flush=True)
    print(f"({time.perf_counter() - t0:.0f} s)\n")
    # vs none: the mean of the paired differences (same split, same model seed) and its standard error
    print("| augmentation | full training set | vs none | quarter | vs none |")
    print("|---|---|---|---|---|")
    for name in cands:
        row = [name.strip()]
        for size in sizes:
            a = results[name, size]
            row.append(f"{a.mean():.2f} ± {a.std(ddof=1) if len(a) > 1 else 0:.2f}")
            if name == "none" or ("none", size) not in results:
                row.append("")
            else:
                d = a - results["none", size]
                se = d.std(ddof=1) / np.sqrt(len(d)) if len(d) > 1 else 0.0
                row.append(f"{d.mean():+.2f} ± {se:.2f}")
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
