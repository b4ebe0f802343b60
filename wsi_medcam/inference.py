"""Driving the classifier and the Med-CAM segmenter over batches of tiles.

One process owns the models. Tiles arrive as uint8 and are normalised on the device (less to copy
than float32), in channels-last layout, under bf16 autocast where the hardware supports it. On a
CPU, several batches run at once (*streams*), each on one core, rather than one batch spread over
all cores; on CUDA two, each on its own CUDA stream, so the GPU is not left waiting between batches
(see :func:`default_streams`).
"""

from __future__ import annotations

import itertools
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch

from .bundles import Bundle
from .config import InferenceConfig
from .cpus import usable_cores
from .errors import ConfigError
from .heap import release_freed_memory, resident_bytes
from .levels import HARD, quantise
from .medcam.fills import compose, make_fill

T = TypeVar("T")


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present, else CPU; a CUDA device that is not there is refused here,
    in one line, rather than by torch's first kernel launch."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = "built without CUDA" if torch.version.cuda is None else f"CUDA {torch.version.cuda}, no GPU or driver"
            raise ConfigError(f"--device {name}: no CUDA device here (torch {torch.__version__}: {build}); use --device cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s), cuda:0 to "
                              f"cuda:{torch.cuda.device_count() - 1}")
    return device


def cpu_supports_bf16() -> bool:
    """True on CPUs with native bf16 matrix units (AMX or AVX512-BF16), where autocast pays."""
    cpu = getattr(torch, "cpu", None)
    checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(bool(getattr(cpu, name, lambda: False)()) for name in checks)


def bf16_supported(device: torch.device) -> bool:
    """Whether bf16 autocast pays on ``device``: CPUs with AMX/AVX512-BF16, CUDA GPUs from Ampere
    (compute capability 8.0). ``torch.cuda.is_bf16_supported()`` also says yes where bf16 is only
    emulated (T4, V100: slower than fp32), and answers for the current device rather than ``device``."""
    return torch.cuda.get_device_capability(device)[0] >= 8 if device.type == "cuda" else cpu_supports_bf16()


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for plain fp32; ``auto``: bf16 where it pays, else fp16 on CUDA."""
    if precision == "fp32":
        return None
    if precision == "fp16":
        return torch.float16
    if precision == "bf16" or bf16_supported(device):
        return torch.bfloat16
    return torch.float16 if device.type == "cuda" else None


def default_batch_size(device: torch.device) -> int:
    """Tiles per batch. On CPU 4 per stream: the speed does not depend on it, the memory does. A
    batch's activations peak at ~17.5 MiB per tile (resnet18 + U-Net/resnet18 at 224 px, fp32,
    batch norms folded; torch.profiler), and with one batch per core in flight the process's peak
    is where the streams' peaks meet, which a long run meets sooner or later. Measured on 2 cores,
    two streams: fp32 (no AMX) 8.93 tiles/s with batches of 4, 9.02 with 8; bf16 (AMX) flat from 8
    to 32 tiles, while a 16k² slide's peak PSS went from 1743 MiB with two streams of 16 to 1478
    with two of 8."""
    return 256 if device.type == "cuda" else 4


def default_workers(device: torch.device) -> int:
    """DataLoader reader processes. On a CPU the readers take cores from the model: one reader per
    four cores (measured on 2 cores before model streams, one batch over both cores: 1 reader 0.84
    of bare-model speed, 0 readers 0.72, 2 readers 0.44; with streams one reader used ~3 ms per
    tile through OpenSlide, 1.2–2.8 ms with direct tile reads, against the models' ~60 ms per tile
    per core). On CUDA the cores are shared with the stitching processes by what each costs per
    tile (py-spy on an H200 machine's 16 cores: reading ~1.0 CPU ms, stitching ~2.0): 3/8 of them,
    at most 8 (see :func:`wsi_medcam.stitch_processes.default_stitchers`)."""
    cores = usable_cores()
    return min(8, max(1, cores * 3 // 8)) if device.type == "cuda" else max(1, cores // 4)


def default_streams(device: torch.device, threads: int | None) -> int:
    """Batches the models run at once: on a CPU one per ``threads`` cores (default one per core),
    on CUDA two (each on its own CUDA stream), on other devices one.

    Spreading one batch over cores makes every layer wait at a barrier for its slowest core, and
    any other work on a core (reading, stitching, another tenant) stalls them all. Measured on 2
    cores (resnet18 + U-Net/resnet18, 224 px, bf16, batch 16): one thread 19-20 tiles/s, one batch
    on 2 threads 22-25 tiles/s, two single-threaded batches at once 30-35 tiles/s. On an H200
    (batch 256, bf16), one batch at a time leaves the GPU waiting while this process launches the
    next batch's kernels and takes the last one's outputs: classifier + segmenter 2,940 tiles/s,
    with two streams 4,729 (the pipeline's inference stage 1,750 → 1,976 tiles/s).
    """
    if device.type == "cuda":
        return 2
    if device.type != "cpu":
        return 1
    return max(1, usable_cores() // (threads or 1))


TileIndices = "torch.Tensor | np.ndarray"
"""A batch's tile indices into the grid, as a loader gives them (:mod:`wsi_medcam.batching`: numpy)."""

Outputs = tuple[np.ndarray, "np.ndarray | None", dict[str, np.ndarray]]
"""A batch's (probabilities, evidence levels or None, kept per fill), as :meth:`Predictor.predict` returns them."""


@dataclass(frozen=True)
class BatchResult:
    """Model outputs for one batch, on the CPU.

    indices : tile indices into the grid.
    probs : (B, classes) softmax probabilities.
    evidence : (B, H, W) uint8 soft evidence at tile resolution (segmenter or CAM heatmap) as levels
        ``round(255 · soft)`` (:mod:`wsi_medcam.levels`), or None.
    kept : per certification fill, (B,) bool: does the hard evidence alone keep the prediction.
    """

    indices: np.ndarray
    probs: np.ndarray
    evidence: np.ndarray | None
    kept: dict[str, np.ndarray]


class Predictor:
    """Classifier plus an explainer (Med-CAM segmenter or a Grad-CAM method) on one device.

    The bundles' models are used, not copied: they are moved to the device and memory format in
    place (as :meth:`torch.nn.Module.to` does), so a GPU holds one set of weights; a caller who goes
    on using ``classifier.model`` elsewhere finds it there."""

    def __init__(self, classifier: Bundle, segmenter: Bundle | None, cfg: InferenceConfig):
        self.device = resolve_device(cfg.device)
        self.dtype = resolve_precision(cfg.precision, self.device)
        self.memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
        self.explainer = cfg.explainer
        self.cam_area = cfg.cam_area
        self.certify_fills = tuple(cfg.certify_fills)
        self._random_fills = _draws_random(self.certify_fills)  # a generator per batch
        # Grad-CAM hooks the classifier's modules, so its batches run one at a time
        self.streams = (cfg.streams or default_streams(self.device, cfg.threads)) if cfg.explainer == "medcam" else 1
        # on CUDA one CUDA stream per model thread: a batch's copy in and kernels queue while the batch
        # before it still computes or comes back, instead of the GPU waiting on this process between batches
        self._cuda_streams = ([torch.cuda.Stream(self.device) for _ in range(self.streams)]
                              if self.device.type == "cuda" and self.streams > 1 else [])
        self._thread = threading.local()  # a model thread's CUDA stream, see _own_stream
        # per model stream number, its CUDA graph of the forward (see _Graph); kept across runs, whose
        # model threads are new each time but take the same stream numbers
        self._graphs: dict[int, _Graph] = {}
        self._graph_lock = threading.Lock()
        self._graph_batch = (cfg.batch_size or default_batch_size(self.device)) if _graphable(cfg, self.device) else 0
        self.threads_per_stream = cfg.threads or 1
        self.arch = classifier.config.arch
        self.classifier = classifier.model.to(self.device, memory_format=self.memory_format).eval()
        use_segmenter = segmenter is not None and cfg.explainer == "medcam"
        self.segmenter = segmenter.model.to(self.device, memory_format=self.memory_format).eval() if use_segmenter else None
        ccfg = classifier.config
        self.mean, self.std = tuple(ccfg.mean), tuple(ccfg.std)
        self._fill_stats = (torch.tensor(ccfg.mean, device=self.device), torch.tensor(ccfg.std, device=self.device))  # 0-1
        self._mean = self._fill_stats[0].view(1, 3, 1, 1) * 255
        self._std = self._fill_stats[1].view(1, 3, 1, 1) * 255
        scfg = segmenter.config if use_segmenter and segmenter else None
        if scfg is not None and scfg.mean is not None and scfg.std is not None:
            self._seg_mean = torch.tensor(scfg.mean, device=self.device).view(1, 3, 1, 1) * 255
            self._seg_std = torch.tensor(scfg.std, device=self.device).view(1, 3, 1, 1) * 255
        else:
            self._seg_mean, self._seg_std = self._mean, self._std

    @property
    def explains(self) -> bool:
        """Whether this predictor produces evidence (a segmenter, or a Grad-CAM method)."""
        return self.segmenter is not None or self.explainer != "medcam"

    def _autocast(self):  # noqa: ANN202 - context manager
        if self.dtype is None:
            return nullcontext()
        # autocast keeps its bf16 copies of the weights in ONE cache for all threads: a copy made on one
        # CUDA stream would be read on another before it is written (NaN masks, seen on an H200), so
        # with CUDA streams each forward casts the weights on its own stream (~50 MB, microseconds)
        # (a CUDA graph's capture takes no cached casts either)
        return torch.autocast(self.device.type, dtype=self.dtype, cache_enabled=not (self._cuda_streams or self._graph_batch))

    def predict(self, tiles_uint8: torch.Tensor) -> Outputs:
        """(probabilities (B, C), evidence levels (B, H, W) uint8 or None, kept per fill) for uint8
        tiles (B, 3, H, W). The evidence is rounded to its levels here, on the device: a quarter of
        float32's bytes to copy back and to hand to the stitchers. With ``cuda_graphs``, a batch of
        the configured size replays this model stream's graph of :meth:`forward`.

        Raises
        ------
        TypeError
            for anything but a uint8 tensor (B, 3, H, W): pixels as read, not normalised (a float
            input would be normalised a second time and give wrong outputs without a word).
        """
        if not isinstance(tiles_uint8, torch.Tensor) or tiles_uint8.dtype != torch.uint8 \
                or tiles_uint8.ndim != 4 or tiles_uint8.shape[1] != 3:
            got = (f"{tiles_uint8.dtype} tensor {tuple(tiles_uint8.shape)}" if isinstance(tiles_uint8, torch.Tensor)
                   else type(tiles_uint8).__name__)
            raise TypeError(f"predict takes uint8 tiles (B, 3, H, W) as read from the slide, got {got}")
        graph = self._graph(tiles_uint8) if self._graph_batch and len(tiles_uint8) == self._graph_batch else None
        # a graph's outputs are its own tensors: a second run of this Predictor at once (two slides of
        # one worker sharing its models) numbers its threads alike and must not replay it before they are copied out
        with graph.lock if graph is not None else nullcontext():
            if graph is not None:
                probs, levels, kept = graph.replay(tiles_uint8)
            else:
                probs, levels, kept = self.forward(tiles_uint8.to(self.device, non_blocking=True))
            self._wait_asleep()
            return (probs.cpu().numpy(), None if levels is None else levels.cpu().numpy(),
                    {fill: v.cpu().numpy() for fill, v in kept.items()})

    def forward(self, tiles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, torch.Tensor]]:
        """:meth:`predict`'s work on the device, for uint8 tiles (B, 3, H, W) already there; its
        outputs stay there."""
        with torch.no_grad():
            x = tiles.float()
            x_cls = ((x - self._mean) / self._std).contiguous(memory_format=self.memory_format)
            with self._autocast():
                probs = torch.softmax(self.classifier(x_cls).float(), dim=1)
                soft = None
                if self.segmenter is not None:
                    x_seg = x_cls if self._seg_mean is self._mean else (x - self._seg_mean) / self._seg_std
                    soft = torch.sigmoid(self.segmenter(x_seg.contiguous(memory_format=self.memory_format)).float())[:, 0]
        pred = probs.argmax(1)
        if self.explainer != "medcam":
            from .medcam.baselines import cam_evidence, cam_heatmaps  # grad-cam pulls in cv2, sklearn, matplotlib

            heat = cam_heatmaps(self.classifier, x_cls, self.explainer, pred.tolist(), arch=self.arch, batch_size=len(x_cls))
            soft = torch.from_numpy(cam_evidence(heat, self.cam_area)).to(self.device)
        levels = None if soft is None else quantise(soft)
        kept: dict[str, torch.Tensor] = {}
        if levels is not None and self.certify_fills:
            with torch.no_grad(), self._autocast():
                gen = torch.Generator(device=self.device).manual_seed(0) if self._random_fills else None
                # the hard evidence as written (level >= HARD, soft >= 0.5): a soft 0.5 exactly (a bf16
                # logit of 0) is hard in the stores and GeoJSON, so it is certified as hard too
                hard = (levels >= HARD).float()[:, None]
                for fill in self.certify_fills:
                    b = make_fill(fill, x_cls.float(), mean=self._fill_stats[0], std=self._fill_stats[1], generator=gen)
                    kept[fill] = self.classifier(compose(x_cls, hard, b)).argmax(1) == pred
        return probs, levels, kept

    def _graph(self, tiles: torch.Tensor) -> "_Graph | None":
        """This model stream's CUDA graph of :meth:`forward`, captured at its first full batch (one
        capture at a time: one stream's warm-up and capture are not raced by another's); None for
        tiles laid out otherwise than those it was captured for."""
        number = getattr(self._thread, "stream", 0)
        if number not in self._graphs:
            with self._graph_lock:
                if number not in self._graphs:  # another run's thread of this number may have captured it meanwhile
                    stream = self._cuda_streams[number] if self._cuda_streams else None
                    self._graphs[number] = _Graph(self.forward, tiles, self.device, stream)
        graph = self._graphs[number]
        return graph if graph.takes(tiles) else None

    def _wait_asleep(self) -> None:
        """On CUDA, wait for this thread's queued kernels asleep. The copies to the host wait too, but
        CUDA spins a core while they do (its default where a process has more cores than GPUs): two
        model threads kept two of an H200 machine's 16 cores busy for nothing, beside the readers and
        stitching processes. Afterwards only the copies themselves are waited for."""
        if self.device.type == "cuda":
            done = torch.cuda.Event(blocking=True)
            done.record(torch.cuda.current_stream(self.device))
            done.synchronize()

    def _predict_here(self, tiles_uint8: torch.Tensor) -> Outputs:
        """:meth:`predict` on this model thread's own CUDA stream (on other devices, plain :meth:`predict`)."""
        if not self._cuda_streams:
            return self.predict(tiles_uint8)
        with torch.cuda.stream(self._cuda_streams[self._thread.stream]):
            return self.predict(tiles_uint8)

    def _own_stream(self, numbers: Iterator[int]) -> None:
        """A model thread's start: it takes the next of the CUDA streams (``numbers`` counts them out)
        and keeps it, and on a CPU sets its torch threads."""
        self._thread.stream = next(numbers)
        if self.device.type == "cpu":
            torch.set_num_threads(self.threads_per_stream)

    def run(self, batches: Iterable[tuple[torch.Tensor, TileIndices]]) -> Iterator[BatchResult]:
        """Results batch by batch, in the loader's order; with several :attr:`streams`, that many
        batches are in the models at once, each on a model thread of its own (ops release the GIL,
        so they run in parallel): on a CPU with ``threads_per_stream`` torch threads, on CUDA on the
        thread's own CUDA stream, so the GPU has the next batch queued while this process handles the
        last one's outputs."""
        if self.device.type == "cpu":
            batches = _trimming(batches)
        if self.streams == 1:
            for tiles, indices in batches:
                yield BatchResult(np.asarray(indices), *self.predict(tiles))
            return
        threads = torch.get_num_threads()  # torch's setting is also a process-wide default for new threads
        try:
            with ThreadPoolExecutor(self.streams, thread_name_prefix="wsi-medcam-model", initializer=self._own_stream,
                                    initargs=(itertools.count(),)) as pool:
                yield from self._in_streams(pool, batches)
        finally:
            torch.set_num_threads(threads)

    def _in_streams(self, pool: ThreadPoolExecutor, batches: Iterable[tuple[torch.Tensor, TileIndices]]) -> Iterator[BatchResult]:
        """:meth:`run` on ``pool``'s ``streams`` threads, with as many batches again queued: a model
        thread that finishes its batch starts the next one at once, while this thread is still
        handing over outputs or waiting on the loader (GIL turns among the loader's, the writer's and
        the model threads). With only ``streams`` batches submitted, the GPU ran the pipeline's
        batches at the bare models' one-batch-at-a-time speed (H200, batch 256: 4,840 tiles/s against
        5,385 with two streams). On a CPU, where the models are the bottleneck and their batches'
        memory the run's peak, the oldest is waited for once ``streams`` batches are in, as before
        (the 100k² memory figures were measured so). Results are yielded in order, each as soon as
        it and those before it are ready."""
        depth = 2 * self.streams if self.device.type == "cuda" else self.streams - 1  # batches left pending
        pending: deque[tuple[TileIndices, Future[Outputs]]] = deque()
        try:
            for tiles, indices in batches:
                pending.append((indices, pool.submit(self._predict_here, tiles)))
                while pending and (len(pending) > depth or pending[0][1].done()):
                    indices, result = pending.popleft()
                    yield BatchResult(np.asarray(indices), *result.result())
            while pending:
                indices, result = pending.popleft()
                yield BatchResult(np.asarray(indices), *result.result())
        finally:  # stopped early (an error downstream): skip the batches not started
            for _, result in pending:
                result.cancel()


RANDOM_FILLS = frozenset({"noise", "uniform", "colour"})
"""Certification fills drawn from a generator (seeded per batch): not captured in CUDA graphs."""


def _graphable(cfg: InferenceConfig, device: torch.device) -> bool:
    """Whether ``cuda_graphs`` applies: on CUDA, to Med-CAM (Grad-CAM runs backward passes through
    hooks) without random certification fills."""
    return cfg.cuda_graphs and device.type == "cuda" and cfg.explainer == "medcam" and not _draws_random(cfg.certify_fills)


def _draws_random(fills: Iterable[str]) -> bool:
    """Whether any of these certification fills is drawn from a generator (:data:`RANDOM_FILLS`)."""
    return not RANDOM_FILLS.isdisjoint(fills)


class _Graph:
    """:meth:`Predictor.forward` captured as one CUDA graph for batches laid out as ``example``, on
    ``stream`` (None: a side stream of torch's; replays go to whichever stream is current).

    Eagerly, a batch is ~1,500 operator dispatches (torch.profiler: classifier, segmenter and the
    certification passes), ~15 ms of Python per batch on the 2-core VM (the models on torch's meta
    device), all of it holding the model process's GIL, which the other model thread, the writer
    (stitching hand-over, tile records) and the loader also want. On an H200 the pipeline's batches
    ran ~10 % below the bare models' pace, the loss going with that work beside the models. A replay
    is one call. Whether it pays there is not yet measured (``gpu_throughput.sh``, ``BIG_GRAPHS``).
    The graph keeps its own input and output tensors, and its activations in a memory pool of its
    own (one per model stream, so two streams replay at once): the outputs are read back before the
    stream replays again."""

    def __init__(self, forward: Callable[[torch.Tensor], tuple], example: torch.Tensor, device: torch.device,
                 stream: torch.cuda.Stream | None):
        self.lock = threading.Lock()  # held from a replay until its outputs are copied out
        self.input = torch.empty_like(example, device=device)  # the loader's channels-last strides kept
        self.input.copy_(example)
        side = stream or torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # cuDNN's algorithms and the allocator's first blocks, chosen eagerly
            for _ in range(2):
                forward(self.input)
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        # what torch.cuda.graph does, less the cache emptying it starts with: that handed the pinned
        # host blocks kept for the loader's batches (batching.reserve_pinned_batches) back to the
        # system, each to be made again for 28-80 ms. thread_local: the other model thread and the
        # loader's pin-memory thread go on meanwhile
        with torch.cuda.stream(side):
            self.graph.capture_begin(capture_error_mode="thread_local")
            try:
                self.outputs = forward(self.input)
            finally:
                self.graph.capture_end()

    def takes(self, tiles: torch.Tensor) -> bool:
        """Whether ``tiles`` has the captured input's shape, strides and dtype."""
        return tiles.shape == self.input.shape and tiles.stride() == self.input.stride() and tiles.dtype == self.input.dtype

    def replay(self, tiles: torch.Tensor) -> tuple:
        """:meth:`Predictor.forward` of ``tiles`` (on the host, pinned, or on the device), on the
        current stream; the outputs are the graph's own tensors, valid until the next replay."""
        self.input.copy_(tiles, non_blocking=True)
        self.graph.replay()
        return self.outputs


TRIM_SLACK = 192 << 20
"""Bytes a CPU run's model process may grow past its lowest resident memory since the heap was last
handed back before it is handed back again. Above what the models' batches in flight and the free
pages they reuse batch after batch take (within 4 batches of a hand-back the process is 140–190 MiB
up, 2-core VM, two streams of 4 tiles; handing back at 128 MiB came every ~4 batches, at 256 never
on a 25k² slide), so only growth beyond it is handed back: 4 times on a 25k² slide, 196 times on a
100k² one, where every 16 batches was 23 and 377 times."""


def _trimming(batches: Iterable[T], slack: int = TRIM_SLACK) -> Iterator[T]:
    """``batches``, handing the heap's free pages back to the system (``malloc_trim``) whenever this
    process's resident memory, read as each batch is taken, has risen ``slack`` bytes above its
    lowest reading since the last time.

    On a CPU the models' activations, ~17.5 MiB per tile, are freed into this process's heap, and
    glibc keeps there what it cannot return from the heap's top: batch after batch lands on other
    free pages and the process grows. Handing back every 16 batches (~7 s on 2 cores) let it grow
    by a different amount each time (the model process of a 100k² run: 731 → 1,030 MiB within one
    interval, ~110 as a rule), and a long slide, with 377 intervals against the 25k² slide's 23,
    met the largest growths: its peak grew with the slide's length. A bound on the growth itself
    holds whatever the length: the 100k² run's peak fell from 1,404 to 1,312 MiB (with the closed
    slide's decoded tiles freed too, ~25 of it in the reader; the model process's peak 1,030 → 964;
    5-minute maxima 1,266–1,312 over the hour, where they had climbed from 1,314 to 1,404), the
    25k² run's held (1,230 MiB), at the same speed (3,085 and 184 s). Each hand-back costs the pages that the next
    batches fault in again (25k² slide: every 4 batches, 211 s against 190 every 16)."""
    low = resident_bytes()
    for batch in batches:
        now = resident_bytes()
        if now is not None and low is not None:
            if now - low > slack:
                release_freed_memory()
                low = resident_bytes() or now
            else:
                low = min(low, now)
        yield batch
