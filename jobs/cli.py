"""The `segmill` command line: it parses, loads the config, and calls one library function per command."""
from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape

from segmill.pipeline.storage import redact

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="segmill: semantic segmentation at scale (bulk inference on Ray, results in Parquet).")
console = Console()
errors = Console(stderr=True, soft_wrap=True)  # soft wrap: a path in a message stays copyable


def _fail(exc: Exception) -> None:
    errors.print(f"[red]error:[/red] {escape(redact(str(exc)))}", highlight=False)
    raise typer.Exit(code=2)


@app.callback()
def _main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Log progress (INFO).")) -> None:
    root = logging.getLogger()
    if not any(isinstance(h, _CurrentStderrHandler) for h in root.handlers):
        handler = _CurrentStderrHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
    root.setLevel(logging.INFO if verbose else logging.WARNING)


class _CurrentStderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time, not the one at set-up: tests (CliRunner) swap and close it
    between invocations of the app in one process."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


@app.command()
def segment(
    input: Optional[str] = typer.Argument(None, help="Image prefix (local, file://, s3://...) or a manifest (.parquet/.csv with image_uri[,label_uri])."),
    output: Optional[str] = typer.Argument(None, help="Results folder (local or object storage) for Parquet parts and _job.json."),
    model: Optional[str] = typer.Option(None, help="Checkpoint path/URI, models:/NAME@ALIAS (registry at $MLFLOW_TRACKING_URI), or ARCH:TORCHVISION_TAG."),
    labels: Optional[str] = typer.Option(None, help="Label prefix, paired with images by relative path and stem: adds IoU columns."),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML job spec; command-line values override it."),
    job_id: Optional[str] = typer.Option(None, help="Job id (default: derived from the spec, so re-running resumes)."),
    address: Optional[str] = typer.Option(None, help="Ray cluster address (default: $RAY_ADDRESS or an in-process Ray)."),
    endpoint_url: Optional[str] = typer.Option(None, help="S3-compatible endpoint (default: $AWS_ENDPOINT_URL)."),
    scales: Optional[str] = typer.Option(None, help="Multi-scale inference, e.g. '0.75,1,1.25' (softmax averaged)."),
    flip: Optional[bool] = typer.Option(None, "--flip/--no-flip", help="Average with the horizontally flipped image."),
    batch_size: Optional[int] = typer.Option(None, help="Images per model call (default from the cluster)."),
    actors: Optional[int] = typer.Option(None, help="Most model actors (default from the cluster)."),
    gpus_per_actor: Optional[float] = typer.Option(None, help="GPUs per actor (default 1 where GPUs exist)."),
    max_pixels: Optional[int] = typer.Option(None, help="Images with more pixels become error rows (decompression bombs)."),
    export_png: Optional[bool] = typer.Option(None, "--export-png/--no-export-png", help="Also write colour masks and overlays as PNG."),
) -> None:
    """Segment every image under INPUT and write one Parquet row per image to OUTPUT."""
    from segmill.pipeline import SegmentConfig
    from segmill.pipeline import segment as run_segment

    try:
        scale_list = [float(s) for s in scales.split(",")] if scales else None
    except ValueError:
        _fail(ValueError(f"--scales {scales!r} must be numbers separated by commas, e.g. 0.75,1,1.25."))
    values = dict(input=input, output=output, model=model, labels=labels, job_id=job_id, ray_address=address,
                  endpoint_url=endpoint_url, flip=flip, max_pixels=max_pixels, export_png=export_png,
                  scales=scale_list)
    resources = {k: v for k, v in dict(batch_size=batch_size, actors_max=actors, gpus_per_actor=gpus_per_actor).items() if v is not None}
    try:
        spec = SegmentConfig.from_yaml(str(config), {k: v for k, v in values.items() if v is not None}) if config else \
            SegmentConfig.from_dict({k: v for k, v in values.items() if v is not None}, source="command line")
        if resources:
            spec = SegmentConfig.from_dict({**spec.to_dict(), "resources": {**spec.to_dict()["resources"], **resources}})
        record = run_segment(spec)
    except (ValueError, OSError, TypeError) as exc:  # OSError: permissions, unreachable storage, bad credentials
        _fail(exc)
    console.print(f"job {record.job_id}: {record.rows} rows ({record.ok_rows} ok, {record.error_rows} errors), "
                  f"{record.processed_this_run} processed this run at {record.images_per_second} img/s -> {spec.output}")


@app.command()
def scenes(
    uri: str = typer.Argument(..., help="Where to write images/, labels/ and classes.yaml (local or object storage)."),
    count: int = typer.Option(64, help="Number of scenes."),
    seed: int = typer.Option(0, help="The same seed always gives the same scenes."),
) -> None:
    """Generate labelled street-like scenes (7 classes; poles and signs are rare and small)."""
    from segmill.pipeline.scenes import write_scenes

    written = write_scenes(uri, count, seed=seed)
    console.print(f"wrote {len(written)} scenes with labels to {uri}")


@app.command("models")
def list_models_command(flops: bool = typer.Option(False, help="Also measure GFLOPs at 512x512 (slow on CPU).")) -> None:
    """List the registered architectures with their paper and size."""
    from rich.table import Table

    from segmill.models.profile import model_table

    table = Table("name", "paper", "params (M)", *(["GFLOPs@512"] if flops else []))
    for row in model_table(with_flops=flops):
        table.add_row(row["name"], row["paper"], f"{row['params']:.1f}", *([f"{row['gflops_512']:.1f}"] if flops else []))
    console.print(table)


@app.command()
def demo(state: Path = typer.Option(Path(".segmill"), help="Folder for the demo model, images and results."),
         images: int = typer.Option(64, help="Number of generated images to segment.")) -> None:
    """The embedded default job: train (once) a small U-Net on generated scenes, then segment new ones."""
    from segmill.jobs.demo import run_demo

    run_demo(state, images, console)


def main() -> None:
    app()


from segmill.jobs import cli_jobs  # noqa: E402  (submit, run-spec, jobs ...)
cli_jobs.register(app)

from segmill.jobs import cli_train  # noqa: E402  (train)
cli_train.register(app)

from segmill.jobs import cli_schedule  # noqa: E402  (schedule, scheduler, query, show)
cli_schedule.register(app)
