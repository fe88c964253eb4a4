"""Same speed must not cost accuracy (issue #5): fastdl vs PyTorch on the digits.

Not timed. For each architecture and seed, trains the same network with
fastdl (every available backend) and with PyTorch, on the bundled digits
(``fastdl.datasets.load_digits``, ``fastdl.data.train_dev_test_split(seed=0,
stratify=True)``: 60/20/20, standardised with a ``Standardizer`` fitted on the
training part), and prints the test accuracies as a markdown table.

Matched between the two: architecture, He-normal weights and zero biases
(each library draws its own numbers from the seed), Adam (lr, betas, eps),
epochs, batch size, the shuffle of every epoch (``fastdl.data.epoch_permutation``,
the same batches in the same order, the smaller last batch included),
BatchNorm momentum / eps, dropout keep probability, and the L2 penalty
(fastdl's ``lambda/(2m) sum ||W||^2`` = PyTorch ``weight_decay = lambda/m`` on
Linear weights only). Dropout masks and float rounding differ, so single
seeds differ by a few test examples; the check is on the mean over seeds.

Usage::

    python benchmarks/accuracy_vs_torch.py [--seeds 5] [--epochs 30] [--out accuracy.md]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import peers  # noqa: E402  (first: thread environment)
import numpy as np  # noqa: E402

ARCHS: dict[str, peers.Arch] = {
    "64-128-64-10 ReLU": peers.Arch((64, 128, 64, 10)),
    "64-128-64-10 BN+ReLU+Dropout(keep_prob=0.8), L2 1e-4": peers.Arch((64, 128, 64, 10), bn_dropout=True, keep=0.8,
                                                             l2=1e-4),
}
TOLERANCE_POINTS = 1.0


def digits_split():
    import fastdl as fd

    X, y = fd.datasets.load_digits()
    Xtr, Xdv, Xte, ytr, ydv, yte = fd.data.train_dev_test_split(X, y, seed=0, stratify=True)
    sc = fd.data.Standardizer().fit(Xtr)
    return (sc.transform(Xtr).astype(np.float32), ytr.astype(np.int64),
            sc.transform(Xte).astype(np.float32), yte.astype(np.int64))


def fastdl_accuracy(arch, backend, seed, data, epochs, batch, lr) -> float:
    import fastdl as fd

    Xtr, ytr, Xte, yte = data
    model = peers.fastdl_model(arch, backend, seed)
    model.fit(Xtr, ytr, optimizer=fd.Adam(lr=lr), epochs=epochs, batch_size=batch, shuffle=True)
    return model.evaluate(Xte, yte)["accuracy"]


def torch_accuracy(arch, seed, data, epochs, batch, lr) -> float:
    import torch
    import torch.nn.functional as F

    from fastdl.data import epoch_permutation

    Xtr, ytr, Xte, yte = data
    torch.manual_seed(seed)  # dropout masks
    model = peers.torch_mlp(arch, seed)
    opt = peers.torch_adam(model, arch, batch, lr, "foreach")
    Xt, yt = torch.from_numpy(Xtr), torch.from_numpy(ytr)
    m = Xt.shape[0]
    model.train()
    for epoch in range(epochs):
        perm = torch.from_numpy(epoch_permutation(m, seed, epoch))
        for s in range(0, m, batch):
            idx = perm[s:s + batch]
            if arch.l2 and idx.numel() != batch:  # fastdl's m is the size of THIS batch
                for g in opt.param_groups:
                    if g["weight_decay"]:
                        g["weight_decay"] = arch.l2 / idx.numel()
            loss = F.cross_entropy(model(Xt[idx]), yt[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if arch.l2 and idx.numel() != batch:
                for g in opt.param_groups:
                    if g["weight_decay"]:
                        g["weight_decay"] = arch.l2 / batch
    model.eval()
    with torch.no_grad():
        pred = model(torch.from_numpy(Xte)).argmax(1).numpy()
    return float(np.mean(pred == yte))


def run(seeds: int = 5, epochs: int = 30, batch: int = 32, lr: float = 1e-3,
        backends: list[str] | None = None) -> dict:
    """Train everything; return {'rows': [...], 'settings': {...}}."""
    import torch

    from fastdl.backends import available_backends

    peers.apply_thread_limits()
    backends = backends or available_backends()
    data = digits_split()
    rows = []
    for name, arch in ARCHS.items():
        acc: dict[str, list[float]] = {}
        t0 = time.perf_counter()
        for seed in range(seeds):
            for b in backends:
                acc.setdefault(f"fastdl-{b}", []).append(fastdl_accuracy(arch, b, seed, data, epochs, batch, lr))
            acc.setdefault("torch", []).append(torch_accuracy(arch, seed, data, epochs, batch, lr))
        rows.append({"arch": name, "acc": acc, "seconds": time.perf_counter() - t0})
    return {"rows": rows, "settings": {"seeds": seeds, "epochs": epochs, "batch": batch, "lr": lr,
                                       "n_train": int(data[0].shape[0]), "n_test": int(data[2].shape[0]),
                                       "torch": torch.__version__, "backends": backends}}


def to_markdown(result: dict) -> str:
    s = result["settings"]
    rows = result["rows"]
    impls = list(rows[0]["acc"])
    lines = [f"Digits, {s['n_train']} train / {s['n_test']} test examples (60/20/20 stratified split, seed 0, "
             f"standardised); Adam lr {s['lr']}, batch {s['batch']}, {s['epochs']} epochs, seeds 0..{s['seeds'] - 1}; "
             f"test accuracy in %, mean ± std over seeds [min-max]; PyTorch {s['torch']}.", ""]
    lines.append("| architecture | " + " | ".join(impls) + " | fastdl − torch (points) | within "
                 f"{TOLERANCE_POINTS:g} point |")
    lines.append("|---" * (len(impls) + 3) + "|")
    ok_all = True
    for r in rows:
        cells = []
        for k in impls:
            a = [100 * v for v in r["acc"][k]]
            sd = statistics.stdev(a) if len(a) > 1 else 0.0
            cells.append(f"{statistics.mean(a):.2f} ± {sd:.2f} [{min(a):.1f}-{max(a):.1f}]")
        t = 100 * statistics.mean(r["acc"]["torch"])
        diffs = {k: 100 * statistics.mean(r["acc"][k]) - t for k in impls if k != "torch"}
        ok = all(abs(d) <= TOLERANCE_POINTS for d in diffs.values())
        ok_all &= ok
        lines.append(f"| {r['arch']} | " + " | ".join(cells) + " | "
                     + ", ".join(f"{k[7:]} {d:+.2f}" for k, d in diffs.items())
                     + f" | {'yes' if ok else 'NO'} |")
    lines += ["", f"Accuracy check: {'PASS' if ok_all else 'FAIL'} (every fastdl backend within "
                  f"{TOLERANCE_POINTS:g} point of PyTorch on the mean test accuracy)."]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--out", help="also write the markdown table to this file")
    args = ap.parse_args(argv)
    md = to_markdown(run(args.seeds, args.epochs, args.batch, args.lr))
    print(md)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(md + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
