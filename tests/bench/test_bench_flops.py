"""bench/flops.py counts multiply-accumulates right on tiny graphs whose counts are known by hand."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from bench.flops import count_macs


def _model(nodes, inputs, outputs, inits):
    g = helper.make_graph(nodes, "t", inputs, outputs, [numpy_helper.from_array(v, k) for k, v in inits.items()])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_conv_gemm_matmul_counts():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 5])
    w = np.zeros((4, 3, 3, 3), np.float32)  # 3x3 conv, 3 -> 4 channels, stride 2, pad 1: 8x8 -> 4x4
    b = np.zeros((64, 5), np.float32)  # flatten 4*4*4 = 64 -> Gemm to 5
    m = np.zeros((5, 5), np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], strides=[2, 2], pads=[1, 1, 1, 1], name="conv"),
        helper.make_node("Flatten", ["c"], ["f"]),
        helper.make_node("Gemm", ["f", "b"], ["g"], name="gemm"),
        helper.make_node("MatMul", ["g", "m"], ["y"], name="matmul"),
        helper.make_node("Relu", ["y"], ["unused"]),  # not counted
    ]
    model = _model(nodes, [x], [y], {"w": w, "b": b, "m": m})
    c = count_macs(model)
    assert c.macs_by_op == {"Conv": 4 * 4 * 4 * 3 * 3 * 3, "Gemm": 64 * 5, "MatMul": 5 * 5}
    assert c.flops == 2 * (1728 + 320 + 25)
    assert count_macs(model, batch=3).macs == 3 * c.macs


def test_grouped_conv_and_transposed_gemm():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 6, 6])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [7, 8])
    w = np.zeros((8, 2, 1, 1), np.float32)  # group=2: each of 8 outputs sees 4/2 = 2 inputs
    a = np.zeros((3, 7), np.float32)  # transA: A is [K=3, M=7]
    bt = np.zeros((8, 3), np.float32)  # transB: B is [N=8, K=3]
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], group=2, name="gconv"),
        helper.make_node("Gemm", ["a", "bt"], ["y"], transA=1, transB=1, name="gemm"),
    ]
    c = count_macs(_model(nodes, [x], [y], {"w": w, "a": a, "bt": bt}))
    assert c.macs_by_op == {"Conv": 8 * 6 * 6 * 2, "Gemm": 7 * 8 * 3}
