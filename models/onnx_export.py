"""Export a trained :class:`~models.training.MLP` to an ONNX model the edge can serve.

The graph is ``Mul(1/16) -> Gemm -> Relu -> ... -> Gemm -> Softmax`` with one input,
``pixels`` (FP32 ``[batch, 64]``, raw 0..16 values) and one output, ``probabilities``
(FP32 ``[batch, 10]``). The batch dimension is dynamic and named ``batch``. The export is
deterministic: the same model gives the same bytes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from models.training import MLP

INPUT_NAME = "pixels"
OUTPUT_NAME = "probabilities"
BATCH_DIM = "batch"
#: Opset 17: Gemm, Relu, Mul and Softmax(axis=-1) as every current runtime knows them.
OPSET = 17
#: IR version 8 is what ONNX Runtime 1.16+ and TensorRT 10's parser all read.
IR_VERSION = 8


def to_onnx(
    model: MLP,
    *,
    graph_name: str = "mlp",
    doc: str = "",
    input_name: str = INPUT_NAME,
    output_name: str = OUTPUT_NAME,
) -> onnx.ModelProto:
    """Build the ONNX graph for ``model`` (float32 weights) and check it."""
    sizes = model.layer_sizes
    initializers = [
        numpy_helper.from_array(np.array([model.input_scale], dtype=np.float32), "input_scale")
    ]
    nodes = [helper.make_node("Mul", [input_name, "input_scale"], ["scaled"], name="scale")]
    current = "scaled"
    last = len(model.weights) - 1
    for i, (w, b) in enumerate(zip(model.weights, model.biases, strict=True)):
        initializers.append(numpy_helper.from_array(w.astype(np.float32), f"dense{i}.weight"))
        initializers.append(numpy_helper.from_array(b.astype(np.float32), f"dense{i}.bias"))
        out = f"dense{i}" if i < last else "logits"
        nodes.append(
            helper.make_node(
                "Gemm", [current, f"dense{i}.weight", f"dense{i}.bias"], [out], name=f"dense{i}"
            )
        )
        current = out
        if i < last:
            nodes.append(helper.make_node("Relu", [current], [f"relu{i}"], name=f"relu{i}"))
            current = f"relu{i}"
    nodes.append(helper.make_node("Softmax", [current], [output_name], name="softmax", axis=-1))

    graph = helper.make_graph(
        nodes,
        graph_name,
        inputs=[
            helper.make_tensor_value_info(input_name, TensorProto.FLOAT, [BATCH_DIM, sizes[0]])
        ],
        outputs=[
            helper.make_tensor_value_info(output_name, TensorProto.FLOAT, [BATCH_DIM, sizes[-1]])
        ],
        initializer=initializers,
        doc_string=doc,
    )
    proto = helper.make_model(
        graph,
        producer_name="tether-models",
        producer_version="1",
        opset_imports=[helper.make_opsetid("", OPSET)],
    )
    proto.ir_version = IR_VERSION
    onnx.checker.check_model(proto, full_check=True)
    return proto


def save_onnx(model: MLP, path: Path, *, graph_name: str = "mlp", doc: str = "") -> Path:
    """Export ``model`` to ``path`` (parents created) and return the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(to_onnx(model, graph_name=graph_name, doc=doc).SerializeToString())
    return path
