#!/usr/bin/env bash
# The GPU figures of benchmarks/throughput.py, on a machine with python3 + torch + CUDA and no
# network (the wheels it lacks come from benchmarks/gpu_wheels.sh, carried in .whl/). From the
# repository root:   bash benchmarks/gpu_throughput.sh [OUTDIR]   (about 6 minutes on one H100)
# Writes gpu.txt (nvidia-smi), one throughput-bN.json per batch size, and the logs into OUTDIR.
set -euo pipefail
out=${1:-${OUT:-gpu-bench}}
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
nproc | sed 's/^/cpu cores: /' | tee -a "$out/gpu.txt"
work=/tmp/wsi-medcam-gpu
mkdir -p "$work"
# a 32k² slide of real H&E pixels (about 2.7k tissue tiles at 0.5 µm/px)
python3 benchmarks/make_slide.py --width 32768 --height 32768 --mpp 0.25 -o "$work/slide.tif" 2>&1 | tee "$out/log.txt"
python3 - "$work" <<'PY' 2>&1 | tee -a "$out/log.txt"
import sys
from pathlib import Path

import torch

from wsi_medcam.bundles import ClassifierConfig, import_classifier

torch.manual_seed(0)
import_classifier(ClassifierConfig(arch="resnet18", class_names=["tumor", "stroma", "other"], mpp=0.5, tile_size=224),
                  Path(sys.argv[1]) / "clf")
PY
# a briefly trained Med-CAM segmenter, so masks have Med-CAM's structure (an untrained one gives speckle)
python3 -m wsi_medcam.cli train-cam --classifier "$work/clf" --slides "$work/slide.tif" --steps 150 --batch-size 32 \
  -o "$work/cam" 2>&1 | tail -3 | tee -a "$out/log.txt"
for batch in 128 256 512; do
  python3 benchmarks/throughput.py "$work/slide.tif" --classifier "$work/clf" --segmenter "$work/cam/segmenter" \
    --device cuda --batch-size "$batch" --repeats 2 --bare-seconds 10 --json > "$out/throughput-b$batch.json"
  python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print(sys.argv[1], d['gpu'], d['precision'], 'batch', d['batch_size'], 'readers', d['workers'], 'bare', d['bare_tiles_per_s'], 'pipeline', round(d['pipeline_tiles_per_s'], 1), 'ratio', round(d['ratio_pipeline_to_bare'], 3), 'stage ratio', round(d['ratio_inference_stage_to_bare'], 3))" "$out/throughput-b$batch.json" | tee -a "$out/log.txt"
done
