"""TensorRT-ready ONNX for Jetson: static shapes, FP16 weights/activations, float32 `probs` out.

The graph is converted to FP16 here (initializers, Constants, the input Cast) so the file is half the
size and TensorRT's --fp16 build does no further casting; a final Cast keeps the contract's float32
output. Int64 Concats of constants (Resize sizes) are folded so no INT64 shape math is left at runtime.
`tensorrt_problems` lists anything TensorRT would reject or handle badly.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from drywallqa.contract import INPUT_NAME, OUTPUT_NAME

# Ops the exported graphs use that TensorRT 8.6/10 supports natively (checked against the TensorRT ONNX
# operator matrix); anything else is reported so a model change cannot silently break the Jetson build.
TENSORRT_OPS = frozenset({
    "Add", "BatchNormalization", "Cast", "Clip", "Concat", "Conv", "ConvTranspose", "Div", "Flatten", "Gemm",
    "GlobalAveragePool", "HardSigmoid", "HardSwish", "Identity", "MatMul", "MaxPool", "AveragePool", "Mul",
    "Pad", "Relu", "Reshape", "Resize", "Sigmoid", "Slice", "Softmax", "Split", "Squeeze", "Sub", "Tanh",
    "Transpose", "Unsqueeze", "LeakyRelu", "PRelu", "ReduceMean",
})
# Inputs that must stay float32 by the ONNX spec (op type -> input indices).
_KEEP_FP32_INPUTS = {"Resize": (1, 2)}


def _keep_fp32_names(graph: onnx.GraphProto) -> set[str]:
    names = set()
    for node in graph.node:
        for idx in _KEEP_FP32_INPUTS.get(node.op_type, ()):
            if idx < len(node.input) and node.input[idx]:
                names.add(node.input[idx])
    return names


def fold_constant_concats(model: onnx.ModelProto) -> int:
    """Replace Concat nodes whose inputs are all initializers by one initializer; returns how many."""
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    folded = 0
    for node in list(graph.node):
        if node.op_type == "Concat" and node.input and all(n in inits for n in node.input):
            axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
            value = np.concatenate([numpy_helper.to_array(inits[n]) for n in node.input], axis=axis)
            graph.initializer.append(numpy_helper.from_array(value, node.output[0]))
            inits[node.output[0]] = graph.initializer[-1]
            graph.node.remove(node)
            folded += 1
    used = {n for node in graph.node for n in node.input}
    for init in list(graph.initializer):
        if init.name not in used:
            graph.initializer.remove(init)
    return folded


def convert_to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """Float32 graph -> float16 compute with uint8 input and float32 `probs` output."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    keep = _keep_fp32_names(graph)
    for i, init in enumerate(graph.initializer):
        if init.data_type == TensorProto.FLOAT and init.name not in keep:
            arr = numpy_helper.to_array(init).astype(np.float16)
            graph.initializer[i].CopyFrom(numpy_helper.from_array(arr, init.name))
    for node in graph.node:
        if node.op_type == "Cast":
            for attr in node.attribute:
                if attr.name == "to" and attr.i == TensorProto.FLOAT:
                    attr.i = TensorProto.FLOAT16
        elif node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value" and attr.t.data_type == TensorProto.FLOAT and node.output[0] not in keep:
                    attr.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(attr.t).astype(np.float16),
                                                            attr.t.name))
    producer = next(n for n in graph.node if OUTPUT_NAME in n.output)
    half_name = f"{OUTPUT_NAME}_fp16"
    producer.output[list(producer.output).index(OUTPUT_NAME)] = half_name
    graph.node.append(helper.make_node("Cast", [half_name], [OUTPUT_NAME], to=TensorProto.FLOAT,
                                       name="probs_to_float32"))
    del graph.value_info[:]
    return onnx.shape_inference.infer_shapes(model, strict_mode=True)


def tensorrt_problems(model: onnx.ModelProto | str | Path) -> list[str]:
    """What would stop (or slow) a TensorRT build of this ONNX; empty when it is Jetson-ready."""
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model))
    problems = []
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        problems.append(f"onnx.checker: {exc}")
    graph = model.graph
    for value in list(graph.input) + list(graph.output):
        dims = value.type.tensor_type.shape.dim
        if any(not d.HasField("dim_value") for d in dims):
            problems.append(f"{value.name}: dynamic shape {[d.dim_param or d.dim_value for d in dims]}")
    names = {v.name: v.type.tensor_type.elem_type for v in list(graph.input) + list(graph.output)}
    if names.get(INPUT_NAME) != TensorProto.UINT8:
        problems.append(f"input {INPUT_NAME!r} is not uint8")
    if names.get(OUTPUT_NAME) != TensorProto.FLOAT:
        problems.append(f"output {OUTPUT_NAME!r} is not float32")
    unsupported = sorted({n.op_type for n in graph.node if n.op_type not in TENSORRT_OPS or n.domain not in ("",
                                                                                                           "ai.onnx")})
    if unsupported:
        problems.append(f"ops outside the TensorRT allow-list: {unsupported}")
    keep = _keep_fp32_names(graph)
    fp32 = [i.name for i in graph.initializer if i.data_type == TensorProto.FLOAT and i.name not in keep]
    if fp32:
        problems.append(f"{len(fp32)} float32 initializers (expected float16), e.g. {fp32[:3]}")
    if any(n.op_type in ("Shape", "NonZero", "Loop", "If") for n in graph.node):
        problems.append("runtime shape computation (Shape/NonZero/Loop/If) left in the graph")
    int64_runtime = [n.name or n.op_type for n in graph.node if n.op_type == "Concat"
                     and all(i in {x.name for x in graph.initializer} for i in n.input)]
    if int64_runtime:
        problems.append(f"constant Concats not folded: {int64_runtime[:3]}")
    return problems


def make_jetson_onnx(fp32_onnx: str | Path, out_path: str | Path) -> Path:
    """FP16, static-shape, constant-folded copy of an exported FP32 ONNX (metadata kept)."""
    from drywallqa.contract import METADATA_KEY, ModelMetadata
    from drywallqa.export.onnx_export import set_metadata

    model = onnx.load(str(fp32_onnx))
    dims = model.graph.input[0].type.tensor_type.shape.dim
    if any(not d.HasField("dim_value") for d in dims):
        raise ValueError(f"{fp32_onnx}: the Jetson export needs a static-shape ONNX (export without --dynamic-batch)")
    fold_constant_concats(model)
    half = convert_to_fp16(model)
    props = {p.key: p.value for p in model.metadata_props}
    meta = ModelMetadata.from_json(props.get(METADATA_KEY), source=str(fp32_onnx))
    meta = meta.model_copy(update={"precision": "fp16"}, deep=True)
    meta.extra["target"] = "tensorrt"
    set_metadata(half, meta)
    problems = tensorrt_problems(half)
    if problems:
        raise ValueError(f"{fp32_onnx}: not TensorRT-ready after conversion: " + "; ".join(problems))
    out_path = Path(out_path)
    onnx.save(half, str(out_path))
    out_path.with_suffix(".json").write_text(meta.to_json(), encoding="utf-8")  # sidecar for the .engine
    return out_path
