#!/usr/bin/env bash
# The GPU figures of issue #4, on a machine with python3 + torch + CUDA and no network. The wheels it
# lacks and the source H&E slide come from benchmarks/gpu_wheels.sh, carried in .whl/. From the
# repository root:   bash benchmarks/gpu_throughput.sh [OUTDIR]   (about 10 minutes on one H100)
# 1. a 32k² slide at 0.25 µm/px (~2.7k tissue tiles at 0.5 µm/px), a resnet18 classifier and a
#    briefly trained Med-CAM U-Net/resnet18 (so masks have Med-CAM's structure, not speckle);
# 2. benchmarks/throughput.py on it: batch 256 with the default readers and stitching processes (+
#    the models-stubbed ceiling), then the ceiling once more with stitching in the model process;
#    benchmarks/stitching.py: stitching alone, in the model process against 4 and 8 processes (2048-px
#    strips, 8 on this slide: the processes are at most one per strip, 4 with the default 4096);
#    with BATCH512=yes also batch 512 with 12 readers (one more minute);
# 3. a BIG² slide at 0.5 µm/px through the whole pipeline: tiles/s, stages, RSS. BIG=100000 gives
#    ~100k tissue tiles, but making it took over 120 s on the H100 machine's 16 cores (the pyramid
#    levels are read from level-0 pixels); the default 72000 (~50k tiles) fits a 15-minute lease.
# train-cam runs on the device (STEPS=150 by default; its first GPU run, so should it fail, 30 CPU
# steps follow and the rest goes on): train-cam.txt has its seconds per step.
# Each step's JSON and log land in OUTDIR as soon as it ends; a failed step does not stop the rest.
# A dry run on a CPU machine: DEVICE=cpu SMALL=4096 BIG=8192 STEPS=2 WHEELS=no bash benchmarks/gpu_throughput.sh /tmp/o
set -uo pipefail
out=${1:-${OUT:-gpu-bench}}
mkdir -p "$out"
log="$out/log.txt"
device=${DEVICE:-cuda} small=${SMALL:-32768} big=${BIG:-72000} steps=${STEPS:-150}
site=/tmp/site
if [ "${WHEELS:-yes}" = yes ]; then
  python3 - "$site" .whl/*.whl .whl/*.zip <<'PY'  # wheels are zip files: unpacking them in parallel takes seconds, pip a minute
import sys, zipfile
from concurrent.futures import ThreadPoolExecutor
with ThreadPoolExecutor(8) as pool:
    list(pool.map(lambda w: zipfile.ZipFile(w).extractall(sys.argv[1]), sys.argv[2:]))
PY
  export PYTHONPATH="$site:$PWD"
fi
export PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; echo "cpu cores: $(nproc)"; } | tee "$out/gpu.txt"
work=/tmp/wsi-medcam-gpu
mkdir -p "$work"
source=.whl/CMU-1-Small-Region.svs
summary='import json,sys; d=json.load(open(sys.argv[1])); c=d.get("ceiling_tiles_per_s") or {}
print(sys.argv[1], d["gpu"], d["precision"], "batch", d["batch_size"], "readers", d["workers"],
      "stitching processes", d["stitching_processes"], "tiles", d["tiles"],
      "bare", {k: round(v) for k, v in d["bare_tiles_per_s"].items()}, "pipeline", round(d["pipeline_tiles_per_s"]),
      "ratio", round(d["ratio_pipeline_to_bare"], 3), "stage ratio", round(d["ratio_inference_stage_to_bare"], 3),
      "ceiling", round(c.get("whole_run", 0)), "stages", d["stage_seconds"], "peak RSS MiB", d["peak_rss_mib"])'
step() {  # run "$@" with stderr into the log, then say how long it took and whether it failed
  echo "== $*" >>"$log"; local start=$SECONDS rc=0
  "$@" 2>>"$log" || rc=$?
  echo "   $((SECONDS - start)) s, exit $rc" | tee -a "$log" >&2
}
step python3 benchmarks/make_slide.py --source "$source" --width "$small" --height "$small" --mpp 0.25 -o "$work/slide.tif" >>"$log"
python3 - "$work" <<'PY' >>"$log" 2>&1
import sys
from pathlib import Path
import torch
from wsi_medcam.bundles import ClassifierConfig, import_classifier
torch.manual_seed(0)
import_classifier(ClassifierConfig(arch="resnet18", class_names=["tumor", "stroma", "other"], mpp=0.5, tile_size=224),
                  Path(sys.argv[1]) / "clf")
PY
step python3 -m wsi_medcam.cli train-cam --classifier "$work/clf" --slides "$work/slide.tif" --steps "$steps" --batch-size 32 \
  --device "$device" -o "$work/cam"
if [ ! -f "$work/cam/segmenter/config.json" ]; then
  rm -rf "$work/cam"
  step python3 -m wsi_medcam.cli train-cam --classifier "$work/clf" --slides "$work/slide.tif" --steps 30 --batch-size 32 \
    --device cpu -o "$work/cam"
fi
python3 - "$work/cam/train_log.jsonl" <<'PY' | tee "$out/train-cam.txt" >>"$log"
import json, statistics, sys
steps = [r for r in map(json.loads, open(sys.argv[1])) if "seconds" in r]
print(f"train-cam: {len(steps)} steps, median {statistics.median(r['seconds'] for r in steps[1:] or steps):.3f} s per step of 32 tiles")
PY
models=(--classifier "$work/clf" --segmenter "$work/cam/segmenter" --device "$device")
step python3 benchmarks/throughput.py "$work/slide.tif" "${models[@]}" --batch-size 256 --repeats 2 --bare-seconds 8 --ceiling --json \
  > "$out/throughput-b256.json" && python3 -c "$summary" "$out/throughput-b256.json" | tee -a "$log"
step python3 benchmarks/throughput.py "$work/slide.tif" "${models[@]}" --batch-size 256 --repeats 1 --bare-seconds 4 --ceiling \
  --stitchers 0 --json > "$out/throughput-b256-stitch0.json" && python3 -c "$summary" "$out/throughput-b256-stitch0.json" | tee -a "$log"
step python3 benchmarks/stitching.py "$work/slide.tif" "${models[@]}" --stitchers 0 4 8 --repeats 1 --batch-size 256 --strip-px 2048 \
  | tee -a "$out/stitching.txt" "$log"
if [ "${BATCH512:-no}" = yes ]; then
  step python3 benchmarks/throughput.py "$work/slide.tif" "${models[@]}" --batch-size 512 --workers 12 --repeats 1 --bare-seconds 6 --json \
    > "$out/throughput-b512-r12.json" && python3 -c "$summary" "$out/throughput-b512-r12.json" | tee -a "$log"
fi
step timeout 300 python3 benchmarks/make_slide.py --source "$source" --width "$big" --height "$big" --mpp 0.5 -o "$work/big.tif" >>"$log"
step timeout 240 python3 benchmarks/throughput.py "$work/big.tif" "${models[@]}" --batch-size 256 --repeats 1 --bare-seconds 2 --json \
  > "$out/throughput-big.json" && python3 -c "$summary" "$out/throughput-big.json" | tee -a "$log"
