#!/usr/bin/env bash
# Build a TensorRT engine on the Jetson from the FP16 ONNX written by `drywallqa export --target jetson`.
#
#   export/build_engine.sh models/exported/hrnet_w18_student_jetson_fp16.onnx [OUT.engine] [WORKSPACE_MiB]
#
# OUT.engine defaults to the name the edge runtime looks for: models/exported/hrnet_w18_student.engine for
# `model.path: hrnet` (the ONNX's name without `_jetson_fp16`). Only that Jetson export is taken, not the FP32
# <model>.onnx beside it, whose engine's metadata would say fp32 and whose shapes may be dynamic.
#
# Flags (trtexec, TensorRT 8.6 / 10 on JetPack 6):
#   --fp16                 allow FP16 kernels (the ONNX already holds FP16 weights; output stays float32)
#   --memPoolSize=workspace:N  builder scratch memory in MiB (default 1024; lower on 4 GiB Orin Nano if it OOMs)
#   --builderOptimizationLevel=3  default tactic search; 5 is slower to build, sometimes a little faster to run
#   no shape flags: the ONNX has static shapes (1 x H x W x 3 uint8 in), so no optimisation profile is needed
# The engine is specific to this GPU + TensorRT version: build it on the device that runs it.
#
# An engine file holds no metadata, so the model's contract (classes, prompts, thresholds) is written next to
# it as <OUT>.json, taken from the ONNX, with the engine's sha256 in `extra.engine_sha256`: the edge runtime
# refuses a metadata file that belongs to another engine.
set -euo pipefail
usage="usage: build_engine.sh MODEL_jetson_fp16.onnx [OUT.engine] [WORKSPACE_MiB]"
fail() { echo "build_engine.sh: $1" >&2; exit "${2:-2}"; }

case "${1:-}" in
  -h | --help) echo "$usage"; exit 0 ;;
  "") fail "$usage" ;;
esac
[ $# -le 3 ] || fail "$usage (got $# arguments)"
onnx="$1"
case "$onnx" in *.onnx) ;; *) fail "$onnx is not an .onnx file; $usage" ;; esac
[ -f "$onnx" ] || fail "$onnx not found: write it with \`drywallqa export --profile hrnet --target jetson\`" 1
stem="${onnx%.onnx}"
engine="${2:-${stem%_jetson_fp16}.engine}"
case "$engine" in *.engine | *.plan) ;; *) fail "OUT $engine must end in .engine or .plan" ;; esac
workspace="${3:-1024}"
[[ "$workspace" =~ ^[1-9][0-9]*$ ]] || fail "WORKSPACE_MiB must be a whole number of MiB, got '$workspace'"
trtexec="$(command -v trtexec || echo /usr/src/tensorrt/bin/trtexec)"
[ -x "$trtexec" ] || fail "trtexec not found (install TensorRT / JetPack, or run this inside the Jetson image)" 1
python="$(command -v python3 || command -v python)" || fail "python3 not found" 1
out_dir="$(dirname -- "$engine")"
[ -d "$out_dir" ] && [ -w "$out_dir" ] || fail "cannot write to $out_dir (with docker, pass --user \"\$(id -u):\$(id -g)\")" 1

# The metadata first: a bad ONNX should fail in a second, not after a build of several minutes.
meta="$(mktemp)"
trap 'rm -f -- "$meta" "$engine.partial"' EXIT
"$python" - "$onnx" "$meta" <<'PY' || fail "cannot build from $onnx: its DrywallQA metadata (see above)" 1
import json, sys
from pathlib import Path
onnx, out = Path(sys.argv[1]), Path(sys.argv[2])
try:
    from drywallqa.edge.backends import read_metadata
    text = read_metadata(onnx).to_json()
except ImportError:  # drywallqa not installed here: the sidecar `drywallqa export --target jetson` wrote
    sidecar = onnx.with_suffix(".json")
    if not sidecar.is_file():
        sys.exit(f"drywallqa is not importable and {sidecar} is missing")
    text = sidecar.read_text(encoding="utf-8")
if (json.loads(text).get("extra") or {}).get("target") != "tensorrt":  # the FP32 ONNX, or a --dynamic-batch one
    stem = onnx.stem.removesuffix("_jetson_fp16")
    sys.exit(f"{onnx} is not the Jetson export (static shapes, FP16; its engine's metadata would not say so): "
             f"give {stem}_jetson_fp16.onnx, written by `drywallqa export --target jetson`")
out.write_text(text, encoding="utf-8")
PY

"$trtexec" --onnx="$onnx" --saveEngine="$engine.partial" --fp16 \
  --memPoolSize=workspace:"$workspace" --builderOptimizationLevel=3 --skipInference \
  || fail "trtexec failed (see its log above); nothing was replaced" 1
[ -s "$engine.partial" ] || fail "trtexec wrote no engine" 1

sidecar_out="${engine%.*}.json"
"$python" - "$meta" "$engine.partial" "$sidecar_out" <<'PY'
import hashlib, json, os, sys
meta, engine, out = sys.argv[1:]
data = json.loads(open(meta, encoding="utf-8").read())
digest = hashlib.sha256()
with open(engine, "rb") as fh:
    for block in iter(lambda: fh.read(1 << 20), b""):
        digest.update(block)
data.setdefault("extra", {})["engine_sha256"] = digest.hexdigest()
with open(out + ".partial", "w", encoding="utf-8") as fh:
    json.dump(data, fh, indent=2)
os.replace(out + ".partial", out)
PY
mv -f -- "$engine.partial" "$engine"
echo "engine: $engine  metadata: $sidecar_out"
