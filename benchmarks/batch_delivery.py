"""Batches a second that reader processes can hand to a model process whose other threads want the GIL.

On a GPU the model process takes ~20 batches of 256 tiles (38.5 MB each) a second while its model,
stitching and output threads compete for the GIL. How a batch's shared memory reaches it matters
then: by file descriptor (torch's default), each batch is fetched over a socket from its reader in
an authenticated handshake of several round trips, each of which must win the GIL back; by name
(``file_system``, what the pipeline's readers use on a GPU), the model process maps it directly.

Readers here make empty batches of the pipeline's size (``--read-ms`` each, so reading is not what
limits), and ``--busy`` threads of the model process run Python meanwhile. Printed per mode: batches
a second delivered, idle and busy. No slide or model is needed.

    python benchmarks/batch_delivery.py --readers 4 --busy 1
"""

from __future__ import annotations

import argparse
import json
import threading
import time

import numpy as np
import torch
from torch.utils.data import Dataset

from wsi_medcam.batching import batch_buffer, make_loader, start_shared_memory_manager


class EmptyTiles(Dataset):
    """Batches of uninitialised tiles in shared memory, as :class:`TileDataset` allocates them,
    each ready ``read_ms`` after it is asked for."""

    def __init__(self, batches: int, batch_size: int, tile_size: int, read_ms: float):
        self.n, self.tile_size, self.read_s = batches * batch_size, tile_size, read_ms / 1e3

    def __len__(self) -> int:
        return self.n

    def __getitems__(self, ks: list[int]) -> tuple[torch.Tensor, np.ndarray]:
        time.sleep(self.read_s)
        return batch_buffer(len(ks), self.tile_size).permute(0, 3, 1, 2), np.asarray(ks)


def delivered_per_second(by_name: bool, busy: int, args: argparse.Namespace) -> float:
    """Batches a second taken from the loader over ``args.seconds``, with ``busy`` threads spinning
    in Python meanwhile."""
    dataset = EmptyTiles(100_000, args.batch_size, args.tile_size, args.read_ms)
    stop = threading.Event()

    def spin() -> None:
        while not stop.is_set():
            sum(range(1000))

    batches = iter(make_loader(dataset, batch_size=args.batch_size, workers=args.readers, share_by_name=by_name))
    next(batches)  # readers started
    spinners = [threading.Thread(target=spin, daemon=True) for _ in range(busy)]
    for t in spinners:
        t.start()
    start, n = time.perf_counter(), 0
    try:
        for _ in batches:
            n += 1
            if time.perf_counter() - start > args.seconds:
                break
        return n / (time.perf_counter() - start)
    finally:
        stop.set()
        for t in spinners:
            t.join()
        del batches


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--readers", type=int, default=4)
    ap.add_argument("--busy", type=int, default=1, help="threads of the model process running Python")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--tile-size", type=int, default=224)
    ap.add_argument("--read-ms", type=float, default=20.0, help="per batch, in each reader")
    ap.add_argument("--seconds", type=float, default=4.0, help="per measurement")
    args = ap.parse_args()
    start_shared_memory_manager()
    figures = {mode: {"idle": round(delivered_per_second(mode == "by_name", 0, args), 1),
                      "busy": round(delivered_per_second(mode == "by_name", args.busy, args), 1)}
               for mode in ("by_descriptor", "by_name")}
    print(json.dumps({"readers": args.readers, "busy_threads": args.busy, "batch_size": args.batch_size,
                      "read_ms": args.read_ms, "batches_per_s": figures}))


if __name__ == "__main__":
    main()
