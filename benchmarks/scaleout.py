"""Speed-up of a dask LocalCluster over one process, on the same slides, in one run.

    python benchmarks/scaleout.py SLIDE... --classifier DIR [--segmenter DIR] [--workers N] [-- extra run flags]

Runs ``wsi-medcam run SLIDES`` twice as separate processes, first in one process (torch using
every core, the default readers), then with ``--dask local:N`` (N worker processes, cores ÷ N torch
threads each); both include start-up and model loading. Prints the wall time of each, slides/s and
the speed-up; the outputs of the two runs are the same slides' (checked by the test suite).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def timed_run(slides: list[Path], args: argparse.Namespace, extra: list[str]) -> float:
    """Wall seconds of one ``wsi-medcam run`` over ``slides`` into a fresh folder."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "wsi_medcam.cli", "run", *map(str, slides), "--classifier", str(args.classifier),
               "-o", tmp, *(["--segmenter", str(args.segmenter)] if args.segmenter else []), *extra]
        start = time.perf_counter()
        proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        seconds = time.perf_counter() - start
        if proc.returncode != 0:
            sys.exit(f"run failed: {proc.stderr[-2000:]}")
        statuses = [json.loads(line)["status"] for line in (Path(tmp) / "status.jsonl").read_text().splitlines()]
        if statuses.count("done") != len(slides):
            sys.exit(f"not every slide was done: {statuses}")
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("slides", type=Path, nargs="+")
    ap.add_argument("--classifier", type=Path, required=True)
    ap.add_argument("--segmenter", type=Path)
    ap.add_argument("--workers", type=int, default=2, help="LocalCluster worker processes")
    ap.add_argument("--json", action="store_true")
    args, extra = ap.parse_known_args()
    extra = [e for e in extra if e != "--"]
    single = timed_run(args.slides, args, extra)
    cluster = timed_run(args.slides, args, [*extra, "--dask", f"local:{args.workers}"])
    n = len(args.slides)
    out = {"slides": n, "cores": os.cpu_count(), "workers": args.workers, "one_process_s": single,
           "local_cluster_s": cluster, "speed_up": single / cluster}
    if args.json:
        print(json.dumps(out, indent=2))
        return
    print(f"{n} slides on {out['cores']} cores")
    print(f"one process          : {single:7.1f} s  ({n / single:.3f} slides/s)")
    print(f"LocalCluster({args.workers} workers): {cluster:7.1f} s  ({n / cluster:.3f} slides/s)")
    print(f"speed-up             : {out['speed_up']:.2f}×")


if __name__ == "__main__":
    main()
