"""QuPath-compatible GeoJSON: tile detections with measurements, evidence polygons as annotations.

QuPath's parser rules (all versions): a FeatureCollection of Features; ``properties.objectType``
inside properties; ``classification`` as ``{"name", "color": [r, g, b]}`` (a name without a colour
is rejected); ``id`` a UUID or it is dropped; ``measurements`` a flat {name: number}; coordinates in
level-0 pixels. Features are streamed to disk one at a time. Ids are UUIDv5 of the slide and the
object, so reruns produce identical files.

Evidence polygons are encoded batch by batch (:func:`encode_evidence`), so a slide's many polygons
can be simplified and encoded in several processes; :func:`write_evidence` numbers them in order.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import orjson
import shapely
from shapely.geometry import Polygon

from ..stitching import finish_polygons

_NAMESPACE = uuid.UUID("5d6f1f8e-8d3c-4d52-9a55-6f0c1f4b6a01")


def object_id(slide_key: str, kind: str, index: int) -> str:
    """A deterministic UUID for object ``index`` of ``kind`` on the slide."""
    return object_ids(slide_key, kind, [index])[0]


def object_ids(slide_key: str, kind: str, indices: Iterable[int]) -> list[str]:
    """:func:`object_id` of each index: ``uuid.uuid5(_NAMESPACE, f"{slide_key}/{kind}/{index}")``,
    hashing the common prefix once (a third of the cost of a tile's record went to uuid5)."""
    prefix = hashlib.sha1(_NAMESPACE.bytes + f"{slide_key}/{kind}/".encode())
    out = []
    for index in indices:
        h = prefix.copy()
        h.update(str(index).encode())
        d = bytearray(h.digest()[:16])
        d[6] = (d[6] & 0x0F) | 0x50  # version 5
        d[8] = (d[8] & 0x3F) | 0x80  # RFC 4122 variant
        x = d.hex()
        out.append(f"{x[:8]}-{x[8:12]}-{x[12:16]}-{x[16:20]}-{x[20:]}")
    return out


def classification(name: str, color: tuple[int, int, int]) -> dict[str, Any]:
    return {"name": name, "color": [int(c) for c in color]}


def feature(geometry: dict[str, Any], *, fid: str | None, object_type: str, name: str, color: tuple[int, int, int],
            measurements: dict[str, float]) -> dict[str, Any]:
    """One QuPath object (without an id if ``fid`` is None)."""
    return {
        "type": "Feature",
        **({} if fid is None else {"id": fid}),
        "geometry": geometry,
        "properties": {
            "objectType": object_type,
            "classification": classification(name, color),
            "isLocked": object_type == "tile",
            "measurements": {k: float(v) for k, v in measurements.items()},
        },
    }


class FeatureWriter:
    """Writes a FeatureCollection feature by feature; use as a context manager."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._fh: TextIO | None = None
        self.count = 0

    def __enter__(self) -> "FeatureWriter":
        self._fh = open(self.path, "w", encoding="utf-8")  # GeoJSON is UTF-8 (RFC 7946)
        self._fh.write('{"type": "FeatureCollection", "features": [\n')
        return self

    def write_all(self, texts: list[str]) -> None:
        """Write features already encoded, in one call."""
        assert self._fh is not None
        if texts:
            self._fh.write((",\n" if self.count else "") + ",\n".join(texts))
            self.count += len(texts)

    def __exit__(self, *exc: object) -> None:
        assert self._fh is not None
        self._fh.write("\n]}\n")
        self._fh.close()


def encode(value: Any) -> str:
    """A feature (or any JSON value) as compact JSON."""
    return json.dumps(value, separators=(",", ":"))


def polygon_coordinates(polys: np.ndarray, ndigits: int = 1) -> list[list[np.ndarray]]:
    """Per shapely polygon, its GeoJSON rings (exterior first) as (n, 2) arrays rounded to
    ``ndigits`` (level-0 px), taken from all the polygons at once."""
    rings, owner = shapely.get_rings(polys, return_index=True)
    coords, ring = shapely.get_coordinates(rings, return_index=True)
    coords = np.round(coords, ndigits)
    per_ring = np.split(coords, np.flatnonzero(np.diff(ring)) + 1) if len(coords) else []
    out: list[list[np.ndarray]] = [[] for _ in polys]
    for k, points in zip(owner.tolist(), per_ring):
        out[k].append(points)
    return out


Encoded = tuple[int, float, str]
"""An evidence polygon: class index, area in µm², its feature as JSON without an id."""

_HEAD = '{"type":"Feature",'  # how an encoded feature starts; its id follows this in the file


def encode_evidence(classes: np.ndarray, geoms: np.ndarray, *, simplify_px: float, clip: Polygon | None,
                    class_names: list[str], colors: list[tuple[int, int, int]], mpp: float) -> list[Encoded]:
    """A batch of final polygons (shapely, or WKB from another process) finished by
    :func:`~wsi_medcam.stitching.finish_polygons` (``simplify_px``, ``clip``: level-0 px; one
    feature per part) and encoded as QuPath annotations; ``mpp``: the slide's µm/px."""
    if len(geoms) and not isinstance(geoms[0], Polygon):
        geoms = shapely.from_wkb(geoms)
    finished = list(finish_polygons(classes, geoms, simplify_px, clip))
    polys = np.array([poly for _, poly in finished], dtype=object)
    areas, perimeters = shapely.area(polys) * mpp * mpp, shapely.length(polys) * mpp
    out = []
    for (class_index, _), rings, area, perimeter in zip(finished, polygon_coordinates(polys), areas.tolist(),
                                                         perimeters.tolist()):
        feat = feature({"type": "Polygon", "coordinates": rings}, fid=None, object_type="annotation",
                       name=class_names[class_index], color=colors[class_index],
                       measurements={"Area µm^2": area, "Perimeter µm": perimeter})
        # orjson writes the coordinate arrays itself: 6× faster than json with lists (the floats'
        # shortest round-trip form, as json's; UTF-8 where json escapes)
        out.append((class_index, area, orjson.dumps(feat, option=orjson.OPT_SERIALIZE_NUMPY).decode()))
    return out


def write_evidence(path: Path, encoded: Iterable[Encoded], *, slide_key: str) -> tuple[int, dict[int, tuple[int, float]]]:
    """Evidence polygons as QuPath annotations, numbered in order; returns how many were written and,
    per class index, (polygons, area µm²). Written 1024 at a time (ids hashed together)."""
    per_class: dict[int, tuple[int, float]] = {}
    with FeatureWriter(path) as out:
        items = iter(encoded)
        while batch := list(itertools.islice(items, 1024)):
            ids = object_ids(slide_key, "evidence", range(out.count, out.count + len(batch)))
            texts = []
            for fid, (class_index, area, text) in zip(ids, batch):
                assert text.startswith(_HEAD)
                texts.append(f'{_HEAD}"id":"{fid}",{text[len(_HEAD):]}')
                count, total = per_class.get(class_index, (0, 0.0))
                per_class[class_index] = (count + 1, total + area)
            out.write_all(texts)
        return out.count, per_class
