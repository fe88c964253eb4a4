"""Export a trained :class:`~fastdl.Sequential` to ONNX for inference (extra ``fastdl[onnx]``).

The exported graph is the model in inference mode:

* ``Dense`` -> ``Gemm`` (``X @ W + b``, ``W`` stored as (n_in, n_out));
* ``BatchNorm`` -> folded into the preceding ``Gemm``
  (``W' = W * s``, ``b' = (b - running_mean) * s + beta`` with
  ``s = gamma / sqrt(running_var + eps)``, computed in float64), or a
  ``BatchNormalization`` node when nothing precedes it to fold into (or
  ``fold_batchnorm=False``);
* ``ReLU`` / ``Tanh`` / ``Sigmoid`` -> ``Relu`` / ``Tanh`` / ``Sigmoid``;
  ``Identity`` and ``Dropout`` (the identity at inference) -> nothing.

Inputs: ``input``, float32, shape ``(batch, n_features)`` with a dynamic
batch dimension. With ``standardizer=`` (a fitted :class:`fastdl.data.Standardizer`
or any per-feature affine scaler, e.g. scikit-learn's ``StandardScaler``)
the graph starts with ``Mul`` + ``Add`` applying it, so ``input`` takes raw
features; otherwise ``input`` takes what ``predict`` takes. Outputs: ``logits`` (the last layer's raw outputs) and
``probabilities`` (``Softmax`` for softmax cross-entropy, ``(batch, 2)``
``[1 - p, p]`` for binary cross-entropy with one output, ``(batch, k)``
sigmoids for k labels: like ``predict_proba``); an MSE model has the single
output ``outputs``, a Poisson model the single output ``outputs = Exp(raw
output)`` (the rate ``predict`` returns). Weights are float32 whatever
dtype or precision the model trained in.

Usage::

    model.to_onnx("model.onnx")          # or fastdl.onnx.export(model, "model.onnx", opset=17)

    import onnxruntime as ort
    sess = ort.InferenceSession("model.onnx")
    logits, proba = sess.run(None, {"input": X.astype("float32")})
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np

DEFAULT_OPSET = 17
MIN_OPSET = 13  # Softmax over one axis (opset 13 semantics); Gemm with an optional C (>= 11)
INPUT_NAME = "input"

__all__ = ["export", "to_model_proto", "DEFAULT_OPSET", "MIN_OPSET", "INPUT_NAME"]


def _import_onnx() -> Any:
    try:
        import onnx
    except ImportError as exc:
        raise ImportError('ONNX export needs the onnx package: pip install "fastdl[onnx]" '
                          f"(installs onnx and onnxruntime); import failed: {exc}") from None
    return onnx


def _check_opset(onnx: Any, opset: Any) -> int:
    newest = onnx.defs.onnx_opset_version()
    if isinstance(opset, bool) or not isinstance(opset, (int, np.integer)) or not MIN_OPSET <= opset <= newest:
        raise ValueError(f"opset must be an integer in [{MIN_OPSET}, {newest}] (the installed onnx {onnx.__version__} "
                         f"knows up to {newest}), got {opset!r}")
    return int(opset)


def _ir_version(onnx: Any, opset: int) -> int:
    """The oldest IR version that carries ``opset``: runtimes older than the onnx package still load it."""
    for _release, ir, op, *_ in getattr(onnx.helper, "VERSION_TABLE", []):
        if op >= opset:
            return int(ir)
    return int(onnx.IR_VERSION)


def _f32(name: str, a: np.ndarray) -> np.ndarray:
    out = np.ascontiguousarray(a, dtype=np.float32)
    if not np.isfinite(out).all():
        raise ValueError(f"cannot export: {name} holds NaN/inf values (or overflows float32)")
    return out


def _affine_of(standardizer: Any, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(scale, shift) with ``standardizer.transform(X) == X * scale + shift`` per feature, checked."""
    if not hasattr(standardizer, "transform"):
        raise TypeError(f"standardizer must have a transform method (a fitted Standardizer), "
                        f"got {type(standardizer).__name__}")
    probe = np.array([np.zeros(n), np.ones(n), np.full(n, 3.0)])
    try:
        out = np.asarray(standardizer.transform(probe), dtype=np.float64)
    except ValueError as exc:
        raise ValueError(f"the standardizer does not fit this model's {n} inputs: {exc}") from None
    if out.shape != (3, n):
        raise ValueError(f"standardizer.transform maps {n} features to shape {out.shape[1:]}: it does not fit "
                         f"this model's {n} inputs")
    shift, scale = out[0], out[1] - out[0]
    if not np.allclose(out[2], 3.0 * scale + shift, rtol=1e-6, atol=1e-9 * (1 + np.abs(out).max())):
        raise ValueError("standardizer is not a per-feature affine map (x * scale + shift): it cannot be "
                         "expressed in the ONNX graph; apply it before calling the exported model")
    return scale, shift


def to_model_proto(model: Any, *, opset: int = DEFAULT_OPSET, fold_batchnorm: bool = True,
                   standardizer: Any = None, doc_string: str | None = None) -> Any:
    """Build the ONNX ``ModelProto`` of ``model``'s inference graph (see the module docs).

    Raises ``ValueError`` (or ``TypeError`` for a foreign layer type) naming
    what cannot be exported, ``ImportError`` when onnx is not installed.
    """
    onnx = _import_onnx()
    from onnx import TensorProto, helper, numpy_helper

    from .layers import Activation, BatchNorm, Dense, Dropout, Identity, ReLU, Sigmoid, Tanh
    from .model import Sequential

    if not isinstance(model, Sequential):
        raise TypeError(f"to_onnx exports a fastdl Sequential model, got {type(model).__name__}")
    opset = _check_opset(onnx, opset)
    nodes: list = []
    inits: list = []
    names: set[str] = set()

    def const(name: str, value: np.ndarray) -> str:
        assert name not in names
        names.add(name)
        inits.append(numpy_helper.from_array(value, name))
        return name

    x = INPUT_NAME
    if standardizer is not None:
        scale, shift = _affine_of(standardizer, int(model.n_features))

    def node(op: str, inputs: list[str], tag: str, **attrs: Any) -> str:
        out = f"{tag}_out"
        nodes.append(helper.make_node(op, inputs, [out], name=tag, **attrs))
        return out

    if standardizer is not None:
        # (x - mean) / std as x * (1 / std) + (-mean / std): the scaler's own affine map
        x = node("Mul", [x, const("standardizer.scale", _f32("standardizer scale", scale[None, :]))],
                 "standardize_mul")
        x = node("Add", [x, const("standardizer.shift", _f32("standardizer shift", shift[None, :]))],
                 "standardize_add")
    layers = list(model.layers)
    acts = {ReLU: "Relu", Tanh: "Tanh", Sigmoid: "Sigmoid"}
    i = 0
    while i < len(layers):
        layer = layers[i]
        tag = f"layers_{i}"
        if isinstance(layer, Dense):
            W = np.asarray(layer.W, dtype=np.float64)
            b = np.asarray(layer.b, dtype=np.float64) if layer.use_bias else None
            desc = f"layers[{i}] Dense"
            nxt = layers[i + 1] if i + 1 < len(layers) else None
            if fold_batchnorm and isinstance(nxt, BatchNorm):
                s = np.asarray(nxt.gamma, np.float64) / np.sqrt(np.asarray(nxt.running_var, np.float64) + nxt.eps)
                W = W * s
                b = ((b if b is not None else 0.0) - np.asarray(nxt.running_mean, np.float64)) * s \
                    + np.asarray(nxt.beta, np.float64)
                desc += f" + layers[{i + 1}] BatchNorm (folded)"
                i += 1
            inputs = [x, const(f"{tag}.W", _f32(f"{desc} weights", W))]
            if b is not None:
                inputs.append(const(f"{tag}.b", _f32(f"{desc} bias", b)))
            x = node("Gemm", inputs, tag, doc_string=desc)
        elif isinstance(layer, BatchNorm):
            x = node("BatchNormalization",
                     [x, const(f"{tag}.gamma", _f32(f"layers[{i}].gamma", layer.gamma)),
                      const(f"{tag}.beta", _f32(f"layers[{i}].beta", layer.beta)),
                      const(f"{tag}.running_mean", _f32(f"layers[{i}].running_mean", layer.running_mean)),
                      const(f"{tag}.running_var", _f32(f"layers[{i}].running_var", layer.running_var))],
                     tag, epsilon=float(layer.eps), doc_string=f"layers[{i}] BatchNorm (inference statistics)")
        elif isinstance(layer, Dropout) or type(layer) is Identity:
            pass  # the identity at inference time
        elif type(layer) in acts:
            x = node(acts[type(layer)], [x], tag)
        elif isinstance(layer, Activation):
            raise TypeError(f"cannot export layers[{i}] {layer!r}: no ONNX operator for activation "
                            f"{getattr(layer, 'name', type(layer).__name__)!r} "
                            f"(supported: ReLU, Tanh, Sigmoid, Identity)")
        else:
            raise TypeError(f"cannot export layers[{i}] {layer!r}: ONNX export knows Dense, BatchNorm, ReLU, Tanh, "
                            f"Sigmoid, Identity and Dropout")
        i += 1

    n_out = int(model.n_outputs)
    loss = model.loss.name
    if x == INPUT_NAME:  # a model of identity layers only still needs a node producing the outputs
        x = node("Identity", [x], "passthrough")
    f32 = TensorProto.FLOAT
    if loss == "mse":
        nodes.append(helper.make_node("Identity", [x], ["outputs"], name="outputs"))
        outputs = [helper.make_tensor_value_info("outputs", f32, ["batch", n_out])]
    elif loss == "poisson":  # log link: the raw output is the log rate, predict is exp
        nodes.append(helper.make_node("Exp", [x], ["outputs"], name="rate"))
        outputs = [helper.make_tensor_value_info("outputs", f32, ["batch", n_out])]
    else:
        nodes.append(helper.make_node("Identity", [x], ["logits"], name="logits"))
        if loss == "softmax_cross_entropy":
            nodes.append(helper.make_node("Softmax", ["logits"], ["probabilities"], name="softmax", axis=1))
            n_proba = n_out
        elif loss == "binary_cross_entropy" and n_out > 1:  # multilabel: one probability per label
            nodes.append(helper.make_node("Sigmoid", ["logits"], ["probabilities"], name="sigmoid"))
            n_proba = n_out
        elif loss == "binary_cross_entropy":
            nodes.append(helper.make_node("Sigmoid", ["logits"], ["p1"], name="sigmoid"))
            one = const("one", np.ones((1, 1), np.float32))
            nodes.append(helper.make_node("Sub", [one, "p1"], ["p0"], name="one_minus_p"))
            nodes.append(helper.make_node("Concat", ["p0", "p1"], ["probabilities"], name="proba", axis=1))
            n_proba = 2
        else:
            raise ValueError(f"cannot export a model trained on loss {loss!r}: no known output function")
        outputs = [helper.make_tensor_value_info("logits", f32, ["batch", n_out]),
                   helper.make_tensor_value_info("probabilities", f32, ["batch", n_proba])]

    graph = helper.make_graph(
        nodes, "fastdl_sequential",
        [helper.make_tensor_value_info(INPUT_NAME, f32, ["batch", int(model.n_features)])],
        outputs, initializer=inits)
    from . import __version__

    proto = helper.make_model(graph, producer_name="fastdl", producer_version=__version__,
                              opset_imports=[helper.make_opsetid("", opset)],
                              doc_string=doc_string or f"fastdl Sequential, loss={loss}, exported for inference")
    proto.ir_version = _ir_version(onnx, opset)
    meta = {"loss": loss, "trained_dtype": model.dtype.name,
            "input": "raw features (standardised in the graph)" if standardizer is not None
            else "standardised features (as passed to predict)",
            "trained_precision": str(getattr(model, "precision", "fp32"))}
    for k, v in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, v
    onnx.checker.check_model(proto, full_check=True)
    return proto


def export(model: Any, path: "str | os.PathLike", *, opset: int = DEFAULT_OPSET, fold_batchnorm: bool = True,
           standardizer: Any = None) -> None:
    """Write ``model``'s inference graph to ``path`` as ONNX, atomically (see the module docs).

    ``opset``: the ONNX operator set version (``MIN_OPSET`` to what the
    installed onnx knows; default 17, read by onnxruntime >= 1.13).
    ``standardizer``: fold the input standardisation into the graph, so
    the exported model takes raw features.
    """
    proto = to_model_proto(model, opset=opset, fold_batchnorm=fold_batchnorm, standardizer=standardizer)
    data = proto.SerializeToString()
    from ._atomic import atomic_write

    atomic_write(path, lambda f: f.write(data))
