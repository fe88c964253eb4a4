"""Weight initialisation (docs/spec.md "Initialisation"): deterministic given a seed."""
from __future__ import annotations

import math

import numpy as np

INITS = ("he", "lecun", "xavier", "zeros")


def init_scale(name: str, n_in: int, n_out: int) -> float:
    """Standard deviation of the normal draw for initialiser ``name``."""
    if name == "he":
        return math.sqrt(2.0 / n_in)
    if name == "lecun":
        return math.sqrt(1.0 / n_in)
    if name == "xavier":
        return math.sqrt(2.0 / (n_in + n_out))
    if name == "zeros":
        return 0.0
    raise ValueError(f"unknown init {name!r}; choose one of {INITS}")


def init_weights(name: str, out: np.ndarray, seed: int, layer_index: int) -> None:
    """Fill ``out`` (n_in, n_out) with N(0, 1) * scale, drawn in float64.

    The stream depends only on (seed, layer_index), so adding a layer does not
    change the others' initial weights, and float32/float64 models start from
    the same numbers.
    """
    n_in, n_out = out.shape
    rng = np.random.default_rng([seed, layer_index, 0x1A17])
    out[...] = rng.standard_normal((n_in, n_out)) * init_scale(name, n_in, n_out)
