"""Turning what the user typed into slide paths: files, globs, folders and manifest CSVs."""

from __future__ import annotations

import csv
import glob
from pathlib import Path

SLIDE_SUFFIXES: set[str] = {".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".dcm", ".svslide"}


def expand_slides(items: list[str]) -> tuple[list[Path], list[Path]]:
    """Paths, globs, folders (their slide files, recursively) and manifest CSVs (``path[,mpp]`` rows)
    → (unique slide paths in the given order, the manifests that were read)."""
    found: list[Path] = []
    manifests: list[Path] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            found.extend(sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in SLIDE_SUFFIXES))
        elif path.suffix.lower() == ".csv" and path.is_file():
            manifests.append(path)
            with open(path, newline="") as fh:
                for row in csv.reader(fh):
                    if row and row[0].strip() and row[0].strip().lower() != "path":
                        entry = Path(row[0].strip())
                        found.append(entry if entry.is_absolute() else path.parent / entry)
        elif any(ch in item for ch in "*?[") and not path.exists():
            found.extend(Path(p) for p in sorted(glob.glob(item, recursive=True)))
        else:
            found.append(path)
    unique: dict[Path, None] = {}
    for p in found:
        unique.setdefault(p, None)
    return list(unique), manifests
