"""QuPath-compatible GeoJSON: tile detections with measurements, evidence polygons as annotations.

QuPath's parser rules (all versions): a FeatureCollection of Features; ``properties.objectType``
inside properties; ``classification`` as ``{"name", "color": [r, g, b]}`` (a name without a colour
is rejected); ``id`` a UUID or it is dropped; ``measurements`` a flat {name: number}; coordinates in
level-0 pixels. Features are streamed to disk one at a time. Ids are UUIDv5 of the slide and the
object, so reruns produce identical files.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TextIO

import numpy as np
from shapely.geometry import Polygon

_NAMESPACE = uuid.UUID("5d6f1f8e-8d3c-4d52-9a55-6f0c1f4b6a01")


def object_id(slide_key: str, kind: str, index: int) -> str:
    """A deterministic UUID for object ``index`` of ``kind`` on the slide."""
    return str(uuid.uuid5(_NAMESPACE, f"{slide_key}/{kind}/{index}"))


def classification(name: str, color: tuple[int, int, int]) -> dict[str, Any]:
    return {"name": name, "color": [int(c) for c in color]}


def feature(geometry: dict[str, Any], *, fid: str, object_type: str, name: str, color: tuple[int, int, int],
            measurements: dict[str, float]) -> dict[str, Any]:
    """One QuPath object."""
    return {
        "type": "Feature",
        "id": fid,
        "geometry": geometry,
        "properties": {
            "objectType": object_type,
            "classification": classification(name, color),
            "isLocked": object_type == "tile",
            "measurements": {k: float(v) for k, v in measurements.items()},
        },
    }


def rectangle(x: float, y: float, size: float) -> dict[str, Any]:
    """A square polygon (closed ring) in level-0 px."""
    x1, y1 = x + size, y + size
    return {"type": "Polygon", "coordinates": [[[x, y], [x1, y], [x1, y1], [x, y1], [x, y]]]}


class FeatureWriter:
    """Writes a FeatureCollection feature by feature; use as a context manager."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._fh: TextIO | None = None
        self.count = 0

    def __enter__(self) -> "FeatureWriter":
        self._fh = open(self.path, "w")
        self._fh.write('{"type": "FeatureCollection", "features": [\n')
        return self

    def write(self, feat: dict[str, Any]) -> None:
        assert self._fh is not None
        self._fh.write((",\n" if self.count else "") + json.dumps(feat, separators=(",", ":")))
        self.count += 1

    def __exit__(self, *exc: object) -> None:
        assert self._fh is not None
        self._fh.write("\n]}\n")
        self._fh.close()


def polygon_geometry(poly: Polygon, ndigits: int = 1) -> dict[str, Any]:
    """GeoJSON geometry of a shapely polygon, coordinates rounded to ``ndigits`` (level-0 px)."""
    rings = (poly.exterior, *poly.interiors)
    return {"type": "Polygon", "coordinates": [np.round(np.asarray(r.coords), ndigits).tolist() for r in rings]}


def write_evidence(
    path: Path,
    polygons: Iterable[tuple[int, Polygon]],
    *,
    slide_key: str,
    class_names: list[str],
    colors: list[tuple[int, int, int]],
    mpp: float,
) -> int:
    """Evidence polygons as QuPath annotations; returns how many were written."""
    with FeatureWriter(path) as out:
        for i, (class_index, poly) in enumerate(polygons):
            out.write(feature(
                polygon_geometry(poly),
                fid=object_id(slide_key, "evidence", i),
                object_type="annotation",
                name=class_names[class_index],
                color=colors[class_index],
                measurements={"Area µm^2": poly.area * mpp * mpp, "Perimeter µm": poly.length * mpp},
            ))
        return out.count
