#!/usr/bin/env bash
# Build a TensorRT engine on the Jetson from the FP16 ONNX written by `drywallqa export --target jetson`.
#
#   export/build_engine.sh models/exported/hrnet_w18_student_jetson_fp16.onnx [out.engine] [workspace_MiB]
#
# Flags (trtexec, TensorRT 8.6 / 10 on JetPack 6):
#   --fp16                 allow FP16 kernels (the ONNX already holds FP16 weights; output stays float32)
#   --memPoolSize=workspace:N  builder scratch memory in MiB (default 1024; lower on 4 GiB Orin Nano if it OOMs)
#   --builderOptimizationLevel=3  default tactic search; 5 is slower to build, sometimes a little faster to run
#   no shape flags: the ONNX has static shapes (1 x H x W x 3 uint8 in), so no optimisation profile is needed
# The engine is specific to this GPU + TensorRT version: build it on the device that runs it.
# The model metadata is copied next to the engine as <engine>.json (read by drywallqa.edge.backends).
set -euo pipefail
onnx="${1:?usage: build_engine.sh MODEL.onnx [OUT.engine] [WORKSPACE_MiB]}"
engine="${2:-${onnx%.onnx}.engine}"
workspace="${3:-1024}"
trtexec="$(command -v trtexec || echo /usr/src/tensorrt/bin/trtexec)"
[ -x "$trtexec" ] || { echo "trtexec not found (install TensorRT / JetPack)" >&2; exit 1; }
sidecar="${onnx%.onnx}.json"
[ -f "$sidecar" ] || { echo "metadata sidecar $sidecar missing: re-run drywallqa export --target jetson" >&2; exit 1; }
"$trtexec" --onnx="$onnx" --saveEngine="$engine" --fp16 \
  --memPoolSize=workspace:"$workspace" --builderOptimizationLevel=3 --skipInference
cp "$sidecar" "${engine%.*}.json"
echo "engine: $engine  metadata: ${engine%.*}.json"
