"""FLOP counting from ONNX graphs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from serving.runtimes.flops import count_flops

REPOSITORY = Path(__file__).resolve().parents[2] / "models" / "repository"


def _model(
    nodes: list[onnx.NodeProto],
    inputs: list[onnx.ValueInfoProto],
    outputs: list[onnx.ValueInfoProto],
    initializers: dict[str, np.ndarray] | None = None,
    opset: int = 17,
) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "g",
        inputs,
        outputs,
        initializer=[numpy_helper.from_array(v, k) for k, v in (initializers or {}).items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _fp32(name: str, shape: list[int | str | None] | None) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def test_committed_student_counts_every_op() -> None:
    # Mul 64 + Gemm 2*64*16+16 + Relu 16 + Gemm 2*16*10+10 + Softmax 5*10
    assert count_flops(REPOSITORY / "digits-student/1/model.onnx") == 2524


def test_mlp_with_dynamic_batch_counts_batch_one() -> None:
    w = np.zeros((64, 32), np.float32)
    model = _model(
        [
            helper.make_node("Gemm", ["x", "w"], ["h"]),  # no bias
            helper.make_node("Sigmoid", ["h"], ["y"]),
        ],
        [_fp32("x", ["batch", 64])],
        [_fp32("y", ["batch", 32])],
        {"w": w},
    )
    assert count_flops(model) == 2 * 64 * 32 + 4 * 32


def test_gemm_transposes() -> None:
    model = _model(
        [helper.make_node("Gemm", ["x", "w", "b"], ["y"], transA=1, transB=1)],
        [_fp32("x", [8, 3])],  # transposed: M=3, K=8
        [_fp32("y", [3, 5])],
        {"w": np.zeros((5, 8), np.float32), "b": np.zeros(5, np.float32)},
    )
    assert count_flops(model) == 2 * 3 * 8 * 5 + 3 * 5


def test_batched_matmul() -> None:
    model = _model(
        [helper.make_node("MatMul", ["a", "b"], ["y"])],
        [_fp32("a", [None, 4, 6, 7]), _fp32("b", [None, 4, 7, 5])],
        [_fp32("y", None)],
    )
    assert count_flops(model) == 2 * 4 * 6 * 5 * 7


def test_conv_pool_and_global_pool() -> None:
    model = _model(
        [
            helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
            helper.make_node("MaxPool", ["c"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
            helper.make_node("GlobalAveragePool", ["p"], ["y"]),
        ],
        [_fp32("x", ["n", 3, 8, 8])],
        [_fp32("y", ["n", 4, 1, 1])],
        {"w": np.zeros((4, 3, 3, 3), np.float32), "b": np.zeros(4, np.float32)},
    )
    conv = 2 * 3 * 3 * 3 * 4 * 8 * 8 + 4 * 8 * 8
    pool = 4 * 4 * 4 * 4
    gap = 4 * 4 * 4
    assert count_flops(model) == conv + pool + gap


def test_grouped_conv() -> None:
    model = _model(
        [helper.make_node("Conv", ["x", "w"], ["y"], group=4)],
        [_fp32("x", [1, 8, 5, 5])],
        [_fp32("y", None)],
        {"w": np.zeros((8, 2, 3, 3), np.float32)},
    )
    assert count_flops(model) == 2 * (8 // 4) * 3 * 3 * 8 * 3 * 3


def test_unknown_and_data_movement_ops_count_zero() -> None:
    model = _model(
        [
            helper.make_node("Reshape", ["x", "shape"], ["r"]),
            helper.make_node("FancyOp", ["r"], ["f"], domain="com.example"),
            helper.make_node("Relu", ["r"], ["y"]),
        ],
        [_fp32("x", [2, 3, 4])],
        [_fp32("y", None), _fp32("f", None)],
        {"shape": np.array([6, 4], np.int64)},
    )
    model.opset_import.append(helper.make_opsetid("com.example", 1))
    assert count_flops(model) == 24  # the Relu only


def test_unknown_shapes_count_zero_instead_of_failing() -> None:
    model = _model(
        [helper.make_node("FancyOp", ["x"], ["h"], domain="com.example"),
         helper.make_node("MatMul", ["h", "w"], ["y"])],
        [_fp32("x", [1, 8])],
        [_fp32("y", None)],
        {"w": np.zeros((8, 2), np.float32)},
    )  # fmt: skip
    model.opset_import.append(helper.make_opsetid("com.example", 1))
    assert count_flops(model) == 0


def test_accepts_a_path_or_a_str(tmp_path: Path) -> None:
    source = REPOSITORY / "digits-teacher/1/model.onnx"
    expected = count_flops(onnx.load(str(source)))
    assert count_flops(source) == count_flops(str(source)) == expected
    assert expected == 192_124


def test_invalid_model_does_not_raise() -> None:
    model = _model(
        [helper.make_node("Add", ["x", "y"], ["z"])],
        [_fp32("x", [2, 3]), _fp32("y", [4, 5])],  # shapes that cannot broadcast
        [_fp32("z", None)],
    )
    assert count_flops(model) >= 0


@pytest.mark.parametrize("name", ["digits-teacher", "digits-student"])
def test_matches_the_recorded_config(name: str) -> None:
    import json

    config = json.loads((REPOSITORY / name / "config.json").read_text())
    assert count_flops(REPOSITORY / name / "1/model.onnx") == config["parameters"]["flops"]
