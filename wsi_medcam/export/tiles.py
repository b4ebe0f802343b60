"""Per-tile records, streamed as they come: ``tiles.csv`` and ``tiles.geojson`` (QuPath tiles)."""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np

from .geojson import FeatureWriter, classification, encode, object_ids


@dataclass(frozen=True)
class TileBatch:
    """A batch of tiles' outcomes: ``x``, ``y``, ``size`` in level-0 px, fractions 0–1.

    indices, x, y, tissue_fraction, predictions : (B,) arrays or lists.
    probs : (B, classes) probabilities.
    evidence_fraction : (B,) share of each tile that is hard evidence, or None without an explainer.
    kept : per certification fill, (B,) bool: does the tile's hard evidence alone keep the prediction.
    """

    indices: Sequence[int]
    x: Sequence[int]
    y: Sequence[int]
    size: float
    tissue_fraction: np.ndarray
    probs: np.ndarray
    predictions: np.ndarray
    evidence_fraction: np.ndarray | None
    kept: dict[str, np.ndarray]


class TileWriter:
    """Writes each :class:`TileBatch` to the CSV and the GeoJSON at once; a context manager.
    ``extent``: the slide's level-0 (width, height), px.

    It runs beside the models in the model process, one row and one feature per tile, so it is
    written for speed: values leave numpy once per batch, and each feature is filled into a
    template of its constant parts rather than built as a dict and encoded (the same bytes as
    :func:`~.geojson.encode` of :func:`~.geojson.feature`, a test checks; ~240 -> ~25 µs a tile
    on the 2-core VM, where the model process's GIL limits a GPU's pace).
    """

    def __init__(self, csv_path: Path, geojson_path: Path, *, slide_key: str, extent: tuple[int, int],
                 class_names: list[str], colors: list[tuple[int, int, int]], certify_fills: tuple[str, ...] = ()):
        self.csv_path, self.geojson_path = Path(csv_path), Path(geojson_path)
        self.extent = extent
        self.slide_key = slide_key
        self.class_names = class_names
        self.certify_fills = certify_fills
        self._classification = [encode(classification(n, c)) for n, c in zip(class_names, colors)]
        self._prob_keys = [encode(f"prob {n}") for n in class_names]
        self._kept_keys = [encode(f"evidence keeps class ({f} fill)") for f in certify_fills]
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

    def write(self, batch: TileBatch) -> None:
        n = len(batch.indices)
        indices = [int(i) for i in batch.indices]
        probs = np.asarray(batch.probs, np.float64).tolist()
        preds = np.asarray(batch.predictions).tolist()
        tissue = np.asarray(batch.tissue_fraction, np.float64).tolist()
        evidence = [None] * n if batch.evidence_fraction is None else np.asarray(batch.evidence_fraction, np.float64).tolist()
        kept = [[f in batch.kept and bool(batch.kept[f][k]) for f in self.certify_fills] for k in range(n)]
        size = float(batch.size)
        width, height = map(float, self.extent)
        ids = object_ids(self.slide_key, "tile", indices)
        rows, features = [], []
        for k in range(n):
            x, y, pred = int(batch.x[k]), int(batch.y[k]), preds[k]
            rows.append([indices[k], x, y, round(size, 2), f"{tissue[k]:.4f}", *[f"{p:.5f}" for p in probs[k]],
                         self.class_names[pred], "" if evidence[k] is None else f"{evidence[k]:.4f}",
                         *[int(v) if f in batch.kept else "" for f, v in zip(self.certify_fills, kept[k])]])
            measurements = [f"{key}:{_number(p)}" for key, p in zip(self._prob_keys, probs[k])]
            measurements.append(f'"tissue fraction":{_number(tissue[k])}')
            if evidence[k] is not None:
                measurements.append(f'"evidence fraction":{_number(evidence[k])}')
            measurements += [f"{key}:{_number(float(v))}" for f, key, v in zip(self.certify_fills, self._kept_keys, kept[k])
                             if f in batch.kept]
            # the square cut to the slide, as the evidence polygons are, and as QuPath cuts its own
            # tiles; the CSV keeps the whole square read (a last row or column may overhang)
            x1, y1 = min(x + size, width), min(y + size, height)
            ring = f"[{x},{y}],[{_number(x1)},{y}],[{_number(x1)},{_number(y1)}],[{x},{_number(y1)}],[{x},{y}]"
            features.append(f'{{"type":"Feature","id":"{ids[k]}","geometry":{{"type":"Polygon","coordinates":[[{ring}]]}},'
                            f'"properties":{{"objectType":"tile","classification":{self._classification[pred]},'
                            f'"isLocked":true,"measurements":{{{",".join(measurements)}}}}}}}')
        self._csv.writerows(rows)
        self._geo.write_all(features)


def write_tile_batches(receive: Connection, csv_path: Path, geojson_path: Path, writer: dict[str, Any]) -> None:
    """A :class:`TileWriter` (``writer``: its keyword arguments) fed the :class:`TileBatch` objects
    received until None: in a process of its own beside a GPU's models, whose process would spend
    ~25 µs of its GIL per tile on the records otherwise (at 5,400 tiles/s, ~13 % of it)."""
    with TileWriter(csv_path, geojson_path, **writer) as out:
        while (batch := receive.recv()) is not None:
            out.write(batch)


def _number(value: float) -> str:
    """A float as :func:`json.dumps` writes it."""
    return repr(value) if math.isfinite(value) else encode(value)
