"""Batch driver over a slide archive: one dask task per slide, models loaded once per worker.

    python pipelines/archive.py MANIFEST.csv|FOLDER -o OUT --classifier DIR [--segmenter DIR]
                                [--dask local:4 | --scheduler tcp://host:8786 | --slurm configs/slurm.yaml]

The same as ``wsi-medcam run`` with a cluster flag, as a script to copy and adapt for a study
(e.g. to choose slides by a clinical table before submitting). It only composes the package's API.
Exit status: 0 when every slide is done or skipped, 1 when any failed, 2 for a usage error, 130
when interrupted (Ctrl-C).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from wsi_medcam.batch import INTERRUPTED, run_archive
from wsi_medcam.config import RunConfig
from wsi_medcam.distributed import client_for, close_client, split_local_cores
from wsi_medcam.errors import WsiMedcamError
from wsi_medcam.inputs import expand_slides


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("slides", nargs="+")
    ap.add_argument("-o", "--out", type=Path, required=True)
    ap.add_argument("--classifier", type=Path, required=True)
    ap.add_argument("--segmenter", type=Path)
    ap.add_argument("--config", type=Path)
    cluster = ap.add_mutually_exclusive_group()
    cluster.add_argument("--dask", default="local:2")
    cluster.add_argument("--scheduler")
    cluster.add_argument("--slurm", type=Path)
    args = ap.parse_args()

    try:
        paths, manifests = expand_slides(args.slides)
        if not paths:
            raise WsiMedcamError("no slides matched " + " ".join(args.slides))
        overrides = {"classifier": str(args.classifier), "segmenter": str(args.segmenter) if args.segmenter else None,
                     "slide.mpp_csv": [str(m) for m in manifests]}
        cfg = RunConfig.from_yaml(args.config, overrides)
        if not (args.scheduler or args.slurm):
            cfg = split_local_cores(args.dask, cfg)
        client = client_for(dask_spec=args.dask, scheduler=args.scheduler, slurm=args.slurm)
    except WsiMedcamError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # e.g. while the local cluster starts: nothing was written yet
        print(INTERRUPTED, file=sys.stderr)
        return 130
    try:
        results = run_archive(paths, args.out, cfg, client=client,
                              on_result=lambda r: print(f"{r.status:8} {r.path}  {r.reason}", flush=True))
    except WsiMedcamError as exc:  # e.g. the output folder cannot be written, or another run holds it
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(INTERRUPTED, file=sys.stderr)
        return 130
    finally:
        close_client(client)
    failed = sum(r.status == "failed" for r in results)
    print(f"{len(results) - failed} ok, {failed} failed; status in {args.out / 'status.jsonl'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
