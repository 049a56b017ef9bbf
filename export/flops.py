"""Count a model's multiply-accumulates from its ONNX graph (Conv, ConvTranspose, MatMul, Gemm) with shape inference.

FLOPs are reported as 2 x MACs, the convention used for the compute bound (FLOPs / measured GFLOP/s).
Symbolic dimensions (a dynamic batch) count as 1, so the numbers are per frame. Element-wise ops,
resizes and pooling are ignored: they are memory-bound and small next to the convolutions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

COUNTED_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm")


@dataclass
class FlopCount:
    macs: int = 0
    by_op: dict[str, int] = field(default_factory=dict)  # op type -> MACs
    uncounted: list[str] = field(default_factory=list)  # counted-type nodes whose shapes were unknown

    @property
    def gflops(self) -> float:
        return 2.0 * self.macs / 1e9


def _dims(value_info: onnx.ValueInfoProto) -> list[int] | None:
    t = value_info.type.tensor_type
    if not t.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else 1 for d in t.shape.dim]  # symbolic -> 1


def _shapes(model: onnx.ModelProto) -> dict[str, list[int]]:
    inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    g = inferred.graph
    shapes: dict[str, list[int]] = {}
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        dims = _dims(vi)
        if dims is not None:
            shapes[vi.name] = dims
    for init in g.initializer:
        shapes[init.name] = list(init.dims)
    return shapes


def _attr(node: onnx.NodeProto, name: str, default: int) -> int:
    for a in node.attribute:
        if a.name == name:
            return int(a.i)
    return default


def _node_macs(node: onnx.NodeProto, shapes: dict[str, list[int]]) -> int | None:
    ins = [shapes.get(n) for n in node.input[:2]]
    out = shapes.get(node.output[0])
    if node.op_type == "Conv":
        w = ins[1]
        if w is None or out is None:
            return None
        # out: N x Cout x spatial; w: Cout x Cin/group x kernel -> each output element takes prod(w[1:]) MACs
        return int(np.prod(out, dtype=np.int64) * np.prod(w[1:], dtype=np.int64))
    if node.op_type == "ConvTranspose":
        x, w = ins
        if x is None or w is None:
            return None
        # every input element is scattered through Cout/group x kernel weights: w is Cin x Cout/group x kernel
        return int(np.prod(x, dtype=np.int64) * np.prod(w[1:], dtype=np.int64))
    if node.op_type == "MatMul":
        a = ins[0]
        if a is None or out is None or not a:
            return None
        return int(np.prod(out, dtype=np.int64) * a[-1])
    if node.op_type == "Gemm":
        a, b = ins
        if a is None or b is None:
            return None
        m, k = (a[1], a[0]) if _attr(node, "transA", 0) else (a[0], a[1])
        n = b[0] if _attr(node, "transB", 0) else b[1]
        return int(m * n * k)
    return 0


def count_macs(model: onnx.ModelProto | str | Path) -> FlopCount:
    """MACs for one forward pass at the graph's (static) input size."""
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model))
    shapes = _shapes(model)
    result = FlopCount()
    for node in model.graph.node:
        if node.op_type not in COUNTED_OPS:
            continue
        macs = _node_macs(node, shapes)
        if macs is None:
            result.uncounted.append(node.name or node.output[0])
            continue
        result.macs += macs
        result.by_op[node.op_type] = result.by_op.get(node.op_type, 0) + macs
    return result

