"""Median over several peer-comparison runs: samples/s per training group and the ratios asked for.

    python benchmarks/median_of_runs.py .benchmarks/peers-run1.json .benchmarks/peers-run2.json ... [--out FILE]

Each ratio is first computed WITHIN one run (both sides measured in the same session), then the
median over runs is taken; the per-run ratios are shown too, so the spread is visible.
"""
from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict

#: (group, fastdl impl, other impl) pairs reported as ratios (fast / other, >1 = fastdl faster)
PAIRS = [
    ("train S", "fastdl-auto", "fastdl-numba"), ("train M", "fastdl-auto", "fastdl-numba"),
    ("train S", "fastdl-auto", "jax-jit"), ("train M", "fastdl-auto", "jax-jit"),
    ("train L", "fastdl-auto", "jax-jit"), ("train L", "fastdl-auto", "torch-compile"),
    ("train S", "fastdl-auto", "torch-eager-fused"), ("train M", "fastdl-auto", "torch-eager-fused"),
    ("train L", "fastdl-auto-bf16", "torch-autocast-bf16"), ("train L", "fastdl-auto-bf16", "fastdl-auto"),
    ("train M", "fastdl-auto-bf16", "torch-autocast-bf16"), ("train M", "fastdl-auto-bf16", "fastdl-auto"),
    ("train S", "fastdl-auto-bf16", "fastdl-auto"),
]


def load(path: str) -> dict[str, dict[str, float]]:
    """group -> impl -> samples/s of one run."""
    with open(path) as fh:
        data = json.load(fh)
    out: dict[str, dict[str, float]] = defaultdict(dict)
    for b in data["benchmarks"]:
        info = b.get("extra_info", {})
        if "samples_per_s" in info:
            impl = info.get("impl") or (b.get("params") or {}).get("impl") or b["name"]
            out[b["group"]][impl] = float(info["samples_per_s"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    runs = [load(p) for p in args.runs]
    lines = [f"Median of {len(runs)} runs ({', '.join(args.runs)}); samples/s.", ""]
    for group in ("train S", "train M", "train L"):
        impls = sorted({i for r in runs for i in r.get(group, {})})
        if not impls:
            continue
        lines += [f"### {group}", "", "| impl | median samples/s | per run |", "|---|---:|---|"]
        for impl in impls:
            vals = [r[group][impl] for r in runs if impl in r.get(group, {})]
            lines.append(f"| {impl} | {statistics.median(vals):,.0f} | "
                         + ", ".join(f"{v:,.0f}" for v in vals) + " |")
        lines.append("")
    lines += ["| ratio (same-run, then median) | median | per run |", "|---|---:|---|"]
    for group, a, b in PAIRS:
        rs = [r[group][a] / r[group][b] for r in runs if a in r.get(group, {}) and b in r.get(group, {})]
        if rs:
            lines.append(f"| {group}: {a} / {b} | {statistics.median(rs):.2f}x | "
                         + ", ".join(f"{x:.2f}" for x in rs) + " |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text + "\n")


if __name__ == "__main__":
    main()
