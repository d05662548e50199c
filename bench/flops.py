"""FLOPs per image of an ONNX graph: multiply-accumulates of its Conv, ConvTranspose, Gemm and MatMul nodes, from
shapes found by ONNX shape inference with the batch dimension fixed to 1. FLOPs = 2 x MACs (one multiply, one add).

Element-wise ops, pooling, normalisation and softmax are left out: on this graph they are a small fraction of the
convolutions' work (they are counted by no standard tool the same way either).

    python bench/flops.py models/repository/mnist-multiple-flip/8/model.onnx
"""

from __future__ import annotations

import math
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import onnx
from onnx import shape_inference

COUNTED = ("Conv", "ConvTranspose", "Gemm", "MatMul")


@dataclass
class FlopCount:
    macs_by_op: dict[str, int] = field(default_factory=dict)
    nodes: list[tuple[str, str, int]] = field(default_factory=list)  # (op, node name, MACs)

    @property
    def macs(self) -> int:
        return sum(self.macs_by_op.values())

    @property
    def flops(self) -> int:
        return 2 * self.macs


def _with_batch(model: onnx.ModelProto, batch: int) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for vi in list(m.graph.input) + list(m.graph.output):
        dims = vi.type.tensor_type.shape.dim
        if dims and not dims[0].HasField("dim_value"):
            dims[0].Clear()
            dims[0].dim_value = batch
    return m


def _shapes(model: onnx.ModelProto) -> dict[str, list[int | None]]:
    inferred = shape_inference.infer_shapes(model, data_prop=True)
    shapes: dict[str, list[int | None]] = {}
    for vi in [*inferred.graph.input, *inferred.graph.output, *inferred.graph.value_info]:
        t = vi.type.tensor_type
        if t.HasField("shape"):
            shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
    for init in inferred.graph.initializer:
        shapes[init.name] = list(init.dims)
    return shapes


def _attr(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _known(shape: list[int | None] | None) -> bool:
    return shape is not None and all(isinstance(d, int) and d > 0 for d in shape)


def count_macs(model: onnx.ModelProto, batch: int = 1) -> FlopCount:
    """MACs of one forward pass at the given batch size. Raises ValueError if a counted node's shapes are unknown."""
    shapes = _shapes(_with_batch(model, batch))
    result = FlopCount()
    for node in model.graph.node:
        if node.op_type not in COUNTED:
            continue
        ins = [shapes.get(i) for i in node.input]
        out = shapes.get(node.output[0])
        if node.op_type in ("Conv", "ConvTranspose"):
            x, w = ins[0], ins[1]
            if not (_known(w) and _known(out) and _known(x)):
                raise ValueError(f"{node.op_type} {node.name!r}: shapes unknown (x={x}, w={w}, out={out})")
            group = _attr(node, "group", 1)
            if node.op_type == "Conv":  # each output element: C_in/group x kernel MACs
                macs = math.prod(out) * (w[1]) * math.prod(w[2:])
            else:  # ConvTranspose: each input element scatters into C_out/group x kernel outputs
                macs = math.prod(x) * w[1] * math.prod(w[2:])
            del group  # w[1] is already C_in/group (Conv) or C_out/group (ConvTranspose)
        elif node.op_type == "Gemm":
            a, b = ins[0], ins[1]
            if not (_known(a) and _known(b)):
                raise ValueError(f"Gemm {node.name!r}: shapes unknown (a={a}, b={b})")
            m_, k = (a[1], a[0]) if _attr(node, "transA", 0) else (a[0], a[1])
            n = b[0] if _attr(node, "transB", 0) else b[1]
            macs = m_ * n * k
        else:  # MatMul with numpy broadcasting: every output element is a length-K dot product
            a = ins[0]
            if not (_known(a) and _known(out)):
                raise ValueError(f"MatMul {node.name!r}: shapes unknown (a={a}, out={out})")
            macs = math.prod(out) * a[-1]
        result.macs_by_op[node.op_type] = result.macs_by_op.get(node.op_type, 0) + macs
        result.nodes.append((node.op_type, node.name, macs))
    return result


def count_graph(path: Path) -> FlopCount:
    """count_macs on a graph file. If shape inference cannot see a weight's shape (group convolutions whose filter
    bank is gathered from raw parameters at run time, as here), the graph is first constant-folded by ONNX
    Runtime's basic optimisations, which turn those gathers into plain initializers without changing the maths."""
    model = onnx.load(str(path))
    try:
        return count_macs(model)
    except ValueError:
        import onnxruntime as ort

        with tempfile.TemporaryDirectory() as tmp:
            opts = ort.SessionOptions()
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
            opts.optimized_model_filepath = str(Path(tmp) / "folded.onnx")
            ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
            return count_macs(onnx.load(opts.optimized_model_filepath))


def main() -> int:
    path = Path(sys.argv[1] if len(sys.argv) > 1 else "models/repository/mnist-multiple-flip/8/model.onnx")
    c = count_graph(path)
    for op, name, macs in c.nodes:
        print(f"{op:<14} {macs:>12,d} MACs  {name}")
    print(f"total {c.macs:,d} MACs = {c.flops / 1e6:.2f} MFLOP per image ({c.macs_by_op})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
