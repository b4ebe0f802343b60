"""Per-tile records, streamed as they come: ``tiles.csv`` and ``tiles.geojson`` (QuPath tiles)."""

from __future__ import annotations

import csv
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .geojson import FeatureWriter, feature, object_id, rectangle


@dataclass(frozen=True)
class TileRecord:
    """One tile's outcome; x, y, size in level-0 px, fractions 0–1, evidence None without an explainer.

    ``kept``: per certification fill, whether the tile's hard evidence alone keeps the prediction.
    """

    index: int
    x: int
    y: int
    size: float
    tissue_fraction: float
    probs: np.ndarray
    prediction: int
    evidence_fraction: float | None
    kept: dict[str, bool]


class TileWriter:
    """Writes each :class:`TileRecord` to the CSV and the GeoJSON at once; a context manager."""

    def __init__(self, csv_path: Path, geojson_path: Path, *, slide_key: str, class_names: list[str],
                 colors: list[tuple[int, int, int]], certify_fills: tuple[str, ...] = ()):
        self.csv_path, self.geojson_path = Path(csv_path), Path(geojson_path)
        self.slide_key = slide_key
        self.class_names = class_names
        self.colors = colors
        self.certify_fills = certify_fills
        self._stack = ExitStack()

    def __enter__(self) -> "TileWriter":
        fh = self._stack.enter_context(open(self.csv_path, "w", newline=""))
        self._csv = csv.writer(fh)
        self._csv.writerow(["tile", "x", "y", "size", "tissue_fraction",
                            *[f"prob_{n}" for n in self.class_names], "prediction", "evidence_fraction",
                            *[f"keeps_{f}" for f in self.certify_fills]])
        self._geo = self._stack.enter_context(FeatureWriter(self.geojson_path))
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.__exit__(*exc)

    def write(self, rec: TileRecord) -> None:
        name = self.class_names[rec.prediction]
        evidence = "" if rec.evidence_fraction is None else f"{rec.evidence_fraction:.4f}"
        self._csv.writerow([rec.index, rec.x, rec.y, round(rec.size, 2), f"{rec.tissue_fraction:.4f}",
                            *[f"{p:.5f}" for p in rec.probs], name, evidence,
                            *[int(rec.kept[f]) if f in rec.kept else "" for f in self.certify_fills]])
        measurements = {f"prob {n}": float(p) for n, p in zip(self.class_names, rec.probs)}
        measurements["tissue fraction"] = rec.tissue_fraction
        if rec.evidence_fraction is not None:
            measurements["evidence fraction"] = rec.evidence_fraction
        for f, v in rec.kept.items():
            measurements[f"evidence keeps class ({f} fill)"] = float(v)
        self._geo.write(feature(
            rectangle(rec.x, rec.y, rec.size),
            fid=object_id(self.slide_key, "tile", rec.index),
            object_type="tile",
            name=name,
            color=self.colors[rec.prediction],
            measurements=measurements,
        ))
