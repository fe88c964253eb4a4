"""ONNX export (fastdl.onnx): the exported graph, run by onnxruntime, equals the model's inference."""
import sys

import numpy as np
import pytest

import fastdl as fd
import fastdl.onnx  # noqa: F401  (fd.onnx below; the module imports onnx lazily)

onnx = pytest.importorskip("onnx", reason='ONNX export tests need the extra: pip install "fastdl[onnx]"')
ort = pytest.importorskip("onnxruntime", reason='ONNX export tests need the extra: pip install "fastdl[onnx]"')


def _session(path):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _run(path, X):
    sess = _session(path)
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(None, {"input": np.asarray(X, np.float32)})))


def _trained(layers, loss, X, y, dtype="float32", epochs=3, seed=0):
    model = fd.Sequential(layers, loss=loss, dtype=dtype, seed=seed, l2=1e-3)
    # a few epochs: BatchNorm running statistics and weights away from their initial values
    model.fit(X, y, optimizer=fd.Adam(lr=1e-2), epochs=epochs, batch_size=16, verbose=0)
    return model


def _data(kind, m=97, n=11, k=4, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(m, n)) * rng.uniform(0.5, 3, size=n) + rng.normal(size=n)
    if kind == "softmax_cross_entropy":
        y = rng.integers(0, k, size=m)
    elif kind == "binary_cross_entropy":
        y = (X[:, 0] + rng.normal(size=m) > 0).astype(int)
    else:
        y = X[:, :k] @ rng.normal(size=(k, k)) * 3 + 5
    return X, y


def _all_layer_types(n, k):
    """Every exportable layer: Dense with and without bias, BatchNorm after a Dense and first, every
    activation, Dropout."""
    return [fd.BatchNorm(n), fd.Dense(n, 13, use_bias=False), fd.BatchNorm(13), fd.ReLU(), fd.Dropout(rate=0.2),
            fd.Dense(13, 9), fd.Tanh(), fd.Dense(9, 7, init="xavier"), fd.BatchNorm(7), fd.Sigmoid(),
            fd.Dropout(keep_prob=1.0), fd.Dense(7, 6), fd.Identity(), fd.Dense(6, k)]


LOSS_OUT = {"softmax_cross_entropy": 4, "binary_cross_entropy": 1, "mse": 4}


@pytest.mark.parametrize("fold", [True, False])
@pytest.mark.parametrize("loss", list(LOSS_OUT))
def test_every_layer_type_matches_predict(tmp_path, loss, fold):
    X, y = _data(loss)
    model = _trained(_all_layer_types(X.shape[1], LOSS_OUT[loss]), loss, X, y)
    path = tmp_path / "m.onnx"
    model.to_onnx(path, fold_batchnorm=fold)
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    Xt = np.random.default_rng(5).normal(size=(31, X.shape[1])) * 2  # fresh random inputs
    for data in (X, Xt, Xt[:1]):  # batch 1 too: the batch dimension is dynamic
        out = _run(path, data)
        if loss == "mse":
            pred = model.predict(data)
            assert set(out) == {"outputs"}
            np.testing.assert_allclose(out["outputs"], pred, rtol=1e-5, atol=1e-5 * np.abs(pred).max())
        else:
            proba = model.predict_proba(data)
            assert out["probabilities"].shape == proba.shape
            assert np.abs(out["probabilities"] - proba).max() <= 1e-5
            logits = model.decision_function(data)
            np.testing.assert_allclose(out["logits"], logits, rtol=1e-4, atol=1e-4)
            np.testing.assert_array_equal(out["probabilities"].argmax(1), model.predict(data))


def test_readme_model_on_the_digits(tmp_path):
    X, y = fd.datasets.load_digits()
    Xtr, Xdv, Xte, ytr, ydv, yte = fd.data.train_dev_test_split(X, y, seed=0, stratify=True)
    scaler = fd.data.Standardizer().fit(Xtr)
    Xtr, Xte = scaler.transform(Xtr), scaler.transform(Xte)
    model = fd.Sequential([fd.Dense(64, 128, use_bias=False), fd.BatchNorm(128), fd.ReLU(),
                           fd.Dropout(keep_prob=0.9), fd.Dense(128, 10)], l2=1e-3, seed=0)
    model.fit(Xtr, ytr, optimizer=fd.Adam(lr=3e-3), epochs=5, batch_size=32, verbose=0)
    path = tmp_path / "digits.onnx"
    model.to_onnx(path)
    out = _run(path, Xte)
    assert np.abs(out["probabilities"] - model.predict_proba(Xte)).max() <= 1e-5
    acc = np.mean(out["probabilities"].argmax(1) == yte)
    assert acc == pytest.approx(model.evaluate(Xte, yte)["accuracy"])


def test_graph_structure(tmp_path):
    X, y = _data("softmax_cross_entropy", n=5)
    model = _trained([fd.Dense(5, 8, use_bias=False), fd.BatchNorm(8), fd.ReLU(), fd.Dropout(rate=0.5),
                      fd.Dense(8, 4)], "softmax_cross_entropy", X, y)
    path = tmp_path / "m.onnx"
    model.to_onnx(path, opset=13)
    proto = onnx.load(str(path))
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("Gemm") == 2 and "Relu" in ops and "Softmax" in ops
    assert "BatchNormalization" not in ops and "Dropout" not in ops  # folded / removed
    assert proto.opset_import[0].version == 13
    inp = proto.graph.input[0]
    assert inp.name == "input"
    dims = inp.type.tensor_type.shape.dim
    assert dims[0].dim_param == "batch" and dims[1].dim_value == 5
    assert [o.name for o in proto.graph.output] == ["logits", "probabilities"]
    unfolded = onnx.load_from_string(fd.onnx.to_model_proto(model, fold_batchnorm=False).SerializeToString())
    assert "BatchNormalization" in [n.op_type for n in unfolded.graph.node]


def test_float64_model_exports_float32(tmp_path):
    X, y = _data("softmax_cross_entropy")
    model = _trained([fd.Dense(X.shape[1], 16, use_bias=False), fd.BatchNorm(16), fd.Tanh(), fd.Dense(16, 4)],
                     "softmax_cross_entropy", X, y, dtype="float64")
    path = tmp_path / "m64.onnx"
    model.to_onnx(path)
    proto = onnx.load(str(path))
    assert {t.data_type for t in proto.graph.initializer} == {onnx.TensorProto.FLOAT}
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    out = _run(path, X)
    assert np.abs(out["probabilities"] - model.predict_proba(X)).max() <= 1e-5


def test_bf16_model_exports_its_float32_weights(tmp_path):
    try:
        model = fd.Sequential([fd.Dense(11, 16, use_bias=False), fd.BatchNorm(16), fd.ReLU(), fd.Dense(16, 4)],
                              precision="bf16", seed=0, backend="reference")
    except TypeError as exc:
        pytest.skip(f"Sequential has no precision= yet: {exc}")
    X, y = _data("softmax_cross_entropy")
    try:
        model.fit(X, y, optimizer=fd.Adam(lr=1e-2), epochs=3, batch_size=16, verbose=0)
    except NotImplementedError as exc:
        pytest.skip(f"bf16 training is not available here yet: {exc}")
    assert model.precision == "bf16"
    path = tmp_path / "bf16.onnx"
    model.to_onnx(path)
    # the same weights evaluated in float32 arithmetic
    fp32 = fd.Sequential.from_config({**model.get_config(), "precision": "fp32"}, backend="reference")
    fp32.params[...] = model.params
    fp32.state[...] = model.state
    out = _run(path, X)
    assert np.abs(out["probabilities"] - fp32.predict_proba(X)).max() <= 1e-5
    # and within bf16 rounding (8 mantissa bits) of the bf16 model's own predictions
    assert np.abs(out["probabilities"] - model.predict_proba(X)).max() <= 0.05
    assert fd.onnx.to_model_proto(model).metadata_props


def test_unexportable_layer_is_named(tmp_path):
    class Scale(fd.layers.Layer):
        """A user's own layer (Sequential may refuse to train it; export must refuse it by name)."""

    model = fd.Sequential([fd.Dense(3, 4), fd.ReLU(), fd.Dense(4, 2)])
    model.layers[1] = Scale()
    with pytest.raises(TypeError, match=r"layers\[1\].*Scale"):
        model.to_onnx(tmp_path / "x.onnx")
    assert not (tmp_path / "x.onnx").exists()

    class LeakyReLU(fd.ReLU):
        """A user's activation subclass: exporting it as Relu would silently change the function."""

    model.layers[1] = LeakyReLU()
    with pytest.raises(TypeError, match=r"layers\[1\].*no ONNX operator for activation"):
        model.to_onnx(tmp_path / "x.onnx")


@pytest.mark.parametrize("opset", [12, 10**6, 17.0, "17"])
def test_bad_opset(tmp_path, opset):
    model = fd.Sequential([fd.Dense(3, 2)])
    with pytest.raises(ValueError, match="opset must be an integer"):
        model.to_onnx(tmp_path / "x.onnx", opset=opset)


def test_not_a_model():
    with pytest.raises(TypeError, match="Sequential"):
        fd.onnx.export(object(), "x.onnx")


def test_write_is_atomic(tmp_path):
    path = tmp_path / "m.onnx"
    path.write_bytes(b"previous")
    model = fd.Sequential([fd.Dense(3, 2)])
    model.params[0] = np.nan  # cannot be exported: the previous file must survive untouched
    with pytest.raises(ValueError, match="NaN"):
        model.to_onnx(path)
    assert path.read_bytes() == b"previous"
    model.params[0] = 0.5
    model.to_onnx(path)
    assert onnx.load(str(path)).graph.node
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]  # no temporary file left behind


def test_missing_extra_names_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx -> ImportError
    with pytest.raises(ImportError, match=r'pip install "fastdl\[onnx\]"'):
        fd.Sequential([fd.Dense(3, 2)]).to_onnx("never_written.onnx")


def test_standardizer_in_the_graph(tmp_path):
    X, y = fd.datasets.load_digits()
    scaler = fd.data.Standardizer().fit(X[:1200])
    model = fd.Sequential([fd.Dense(64, 32, use_bias=False), fd.BatchNorm(32), fd.ReLU(), fd.Dense(32, 10)])
    model.fit(scaler.transform(X[:1200]), y[:1200], epochs=2, verbose=0)
    path = tmp_path / "raw.onnx"
    model.to_onnx(path, standardizer=scaler)
    raw = X[1200:].astype(np.float32)
    out = _run(path, raw)                                   # raw pixels in
    assert np.abs(out["probabilities"] - model.predict_proba(scaler.transform(raw))).max() <= 1e-5
    assert [n.op_type for n in onnx.load(str(path)).graph.node][:2] == ["Mul", "Add"]


def test_standardizer_must_fit_the_model():
    model = fd.Sequential([fd.Dense(3, 2)])
    with pytest.raises(ValueError, match="3 inputs"):
        fd.onnx.to_model_proto(model, standardizer=fd.data.Standardizer().fit(np.random.rand(5, 4)))

    class Squares:
        def transform(self, X):
            return np.asarray(X) ** 2

    with pytest.raises(ValueError, match="not a per-feature affine"):
        fd.onnx.to_model_proto(model, standardizer=Squares())
    with pytest.raises(TypeError, match="transform"):
        fd.onnx.to_model_proto(model, standardizer=object())


def test_multilabel_binary_cross_entropy(tmp_path):
    rng = np.random.default_rng(3)
    X = rng.normal(size=(64, 6))
    Y = (X[:, :3] + 0.3 * rng.normal(size=(64, 3)) > 0).astype(np.float64)
    try:
        model = _trained([fd.Dense(6, 12), fd.Tanh(), fd.Dense(12, 3)], "binary_cross_entropy", X, Y)
    except (ValueError, NotImplementedError) as exc:
        pytest.skip(f"multilabel binary cross-entropy not available: {exc}")
    path = tmp_path / "multilabel.onnx"
    model.to_onnx(path)
    out = _run(path, X)
    proba = model.predict_proba(X)
    assert out["probabilities"].shape == proba.shape == (64, 3)
    assert np.abs(out["probabilities"] - proba).max() <= 1e-5


@pytest.mark.parametrize("opset", [13, 17, "newest"])
def test_opsets(tmp_path, opset):
    opset = onnx.defs.onnx_opset_version() if opset == "newest" else opset
    X, y = _data("softmax_cross_entropy")
    model = _trained(_all_layer_types(X.shape[1], 4), "softmax_cross_entropy", X, y)
    path = tmp_path / f"op{opset}.onnx"
    try:
        model.to_onnx(path, opset=opset)
        out = _run(path, X)
    except Exception as exc:  # onnxruntime may not know the newest opset of the installed onnx yet
        if opset > 17 and "opset" in str(exc).lower():
            pytest.skip(f"onnxruntime {ort.__version__} does not run opset {opset}: {exc}")
        raise
    assert np.abs(out["probabilities"] - model.predict_proba(X)).max() <= 1e-5
