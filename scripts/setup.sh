#!/usr/bin/env bash
# Fresh machine -> everything installed: system packages (mosquitto for MQTT, chromium for the dashboard
# test), a virtual environment .venv with the project and its train/dev extras, and the shipped models
# exported to ONNX (models/exported/). Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
[ -x /usr/sbin/mosquitto ] || command -v mosquitto >/dev/null || need_apt+=(mosquitto mosquitto-clients)
command -v chromium >/dev/null || need_apt+=(chromium)
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
  else
    echo "setup: please install ${need_apt[*]} (MQTT broker for the edge runtime, browser for the dashboard test)" >&2
  fi
fi
# Node runs the dashboard's alert-paging test (tests/js/); best effort: that test skips without it.
if ! command -v node >/dev/null && ! command -v nodejs >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs >/dev/null 2>&1 || echo "setup: nodejs not installed" >&2
fi

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch first: 2.13.0 is a lean CPU wheel on these machines; on a CUDA machine install your CUDA torch
# before running this script and it is kept (the train extra only asks for torch>=2.3).
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[train,dev]"

# The edge runtime, predict and eval read exported models; export the shipped weights once.
for profile in hrnet lite; do
  .venv/bin/drywallqa export --profile "$profile" --target onnx >/dev/null
done
echo "setup: done (.venv ready, models exported to models/exported/)"
