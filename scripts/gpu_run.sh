#!/bin/bash
# Runs on a lent GPU machine from the repository root (prepared by scripts/gpu_prepare.py):
#   bash .gpu/run.sh OUTNAME TEACHER_BUDGET_S STUDENT_BUDGET_S [PLAN]   (TEACHER_BUDGET_S 0: the student alone;
#   with the lite2 plan, TEACHER_BUDGET_S 0 distils from the committed Lite2 teacher as it is, and STUDENT_BUDGET_S 0
#   trains the Lite2 teacher alone)
# Makes the package importable without installing it, then trains on the one GPU. PLAN:
#   variants (session 2), side by side:
#   - the HRNet-W18 student, continued from the shipped weights, distilled from the shipped teacher;
#   - three teacher variants continued from the shipped teacher, differing in one thing each:
#     BCE+Dice at 384-px crops, BCE+Dice+clDice at 384, BCE+Dice at 512 (the loss and resolution comparison).
#   lite2, one after the other (processes sharing a GPU are time-sliced, so nothing is gained side by side):
#   - the EfficientNet-Lite2 teacher, continued from models/teachers/effnet_lite2_teacher.safetensors at 512-px crops;
#   - then the student, continued from the shipped weights, distilled from the average of the shipped `lite` and
#     the Lite2 teacher (the new one if it validates better than the committed one, else the committed one).
# All runs log to $OUT/OUTNAME/train.log (with per-epoch validation IoU on the packed validation split);
# weights over 15 MB are split, since files over 16 MiB do not come back from the device.
# GPU_JOB_ARGS is appended to every run, and argparse keeps the last value of an option, so it also overrides
# (a CPU smoke test: "--batch 2 --crop 128 --max-steps 2 --val-pack"; a continuation at a lower learning rate:
# "--init .gpu/s1.safetensors --lr 2e-4 --warmup 20 --val-every 2").
set -e
name=$1; teacher_budget=${2:-300}; student_budget=${3:-480}; plan=${4:-variants}
case "$plan" in variants|lite2) ;; *) echo "unknown plan '$plan' (variants or lite2)" >&2; exit 2;; esac
out="$OUT/$name"; mkdir -p "$out"
mkdir -p /tmp/pkg/drywallqa
cp -r drywallqa/. /tmp/pkg/drywallqa/
for d in train edge export dashboard configs; do ln -sfn "$PWD/$d" "/tmp/pkg/drywallqa/$d"; done
export PYTHONPATH=/tmp/pkg PYTHONUNBUFFERED=1 PYTHONSAFEPATH=1 OMP_NUM_THREADS=4
if ! python3 -c "import pydantic" 2>/dev/null; then  # the GPU image has no pydantic: the carried wheels
  ls .gpu/wheels/*.whl >/dev/null 2>&1 || { echo "no pydantic here and no .gpu/wheels carried" >&2; exit 3; }
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/wheels/*.whl
  export PYTHONPATH=/tmp/pkg:/tmp/site
fi
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader || echo "no nvidia-smi: CPU"
parts=$(ls -d .gpu/data/part* | tr '\n' ' ')
val=$(ls -d .gpu/data_val/part* 2>/dev/null | tr '\n' ' ')
echo "train parts: $parts; validation parts: $val"
job() {  # job NAME ARGS...: one training process in the background, all appending to one log
  python3 -m drywallqa.train.gpu_job --name "$1" --out "$out/$1.safetensors" --pack $parts --val-pack $val \
    --text .gpu/text_minilm.safetensors "${@:2}" $GPU_JOB_ARGS >> "$out/train.log" 2>&1 &
}
if [ "$plan" = "lite2" ]; then
  lite2=models/teachers/effnet_lite2_teacher.safetensors
  if [ "$teacher_budget" != "0" ]; then
    job teacher_lite2 --role teacher_lite2 --init "$lite2" --crop 512 --lr 5e-4 --budget "$teacher_budget" --val-every 3
    wait
    # The continuation replaces the committed teacher only if its last validation beats what that one scored on
    # the same packed split and protocol: crack 0.480 + taping 0.698 at threshold 0.5 (the session-23 Lovász
    # fine-tune; trainer.validate on .gpu/data_val: python scripts/teacher_gate.py FILE).
    if python3 -c 'import json, sys; r = json.loads(open(sys.argv[1]).read().splitlines()[-1]); sys.exit(r.get("iou_0", 0) + r.get("iou_1", 0) <= 1.178)' \
        /tmp/drywallqa-runs/teacher_lite2/log.jsonl; then lite2="$out/teacher_lite2.safetensors"; fi
  fi
  if [ "$student_budget" != "0" ]; then
    echo "the student distils from models/lite_effnet_lite0.safetensors and $lite2 (their average)" | tee -a "$out/train.log"
    job student_hrnet_w18 --role student --init models/hrnet_w18_student.safetensors \
      --teacher models/lite_effnet_lite0.safetensors "$lite2" --lr 1e-3 --budget "$student_budget" --val-every 3
  fi
else
  job student_hrnet_w18 --role student --init models/hrnet_w18_student.safetensors \
    --teacher models/lite_effnet_lite0.safetensors --lr 1e-3 --budget "$student_budget" --val-every 3
fi
if [ "$plan" = "variants" ] && [ "$teacher_budget" != "0" ]; then  # 0: the student alone
  common=(--role teacher --init models/lite_effnet_lite0.safetensors --lr 5e-4 --budget "$teacher_budget")
  job teacher_bce_dice_384 "${common[@]}" --loss bce_dice --crop 384
  job teacher_cldice_384 "${common[@]}" --loss bce_dice_cldice --crop 384
  job teacher_bce_dice_512 "${common[@]}" --loss bce_dice --crop 512
fi
n=0
while [ -n "$(jobs -r)" ]; do  # progress every 30 s, but notice the end within 5 s
  sleep 5; n=$((n + 1))
  if [ $((n % 6)) -eq 0 ]; then grep -h "epoch" "$out/train.log" | tail -4 || true; fi
done
wait || true
grep -h "wrote\|Error\|error" "$out/train.log" || true
shopt -s nullglob
for f in "$out"/*.safetensors; do
  if [ "$(stat -c %s "$f")" -gt 15000000 ]; then split -b 12M "$f" "$f.part-" && rm "$f"; fi
done
ls -la "$out"
