"""The ``wsi-medcam`` command line: thin wrappers that build a config, call one API function, and turn
this package's errors into one readable line and a non-zero exit status."""

from __future__ import annotations

import json
import logging
import math
import os
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from .config import RunConfig, check_device_name, format_validation_error
from .errors import WsiMedcamError
from .inputs import expand_slides

if TYPE_CHECKING:
    from .slide import MppOverrides

app = typer.Typer(
    help="Med-CAM minimal-evidence explanations for patch classifiers on whole-slide images.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)
# results on stdout: piped or redirected, rich assumes 80 columns and folds or cuts wider tables
# (eval's has 12 columns); there they take the width they need. COLUMNS, where set, still decides
out_console = Console(width=None if sys.stdout.isatty() or "COLUMNS" in os.environ else 200)



def _bar(*, time_left: bool = True) -> Progress:
    """A progress bar on stderr: what it is doing, the bar, done of total, time taken (and the
    time left, estimated from the rate so far)."""
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    return Progress(*columns, *([TimeRemainingColumn()] if time_left else []), console=console)


def _fail(message: str, code: int = 2) -> typer.Exit:
    console.print(f"[red]error:[/red] {escape(message)}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


def _interrupted(line: str) -> typer.Exit:
    """Ctrl-C: ``line`` ("interrupted: " and what is kept), exit status 130 (typer ended silently)."""
    console.print(f"[yellow]{escape(line)}[/yellow]", highlight=False, soft_wrap=True)
    return typer.Exit(130)


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _error_line(exc: BaseException) -> str:
    """One line a user can act on: a pydantic error's fields, or the first line of the message
    without terminal colour codes (torch's refusals carry them)."""
    if isinstance(exc, ValidationError):
        return format_validation_error(exc)
    lines = [line for line in _ANSI.sub("", str(exc)).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def _slides_and_resolutions(items: list[str], mpp: float | None) -> tuple[list[Path], MppOverrides]:
    """The slides that files, globs, folders and manifests name, and the µm/px for those without
    one: ``mpp`` (``--mpp``) and the manifests' mpp column."""
    from .slide import MppOverrides, read_mpp_csvs  # cv2 and numpy: not for --help

    paths, manifests = expand_slides(items)
    return paths, MppOverrides(mpp, read_mpp_csvs(manifests))


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING, format="%(message)s",
                        handlers=[RichHandler(console=console, show_path=False, show_time=False)], force=True)
    logging.getLogger("tifffile").setLevel(logging.ERROR)  # its warnings repeat what our one-line errors say


@app.command()
def demo(
    out: Annotated[Path, typer.Option("-o", "--out", help="where the demo writes everything")] = Path("wsi-medcam-demo"),
    steps: Annotated[int, typer.Option(help="Med-CAM training steps")] = 200,
    epochs: Annotated[int, typer.Option(help="classifier training epochs")] = 8,
) -> None:
    """Start here: builds a slide with known evidence, trains a classifier and Med-CAM, runs the pipeline with
    Med-CAM and Grad-CAM, and scores both against the truth. Offline, CPU, a few minutes."""
    from .demo import run_demo

    _setup_logging(False)
    try:
        summary = run_demo(out, epochs=epochs, cam_steps=steps,
                           step=lambda msg: console.print(f"[bold]•[/bold] {msg}", highlight=False))
    except (WsiMedcamError, ValueError, OSError, RuntimeError) as exc:
        raise _fail(_error_line(exc)) from None
    table = Table(title="evidence vs the planted truth", title_justify="left")
    for col in ("method", "IoU", "pointing game", "evidence area", "truth area", "certified (mean fill)", "outputs"):
        table.add_column(col)
    for name, m in summary["methods"].items():
        table.add_row(name, f"{m['iou']:.3f}", f"{m['pointing_game']:.2f}", f"{m['evidence_area']:.4f}",
                      f"{m['truth_area']:.4f}", f"{m['certified'].get('mean', float('nan')):.2f}", m["output"])
    out_console.print(table)
    out_console.print(f"classifier validation accuracy {summary['classifier_val_accuracy']:.3f}; "
                      f"summary in {out / 'demo.json'}; open the outputs as described in the README.")


@app.command()
def info(
    slides: Annotated[list[str], typer.Argument(help="slide files, globs or folders")],
    backend: Annotated[str, typer.Option(help="auto (OpenSlide, then tiffslide), openslide or tiffslide")] = "auto",
    mpp: Annotated[Optional[float], typer.Option(help="µm/px to assume when the slide has none")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON document on stdout")] = False,
) -> None:
    """Show vendor, backend, levels, microns per pixel (and where it came from) and associated images."""
    from .slide import BACKENDS, open_slide

    if backend not in BACKENDS:
        raise _fail(f"--backend {backend}: use {', '.join(BACKENDS[:-1])} or {BACKENDS[-1]}")
    try:
        paths, overrides = _slides_and_resolutions(slides, mpp)
    except WsiMedcamError as exc:  # a manifest that cannot be read
        raise _fail(_error_line(exc)) from None
    if not paths:
        raise _fail("no slides matched")
    described, failed = [], 0
    for path in paths:
        try:
            with open_slide(path, backend=backend, overrides=overrides) as slide:  # type: ignore[arg-type]
                described.append(slide.describe())
        except WsiMedcamError as exc:
            failed += 1
            described.append({"path": str(path), "error": str(exc)})
            if not as_json:
                console.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False, soft_wrap=True)
    if as_json:
        out_console.print_json(json.dumps(described))  # a list however many slides matched, for scripts
    else:
        for d in described:
            if "error" in d:
                continue
            table = Table(title=escape(Path(d["path"]).name), title_justify="left", show_header=True)
            table.add_column("level")
            table.add_column("width × height")
            table.add_column("downsample")
            table.add_column("µm/px")
            for i, lvl in enumerate(d["levels"]):
                w, h = lvl["dimensions"]
                table.add_row(str(i), f"{w} × {h}", f"{lvl['downsample']:.4g}", f"{d['mpp']['x'] * lvl['downsample']:.4g}")
            out_console.print(table)
            out_console.print(f"  vendor: {d['vendor'] or 'unknown'}   backend: {d['backend']}   "
                              f"mpp: {d['mpp']['x']:.4g} × {d['mpp']['y']:.4g} ({d['mpp']['source']})   "
                              f"associated: {', '.join(d['associated_images']) or 'none'}", highlight=False)
    if failed:
        raise typer.Exit(1)


@app.command()
def run(
    slides: Annotated[list[str], typer.Argument(help="slide files, globs, folders, or manifest CSVs (path[,mpp] rows)")],
    out: Annotated[Path, typer.Option("-o", "--out", help="output folder; one sub-folder per slide")] = Path("wsi-medcam-out"),
    classifier: Annotated[Optional[Path], typer.Option(help="classifier bundle folder")] = None,
    segmenter: Annotated[Optional[Path], typer.Option(help="Med-CAM segmenter bundle; omit for a classify-only run")] = None,
    config: Annotated[Optional[Path], typer.Option(help="YAML config (see configs/default.yaml); flags override it")] = None,
    backend: Annotated[Optional[str], typer.Option(help="auto, openslide or tiffslide")] = None,
    mpp: Annotated[Optional[float], typer.Option(help="µm/px for slides whose metadata has none")] = None,
    mpp_csv: Annotated[Optional[Path], typer.Option(help="CSV of path,mpp for slides without metadata (before manifests' mpp columns)")] = None,
    tile_mpp: Annotated[Optional[float], typer.Option(help="override the classifier's µm/px (warns)")] = None,
    tile_size: Annotated[Optional[int], typer.Option(help="override the classifier's tile size, px (warns)")] = None,
    overlap: Annotated[Optional[int], typer.Option(help="tile overlap, px at the tile resolution")] = None,
    min_tissue: Annotated[Optional[float], typer.Option(help="minimum tissue fraction of a kept tile, 0–1")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="tiles per batch (default 256 on CUDA, 4 per stream on CPU)")] = None,
    workers: Annotated[Optional[int], typer.Option(help="DataLoader reader processes")] = None,
    device: Annotated[Optional[str], typer.Option(help="auto, cpu, cuda, cuda:N")] = None,
    precision: Annotated[Optional[str], typer.Option(help="auto, fp32, bf16 or fp16")] = None,
    threads: Annotated[Optional[int], typer.Option(help="torch CPU threads (per model stream)")] = None,
    streams: Annotated[Optional[int], typer.Option(help="batches in the models at once (default: on a CPU one per core, on CUDA 2, each on its own CUDA stream)")] = None,
    cuda_graphs: Annotated[bool, typer.Option("--cuda-graphs", help="on CUDA, replay the models as one CUDA graph per model stream (Med-CAM without random certification fills)")] = False,
    mask_mpp: Annotated[Optional[float], typer.Option(help="µm/px of the evidence store's level 0 (default: the slide's)")] = None,
    stitchers: Annotated[Optional[int], typer.Option(help="stitching processes (default: 5/8 of the cores on CUDA, the readers having 3/8; 0 on CPU: stitch in the model process)")] = None,
    explainer: Annotated[Optional[str], typer.Option(help="medcam (needs --segmenter), gradcam, gradcam++, hirescam, layercam, scorecam")] = None,
    refine: Annotated[Optional[int], typer.Option(help="refine the K most confident tiles per class with per-image Med-CAM")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="redo slides that are already finished")] = False,
    dask: Annotated[Optional[str], typer.Option("--dask", help="local or local:N — a dask LocalCluster of N worker processes")] = None,
    scheduler: Annotated[Optional[str], typer.Option(help="address of an existing dask scheduler, e.g. tcp://host:8786")] = None,
    slurm: Annotated[Optional[Path], typer.Option(help="start SLURM workers through dask-jobqueue (see configs/slurm.yaml)")] = None,
    verbose: Annotated[bool, typer.Option("-v", "--verbose", help="debug log, with tracebacks of failed slides")] = False,
) -> None:
    """Tissue → tiles → classifier (+ segmenter) → OME-Zarr evidence, GeoJSON, CSV, overview and report per slide.

    Finished slides are skipped on a rerun; a failed slide is reported and the others go on; the exit status is 1 if any slide failed, 130 after Ctrl-C.
    """
    from .batch import INTERRUPTED, run_archive
    from .pipeline import load_models, start_tissue_ahead
    from .slide import read_mpp_csvs

    _setup_logging(verbose)
    overrides = {
        "classifier": classifier, "segmenter": segmenter,
        "slide.backend": backend, "slide.mpp": mpp, "slide.mpp_csv": mpp_csv,
        "tiling.mpp": tile_mpp, "tiling.tile_size": tile_size, "tiling.overlap": overlap, "tiling.min_tissue": min_tissue,
        "inference.batch_size": batch_size, "inference.workers": workers, "inference.device": device,
        "inference.precision": precision, "inference.threads": threads,
        "inference.streams": streams, "inference.explainer": explainer, "inference.refine": refine,
        "inference.cuda_graphs": cuda_graphs or None, "output.mask_mpp": mask_mpp, "output.stitchers": stitchers, "output.overwrite": overwrite or None,
    }
    ahead = client = None
    try:
        if sum(x is not None for x in (dask, scheduler, slurm)) > 1:
            raise WsiMedcamError("choose one of --dask, --scheduler, --slurm")
        paths, manifests = expand_slides(slides)
        if not paths:
            raise WsiMedcamError("no slides matched " + " ".join(slides))
        overrides["slide.mpp_csv"] = [str(p) for p in [*([mpp_csv] if mpp_csv else []), *manifests]] or None
        cfg = RunConfig.from_yaml(config, {k: (str(v) if isinstance(v, Path) else v) for k, v in overrides.items()})
        read_mpp_csvs(cfg.slide.mpp_csv)  # an unreadable or malformed CSV: one line now, not one per slide
        if dask or scheduler or slurm:  # dask is imported only when asked for (memory of plain runs)
            from .distributed import client_for, close_client, split_local_cores

            if dask:  # the workers share this machine's cores
                cfg = split_local_cores(dask, cfg)

            logging.getLogger("distributed").setLevel(logging.WARNING)  # importing it applied dask's INFO
            client = client_for(dask_spec=dask, scheduler=scheduler, slurm=slurm)
        # the first slide's tissue found while the models load (on a GPU; see start_tissue_ahead)
        ahead = None if client else start_tissue_ahead(paths, out, cfg)
        models = None if client else load_models(cfg)
    except (WsiMedcamError, KeyboardInterrupt) as exc:  # Ctrl-C while the models load: nothing was written yet
        if ahead is not None:
            ahead.close()
        if client is not None:
            close_client(client)
        if isinstance(exc, KeyboardInterrupt):
            raise _interrupted(INTERRUPTED) from None
        raise _fail(_error_line(exc)) from None

    try:
        with _bar() as bar:
            overall = bar.add_task("slides", total=len(paths))
            tiles_task = bar.add_task("tiles", total=None, visible=client is None)

            def on_progress(name: str, done: int, total: int) -> None:
                bar.update(tiles_task, description=f"{name[:40]}", completed=done, total=total)

            def on_result(result) -> None:  # noqa: ANN001
                bar.advance(overall)
                colour = {"done": "green", "skipped": "yellow", "failed": "red"}[result.status]
                bar.console.print(f"[{colour}]{result.status}[/{colour}] {escape(f'{result.path}  {result.reason}')}", highlight=False,
                                  soft_wrap=True)

            results = run_archive(paths, out, cfg, client=client, models=models, progress=on_progress,
                                  on_result=on_result, ahead=ahead)
    except WsiMedcamError as exc:
        raise _fail(_error_line(exc)) from None
    except KeyboardInterrupt:
        raise _interrupted(INTERRUPTED) from None
    finally:
        if ahead is not None:  # where the slides did not start (run_slides closes it)
            ahead.close()
        if client is not None:
            close_client(client)
    failed = [r for r in results if r.status == "failed"]
    summary = {s: sum(r.status == s for r in results) for s in ("done", "skipped", "failed")}
    console.print(f"{summary['done']} done, {summary['skipped']} skipped, {summary['failed']} failed → {out} "
                  f"(status in {out / 'status.jsonl'})")
    if failed:
        raise typer.Exit(1)


@app.command("export-tiff")
def export_tiff_cmd(
    folders: Annotated[list[Path], typer.Argument(help="slide output folders (OUT/<slide>), or OUT for all of them")],
    labels: Annotated[bool, typer.Option("--labels", help="also the class labels, as evidence-labels.ome.tif")] = False,
) -> None:
    """Write each slide's evidence as a pyramidal OME-TIFF (evidence.ome.tif) beside its OME-Zarr store,
    for QuPath 0.5 and older and other viewers without Zarr: same levels, µm/px in the OME-XML."""
    from .export.ome_tiff import write_ome_tiff

    stores: list[Path] = []
    for folder in folders:  # a slide's folder, or a run's OUT holding them
        own = folder / "evidence.ome.zarr"
        stores += [own] if own.is_dir() else sorted(folder.glob("*/evidence.ome.zarr"))
    if not stores:
        raise _fail("no evidence.ome.zarr in " + " ".join(map(str, folders)) + " (classify-only runs have none)")
    jobs = [(s, s.parent / "evidence.ome.tif") for s in stores]
    jobs += [(s / "labels" / "evidence", s.parent / "evidence-labels.ome.tif") for s in stores] if labels else []
    try:
        with _bar(time_left=False) as bar:
            for store, target in jobs:
                task = bar.add_task(f"{target.parent.name[:40]}/{target.name}", total=None)
                write_ome_tiff(store, target,
                               progress=lambda rows, total, task=task: bar.update(task, advance=rows, total=total))
                bar.console.print(f"[green]written[/green] {target}", highlight=False)
    except WsiMedcamError as exc:
        raise _fail(_error_line(exc)) from None


@app.command("import-classifier")
def import_classifier_cmd(
    out: Annotated[Path, typer.Option("-o", "--out", help="bundle folder to create")],
    arch: Annotated[str, typer.Option(help="timm model name, e.g. resnet18")],
    classes: Annotated[str, typer.Option(help="comma-separated class names, in output order")],
    mpp: Annotated[float, typer.Option(help="µm/px the model was trained at")],
    tile_size: Annotated[int, typer.Option(help="input tile edge, px")],
    weights: Annotated[Optional[Path], typer.Option(help=".safetensors, or .pth/.pt state_dict (loaded weights_only)")] = None,
    untrained: Annotated[bool, typer.Option("--untrained", help="random weights, for experiments and tests")] = False,
    mean: Annotated[str, typer.Option(help="normalisation mean r,g,b")] = "0.485,0.456,0.406",
    std: Annotated[str, typer.Option(help="normalisation std r,g,b")] = "0.229,0.224,0.225",
) -> None:
    """Convert a timm state_dict checkpoint into a classifier bundle (config.json + model.safetensors)."""
    from .bundles import ClassifierConfig, import_classifier

    if (weights is None) == (not untrained):
        raise _fail("give exactly one of --weights FILE or --untrained")
    try:
        cfg = ClassifierConfig(arch=arch, class_names=[c.strip() for c in classes.split(",") if c.strip()], mpp=mpp,
                               tile_size=tile_size, mean=_floats(mean), std=_floats(std))
        path = import_classifier(cfg, out, weights=weights)
    except (WsiMedcamError, ValueError) as exc:
        raise _fail(_error_line(exc)) from None
    console.print(f"classifier bundle written to {path}")


@app.command("train-classifier")
def train_classifier_cmd(
    data: Annotated[Path, typer.Option(help="ImageFolder: one sub-folder of tiles per class")],
    out: Annotated[Path, typer.Option("-o", "--out", help="classifier bundle folder to create")],
    arch: Annotated[str, typer.Option(help="timm model name")] = "resnet18",
    mpp: Annotated[float, typer.Option(help="µm/px of the training tiles")] = 0.5,
    tile_size: Annotated[int, typer.Option(help="tile edge, px (tiles are resized to it)")] = 224,
    epochs: Annotated[int, typer.Option(min=1)] = 10,
    batch_size: Annotated[int, typer.Option(min=1)] = 32,
    lr: Annotated[float, typer.Option(help="peak learning rate (one-cycle)")] = 1e-3,
    val_fraction: Annotated[float, typer.Option(min=0.0, max=0.9, help="held-out share of the tiles")] = 0.2,
    weights: Annotated[Optional[Path], typer.Option(help="local initial weights (.safetensors or state_dict .pth)")] = None,
    seed: Annotated[int, typer.Option()] = 0,
) -> None:
    """Train a timm classifier (from scratch unless --weights) on labelled tiles and write its bundle."""
    from .bundles import ClassifierConfig, check_bundle_target, save_bundle
    from .classifier_training import load_image_folder, train_classifier

    try:
        check_bundle_target(out)  # refused before training, not after it
        images, labels, classes = load_image_folder(data, tile_size)
        cfg = ClassifierConfig(arch=arch, class_names=classes, mpp=mpp, tile_size=tile_size)
        with _bar(time_left=False) as bar:
            task = bar.add_task("epochs", total=epochs)

            def on_epoch(rec: dict[str, float]) -> None:
                bar.update(task, advance=1, description=f"loss {rec['loss']:.3f} {_accuracy(rec['val_accuracy'])}")

            result = train_classifier(images, labels, cfg, epochs=epochs, batch_size=batch_size, lr=lr,
                                      val_fraction=val_fraction, seed=seed, init_weights=weights, on_epoch=on_epoch)
        cfg = cfg.model_copy(update={"val_accuracy": result.val_accuracy, "train_tiles": int(len(labels))})
        save_bundle(result.model, cfg, out)
    except (WsiMedcamError, ValueError, OSError) as exc:
        raise _fail(_error_line(exc)) from None
    except KeyboardInterrupt:
        raise _interrupted(f"interrupted: no bundle written to {out}") from None
    console.print(f"{len(labels)} tiles, {len(classes)} classes, {_accuracy(result.val_accuracy)} → {out}")


@app.command("train-cam")
def train_cam_cmd(
    classifier: Annotated[Path, typer.Option(help="classifier bundle (frozen during training)")],
    out: Annotated[Path, typer.Option("-o", "--out", help="training folder: log, checkpoint, and segmenter/ bundle")],
    slides: Annotated[Optional[list[str]], typer.Option("--slides", help="sample tissue tiles from these slides: files, "
                      "quoted globs, folders or manifest CSVs (repeat --slides for more)")] = None,
    tiles: Annotated[Optional[Path], typer.Option(help="or read tiles from this folder (any layout)")] = None,
    config: Annotated[Optional[Path], typer.Option(help="YAML training config (see configs/train-cam.yaml)")] = None,
    steps: Annotated[Optional[int], typer.Option(help="optimisation steps")] = None,
    batch_size: Annotated[Optional[int], typer.Option()] = None,
    preset: Annotated[Optional[str], typer.Option(help="loss weights: minimal, notebook, paper-bach-vit, paper-ham-convnext, ...")] = None,
    mpp: Annotated[Optional[float], typer.Option(help="µm/px for slides without metadata")] = None,
    device: Annotated[Optional[str], typer.Option(help="auto (CUDA if present), cpu, cuda, cuda:N")] = None,
    verbose: Annotated[bool, typer.Option("-v", "--verbose")] = False,
) -> None:
    """Train the amortised Med-CAM segmenter label-free against a frozen classifier (resumes if interrupted)."""
    from .bundles import load_classifier
    from .config import read_yaml_mapping
    from .inference import resolve_device
    from .medcam.data import tiles_from_folder, tiles_from_slides
    from .medcam.train import CamTrainConfig, train_segmenter

    _setup_logging(verbose)
    if bool(slides) == bool(tiles):
        raise _fail("give either --slides (a folder, a quoted glob or a file; repeatable) or --tiles DIR")
    try:
        paths, overrides = _slides_and_resolutions(slides or [], mpp)
    except WsiMedcamError as exc:  # a manifest that cannot be read
        raise _fail(_error_line(exc)) from None
    if slides and not paths:
        raise _fail(f"no slides matched {' '.join(slides)}")
    try:
        data = read_yaml_mapping(config) if config else {}
        data.update({k: v for k, v in {"steps": steps, "batch_size": batch_size, "preset": preset, "device": device}.items() if v is not None})
        cfg = CamTrainConfig.model_validate(data)
        resolve_device(cfg.device)  # a missing GPU is refused before any tile is sampled
        bundle = load_classifier(classifier)
        size, tile_mpp = bundle.config.tile_size, bundle.config.mpp
        if tiles:
            images = tiles_from_folder(tiles, size)
        else:
            images = tiles_from_slides(paths, mpp=tile_mpp, tile_size=size, per_slide=cfg.tiles_per_slide,
                                       overrides=overrides, seed=cfg.seed)
        console.print(f"{len(images)} tiles of {size} px; training {cfg.steps} steps")
        with _bar() as bar:
            task = bar.add_task("train-cam", total=cfg.steps)

            def on_step(step: int, terms: dict[str, float]) -> None:
                bar.update(task, completed=step, description=f"loss {terms['total']:.2f} area {terms['area']:.3f}")

            path, summary = train_segmenter(bundle, images, cfg, out, on_step=on_step)
    except (WsiMedcamError, ValueError, OSError) as exc:  # a pydantic ValidationError is a ValueError
        raise _fail(_error_line(exc)) from None
    except KeyboardInterrupt:
        raise _interrupted(f"interrupted: the same command resumes from the last checkpoint in {out / 'checkpoint'}") from None
    console.print(f"segmenter bundle written to {path}; validation: {json.dumps(summary['validation'])}")


@app.command()
def explain(
    images: Annotated[list[Path], typer.Argument(help="tile images (png, jpg, tif)")],
    classifier: Annotated[Path, typer.Option(help="classifier bundle")],
    out: Annotated[Path, typer.Option("-o", "--out", help="folder for <name>.mask.png, .soft.png, .json")],
    segmenter: Annotated[Optional[Path], typer.Option(help="amortised segmenter bundle (one forward pass)")] = None,
    per_image: Annotated[bool, typer.Option("--per-image", help="optimise a fresh mask network per image (the paper's mode); with --segmenter: refine it")] = False,
    steps: Annotated[int, typer.Option(help="per-image: maximum steps")] = 880,
    lr: Annotated[float, typer.Option(help="per-image: Adam learning rate")] = 5e-5,
    preset: Annotated[str, typer.Option(help="per-image: loss weight preset")] = "minimal",
    device: Annotated[str, typer.Option(help="auto (CUDA if present), cpu, cuda, cuda:N")] = "auto",
) -> None:
    """Explain single tiles: evidence masks plus whether the evidence alone keeps the prediction."""
    from .bundles import load_classifier, load_segmenter
    from .inference import resolve_device
    from .medcam.explain import PerImageOptions, explain_files, models_to

    if segmenter is None and not per_image:
        raise _fail("give --segmenter DIR, --per-image, or both")
    try:
        where = resolve_device(check_device_name(device))
        clf = load_classifier(classifier)
        seg = load_segmenter(segmenter) if segmenter else None
        models_to(where, clf, seg)
        options = PerImageOptions(steps=steps, lr=lr, preset=preset) if per_image else None
        missing = [str(p) for p in images if not p.is_file()]
        if missing:
            raise WsiMedcamError(f"no such image: {missing[0]}")
        with _bar() as bar:
            task = bar.add_task("images", total=len(images))
            records = explain_files(clf, images, out, segmenter=seg, per_image=options,
                                    on_batch=lambda done: bar.update(task, advance=done))
    except (WsiMedcamError, ValueError, OSError) as exc:
        raise _fail(_error_line(exc)) from None
    except KeyboardInterrupt:
        raise _interrupted(f"interrupted: the images explained so far are in {out}, each with whole files") from None
    for rec in records:
        kept = ", ".join(f"{f}:{'yes' if v else 'no'}" for f, v in rec["keeps_prediction"].items())
        out_console.print(escape(f"{Path(rec['image']).name}: {rec['prediction']} ({rec['probability']:.2f}), "
                                 f"mask area {rec['mask_area']:.3f}, evidence keeps it [{kept}]"), highlight=False)


@app.command("eval")
def eval_cmd(
    classifier: Annotated[Path, typer.Option(help="classifier bundle")],
    tiles: Annotated[Path, typer.Option(help="folder of held-out tile images")],
    out: Annotated[Path, typer.Option("-o", "--out", help="report JSON to write")],
    segmenter: Annotated[Optional[Path], typer.Option(help="amortised Med-CAM segmenter bundle")] = None,
    baselines: Annotated[str, typer.Option(help="comma-separated: gradcam, gradcam++, hirescam, layercam, scorecam; empty for none")] = "gradcam,gradcam++",
    per_image: Annotated[bool, typer.Option("--per-image", help="also run per-image Med-CAM (slow): refining the segmenter when one is given, else from scratch")] = False,
    steps: Annotated[int, typer.Option(help="per-image: maximum steps")] = 880,
    device: Annotated[str, typer.Option(help="auto (CUDA if present), cpu, cuda, cuda:N")] = "auto",
) -> None:
    """Area, sufficiency under several fills, necessity, deletion/insertion AUC and runtime per method."""
    from .bundles import load_classifier, load_segmenter
    from .inference import resolve_device
    from .medcam.data import tiles_from_folder
    from .medcam.evaluate import evaluate
    from .medcam.explain import PerImageOptions, models_to
    from .replaced import replace_text

    methods = [b for b in baselines.split(",") if b]
    if segmenter is None and not per_image and not methods:
        raise _fail("nothing to evaluate: give --segmenter, --per-image or --baselines")
    try:
        where = resolve_device(check_device_name(device))
        out.parent.mkdir(parents=True, exist_ok=True)  # an unusable -o is refused before the evaluation, not after
        clf = load_classifier(classifier)
        seg = load_segmenter(segmenter) if segmenter else None
        models_to(where, clf, seg)
        images = tiles_from_folder(tiles, clf.config.tile_size)
        with _bar(time_left=False) as bar:  # methods take from milliseconds (Med-CAM) to minutes (per-image) a tile
            task = bar.add_task("methods", total=(seg is not None) + per_image + len(methods))
            report = evaluate(clf, images, segmenter=seg, baselines=methods,
                              per_image=PerImageOptions(steps=steps) if per_image else None,
                              on_method=lambda name: bar.update(task, advance=1, description=f"{name} done"))
        replace_text(out, json.dumps(report, indent=2) + "\n")
    except (WsiMedcamError, ValueError, OSError) as exc:
        raise _fail(_error_line(exc)) from None
    except KeyboardInterrupt:
        raise _interrupted(f"interrupted: no report written to {out}") from None
    out_console.print(metrics_table(report))


def metrics_table(report: dict) -> Table:
    """One row per method: the figures of :func:`wsi_medcam.medcam.evaluate.evaluate`."""
    fills = report["fills"]
    table = Table(title=f"{report['tiles']} tiles; null mask keeps: "
                  + ", ".join(f"{f} {v:.2f}" for f, v in report["null_mask_keeps"].items()), title_justify="left")
    for col in ["method", "area", *[f"suff {f}" for f in fills], "nec drop", "del AUC", "ins AUC", "IoU", "pointing", "s/tile"]:
        table.add_column(col, justify="right")
    for name, m in report["methods"].items():
        table.add_row(name, f"{m['area']:.3f}", *[f"{m['sufficiency'][f]:.2f}" for f in fills],
                      f"{m['necessity_drop']:.3f}", f"{m['deletion_auc']:.3f}", f"{m['insertion_auc']:.3f}",
                      f"{m['iou']:.3f}" if "iou" in m else "–", f"{m['pointing_game']:.2f}" if "pointing_game" in m else "–",
                      f"{m['seconds_per_tile']:.3f}")
    return table


@app.command("make-segmenter")
def make_segmenter_cmd(
    out: Annotated[Path, typer.Option("-o", "--out", help="bundle folder to create")],
    encoder: Annotated[str, typer.Option(help="segmentation-models-pytorch encoder")] = "resnet18",
    tile_size: Annotated[int, typer.Option(help="tile edge, px")] = 224,
) -> None:
    """Create an untrained Med-CAM segmenter bundle (U-Net, one logit channel), e.g. for tests."""
    from .bundles import SegmenterConfig, make_segmenter

    try:
        path = make_segmenter(SegmenterConfig(encoder=encoder, tile_size=tile_size), out)
    except (WsiMedcamError, ValueError) as exc:
        raise _fail(_error_line(exc)) from None
    console.print(f"segmenter bundle written to {path}")


def _accuracy(value: float) -> str:
    """Held-out accuracy for the console; NaN where no tile was held out (``--val-fraction 0``)."""
    return "no validation tiles" if math.isnan(value) else f"validation accuracy {value:.3f}"


def _floats(text: str) -> tuple[float, float, float]:
    values = tuple(float(v) for v in text.split(","))
    if len(values) != 3:
        raise ValueError(f"expected three comma-separated numbers, got '{text}'")
    return values  # type: ignore[return-value]


if __name__ == "__main__":
    app()
