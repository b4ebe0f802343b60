"""Write a real gigapixel test slide by tiling real H&E pixels, streamed tile by tile.

    python benchmarks/make_slide.py --width 100000 --height 100000 --mpp 0.25 -o big.tif [--source IMG_OR_SLIDE]
        [--levels N] [--level-factor 2]

The source (default: ../shared/data/slides/CMU-1-Small-Region.svs) is cut into blocks that are
flipped and rotated by a hash of their position, so neighbouring tiles differ; the output is a tiled
JPEG multi-level TIFF in the Aperio layout that OpenSlide opens with the right MPP. Only the source
image (and its reductions) and the tiles being encoded are in memory. Each distinct tile is encoded
once and the upper levels come from the reduced source: 32768² took 10.7 s on a 2-core VM (52 s
when every level was reduced from level-0 pixels and every tile encoded). Levels go down to the
first one at most 4096 px on its longer side, as on Aperio's scans (CMU-1.svs: 46000, 11500,
2875 px wide), so tissue detection reads as many pixels as on a real slide.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from PIL import Image

from wsi_medcam.slide_writer import pyramid_levels, write_pyramid

DEFAULT_SOURCE = Path(__file__).resolve().parents[2] / "shared" / "data" / "slides" / "CMU-1-Small-Region.svs"


def load_source(path: Path) -> np.ndarray:
    if path.suffix.lower() in {".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn"}:
        from wsi_medcam.slide import open_slide

        with open_slide(path) as slide:
            return slide.read_level((0, 0), 0, slide.dimensions)
    return np.asarray(Image.open(path).convert("RGB"))


def tiled_reader(source: np.ndarray, block: int):
    """A reader of an endless canvas made of ``block``-sized pieces of ``source``, each flipped/rotated."""
    pieces = [source[y : y + block, x : x + block]
              for y in range(0, source.shape[0] - block + 1, block) for x in range(0, source.shape[1] - block + 1, block)]

    def piece(bx: int, by: int) -> np.ndarray:
        h = (bx * 73856093) ^ (by * 19349663)
        p = pieces[h % len(pieces)]
        p = np.rot90(p, (h >> 8) % 4)
        return p[:, ::-1] if (h >> 10) % 2 else p

    def read(x: int, y: int, w: int, h: int) -> np.ndarray:
        out = np.empty((h, w, 3), np.uint8)
        for by in range(y // block, (y + h - 1) // block + 1):
            for bx in range(x // block, (x + w - 1) // block + 1):
                ys, ye = max(y, by * block), min(y + h, (by + 1) * block)
                xs, xe = max(x, bx * block), min(x + w, (bx + 1) * block)
                out[ys - y : ye - y, xs - x : xe - x] = piece(bx, by)[ys - by * block : ye - by * block,
                                                                       xs - bx * block : xe - bx * block]
        return out

    return read


def reduced_readers(source: np.ndarray, block: int):
    """``reduced(f)``: the reader of the canvas ``f``× smaller, from the source BOX-reduced by ``f``.

    Reducing commutes with the pieces' flips and quarter turns where ``f`` divides ``block`` (the
    f × f cells stay within a piece), so this gives BOX(level 0) without reading level 0 again: for
    each upper level a fraction of the pixels instead of all of them (a 100k² slide was 4 passes).
    Equal to BOX(level 0) within ±1 grey level (Pillow's fixed-point rounding: 2 % of pixels)."""
    h, w = source.shape[0] // block * block, source.shape[1] // block * block  # the part pieces are cut from

    def reduced(f: int):
        small = np.asarray(Image.fromarray(source[:h, :w]).resize((w // f, h // f), Image.Resampling.BOX))
        return tiled_reader(small, block // f)

    return reduced


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--width", type=int, required=True, help="level-0 width, px")
    ap.add_argument("--height", type=int, required=True, help="level-0 height, px")
    ap.add_argument("--mpp", type=float, default=0.25, help="level-0 µm/px written into the slide")
    ap.add_argument("--levels", type=int, default=None,
                    help="levels in the pyramid (default: down to the first at most 4096 px on its longer side)")
    ap.add_argument("--level-factor", type=int, default=2,
                    help="each level this many times smaller than the one below (4 as Aperio's scanners: 20x "
                         "tiles of a 0.25 µm/px slide are then read from level 0 and halved, as on real 40x scans)")
    ap.add_argument("--block", type=int, default=512, help="size of the source pieces, px")
    ap.add_argument("--source", type=Path, default=DEFAULT_SOURCE)
    ap.add_argument("-o", "--out", type=Path, required=True)
    args = ap.parse_args()
    start = time.perf_counter()
    source = load_source(args.source)
    levels = args.levels or pyramid_levels(args.width, args.height, args.level_factor)
    top = args.level_factor ** (levels - 1)
    write_pyramid(args.out, tiled_reader(source, args.block), args.width, args.height, mpp=args.mpp, levels=levels,
                  level_factor=args.level_factor,
                  reduced=reduced_readers(source, args.block) if args.block % top == 0 else None, repeats=True)
    print(f"{args.out}: {args.width}×{args.height} at {args.mpp} µm/px, {levels} levels {args.level_factor}× apart, "
          f"{args.out.stat().st_size / 2**20:.0f} MiB in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
