"""``overview.png``: thumbnail, tissue mask, class heatmap and evidence overlay side by side."""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageDraw

from ..errors import OutputError
from ..handoff import take_over
from ..slide import shrink


def class_heatmap(grid_probs: np.ndarray, colors: list[tuple[int, int, int]]) -> np.ndarray:
    """RGB (rows, cols): the predicted class's colour, brightness = its probability; black = no tile."""
    conf = grid_probs.max(axis=0)
    pred = grid_probs.argmax(axis=0)
    palette = np.asarray(colors, np.float32)
    return (palette[pred] * conf[..., None]).astype(np.uint8)


def _fit(img: np.ndarray, size: tuple[int, int], nearest: bool) -> np.ndarray:
    method = Image.Resampling.NEAREST if nearest else Image.Resampling.BOX
    return np.asarray(Image.fromarray(img).resize(size, method))


def shrink_for_overview(thumbnail: np.ndarray, tissue: np.ndarray, max_side: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """The thumbnail (RGB) and tissue mask (uint8 0/255) at the overview's panel size, at most
    ``max_side`` px high or wide. A run keeps only these until the overview is drawn: a 100k² slide's
    8 µm/px thumbnail and mask (39 MiB) would otherwise stay in memory through the whole run, and
    :func:`write_overview` gives the same image for them as for the full-size ones. The thumbnail
    is shrunk by OpenCV's area mean (6250² → 512²: 0.14 s against PIL's BOX 0.22–0.36 s, 2-core
    VM); the mask is sampled before it is made 0/255 (the same pixels, without converting all of it)."""
    h, w = thumbnail.shape[:2]
    scale = min(1.0, max_side / max(h, w))
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    panel = _fit(tissue.view(np.uint8) if tissue.dtype == bool else tissue, size, nearest=True)
    return shrink(thumbnail, size), (panel > 0).astype(np.uint8) * 255


def write_thumbnails(work_dir: Path, thumbnail: np.ndarray, mask: np.ndarray) -> None:
    """``thumbnail.png`` and ``tissue.png`` (the tissue detection's image and mask), by OpenCV at zlib
    level 1 with every row filtered by its difference from the row above. PIL's encoder tries each
    filter on every row: a 100k² slide's 6250² thumbnail at 8 µm/px took 2.76 s on one core for 42
    MiB, OpenCV's so 1.49 s for 42 MiB (without filtering 1.37 s, 43 MiB). GPU runs write them in a
    process of their own beside the tiles, CPU runs before the readers fork."""
    _write_png(work_dir / "thumbnail.png", cv2.cvtColor(thumbnail, cv2.COLOR_RGB2BGR))
    _write_png(work_dir / "tissue.png", mask.astype(np.uint8) * 255)


def _write_png(path: Path, image: np.ndarray) -> None:
    """``image`` (BGR or grey, uint8) as PNG at ``path``; OutputError if it could not be written."""
    params = [cv2.IMWRITE_PNG_COMPRESSION, 1, cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FILTER_UP]
    try:
        written = cv2.imwrite(str(path), image, params)
    except cv2.error as exc:
        raise OutputError(f"cannot write {path}: {exc}") from exc
    if not written:
        raise OutputError(f"cannot write {path}")


def write_handed_thumbnails(work_dir: Path, handed: Path) -> None:
    """:func:`write_thumbnails` in a process of its own, from the ``thumbnail`` and ``mask`` that the
    model process handed over as files (:func:`~wsi_medcam.handoff.hand_over`). At a lower priority
    (nice +10): nothing waits for these PNGs before the slide ends, while their encoding (~1.5 s of a
    core on a 100k² slide) overlaps the first seconds of tiles, whose readers, model threads and
    stitching processes then get the cores first."""
    os.nice(10)
    arrays = take_over(handed)
    write_thumbnails(work_dir, arrays["thumbnail"], arrays["mask"])


def write_overview(
    path: Path,
    thumbnail: np.ndarray,
    tissue: np.ndarray,
    heatmap: np.ndarray,
    evidence: np.ndarray | None,
    *,
    max_side: int = 512,
) -> None:
    """Four panels at the thumbnail's aspect ratio, at most ``max_side`` px high or wide each.

    ``tissue`` is a bool or 0/255 mask over the thumbnail; ``heatmap`` must cover the slide's extent
    (callers crop the tile grid to the slide); ``evidence`` is any-resolution uint8 0–255 evidence
    over the same extent, or None. The PNG is compressed at zlib level 1, as the thumbnails are:
    encoding was all but ~5 ms of the overview's time (four 512² panels), 0.38 s at the default
    level 6 and 0.14 s at level 1 (2-core VM, noisy panels; a slide's are smoother and faster).
    """
    thumb, tissue_panel = shrink_for_overview(thumbnail, tissue, max_side)
    size = thumb.shape[1], thumb.shape[0]
    panels = [
        thumb,
        tissue_panel[..., None].repeat(3, axis=2),
        _fit(heatmap, size, nearest=True),
    ]
    if evidence is not None:
        ev = _fit(evidence, size, nearest=False).astype(np.float32)[..., None] / 255
        red = np.array([255, 0, 0], np.float32)
        panels.append((thumb * (1 - 0.6 * ev) + red * 0.6 * ev).astype(np.uint8))
    titles = ["slide", "tissue", "class heatmap", "evidence"][: len(panels)]
    gap, header = 8, 18
    canvas = Image.new("RGB", (len(panels) * (size[0] + gap) - gap, size[1] + header), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (panel, title) in enumerate(zip(panels, titles)):
        x = i * (size[0] + gap)
        canvas.paste(Image.fromarray(panel), (x, header))
        draw.text((x + 2, 2), title, fill="black")
    canvas.save(path, compress_level=1)
