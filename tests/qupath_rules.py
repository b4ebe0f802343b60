"""An independent check of QuPath's GeoJSON import rules (from the field notes), for the tests."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

from shapely.geometry import LinearRing

OBJECT_TYPES = {"annotation", "detection", "tile", "cell"}


def check_qupath_geojson(path: Path, *, width: int, height: int) -> list[dict]:
    """Return the features after asserting every rule QuPath's parser applies, and GeoJSON's winding."""
    doc = json.loads(Path(path).read_text())
    assert doc["type"] == "FeatureCollection"
    ids = set()
    for feat in doc["features"]:
        assert feat["type"] == "Feature"
        uuid.UUID(feat["id"])  # QuPath drops ids that are not UUIDs
        ids.add(feat["id"])
        props = feat["properties"]
        assert props["objectType"] in OBJECT_TYPES
        assert "objectType" not in feat  # it belongs inside properties
        cls = props["classification"]
        assert isinstance(cls["name"], str) and cls["name"]
        assert len(cls["color"]) == 3 and all(isinstance(c, int) and 0 <= c <= 255 for c in cls["color"])
        assert all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in props["measurements"].values())
        geom = feat["geometry"]
        assert geom["type"] in {"Polygon", "MultiPolygon"}
        polygons = [geom["coordinates"]] if geom["type"] == "Polygon" else geom["coordinates"]
        for polygon in polygons:  # RFC 7946's winding: exterior counter-clockwise, holes clockwise
            assert [LinearRing(ring).is_ccw for ring in polygon] == [True] + [False] * (len(polygon) - 1)
        for ring in (r for p in polygons for r in p):
            assert ring[0] == ring[-1] and len(ring) >= 4
            for x, y in ring:  # level-0 pixel coordinates of this slide
                assert 0 <= x <= width and 0 <= y <= height
    assert len(ids) == len(doc["features"])
    return doc["features"]
