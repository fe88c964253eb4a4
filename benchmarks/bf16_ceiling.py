"""The ceiling of a bf16 training step: its GEMMs at the rate MKL reaches, plus the optimiser (issue 13).

    python benchmarks/bf16_ceiling.py [--threads 2] [--repeats 15] [--shapes L,M] [--torch] [--out FILE]
    FASTDL_BLAS=mkl python benchmarks/bf16_ceiling.py ...     # also MKL's bf16 GEMM (and MKL's sgemm as fp32)

A training step cannot be faster than the sum of its GEMMs plus the optimiser's pass over the
parameters. For each shape this times, one by one, every GEMM of a step (per Dense layer: the forward
``Z = X W``, ``dW = X^T dZ`` and, except for the first layer whose input gradient is never computed,
``dX = dZ W^T``), and one Adam step on a parameter vector of the model's size (its memory traffic:
read p, g, v, s; write p, v, s), and prints the ceiling in samples/s for:

* ``fp32``: fastdl's ``sgemm_rm`` (kernels/_blas.pyx: the BLAS fastdl picked, ``FASTDL_BLAS``; with MKL
  its JIT kernels for small products; the float32 GEMM every fp32 step uses);
* ``bf16 auto``: fastdl's one bf16 entry point (``bf16gemm_rm``, as the kernels call it) routed as
  ``FASTDL_BF16_GEMM=auto`` routes it on this CPU (``fastdl.backends.info()['bf16_gemm']``); this
  includes rounding/packing both float32 operands, which every bf16 step pays;
* ``bf16 fastdl kernel``: the same entry point with fastdl's AVX512-BF16 kernel for every product
  (kernels/fastdl_bf16gemm.h; only on CPUs with AVX512_BF16), packing included;
* ``bf16 MKL entry`` (with MKL): the entry point with MKL's ``cblas_gemm_bf16bf16f32`` enabled: it uses it
  for products above ``JIT_MNK`` multiply-adds and the rounding fallback below (MKL's per-call floor);
* ``bf16 MKL only`` (with MKL): ``cblas_gemm_bf16bf16f32`` on operands packed beforehand (the hardware
  rate MKL reaches: the bound if activations and weights were already stored in bf16);
* ``bf16 fallback``: the same entry point routed to the rounding fallback (round + ``sgemm``);
* with ``--torch``: PyTorch's bf16 ``torch.mm`` on bf16 tensors (oneDNN), for the rate another library
  reaches on this CPU's bf16 unit (PyTorch is never a dependency of fastdl; optional here).

Medians of ``--repeats`` timed calls after a warm-up; the CPU model and its bf16 flags are printed
with the figures. Needs the built kernels; MKL (``pip install 'fastdl[mkl]'``, ``FASTDL_BLAS=mkl``) for the
MKL columns.
"""
from __future__ import annotations

import argparse
import ctypes
import statistics
import time

import numpy as np

import fastdl as fd

SHAPES = {
    # name: (layer widths, batch) as in benchmarks/peers.py
    "L": ((784, 2048, 2048, 10), 512),
    "M": ((784, 512, 256, 10), 128),
    "S": ((64, 128, 64, 10), 32),
}
CBLAS_ROW_MAJOR, CBLAS_NO_TRANS, CBLAS_TRANS = 101, 111, 112


def cpu_report() -> str:
    """'model name' and the CPU's bf16-relevant flags (from /proc/cpuinfo)."""
    model, flags = "unknown CPU", []
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and model == "unknown CPU":
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = line.split(":", 1)[1].split()
    except OSError:
        pass
    keep = [f for f in flags if f.startswith(("amx", "avx512_bf16", "avx512f", "avx512_vnni", "avx_vnni"))]
    return f"{model}; flags: {' '.join(sorted(keep)) or 'none of amx*/avx512*'}"


def step_gemms(widths: tuple[int, ...], batch: int) -> list[tuple[str, int, int, int, int, int]]:
    """(label, trans_a, trans_b, M, N, K) of every GEMM of one training step, row-major C = op(A) op(B)."""
    out = []
    for i, (n_in, n_out) in enumerate(zip(widths[:-1], widths[1:])):
        out.append((f"fwd  {batch}x{n_in} @ {n_in}x{n_out}", 0, 0, batch, n_out, n_in))
        out.append((f"dW   {n_in}x{batch} @ {batch}x{n_out}", 1, 0, n_in, n_out, batch))
        if i > 0:  # the input's gradient is never needed
            out.append((f"dX   {batch}x{n_out} @ {n_out}x{n_in}", 0, 1, batch, n_in, n_out))
    return out


def median_times(fns: dict, repeats: int) -> dict:
    """Median seconds per call of each function; the calls are interleaved (round-robin) so that a
    change of load on a shared machine hits every implementation alike."""
    times: dict = {name: [] for name in fns}
    for name, (fn, setup) in fns.items():
        setup()
        fn()
        fn()  # warm-up: scratch allocation, MKL's first-call dispatch
    for _ in range(repeats):
        for name, (fn, setup) in fns.items():
            setup()
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def _ptr(a: np.ndarray) -> ctypes.c_void_p:
    return ctypes.c_void_p(a.ctypes.data)


def to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16, nearest even), as fastdl packs them."""
    u = np.ascontiguousarray(x, np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


_RM = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_float,
                       ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_float, ctypes.c_void_p,
                       ctypes.c_int)
SERIAL_MNK = 1048576   # kernels/_blas.pyx: products up to this many multiply-adds run on one MKL thread


def to_f32(x: np.ndarray) -> np.ndarray:
    """The float32 value of x rounded to bfloat16."""
    return (to_bf16_bits(x).astype(np.uint32) << 16).view(np.float32)


def measure(shape: str, repeats: int, lib, _blas, native_address: int, auto_route: tuple, torch=None) -> dict:
    widths, batch = SHAPES[shape]
    rng = np.random.default_rng(0)
    # fastdl's own row-major entry points (what the training steps call), through one calling convention
    sgemm_addr, _, bf16_addr = _blas.rowmajor_addresses()[:3]
    sgemm_rm, bf16gemm_rm = _RM(sgemm_addr), _RM(bf16_addr)
    bgemm = lib.cblas_gemm_bf16bf16f32 if native_address else None
    if bgemm is not None:
        bgemm.restype = None
        set_local = lib.MKL_Set_Num_Threads_Local
    kernel = _blas.bf16_kernel_available()
    rows = []
    for label, ta, tb, M, N, K in step_gemms(widths, batch):
        A = rng.standard_normal((K, M) if ta else (M, K)).astype(np.float32)
        B = rng.standard_normal((N, K) if tb else (K, N)).astype(np.float32)
        C = np.empty((M, N), np.float32)
        lda, ldb = A.shape[1], B.shape[1]
        pa, pb, pc = A.ctypes.data, B.ctypes.data, C.ctypes.data

        def call(f):
            return lambda: f(ta, tb, M, N, K, 1.0, pa, lda, pb, ldb, 0.0, pc, N)

        def route(address, mode):
            def set_route() -> None:
                _blas.set_bf16_gemm(address)
                _blas.set_bf16_kernel(mode)
            return set_route

        fns = {"fp32": (call(sgemm_rm), lambda: None), "auto": (call(bf16gemm_rm), route(*auto_route)),
               "fallback": (call(bf16gemm_rm), route(0, 0))}
        if kernel:
            fns["kernel"] = (call(bf16gemm_rm), route(0, 2))
        if native_address:
            Ab, Bb = to_bf16_bits(A), to_bf16_bits(B)
            serial = M * N * K <= SERIAL_MNK   # as bf16gemm_rm does: small products on one thread

            def mkl_only() -> None:
                prev = set_local(1) if serial else 0
                bgemm(ctypes.c_int(CBLAS_ROW_MAJOR), ctypes.c_int(CBLAS_TRANS if ta else CBLAS_NO_TRANS),
                      ctypes.c_int(CBLAS_TRANS if tb else CBLAS_NO_TRANS), ctypes.c_int(M), ctypes.c_int(N),
                      ctypes.c_int(K), ctypes.c_float(1.0), _ptr(Ab), ctypes.c_int(lda), _ptr(Bb),
                      ctypes.c_int(ldb), ctypes.c_float(0.0), ctypes.c_void_p(pc), ctypes.c_int(N))
                if serial:
                    set_local(prev)

            fns["entry"] = (call(bf16gemm_rm), route(native_address, 0))
            fns["mkl"] = (mkl_only, lambda: None)
        if torch is not None:
            ta_, tb_ = (torch.from_numpy(to_f32(X)).to(torch.bfloat16) for X in (A, B))
            ta_, tb_ = (ta_.t() if ta else ta_), (tb_.t() if tb else tb_)
            fns["torch"] = (lambda: torch.mm(ta_, tb_), lambda: None)
        row = {"gemm": label, "flop": 2.0 * M * N * K}
        # every implementation computed the same product: guard against timing a wrong call
        ref = (to_f32(A).T if ta else to_f32(A)).astype(np.float64) @ (to_f32(B).T if tb else to_f32(B))
        for name, (fn, setup) in fns.items():
            if name in ("fp32", "torch"):
                continue
            setup()
            C[...] = np.nan
            fn()
            if not np.allclose(C, ref, rtol=1e-4, atol=1e-3 * np.sqrt(K)):
                raise AssertionError(f"{shape} {label}: the bf16 GEMM result of {name!r} is wrong")
        row.update(median_times(fns, repeats))
        rows.append(row)
    # the optimiser's memory traffic: one Adam step over every parameter (float32, as in every precision)
    n_params = sum(a * b + b for a, b in zip(widths[:-1], widths[1:]))
    adam = fd.get_backend("auto").unchecked.adam_step
    p, g = rng.standard_normal(n_params).astype(np.float32), rng.standard_normal(n_params).astype(np.float32)
    v, s = np.zeros_like(p), np.zeros_like(p)
    t_adam = median_times({"adam": (lambda: adam(p, g, v, s, 0.9, 0.999, 1e-8, 1e-3, 1.0), lambda: None)},
                          repeats)["adam"]
    return {"shape": shape, "widths": widths, "batch": batch, "rows": rows, "adam": t_adam, "n_params": n_params}


NAMES = {"fp32": "fp32 sgemm", "auto": "bf16 auto", "kernel": "bf16 fastdl kernel", "entry": "bf16 MKL entry",
         "mkl": "bf16 MKL only", "fallback": "bf16 fallback", "torch": "torch bf16 mm"}


def report(res: dict) -> list[str]:
    cols = [c for c in NAMES if c in res["rows"][0]]
    b = res["batch"]
    out = [f"### {res['shape']}: {'-'.join(map(str, res['widths']))}, batch {b}, {res['n_params']:,} parameters", "",
           "| GEMM (row-major M x K @ K x N) | " + " | ".join(f"{NAMES[c]} ms (GFLOP/s)" for c in cols) + " |",
           "|---|" + "---:|" * len(cols)]
    for r in res["rows"]:
        out.append(f"| {r['gemm']} | " + " | ".join(f"{r[c] * 1e3:.3f} ({r['flop'] / r[c] / 1e9:.0f})" for c in cols)
                   + " |")
    sums = {c: sum(r[c] for r in res["rows"]) for c in cols}
    flop = sum(r["flop"] for r in res["rows"])
    out.append("| **sum of GEMMs** ms (GFLOP/s) | " + " | ".join(f"**{sums[c] * 1e3:.3f}** ({flop / sums[c] / 1e9:.0f})"
                                                                for c in cols) + " |")
    out.append(f"| Adam step ({res['n_params']:,} float32) | " + " | ".join(f"{res['adam'] * 1e3:.3f}" for _ in cols)
               + " |")
    out.append("| **ceiling, samples/s** | " + " | ".join(f"**{b / (sums[c] + res['adam']):,.0f}**" for c in cols)
               + " |")
    f32 = sums["fp32"] + res["adam"]
    ratios = ", ".join(f"{NAMES[c]} {f32 / (sums[c] + res['adam']):.2f}x" for c in cols if c not in ("fp32", "torch"))
    out += ["", f"ceiling / fp32 ceiling: {ratios}"]
    if "torch" in sums:
        out[-1] += "; sum of GEMMs, torch bf16 mm / " + ", ".join(
            f"{NAMES[c]}: {sums['torch'] / sums[c]:.2f}x" for c in cols if c not in ("fp32", "torch"))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--shapes", default="L,M", help="comma-separated, of " + ", ".join(SHAPES))
    ap.add_argument("--torch", action="store_true", help="also time PyTorch's bf16 matmul (if installed)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    from fastdl._kernels import _blas
    from fastdl.backends import blas

    provider = blas.select()
    lib = blas._state.get("mkl_lib") if provider == "mkl" else None
    native_address = int(blas._state.get("mkl_bf16") or 0) if provider == "mkl" else 0
    auto_route = (native_address if _blas.bf16_gemm_routed() else 0, _blas.bf16_kernel_mode())
    bi = blas.info()
    lines = [f"CPU: {cpu_report()}", f"BLAS: {bi['provider']} ({bi['library']}); threads: {args.threads}; "
             f"bf16 GEMMs in training (auto): {bi['bf16_gemm']} (unit: {bi['bf16_unit']}); medians of "
             f"{args.repeats} calls, interleaved", ""]
    if provider != "mkl":
        lines += ["MKL's bf16 GEMM not timed (FASTDL_BLAS=mkl with the mkl package installed adds it).", ""]
    elif not native_address:
        lines += ["This MKL has no cblas_gemm_bf16bf16f32.", ""]
    torch = None
    if args.torch:
        import torch

        torch.set_num_threads(args.threads)
        lines[1] += f"; torch {torch.__version__} ({args.threads} threads)"
    try:
        with fd.backends.use("auto", threads=args.threads):
            for shape in args.shapes.split(","):
                lines += report(measure(shape.strip(), args.repeats, lib, _blas, native_address, auto_route,
                                        torch)) + [""]
    finally:
        _blas.set_bf16_gemm(auto_route[0])
        _blas.set_bf16_kernel(auto_route[1])
    text = "\n".join(lines)
    print(text)
    if args.out:
        from fastdl._atomic import atomic_write

        atomic_write(args.out, lambda fh: fh.write((text + "\n").encode()))


if __name__ == "__main__":
    main()
