"""QuPath-compatible GeoJSON: tile detections with measurements, evidence polygons as annotations.

QuPath's parser rules (all versions): a FeatureCollection of Features; ``properties.objectType``
inside properties; ``classification`` as ``{"name", "color": [r, g, b]}`` (a name without a colour
is rejected); ``id`` a UUID or it is dropped; ``measurements`` a flat {name: number}; coordinates in
level-0 pixels. Features are streamed to disk one at a time. Ids are UUIDv5 of the slide and the
object (a tile's index; an evidence polygon's own feature, so that it needs no place in the file's
order), so reruns produce identical files.

Evidence polygons are encoded batch by batch, ids included (:func:`encode_evidence`), so a slide's
many polygons can be simplified and encoded in several processes, the stitching processes among
them while tiles stream; :func:`write_evidence` only joins them.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, TextIO

import numpy as np
import orjson
import shapely
from shapely.geometry import Polygon

from ..evidence_polygons import finish_polygons

_NAMESPACE = uuid.UUID("5d6f1f8e-8d3c-4d52-9a55-6f0c1f4b6a01")


def object_id(slide_key: str, kind: str, key: int | str) -> str:
    """A deterministic UUID for object ``key`` (an index, or a text) of ``kind`` on the slide."""
    return object_ids(slide_key, kind, [key])[0]


def object_ids(slide_key: str, kind: str, keys: Iterable[int | str]) -> list[str]:
    """:func:`object_id` of each key: ``uuid.uuid5(_NAMESPACE, f"{slide_key}/{kind}/{key}")``,
    hashing the common prefix once (a third of the cost of a tile's record went to uuid5)."""
    prefix = hashlib.sha1(_NAMESPACE.bytes + f"{slide_key}/{kind}/".encode())
    out = []
    for key in keys:
        h = prefix.copy()
        h.update(str(key).encode())
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

    def copy_features(self, path: Path, count: int) -> None:
        """Append ``count`` features encoded elsewhere: the UTF-8 file ``path`` holds them joined by
        ``",\n"`` (:meth:`EvidenceEncoder.write`). Copied as bytes, never decoded: by the kernel
        where it can (``copy_file_range``; 500 MB in 0.16 s against 0.58 s through Python, 2-core VM)."""
        assert self._fh is not None
        if count:
            self._fh.write(",\n" if self.count else "")
            self._fh.flush()
            with open(path, "rb") as part:
                left = os.fstat(part.fileno()).st_size
                try:
                    while left > 0 and (copied := os.copy_file_range(part.fileno(), self._fh.fileno(), left)):
                        left -= copied
                except (AttributeError, OSError):  # not Linux, or not between these files
                    pass
                shutil.copyfileobj(part, self._fh.buffer, 1 << 20)  # what is left, if anything
            self._fh.seek(0, os.SEEK_END)  # past what the kernel wrote
            self.count += count

    def __exit__(self, *exc: object) -> None:
        assert self._fh is not None
        self._fh.write("\n]}\n")
        self._fh.close()


def encode(value: Any) -> str:
    """A feature (or any JSON value) as compact JSON."""
    return json.dumps(value, separators=(",", ":"))


def polygon_coordinates(polys: np.ndarray, ndigits: int = 1) -> list[list[np.ndarray]]:
    """Per shapely polygon, its GeoJSON rings (exterior first) as (n, 2) arrays rounded to
    ``ndigits`` (level-0 px), taken from all the polygons at once. Exteriors wind counter-clockwise
    and holes clockwise, as RFC 7946 asks and as the tiles' squares do; OpenCV's traced outlines
    come the other way round."""
    rings, owner = shapely.get_rings(shapely.orient_polygons(polys), return_index=True)
    coords, ring = shapely.get_coordinates(rings, return_index=True)
    coords = np.round(coords, ndigits)
    per_ring = np.split(coords, np.flatnonzero(np.diff(ring)) + 1) if len(coords) else []
    out: list[list[np.ndarray]] = [[] for _ in polys]
    for k, points in zip(owner.tolist(), per_ring):
        out[k].append(points)
    return out


Encoded = tuple[int, float, str]
"""An evidence polygon: class index, area in µm², its feature as JSON."""

_HEAD = '{"type":"Feature",'  # how an encoded feature starts; its id goes after this


def encode_evidence(classes: np.ndarray, geoms: np.ndarray, *, simplify_px: float, clip: Polygon | None,
                    class_names: list[str], colors: list[tuple[int, int, int]], mpp: float,
                    slide_key: str) -> list[Encoded]:
    """A batch of final polygons (shapely, or WKB from another process) finished by
    :func:`~wsi_medcam.evidence_polygons.finish_polygons` (``simplify_px``, ``clip``: level-0 px; one
    feature per part) and encoded as QuPath annotations; ``mpp``: the slide's µm/px. A feature's id
    is the :func:`object_id` of its JSON without the id: the same polygon gets the same id whatever
    process encodes it and wherever it lands in the file (distinct polygons of a class never have
    the same coordinates)."""
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
    ids = object_ids(slide_key, "evidence", [text for _, _, text in out])
    return [(c, area, f'{_HEAD}"id":"{fid}",{text[len(_HEAD):]}') for (c, area, text), fid in zip(out, ids)]


PerClass = dict[int, tuple[int, float]]
"""Per class index: (polygons, their area in µm²)."""


def _tally(per_class: PerClass, class_index: int, polygons: int, area: float) -> None:
    count, total = per_class.get(class_index, (0, 0.0))
    per_class[class_index] = (count + polygons, total + area)


def count_encoded(encoded: Iterable[Encoded], per_class: PerClass) -> list[str]:
    """The features' texts, with each counted into ``per_class`` (updated in place)."""
    texts = []
    for class_index, area, text in encoded:
        _tally(per_class, class_index, 1, area)
        texts.append(text)
    return texts


@dataclass
class EvidenceEncoder:
    """:func:`encode_evidence` with its options bound, picklable for other processes. :meth:`write`
    appends a batch to a *part file* of features joined by ``",\n"``, which
    :meth:`FeatureWriter.copy_features` copies into the GeoJSON as it is: the stitching processes
    encode their final polygons so while tiles stream, and what is left once the last tile is in
    is to copy bytes."""

    simplify_px: float
    clip: Polygon | None
    class_names: list[str]
    colors: list[tuple[int, int, int]]
    mpp: float
    slide_key: str
    per_class: PerClass = field(default_factory=dict)  # what :meth:`write` wrote

    def __call__(self, classes: np.ndarray, geoms: np.ndarray) -> list[Encoded]:
        return encode_evidence(classes, geoms, simplify_px=self.simplify_px, clip=self.clip, class_names=self.class_names,
                               colors=self.colors, mpp=self.mpp, slide_key=self.slide_key)

    def write(self, out: IO[bytes], classes: np.ndarray, geoms: np.ndarray) -> None:
        """Encode a batch of final polygons and append it to the part file ``out`` (at its end)."""
        if texts := count_encoded(self(classes, geoms), self.per_class):
            out.write(((",\n" if out.tell() else "") + ",\n".join(texts)).encode())


def write_evidence(path: Path, encoded: Iterable[Encoded], *, parts: Iterable[tuple[Path, PerClass]] = ()
                   ) -> tuple[int, PerClass]:
    """Evidence polygons as QuPath annotations: ``encoded``, then the features of each part file
    (:meth:`EvidenceEncoder.write`; with its polygons and area per class); returns how many were
    written and, per class index, (polygons, area µm²)."""
    per_class: PerClass = {}
    with FeatureWriter(path) as out:
        items = iter(encoded)
        while batch := list(itertools.islice(items, 1024)):
            out.write_all(count_encoded(batch, per_class))
        for part, counted in parts:
            out.copy_features(part, sum(n for n, _ in counted.values()))
            for class_index, (n, area) in counted.items():
                _tally(per_class, class_index, n, area)
        return out.count, per_class
