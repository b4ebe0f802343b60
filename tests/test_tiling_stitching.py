"""Tile grid and the streaming stitcher, checked against dense reference computations."""

from __future__ import annotations

import numpy as np
from scipy import ndimage
import pytest

from wsi_medcam.config import TilingConfig
from wsi_medcam.export.ome_zarr import _halve_mean, _halve_nearest
from wsi_medcam.evidence_polygons import _group_firsts, _merge_touching, _simplify
from wsi_medcam.stitching import EvidenceStitcher
from wsi_medcam.tracing import trace_labels
from wsi_medcam.tiling import plan_tiles

from conftest import needs_data


def test_grid_covers_slide_and_keeps_tissue_tiles():
    tissue = np.zeros((100, 150), bool)  # mask at 20 level-0 px per mask px
    tissue[10:50, 20:80] = True
    grid = plan_tiles((3000, 2000), 2.0, tissue, TilingConfig(min_tissue=0.5), mpp=0.5, tile_size=100)
    # canvas = 1500 × 1000 px; 100 px tiles → 15 × 10 grid
    assert grid.grid_shape == (10, 15)
    assert np.all(np.diff(grid.rows.astype(int) * 1000 + grid.cols) > 0)  # row-major order
    for r, c, f in zip(grid.rows, grid.cols, grid.tissue_fraction):
        # tile covers level-0 [c*200, c*200+200) = mask cols [c*10, c*10+10)
        expected = tissue[r * 10 : r * 10 + 10, c * 10 : c * 10 + 10].mean()
        assert f == pytest.approx(expected)
        assert f >= 0.5
    all_fracs = [tissue[r * 10 : r * 10 + 10, c * 10 : c * 10 + 10].mean() for r in range(10) for c in range(15)]
    assert len(grid) == sum(f >= 0.5 for f in all_fracs)
    assert grid.xy_level0(0) == (int(grid.cols[0]) * 200, int(grid.rows[0]) * 200)


@pytest.mark.parametrize("downsample", [2.0, 1.5, 0.5 / 0.2527, 1.002])
def test_a_batch_of_tiles_has_each_tiles_level0_origin(downsample):
    """The model process places a batch's tile records by :meth:`TileGrid.origins_level0`; each
    must be where :meth:`TileGrid.xy_level0`, which the readers read from, puts that tile (1.5:
    products ending in .5, rounded half to even by both)."""
    tissue = np.ones((40, 40), bool)
    grid = plan_tiles((4001, 3003), downsample, tissue, TilingConfig(overlap=7, min_tissue=0.0), mpp=0.5, tile_size=33)
    indices = np.random.default_rng(0).permutation(len(grid))[:500]
    x, y = grid.origins_level0(indices)
    assert x.dtype == y.dtype == np.int64
    assert list(zip(x.tolist(), y.tolist())) == [grid.xy_level0(int(i)) for i in indices]


def test_overlap_and_overhanging_last_tile():
    tissue = np.ones((10, 10), bool)
    grid = plan_tiles((1000, 1000), 1.0, tissue, TilingConfig(overlap=24, min_tissue=0.0), mpp=0.5, tile_size=224)
    assert grid.stride == 200
    # tiles start at 0, 200, ... 800; the last one overhangs the 1000 px slide
    assert grid.grid_shape == (5, 5)
    assert grid.canvas_shape == (1024, 1024)
    with pytest.raises(ValueError):
        plan_tiles((1000, 1000), 1.0, tissue, TilingConfig(overlap=224), mpp=0.5, tile_size=224)


def test_overlapping_tiles_measure_tissue_over_their_whole_footprint():
    """With overlap each tile's fraction is its tissue over its own tile_size² footprint (not the
    stride's), the overhanging last column and row counting the missing part as background; tiles at
    exactly ``min_tissue`` are kept (>=, as TilingConfig documents). Brute force by slicing the mask."""
    # level-0 3000 × 2100 at downsample 2 → canvas 1500 × 1050 px; mask 150 × 105 px: 0.1 mask px per
    # canvas px, so a 100 px tile is 10 mask px and the 60 px stride 6 (footprints overlap by 4 px)
    rng = np.random.default_rng(7)
    tissue = ndimage.binary_opening(rng.random((105, 150)) < 0.45)  # blobs, not aligned with the grid
    tissue[18:28, 0:10] = False  # tile (row 3, col 0) reads mask rows 18:28, cols 0:10 ...
    tissue[18:23, 0:5] = True  # ... exactly 25 of its 100 px are tissue: the boundary tile
    tile, stride, step, min_tissue = 100, 60, 6, 0.25
    grid = plan_tiles((3000, 2100), 2.0, tissue, TilingConfig(overlap=tile - stride, min_tissue=min_tissue),
                      mpp=0.5, tile_size=tile)
    # ceil((1050 - 100) / 60) + 1 = 17 rows, ceil((1500 - 100) / 60) + 1 = 25 columns, the last ones overhanging
    assert grid.stride == stride and grid.grid_shape == (17, 25)
    expected = np.array([[tissue[r * step : r * step + 10, c * step : c * step + 10].sum() / 100 for c in range(25)]
                         for r in range(17)])
    assert expected[3, 0] == min_tissue
    assert expected[:, -1].max() > 0 and expected[-1].max() > 0  # the overhanging tiles are in the check
    kept = {(int(r), int(c)) for r, c in zip(grid.rows, grid.cols)}
    assert kept == {(int(r), int(c)) for r, c in zip(*np.nonzero(expected >= min_tissue))}
    assert (3, 0) in kept
    assert 0 < len(kept) < expected.size
    np.testing.assert_allclose(grid.tissue_fraction, expected[grid.rows, grid.cols], atol=1e-6)


def test_slide_smaller_than_a_tile_gives_no_tile():
    grid = plan_tiles((16, 16), 1.0, np.ones((2, 2), bool), TilingConfig(), mpp=0.5, tile_size=224)
    assert grid.grid_shape == (1, 1) and len(grid) == 0


class _Collect:
    def __init__(self, shape, chunk):
        self.shape, self.chunk = shape, chunk
        self.evidence = np.zeros(shape, np.uint8)
        self.labels = np.zeros(shape, np.uint8)
        self.writes = []
        self.halves = 0
        self.complete = np.zeros(-(-shape[1] // chunk), int)  # final chunk rows per chunk column

    def rows_complete(self, rows, cols):
        assert (rows >= self.complete[cols[0] : cols[1]]).all()
        self.complete[cols[0] : cols[1]] = rows

    def write(self, y, x, evidence, labels, half=None):
        assert (y, x) not in self.writes, "a chunk was written twice"
        if half is not None:  # given for free: it must be what the store would compute
            self.halves += 1
            np.testing.assert_array_equal(half[0], _halve_mean(evidence))
            if labels.any():
                np.testing.assert_array_equal(half[1], _halve_nearest(labels))
            else:
                assert half[1] is None
        assert y // self.chunk >= self.complete[x // self.chunk], "a chunk announced complete was written again"
        self.writes.append((y, x))
        h, w = evidence.shape
        self.evidence[y : y + h, x : x + w] = evidence
        self.labels[y : y + h, x : x + w] = labels


@pytest.mark.parametrize("downsample,out_scale,overlap,tracers,strip_px", [
    (2.0, 1.0, 0, 0, 4096), (2.0, 1.0, 16, 0, 4096), (1.002, 1.0, 0, 0, 4096), (2.0, 0.25, 8, 0, 4096),
    (2.0, 1.0, 16, 2, 4096),
    (2.0, 1.0, 16, 0, 60), (1.002, 1.0, 0, 2, 100), (2.0, 0.25, 8, 0, 30), (1.37, 1.0, 40, 0, 40),
    (4.0, 1.0, 12, 0, 4096), (4.0, 1.0, 0, 0, 50),
])
def test_stitcher_matches_dense_reference(downsample, out_scale, overlap, tracers, strip_px, tmp_path):
    """Against a dense canvas: one strip or several (narrower than a tile, too), in-thread tracing,
    and tracing in 2 worker processes (the default from 8 cores). Where level 0 repeats each canvas
    px an even number of times (downsample × out_scale = 2 or 4), the stitcher hands every chunk's
    half to the writer, which checks it against the store's own halving."""
    rng = np.random.default_rng(0)
    tile = 64
    width0, height0 = 700, 500
    tissue = rng.random((25, 35)) > 0.3
    grid = plan_tiles((width0, height0), downsample, tissue, TilingConfig(overlap=overlap, min_tissue=0.2),
                      mpp=0.5, tile_size=tile)
    out_shape = (round(height0 * out_scale), round(width0 * out_scale))
    writer = _Collect(out_shape, chunk=96)
    stitcher = EvidenceStitcher(grid, writer, block=40, spool_dir=tmp_path, threads=2, tracers=tracers, trace_blocks=3,
                                strip_px=strip_px)
    stitcher.polygons.flush_every = 16  # small batches: final polygons go through the spool file
    order = stitcher.order()
    assert sorted(order) == list(range(len(grid)))
    strips = len(stitcher._strips)
    assert (strips > 1) == (strip_px < 4096), strips

    ch, cw = grid.canvas_shape
    total = np.zeros((ch, cw), np.int64); weight = np.zeros((ch, cw), np.int64); label = np.zeros((ch, cw), np.uint8)
    score = np.zeros((ch, cw))
    for k, i in enumerate(order):
        soft = rng.random((tile, tile)).astype(np.float32)
        cls, conf = int(rng.integers(3)), float(rng.random())
        # floats in [0, 1] or uint8 levels: the stitcher takes either
        stitcher.add(i, soft if k % 2 else np.rint(soft * 255).astype(np.uint8), cls, conf)
        x, y = grid.xy_canvas(i)
        sl = (slice(y, y + tile), slice(x, x + tile))
        total[sl] += np.rint(soft * 255).astype(np.int64); weight[sl] += 1  # float32, as the models round
        conf_q = 1 + round(conf * 65534)  # the stitcher keeps confidences as uint16
        better = score[sl] < conf_q
        label[sl] = np.where(better, cls + 1, label[sl]); score[sl] = np.where(better, conf_q, score[sl])
    stitcher.finish()
    assert (writer.complete == -(-out_shape[0] // writer.chunk)).all(), "every chunk row is announced complete"
    assert writer.halves == (len(writer.writes) if downsample * out_scale in (2.0, 4.0) else 0)

    # each tile's levels round(255 · soft), their mean rounded half up; hard from 0.5 (level 127.5)
    mean = np.floor(np.divide(total, weight, out=np.zeros(total.shape), where=weight > 0) + 0.5).astype(np.uint8)
    fy = height0 / out_shape[0] / downsample
    fx = width0 / out_shape[1] / downsample
    rows = np.floor((np.arange(out_shape[0]) + 0.5) * fy).astype(int)
    cols = np.floor((np.arange(out_shape[1]) + 0.5) * fx).astype(int)
    ref = mean[np.ix_(rows, cols)]
    ref_label = np.where(ref >= 128, label[np.ix_(rows, cols)], 0)
    np.testing.assert_array_equal(writer.evidence, ref)
    np.testing.assert_array_equal(writer.labels, ref_label)
    # no evidence outside the tiles
    covered = weight[np.ix_(rows, cols)] > 0
    assert not writer.evidence[~covered].any()
    # polygons: total area equals the hard-mask area on the canvas (level-0 px²)
    hard = (2 * total >= 255 * weight) & (weight > 0)
    polygons = list(stitcher.polygons.merged())
    assert sum(p.area for _, p in polygons) == pytest.approx(hard.sum() * downsample**2, rel=1e-6)
    # merged across blocks and rows: one polygon per 4-connected region of each class
    for c in range(3):
        regions = ndimage.label(hard & (label == c + 1))[1]
        assert sum(k == c for k, _ in polygons) == regions, f"class {c}"


def _assert_traced_as_gdal(label: np.ndarray, x0: int = 0, y0: int = 0, scale: float = 1.0, *,
                           open_left: bool = True, open_right: bool = True) -> int:
    """``trace_labels`` gives exactly the polygons GDAL's polygonize traces (rasterio, 4-connected: the
    reference), valid, at the span's offset and scale, with the right border flags; their count."""
    import shapely
    from rasterio import features
    from shapely.affinity import affine_transform
    from shapely.geometry import shape

    h, w = label.shape
    got = list(zip(*trace_labels(label, x0, y0, scale, open_left=open_left, open_right=open_right)))
    want = [(int(v), affine_transform(shape(g), [scale, 0, 0, scale, x0 * scale, y0 * scale]))
            for g, v in features.shapes(label, mask=label > 0, connectivity=4)]
    assert len(got) == len(want)
    key = lambda item: (item[0], *shapely.bounds(item[1]), item[1].area)  # noqa: E731
    for (v, poly, on_border), (wv, wpoly) in zip(sorted(got, key=key), sorted(want, key=key)):
        assert v == wv and poly.is_valid and poly.equals(wpoly) and poly.area == wpoly.area
        bx0, by0, bx1, by1 = (np.array(wpoly.bounds) / scale) - [x0, y0, x0, y0]
        assert on_border == (by0 <= 0 or by1 >= h or (open_left and bx0 <= 0) or (open_right and bx1 >= w))
    return len(want)


@pytest.mark.parametrize("fill", [0.002, 0.05, 0.6])
def test_tracing_only_the_lines_with_evidence_gives_the_polygons_of_the_whole_span(fill):
    """Sparse evidence is traced on its rows and columns with one empty line per gap; the polygons
    (holes, specks touching diagonally, regions on the span's edges) must be exactly those GDAL
    traces on the whole span, at the span's offset and scale."""
    rng = np.random.default_rng(7)
    label = np.zeros((96, 700), np.uint8)
    for _ in range(40):  # blobs of 3 classes, some with holes, some on the edges
        y, x, r = rng.integers(0, 96), rng.integers(0, 700), rng.integers(1, 9)
        yy, xx = np.ogrid[:96, :700]
        d = (yy - y) ** 2 + (xx - x) ** 2
        label[(d <= r * r) & (d >= (r // 2) ** 2 * (r > 5))] = rng.integers(1, 4)
    label *= rng.random(label.shape) < fill / max(1e-9, (label > 0).mean()) if fill < 0.5 else 1
    label[10, 3] = label[11, 4] = 2  # diagonal specks: two regions under 4-connectivity
    assert _assert_traced_as_gdal(label, 1234, 567, 2.0, open_left=False, open_right=True) > 2


def test_regions_touching_at_corners_are_traced_as_gdal_traces_them():
    """OpenCV traces 8-connected regions; GDAL's are 4-connected. Where regions meet only at a
    corner they must come out apart (and a region meeting *itself* at a corner must close a hole
    there), also in a checkerboard, a diagonal line of specks, and rings touching blobs."""
    checker = (np.indices((9, 12)).sum(0) % 2).astype(np.uint8)
    assert _assert_traced_as_gdal(checker) == checker.sum()
    diagonal = np.eye(15, dtype=np.uint8)
    assert _assert_traced_as_gdal(diagonal) == 15
    hook = np.array([[1, 1, 1, 1, 0],  # a ring closing on itself at a corner (a pinched hole), and a
                     [1, 0, 0, 1, 0],  # speck touching it at another corner
                     [1, 1, 1, 0, 0],
                     [0, 0, 0, 1, 0]], np.uint8)
    assert _assert_traced_as_gdal(np.pad(hook, 1)) == _assert_traced_as_gdal(hook) == 2
    classes = checker * (1 + np.indices(checker.shape)[1] % 3).astype(np.uint8)  # three classes at corners
    _assert_traced_as_gdal(classes)


@pytest.mark.parametrize("seed", range(6))
def test_random_masks_are_traced_as_gdal_traces_them(seed):
    """Speckle and blobs of one or three classes, any density and shape (one row, one column)."""
    rng = np.random.default_rng(seed)
    for _ in range(40):
        h, w = rng.integers(1, 50, 2)
        noise = ndimage.gaussian_filter(rng.random((h, w)), rng.choice([0.0, 0.7, 1.5, 3.0]))
        label = (noise > np.quantile(noise, rng.random())).astype(np.uint8)
        if rng.random() < 0.5:  # three classes, in patches or per pixel
            per = rng.integers(1, 4, (h, w)) if rng.random() < 0.5 else 1 + (np.indices((h, w))[1] * 3 // w)
            label = (label * per).astype(np.uint8)
        _assert_traced_as_gdal(label, int(rng.integers(-50, 50)), int(rng.integers(0, 50)), float(rng.choice([1.0, 2.0, 4.0])),
                               open_left=bool(rng.random() < 0.5), open_right=bool(rng.random() < 0.5))


@needs_data
@pytest.mark.parametrize("sigma", [1.0, 4.0])
def test_evidence_from_a_real_slide_is_traced_as_gdal_traces_it(cmu_pixels, sigma):
    """Hard masks shaped like Med-CAM's evidence on real H&E (the darkest, haematoxylin-rich 20 %
    of CMU-1-Small-Region, as blobs of nuclei or of glands), three classes by 224-px tile."""
    grey = ndimage.gaussian_filter(cmu_pixels[800:1312, 600:2000].mean(2), sigma)  # tissue, little background
    hard = grey < np.quantile(grey, 0.2)
    tiles = np.random.default_rng(0).integers(1, 4, (512 // 224 + 1, 1400 // 224 + 1))
    label = (hard * np.kron(tiles, np.ones((224, 224), int))[:512, :1400]).astype(np.uint8)
    assert _assert_traced_as_gdal(label, 0, 256, 2.0) > 50


@pytest.mark.parametrize("seed", range(4))
def test_touching_pieces_are_grouped_and_dissolved_as_connected_components(seed):
    """Pieces (random squares, some in long chains) fall into the groups that a breadth-first search
    over every touching pair finds; each group is dissolved into its union, the groups in the order
    of their first piece. The first ``merged`` pieces, known apart, are not looked up among themselves."""
    import shapely
    from shapely.geometry import box

    rng = np.random.default_rng(seed)
    xy = rng.integers(0, 60, (80, 2))
    xy[:12] = np.column_stack((np.arange(12) * 3, np.full(12, 70)))  # a chain of 12 touching squares
    pieces = np.array([box(x, y, x + 3, y + 3) for x, y in rng.permutation(xy)], dtype=object)
    touch = shapely.intersects(pieces[:, None], pieces[None, :])
    groups, seen = [], set()
    for i in range(len(pieces)):  # in order of the first piece
        if i in seen:
            continue
        group, todo = {i}, [i]
        while todo:
            for j in np.flatnonzero(touch[todo.pop()]).tolist():
                if j not in group:
                    group.add(j)
                    todo.append(j)
        seen |= group
        groups.append(sorted(group))
    assert max(map(len, groups)) >= 12 and min(map(len, groups)) == 1
    first = _group_firsts(pieces)
    for g in groups:
        assert (first[g] == g[0]).all()
    merged = _merge_touching(pieces)
    # squares touching only at a corner union into several polygons, each its own piece
    expected = [part for g in groups for part in shapely.get_parts(shapely.union_all(pieces[g]))]
    assert len(merged) == len(expected)
    assert all(shapely.equals(m, e) for m, e in zip(merged, expected))
    # pieces already merged (the first k, apart from each other) are looked up only against the rest
    apart = np.array([shapely.union_all(pieces[g]) for g in groups], dtype=object)
    k = len(apart)
    more = np.concatenate([apart, pieces[:5]])
    first = _group_firsts(more, merged=k)
    assert (first[:k] <= np.arange(k)).all() and (first[k:] <= np.arange(k, k + 5)).all()
    assert len(set(first.tolist())) == k  # each new piece lies within (touches) one merged polygon


def test_simplified_polygons_stay_valid_and_keep_every_speck():
    """Traced speckle (1-px specks and lines, blobs) simplified within 1 px (the pipeline uses half
    a canvas px): plain Douglas-Peucker empties the small ones, which must come back
    (topology-preserving) instead of vanishing; every polygon stays valid, within the tolerance of
    its traced area, with fewer vertices overall."""
    import shapely

    rng = np.random.default_rng(3)
    hard = (ndimage.gaussian_filter(rng.random((160, 160)), 1.0) > 0.5).astype(np.uint8)
    traced = trace_labels(hard, 0, 0, 1.0)[1]
    assert len(traced) > 50
    plain = shapely.simplify(traced, 1.0, preserve_topology=False)
    assert shapely.is_empty(plain).any(), "no speck here that plain Douglas-Peucker would drop"
    out = _simplify(traced, 1.0)
    assert not shapely.is_empty(out).any() and shapely.is_valid(out).all()
    # each area moves by at most the tolerance along its boundary
    assert (np.abs(shapely.area(out) - shapely.area(traced)) <= 1.0 * shapely.length(traced)).all()
    assert shapely.get_num_coordinates(out).sum() < shapely.get_num_coordinates(traced).sum()
    assert sum(p.area for p in traced) == hard.sum()


@pytest.mark.parametrize("strip", [None, 1, 2])
def test_store_pyramid_built_while_streaming_equals_a_dense_2x2_mean(strip, tmp_path):
    """Rows announced complete grow the pyramid during streaming, across the whole width or strip by
    strip (``strip`` chunk columns), from the halves kept as chunks are written (nothing is read
    back); a patch afterwards (here one that clears a region) is redone above it. Each level must
    equal a dense 2×2 mean (labels: top-left)."""
    import zarr

    from wsi_medcam.export.ome_zarr import EvidenceStore

    rng = np.random.default_rng(1)
    h, w, chunk = 700, 900, 128
    evidence = np.zeros((h, w), np.uint8)
    for _ in range(25):  # blobs, leaving whole chunks empty
        y, x, r = rng.integers(0, h), rng.integers(0, w), rng.integers(10, 60)
        yy, xx = np.ogrid[:h, :w]
        evidence[(yy - y) ** 2 + (xx - x) ** 2 < r * r] = rng.integers(1, 256)
    labels = np.where(evidence >= 128, 2, 0).astype(np.uint8)
    store = EvidenceStore(tmp_path / "e.ome.zarr", shape=(h, w), mpp=0.25, chunk=chunk, min_size=64,
                          class_names=["a", "b"], colors=[(255, 0, 0), (0, 255, 0)], name="t")
    n_cols = -(-w // chunk)
    for c0 in range(0, n_cols, strip or n_cols):
        c1 = min(c0 + (strip or n_cols), n_cols)
        for cy in range(0, h, chunk):
            for cx in range(c0 * chunk, min(c1 * chunk, w), chunk):
                block = evidence[cy : cy + chunk, cx : cx + chunk]
                if block.any():
                    store.write(cy, cx, block, labels[cy : cy + chunk, cx : cx + chunk])
            store.rows_complete(cy // chunk + 1, (c0, c1))
    if strip:  # the first strips' columns reached the top levels before finalize
        assert store._complete[-1].min() == store._rows(len(store.shapes) - 1)
    assert not any(store._halves), "every chunk's half was used once its parent was final"
    cut = np.s_[20:600, 30:560]  # refinement-style patch after streaming: unaligned, clearing whole parents
    evidence[cut] = 0
    labels[cut] = 0
    store.patch(20, 30, evidence[cut], labels[cut])
    store.finalize({})
    root = zarr.open_group(str(tmp_path / "e.ome.zarr"), mode="r")
    ref_e, ref_l = evidence.astype(np.int64), labels
    assert len(store.shapes) >= 4
    for level in range(len(store.shapes)):
        np.testing.assert_array_equal(root[str(level)][0], ref_e, err_msg=f"evidence level {level}")
        np.testing.assert_array_equal(root["labels/evidence"][str(level)][0], ref_l, err_msg=f"labels level {level}")
        padded = np.pad(ref_e, ((0, ref_e.shape[0] % 2), (0, ref_e.shape[1] % 2)), mode="edge")
        ref_e = (padded[0::2, 0::2] + padded[1::2, 0::2] + padded[0::2, 1::2] + padded[1::2, 1::2] + 2) // 4
        ref_l = ref_l[0::2, 0::2]


def test_store_chunk_files_are_the_bytes_zarr_writes(tmp_path):
    """Streamed chunks bypass ``array[...] = block`` (zarr's event loop); the files must be exactly
    what zarr itself writes for the same chunk, inside the array and where it ends."""
    import zarr

    from wsi_medcam.export.ome_zarr import EvidenceStore

    h, w, chunk = 300, 200, 128
    rng = np.random.default_rng(3)
    evidence = (rng.random((h, w)) ** 4 * 255).astype(np.uint8)
    labels = np.where(evidence > 200, 1, 0).astype(np.uint8)
    kwargs = dict(shape=(h, w), mpp=0.5, chunk=chunk, min_size=64, class_names=["a"], colors=[(255, 0, 0)], name="t")
    ours = EvidenceStore(tmp_path / "ours.ome.zarr", **kwargs)
    EvidenceStore(tmp_path / "zarr.ome.zarr", **kwargs)
    theirs = zarr.open_group(str(tmp_path / "zarr.ome.zarr"), mode="r+")
    for y in range(0, h, chunk):
        for x in range(0, w, chunk):
            ours.write(y, x, evidence[y : y + chunk, x : x + chunk], labels[y : y + chunk, x : x + chunk])
    theirs["0"][0] = evidence
    theirs["labels/evidence/0"][0] = labels
    files = sorted(p.relative_to(tmp_path / "zarr.ome.zarr") for p in (tmp_path / "zarr.ome.zarr").rglob("*")
                   if p.is_file() and not p.name.startswith("."))
    assert len(files) == 2 * 3 * 2  # evidence and labels, 3 × 2 chunks
    for rel in files:
        assert (tmp_path / "ours.ome.zarr" / rel).read_bytes() == (tmp_path / "zarr.ome.zarr" / rel).read_bytes(), rel


def _stitch_into_store(path, grid, masks, *, processes, strip_px, chunk, out_shape, after_batch=None):
    """Stitch ``masks`` (tile, soft, class, confidence) into a new evidence store at ``path`` in
    this process (0) or in ``processes`` stitching processes, calling ``after_batch(stitcher)``
    after each batch; returns (store, polygons, level-0 chunks written)."""
    from wsi_medcam.export.ome_zarr import EvidenceStore
    from wsi_medcam.stitch_processes import StitchingProcesses

    store = EvidenceStore(path / "e.ome.zarr", shape=out_shape, mpp=0.5, chunk=chunk, min_size=16,
                          class_names=["a", "b", "c"], colors=[(255, 0, 0)] * 3, name="t")
    kwargs = dict(block=40, spool_dir=path, trace_blocks=3, strip_px=strip_px)
    # as the pipeline does: the order first, the processes started after it (beside the readers)
    stitcher = (StitchingProcesses(grid, store, processes=processes, start=False, **kwargs) if processes
                else EvidenceStitcher(grid, store, threads=2, tracers=0, **kwargs))
    try:
        order = stitcher.order()
        if processes:
            assert not stitcher._procs
            stitcher.start()
        for start in range(0, len(order), 7):  # batches of 7 tiles
            batch = order[start : start + 7]
            stitcher.add_batch(batch, np.stack([masks[i][0] for i in batch]), np.array([masks[i][1] for i in batch]),
                               np.array([masks[i][2] for i in batch]))
            if after_batch:
                after_batch(stitcher)
        stitcher.finish()
    finally:
        stitcher.close()
    store.finalize({})
    return store, list(stitcher.polygons.merged()), stitcher.chunks_written


@pytest.mark.parametrize("downsample,out_scale,overlap,strip_px,processes", [
    (2.0, 1.0, 16, 60, 2), (1.37, 1.0, 40, 40, 3), (2.0, 0.25, 8, 30, 2), (1.002, 1.0, 0, 100, 1),
    (1.0, 1.0, 0, 200, 2), (1.37, 1.0, 8, 260, 3),  # strips several tiles wide: tiles come in blocks of rows
])
def test_stitching_processes_write_what_one_stitcher_writes(downsample, out_scale, overlap, strip_px, processes,
                                                           tmp_path):
    """Strips stitched in several processes (every N-th strip each; strips narrower than a tile
    too, so one tile reaches three strips): every pyramid level of the evidence and labels must be
    identical to one in-process stitcher's, and the polygons merged across the processes' seams the
    same regions."""
    import zarr
    from shapely.ops import unary_union

    rng = np.random.default_rng(5)
    tile, width0, height0 = 64, 900, 600
    tissue = rng.random((30, 45)) > 0.3
    grid = plan_tiles((width0, height0), downsample, tissue, TilingConfig(overlap=overlap, min_tissue=0.2),
                      mpp=0.5, tile_size=tile)
    yy, xx = np.mgrid[:tile, :tile]
    masks = {}
    for i in range(len(grid)):  # blobs, so regions span tiles and seams
        cy, cx, r = rng.integers(0, tile, 3)
        soft = np.clip(1.2 - np.hypot(yy - cy, xx - cx) / (r + 8), 0, 1).astype(np.float32)
        masks[i] = (soft, int(rng.integers(3)), float(rng.random()))
    out_shape = (round(height0 * out_scale), round(width0 * out_scale))
    (tmp_path / "one").mkdir()
    (tmp_path / "many").mkdir()
    one, one_polys, one_chunks = _stitch_into_store(tmp_path / "one", grid, masks, processes=0, strip_px=strip_px, chunk=32,
                                        out_shape=out_shape)
    many, many_polys, many_chunks = _stitch_into_store(tmp_path / "many", grid, masks, processes=processes, strip_px=strip_px,
                                          chunk=32, out_shape=out_shape)
    assert len(one.shapes) >= 4  # levels above a strip's width: built from the processes' chunks
    if strip_px >= 200:  # the processes' order: each strip's block of rows in turn, not whole rows across the band
        probe = EvidenceStitcher(grid, _Collect(out_shape, 32), strip_px=strip_px, shard=(0, processes), tracers=0)
        order = probe.order()
        first_band = np.array([probe.strips_of(int(i))[0] < processes for i in order])
        rows = grid.rows[order][first_band].astype(int)
        assert (np.diff(rows) < 0).any(), "within a band, a strip's block of rows comes before the next strip's"
    assert many_chunks == one_chunks > 0
    a, b = zarr.open_group(str(tmp_path / "one/e.ome.zarr"), mode="r"), zarr.open_group(str(tmp_path / "many/e.ome.zarr"), mode="r")
    assert b["0"][0].any()
    for level in range(len(one.shapes)):
        np.testing.assert_array_equal(b[str(level)][0], a[str(level)][0], err_msg=f"evidence level {level}")
        np.testing.assert_array_equal(b[f"labels/evidence/{level}"][0], a[f"labels/evidence/{level}"][0],
                                      err_msg=f"labels level {level}")
    assert not list((tmp_path / "many").glob(".evidence-polygons-*")), "the processes' spools are read and removed"
    assert not list((tmp_path / "many").glob(".stitching-grid*")), "the grid handed to the processes is removed"
    for c in range(3):
        ours = [p for k, p in many_polys if k == c]
        theirs = [p for k, p in one_polys if k == c]
        assert len(ours) == len(theirs), f"class {c}"
        assert unary_union(ours).symmetric_difference(unary_union(theirs)).area < 1e-6


def test_the_pyramid_above_the_processes_strips_is_built_while_tiles_stream(tmp_path):
    """The levels above the stitching processes' strips are built from each strip as soon as its
    process has finished it, not all after the last tile: chunks of the first level above the
    strips are on disk before the stitcher is told the tiles are done, and every level is the one
    stitcher's."""
    import time

    import zarr

    rng = np.random.default_rng(7)
    tile, width0, height0 = 64, 1200, 600
    grid = plan_tiles((width0, height0), 1.0, rng.random((30, 60)) > 0.2, TilingConfig(min_tissue=0.2), mpp=0.5,
                      tile_size=tile)
    yy, xx = np.mgrid[:tile, :tile]
    masks = {}
    for i in range(len(grid)):
        cy, cx, r = rng.integers(0, tile, 3)
        masks[i] = (np.clip(1.2 - np.hypot(yy - cy, xx - cx) / (r + 8), 0, 1).astype(np.float32), int(rng.integers(3)),
                    float(rng.random()))
    for name in ("one", "many"):
        (tmp_path / name).mkdir()
    above_first: list[int] = []  # level-(top + 1) chunk files on disk after each batch

    def watch(stitcher):
        top = stitcher.strip_chunks.bit_length() - 1
        time.sleep(0.02)  # the processes report finished strips while the next tiles come
        above_first.append(len(list((tmp_path / "many/e.ome.zarr" / str(top + 1)).rglob("[0-9]*"))))

    one, _, _ = _stitch_into_store(tmp_path / "one", grid, masks, processes=0, strip_px=128, chunk=32, out_shape=(600, 1200))
    many, _, _ = _stitch_into_store(tmp_path / "many", grid, masks, processes=2, strip_px=128, chunk=32,
                                    out_shape=(600, 1200), after_batch=watch)
    assert len(many.shapes) >= 5  # strips of 4 chunks: levels 0-2 in the processes, 3 and up here
    assert max(above_first) > 0, "nothing above the strips was built before the last tile"
    a, b = zarr.open_group(str(tmp_path / "one/e.ome.zarr"), mode="r"), zarr.open_group(str(tmp_path / "many/e.ome.zarr"), mode="r")
    for level in range(len(one.shapes)):
        np.testing.assert_array_equal(b[str(level)][0], a[str(level)][0], err_msg=f"evidence level {level}")
        np.testing.assert_array_equal(b[f"labels/evidence/{level}"][0], a[f"labels/evidence/{level}"][0],
                                      err_msg=f"labels level {level}")


def test_a_message_of_many_buffers_arrives_whole_and_in_order():
    """A batch's masks go to a stitching process in one ``sendmsg`` where the socket takes them,
    else in as many as it takes: more buffers than one call carries, through a small socket
    buffer that takes part of them per call (a socket with a timeout does not block in the call),
    must arrive whole and in order, and be read back exactly."""
    import socket
    import threading

    from wsi_medcam.stitch_processes import _IOV_MAX, _read, _send_buffers

    rng = np.random.default_rng(3)
    buffers = [rng.integers(0, 256, int(n), dtype=np.uint8) for n in rng.integers(1, 3000, _IOV_MAX + 300)]
    buffers[7] = buffers[7][::2]  # a strided view is refused, not sent wrong
    ours, theirs = socket.socketpair()
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    ours.settimeout(30)
    with pytest.raises((TypeError, ValueError)):
        _send_buffers(ours, buffers[:8])
    del buffers[7]
    expected = b"".join(b.tobytes() for b in buffers)
    got: list[bytearray | None] = []
    reader = threading.Thread(target=lambda: got.append(_read(theirs, len(expected))))
    reader.start()
    _send_buffers(ours, buffers)
    reader.join(timeout=30)
    assert got and got[0] == expected
    ours.close()
    with pytest.raises(EOFError):
        _read(theirs, 1)
    theirs.close()


def test_a_failing_stitching_process_fails_the_slide_in_one_line(tmp_path):
    """An error inside a stitching process (here: tiles out of order) reaches the model process as
    one OutputError line naming the process and the cause; close() leaves no process behind."""
    from wsi_medcam.errors import OutputError
    from wsi_medcam.export.ome_zarr import EvidenceStore
    from wsi_medcam.stitch_processes import StitchingProcesses

    grid = plan_tiles((900, 600), 2.0, np.ones((30, 45), bool), TilingConfig(), mpp=0.5, tile_size=64)
    store = EvidenceStore(tmp_path / "e.ome.zarr", shape=(600, 900), mpp=0.5, chunk=32, min_size=16,
                          class_names=["a"], colors=[(255, 0, 0)], name="t")
    stitcher = StitchingProcesses(grid, store, processes=2, spool_dir=tmp_path, strip_px=60, block=40)
    backwards = stitcher.order()[::-1]
    soft = np.ones((len(backwards), 64, 64), np.float32)
    with pytest.raises(OutputError, match=r"^stitching process \d failed: ValueError: tile \d+ came out of order"):
        try:
            stitcher.add_batch(backwards, soft, np.zeros(len(backwards), int), np.ones(len(backwards)))
            stitcher.finish()
        finally:
            stitcher.close()
    assert not any(p.is_alive() for p in stitcher._procs)


def test_a_killed_stitching_process_fails_the_slide_instead_of_hanging(tmp_path):
    """A stitching process killed mid-slide (the OOM killer's way) ends the wait with one line."""
    import os
    import signal

    from wsi_medcam.errors import OutputError
    from wsi_medcam.export.ome_zarr import EvidenceStore
    from wsi_medcam.stitch_processes import StitchingProcesses

    if not hasattr(signal, "SIGKILL"):
        pytest.skip("no SIGKILL on this platform")
    grid = plan_tiles((900, 600), 2.0, np.ones((30, 45), bool), TilingConfig(), mpp=0.5, tile_size=64)
    store = EvidenceStore(tmp_path / "e.ome.zarr", shape=(600, 900), mpp=0.5, chunk=32, min_size=16,
                          class_names=["a"], colors=[(255, 0, 0)], name="t")
    stitcher = StitchingProcesses(grid, store, processes=2, spool_dir=tmp_path, strip_px=60, block=40)
    order = stitcher.order()[:20]
    os.kill(stitcher._procs[1].pid, signal.SIGKILL)
    with pytest.raises(OutputError, match=r"^stitching process 1 ended early \(exit code -9\)"):
        try:
            stitcher.add_batch(order, np.ones((len(order), 64, 64), np.float32), np.zeros(len(order), int),
                               np.ones(len(order)))
            stitcher.finish()
        finally:
            stitcher.close()
    assert not any(p.is_alive() for p in stitcher._procs)


def test_evidence_geojson_encoded_in_processes_is_the_file_written_here(tmp_path):
    """The GeoJSON of many polygons in several spooled batches (speckle and blobs of 3 classes,
    some crossing the slide's edge), encoded in 2 processes, or encoded into part files where they
    were spooled (as stitching processes do while tiles stream), is byte for byte the one encoded
    here: same features in the same order, same ids, same per-class counts and areas."""
    from types import SimpleNamespace

    from qupath_rules import check_qupath_geojson
    from shapely.geometry import box

    from wsi_medcam.export.geojson import EvidenceEncoder
    from wsi_medcam.pipeline import _write_polygons
    from wsi_medcam.evidence_polygons import EvidencePolygons

    rng = np.random.default_rng(5)
    classes = np.kron(rng.integers(1, 4, (30, 40)), np.ones((10, 10), int))
    label = (ndimage.gaussian_filter(rng.random((300, 400)), 2.0) > 0.52) * classes
    traced = list(zip(*trace_labels(label.astype(np.uint8), -5, 0, 2.0)))
    names = ["a", "b", "c"]
    options = {"simplify_px": 1.0, "clip": box(0, 0, 800, 600), "class_names": names,
               "colors": [(255, 0, 0), (0, 255, 0), (0, 0, 255)], "mpp": 0.25, "slide_key": "slide.svs:abc"}

    def stitcher():
        polygons = EvidencePolygons(tmp_path, flush_every=64)  # several spooled batches
        for value, poly, _ in traced:
            polygons.add(value - 1, poly, on_border=False)
        return SimpleNamespace(polygons=polygons)

    def encoded_in_parts():
        polygons = EvidencePolygons(tmp_path, flush_every=64)
        half = len(traced) // 2
        for k, share in enumerate((traced[:half], traced[half:])):
            part = EvidencePolygons(flush_every=64, spool_path=tmp_path / f".part-{k}.bin", encoder=EvidenceEncoder(**options))
            for value, poly, _ in share:
                part.add(value - 1, poly, on_border=False)
            part.release()
            polygons.adopt(part.spool_path, [], part.encoder.per_class)
        return SimpleNamespace(polygons=polygons)

    here = _write_polygons(tmp_path / "here.geojson", stitcher(), EvidenceEncoder(**options), names, processes=0)
    assert len(traced) > 3 * 64 and abs(here[0] - len(traced)) <= 10  # a few clipped at x < 0 may split or go
    assert set(here[1]) == {"a", "b", "c"}
    for name, polygons in (("there", stitcher()), ("parts", encoded_in_parts())):
        assert _write_polygons(tmp_path / f"{name}.geojson", polygons, EvidenceEncoder(**options), names, processes=2) == here
        assert (tmp_path / "here.geojson").read_bytes() == (tmp_path / f"{name}.geojson").read_bytes(), name
    assert not list(tmp_path.glob(".part-*")), "part files are removed once copied"
    features = check_qupath_geojson(tmp_path / "there.geojson", width=800, height=600)
    assert len(features) == here[0] and len({f["id"] for f in features}) == here[0]
    assert sum(v["area_um2"] for v in here[1].values()) == pytest.approx(
        sum(f["properties"]["measurements"]["Area µm^2"] for f in features))


@pytest.mark.parametrize("shape", [(1024, 1024), (1023, 1024), (513, 999), (1, 1), (3, 5)])
def test_halve_mean_is_the_2x2_mean_rounded_half_up(shape):
    """The pyramid's halving against its definition, written out independently: each 2×2 block's
    mean rounded half up, with an odd last row/column paired with itself."""
    rng = np.random.default_rng(sum(shape))
    block = rng.integers(0, 256, shape, dtype=np.uint8)
    padded = np.pad(block.astype(np.float64), ((0, shape[0] % 2), (0, shape[1] % 2)), mode="edge")
    h, w = padded.shape
    means = padded.reshape(h // 2, 2, w // 2, 2).mean(axis=(1, 3))
    np.testing.assert_array_equal(_halve_mean(block), np.floor(means + 0.5).astype(np.uint8))
