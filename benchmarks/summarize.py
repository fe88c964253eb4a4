"""Turn a peer-comparison run (pytest-benchmark JSON) into RESULTS.md and a bar chart.

    python benchmarks/summarize.py .benchmarks/peers.json [--out benchmarks/RESULTS.md]
        [--png benchmarks/results.png] [--accuracy accuracy.md | --no-accuracy]
        [--also .benchmarks/peers-1thread.json]

Every ratio is computed within the one run in the JSON (medians of its
rounds). Unless ``--accuracy FILE`` (a table written by
``accuracy_vs_torch.py --out FILE``) or ``--no-accuracy`` is given, the
accuracy check (fastdl vs PyTorch on the digits, about a minute) is run here
and its table included.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap
from collections import defaultdict

HERE = os.path.dirname(os.path.abspath(__file__))
TRAIN_GROUPS = ("train S", "train M", "train L")
EAGER = ("torch-eager-foreach", "torch-eager-fused")


def is_fastdl(impl: str) -> bool:
    return impl.startswith("fastdl")


def is_fastdl_fp32(impl: str) -> bool:
    return is_fastdl(impl) and "bf16" not in impl


# --------------------------------------------------------------------------- loading


def load(path: str) -> dict:
    with open(path) as fh:
        data = json.load(fh)
    groups: dict[str, dict[str, dict]] = defaultdict(dict)
    for b in data["benchmarks"]:
        info = b.get("extra_info", {})
        impl = info.get("impl") or (b.get("params") or {}).get("impl") or b["name"]
        st = b["stats"]
        groups[b["group"] or b["name"]][impl] = {
            "median": st["median"], "iqr": st["iqr"], "q1": st["q1"], "q3": st["q3"], "min": st["min"],
            "rounds": st["rounds"], "info": info,
        }
    data["groups"] = groups
    return data


def _order(groups: dict) -> list[str]:
    first = [g for g in TRAIN_GROUPS if g in groups] + [g for g in groups if g.startswith("sgemm")]
    return first + sorted(g for g in groups if g not in first)


def best_fastdl(rows: dict[str, dict], fp32: bool = True) -> tuple[str, dict] | tuple[None, None]:
    """The fastest fastdl variant of a group (float32 variants only unless ``fp32=False``)."""
    f = {k: v for k, v in rows.items() if (is_fastdl_fp32(k) if fp32 else is_fastdl(k))}
    if not f:
        return None, None
    k = min(f, key=lambda k: f[k]["median"])
    return k, f[k]


def speedup(rows, fast_impl, other_impl) -> float | None:
    """How many times faster ``fast_impl`` is than ``other_impl`` (ratio of median times)."""
    if fast_impl not in rows or other_impl not in rows:
        return None
    return rows[other_impl]["median"] / rows[fast_impl]["median"]


# --------------------------------------------------------------------------- formatting


def fmt_time(sec: float) -> str:
    if sec >= 1:
        return f"{sec:.3f} s"
    if sec >= 1e-3:
        return f"{sec * 1e3:.2f} ms"
    return f"{sec * 1e6:.2f} µs"


def fmt_num(x: float | None, digits: int = 3) -> str:
    if x is None:
        return "—"
    if x >= 1e6:
        return f"{x / 1e6:.2f}M"
    if x >= 1e3:
        return f"{x / 1e3:.1f}k"
    return f"{x:.{digits}g}"


def fmt_ratio(r: float | None) -> str:
    return "—" if r is None else f"{r:.2f}×"


def machine_section(data: dict) -> list[str]:
    mi = data.get("machine_info", {})
    cpu = mi.get("cpu", {})
    fb = mi.get("fastdl_bench", {})
    thr = fb.get("threads", {})
    ver = fb.get("versions", {})
    flags = cpu.get("flags") or []
    simd = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_tile") if f in flags]
    req = thr.get("requested_threads")
    lines = ["## Machine", "",
             f"- CPU: {cpu.get('brand_raw', mi.get('processor', '?'))}, {cpu.get('count', thr.get('cpu_count', '?'))} "
             f"cores{' (' + ', '.join(simd) + ')' if simd else ''}; {mi.get('system', '')} {mi.get('release', '')}",
             f"- Threads: {req if req else 'library defaults (all cores)'}"
             f" — torch {thr.get('torch_threads', '?')}, numba {thr.get('numba_threads', '?')} "
             f"(layer {thr.get('numba_threading_layer')}), XLA_FLAGS='{thr.get('XLA_FLAGS', '')}', "
             f"CPU affinity {thr.get('cpu_affinity', '?')}",
             "- Versions: " + ", ".join(f"{k} {v}" for k, v in ver.items() if v),
             "- BLAS / OpenMP in use (threadpoolctl):"]
    for p in thr.get("threadpools", []):
        lines.append(f"  - {p.get('user_api')}: {p.get('internal_api')} {p.get('version') or ''} "
                     f"({p.get('prefix')}, {p.get('num_threads')} threads"
                     f"{', ' + p['architecture'] if p.get('architecture') else ''}) "
                     f"`{os.path.basename(p.get('filepath') or '')}`")
    if thr.get("fastdl_blas"):
        fb = thr["fastdl_blas"]
        lines.append(f"  - fastdl's GEMMs (numba and cython): {fb.get('provider')} "
                     f"`{os.path.basename(fb.get('library') or '')}` ({fb.get('why')})")
    if thr.get("torch_blas"):
        lines.append(f"  - PyTorch's own GEMMs: {thr['torch_blas']} (statically linked, not seen by threadpoolctl)")
    ci = data.get("commit_info", {})
    lines.append(f"- Run: {data.get('datetime', '?')}, commit {str(ci.get('id', '?'))[:10]}"
                 f"{' (dirty tree)' if ci.get('dirty') else ''}, pytest-benchmark {data.get('version', '?')}")
    return lines + [""]


def group_table(name: str, rows: dict[str, dict]) -> list[str]:
    kind = next(iter(rows.values()))["info"].get("kind", "")
    fastdl = sorted((k for k in rows if is_fastdl(k)), key=lambda k: rows[k]["median"])
    order = sorted(rows, key=lambda k: rows[k]["median"])
    head = ["impl", "median", "IQR", "spread", "rounds"]
    if kind == "train":
        head += ["samples/s", "µs/step", "GFLOP/s"]
    elif kind == "sgemm":
        head += ["GFLOP/s"]
    head += [f"{f} speedup" for f in fastdl] if kind != "sgemm" else []
    info0 = next(iter(rows.values()))["info"]
    title = f"### {name}"
    if info0.get("description"):
        title += f": {info0['description']} ({info0.get('n_samples')} samples/round)"
    out = [title, "", "| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for k in order:
        r = rows[k]
        label = f"**{k}**" if is_fastdl(k) else k
        backend = (r["info"].get("backend") or k[len("fastdl-"):]) if is_fastdl(k) else None
        src = r["info"].get("kernel_source")
        if backend and src and any(p != backend for p in src.split("/")):
            label += f" (kernel from {src})"
        srcs = r["info"].get("kernel_sources") or {}
        fallback = sorted(n for n, b in srcs.items() if backend and b != backend)
        if fallback:
            label += f" ({len(fallback)} kernels fall back: {', '.join(fallback)})"
        cells = [label, fmt_time(r["median"]), fmt_time(r["iqr"]),
                 f"{100 * r['iqr'] / r['median']:.0f}%", str(r["rounds"])]
        if kind == "train":
            cells += [fmt_num(r["info"].get("samples_per_s")), f"{r['info'].get('us_per_step', 0):.0f}",
                      f"{r['info'].get('gflops', 0):.1f}"]
        elif kind == "sgemm":
            cells += [f"{r['info'].get('gflops', 0):.1f}"]
        if kind != "sgemm":
            cells += ["" if f == k else fmt_ratio(speedup(rows, f, k)) for f in fastdl]
        out.append("| " + " | ".join(cells) + " |")
    if kind != "sgemm":
        out += ["", "_speedup = this row's median time / that fastdl variant's (above 1: fastdl is faster)._"]
    out.append("")
    return out


def ratio_matrix(groups: dict) -> list[str]:
    peers = []
    for g in _order(groups):
        for k in groups[g]:
            if not is_fastdl(k) and k not in peers and groups[g][k]["info"].get("kind") in ("train", "kernel"):
                peers.append(k)
    out = ["## Ratios: best fastdl vs each peer", "",
           "Median time of the peer / median time of the fastest fastdl variant in the same group "
           "(above 1: fastdl is faster).", "",
           "| group | best fastdl | " + " | ".join(peers) + " |", "|---" * (len(peers) + 2) + "|"]
    for g in _order(groups):
        rows = groups[g]
        if next(iter(rows.values()))["info"].get("kind") not in ("train", "kernel"):
            continue
        bk, _ = best_fastdl(rows)
        if bk is None:
            continue
        out.append(f"| {g} | {bk} | " + " | ".join(fmt_ratio(speedup(rows, bk, p)) for p in peers) + " |")
    return out + [""]


def targets(groups: dict) -> list[str]:
    """Issue #5's targets, evaluated on this run."""
    res: list[tuple[str, str, bool | None]] = []

    def best_of(rows, impls):
        present = [i for i in impls if i in rows]
        return min(present, key=lambda i: rows[i]["median"]) if present else None

    def ratio_target(group, peer_impls, need, label):
        rows = groups.get(group)
        if not rows:
            res.append((label, "not measured", None))
            return
        bk, _ = best_fastdl(rows)
        peer = best_of(rows, peer_impls)
        if bk is None or peer is None:
            res.append((label, "not measured", None))
            return
        r = speedup(rows, bk, peer)
        res.append((label, f"{r:.2f}× ({bk} vs {peer})", r >= need))

    ratio_target("train S", ["jax-jit"], 2.0, "S: ≥ 2× JAX")
    ratio_target("train S", EAGER, 10.0, "S: ≥ 10× PyTorch eager (faster of foreach/fused)")
    ratio_target("train M", ["jax-jit"], 1.2, "M: ≥ 1.2× JAX")
    ratio_target("train M", EAGER, 2.5, "M: ≥ 2.5× PyTorch eager (faster of foreach/fused)")
    ratio_target("train L", ["jax-jit", "torch-compile"], 1.0, "L: ≥ best of JAX and torch.compile")
    L, gemm = groups.get("train L"), groups.get("sgemm L", {})
    if L and "numpy-sgemm" in gemm:
        bk, b = best_fastdl(L)
        g = gemm["numpy-sgemm"]["info"]["gflops"]
        pct = 100 * b["info"]["gflops"] / g
        res.append(("L: ≥ 85% of the NumPy sgemm rate",
                    f"{pct:.0f}% ({b['info']['gflops']:.1f} of {g:.1f} GFLOP/s, {bk})", pct >= 85))
    else:
        res.append(("L: ≥ 85% of the NumPy sgemm rate", "not measured", None))
    for g in sorted(groups):
        if g.startswith("vs-torch dropout"):
            ratio_target(g, ["torch"], 5.0, f"{g[9:]}: ≥ 5× PyTorch")
    g = "vs-torch softmax-CE fwd+bwd 128x10"
    if g in groups and best_fastdl(groups[g])[0]:
        bk, b = best_fastdl(groups[g])
        res.append(("softmax-CE fwd+bwd 128x10: < 5 µs per call", f"{b['median'] * 1e6:.2f} µs ({bk})",
                    b["median"] < 5e-6))
    ratio_target("vs-torch BatchNorm fwd+bwd 128x512", ["torch-autograd"], 3.0, "BatchNorm 128x512: ≥ 3× PyTorch")
    ratio_target("vs-torch BatchNorm fwd+bwd 512x4096", ["torch-autograd"], 2.0, "BatchNorm 512x4096: ≥ 2× PyTorch")
    ratio_target("vs-torch Adam 16M params", ["torch-adam-fused"], 1.0, "Adam 16M: ≥ torch fused Adam")
    ratio_target("vs-torch Adam 1M params", ["torch-adam-fused"], 1.0, "Adam 1M: ≥ torch fused Adam")
    def pair_target(group, impl, other, need, label):
        rows = groups.get(group)
        if not rows or impl not in rows or other not in rows:
            res.append((label, "not measured", None))
            return
        r = speedup(rows, impl, other)
        res.append((label, f"{r:.2f}× ({impl} vs {other})", r >= need))

    # issue 12 (one execution plan): the default path is the fast path
    pair_target("train S", "fastdl-auto", "fastdl-numba", 1.0, "S: auto ≥ numba fused epoch")
    pair_target("train M", "fastdl-auto", "fastdl-numba", 1.0, "M: auto ≥ numba fused epoch")
    pair_target("train S", "fastdl-auto", "jax-jit", 2.5, "S: auto ≥ 2.5× JAX")
    pair_target("train M", "fastdl-auto", "jax-jit", 1.25, "M: auto ≥ 1.25× JAX")
    # issue 13 (bfloat16): against PyTorch autocast and fastdl's own float32
    pair_target("train L", "fastdl-auto-bf16", "torch-autocast-bf16", 1.2, "L bf16: ≥ 1.2× PyTorch autocast bf16")
    pair_target("train L", "fastdl-auto-bf16", "fastdl-auto", 2.5, "L bf16: ≥ 2.5× fastdl fp32")
    pair_target("train M", "fastdl-auto-bf16", "torch-autocast-bf16", 1.5, "M bf16: ≥ 1.5× PyTorch autocast bf16")
    pair_target("train S", "fastdl-auto-bf16", "fastdl-auto", 0.95, "S bf16: ≥ 0.95× fastdl fp32")
    out = ["## Targets on this run", "", "| target | measured | met |", "|---|---|---|"]
    for label, meas, ok in res:
        out.append(f"| {label} | {meas} | {'—' if ok is None else ('yes' if ok else '**no**')} |")
    return out + [""]


# --------------------------------------------------------------------------- chart


def chart(groups: dict, png: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [g for g in TRAIN_GROUPS if g in groups]
    kernels = [g for g in _order(groups) if g.startswith("vs-torch")]
    n = len(train) + (1 if kernels else 0)
    if n == 0:
        return
    fig, axes = plt.subplots(n, 1, figsize=(9, 2.9 * n), squeeze=False)
    for ax, g in zip(axes[:, 0], train):
        rows = groups[g]
        order = sorted(rows, key=lambda k: -rows[k]["info"].get("samples_per_s", 0))
        vals = [rows[k]["info"].get("samples_per_s", 0) for k in order]
        errs = []
        for k in order:  # IQR of the time as an error bar on samples/s
            r = rows[k]
            ns = r["info"].get("n_samples", 0)
            errs.append([ns / r["median"] - ns / r["q3"] if r["q3"] else 0,
                         ns / r["q1"] - ns / r["median"] if r["q1"] else 0])
        colors = ["tab:red" if is_fastdl(k) else "tab:gray" for k in order]
        ax.barh(order, vals, color=colors, xerr=list(zip(*errs)) if errs else None, capsize=2)
        ax.invert_yaxis()
        ax.set_xlabel("samples / s (higher is better; bars: IQR)")
        desc = next(iter(rows.values()))["info"].get("description", "")
        ax.set_title(textwrap.fill(f"{g}: {desc}", 85), fontsize=9)
        top = max(vals) if vals else 1
        for y, v in enumerate(vals):
            ax.text(v + 0.02 * top, y, fmt_num(v), va="center", ha="left", fontsize=7,
                    bbox={"facecolor": "white", "edgecolor": "none", "pad": 0.5, "alpha": 0.8})
        ax.set_xlim(0, top * 1.15)
    if kernels:
        ax = axes[-1, 0]
        labels, vals = [], []
        for g in kernels:
            rows = groups[g]
            bk, _ = best_fastdl(rows)
            for p in rows:
                if not is_fastdl(p) and bk:
                    labels.append(f"{g[9:]} vs {p}")
                    vals.append(speedup(rows, bk, p))
        ax.barh(labels, vals, color=["tab:red" if v >= 1 else "tab:blue" for v in vals])
        ax.axvline(1.0, color="k", lw=0.8)
        ax.set_xscale("log")
        ax.invert_yaxis()
        ax.tick_params(axis="y", labelsize=7)
        ax.set_xlabel("best fastdl speedup over PyTorch (log scale; > 1: fastdl faster)")
        ax.set_title("kernels vs PyTorch (float32)", fontsize=9)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------- main


def render(data: dict, json_path: str, accuracy_md: str | None, png_rel: str | None,
           extra_runs: list[tuple[str, dict]] | None = None) -> str:
    groups = data["groups"]
    quick = any(r["info"].get("quick") for rows in groups.values() for r in rows.values())
    out = ["# fastdl peer comparison", "",
           f"Generated by `benchmarks/summarize.py {os.path.basename(json_path)}` from one run of "
           "`benchmarks/test_bench_peers.py`; all ratios are within that run (medians of its rounds). "
           "Training: one round = one epoch over in-memory float32 data, mini-batches in order "
           "(forward, softmax-CE, backward, Adam) after two warm-up epochs; fastdl trains through "
           "`model.fit(..., shuffle=False)`, which also checks J and the gradients for NaN and "
           "counts training errors every step (the peers' loops do not).", ""]
    if quick:
        out += ["> **QUICK MODE (FASTDL_BENCH_QUICK=1): smoke test on small epochs, not for quoting.**", ""]
    out += machine_section(data)
    out += targets(groups)
    out += ratio_matrix(groups)
    if png_rel:
        out += [f"![peer comparison]({png_rel})", ""]
    out += ["## Groups", ""]
    for g in _order(groups):
        out += group_table(g, groups[g])
    for path, extra in extra_runs or []:
        thr = extra.get("machine_info", {}).get("fastdl_bench", {}).get("threads", {})
        n = thr.get("requested_threads") or f"default ({thr.get('cpu_count', '?')} cores)"
        out += [f"## Second run: threads = {n} (`{os.path.basename(path)}`, {extra.get('datetime', '?')})", "",
                "Ratios within that run.", ""]
        if any(r["info"].get("quick") for rows in extra["groups"].values() for r in rows.values()):
            out += ["> **QUICK MODE run: smoke test, not for quoting.**", ""]
        out += [line.replace("## ", "### ", 1) if line.startswith("## ") else line
                for line in targets(extra["groups"]) + ratio_matrix(extra["groups"])]
        out += ["| training | " + " | ".join(g for g in TRAIN_GROUPS if g in extra["groups"]) + " |"]
        tg = [g for g in TRAIN_GROUPS if g in extra["groups"]]
        out += ["|---" * (len(tg) + 1) + "|"]
        impls = sorted({k for g in tg for k in extra["groups"][g]}, key=lambda k: (not is_fastdl(k), k))
        for k in impls:
            out.append(f"| {k} | " + " | ".join(
                fmt_num(extra["groups"][g][k]["info"].get("samples_per_s")) + " samples/s" if k in extra["groups"][g]
                else "—" for g in tg) + " |")
        out.append("")
    if accuracy_md:
        out += ["## Accuracy: fastdl vs PyTorch on the digits (not timed)", "",
                "From `benchmarks/accuracy_vs_torch.py`:", "", accuracy_md.strip(), ""]
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="pytest-benchmark JSON -> RESULTS.md + bar chart")
    ap.add_argument("json")
    ap.add_argument("--out", default=os.path.join(HERE, "RESULTS.md"))
    ap.add_argument("--png", default=os.path.join(HERE, "results.png"))
    ap.add_argument("--also", action="append", default=[], metavar="JSON",
                    help="another run (e.g. --threads 1) whose targets, ratios and samples/s are appended")
    acc = ap.add_mutually_exclusive_group()
    acc.add_argument("--accuracy", help="markdown table written by accuracy_vs_torch.py --out")
    acc.add_argument("--no-accuracy", action="store_true")
    args = ap.parse_args(argv)

    data = load(args.json)
    accuracy_md = None
    if args.accuracy:
        with open(args.accuracy) as fh:
            accuracy_md = fh.read()
    elif not args.no_accuracy:
        sys.path.insert(0, HERE)
        try:
            import accuracy_vs_torch

            print("running the accuracy check (fastdl vs PyTorch on the digits)...", file=sys.stderr)
            accuracy_md = accuracy_vs_torch.to_markdown(accuracy_vs_torch.run())
        except ImportError as exc:
            accuracy_md = f"Not run: {exc}."
    png_rel = None
    try:
        chart(data["groups"], args.png)
        png_rel = os.path.relpath(args.png, os.path.dirname(os.path.abspath(args.out)))
    except ImportError as exc:
        print(f"no chart ({exc}); pip install matplotlib", file=sys.stderr)
    md = render(data, args.json, accuracy_md, png_rel, [(p, load(p)) for p in args.also])
    with open(args.out, "w") as fh:
        fh.write(md)
    print(f"wrote {args.out}" + (f" and {args.png}" if png_rel else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
