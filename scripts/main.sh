#!/usr/bin/env bash
# The main job on a fresh machine: set everything up, then
#   1. segment validation photos with two prompts (mask PNGs per the contract),
#   2. evaluate the default model (HRNet-W18 student) on the grouped validation split (JSON, Markdown, HTML),
#   3. run the live edge loop on the built-in demo camera for 40 frames, publishing to a local MQTT broker.
# Outputs land in runs/main/. Needs ../shared/data for steps 1-2 (skipped with a message otherwise).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
DQ=.venv/bin/drywallqa
OUT=runs/main
mkdir -p "$OUT"
DATA=../shared/data
if [ -d "$DATA" ]; then
  # A few validation photos of each dataset (configs/split.json says which photos are validation).
  mapfile -t PHOTOS < <(.venv/bin/python - <<'PY'
import json
split = json.load(open("configs/split.json"))["datasets"]
roots = {"cracks": "../shared/data/cracks/train/images", "drywall-join-detect": "../shared/data/drywall-join-detect/train/images"}
for ds, files in split.items():
    val = sorted(f for f, side in files.items() if side == "val")[:4]
    for f in val:
        print(f"{roots[ds]}/{f}")
PY
)
  $DQ predict --prompt "segment crack" --prompt "segment taping area" --out "$OUT/masks" \
    --report "$OUT/findings.csv" "${PHOTOS[@]}"
  $DQ eval --model hrnet --out "$OUT/eval_hrnet"
else
  echo "main: $DATA not found; skipping predict/eval on the dataset" >&2
fi
$DQ edge run --max-frames 40 --stats-json "$OUT/edge_stats.json"
echo "main: done. Masks: $OUT/masks (findings: $OUT/findings.csv)  Report: $OUT/eval_hrnet/eval.html  Edge stats: $OUT/edge_stats.json"
