"""Count the floating-point operations of one inference from an ONNX graph.

The edge uses the count at model load to account for a model's cost (the router compares
students with teachers, metadata reports it). Counting conventions:

* ``Gemm`` / ``MatMul``: ``2*M*K*N`` (a multiply and an add per term), plus ``M*N`` for a
  ``Gemm`` bias; ``Conv``: ``2 * Cin/groups * kh * kw * Cout * Hout * Wout`` (any spatial
  rank), plus one per output for a bias; ``ConvTranspose`` likewise from the input side.
* Element-wise ops cost their output element count (``Sigmoid``, ``Tanh``, ``Erf`` and the
  like a few per element); ``Softmax`` five per element (max, subtract, exp, sum, divide).
* Pooling costs the window size per output; reductions and global pools one per input.
* Data movement (``Reshape``, ``Transpose``, ``Concat``, ``Gather`` ...) costs 0, and so does
  any op this module does not know, or whose shapes cannot be inferred: the count is a
  lower bound then, never an error.

Shapes come from ONNX shape inference; symbolic or unknown dimensions (the dynamic batch)
count as 1, so the result is for batch size 1.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import onnx
from onnx import shape_inference

log = logging.getLogger(__name__)

Shape = list[int]

#: Element-wise ops and their cost per output element.
ELEMENTWISE_COST: Mapping[str, int] = {
    "Add": 1, "Sub": 1, "Mul": 1, "Div": 1, "Neg": 1, "Abs": 1, "Max": 1, "Min": 1,
    "Mean": 1, "Sum": 1, "Relu": 1, "LeakyRelu": 2, "PRelu": 2, "Clip": 2,
    "ThresholdedRelu": 1, "Sign": 1, "Floor": 1, "Ceil": 1, "Round": 1, "Reciprocal": 1,
    "Sqrt": 1, "Pow": 1, "Exp": 1, "Log": 1, "Where": 1, "Equal": 1, "Greater": 1,
    "Less": 1, "GreaterOrEqual": 1, "LessOrEqual": 1, "Not": 1, "And": 1, "Or": 1,
    "Xor": 1, "Mod": 1, "Sigmoid": 4, "HardSigmoid": 3, "HardSwish": 4, "Tanh": 4,
    "Elu": 4, "Selu": 4, "Celu": 4, "Softplus": 4, "Softsign": 3, "Erf": 4, "Gelu": 8,
    "Mish": 8, "Sin": 4, "Cos": 4,
}  # fmt: skip

#: Ops over the last axis with a per-element cost (max, subtract, exp, sum, divide).
NORMALISING_COST: Mapping[str, int] = {
    "Softmax": 5, "LogSoftmax": 5, "Hardmax": 2, "BatchNormalization": 2,
    "InstanceNormalization": 5, "LayerNormalization": 8, "GroupNormalization": 8,
    "LpNormalization": 3,
}  # fmt: skip

#: Reductions and global pools: one operation per input element.
REDUCE_OPS = frozenset(
    {
        "ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1",
        "ReduceL2", "ReduceSumSquare", "ReduceLogSumExp", "GlobalAveragePool",
        "GlobalMaxPool", "GlobalLpPool", "ArgMax", "ArgMin",
    }
)  # fmt: skip


def count_flops(model: onnx.ModelProto | Path | str) -> int:
    """FLOPs of one inference at batch size 1 (see the module notes for what is counted)."""
    proto = model if isinstance(model, onnx.ModelProto) else _load(Path(model))
    try:
        inferred = shape_inference.infer_shapes(proto, check_type=False, strict_mode=False)
    except Exception as exc:  # malformed or unusual models still get a (partial) count
        log.warning("shape inference failed (%s); counting with declared shapes only", exc)
        inferred = proto
    shapes = _known_shapes(inferred.graph)
    total = 0
    for node in inferred.graph.node:
        counter = _COUNTERS.get(node.op_type)
        try:
            total += counter(node, shapes) if counter else _generic(node, shapes)
        except (KeyError, IndexError, ValueError, ZeroDivisionError, TypeError):
            log.debug("could not count %s node %r; counting 0", node.op_type, node.name)
    return int(total)


def _load(path: Path) -> onnx.ModelProto:
    """Read the graph only: external weights are not needed to count operations."""
    return onnx.load(str(path), load_external_data=False)


def _known_shapes(graph: onnx.GraphProto) -> dict[str, Shape]:
    """Every tensor whose rank is known, with symbolic or unknown dimensions set to 1."""
    shapes: dict[str, Shape] = {}
    for info in (*graph.input, *graph.value_info, *graph.output):
        tensor_type = info.type.tensor_type
        if tensor_type.HasField("shape"):
            shapes[info.name] = [
                d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else 1
                for d in tensor_type.shape.dim
            ]
    for init in graph.initializer:
        shapes[init.name] = list(init.dims)
    return shapes


def _numel(shape: Sequence[int]) -> int:
    return math.prod(shape) if shape else 1


def _attr(node: onnx.NodeProto, name: str, default: int) -> int:
    for attr in node.attribute:
        if attr.name == name:
            return int(attr.i)
    return default


def _ints(node: onnx.NodeProto, name: str) -> list[int]:
    for attr in node.attribute:
        if attr.name == name:
            return list(attr.ints)
    return []


def _has_input(node: onnx.NodeProto, index: int) -> bool:
    return len(node.input) > index and node.input[index] != ""


def _gemm(node: onnx.NodeProto, shapes: Mapping[str, Shape]) -> int:
    a, b = shapes[node.input[0]], shapes[node.input[1]]
    m, k = (a[1], a[0]) if _attr(node, "transA", 0) else (a[0], a[1])
    n = b[0] if _attr(node, "transB", 0) else b[1]
    return 2 * m * k * n + (m * n if _has_input(node, 2) else 0)


def _matmul(node: onnx.NodeProto, shapes: Mapping[str, Shape]) -> int:
    a, out = shapes[node.input[0]], shapes[node.output[0]]
    k = a[-1]
    return 2 * _numel(out) * k


def _conv(node: onnx.NodeProto, shapes: Mapping[str, Shape]) -> int:
    weight, out = shapes[node.input[1]], shapes[node.output[0]]
    per_output = 2 * _numel(weight[1:])  # Cin/groups * kernel, multiply-add each
    return _numel(out) * per_output + (_numel(out) if _has_input(node, 2) else 0)


def _conv_transpose(node: onnx.NodeProto, shapes: Mapping[str, Shape]) -> int:
    x, weight = shapes[node.input[0]], shapes[node.input[1]]
    # weight is [Cin, Cout/groups, *kernel]: every input element scatters into that many.
    flops = 2 * _numel(x) * _numel(weight[1:])
    if _has_input(node, 2):
        flops += _numel(shapes[node.output[0]])
    return flops


def _pool(node: onnx.NodeProto, shapes: Mapping[str, Shape]) -> int:
    return _numel(shapes[node.output[0]]) * _numel(_ints(node, "kernel_shape"))


def _reduce(node: onnx.NodeProto, shapes: Mapping[str, Shape]) -> int:
    return _numel(shapes[node.input[0]])


def _generic(node: onnx.NodeProto, shapes: Mapping[str, Shape]) -> int:
    """Element-wise and normalising ops by output size; everything else 0."""
    cost = ELEMENTWISE_COST.get(node.op_type) or NORMALISING_COST.get(node.op_type)
    if cost is None or not node.output:
        return 0
    return cost * _numel(shapes[node.output[0]])


_COUNTERS: Mapping[str, Callable[[onnx.NodeProto, Mapping[str, Shape]], int]] = {
    "Gemm": _gemm,
    "MatMul": _matmul,
    "MatMulInteger": _matmul,
    "QLinearMatMul": _matmul,
    "Conv": _conv,
    "ConvInteger": _conv,
    "ConvTranspose": _conv_transpose,
    "MaxPool": _pool,
    "AveragePool": _pool,
    "LpPool": _pool,
    **{op: _reduce for op in REDUCE_OPS},
}
