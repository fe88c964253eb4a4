"""Property-based fuzzing: random model configurations through compute_gradients and gradcheck, and
kernels fed strided, misaligned and extreme inputs. Always the reference's answer or a clear error."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import fastdl as fd
from fastdl.backends import available_backends, get_backend
from fastdl.backends import reference as ref

BACKENDS = available_backends()
COMPILED = [b for b in BACKENDS if b != "reference"]
SMOOTH = {"tanh": fd.Tanh, "sigmoid": fd.Sigmoid, "identity": fd.Identity}
ALL_ACTS = dict(SMOOTH, relu=fd.ReLU)


@st.composite
def configs(draw, acts=ALL_ACTS):
    n_in = draw(st.integers(1, 6))
    loss = draw(st.sampled_from(["softmax_cross_entropy", "binary_cross_entropy", "mse"]))
    n_out = {"softmax_cross_entropy": draw(st.integers(2, 4)), "binary_cross_entropy": 1,
             "mse": draw(st.integers(1, 3))}[loss]
    layers, d = [], n_in
    for _ in range(draw(st.integers(0, 2))):
        h = draw(st.integers(1, 5))
        bn = draw(st.booleans())
        layers.append(fd.Dense(d, h, init=draw(st.sampled_from(["he", "xavier", "lecun"])), use_bias=not bn))
        if bn:
            layers.append(fd.BatchNorm(h))
        layers.append(acts[draw(st.sampled_from(sorted(acts)))]())
        if draw(st.booleans()):
            layers.append(fd.Dropout(keep_prob=draw(st.sampled_from([0.5, 0.8, 1.0]))))
        d = h
    layers.append(fd.Dense(d, n_out))
    m = draw(st.integers(2, 6))
    l2 = draw(st.sampled_from([0.0, 0.1, 1.0]))
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((m, n_in))
    if loss == "softmax_cross_entropy":
        y = rng.integers(0, n_out, m)
    elif loss == "binary_cross_entropy":
        y = rng.integers(0, 2, m)
    else:
        y = rng.standard_normal((m, n_out))
    return dict(layers=layers, loss=loss, l2=l2, seed=seed), X, y


@settings(max_examples=40, deadline=None)
@given(configs(acts=SMOOTH))
def test_gradcheck_passes_on_random_smooth_models(case) -> None:
    kw, X, y = case
    model = fd.Sequential(kw.pop("layers"), dtype="float64", backend="reference", **kw)
    report = fd.gradcheck(model, X, y)
    assert report.difference < 1e-6, str(report)


@pytest.mark.parametrize("backend", COMPILED)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=configs())
def test_compiled_gradients_match_reference_on_random_models(backend: str, case) -> None:
    kw, X, y = case
    model = fd.Sequential(kw.pop("layers"), dtype="float64", backend="reference", **kw)
    other = model.copy(backend=backend)  # same parameters, BatchNorm statistics and step (dropout masks)
    J_ref = model.compute_gradients(X, y)
    J = other.compute_gradients(X, y)
    assert np.isfinite(J)
    np.testing.assert_allclose(J, J_ref, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(other.grads, model.grads, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(other.state, model.state, rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------- kernels, odd memory


def _strided(a: np.ndarray) -> np.ndarray:
    """A non-contiguous view holding the same values."""
    big = np.zeros(a.shape[:-1] + (2 * a.shape[-1],), a.dtype)
    big[..., ::2] = a
    return big[..., ::2]


def _misaligned(a: np.ndarray) -> np.ndarray:
    """A C-contiguous copy whose data pointer is not aligned to the item size."""
    buf = np.zeros(a.nbytes + 1, np.uint8)
    out = buf[1:].view(a.dtype).reshape(a.shape)
    out[...] = a
    assert not out.flags.aligned
    return out


@pytest.mark.parametrize("backend", COMPILED)
@pytest.mark.parametrize("layout", ["strided", "misaligned", "fortran"])
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(m=st.integers(1, 9), k=st.integers(2, 7), scale=st.sampled_from([1.0, 1e3, 1e-3]),
       dtype=st.sampled_from([np.float32, np.float64]))
def test_kernels_on_odd_memory_layouts_match_reference_or_refuse(backend, layout, m, k, scale, dtype) -> None:
    K = get_backend(backend)
    rng = np.random.default_rng(m * 31 + k)
    Z = (rng.standard_normal((m, k)) * scale).astype(dtype)
    y = rng.integers(0, k, m)
    odd = {"strided": _strided, "misaligned": _misaligned, "fortran": np.asfortranarray}[layout]
    if layout == "fortran":
        assume(m > 1 and k > 1)
    dZ_ref = np.empty_like(Z)
    loss_ref = ref.softmax_cross_entropy(Z, y, dZ_ref)
    dZ = np.empty_like(Z)
    try:
        loss = K.softmax_cross_entropy(odd(Z), y, dZ)
    except (TypeError, ValueError) as exc:  # a clear refusal is acceptable; a wrong answer is not
        assert str(exc)
    else:
        tol = 1e-4 if dtype == np.float32 else 1e-10
        np.testing.assert_allclose(loss, loss_ref, rtol=tol, atol=tol)
        np.testing.assert_allclose(dZ, dZ_ref, rtol=tol, atol=tol)
    mask_ref, out_ref = np.empty(Z.shape, np.uint8), np.empty_like(Z)
    ref.dropout_forward(Z, 0.7, 5, 6, 7, mask_ref, out_ref)
    mask, out = np.empty(Z.shape, np.uint8), np.empty_like(Z)
    try:
        K.dropout_forward(odd(Z), 0.7, 5, 6, 7, mask, out)
    except (TypeError, ValueError) as exc:
        assert str(exc)
    else:
        np.testing.assert_array_equal(mask, mask_ref)
        np.testing.assert_allclose(out, out_ref, rtol=1e-6)
    p0, g = rng.standard_normal(m * k).astype(dtype), odd(rng.standard_normal((1, m * k)).astype(dtype))[0]
    p_ref, v_ref, s_ref = p0.copy(), np.zeros_like(p0), np.zeros_like(p0)
    ref.adam_step(p_ref, np.ascontiguousarray(g), v_ref, s_ref, 1e-2, 0.9, 0.999, 1e-8, 1)
    p, v, s = p0.copy(), np.zeros_like(p0), np.zeros_like(p0)
    try:
        K.adam_step(p, g, v, s, 1e-2, 0.9, 0.999, 1e-8, 1)
    except (TypeError, ValueError) as exc:
        assert str(exc)
    else:
        # parameters are O(1): absolute tolerance, since an update can cancel a value to near zero
        np.testing.assert_allclose(p, p_ref, rtol=0, atol=1e-6 if dtype == np.float32 else 1e-12)


# ----------------------------------------------------------------------------- kernel entry points, adversarial
# Every public kernel entry point on every backend, fed one malformed argument at a time (issue 14 item 3):
# it must raise ValueError and leave every array (and guard bytes around each) untouched; well-formed calls
# must not write outside their outputs. Runs in a subprocess: a crash fails the test instead of killing pytest.

GUARD = 64          # bytes of guard before and after every array
SENTINEL = 0xA5
MUTATIONS = ("none", "shape", "ndim", "fortran", "strided", "bigendian", "misaligned", "dtype", "readonly",
             "overlap", "scalar", "nonarray")


class _Arena:
    """One array argument, placed inside a byte buffer with guard bytes on both sides."""

    def __init__(self, shape, dtype, values=None, *, layout="c", offset=0, ro=False):
        dt = np.dtype(dtype)
        size = int(np.prod(shape))
        span = size * dt.itemsize * (2 if layout == "strided" else 1)
        self.buf = np.full(2 * GUARD + span + dt.itemsize, SENTINEL, np.uint8)
        start = GUARD + offset
        raw = self.buf[start:start + span].view(dt)
        if layout == "strided":
            view = raw[::2].reshape(shape)
        elif layout == "fortran":
            view = raw.reshape(tuple(reversed(shape))).T
        else:
            view = raw.reshape(shape)
        if values is not None:
            view[...] = values
        self.lo, self.hi = start, start + span
        if ro:
            view.setflags(write=False)
        self.view = view

    def snapshot(self):
        return self.buf.copy()

    def guards_intact(self, snap) -> bool:
        return (np.array_equal(self.buf[:self.lo], snap[:self.lo])
                and np.array_equal(self.buf[self.hi:], snap[self.hi:]))


def _values(rng, kind, shape, dtype, dims):
    from fastdl.backends import validate as V
    if kind == V.LABELS:
        return rng.integers(0, dims["k"], shape)
    if kind in (V.MASK_IN, V.MASK_OUT):
        return rng.integers(0, 2, shape)
    if kind == V.WEIGHTS:
        return rng.uniform(0.5, 2.0, shape)
    if kind == V.COUNTS:          # Poisson targets: finite and >= 0
        return rng.poisson(2.0, shape)
    return rng.uniform(0.5, 1.5, shape) if dtype == "positive" else rng.standard_normal(shape)


_SCALARS = {"act": 1, "precision": 0, "keep_prob": 0.7, "seed": 3, "step": 5, "layer": 1, "eps": 1e-5,
            "momentum": 0.9, "l2_over_m": 0.01, "lr": 0.01, "beta": 0.9, "beta1": 0.9, "beta2": 0.999,
            "c1": 0.01, "c2": 1.001, "mu": 0.9, "t": 1, "bias_correction": True, "nesterov": True}
_BAD_SCALARS = {"act": 9, "precision": 3, "keep_prob": 0.0, "seed": 1.0, "step": "5", "layer": 1.5,
                "bias_correction": 1, "nesterov": "yes"}
_POSITIVE = {"running_var", "inv_std", "s"}   # kept positive so well-formed calls stay finite


def fuzz_kernel_entry_points(backend: str, examples: int) -> int:
    """Hypothesis-driven adversarial calls of every kernel of ``backend`` (see the section comment)."""
    import inspect

    from fastdl.backends import validate as V
    from fastdl.backends.contract import KERNELS

    K = get_backend(backend)
    n_calls = [0]

    @settings(max_examples=examples, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(data=st.data())
    def run(data) -> None:
        kernel = data.draw(st.sampled_from(KERNELS), label="kernel")
        dt = np.dtype(data.draw(st.sampled_from(["float32", "float64"]), label="dtype"))
        dims = {s: data.draw(st.integers(1, 7), label=s) for s in ("m", "n", "n_in", "n_out", "k", "p")}
        dims["one"] = 1
        rng = np.random.default_rng(data.draw(st.integers(0, 2 ** 16), label="seed"))
        spec = V.SPECS[kernel]
        names = list(inspect.signature(getattr(ref, kernel)).parameters)
        kinds = {n: spec[n] for n in names}
        arrays = [n for n in names if kinds[n][0] in V._ARRAY_KINDS]
        outputs = [n for n in arrays if kinds[n][0] in V._WRITTEN]
        empty = {n for n in arrays if kinds[n][2] and data.draw(st.booleans(), label=f"{n} empty")}

        def dtype_of(n):
            kind = kinds[n][0]
            return {V.LABELS: np.int64, V.MASK_IN: np.uint8, V.MASK_OUT: np.uint8, V.WEIGHTS: np.float64}.get(kind, dt)

        def shape_of(n):
            return tuple(0 for _ in kinds[n][1]) if n in empty else tuple(dims[s] for s in kinds[n][1])

        mutation = data.draw(st.sampled_from(MUTATIONS), label="mutation")
        target = None
        nonempty = [n for n in arrays if n not in empty]
        if mutation == "shape":
            # change an axis whose size another non-empty argument also fixes (or a fixed-size axis)
            cands = [(n, ax) for n in nonempty for ax, s in enumerate(kinds[n][1])
                     if s == "one" or any(s in kinds[o][1] for o in nonempty if o != n)]
            assume(cands)
            target = data.draw(st.sampled_from(cands), label="axis")
        elif mutation in ("ndim", "nonarray"):
            target = data.draw(st.sampled_from(arrays), label="target")
        elif mutation == "fortran":
            cands = [n for n in nonempty if len(kinds[n][1]) == 2 and min(shape_of(n)) > 1]
            assume(cands)
            target = data.draw(st.sampled_from(cands), label="target")
        elif mutation == "strided":
            cands = [n for n in nonempty if int(np.prod(shape_of(n))) > 1]
            assume(cands)
            target = data.draw(st.sampled_from(cands), label="target")
        elif mutation in ("bigendian", "misaligned"):
            cands = [n for n in nonempty if np.dtype(dtype_of(n)).itemsize > 1]
            assume(cands)
            target = data.draw(st.sampled_from(cands), label="target")
        elif mutation == "dtype":
            target = data.draw(st.sampled_from(arrays), label="target")
        elif mutation == "readonly":
            cands = [n for n in outputs if n not in empty]
            assume(cands)
            target = data.draw(st.sampled_from(cands), label="target")
        elif mutation == "overlap":
            cands = [(o, i) for o in outputs for i in nonempty if o != i and o not in empty
                     and dtype_of(o) == dtype_of(i) and int(np.prod(shape_of(i))) > 1]
            assume(cands)
            target = data.draw(st.sampled_from(cands), label="pair")
        elif mutation == "scalar":
            cands = [n for n in names if n in _BAD_SCALARS]
            assume(cands)
            target = data.draw(st.sampled_from(cands), label="target")

        arenas, args = {}, {}
        for n in names:
            if n not in arrays:
                args[n] = _BAD_SCALARS[n] if (mutation == "scalar" and n == target) else _SCALARS[n]
                continue
            shape, dtype = shape_of(n), dtype_of(n)
            layout, offset, ro = "c", 0, False
            if mutation == "shape" and target[0] == n:
                shape = tuple(d + 1 if ax == target[1] else d for ax, d in enumerate(shape))
            elif mutation == "ndim" and target == n:
                shape = shape + (1,)
            elif mutation == "fortran" and target == n:
                layout = "fortran"
            elif mutation == "strided" and target == n:
                layout = "strided"
            elif mutation == "bigendian" and target == n:
                dtype = np.dtype(dtype).newbyteorder(">")
            elif mutation == "misaligned" and target == n:
                offset = 1
            elif mutation == "dtype" and target == n:
                dtype = {np.dtype(np.int64): np.int32, np.dtype(np.uint8): np.bool_}.get(np.dtype(dtype), np.float16)
                if kinds[n][0] == V.WEIGHTS:
                    dtype = np.float32
            elif mutation == "readonly" and target == n:
                ro = True
            vals = _values(rng, kinds[n][0], shape, "positive" if n in _POSITIVE else dtype, dims)
            arenas[n] = _Arena(shape, dtype, vals, layout=layout, offset=offset, ro=ro)
            args[n] = arenas[n].view
        if mutation == "overlap":
            o, i = target
            base = arenas[i]
            itemsize = np.dtype(dtype_of(o)).itemsize
            flat = base.buf[base.lo + itemsize:].view(np.uint8)
            nbytes = int(np.prod(shape_of(o))) * itemsize
            assume(flat.size >= nbytes)
            args[o] = flat[:nbytes].view(dtype_of(o)).reshape(shape_of(o))
            del arenas[o]
        if mutation == "nonarray":
            args[target] = args[target].tolist()
        snaps = {n: a.snapshot() for n, a in arenas.items()}
        call = [args[n] for n in names]
        n_calls[0] += 1
        if mutation == "none":
            try:
                getattr(K, kernel)(*call)
            except NotImplementedError:
                pass
            for n, a in arenas.items():
                assert a.guards_intact(snaps[n]), f"{backend}.{kernel} wrote outside '{n}'"
            return
        try:
            getattr(K, kernel)(*call)
        except ValueError as exc:
            assert kernel in str(exc), str(exc)
        else:
            raise AssertionError(f"{backend}.{kernel} accepted mutation {mutation} of {target}")
        for n, a in arenas.items():
            assert np.array_equal(a.buf, snaps[n]), f"{backend}.{kernel} ({mutation}) wrote to '{n}' before refusing"

    run()
    return n_calls[0]


def issue_examples(backend: str) -> None:
    """The four reports of issue 14 item 3, with guard bytes around every output."""
    K = get_backend(backend)
    out = _Arena((299, 129), np.float32, 0.0)
    snap = out.snapshot()
    try:
        K.activation_forward(np.ones((300, 129), np.float32), 1, out.view)
    except ValueError:
        pass
    else:
        raise AssertionError("activation_forward accepted a (299, 129) output for a (300, 129) input")
    assert np.array_equal(out.buf, snap)
    rng = np.random.default_rng(0)
    A, W = rng.standard_normal((6, 4)), rng.standard_normal((4, 3))
    o = np.zeros((6, 3))
    try:
        K.dense_forward(np.asfortranarray(A), np.asfortranarray(W), np.zeros(3), 0, o)
    except ValueError:
        pass
    else:
        np.testing.assert_allclose(o, A @ W, rtol=1e-12)   # accepted only if right
    mask = _Arena((4, 12), np.uint8, 9)
    try:
        K.dropout_forward(np.ones((4, 6), np.float32), 0.5, 1, 2, 3, mask.view[:, ::2], np.empty((4, 6), np.float32))
    except ValueError:
        pass
    else:
        raise AssertionError("dropout_forward accepted a non-contiguous mask")
    x = np.arange(1.0, 35.0)
    mis = _Arena(x.shape, np.float64, x, offset=1)
    for bad in (mis.view, x.astype(">f8")):
        try:
            r = K.sum_squares(bad)
        except ValueError:
            continue
        assert r == 13685.0, r
    assert K.sum_squares(x) == 13685.0


_CHILD = """
import sys
sys.path.insert(0, {tests!r})
import test_fuzz
test_fuzz.issue_examples({backend!r})
n = test_fuzz.fuzz_kernel_entry_points({backend!r}, {examples})
print("CALLS", n)
"""


@pytest.mark.parametrize("backend", BACKENDS)
def test_kernel_entry_points_refuse_malformed_arguments_in_a_subprocess(backend: str) -> None:
    import os
    import subprocess
    import sys

    code = _CHILD.format(tests=os.path.dirname(os.path.abspath(__file__)), backend=backend, examples=250)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900)
    tail = (proc.stdout + proc.stderr)[-6000:]
    assert proc.returncode == 0, f"{backend}: exit code {proc.returncode} (negative: killed by a signal)\n{tail}"
    assert "CALLS" in proc.stdout and int(proc.stdout.split("CALLS")[1]) >= 100, tail
