"""Tests for fastdl.data and fastdl.datasets."""
from __future__ import annotations

import gzip
import json
import os
import struct

import numpy as np
import pytest

from fastdl.data import (
    DataFormatError,
    NotFittedError,
    Standardizer,
    epoch_permutation,
    iterate_minibatches,
    load_csv,
    load_dataset,
    load_idx,
    load_npz,
    save_npz,
    split_sizes,
    train_dev_test_split,
)
from fastdl.datasets import load_digits


# ---------------------------------------------------------------- split sizes

@pytest.mark.parametrize("m, expected", [
    (10, (6, 2, 2)),
    (100, (60, 20, 20)),
    (1797, (1079, 359, 359)),
    (10_000, (6000, 2000, 2000)),
    (50_000, (30_000, 10_000, 10_000)),
    (100_000, (80_000, 10_000, 10_000)),
    (1_000_000, (980_000, 10_000, 10_000)),
    (10_000_000, (9_800_000, 100_000, 100_000)),
])
def test_default_split_sizes(m, expected):
    assert split_sizes(m) == expected


def test_default_split_rule_is_continuous_and_monotone():
    ms = np.unique(np.logspace(1, 8, 400).astype(int))
    parts = np.array([split_sizes(int(m))[2] for m in ms])
    assert np.all(np.diff(parts) >= 0)
    big = ms[1:] >= 1000  # rounding makes tiny sizes step by whole examples
    ratio = parts[1:][big] / parts[:-1][big]
    assert np.all(ratio < 1.2)  # no jumps between neighbouring sizes


def test_no_dev_set_defaults_to_70_30():
    assert split_sizes(100, dev_size=0) == (70, 0, 30)
    assert split_sizes(1000, dev_size=0.0) == (700, 0, 300)
    assert split_sizes(100, test_size=0) == (70, 30, 0)
    assert split_sizes(2_000_000, dev_size=0) == (1_980_000, 0, 20_000)


def test_explicit_sizes_fraction_and_count():
    assert split_sizes(100, dev_size=0.1, test_size=0.25) == (65, 10, 25)
    assert split_sizes(100, dev_size=5, test_size=7) == (88, 5, 7)
    assert split_sizes(100, dev_size=np.int64(5), test_size=0.5) == (45, 5, 50)
    # one given, the other by the default rule
    assert split_sizes(100, test_size=0.1) == (70, 20, 10)
    # a requested non-empty part never rounds to 0
    assert split_sizes(10, dev_size=0.01, test_size=0.01) == (8, 1, 1)


@pytest.mark.parametrize("kwargs, match", [
    (dict(dev_size=0.5, test_size=0.5), "must be < 1"),
    (dict(dev_size=0.7, test_size=0.4), "must be < 1"),
    (dict(dev_size=-0.1), "fractional size"),
    (dict(test_size=-3), "negative"),
    (dict(test_size=1.0), "fractional size"),
    (dict(test_size=float("nan")), "fractional size"),
    (dict(test_size=101), "more than the 100"),
    (dict(dev_size=50, test_size=50), "no training examples"),
    (dict(test_size=0.85), "no training examples"),
])
def test_bad_split_sizes(kwargs, match):
    with pytest.raises(ValueError, match=match):
        split_sizes(100, **kwargs)


def test_bad_split_size_type():
    with pytest.raises(TypeError):
        split_sizes(100, dev_size="10%")
    with pytest.raises(TypeError):
        split_sizes(100, dev_size=True)


# ---------------------------------------------------------------- the split

def test_split_partitions_and_is_seeded():
    m = 103
    X = np.arange(m * 2).reshape(m, 2)
    y = np.arange(m)
    Xtr, Xdv, Xte, ytr, ydv, yte = train_dev_test_split(X, y, seed=3)
    assert (len(Xtr), len(Xdv), len(Xte)) == split_sizes(m)
    # rows stay paired with their labels
    for Xp, yp in ((Xtr, ytr), (Xdv, ydv), (Xte, yte)):
        np.testing.assert_array_equal(Xp[:, 0], 2 * yp)
    # every example lands in exactly one part
    np.testing.assert_array_equal(np.sort(np.concatenate([ytr, ydv, yte])), y)
    again = train_dev_test_split(X, y, seed=3)
    for a, b in zip((Xtr, Xdv, Xte, ytr, ydv, yte), again):
        np.testing.assert_array_equal(a, b)
    other = train_dev_test_split(X, y, seed=4)
    assert not np.array_equal(other[3], ytr)
    # shuffled, not a contiguous cut
    assert not np.array_equal(np.sort(ytr), ytr)


def test_split_no_dev_gives_empty_dev_part():
    X = np.zeros((50, 3), dtype=np.float32)
    y = np.arange(50)
    Xtr, Xdv, Xte, ytr, ydv, yte = train_dev_test_split(X, y, dev_size=0)
    assert Xtr.shape == (35, 3) and Xdv.shape == (0, 3) and Xte.shape == (15, 3)
    assert Xtr.dtype == np.float32 and ydv.shape == (0,)


def test_split_large_m_dev_test_about_1e4():
    m = 1_000_000
    X = np.zeros((m, 1), dtype=np.uint8)
    y = np.zeros(m, dtype=np.uint8)
    Xtr, Xdv, Xte, ytr, ydv, yte = train_dev_test_split(X, y)
    assert len(Xdv) == len(Xte) == 10_000
    assert len(Xtr) == 980_000 == len(ytr)


def test_split_y_none_and_mismatch():
    X = np.ones((20, 2))
    parts = train_dev_test_split(X, None)
    assert parts[3] is None and parts[4] is None and parts[5] is None
    with pytest.raises(ValueError, match="different numbers of examples.*20.*19"):
        train_dev_test_split(X, np.zeros(19))


def test_split_stratified_keeps_proportions():
    rng = np.random.default_rng(0)
    counts = {0: 500, 1: 300, 2: 150, 3: 50}
    y = rng.permutation(np.repeat(list(counts), list(counts.values())))
    X = np.arange(len(y)).reshape(-1, 1)
    Xtr, Xdv, Xte, ytr, ydv, yte = train_dev_test_split(X, y, stratify=True, seed=1)
    assert (len(ytr), len(ydv), len(yte)) == (600, 200, 200)
    for part, frac in ((ydv, 0.2), (yte, 0.2), (ytr, 0.6)):
        got = np.bincount(part, minlength=4)
        ideal = np.array([c * frac for c in counts.values()])
        assert np.all(np.abs(got - ideal) <= 2), (got, ideal)
    np.testing.assert_array_equal(np.sort(np.concatenate([Xtr, Xdv, Xte]).ravel()), np.arange(len(y)))
    np.testing.assert_array_equal(y[Xtr.ravel()], ytr)
    # parts are not grouped by class
    assert np.any(np.diff(ytr) < 0)


def test_split_stratified_uneven_and_exact_totals():
    y = np.array([0] * 7 + [1] * 3 + [2] * 1 + [3] * 22)
    X = np.zeros((len(y), 1))
    for seed in range(5):
        _, _, _, ytr, ydv, yte = train_dev_test_split(X, y, stratify=True, seed=seed,
                                                      dev_size=0.2, test_size=5)
        assert (len(ydv), len(yte)) == (7, 5)
        total = np.bincount(ytr, minlength=4) + np.bincount(ydv, minlength=4) + np.bincount(yte, minlength=4)
        np.testing.assert_array_equal(total, [7, 3, 1, 22])
        ideal_dev = 7 * np.array([7, 3, 1, 22]) / len(y)
        assert np.all(np.abs(np.bincount(ydv, minlength=4) - ideal_dev) < 1)


def test_split_stratify_rejects_bad_labels():
    X = np.zeros((10, 1))
    with pytest.raises(ValueError, match="class labels"):
        train_dev_test_split(X, np.linspace(0, 1, 10), stratify=True)
    with pytest.raises(ValueError, match="needs labels"):
        train_dev_test_split(X, None, stratify=True)
    with pytest.raises(ValueError, match="1-D"):
        train_dev_test_split(X, np.zeros((10, 2)), stratify=True)
    # integral floats are fine
    train_dev_test_split(X, np.array([0.0, 1.0] * 5), stratify=True)


# ---------------------------------------------------------------- Standardizer

def test_standardizer_matches_spec_formula():
    rng = np.random.default_rng(0)
    X = rng.normal(3.0, 2.0, size=(200, 5)) * np.array([1, 10, 0.1, 5, 100])
    s = Standardizer().fit(X)
    mu = X.mean(axis=0)
    s2 = ((X - mu) ** 2).mean(axis=0)
    np.testing.assert_allclose(s.mean_, mu)
    np.testing.assert_allclose(s.var_, s2)
    Z = s.transform(X)
    np.testing.assert_allclose(Z, (X - mu) / np.sqrt(s2 + 1e-8))
    np.testing.assert_allclose(Z.mean(axis=0), 0, atol=1e-12)
    np.testing.assert_allclose(Z.std(axis=0), 1, atol=1e-6)
    np.testing.assert_allclose(s.inverse_transform(Z), X, rtol=1e-12, atol=1e-9)


def test_standardizer_fits_on_train_only():
    X = np.arange(12.0).reshape(-1, 1)
    Xtr, Xte = X[:6], X[6:]
    s = Standardizer()
    Ztr = s.fit_transform(Xtr)
    Zte = s.transform(Xte)
    assert s.mean_[0] == pytest.approx(2.5)
    np.testing.assert_allclose(Zte[:, 0], (Xte[:, 0] - 2.5) / np.sqrt(Xtr.var() + 1e-8))
    assert Zte.mean() > 2  # dev/test statistics did not leak into the fit
    np.testing.assert_allclose(Ztr.mean(), 0, atol=1e-12)


@pytest.mark.parametrize("eps", [1e-8, 0.0])
def test_standardizer_constant_features(eps):
    X = np.array([[1.0, 5.0, 0.1], [2.0, 5.0, 0.1], [3.0, 5.0, 0.1]])
    s = Standardizer(eps=eps).fit(X)
    assert s.var_[1] == 0 and s.var_[2] == 0
    Z = s.transform(X)
    assert np.all(np.isfinite(Z))
    np.testing.assert_array_equal(Z[:, 1:], 0)
    # a dev value that differs from the training constant still maps to 0
    Zd = s.transform(np.array([[2.0, 7.0, -3.0]]))
    assert np.all(np.isfinite(Zd)) and Zd[0, 1] == 0 and Zd[0, 2] == 0
    np.testing.assert_allclose(s.inverse_transform(Z), X)


def test_standardizer_single_example_and_float32_constant():
    s = Standardizer().fit(np.array([[1.0, 2.0]]))
    np.testing.assert_array_equal(s.transform([[1.0, 2.0], [3.0, 4.0]]), 0)
    X = np.full((1000, 1), 0.1, dtype=np.float32)
    s = Standardizer().fit(X)
    assert s.var_[0] == 0 and np.all(s.transform(X) == 0)


def test_standardizer_dtypes():
    rng = np.random.default_rng(1)
    X32 = rng.normal(size=(50, 4)).astype(np.float32)
    s = Standardizer().fit(X32)
    assert s.transform(X32).dtype == np.float32
    assert s.inverse_transform(s.transform(X32)).dtype == np.float32
    assert s.transform(X32.astype(np.float64)).dtype == np.float64
    Xi = rng.integers(0, 17, size=(50, 4))
    assert Standardizer().fit_transform(Xi).dtype == np.float64
    assert Standardizer().fit_transform(Xi.astype(np.uint8)).dtype == np.float64


def test_standardizer_not_fitted_and_shape_errors():
    s = Standardizer()
    with pytest.raises(NotFittedError, match="not fitted yet.*fit"):
        s.transform(np.zeros((2, 3)))
    with pytest.raises(ValueError):  # NotFittedError is a ValueError too
        s.inverse_transform(np.zeros((2, 3)))
    with pytest.raises(NotFittedError):
        s.to_dict()
    s.fit(np.random.default_rng(0).normal(size=(10, 3)))
    with pytest.raises(ValueError, match="4 features.*fitted with 3 features"):
        s.transform(np.zeros((2, 4)))
    with pytest.raises(ValueError, match="3 features"):
        s.transform(np.zeros(3))
    with pytest.raises(ValueError, match="NaN"):
        Standardizer().fit(np.array([[1.0], [np.nan]]))
    with pytest.raises(ValueError, match="0 examples"):
        Standardizer().fit(np.zeros((0, 3)))
    with pytest.raises(ValueError, match="2-D"):
        Standardizer().fit(np.zeros(5))


def test_standardizer_dict_roundtrip_json():
    rng = np.random.default_rng(2)
    X = np.hstack([rng.normal(size=(30, 3)), np.ones((30, 1))])
    s = Standardizer(eps=1e-6).fit(X)
    d = json.loads(json.dumps(s.to_dict()))
    s2 = Standardizer.from_dict(d)
    assert s2.eps == 1e-6
    np.testing.assert_array_equal(s2.mean_, s.mean_)
    np.testing.assert_array_equal(s2.var_, s.var_)
    Xd = rng.normal(size=(5, 4))
    np.testing.assert_array_equal(s2.transform(Xd), s.transform(Xd))
    # arrays are accepted as well as lists
    s3 = Standardizer.from_dict({"mean": s.mean_, "var": s.var_, "eps": 1e-6})
    np.testing.assert_array_equal(s3.transform(Xd), s.transform(Xd))
    with pytest.raises(ValueError, match="inconsistent"):
        Standardizer.from_dict({"mean": [0.0, 1.0], "var": [1.0]})
    with pytest.raises(ValueError, match="missing"):
        Standardizer.from_dict({"mean": [0.0]})


def test_standardizer_blocked_fit_matches_numpy():
    # more rows than one accumulation block, float32 input
    X = np.random.default_rng(4).normal(5.0, 3.0, size=(70_000, 20)).astype(np.float32)
    s = Standardizer().fit(X)
    X64 = X.astype(np.float64)
    np.testing.assert_allclose(s.mean_, X64.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(s.var_, X64.var(axis=0), rtol=1e-10)
    with pytest.raises(ValueError, match="infinity"):
        Standardizer().fit(np.array([[1.0], [np.inf]], dtype=np.float32))


def test_standardizer_image_shaped_input():
    X = np.random.default_rng(3).normal(size=(20, 4, 4))
    s = Standardizer().fit(X)
    assert s.mean_.shape == (4, 4) and s.n_features_in_ == 16
    assert s.transform(X).shape == (20, 4, 4)
    with pytest.raises(ValueError, match="feature shape"):
        s.transform(np.zeros((2, 4, 5)))
    s2 = Standardizer.from_dict(s.to_dict())
    np.testing.assert_array_equal(s2.transform(X), s.transform(X))


# ---------------------------------------------------------------- mini-batches

@pytest.mark.parametrize("m, bs", [(10, 3), (10, 5), (10, 10), (10, 1), (7, 100), (1, 1)])
def test_minibatches_cover_each_example_once(m, bs):
    X = np.arange(m * 2).reshape(m, 2)
    y = np.arange(m)
    batches = list(iterate_minibatches(X, y, bs, seed=5, epoch=2))
    assert len(batches) == -(-m // bs)
    sizes = [len(b[1]) for b in batches]
    assert all(s == min(bs, m) for s in sizes[:-1])
    assert sizes[-1] == (m % bs or min(bs, m))
    seen = np.concatenate([b[1] for b in batches])
    np.testing.assert_array_equal(np.sort(seen), y)
    for xb, yb in batches:
        np.testing.assert_array_equal(xb[:, 0], 2 * yb)
    np.testing.assert_array_equal(seen, epoch_permutation(m, 5, 2))


def test_minibatches_reproducible_and_differ_by_epoch():
    X = np.arange(100).reshape(100, 1)
    a = [yb for _, yb in iterate_minibatches(X, X[:, 0], 16, seed=1, epoch=0)]
    b = [yb for _, yb in iterate_minibatches(X, X[:, 0], 16, seed=1, epoch=0)]
    c = [yb for _, yb in iterate_minibatches(X, X[:, 0], 16, seed=1, epoch=1)]
    d = [yb for _, yb in iterate_minibatches(X, X[:, 0], 16, seed=2, epoch=0)]
    for u, v in zip(a, b):
        np.testing.assert_array_equal(u, v)
    assert not np.array_equal(np.concatenate(a), np.concatenate(c))
    assert not np.array_equal(np.concatenate(a), np.concatenate(d))
    np.testing.assert_array_equal(
        epoch_permutation(100, 1, 0), np.random.default_rng([1, 0]).permutation(100))


def test_minibatches_no_shuffle_and_no_labels():
    X = np.arange(10).reshape(10, 1)
    batches = list(iterate_minibatches(X, None, 4, shuffle=False))
    assert [b[0][:, 0].tolist() for b in batches] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert all(b[1] is None for b in batches)
    assert list(iterate_minibatches(np.zeros((0, 3)), np.zeros(0), 4)) == []


@pytest.mark.parametrize("bs", [0, -1, 2.5, None, True])
def test_minibatches_bad_batch_size(bs):
    with pytest.raises(ValueError, match="batch_size"):
        iterate_minibatches(np.zeros((4, 1)), np.zeros(4), bs)  # raised at the call


def test_minibatches_mismatch_and_bad_seed():
    with pytest.raises(ValueError, match="different numbers"):
        iterate_minibatches(np.zeros((4, 1)), np.zeros(5), 2)
    with pytest.raises(ValueError, match="seed"):
        epoch_permutation(4, -1, 0)
    with pytest.raises(ValueError, match="epoch"):
        epoch_permutation(4, 0, 1.5)


# ---------------------------------------------------------------- npz

def test_npz_roundtrip_atomic(tmp_path):
    X = np.random.default_rng(0).normal(size=(6, 3)).astype(np.float32)
    y = np.arange(6)
    p = tmp_path / "d.npz"
    assert save_npz(p, X, y) == p
    X2, y2 = load_npz(p)
    np.testing.assert_array_equal(X2, X)
    np.testing.assert_array_equal(y2, y)
    assert X2.dtype == np.float32
    # overwrite in place, compressed; no temp files left behind
    save_npz(p, X[:2], y[:2], compress=True)
    assert load_npz(p)[0].shape == (2, 3)
    assert sorted(os.listdir(tmp_path)) == ["d.npz"]
    Xd, yd = load_dataset(p)
    np.testing.assert_array_equal(Xd, X[:2])


def test_save_npz_failure_leaves_target_intact(tmp_path):
    p = tmp_path / "d.npz"
    save_npz(p, np.ones((2, 2)))
    with pytest.raises(ValueError, match="object"):
        save_npz(p, np.array([{"a": 1}], dtype=object))
    assert load_npz(p, y_key=None)[0].shape == (2, 2)
    assert os.listdir(tmp_path) == ["d.npz"]


def test_npz_missing_key_lists_available(tmp_path):
    p = tmp_path / "d.npz"
    np.savez(p, images=np.zeros((2, 2)), labels=np.zeros(2))
    with pytest.raises(KeyError, match=r"'X'.*available keys.*images.*labels"):
        load_npz(p)
    with pytest.raises(DataFormatError):
        load_npz(p)
    X, y = load_npz(p, x_key="images", y_key="labels")
    assert X.shape == (2, 2) and y.shape == (2,)


def test_npz_not_an_archive(tmp_path):
    p = tmp_path / "d.npz"
    p.write_text("1,2\n")
    with pytest.raises(DataFormatError, match="not an .npz archive"):
        load_npz(p)
    np.save(tmp_path / "a.npy", np.zeros(3))
    os.replace(tmp_path / "a.npy", p)
    with pytest.raises(DataFormatError, match="single .npy"):
        load_npz(p)


def test_npz_refuses_pickles(tmp_path):
    p = tmp_path / "d.npz"
    np.savez(p, X=np.array([{"a": 1}], dtype=object), y=np.zeros(1))
    with pytest.raises(DataFormatError, match="pickle"):
        load_npz(p)


# ---------------------------------------------------------------- csv

def test_csv_without_header(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text("1,2,0\n3.5,4,1\n\n5,6e-1,2\n")
    X, y = load_csv(p)
    np.testing.assert_array_equal(X, [[1, 2], [3.5, 4], [5, 0.6]])
    assert X.dtype == np.float64
    np.testing.assert_array_equal(y, [0, 1, 2])
    assert y.dtype == np.int64


def test_csv_with_header_and_gzip(tmp_path):
    text = "# a comment\nlabel,x1,x2\n1,0.5,0.25\r\n0,1,2\n"
    p = tmp_path / "d.csv"
    p.write_text(text)
    X, y = load_csv(p, label_column=0)
    np.testing.assert_array_equal(X, [[0.5, 0.25], [1, 2]])
    np.testing.assert_array_equal(y, [1, 0])
    pg = tmp_path / "d.csv.gz"
    with gzip.open(pg, "wt") as f:
        f.write(text)
    Xg, yg = load_dataset(pg, label_column=0)
    np.testing.assert_array_equal(Xg, X)
    np.testing.assert_array_equal(yg, y)


def test_csv_numeric_header_forced_and_float_labels(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text("0,1,2\n1,2,0.5\n3,4,1.5\n")
    X, y = load_csv(p, skip_header=True)
    assert X.shape == (2, 2)
    assert y.dtype == np.float64 and y.tolist() == [0.5, 1.5]
    X, y = load_csv(p, label_column=None, dtype=np.float32)
    assert X.shape == (3, 3) and y is None and X.dtype == np.float32
    with pytest.raises(ValueError, match="out of range"):
        load_csv(p, label_column=3)


def test_csv_other_delimiters(tmp_path):
    p = tmp_path / "d.tsv"
    p.write_text("1\t2\t1\n3\t4\t0\n")
    X, y = load_dataset(p)
    assert X.shape == (2, 2) and y.tolist() == [1, 0]
    p = tmp_path / "d.txt"
    p.write_text("1  2 1\n3 4   0\n")
    X, y = load_csv(p, delimiter=None)
    assert X.shape == (2, 2)


def test_csv_non_numeric_cell_names_line(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text("a,b,c\n1,2,0\n3,oops,1\n")
    with pytest.raises(DataFormatError, match=r"line 3, column 2: non-numeric cell 'oops'"):
        load_csv(p)
    p.write_text("1,2,0\n3,,1\n")
    with pytest.raises(DataFormatError, match=r"line 2, column 2: an empty cell"):
        load_csv(p)
    p.write_text("1,2,0\n3,1\n")
    with pytest.raises(DataFormatError, match=r"line 2 has 2 columns, expected 3"):
        load_csv(p)
    p.write_text("\n# only a comment\n")
    with pytest.raises(DataFormatError, match="no data"):
        load_csv(p)
    p.write_text("x,y\n")
    with pytest.raises(DataFormatError, match="no data"):
        load_csv(p)


# ---------------------------------------------------------------- idx

def _idx_bytes(a: np.ndarray, code: int = 0x08) -> bytes:
    dt = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}[code]
    head = struct.pack(">BBBB", 0, 0, code, a.ndim) + struct.pack(f">{a.ndim}I", *a.shape)
    return head + a.astype(dt).tobytes()


@pytest.fixture
def mnist_like(tmp_path):
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, size=(5, 4, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, size=5).astype(np.uint8)
    (tmp_path / "train-images-idx3-ubyte").write_bytes(_idx_bytes(imgs))
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(_idx_bytes(labels))
    return tmp_path, imgs, labels


def test_idx_images_and_labels(mnist_like):
    d, imgs, labels = mnist_like
    X, y = load_idx(d / "train-images-idx3-ubyte", d / "train-labels-idx1-ubyte")
    assert X.shape == (5, 12) and X.dtype == np.uint8
    np.testing.assert_array_equal(X, imgs.reshape(5, -1))
    assert y.dtype == np.int64
    np.testing.assert_array_equal(y, labels)
    X3, y3 = load_idx(d / "train-images-idx3-ubyte", flatten=False, dtype=np.float32)
    assert X3.shape == (5, 4, 3) and X3.dtype == np.float32 and y3 is None
    # load_dataset finds the labels file next to the images file
    Xd, yd = load_dataset(d / "train-images-idx3-ubyte")
    np.testing.assert_array_equal(Xd, X)
    np.testing.assert_array_equal(yd, labels)


def test_idx_gzip(mnist_like, tmp_path):
    d, imgs, labels = mnist_like
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"):
        with gzip.open(d / (name + ".gz"), "wb") as f:
            f.write((d / name).read_bytes())
    X, y = load_dataset(d / "train-images-idx3-ubyte.gz")
    np.testing.assert_array_equal(X, imgs.reshape(5, -1))
    np.testing.assert_array_equal(y, labels)
    # gzip content under a plain name is recognised by its magic bytes
    (tmp_path / "sneaky.idx").write_bytes((d / "train-images-idx3-ubyte.gz").read_bytes())
    np.testing.assert_array_equal(load_idx(tmp_path / "sneaky.idx")[0], X)


@pytest.mark.parametrize("code", [0x09, 0x0B, 0x0C, 0x0D, 0x0E])
def test_idx_other_types_big_endian(tmp_path, code):
    a = np.arange(-6, 6).reshape(3, 4)
    p = tmp_path / "a.idx"
    p.write_bytes(_idx_bytes(a, code))
    X, _ = load_idx(p)
    np.testing.assert_array_equal(X, a)
    assert X.dtype.isnative


def test_idx_truncated(mnist_like):
    d, _, _ = mnist_like
    raw = (d / "train-images-idx3-ubyte").read_bytes()
    p = d / "cut.idx"
    p.write_bytes(raw[:-1])
    with pytest.raises(DataFormatError, match="truncated"):
        load_idx(p)
    p.write_bytes(raw + b"\0")  # trailing garbage: dims do not match the size
    with pytest.raises(DataFormatError, match="declares dims"):
        load_idx(p)
    p.write_bytes(raw[:10])  # header cut inside the dims
    with pytest.raises(DataFormatError, match="truncated IDX header"):
        load_idx(p)
    p.write_bytes(raw[:2])
    with pytest.raises(DataFormatError, match="truncated"):
        load_idx(p)
    pg = d / "cut.idx.gz"
    with gzip.open(pg, "wb") as f:
        f.write(raw[:-3])
    with pytest.raises(DataFormatError, match="truncated"):
        load_idx(pg)
    # a gzip stream cut short
    pg.write_bytes(gzip.compress(raw)[:-12])
    with pytest.raises(DataFormatError):
        load_idx(pg)


def test_idx_wrong_magic(tmp_path):
    p = tmp_path / "bad.idx"
    p.write_bytes(b"\x00\x01\x08\x01" + struct.pack(">I", 1) + b"\x00")
    with pytest.raises(DataFormatError, match="magic"):
        load_idx(p)
    p.write_bytes(b"\x00\x00\x07\x01" + struct.pack(">I", 1) + b"\x00")
    with pytest.raises(DataFormatError, match="magic"):
        load_idx(p)
    p.write_bytes(b"\x00\x00\x08\x00")
    with pytest.raises(DataFormatError, match="0 dimensions"):
        load_idx(p)


@pytest.mark.parametrize("gz", [False, True])
def test_idx_absurd_dims_do_not_allocate(tmp_path, gz):
    # declares 2**32-1 cubed float64s (~6e29 bytes) but holds 16 bytes
    raw = b"\x00\x00\x0e\x03" + struct.pack(">3I", *(2**32 - 1,) * 3) + b"\0" * 16
    p = tmp_path / ("huge.idx.gz" if gz else "huge.idx")
    p.write_bytes(gzip.compress(raw) if gz else raw)
    with pytest.raises(DataFormatError, match="declares dims"):
        load_idx(p)


def test_idx_label_count_mismatch(mnist_like):
    d, _, labels = mnist_like
    (d / "few-labels.idx").write_bytes(_idx_bytes(labels[:4]))
    with pytest.raises(DataFormatError, match="4 labels for 5 examples"):
        load_idx(d / "train-images-idx3-ubyte", d / "few-labels.idx")


def test_load_dataset_unknown_extension(tmp_path):
    with pytest.raises(ValueError, match="unknown data file type"):
        load_dataset(tmp_path / "data.parquet")


# ---------------------------------------------------------------- digits

def test_load_digits():
    X, y = load_digits()
    assert X.shape == (1797, 64) and X.dtype == np.float32
    assert y.shape == (1797,) and y.dtype == np.int64
    assert X.min() == 0 and X.max() == 16
    np.testing.assert_array_equal(X, np.round(X))
    counts = np.bincount(y)
    assert len(counts) == 10 and counts.sum() == 1797
    assert np.all((counts >= 170) & (counts <= 190))
    np.testing.assert_array_equal(counts, [178, 182, 177, 183, 181, 182, 181, 179, 174, 180])


def test_load_digits_images_and_copies():
    X, y = load_digits(return_images=True, dtype="float64")
    assert X.shape == (1797, 8, 8) and X.dtype == np.float64
    X2, _ = load_digits()
    np.testing.assert_array_equal(X.reshape(1797, 64), X2)
    X2[:] = -1
    y[:] = -1  # callers own their arrays: the cache is not affected
    X3, y3 = load_digits()
    assert X3.min() == 0 and y3.min() == 0


def test_digits_through_split_and_standardizer():
    X, y = load_digits()
    Xtr, Xdv, Xte, ytr, ydv, yte = train_dev_test_split(X, y, stratify=True)
    assert (len(Xtr), len(Xdv), len(Xte)) == (1079, 359, 359)
    ideal = np.bincount(y) * 359 / 1797
    assert np.all(np.abs(np.bincount(yte) - ideal) < 1)
    assert np.all(np.abs(np.bincount(ydv) - ideal) < 1)
    s = Standardizer().fit(Xtr)
    Z = s.transform(Xte)
    assert Z.dtype == np.float32 and np.all(np.isfinite(Z))
    assert np.any(s.var_ == 0)  # digits has always-blank corner pixels
