"""Small ONNX models built on the fly for tests and benchmarks (the MLServer SumModel idea)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

_ONNX_TYPES = {"FP32": TensorProto.FLOAT, "FP64": TensorProto.DOUBLE, "INT64": TensorProto.INT64}


def dense_model(
    in_features: int = 4, out_features: int = 3, *, seed: int = 0, softmax: bool = True
) -> onnx.ModelProto:
    """``y = softmax(x @ W + b)`` with input ``x`` [N, in] FP32 and output ``y`` [N, out]."""
    rng = np.random.default_rng(seed)
    weight = rng.normal(size=(in_features, out_features)).astype(np.float32)
    bias = rng.normal(size=(out_features,)).astype(np.float32)
    nodes = [helper.make_node("Gemm", ["x", "W", "b"], ["logits" if softmax else "y"])]
    if softmax:
        nodes.append(helper.make_node("Softmax", ["logits"], ["y"], axis=1))
    graph = helper.make_graph(
        nodes,
        "dense",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", in_features])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", out_features])],
        initializer=[numpy_helper.from_array(weight, "W"), numpy_helper.from_array(bias, "b")],
    )
    return _finish(graph)


def image_model(channels: int = 3, size: int = 224, classes: int = 10) -> onnx.ModelProto:
    """A cheap image classifier: global average pool then a dense layer, input [N,C,H,W]."""
    rng = np.random.default_rng(1)
    weight = rng.normal(size=(channels, classes)).astype(np.float32)
    nodes = [
        helper.make_node("GlobalAveragePool", ["image"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"]),
        helper.make_node("MatMul", ["flat", "W"], ["scores"]),
    ]
    graph = helper.make_graph(
        nodes,
        "image",
        [
            helper.make_tensor_value_info(
                "image", TensorProto.FLOAT, ["batch", channels, size, size]
            )
        ],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["batch", classes])],
        initializer=[numpy_helper.from_array(weight, "W")],
    )
    return _finish(graph)


def _finish(graph: onnx.GraphProto) -> onnx.ModelProto:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def write_model(
    repository: Path,
    name: str,
    model: onnx.ModelProto,
    *,
    version: int = 1,
    config: dict[str, Any] | None = None,
) -> Path:
    """Write ``<repository>/<name>/<version>/model.onnx`` (+ config.json when given)."""
    version_dir = repository / name / str(version)
    version_dir.mkdir(parents=True, exist_ok=True)
    path = version_dir / "model.onnx"
    onnx.save(model, path)
    if config is not None:
        (repository / name / "config.json").write_text(json.dumps({"name": name, **config}))
    return path


def headed_classifier(
    head_seed: int, *, width: int = 256, inputs: int = 4, classes: int = 3
) -> onnx.ModelProto:
    """``[N, inputs] -> [N, classes]``: a fixed two-layer backbone (``width`` wide, the
    same for every seed) and a classification head drawn from ``head_seed``. Versions that
    differ only in ``head_seed`` are what a retrained head ships as."""
    backbone = np.random.default_rng(0)
    w1 = backbone.standard_normal((inputs, width)).astype(np.float32)
    w2 = backbone.standard_normal((width, width)).astype(np.float32) / width
    head = np.random.default_rng(head_seed).standard_normal((width, classes)).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h1"]),
        helper.make_node("Relu", ["h1"], ["a1"]),
        helper.make_node("MatMul", ["a1", "w2"], ["h2"]),
        helper.make_node("Relu", ["h2"], ["a2"]),
        helper.make_node("MatMul", ["a2", "head"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "classifier",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", inputs])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", classes])],
        initializer=[
            numpy_helper.from_array(w1, "w1"),
            numpy_helper.from_array(w2, "w2"),
            numpy_helper.from_array(head, "head"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model
