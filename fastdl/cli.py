"""The ``fastdl`` command: ``fastdl train`` trains an MLP on the digits (or a data file)."""
from __future__ import annotations

import argparse
import builtins
import sys
import time
from typing import Sequence

import numpy as np

from . import layers as L
from .backends import BACKEND_NAMES, BackendUnavailable
from .callbacks import EarlyStopping
from .data import Standardizer, load_dataset, train_dev_test_split
from .datasets import load_digits
from .distributed import DistributedError
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


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option shows its default in words; options such as --no-batchnorm are never split at the hyphen."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if ("default:" in text or action.default is argparse.SUPPRESS or action.option_strings == ["-h", "--help"]
                or not action.option_strings):  # positionals are required: no default to show
            return text
        if action.default is None:
            return text + " (default: off)"
        if isinstance(action, argparse._StoreTrueAction):
            return text + (" (default: off)" if not action.default else " (default: on)")
        if isinstance(action, argparse.BooleanOptionalAction):
            return text + (" (default: on)" if action.default else " (default: off)")
        return text + " (default: %(default)s)"

    def _split_lines(self, text: str, width: int) -> list[str]:
        import textwrap

        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastdl", description="Fast CPU training of dense neural networks.")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train an MLP (digits by default) and report train/dev/test error",
                       formatter_class=_HelpFormatter,
                       description="Train an MLP (Dense -> [BatchNorm] -> activation -> [Dropout] per hidden "
                       "layer, softmax output) on standardised data split 60/20/20 into train/dev/test.")
    t.add_argument("--data", default=None, metavar="PATH", help="data file (.npz with X/y, .csv with the label "
                   "last, IDX) (default: the bundled 8x8 digits)")
    t.add_argument("--hidden", type=_int_list, default="128,64", metavar="SIZES",
                   help="hidden layer sizes, comma-separated")
    t.add_argument("--activation", choices=["relu", "tanh", "sigmoid"], default="relu",
                   help="hidden-layer activation")
    t.add_argument("--batchnorm", action=argparse.BooleanOptionalAction, default=True,
                   help="BatchNorm after each hidden Dense layer; --no-batchnorm turns it off (each Dense then "
                   "has a bias)")
    t.add_argument("--keep-prob", type=float, default=0.9,
                   help="dropout keep probability per hidden layer (1 = no dropout; Keras/PyTorch rate = 1 - this)")
    t.add_argument("--l2", type=float, default=1e-3, help="L2 strength lambda (SPEC.md: lambda/(2m) sum ||W||^2)")
    t.add_argument("--optimizer", choices=sorted(OPTIMIZERS), default="adam",
                   help="optimiser (momentum = the course's EWA form; classical_momentum = PyTorch's SGD momentum)")
    t.add_argument("--lr", type=float, default=3e-3, help="learning rate (initial one with --schedule)")
    t.add_argument("--beta", type=float, default=0.9, help="momentum beta (--optimizer momentum)")
    t.add_argument("--beta1", type=float, default=0.9, help="Adam beta1 (first-moment EWA)")
    t.add_argument("--beta2", type=float, default=0.999, help="Adam / RMSprop beta2")
    t.add_argument("--eps", type=float, default=1e-8, help="Adam / RMSprop epsilon")
    t.add_argument("--schedule", choices=sorted(SCHEDULES), default="constant",
                   help="learning-rate decay per epoch")
    t.add_argument("--decay-rate", type=float, default=0.1, help="decay rate of --schedule inverse_time")
    t.add_argument("--epochs", type=int, default=40, help="training epochs (maximum with --patience)")
    t.add_argument("--batch-size", type=int, default=32, help="mini-batch size (per rank with --distributed)")
    t.add_argument("--patience", type=int, default=0, help="early stopping patience on dev loss (0 = off)")
    t.add_argument("--backend", choices=list(BACKEND_NAMES) + ["auto"], default="auto",
                   help="kernel backend (auto: Cython, then Numba, then NumPy per kernel)")
    t.add_argument("--dtype", choices=["float32", "float64"], default="float32", help="parameter and data dtype")
    t.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                   help="matrix-product precision: bf16 rounds the Dense products' inputs to bfloat16 "
                   "(float32 parameters and accumulation; needs --dtype float32)")
    t.add_argument("--seed", type=int, default=0, help="seed of the split, initialisation, shuffling and dropout")
    t.add_argument("--save", default=None, metavar="PATH",
                   help="write the trained model (and its standardizer) here")
    t.add_argument("--export-onnx", default=None, metavar="PATH",
                   help="write the trained model's inference graph as ONNX here, e.g. model.onnx (float32; takes raw "
                   "features, outputs logits and probabilities; needs pip install 'fastdl[onnx]')")
    t.add_argument("--verbose", type=int, default=1, choices=[0, 1, 2],
                   help="0 quiet, 1 progress bar, 2 one line per epoch")
    t.add_argument("--distributed", action="store_true",
                   help="data-parallel training over MPI: run as `mpiexec -n N python -m fastdl train --distributed "
                   "...`; --batch-size is per rank (global batch = N x batch size); only rank 0 prints and saves "
                   "(needs pip install 'fastdl[mpi]')")
    t.add_argument("--sync-batchnorm", action="store_true",
                   help="with --distributed: BatchNorm statistics over the global batch instead of per rank")
    t.add_argument("--optimal-error", type=float, default=0.0,
                   help="optimal (Bayes / human-level) error for the bias/variance diagnosis printed after training")
    t.add_argument("--plot", default=None, metavar="PATH",
                   help="write learning curves (cost, error, mini-batch cost with its EWA, lr, gradient norms) "
                   "to this image, e.g. curves.png (needs pip install 'fastdl[plot]')")
    _add_search_parser(sub)
    _add_export_parser(sub)
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
    keep_prob = L.check_unit_interval("keep_prob", keep_prob)  # 1.5 must not silently mean "no dropout"
    init = "he" if activation == "relu" else "xavier"
    out, d = [], n_in
    for h in hidden:
        out.append(L.Dense(d, h, init=init, use_bias=not batchnorm))
        if batchnorm:
            out.append(L.BatchNorm(h))
        out.append(act())
        if keep_prob < 1.0:
            out.append(L.Dropout(keep_prob=keep_prob))
        d = h
    out.append(L.Dense(d, n_out, init="xavier" if activation != "relu" else "he"))
    return out


def train(args) -> int:
    t_start = time.perf_counter()
    if args.plot:
        _check_plot(args.plot)
    if args.export_onnx:
        from .onnx import _import_onnx

        _import_onnx()  # fail before training, not after, when the extra is missing
    if args.precision != "fp32" and args.dtype != "float32":
        raise ValueError(f"--precision {args.precision} needs --dtype float32 (bf16 products keep float32 "
                         f"parameters), got --dtype {args.dtype}")
    comm = None
    if args.distributed:
        from .distributed import world

        comm = world()
    # only rank 0 prints (and saves); the other ranks run the same code quietly
    print = builtins.print if comm is None or comm.rank == 0 else _quiet  # noqa: A001
    name, shape, (Xtr, Xdv, Xte, ytr, ydv, yte), scaler = _labelled_split(args)
    n_classes = int(max(part.max() for part in (ytr, ydv, yte) if len(part))) + 1

    layers = build_mlp(shape[1], args.hidden, n_classes, activation=args.activation,
                       batchnorm=args.batchnorm, keep_prob=args.keep_prob)
    # precision= only when asked: fp32 runs also work with a Sequential that predates it
    extra = {"precision": args.precision} if args.precision != "fp32" else {}
    model = Sequential(layers, loss="softmax_cross_entropy", l2=args.l2, dtype=args.dtype,
                       backend=args.backend, seed=args.seed, **extra)
    opt = _optimizer(args)
    schedule = get_schedule(args.schedule, **({"decay_rate": args.decay_rate}
                                              if args.schedule == "inverse_time" else {}))
    callbacks = [EarlyStopping(patience=args.patience)] if args.patience > 0 else []
    print(f"data: {name}: {shape[0]} examples, {shape[1]} features, {n_classes} classes; "
          f"split train/dev/test = {len(ytr)}/{len(ydv)}/{len(yte)}")
    print(model.summary())
    t0 = time.perf_counter()
    history = model.fit(Xtr, ytr, optimizer=opt, epochs=args.epochs, batch_size=args.batch_size,
                        validation_data=(Xdv, ydv), lr_schedule=schedule, callbacks=callbacks,
                        verbose=args.verbose, distributed=comm if comm is not None else False,
                        sync_batchnorm=args.sync_batchnorm)
    t_fit = time.perf_counter() - t0
    results = {part: model.evaluate(Xp, yp) for part, Xp, yp in
               (("train", Xtr, ytr), ("dev", Xdv, ydv), ("test", Xte, yte))}
    # the compiled backends' BLAS (fastdl.backends.blas), once one of them has been loaded
    gemm = sys.modules["fastdl.backends.blas"].info()["provider"] if "fastdl.backends.blas" in sys.modules else None
    # the one-time Numba compilation (History.compile_time) is not training: keep it out of time and throughput
    compile_s = float(getattr(history, "compile_time", 0.0) or 0.0)
    t_train = max(t_fit - compile_s, 1e-9)
    print(f"trained {len(history.epoch)} epochs in {t_train:.2f} s "
          f"({len(ytr) * len(history.epoch) / t_train:,.0f} examples/s, backend={args.backend}"
          + (f", GEMMs on {gemm}" if gemm else "")
          + (f", {comm.size} ranks x batch {args.batch_size}" if comm is not None else "") + ")"
          + (f" + {compile_s:.2f} s one-time compilation (cached on disk)" if compile_s >= 0.005 else ""))
    for part, r in results.items():
        print(f"{part:>5}: error {r['error']:.4f}  accuracy {r['accuracy']:.4f}  loss {r['loss']:.4f}")
    from .diagnose import diagnose

    print(diagnose(results["train"]["error"], results["dev"]["error"], optimal_error=args.optimal_error))
    if args.plot and (comm is None or comm.rank == 0):
        from .plotting import plot_history

        plot_history(history, args.plot, title=f"fastdl train: {name}, hidden {args.hidden}")
        print(f"wrote learning curves to {args.plot}")
    if args.save and (comm is None or comm.rank == 0):
        from .io import save_model

        save_model(model, args.save, optimizer=opt, metadata={"standardizer": scaler.to_dict()})
        print(f"saved model to {args.save}")
    if args.export_onnx and (comm is None or comm.rank == 0):
        model.to_onnx(args.export_onnx, standardizer=scaler)
        print(f"exported the inference graph to {args.export_onnx} (ONNX; input: raw features, the "
              f"standardisation is part of the graph)")
    print(f"total time {time.perf_counter() - t_start:.2f} s")
    return 0


def _quiet(*args, **kwargs) -> None:
    pass


# ------------------------------------------------------------------ fastdl search
#: What ``fastdl search`` samples unless --param overrides it.
SEARCH_SPACE_DEFAULT = (
    "lr=log:1e-4:1e-1", "l2=log:1e-5:1e-1", "units=intlog:16:256", "n_layers=int:1:3",
    "keep_prob=uniform:0.6:1.0", "batchnorm=choice:true,false", "beta1=beta:0.8:0.99",
    "batch_size=choice:16,32,64,128",
)


def _add_search_parser(sub) -> None:
    s = sub.add_parser(
        "search", help="random hyperparameter search (coarse to fine, in parallel) with a ranked table",
        formatter_class=_HelpFormatter,
        description="Random search over MLP settings, scored on the dev set. The default space samples "
        + ", ".join(SEARCH_SPACE_DEFAULT) + ". Override or add settings with --param NAME=SPEC, SPEC one of "
        "log:LOW:HIGH, uniform:LOW:HIGH, int:LOW:HIGH, intlog:LOW:HIGH, beta:MIN:MAX (1-beta on a log scale), "
        "choice:A,B,... or a constant (e.g. --param batchnorm=false, --param hidden=choice:64,128x64).")
    s.add_argument("--data", default=None, metavar="PATH", help="data file (.npz with X/y, .csv with the label "
                   "last, IDX) (default: the bundled 8x8 digits)")
    s.add_argument("--param", action="append", default=[], metavar="NAME=SPEC",
                   help="a setting to sample or fix (repeatable) (default: the space above)")
    s.add_argument("--trials", type=int, default=20, help="trials per round")
    s.add_argument("--rounds", type=int, default=2, help="coarse-to-fine rounds")
    s.add_argument("--top-k", type=int, default=3, help="best trials the next round's ranges shrink around")
    s.add_argument("--shrink", type=float, default=0.5, help="range width factor per round")
    s.add_argument("--epochs", type=int, default=10, help="epochs per trial (unless --param epochs=...)")
    s.add_argument("--n-jobs", type=int, default=-1, help="local worker processes (-1 = all cores, 1 = serial)")
    s.add_argument("--scheduler", default=None, metavar="ADDRESS",
                   help="run the trials on this Dask scheduler, e.g. tcp://10.0.0.5:8786 "
                   "(needs pip install 'fastdl[dask]')")
    s.add_argument("--seed", type=int, default=0, help="seed of the split, the sampling and every trial")
    s.add_argument("--backend", choices=list(BACKEND_NAMES) + ["auto"], default="auto",
                   help="kernel backend of the trials (auto: Cython, then Numba, then NumPy per kernel)")
    s.add_argument("--dtype", choices=["float32", "float64"], default="float32", help="parameter and data dtype")
    s.add_argument("--top", type=int, default=20, help="rows of the ranked table (0 = all)")
    s.add_argument("--optimal-error", type=float, default=0.0, help="for the diagnosis of the best model")
    s.add_argument("--save", default=None, metavar="PATH", help="write the best model (and its standardizer) here")
    s.add_argument("--plot", default=None, metavar="PATH",
                   help="write dev error against each sampled setting to this image (needs 'fastdl[plot]')")
    s.add_argument("--verbose", type=int, default=1, help="0 quiet, 1 one line per round")


def _check_plot(path: str) -> None:
    """Fail before training, not after, when plots cannot be written."""
    from .plotting import _mpl

    _mpl()


def _labelled_split(args):
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
            raise SystemExit(f"fastdl {args.command}: labels must be class ids (whole numbers)")
        y = y.astype(np.int64)
    parts = train_dev_test_split(X, y, seed=args.seed, stratify=True)
    scaler = Standardizer().fit(parts[0])
    Xtr, Xdv, Xte = (scaler.transform(a) for a in parts[:3])
    return name, X.shape, (Xtr, Xdv, Xte) + tuple(parts[3:]), scaler


def search_command(args) -> int:
    """``fastdl search``: random search on a data file, ranked table, best model's test error."""
    from .diagnose import diagnose
    from .search import parse_setting, search

    t_start = time.perf_counter()
    if args.plot:
        _check_plot(args.plot)
    space = dict(parse_setting(p) for p in SEARCH_SPACE_DEFAULT)
    space["epochs"] = args.epochs
    for p in args.param:
        k, v = parse_setting(p)
        space[k] = v
    if "hidden" in space:  # explicit architectures replace the n_layers x units parametrisation
        space.pop("n_layers", None)
        space.pop("units", None)
    name, shape, (Xtr, Xdv, Xte, ytr, ydv, yte), scaler = _labelled_split(args)
    print(f"data: {name}: {shape[0]} examples, {shape[1]} features; "
          f"split train/dev/test = {len(ytr)}/{len(ydv)}/{len(yte)}")
    print("space: " + ", ".join(f"{k}={v!r}" for k, v in space.items()))
    result = search(space, Xtr, ytr, validation_data=(Xdv, ydv), n_trials=args.trials, rounds=args.rounds,
                    top_k=args.top_k, shrink=args.shrink, seed=args.seed, n_jobs=args.n_jobs,
                    scheduler=args.scheduler, backend=args.backend, dtype=args.dtype, verbose=args.verbose)
    n = len(result.trials)
    print(f"{n} trials in {result.time:.2f} s on {result.executor}")
    print(result.table(args.top or None))
    best, model = result.best_trial, result.best_model
    print(f"best: trial {best.id} (round {best.round}): " + ", ".join(f"{k}={v}" for k, v in best.settings.items()))
    te = model.evaluate(Xte, yte)
    print(f"best model: train error {best.train_error:.4f}  dev error {best.dev_error:.4f}  "
          f"test error {te['error']:.4f}")
    print(diagnose(best.train_error, best.dev_error, optimal_error=args.optimal_error))
    if args.plot:
        result.plot(args.plot)
        print(f"wrote the search plot to {args.plot}")
    if args.save:
        from .io import save_model

        save_model(model, args.save, metadata={"standardizer": scaler.to_dict(), "search_settings":
                                               {k: list(v) if isinstance(v, tuple) else v
                                                for k, v in best.settings.items()}})
        print(f"saved the best model to {args.save}")
    print(f"total time {time.perf_counter() - t_start:.2f} s")
    return 0


# ------------------------------------------------------------- fastdl export-onnx
def _add_export_parser(sub) -> None:
    e = sub.add_parser(
        "export-onnx", help="convert a saved model (fastdl train/search --save) to ONNX for inference",
        formatter_class=_HelpFormatter,
        description="Write the inference graph of a saved fastdl model as ONNX (float32, dynamic batch; outputs "
        "logits and probabilities). The standardizer saved with the model by `fastdl train --save` goes into "
        "the graph, so the ONNX model takes raw features. Needs pip install 'fastdl[onnx]'.")
    e.add_argument("model", metavar="MODEL", help="a model file written by fastdl (model.save, --save)")
    e.add_argument("output", metavar="OUTPUT", help="the ONNX file to write, e.g. model.onnx")
    e.add_argument("--opset", type=int, default=17, help="ONNX operator set version (13 or newer)")
    e.add_argument("--standardizer", action=argparse.BooleanOptionalAction, default=True,
                   help="put the model file's saved standardizer into the graph; --no-standardizer exports a "
                   "graph that takes standardised features")
    e.add_argument("--fold-batchnorm", action=argparse.BooleanOptionalAction, default=True,
                   help="fold BatchNorm into the preceding Gemm; --no-fold-batchnorm keeps BatchNormalization "
                   "nodes")


def export_command(args) -> int:
    """``fastdl export-onnx MODEL OUTPUT``: a saved model (and its standardizer) to ONNX."""
    from .io import load_metadata, load_model
    from .onnx import _import_onnx

    _import_onnx()
    model = load_model(args.model, backend="reference")  # export reads parameters only: no kernels needed
    scaler = None
    if args.standardizer:
        meta = load_metadata(args.model) or {}
        if "standardizer" in meta:
            scaler = Standardizer.from_dict(meta["standardizer"])
    model.to_onnx(args.output, opset=args.opset, fold_batchnorm=args.fold_batchnorm, standardizer=scaler)
    what = ("raw features (the saved standardizer is in the graph)" if scaler is not None else
            "standardised features" + (" (the model file has no standardizer)" if args.standardizer else ""))
    print(f"wrote {args.output}: {model.n_features} inputs -> {model.n_outputs} outputs, loss "
          f"{model.loss.name}; input: {what}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fastdl`` console script."""
    args = build_parser().parse_args(argv)
    try:
        if args.command == "train":
            return train(args)
        if args.command == "search":
            return search_command(args)
        if args.command == "export-onnx":
            return export_command(args)
    except (ValueError, TypeError, FileNotFoundError, BackendUnavailable, DistributedError, ImportError,
            NotImplementedError) as exc:
        print(f"fastdl {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
