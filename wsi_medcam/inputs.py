"""Turning what the user typed into slide paths: files, globs, folders and manifest CSVs."""

from __future__ import annotations

import csv
import glob
from pathlib import Path

from .errors import ConfigError

SLIDE_SUFFIXES: set[str] = {".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".dcm", ".svslide"}


def expand_slides(items: list[str]) -> tuple[list[Path], list[Path]]:
    """Paths, globs, folders (their slide files, recursively) and manifest CSVs (``path[,mpp]`` rows)
    → (unique slide paths in the given order, the manifests that were read). However a DICOM file
    was named (folder, glob, list, manifest), only one file per series is kept: see
    :func:`one_file_per_dicom_series`."""
    found: list[Path] = []
    manifests: list[Path] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            found.extend(sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in SLIDE_SUFFIXES))
        elif path.suffix.lower() == ".csv" and path.is_file():
            manifests.append(path)
            for row in read_csv_rows(path, "manifest"):
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
    return one_file_per_dicom_series(list(unique)), manifests


def read_csv_rows(path: Path, what: str) -> list[list[str]]:
    """The rows of the CSV ``path`` (a ``what``, for the message). Read as ``utf-8-sig``: Excel's
    "CSV UTF-8" starts with a byte-order mark, which would otherwise be part of the first cell and
    hide the ``path`` header. A file that cannot be read, or is not UTF-8, is one
    :class:`ConfigError` line naming it."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            return list(csv.reader(fh))
    except UnicodeDecodeError:
        raise ConfigError(f"cannot read the {what} {path}: it is not UTF-8 text (save it as CSV UTF-8)") from None
    except (OSError, csv.Error) as exc:
        raise ConfigError(f"cannot read the {what} {path}: {getattr(exc, 'strerror', None) or exc}") from None


def one_file_per_dicom_series(paths: list[Path]) -> list[Path]:
    """``paths`` with one ``.dcm`` file kept per DICOM series: a DICOM WSI is dozens of instance
    files (levels, thumbnail) in one folder, and OpenSlide opens the whole series from any one of
    them, so each file would otherwise run as a slide of its own. The series is OpenSlide's
    ``dicom.SeriesInstanceUID``; a file it cannot open is kept, to fail in one line like any other."""
    kept: list[Path] = []
    series: set[tuple[Path, str]] = set()
    for path in paths:
        if path.suffix.lower() == ".dcm":
            uid = _dicom_series(path)
            if uid is not None:
                if (path.parent, uid) in series:
                    continue
                series.add((path.parent, uid))
        kept.append(path)
    return kept


def _dicom_series(path: Path) -> str | None:
    import openslide  # only for folders holding DICOM files

    try:
        with openslide.OpenSlide(str(path)) as handle:
            return handle.properties.get("dicom.SeriesInstanceUID")
    except (openslide.OpenSlideError, OSError):
        return None
