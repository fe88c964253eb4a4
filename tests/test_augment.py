"""Data augmentation (SPEC.md "Data augmentation")."""
from __future__ import annotations


import numpy as np
import pytest

import fastdl as fd
from fastdl import augment as A
from fastdl.augment import (AffineTransform, Augmenter, ElasticDistortion, RandomFlip, RandomRotation, RandomShift,
                            compose, for_digits, RandomAffine, random_flip, random_rotation, random_shift)
from fastdl.cli import build_mlp


@pytest.fixture(scope="module")
def images():
    X, y = fd.datasets.load_digits(return_images=True)
    return (X / 16.0).astype(np.float32), y


class Angle:
    """A Generator stand-in: every rotation angle is ``deg``."""

    def __init__(self, deg):
        self.deg = deg

    def uniform(self, lo, hi, size=None):
        return np.full(size, float(self.deg))


# ------------------------------------------------------------ single transforms
def test_flip(images):
    X = images[0][:20]
    assert np.array_equal(random_flip(X, np.random.default_rng(0), p=1.0), X[:, :, ::-1])
    assert np.array_equal(random_flip(X, np.random.default_rng(0), p=0.0), X)
    out = random_flip(X, np.random.default_rng(0))
    flipped = [np.array_equal(o, x[:, ::-1]) and not np.array_equal(o, x) for o, x in zip(out, X)]
    assert 0 < sum(flipped) < 20                                          # about half
    assert all(np.array_equal(o, x) or f for o, x, f in zip(out, X, flipped))


def _shifted(x, dy, dx, fill=0.0):
    out = np.full_like(x, fill)
    H, W = x.shape[:2]
    out[max(dy, 0):H + min(dy, 0), max(dx, 0):W + min(dx, 0)] = x[max(-dy, 0):H - max(dy, 0),
                                                                  max(-dx, 0):W - max(dx, 0)]
    return out


def test_shift_is_an_exact_whole_pixel_shift_with_padding(images):
    X = images[0][:50]
    out = random_shift(X, np.random.default_rng(1), max_shift=2, fill=-1.0)
    seen = set()
    for o, x in zip(out, X):
        match = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3) if np.array_equal(o, _shifted(x, dy, dx, -1.0))]
        assert match, "every output is the input shifted by whole pixels, padded with the fill value"
        seen.add(match[0])
    assert len(seen) > 5
    assert np.array_equal(random_shift(X, np.random.default_rng(1), max_shift=0), X)


def test_shift_padding_modes():
    x = np.arange(16, dtype=np.float64).reshape(1, 4, 4)
    M = np.eye(3)[None].copy()
    M[0, 1, 2] = -1                       # shift right by one: column -1 is read
    assert np.array_equal(A._warp_affine(x, M, "nearest", 0.0, 1)[0, :, 0], x[0, :, 0])
    assert np.array_equal(A._warp_affine(x, M, "wrap", 0.0, 1)[0, :, 0], x[0, :, 3])
    assert np.array_equal(A._warp_affine(x, M, "reflect", 0.0, 1)[0, :, 0], x[0, :, 0])
    M[0, 1, 2] = -2
    assert np.array_equal(A._warp_affine(x, M, "reflect", 0.0, 1)[0, :, 0], x[0, :, 1])   # ... b a | a b ...
    assert np.array_equal(A._warp_affine(x, M, "constant", 7.0, 1)[0, :, :2], np.full((4, 2), 7.0))


def test_rotation_by_90_degrees_is_rot90():
    x = np.arange(25, dtype=np.float64).reshape(1, 5, 5)
    M = RandomRotation(90).matrices(1, 5, 5, Angle(90))
    assert np.allclose(A._warp_affine(x, M, "constant", 0.0, 1), np.rot90(x, 1, axes=(1, 2)))   # counter-clockwise
    M = RandomRotation(90).matrices(1, 5, 5, Angle(-90))
    assert np.allclose(A._warp_affine(x, M, "constant", 0.0, 1), np.rot90(x, -1, axes=(1, 2)))


def test_small_rotation_keeps_the_digit(images):
    X = images[0][:64]
    assert np.array_equal(random_rotation(X, np.random.default_rng(0), max_degrees=0), X)
    out = random_rotation(X, np.random.default_rng(0), max_degrees=10)
    assert not np.array_equal(out, X)
    # bilinear interpolation redistributes ink but keeps most of it and stays in range
    assert out.min() >= 0 and out.max() <= 1 + 1e-6
    assert np.allclose(out.sum(axis=(1, 2)), X.sum(axis=(1, 2)), rtol=0.15)
    assert np.mean([np.corrcoef(o.ravel(), x.ravel())[0, 1] for o, x in zip(out, X)]) > 0.85


def test_compiled_warp_matches_scipy(monkeypatch, images):
    X = images[0][:16]
    M = RandomRotation(25).matrices(16, 8, 8, np.random.default_rng(3))
    M[:, :2, 2] += 0.3
    for mode in ("constant", "nearest", "reflect", "wrap"):
        fast = A._warp_affine(X, M, mode, 0.25, 1)
        monkeypatch.setattr(A, "_NUMBA", False)
        slow = A._warp_affine(X, M, mode, 0.25, 1)                        # scipy.ndimage.map_coordinates
        monkeypatch.setattr(A, "_NUMBA", None)
        assert np.allclose(fast, slow, atol=1e-5), mode


def test_compiled_chain_matches_the_numpy_path(monkeypatch, images):
    """The fused, compiled shift+rotation equals composing the matrices in NumPy and sampling with scipy."""
    X = images[0][:24]
    C3 = np.random.default_rng(0).random((5, 9, 7, 3))
    for aug, data in ((compose(RandomShift(2), RandomRotation(20)), X), (for_digits(image_shape=None, p=1.0), X),
                      (compose(RandomAffine(25, (0.5, 1.5), (0.8, 1.2), mode="nearest")), C3),
                      (compose(RandomRotation(30, mode="reflect"), RandomShift((1, 2), mode="reflect")), C3)):
        fast = aug(data, np.random.default_rng(4))
        monkeypatch.setattr(A, "_NUMBA", False)
        slow = aug(data, np.random.default_rng(4))
        monkeypatch.setattr(A, "_NUMBA", None)
        assert np.allclose(fast, slow, atol=1e-5)
    M = RandomShift(1).matrices(3, 8, 8, np.random.default_rng(0))          # public matrices() still works
    assert M.shape == (3, 3, 3) and np.all(np.abs(M[:, :2, 2]) <= 1) and np.all(M[:, 2] == [0, 0, 1])


def test_elastic_distortion(images):
    X = images[0][:32]
    assert np.allclose(ElasticDistortion(alpha=0.0)(X, np.random.default_rng(0)), X)
    out = ElasticDistortion()(X, np.random.default_rng(0))
    assert out.shape == X.shape and out.dtype == X.dtype and np.all(np.isfinite(out))
    assert not np.allclose(out, X)
    assert np.mean([np.corrcoef(o.ravel(), x.ravel())[0, 1] for o, x in zip(out, X)]) > 0.8
    cubic = ElasticDistortion(order=3)(X, np.random.default_rng(0))   # other orders: scipy path
    assert cubic.shape == X.shape


# ----------------------------------------------------------- shapes, seeding
@pytest.mark.parametrize("t", [RandomFlip(), RandomShift(1), RandomRotation(15), ElasticDistortion(),
                               for_digits(image_shape=None)])
def test_shapes_dtypes_and_seeding(t):
    rng = np.random.default_rng(0)
    for X in (rng.random((6, 8, 8)).astype(np.float32), rng.random((6, 7, 9, 3))):
        a = t(X, np.random.default_rng(42))
        assert a.shape == X.shape and a.dtype == X.dtype
        assert np.array_equal(a, t(X, np.random.default_rng(42)))                  # seeded
        assert not np.array_equal(a, t(X, np.random.default_rng(43)))              # random per seed
    if X.ndim == 4 and not isinstance(t, RandomFlip):
        # channels move together: a grey RGB image stays grey
        grey = np.repeat(X[..., :1], 3, axis=3)
        g = t(grey, np.random.default_rng(1))
        assert np.allclose(g[..., 0], g[..., 2])


def test_input_is_not_modified(images):
    X = images[0][:8].copy()
    before = X.copy()
    for t in (RandomFlip(1.0), RandomShift(1), RandomRotation(10), for_digits(image_shape=None)):
        t(X, np.random.default_rng(0))
    assert np.array_equal(X, before)


# --------------------------------------------------------------- Augmenter
def test_augmenter_on_flat_rows(images):
    X = images[0][:10]
    flat = X.reshape(10, 64)
    aug = Augmenter([RandomShift(1), RandomRotation(10)], image_shape=(8, 8))
    out = aug(flat, np.random.default_rng(5))
    assert out.shape == (10, 64) and out.dtype == np.float32
    same = Augmenter([RandomShift(1), RandomRotation(10)])(X, np.random.default_rng(5))
    assert np.array_equal(out, same.reshape(10, 64))
    assert np.array_equal(aug(flat, 5), out)                                          # int seed
    with pytest.raises(ValueError, match="image_shape"):
        Augmenter([RandomShift(1)])(flat, np.random.default_rng(0))
    with pytest.raises(ValueError, match="64 features"):
        Augmenter([RandomShift(1)], image_shape=(7, 7))(flat, np.random.default_rng(0))


def test_affine_transforms_are_fused_into_one_warp(images):
    X = images[0][:20]
    rng_a, rng_b = np.random.default_rng(9), np.random.default_rng(9)
    fused = compose(RandomShift(1), RandomRotation(0))(X, rng_a)      # shift, then a 0-degree rotation
    assert np.array_equal(fused, RandomShift(1)(X, rng_b))             # same draws, exact pixel copies
    two = compose(RandomShift(1), RandomRotation(10))(X, np.random.default_rng(2))
    one_by_one = RandomRotation(10)(RandomShift(1)(X, r := np.random.default_rng(2)), r)
    inner = (slice(None), slice(2, 6), slice(2, 6))                    # away from the borders
    assert np.allclose(two[inner], one_by_one[inner], atol=0.15)


def test_augmenter_probability_and_standardizer(images):
    X = images[0][:40].reshape(40, 64)
    assert np.array_equal(Augmenter([RandomShift(1)], image_shape=(8, 8), p=0.0)(X, 0), X)
    part = Augmenter([RandomShift(1)], image_shape=(8, 8), p=0.5)(X, 0)
    changed = np.any(part != X, axis=1)
    assert 0 < changed.sum() < 40
    scaler = fd.data.Standardizer().fit(X)
    Z = scaler.transform(X)
    ident = Augmenter([RandomShift(0)], image_shape=(8, 8), standardizer=scaler)(Z, 0)
    assert np.allclose(ident, Z, atol=1e-4)
    # with the standardizer, padding is the raw background 0, not the standardized 0
    shifted = Augmenter([RandomShift((0, 2))], image_shape=(8, 8), standardizer=scaler)(Z, 1)
    raw = scaler.inverse_transform(shifted).reshape(40, 8, 8)
    assert np.all(np.isclose(raw[:, :, 0], 0, atol=1e-4) | np.isclose(raw[:, :, -1], 0, atol=1e-4))


@pytest.mark.parametrize("make, exc", [
    (lambda: Augmenter([1]), TypeError),
    (lambda: Augmenter([], image_shape=(8,)), ValueError),
    (lambda: Augmenter([], p=2.0), ValueError),
    (lambda: Augmenter([], standardizer=object()), TypeError),
    (lambda: RandomShift(-1), ValueError),
    (lambda: RandomShift(1.5), ValueError),
    (lambda: RandomRotation(200), ValueError),
    (lambda: RandomRotation(10, mode="mirror"), ValueError),
    (lambda: RandomRotation(10, order=7), ValueError),
    (lambda: ElasticDistortion(sigma=0), ValueError),
    (lambda: RandomFlip(1.5), ValueError),
    (lambda: RandomShift(1)(np.zeros((4, 8)), np.random.default_rng(0)), ValueError),
    (lambda: RandomShift(1)(np.zeros((2, 8, 8)), "seed"), TypeError),
])
def test_bad_arguments(make, exc):
    with pytest.raises(exc):
        make()


def test_digits_preset_has_no_flip():
    aug = for_digits()
    assert not any(isinstance(t, RandomFlip) for t in aug.transforms)
    assert [type(t) for t in aug.transforms] == [RandomAffine]
    assert aug.image_shape == (8, 8) and aug.p == 0.5
    assert isinstance(aug.transforms[0], AffineTransform)
    assert [type(t) for t in for_digits(max_shift=1).transforms] == [RandomShift, RandomAffine]
    with pytest.raises(TypeError):
        for_digits(1, 10)  # keyword-only: the old positional (max_shift, max_degrees) must not silently change meaning


def test_augmenting_a_batch_is_one_compiled_warp(images, monkeypatch):
    """for_digits() on flat rows: one compiled bilinear pass over the augmented rows, no Python loop
    per image (what keeps augmentation cheap next to a training step; no timing in tests)."""
    X = images[0][:32].reshape(32, 64)
    K = A._compiled()
    assert K, "the compiled warps (numba) are not available"
    calls = []

    class Counting:
        def __getattr__(self, name):
            fn = getattr(K, name)

            def wrapped(*args):
                calls.append((name, args[0].shape))
                return fn(*args)
            return wrapped

    monkeypatch.setattr(A, "_NUMBA", Counting())
    out = for_digits(p=1.0)(X, np.random.default_rng(1))
    assert out.shape == X.shape
    assert calls == [("affine_bilinear", (32, 8, 8, 1))]
    calls.clear()
    for_digits(max_shift=1, p=1.0)(X, np.random.default_rng(1))   # shift + affine: still one fused pass
    assert len(calls) == 1


# -------------------------------------------------------------- with fit()
def _digits_split(seed):
    X, y = fd.datasets.load_digits()
    X = (X / 16.0).astype(np.float32)                                     # background stays 0
    Xtr, Xdv, _, ytr, ydv, _ = fd.data.train_dev_test_split(X, y, seed=seed, stratify=True)
    return Xtr[:300], ytr[:300], Xdv, ydv                                 # small train set: high variance


def test_fit_with_augmentation_is_reproducible():
    Xtr, ytr, _, _ = _digits_split(0)
    params = []
    for _ in range(2):
        model = fd.Sequential(build_mlp(64, [16], 10, batchnorm=False), backend="reference", seed=0)
        model.fit(Xtr, ytr, epochs=2, augment=for_digits())
        params.append(model.params.copy())
    assert np.array_equal(*params)


def _readme_model_accuracy(seed, augment, Xtr, ytr, Xdv, ydv, Xte, yte):
    model = fd.Sequential([fd.Dense(64, 128, use_bias=False), fd.BatchNorm(128), fd.ReLU(),
                           fd.Dropout(keep_prob=0.9), fd.Dense(128, 10)], l2=1e-3, seed=seed)
    model.fit(Xtr, ytr, optimizer=fd.Adam(lr=3e-3), epochs=40, batch_size=32, validation_data=(Xdv, ydv),
              lr_schedule=fd.schedules.InverseTimeDecay(decay_rate=0.1),
              callbacks=[fd.EarlyStopping(patience=5, restore_best=True)], augment=augment)
    return model.evaluate(Xte, yte)["accuracy"]


def test_for_digits_helps_the_readme_model_on_a_quarter_of_the_digits():
    """The README's model and split, a quarter of the training set (benchmarks/augment_accuracy.py has the
    full measurement): for_digits() must raise the mean test accuracy over 3 seeds."""
    X, y = fd.datasets.load_digits()
    Xtr, Xdv, Xte, ytr, ydv, yte = fd.data.train_dev_test_split(X, y, seed=0, stratify=True)
    scaler = fd.data.Standardizer().fit(Xtr)
    Xtr, Xdv, Xte = (scaler.transform(a) for a in (Xtr, Xdv, Xte))
    data = (Xtr[:len(Xtr) // 4], ytr[:len(Xtr) // 4], Xdv, ydv, Xte, yte)
    acc = {name: np.mean([_readme_model_accuracy(seed, aug, *data) for seed in range(3)])
           for name, aug in (("without", None), ("with", for_digits(standardizer=scaler)))}
    # measured: without 94.4%, with 95.3% (one test example is 0.28 point)
    assert acc["with"] > acc["without"] + 0.004, acc


# ------------------------------------------------ RandomAffine, std_floor (issue 16)
def test_random_affine_special_cases(images):
    X = images[0][:16]
    assert np.allclose(RandomAffine()(X, np.random.default_rng(0)), X)                    # all ranges 0: identity
    # a translation of exactly +-1 pixel on both axes copies pixels, like RandomShift
    one = RandomAffine(translate=1.0)
    M = one.matrices(16, 8, 8, np.random.default_rng(3))
    assert np.allclose(M[:, :2, :2], np.eye(2)) and np.all(np.abs(M[:, :2, 2]) <= 1)
    # a pure zoom about the centre keeps the centre and scales distances from it
    Z = RandomAffine(scale=(2.0, 2.0)).matrices(1, 9, 9, np.random.default_rng(0))[0]
    assert np.allclose(Z @ [4, 4, 1], [4, 4, 1]) and np.allclose(Z @ [8, 4, 1], [6, 4, 1])
    # the rotation turns the same way as RandomRotation for the same angle (same inverse map)
    r = RandomAffine(degrees=30).matrices(64, 8, 8, np.random.default_rng(1))
    theta = np.degrees(np.arctan2(r[:, 0, 1], r[:, 0, 0]))
    assert np.all(np.abs(theta) <= 30) and theta.std() > 5
    ref = A._chain_matrices([1], np.stack([theta, 0 * theta, 0 * theta], axis=1)[None], 8, 8)
    assert np.allclose(r, ref)
    with pytest.raises(ValueError):
        RandomAffine(scale=(1.2, 0.9))
    with pytest.raises(ValueError):
        RandomAffine(translate=(1, 2, 3))


def _standardized_digits():
    X, y = fd.datasets.load_digits()
    scaler = fd.data.Standardizer().fit(X[:1000])
    return scaler.transform(X[:1000]).astype(np.float32), scaler


def test_std_floor_keeps_blank_pixels_in_range():
    """Moving ink into always-blank border pixels (std ~0) must not create standardised values in the
    hundreds; features with an ordinary std are standardised exactly."""
    Z, scaler = _standardized_digits()
    aug = Augmenter([RandomShift(1)], image_shape=(8, 8), standardizer=scaler)
    exact = Augmenter([RandomShift(1)], image_shape=(8, 8), standardizer=scaler, std_floor=None)
    a, b = aug(Z, np.random.default_rng(0)), exact(Z, np.random.default_rng(0))
    assert np.abs(b).max() > 100                      # the trap: e.g. a std-0.03 pixel receiving ink
    assert np.abs(a).max() < 3 * np.abs(Z).max()      # bounded by what the training data holds
    std = np.sqrt(scaler.var_ + scaler.eps)
    normal = std >= 0.25 * np.median(std)
    assert normal.sum() > 40
    assert np.allclose(a[:, normal], b[:, normal], atol=1e-4)


def test_augmenter_p_leaves_the_other_rows_bit_identical():
    Z, scaler = _standardized_digits()
    aug = for_digits(standardizer=scaler)                  # p = 0.5
    out = aug(Z[:200], np.random.default_rng(0))
    same = np.all(out == Z[:200], axis=1)
    assert 60 < same.sum() < 140                           # about half untouched, bit for bit
    assert out.dtype == Z.dtype


def test_for_digits_on_standardized_digits_stays_in_distribution():
    Z, scaler = _standardized_digits()
    out = for_digits(standardizer=scaler, p=1.0)(Z, np.random.default_rng(0))
    assert np.abs(out).max() < 3 * np.abs(Z).max()
    # a mild warp: every image stays close to its original
    raw_out, raw = scaler.inverse_transform(out), scaler.inverse_transform(Z)
    corr = [np.corrcoef(o, z)[0, 1] for o, z in zip(raw_out, raw)]
    assert np.median(corr) > 0.8
