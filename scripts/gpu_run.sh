#!/bin/bash
# Runs on a lent GPU machine from the repository root (prepared by scripts/gpu_prepare.py):
# makes the package importable without installing it, trains teacher then student, splits big outputs.
set -e
mkdir -p /tmp/pkg/drywallqa
cp -r drywallqa/. /tmp/pkg/drywallqa/
for d in train edge export dashboard configs; do ln -sfn "$PWD/$d" "/tmp/pkg/drywallqa/$d"; done
export PYTHONPATH=/tmp/pkg PYTHONUNBUFFERED=1 PYTHONSAFEPATH=1
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
parts=$(ls -d .gpu/data/part* 2>/dev/null | tr '\n' ' ')
echo "parts: $parts"
python3 -m drywallqa.train.gpu_job --pack $parts --text .gpu/text_minilm.safetensors \
  --encoder-weights .gpu/lite0_imagenet_fp16.pth --out "$OUT/$1" "${@:2}" 2>&1 | tee "$OUT/$1.log"
# Files over 16 MiB do not come back from the device: split them.
for f in "$OUT/$1"/*.safetensors; do
  if [ "$(stat -c %s "$f")" -gt 15000000 ]; then split -b 12M "$f" "$f.part-" && rm "$f"; fi
done
ls -la "$OUT/$1"
