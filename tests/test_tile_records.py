"""tiles.csv and tiles.geojson: the batch writer's template against the generic feature encoder."""

from __future__ import annotations

import csv
import json
import uuid

import numpy as np
import pytest

from wsi_medcam.export.geojson import _NAMESPACE, encode, feature, object_id, object_ids
from wsi_medcam.export.tiles import TileBatch

CLASSES = ["tumour", "stroma µ", 'odd "name"']  # non-ASCII and quotes: JSON escapes them
COLORS = [(200, 0, 0), (0, 150, 0), (0, 0, 255)]


def test_object_ids_are_uuid5_of_slide_kind_and_index():
    got = object_ids("slide.svs:0123456789ab", "tile", [0, 7, 12345])
    want = [str(uuid.uuid5(_NAMESPACE, f"slide.svs:0123456789ab/tile/{i}")) for i in (0, 7, 12345)]
    assert got == want
    assert object_id("a", "evidence", 3) == str(uuid.uuid5(_NAMESPACE, "a/evidence/3"))


EXTENT = (90_100, 90_200)  # level-0 px: ~1 in 20 tiles of :func:`_batches` overhang it


def _reference(slide_key, batch, fills):
    """Rows and features as the writer made them one tile at a time, from dicts; the squares cut to
    :data:`EXTENT` in the GeoJSON, whole in the CSV."""
    rows, feats = [], []
    for k, i in enumerate(batch.indices):
        probs, pred = batch.probs[k], int(batch.predictions[k])
        evidence = None if batch.evidence_fraction is None else float(batch.evidence_fraction[k])
        kept = {f: bool(v[k]) for f, v in batch.kept.items()}
        rows.append([str(i), str(batch.x[k]), str(batch.y[k]), str(round(batch.size, 2)), f"{batch.tissue_fraction[k]:.4f}",
                     *[f"{p:.5f}" for p in probs], CLASSES[pred], "" if evidence is None else f"{evidence:.4f}",
                     *[str(int(kept[f])) if f in kept else "" for f in fills]])
        measurements = {f"prob {n}": float(p) for n, p in zip(CLASSES, probs)}
        measurements["tissue fraction"] = float(batch.tissue_fraction[k])
        if evidence is not None:
            measurements["evidence fraction"] = evidence
        for f, v in kept.items():
            measurements[f"evidence keeps class ({f} fill)"] = float(v)
        x, y, s = batch.x[k], batch.y[k], batch.size
        x1, y1 = min(x + s, float(EXTENT[0])), min(y + s, float(EXTENT[1]))
        ring = [[x, y], [x1, y], [x1, y1], [x, y1], [x, y]]
        feats.append(encode(feature({"type": "Polygon", "coordinates": [ring]}, fid=object_id(slide_key, "tile", i),
                                    object_type="tile", name=CLASSES[pred], color=COLORS[pred], measurements=measurements)))
    return rows, feats


def _batches(rng, sizes=((5, True), (1, False), (300, True))):
    batches = []
    for n, with_evidence in sizes:
        probs = rng.dirichlet([1, 1, 1], n).astype(np.float32)
        batches.append(TileBatch(
            indices=rng.permutation(10_000)[:n], x=rng.integers(80_000, 90_000, n).tolist(), y=rng.integers(80_000, 90_000, n).tolist(),
            size=224 * 1.9871, tissue_fraction=rng.random(n), probs=probs, predictions=probs.argmax(1),
            evidence_fraction=rng.random(n) / 7 if with_evidence else None,
            kept={"mean": rng.random(n) < 0.5} if with_evidence else {}))
    return batches


@pytest.mark.parametrize("own_process", [False, True])
def test_batches_write_the_bytes_of_the_feature_encoder(tmp_path, own_process):
    """Written here, or (with stitching processes, on a GPU) by a process of their own fed through a
    pipe: the same bytes."""
    from wsi_medcam.pipeline import tile_records

    rng = np.random.default_rng(0)
    fills = ("mean", "white")
    batches = _batches(rng)
    csv_path, geo_path = tmp_path / "tiles.csv", tmp_path / "tiles.geojson"
    with tile_records(tmp_path, own_process, slide_key="s:1", extent=EXTENT, class_names=CLASSES, colors=COLORS,
                      certify_fills=fills) as write:
        for b in batches:
            write(b)
    want_rows, want_feats = [], []
    for b in batches:
        rows, feats = _reference("s:1", b, fills)
        want_rows += rows
        want_feats += feats
    got_rows = list(csv.reader(open(csv_path, newline="")))
    assert got_rows[0][:5] == ["tile", "x", "y", "size", "tissue_fraction"]
    assert got_rows[1:] == want_rows
    text = geo_path.read_text()
    assert text == '{"type": "FeatureCollection", "features": [\n' + ",\n".join(want_feats) + "\n]}\n"
    features = json.loads(text)["features"]
    assert len(features) == 306
    # the last row's and column's squares overhang the slide (the CSV's x + size): cut to it here
    overhang = [k for b in batches for k in range(len(b.indices)) if max(b.x[k] - EXTENT[0], b.y[k] - EXTENT[1]) > -b.size]
    assert overhang and max(x for f in features for x, _ in f["geometry"]["coordinates"][0]) == EXTENT[0]
    assert max(y for f in features for _, y in f["geometry"]["coordinates"][0]) == EXTENT[1]


def test_evidence_features_hold_each_polygon_rounded_with_its_measurements(tmp_path):
    """Evidence polygons (holes, several parts once clipped, WKB from another process) come back
    from the written file, parsed as JSON, as the polygons simplified and clipped, coordinates
    within the 0.05 px of their rounding, area and perimeter in µm; names in UTF-8 as written."""
    import json

    import shapely
    from shapely.geometry import Polygon, box, shape

    from wsi_medcam.export.geojson import EvidenceEncoder, encode_evidence, write_evidence
    from wsi_medcam.evidence_polygons import finish_polygons

    ring = Polygon([(0, 0), (40.3, 0), (40.3, 30), (0, 30)], [[(10, 10), (20, 10), (20, 20), (10, 20)]])
    bar = Polygon([(50, 5), (130.25, 5), (130.25, 7.75), (50, 7.75)])  # cut in two by the clip's notch
    clip = box(0, 0, 120, 100).difference(box(80, 0, 90, 8))
    geoms = np.array([ring, bar, box(3, 40, 4, 41)], dtype=object)
    classes = np.array([2, 0, 1])
    mpp = 0.25
    options = {"simplify_px": 0.5, "clip": clip, "class_names": CLASSES, "colors": [(1, 2, 3), (4, 5, 6), (7, 8, 9)],
               "mpp": mpp, "slide_key": "s"}
    encoded = encode_evidence(classes, shapely.to_wkb(geoms), **options)
    count, per_class = write_evidence(tmp_path / "e.geojson", encoded)
    text = (tmp_path / "e.geojson").read_bytes().decode("utf-8")
    # the same features, the last two polygons encoded into part files (as stitching processes do)
    encoders = [EvidenceEncoder(**options), EvidenceEncoder(**options)]
    for k, encoder in enumerate(encoders):
        with open(tmp_path / f"part{k}", "wb") as part:
            encoder.write(part, classes[k + 1 : k + 2], geoms[k + 1 : k + 2])
    parts = [(tmp_path / f"part{k}", e.per_class) for k, e in enumerate(encoders)]
    assert write_evidence(tmp_path / "p.geojson", encode_evidence(classes[:1], geoms[:1], **options), parts=parts) \
        == (count, per_class)
    assert (tmp_path / "p.geojson").read_bytes() == text.encode("utf-8")
    assert "stroma µ" in text and 'odd \\"name\\"' in text
    features = json.loads(text)["features"]
    want = list(finish_polygons(classes, geoms, 0.5, clip))
    assert count == len(features) == len(want) == 4  # the bar in two parts
    for feat, (class_index, poly) in zip(features, want):
        got = shape(feat["geometry"])
        assert feat["properties"]["classification"]["name"] == CLASSES[class_index]
        assert len(feat["geometry"]["coordinates"]) == 1 + len(poly.interiors)
        assert shapely.hausdorff_distance(got, poly) <= 0.05 + 1e-9 and got.symmetric_difference(poly).area < 0.05 * poly.length
        m = feat["properties"]["measurements"]
        assert m["Area µm^2"] == pytest.approx(poly.area * mpp**2) and m["Perimeter µm"] == pytest.approx(poly.length * mpp)
    assert per_class[2] == (1, pytest.approx(want[0][1].area * mpp**2))
    # a feature's id is the uuid5 of its text without the id (one feature per line)
    lines = [line.removesuffix(",") for line in text.splitlines()[1:-1]]
    ids = [feat["id"] for feat in features]
    assert len(lines) == 4 and len(set(ids)) == 4
    assert ids == [object_id("s", "evidence", line.replace(f'"id":"{fid}",', "", 1)) for line, fid in zip(lines, ids)]


def test_a_killed_tile_records_process_fails_the_slide_in_one_line(tmp_path):
    """The records' own process killed mid-slide (the OOM killer's way): the next batch fails the
    slide with one OutputError line, not a broken pipe."""
    import multiprocessing
    import os
    import signal

    from wsi_medcam.errors import OutputError
    from wsi_medcam.pipeline import tile_records

    if not hasattr(signal, "SIGKILL"):
        pytest.skip("no SIGKILL on this platform")
    batches = _batches(np.random.default_rng(1), sizes=((50, True),) * 40)
    with pytest.raises(OutputError, match=r"^writing tiles.csv and tiles.geojson failed in process wsi-medcam-tiles "
                                          r"\(exit code -9\)$"):
        with tile_records(tmp_path, True, slide_key="s:1", extent=EXTENT, class_names=CLASSES, colors=COLORS) as write:
            write(batches[0])
            proc, = [p for p in multiprocessing.active_children() if p.name == "wsi-medcam-tiles"]
            os.kill(proc.pid, signal.SIGKILL)
            proc.join()
            for b in batches[1:]:
                write(b)
    assert not [p for p in multiprocessing.active_children() if p.name == "wsi-medcam-tiles"]
