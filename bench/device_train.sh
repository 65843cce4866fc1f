#!/usr/bin/env bash
# Issue 15's GPU figures in one short run on the lent device machine. That machine (SPEC §8) has Python 3.12, torch
# with CUDA, lightning, torchvision and onnx, but no pydantic, wandb, fastapi or fiftyone: cvops' training path needs
# only pydantic of those, installed here from wheels carried along; bench/train.py leaves the W&B row out by itself.
#   here:   make device-wheels                     (pydantic's wheels for Python 3.12 into .device-wheels/)
#   there:  bash bench/device_train.sh              (the device tool's run, with carry [".device-wheels"])
# resnet18, 128 px, batch 256, bf16-mixed, channels-last: the Lightning path ÷ the plain loop (target ≥ 0.95) and
# ÷ the same step on a batch resident on the GPU (target ≥ 0.8), deterministic vs not; well under 5 minutes.
# Writes $OUT/train.json when $OUT is set (the device tool brings $OUT back), else bench/results/train.json.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
deps=$(mktemp -d)
if ! "$py" -c "import pydantic" 2>/dev/null; then
  "$py" -m pip install --quiet --no-index --find-links "${WHEELS:-.device-wheels}" --target "$deps" pydantic
fi
export PYTHONPATH="$PWD:$deps${PYTHONPATH:+:$PYTHONPATH}" WANDB_MODE=offline
"$py" -c "import torch; assert torch.cuda.is_available() or '${DRY_RUN:-}', 'no CUDA device'; print('device:', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'CPU (dry run)', 'torch', torch.__version__)"
timeout 290 "$py" bench/train.py --n "${N:-8192}" --size 128 --batch-size 256 --epochs 2 --repeat 2 --precision bf16-mixed \
  --out "${OUT:-bench/results}/train.json"
