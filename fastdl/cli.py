"""The ``fastdl`` command: ``fastdl train`` trains an MLP on the digits (or a data file)."""
from __future__ import annotations

import argparse
import sys
import time
from typing import Sequence

import numpy as np

from . import layers as L
from .backends import BACKEND_NAMES
from .callbacks import EarlyStopping
from .data import Standardizer, load_dataset, train_dev_test_split
from .datasets import load_digits
from .model import Sequential
from .optim import OPTIMIZERS, get_optimizer
from .schedules import SCHEDULES, get_schedule


def _int_list(text: str) -> list[int]:
    try:
        sizes = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 128,64, got {text!r}") from None
    if any(s < 1 for s in sizes):
        raise argparse.ArgumentTypeError(f"layer sizes must be >= 1, got {text!r}")
    return sizes


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastdl", description="Fast CPU training of dense neural networks.")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train an MLP (digits by default) and report train/dev/test error",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    t.add_argument("--data", default=None, help="data file (.npz with X/y, .csv with the label last, IDX); "
                   "default: the bundled 8x8 digits")
    t.add_argument("--hidden", type=_int_list, default=[128, 64], help="hidden layer sizes, e.g. 128,64")
    t.add_argument("--activation", choices=["relu", "tanh", "sigmoid"], default="relu")
    t.add_argument("--no-batchnorm", dest="batchnorm", action="store_false", help="disable BatchNorm")
    t.add_argument("--keep-prob", type=float, default=0.9, help="dropout keep probability (1 = no dropout)")
    t.add_argument("--l2", type=float, default=1e-3, help="L2 strength lambda")
    t.add_argument("--optimizer", choices=sorted(OPTIMIZERS), default="adam")
    t.add_argument("--lr", type=float, default=3e-3)
    t.add_argument("--beta", type=float, default=0.9, help="momentum beta")
    t.add_argument("--beta1", type=float, default=0.9)
    t.add_argument("--beta2", type=float, default=0.999)
    t.add_argument("--eps", type=float, default=1e-8)
    t.add_argument("--schedule", choices=sorted(SCHEDULES), default="constant")
    t.add_argument("--decay-rate", type=float, default=0.1, help="for inverse_time")
    t.add_argument("--epochs", type=int, default=40)
    t.add_argument("--batch-size", type=int, default=32)
    t.add_argument("--patience", type=int, default=0, help="early stopping patience on dev loss (0 = off)")
    t.add_argument("--backend", choices=list(BACKEND_NAMES) + ["auto"], default="auto")
    t.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--save", default=None, help="write the trained model (and its standardizer) here")
    t.add_argument("--verbose", type=int, default=1, help="0 quiet, 1 progress bar on a terminal, 2 per epoch")
    return p


def _optimizer(args):
    kw = {"lr": args.lr}
    if args.optimizer == "momentum":
        kw["beta"] = args.beta
    elif args.optimizer == "rmsprop":
        kw.update(beta2=args.beta2, eps=args.eps)
    elif args.optimizer == "adam":
        kw.update(beta1=args.beta1, beta2=args.beta2, eps=args.eps)
    return get_optimizer(args.optimizer, **kw)


def build_mlp(n_in: int, hidden: Sequence[int], n_out: int, *, activation: str = "relu",
              batchnorm: bool = True, keep_prob: float = 1.0) -> list[L.Layer]:
    """Layers of an MLP: each hidden block Dense -> [BatchNorm] -> activation -> [Dropout]."""
    act = {"relu": L.ReLU, "tanh": L.Tanh, "sigmoid": L.Sigmoid}[activation]
    init = "he" if activation == "relu" else "xavier"
    out, d = [], n_in
    for h in hidden:
        out.append(L.Dense(d, h, init=init, use_bias=not batchnorm))
        if batchnorm:
            out.append(L.BatchNorm(h))
        out.append(act())
        if keep_prob < 1.0:
            out.append(L.Dropout(keep_prob))
        d = h
    out.append(L.Dense(d, n_out, init="xavier" if activation != "relu" else "he"))
    return out


def train(args) -> int:
    t_start = time.perf_counter()
    if args.data:
        X, y = load_dataset(args.data)
        if y is None:
            raise SystemExit(f"fastdl: {args.data} has no labels")
        name = args.data
    else:
        X, y = load_digits()
        name = "digits (8x8, bundled)"
    y = np.asarray(y)
    if y.dtype.kind == "f":
        if not np.all(y == np.round(y)):
            raise SystemExit("fastdl train: labels must be class ids (whole numbers)")
        y = y.astype(np.int64)
    n_classes = int(y.max()) + 1
    Xtr, Xdv, Xte, ytr, ydv, yte = train_dev_test_split(X, y, seed=args.seed, stratify=True)
    scaler = Standardizer().fit(Xtr)
    Xtr, Xdv, Xte = (scaler.transform(a) for a in (Xtr, Xdv, Xte))

    layers = build_mlp(X.shape[1], args.hidden, n_classes, activation=args.activation,
                       batchnorm=args.batchnorm, keep_prob=args.keep_prob)
    model = Sequential(layers, loss="softmax_cross_entropy", l2=args.l2, dtype=args.dtype,
                       backend=args.backend, seed=args.seed)
    opt = _optimizer(args)
    schedule = get_schedule(args.schedule, **({"decay_rate": args.decay_rate}
                                              if args.schedule == "inverse_time" else {}))
    callbacks = [EarlyStopping(patience=args.patience)] if args.patience > 0 else []
    print(f"data: {name}: {X.shape[0]} examples, {X.shape[1]} features, {n_classes} classes; "
          f"split train/dev/test = {len(ytr)}/{len(ydv)}/{len(yte)}")
    print(model.summary())
    t0 = time.perf_counter()
    history = model.fit(Xtr, ytr, optimizer=opt, epochs=args.epochs, batch_size=args.batch_size,
                        validation_data=(Xdv, ydv), lr_schedule=schedule, callbacks=callbacks,
                        verbose=args.verbose)
    t_fit = time.perf_counter() - t0
    results = {part: model.evaluate(Xp, yp) for part, Xp, yp in
               (("train", Xtr, ytr), ("dev", Xdv, ydv), ("test", Xte, yte))}
    print(f"trained {len(history.epoch)} epochs in {t_fit:.2f} s "
          f"({len(ytr) * len(history.epoch) / t_fit:,.0f} examples/s, backend={args.backend})")
    for part, r in results.items():
        print(f"{part:>5}: error {r['error']:.4f}  accuracy {r['accuracy']:.4f}  loss {r['loss']:.4f}")
    if args.save:
        from .io import save_model

        save_model(model, args.save, optimizer=opt, metadata={"standardizer": scaler.to_dict()})
        print(f"saved model to {args.save}")
    print(f"total time {time.perf_counter() - t_start:.2f} s")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fastdl`` console script."""
    args = build_parser().parse_args(argv)
    try:
        if args.command == "train":
            return train(args)
    except (ValueError, TypeError, FileNotFoundError) as exc:
        print(f"fastdl {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
