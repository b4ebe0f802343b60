#!/usr/bin/env bash
# The GPU figures of issue #4, on a machine with python3 + torch + CUDA and no network. The wheels it
# lacks, py-spy and the source H&E slide come from benchmarks/gpu_wheels.sh, carried in .whl/. From
# the repository root:   bash benchmarks/gpu_throughput.sh [OUTDIR]
# Every step fits in LIMIT seconds (default 540, for a 10-minute command on a 15-minute lease): each
# gets at most what is left, and the ones that matter most come first. Each step's figures land in
# OUTDIR as soon as it ends (at most 8 files, what the device tool returns); a failed step does not
# stop the rest.
# 0. tests/test_inference.py (model streams on CUDA give the results of one batch at a time; the loader's
#    pinned blocks are reserved) and explain/eval/--refine on CUDA (the CPU's results), beside
# 1. a MID² slide at 0.5 µm/px (default 32768: ~10k tissue tiles at 224 px); then a resnet18
#    classifier and a Med-CAM U-Net/resnet18 trained STEPS steps on the device (masks with Med-CAM's
#    structure, not speckle; the log has its seconds per step), while a BIG² slide (default 100000:
#    ~100k tiles; BIG=0: none) is written beside (make_slide.py: 32768² took 33 s on the H200
#    machine before each distinct tile was encoded once, 10.7 s after on a 2-core VM);
# 2. benchmarks/throughput.py on the MID slide at batch 256 with the default readers and stitching
#    processes (and the models-stubbed ceiling with CEILING=yes; CEILING_MASKS=dark: replaying Med-CAM-like
#    masks made from the tiles, comparable across machines), py-spy sampling all its processes
#    for 45 s from DELAY s in (start-up and inference); then with SPLITS (default "8:8 5:11": readers:
#    stitching processes) instead; REPEATS pipeline runs each (the mid slide has 8 strips of 4096 px, so
#    at most 8 stitching processes start there);
#    benchmarks/feed.py on the MID slide (readers alone, readers + models, whole; FEED=no: skipped) and
#    benchmarks/archive_rate.py on three runs of it, and on a run's start (ARCHIVE=no: skipped);
# 3. throughput.py on the BIG slide with the split whose inference stage was fastest on MID, BIG_REPEATS pipeline runs
#    (default 1), and the ceiling (BIG_CEILING=no: none); BIG_GRAPHS=yes: once more with --cuda-graphs.
# nvidia-smi dmon samples the GPU throughout.
# SCAN=40x writes both slides as a 40x Aperio scan (0.25 µm/px, levels 4x apart, each side doubled
# so the tiles at 0.5 µm/px are as many): every tile is then read from level 0 and halved, as on real
# 40x slides, which costs the readers ~2.5x the CPU of the default 20x slides (2-core VM).
# A dry run on a CPU machine: DEVICE=cpu MID=4096 STEPS=2 WHEELS=no bash benchmarks/gpu_throughput.sh /tmp/o
set -uo pipefail
out=${1:-${OUT:-gpu-bench}}
mkdir -p "$out"
log="$out/log.txt"
device=${DEVICE:-cuda} mid=${MID:-32768} big=${BIG:-100000} steps=${STEPS:-150} delay=${DELAY:-14} repeats=${REPEATS:-2}
deadline=$((SECONDS + ${LIMIT:-540}))
scan=(--mpp 0.5) side=1
if [ "${SCAN:-20x}" = 40x ]; then scan=(--mpp 0.25 --level-factor 4) side=2; fi
site=/tmp/site work=/tmp/wsi-medcam-gpu
rm -f "$work/big.tif"
mkdir -p "$site" "$work"
if [ "${WHEELS:-yes}" = yes ]; then
  python3 - "$site" .whl/*.whl .whl/*.zip <<'PY'  # wheels are zip files: unpacking them in parallel takes seconds, pip a minute
import sys, zipfile
from concurrent.futures import ThreadPoolExecutor
with ThreadPoolExecutor(8) as pool:
    list(pool.map(lambda w: zipfile.ZipFile(w).extractall(sys.argv[1]), sys.argv[2:]))
PY
  export PYTHONPATH="$site:$PWD"
fi
pyspy=$(command -v py-spy || true)
if [ -f .whl/py-spy.gz ]; then gunzip -c .whl/py-spy.gz >"$site/py-spy" && chmod +x "$site/py-spy" && pyspy=$site/py-spy; fi
export PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1; echo "cpu cores: $(nproc)"
  python3 -c 'import sys, numpy, torch, timm, tifffile, PIL; print("python", sys.version.split()[0], "numpy", numpy.__version__,
"torch", torch.__version__, "timm", timm.__version__, "tifffile", tifffile.__version__, "pillow", PIL.__version__)
import segmentation_models_pytorch, zarr, openslide, cv2, shapely, wsi_medcam.pipeline, wsi_medcam.cli; print("imports ok")'
} >>"$log" 2>&1
if command -v nvidia-smi >/dev/null; then nvidia-smi dmon -s um -o T -d 1 >"$out/dmon.txt" 2>&1 & dmon=$!; fi

left() { echo $((deadline - SECONDS)); }
step() {  # step CAP CMD...: run CMD for at most CAP s (less if less is left), stderr into the log; say how long it took
  local cap=$1; shift
  local t; t=$(left); ((t > cap)) && t=$cap
  if ((t < 15)); then echo "== skipped (time): $*" | tee -a "$log" >&2; return 1; fi
  echo "== $* (at most $t s)" >>"$log"; local start=$SECONDS rc=0
  timeout "$t" "$@" 2>>"$log" || rc=$?
  echo "   $((SECONDS - start)) s, exit $rc" | tee -a "$log" >&2
  return $rc
}
summary='import json,sys; d=json.load(open(sys.argv[1])); c=d.get("ceiling_tiles_per_s") or {}
print(sys.argv[1], d["gpu"], d["precision"], "batch", d["batch_size"], "streams", d["streams"], "readers", d["workers"],
      "stitching processes", d["stitching_processes"], "tiles", d["tiles"],
      "bare", {k: round(v) for k, v in d["bare_tiles_per_s"].items()}, "pipeline", round(d["pipeline_tiles_per_s"]),
      "ratio", round(d["ratio_pipeline_to_bare"], 3), "stage ratio", round(d["ratio_inference_stage_to_bare"], 3),
      "each run (whole, stage)", [(round(r["ratio"], 3), round(r["ratio_inference_stage"], 3)) for r in d["runs"]],
      "ceiling", round(c.get("whole_run", 0)), "ceiling CPU ms per tile", {k: round(v, 2) for k, v in c.get("cpu_ms_per_tile", {}).items()},
      "stages", d["stage_seconds"], "inference stage parts", d["inference_stage_parts_s"], "peak RSS MiB", d["peak_rss_mib"],
      "tiles per second from the first batch", d["tiles_per_second_from_first_batch"],
      "from the loader start", d.get("from_loader_start"), "pinned blocks made in the run", d.get("pinned_blocks_made_in_run"))'
throughput() {  # throughput CAP NAME SLIDE ARGS...: benchmarks/throughput.py into OUTDIR/NAME.json, summarised in the log
  local cap=$1 name=$2 slide=$3; shift 3
  step "$cap" python3 benchmarks/throughput.py "$slide" "${models[@]}" --out "$out/$name.json" "$@" >>"$log" \
    && python3 -c "$summary" "$out/$name.json" >>"$log" 2>&1
}
# model streams and pinned blocks on CUDA; explain, eval and --refine on the models' device
python3 -m pytest -q -p no:cacheprovider tests/test_inference.py \
  tests/test_medcam_metrics.py::test_explain_and_evaluate_run_on_the_models_device >"$out/pytest.txt" 2>&1 &
tests=$!
source=.whl/CMU-1-Small-Region.svs
step 60 python3 benchmarks/make_slide.py --source "$source" --width $((mid * side)) --height $((mid * side)) "${scan[@]}" \
  -o "$work/mid.tif" >>"$log"
wait "$tests"; echo "tests on CUDA: $(tail -1 "$out/pytest.txt")" >>"$log"
# what the loader's pin-memory thread pays for its first batches of 256 tiles: torch's host allocator
# asks CUDA for each new block (a slow-start candidate), and reuses freed ones
[ "$device" = cuda ] && timeout 60 python3 - <<'PY' >>"$log" 2>&1
import time, torch
torch.cuda.init()
def pinned(n):
    blocks, ms = [], []
    for _ in range(n):
        t = time.perf_counter(); blocks.append(torch.empty(256 * 3 * 224 * 224, dtype=torch.uint8, pin_memory=True))
        ms.append((time.perf_counter() - t) * 1e3)
    return blocks, ms
blocks, new = pinned(24)
del blocks
_, reused = pinned(24)
print("pinned 38.5 MB blocks, ms each: new", [round(m, 1) for m in new], "sum", round(sum(new)), "; reused, sum", round(sum(reused), 1))
PY
# batches a second the readers hand over by descriptor and by name, with 2 threads busy in Python
[ "$device" = cuda ] && step 40 python3 benchmarks/batch_delivery.py --readers 6 --busy 2 --seconds 3 >>"$log"
maker=
if ((big > 0)); then
  { step 200 python3 benchmarks/make_slide.py --source "$source" --width $((big * side)) --height $((big * side)) "${scan[@]}" \
      -o "$work/big-part.tif" \
      >>"$log" && mv "$work/big-part.tif" "$work/big.tif"; } &
  maker=$!
fi
python3 - "$work" <<'PY' >>"$log" 2>&1
import sys
from pathlib import Path
import torch
from wsi_medcam.bundles import ClassifierConfig, import_classifier
torch.manual_seed(0)
import_classifier(ClassifierConfig(arch="resnet18", class_names=["tumor", "stroma", "other"], mpp=0.5, tile_size=224),
                  Path(sys.argv[1]) / "clf")
PY
rm -rf "$work/cam"
step 150 python3 -m wsi_medcam.cli train-cam --classifier "$work/clf" --slides "$work/mid.tif" --steps "$steps" --batch-size 32 \
  --device "$device" -o "$work/cam" >>"$log"
if [ ! -f "$work/cam/segmenter/config.json" ]; then  # the device failed: a few CPU steps, so the rest can go on
  rm -rf "$work/cam"
  step 120 python3 -m wsi_medcam.cli train-cam --classifier "$work/clf" --slides "$work/mid.tif" --steps 20 --batch-size 16 \
    --device cpu -o "$work/cam" >>"$log"
fi
python3 - "$work/cam/train_log.jsonl" <<'PY' >>"$log" 2>&1
import json, statistics, sys
steps = [r for r in map(json.loads, open(sys.argv[1])) if "seconds" in r]
print(f"train-cam: {len(steps)} steps, median {statistics.median(r['seconds'] for r in steps[1:] or steps):.3f} s per step of 32 tiles")
PY
models=(--classifier "$work/clf" --segmenter "$work/cam/segmenter" --device "$device")
[ -n "$maker" ] && wait "$maker"  # the mid-slide measurements run alone, not beside the big slide's writing
if [ -n "$pyspy" ]; then  # sample every process of the first mid run for 45 s from DELAY s in: its start-up and inference
  (sleep "$delay"; pid=$(pgrep -f -o "^python3 benchmarks/throughput.py $work/mid.tif") &&
     "$pyspy" record -p "$pid" --subprocesses --nonblocking -r 50 -d 45 -f raw -o "$out/pyspy-mid.txt" >>"$log" 2>&1) &
fi
ceiling=(); [ "${CEILING:-no}" = yes ] && ceiling=(--ceiling --ceiling-masks "${CEILING_MASKS:-model}")
throughput 120 throughput-mid "$work/mid.tif" --batch-size 256 --repeats "$repeats" --bare-seconds 4 "${ceiling[@]}"
# readers alone, readers + models, whole: the steady tiles/s each allows (FEED=no: skipped)
[ "${FEED:-yes}" = yes ] && step 70 python3 benchmarks/feed.py "$work/mid.tif" "${models[@]}" --out "$out/feed-mid.json" >>"$log"
# three runs of the mid slide one after another, with and without the tissue found a slide ahead, and a run's start
# (fresh processes, twice each way: the models loaded, then the first slide's tissue; or that tissue found beside them)
# (ARCHIVE=no: skipped)
[ "${ARCHIVE:-yes}" = yes ] && step 110 python3 benchmarks/archive_rate.py "$work/mid.tif" "${models[@]}" --copies 3 \
  --cold 2 --out "$out/archive-mid.json" >>"$log"
for split in ${SPLITS-8:8 5:11}; do  # SPLITS="": none
  throughput 90 "throughput-mid-${split/:/x}" "$work/mid.tif" --batch-size 256 --repeats "$repeats" --bare-seconds 4 \
    --workers "${split%:*}" --stitchers "${split#*:}"
done
best=$(python3 - "$out" <<'PY'  # the split whose inference stage ran fastest on MID: "" (the defaults) or "--workers R --stitchers S"
import json, pathlib, sys
runs = {p.name: json.loads(p.read_text()) for p in pathlib.Path(sys.argv[1]).glob("throughput-mid*.json")}
name = max(runs, key=lambda n: runs[n]["pipeline_inference_stage_tiles_per_s"], default="throughput-mid.json")
# the split asked for, from the name (the JSON has the processes started: at most one per 4096 px strip)
print("" if name == "throughput-mid.json" else "--workers {} --stitchers {}".format(*name[15:-5].split("x")))
PY
)
echo "BIG slide with: ${best:-the defaults}" >>"$log"
if [ -f "$work/big.tif" ]; then
  # shellcheck disable=SC2086  # $best is empty or flags
  big_ceiling=(--ceiling --ceiling-masks "${CEILING_MASKS:-model}"); [ "${BIG_CEILING:-yes}" = no ] && big_ceiling=()
  throughput 300 throughput-big "$work/big.tif" --repeats "${BIG_REPEATS:-1}" --bare-seconds 4 "${big_ceiling[@]}" $best
  # the same with the models replayed as CUDA graphs, bare and pipeline alike (BIG_GRAPHS=yes)
  [ "${BIG_GRAPHS:-no}" = yes ] && throughput 120 throughput-big-graphs "$work/big.tif" --repeats 1 --bare-seconds 4 \
    --cuda-graphs $best
fi
[ -n "${dmon:-}" ] && kill "$dmon" 2>/dev/null
grep -E "^(==|   [0-9]+ s|train-cam:|$out|imports|python|NVIDIA|name|cpu cores|BIG|pinned|\{\"readers| +(readers|models|whole|bare models),? | +(one slide after another|tissue found ahead|first tissue (after|beside) the models):)" "$log"
