"""Model streams (on a CPU, and on CUDA where there is one): several batches in the models at once give
what one at a time gives."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from wsi_medcam.bundles import load_classifier, load_segmenter
from wsi_medcam.config import InferenceConfig
from wsi_medcam.cpus import usable_cores
from wsi_medcam.inference import Predictor, bf16_supported, default_streams, resolve_precision


@pytest.fixture(scope="module")
def models(bundles):
    clf, seg = bundles
    return load_classifier(clf), load_segmenter(seg)


def _batches(n: int, size: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [(torch.randint(0, 256, (size, 3, 224, 224), dtype=torch.uint8, generator=gen),
             torch.arange(k * size, (k + 1) * size)) for k in range(n)]


def test_streams_give_the_same_results_in_order(models):
    clf, seg = models
    batches = _batches(5)
    threads = torch.get_num_threads()
    one = list(Predictor(clf, seg, InferenceConfig(device="cpu", precision="fp32", streams=1)).run(batches))
    streamed = Predictor(clf, seg, InferenceConfig(device="cpu", precision="fp32", streams=3))
    assert streamed.streams == 3 and streamed.threads_per_stream == 1
    many = list(streamed.run(iter(batches)))
    assert [r.indices.tolist() for r in many] == [b[1].tolist() for b in batches]
    for a, b in zip(one, many):
        np.testing.assert_allclose(a.probs, b.probs, atol=1e-5)
        # one torch thread instead of several: summation order may move a px across a level's edge
        assert b.evidence.dtype == np.uint8 and _level_gap(a.evidence, b.evidence) <= 1
        assert a.kept.keys() == b.kept.keys()
    assert torch.get_num_threads() == threads, "the streams' one torch thread each is not left as the default"


def _level_gap(a: np.ndarray, b: np.ndarray) -> int:
    """The largest difference between two uint8 evidence arrays, in levels."""
    return int(np.abs(a.astype(int) - b.astype(int)).max())


def test_evidence_is_the_segmenters_sigmoid_in_255_levels(models):
    """Rounded on the device to uint8 levels: round(255 · soft), hard (>= 128) exactly where soft >= 0.5."""
    clf, seg = models
    tiles, _ = _batches(1)[0]
    predictor = Predictor(clf, seg, InferenceConfig(device="cpu", precision="fp32", streams=1, certify_fills=()))
    _, evidence, _ = predictor.predict(tiles)
    with torch.no_grad():
        mean, std = (torch.tensor(v).view(1, 3, 1, 1) * 255 for v in (clf.config.mean, clf.config.std))
        soft = torch.sigmoid(seg.model((tiles.float() - mean) / std))[:, 0].numpy().astype(np.float64)
    assert evidence.dtype == np.uint8 and evidence.shape == soft.shape
    assert _level_gap(evidence, np.clip(np.floor(soft * 255 + 0.5), 0, 255).astype(np.uint8)) <= 1
    far = np.abs(soft - 0.5) > 1e-4  # away from a tie, the hard evidence is soft >= 0.5
    np.testing.assert_array_equal((evidence >= 128)[far], (soft >= 0.5)[far])
    assert 0 < (evidence >= 128).mean() < 1 and len(np.unique(evidence)) > 16, "a real soft mask, not a constant"


def test_an_error_in_a_stream_is_raised_and_the_rest_is_dropped(models):
    clf, seg = models
    predictor = Predictor(clf, seg, InferenceConfig(device="cpu", precision="fp32", streams=2, certify_fills=()))
    batches = _batches(8)
    real, calls = predictor.predict, []

    def predict(tiles):
        calls.append(tiles)
        if tiles is batches[1][0]:
            raise RuntimeError("decoder broke")
        return real(tiles)

    predictor.predict = predict
    results = predictor.run(batches)
    assert next(results).indices.tolist() == [0, 1, 2, 3]
    with pytest.raises(RuntimeError, match="decoder broke"):
        next(results)
    # the streams' batches and as many queued behind them, and the one being submitted: not all 8
    assert len(calls) <= 2 * predictor.streams + 1


def test_default_streams():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert default_streams(cpu, None) == usable_cores()
    assert default_streams(cpu, 2) == max(1, usable_cores() // 2)
    assert default_streams(cuda, None) == 2
    assert default_streams(torch.device("mps"), None) == 1


@pytest.mark.parametrize("capability, dtype", [((7, 5), torch.float16), ((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16)])
def test_auto_precision_on_cuda_takes_bf16_from_ampere_only(monkeypatch, capability, dtype):
    """torch.cuda.is_bf16_supported() says yes on a T4 or V100 (7.x), where bf16 is only emulated:
    "auto" took it there, slower than fp32, and train-cam's autocast with it."""
    asked = []
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: asked.append(device) or capability)
    device = torch.device("cuda:1")
    assert resolve_precision("auto", device) is dtype
    assert bf16_supported(device) is (dtype is torch.bfloat16)
    assert asked == [device, device]  # the device the models are on, not the current one


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("precision, atol", [("fp32", 1e-4), ("bf16", 1e-2)])
def test_cuda_streams_give_the_same_results_each_batch_on_its_own_stream(models, monkeypatch, precision, atol):
    """On an H200, bf16 with streams gave NaN masks while autocast shared its weight casts across them."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # fp32 means fp32, whichever kernels run
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    clf, seg = models
    batches = [(tiles.pin_memory(), indices) for tiles, indices in _batches(12, size=16)]
    one = list(Predictor(clf, seg, InferenceConfig(device="cuda", precision=precision, streams=1)).run(batches))
    streamed = Predictor(clf, seg, InferenceConfig(device="cuda", precision=precision, streams=3))
    assert streamed.streams == 3
    real, used = streamed.predict, []

    def predict(tiles):
        used.append(torch.cuda.current_stream().cuda_stream)
        return real(tiles)

    streamed.predict = predict
    many = list(streamed.run(iter(batches)))
    assert [r.indices.tolist() for r in many] == [b[1].tolist() for b in batches]
    for a, b in zip(one, many):
        assert np.isfinite(b.probs).all()
        np.testing.assert_allclose(a.probs, b.probs, atol=atol)
        assert _level_gap(a.evidence, b.evidence) <= max(1, round(atol * 255)), "NaN masks come out as 0 levels"
    default = torch.cuda.default_stream().cuda_stream
    assert len(set(used)) == 3 and default not in used, "batches did not run on their own CUDA streams"


def test_cuda_graphs_are_taken_only_where_the_forward_can_be_replayed():
    from wsi_medcam.inference import _graphable

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert _graphable(InferenceConfig(cuda_graphs=True, certify_fills=("mean", "white", "blur")), cuda)
    assert not _graphable(InferenceConfig(), cuda), "off unless asked for"
    assert not _graphable(InferenceConfig(cuda_graphs=True), cpu)
    assert not _graphable(InferenceConfig(cuda_graphs=True, certify_fills=("mean", "noise")), cuda), "drawn per batch"
    assert not _graphable(InferenceConfig(cuda_graphs=True, explainer="gradcam"), cuda), "backward passes through hooks"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("streams", [1, 2])
def test_cuda_graphs_give_what_the_models_give_eagerly(models, monkeypatch, streams):
    """Batches of the configured size replay each model stream's graph, captured once and kept for
    the next run; a last, smaller batch runs eagerly. Outputs as eager ones, and two replays alike."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    clf, seg = models
    batches = [(tiles.pin_memory(), indices) for tiles, indices in _batches(7, size=16) + _batches(1, size=5)]
    settings = {"device": "cuda", "precision": "fp32", "streams": streams, "batch_size": 16}
    eager = list(Predictor(clf, seg, InferenceConfig(**settings)).run(batches))
    graphed = Predictor(clf, seg, InferenceConfig(**settings, cuda_graphs=True))
    first, second = list(graphed.run(batches)), list(graphed.run(iter(batches)))
    assert len(graphed._graphs) == streams, "one graph per model stream, reused by the second run"
    assert [r.indices.tolist() for r in second] == [b[1].tolist() for b in batches]
    for a, b, c in zip(eager, first, second):
        np.testing.assert_allclose(b.probs, a.probs, atol=1e-4)
        assert _level_gap(a.evidence, b.evidence) <= 1
        np.testing.assert_array_equal(c.probs, b.probs)
        np.testing.assert_array_equal(c.evidence, b.evidence)
        assert b.kept.keys() == a.kept.keys() == {"mean", "white"}
        assert all(np.mean(b.kept[f] == a.kept[f]) >= 0.9 for f in a.kept)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_reserved_pinned_blocks_serve_the_loaders_batches():
    """On CUDA, batches pinned after :func:`reserve_pinned_batches` (as the loader's pin-memory
    thread pins them) take the reserved blocks: torch's host allocator makes no new one for them."""
    from wsi_medcam.batching import reserve_pinned_batches

    nbytes = 5 * 3 * 224 * 224 + 7  # not a power of two: the allocator rounds a block up
    reserve_pinned_batches(3, nbytes)
    made = torch.cuda.host_memory_stats()["num_host_alloc"]
    batches = [torch.ones(nbytes, dtype=torch.uint8).pin_memory() for _ in range(3)]
    assert all(b.is_pinned() and int(b[-1]) == 1 for b in batches)
    assert torch.cuda.host_memory_stats()["num_host_alloc"] == made
    batches.append(torch.ones(nbytes, dtype=torch.uint8).pin_memory())  # one more than reserved
    assert torch.cuda.host_memory_stats()["num_host_alloc"] == made + 1


def test_gradcam_runs_one_batch_at_a_time(models):
    clf, _ = models
    assert Predictor(clf, None, InferenceConfig(device="cpu", explainer="gradcam", streams=4)).streams == 1


@pytest.mark.parametrize("streams", [1, 2])
def test_cpu_runs_hand_freed_memory_back_once_the_process_grew_by_the_slack(models, monkeypatch, streams):
    """The heap is handed back when the resident memory read as a batch is taken has risen
    TRIM_SLACK above its lowest reading since the last hand-back, whatever the number of batches."""
    import wsi_medcam.inference as inference

    clf, _ = models
    step = int(inference.TRIM_SLACK / 12.5)  # 12 steps stay under the slack, 13 go over it
    resident = 1000 << 20
    trims: list[int] = []
    predictor = Predictor(clf, None, InferenceConfig(device="cpu", precision="fp32", streams=streams, certify_fills=()))
    pulled = 0

    def loader():  # each batch leaves a step more of free pages resident; a dip of 3 at the 3rd
        nonlocal pulled, resident
        for batch in _batches(40, size=1):
            pulled += 1
            resident += -3 * step if pulled == 3 else step
            yield batch

    def trim():
        nonlocal resident
        trims.append(pulled)
        resident = (1000 << 20) - step
        return True

    monkeypatch.setattr(inference, "resident_bytes", lambda: resident)
    monkeypatch.setattr(inference, "release_freed_memory", trim)
    results = [r.indices.tolist() for r in predictor.run(loader())]
    assert results == [[k] for k in range(40)], "every batch, in order"
    # the lowest reading is the 3rd; 13 steps above it at the 16th; 13 steps above the hand-back at the 29th
    assert trims == [16, 29], "once the slack above the lowest reading since the last hand-back is exceeded"


def test_certification_reclassifies_the_tile_with_only_its_hard_evidence_kept():
    """kept[fill]: the classifier's class for the tile with its hard evidence as written (level ≥ 128,
    soft ≥ 0.5) kept and the rest replaced by the fill, equal to its class for the whole tile. A toy pair with a known
    answer: the classifier says class 1 iff the top-left 64² square is bright (normalised mean > 1),
    and the evidence is fixed per tile. The mean fill is 0 (dark to this classifier), white is
    (1 - 0.5) / 0.25 = 2 (bright)."""
    from types import SimpleNamespace

    class Square(torch.nn.Module):
        def forward(self, x):
            s = x[:, :, :64, :64].mean(dim=(1, 2, 3))
            return torch.stack([torch.zeros_like(s), 8 * (s - 1)], 1)

    tiles = torch.full((5, 3, 224, 224), 128, dtype=torch.uint8)  # 128: normalised ~0.008, dark
    tiles[[0, 1, 2, 4], :, :64, :64] = 250  # 250: normalised 1.92, bright; tile 3 has no bright square
    logits = torch.full((5, 1, 224, 224), -10.0)
    logits[0, :, :64, :64] = 2.2  # soft 0.90 on the square: hard evidence, all of what decides
    logits[1, :, :64, :64] = -0.4  # soft 0.40 on it: no hard evidence at all
    logits[2, :, :64, :64] = 0.4  # soft 0.60: hard, just over the threshold
    logits[3, :, 100:, 100:] = 2.2  # hard evidence away from the (dark) square
    logits[4, :, :64, :64] = 0.0  # soft exactly 0.5: written as level 128, hard evidence, so certified as such

    class Fixed(torch.nn.Module):
        def forward(self, x):
            return logits[: len(x)].to(x.dtype)

    stats = SimpleNamespace(arch="toy", mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    predictor = Predictor(SimpleNamespace(config=stats, model=Square()),
                          SimpleNamespace(config=SimpleNamespace(mean=None, std=None), model=Fixed()),
                          InferenceConfig(device="cpu", precision="fp32", streams=1, certify_fills=("mean", "white")))
    probs, evidence, kept = predictor.predict(tiles)
    assert probs.argmax(1).tolist() == [1, 1, 1, 0, 1]
    assert (evidence >= 128).any(axis=(1, 2)).tolist() == [True, False, True, True, True]
    # 0, 2: the square kept, class 1 under any fill; 1: all fill, class 1 only where the fill is
    # bright (white); 3: the square filled, class 0 only where the fill is dark (mean)
    assert kept["mean"].tolist() == [True, False, True, True, True]
    assert kept["white"].tolist() == [True, True, True, False, True]
