"""Peak memory of full runs on slides of different sizes: memory must not grow with the slide.

    python benchmarks/memory.py SMALL_SLIDE LARGE_SLIDE --classifier DIR --segmenter DIR [-- extra run flags]

Each slide is processed by a separate ``wsi-medcam run`` process; the memory of that process tree
(main process + DataLoader readers, PSS and RSS) is sampled every 0.2 s and its peak reported,
overall and per stage of the run's report (so a peak is traced to tissue detection, streaming or
the pyramid), with the ratio large ÷ small. Make the slides with ``benchmarks/make_slide.py`` (e.g. 25k² and 100k²).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil


def tree_memory(proc: psutil.Process) -> tuple[int, int, int]:
    """(PSS, RSS) bytes of a process and all its descendants, and the PSS of the process alone.

    Forked DataLoader readers share the parent's pages copy-on-write; RSS counts those pages once
    per process, PSS splits them between the sharers, so the PSS sum is the memory really used.
    """
    pss = rss = own = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            info = p.memory_full_info()
        except psutil.Error:
            continue
        rss += info.rss
        pss += getattr(info, "pss", info.rss)
        own = own or getattr(info, "pss", info.rss)
    return pss, rss, own


def measure(slide: Path, args: argparse.Namespace, extra: list[str]) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "wsi_medcam.cli", "run", str(slide), "--classifier", str(args.classifier),
               "-o", tmp, *(["--segmenter", str(args.segmenter)] if args.segmenter else []), *extra]
        start, wall_start = time.perf_counter(), time.time()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        ps = psutil.Process(proc.pid)
        samples: list[tuple[float, int, int, int]] = []  # (s since start, PSS, RSS, the main process's PSS)
        while proc.poll() is None:
            samples.append((time.perf_counter() - start, *tree_memory(ps)))
            time.sleep(0.2)
        seconds = time.perf_counter() - start
        if proc.returncode != 0:
            sys.exit(f"run failed on {slide}: {proc.stderr.read()[-2000:]}")
        report_path = next(Path(tmp).glob("*/report.json"))
        report = json.loads(report_path.read_text())
        written = report_path.stat().st_mtime - wall_start  # the slide's end, s after start
    if args.timeline:
        args.timeline.mkdir(parents=True, exist_ok=True)
        with open(args.timeline / f"{slide.stem}.csv", "w") as f:
            f.write("seconds,tree_pss_mib,tree_rss_mib,main_pss_mib\n")
            f.writelines(f"{t:.1f},{p / 2**20:.1f},{r / 2**20:.1f},{m / 2**20:.1f}\n" for t, p, r, m in samples)
    timings = report["timings_s"]
    return {"slide": str(slide), "dimensions": report["slide"]["dimensions"], "tiles": report["tiles"]["count"],
            "seconds": seconds, "peak_pss_mib": max(s[1] for s in samples) / 2**20,
            "peak_rss_mib": max(s[2] for s in samples) / 2**20,
            "peak_pss_by_stage_mib": peaks_by_stage(samples, timings, written),
            "tissue_and_tiling_s": timings["tissue"] + timings["tiling"]}


def peaks_by_stage(samples: list[tuple[float, int, int, int]], timings: dict[str, float], written: float) -> dict[str, float]:
    """Peak PSS (MiB) within each stage of the report's ``timings_s`` (in the order they ran,
    ending ``total`` s after the slide's start), the report being written ``written`` s after the
    process started (the slide's end; exiting takes seconds more: interpreter, torch, threads);
    ``start`` is the interpreter and model loading before the slide, ``end`` the exit after it."""
    t = written - timings["total"]
    bounds = [("start", t)]
    for name, duration in timings.items():
        if name != "total":
            t += duration
            bounds.append((name, t))
    bounds.append(("end", math.inf))
    peaks: dict[str, float] = {}
    for when, pss, *_ in samples:
        if not pss:  # the process was exiting
            continue
        name = next(n for n, until in bounds if when <= until)
        peaks[name] = max(peaks.get(name, 0.0), pss / 2**20)
    return peaks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("small", type=Path)
    ap.add_argument("large", type=Path)
    ap.add_argument("--classifier", type=Path, required=True)
    ap.add_argument("--segmenter", type=Path)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--timeline", type=Path, help="folder for a CSV per slide of the memory samples (every 0.2 s)")
    args, extra = ap.parse_known_args()
    extra = [e for e in extra if e != "--"]
    small, large = measure(args.small, args, extra), measure(args.large, args, extra)
    out = {"small": small, "large": large, "ratio_large_to_small": large["peak_pss_mib"] / small["peak_pss_mib"]}
    if args.json:
        print(json.dumps(out, indent=2))
        return
    for name, m in (("small", small), ("large", large)):
        w, h = m["dimensions"]
        print(f"{name}: {w}×{h}, {m['tiles']} tiles, {m['seconds']:.0f} s, peak PSS {m['peak_pss_mib']:.0f} MiB "
              f"(RSS sum {m['peak_rss_mib']:.0f} MiB), "
              f"tissue+tiling {m['tissue_and_tiling_s']:.1f} s")
        print("  peak PSS by stage: " + ", ".join(f"{k} {v:.0f}" for k, v in m["peak_pss_by_stage_mib"].items()) + " MiB")
    print(f"peak PSS large ÷ small: {out['ratio_large_to_small']:.3f}")


if __name__ == "__main__":
    main()
