"""`segmill segment`: the bulk job over a prefix or a manifest, from options or a YAML spec."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from segmill.jobs.cli.common import console, given, user_errors
from segmill.pipeline.bulk.config import ResourceConfig, SegmentConfig
from segmill.pipeline.common.config import describe


def segment(
    input: Optional[str] = typer.Argument(None, help=describe(SegmentConfig, "input")),
    output: Optional[str] = typer.Argument(None, help=describe(SegmentConfig, "output")),
    model: Optional[str] = typer.Option(None, help=describe(SegmentConfig, "model")),
    labels: Optional[str] = typer.Option(None, help=describe(SegmentConfig, "labels")),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML job spec; command-line values override it."),
    job_id: Optional[str] = typer.Option(None, help=describe(SegmentConfig, "job_id")),
    address: Optional[str] = typer.Option(None, help=describe(SegmentConfig, "ray_address")),
    endpoint_url: Optional[str] = typer.Option(None, help=describe(SegmentConfig, "endpoint_url")),
    tracking_uri: Optional[str] = typer.Option(None, help=describe(SegmentConfig, "tracking_uri")),
    scales: Optional[str] = typer.Option(None, help=describe(SegmentConfig, "scales")),
    flip: Optional[bool] = typer.Option(None, "--flip/--no-flip", help=describe(SegmentConfig, "flip")),
    batch_size: Optional[int] = typer.Option(None, help=describe(ResourceConfig, "batch_size")),
    actors: Optional[int] = typer.Option(None, help=describe(ResourceConfig, "actors_max")),
    gpus_per_actor: Optional[float] = typer.Option(None, help=describe(ResourceConfig, "gpus_per_actor")),
    max_pixels: Optional[int] = typer.Option(None, help=describe(SegmentConfig, "max_pixels")),
    export_png: Optional[bool] = typer.Option(None, "--export-png/--no-export-png",
                                              help=describe(SegmentConfig, "export_png")),
    retry_errors: Optional[bool] = typer.Option(None, "--retry-errors/--no-retry-errors",
                                                help=describe(SegmentConfig, "retry_errors")),
) -> None:
    """Segment every image under INPUT and write one Parquet row per image to OUTPUT."""
    from segmill.pipeline.bulk.job import segment as run_segment

    with user_errors():
        try:
            scale_list = [float(s) for s in scales.split(",")] if scales else None
        except ValueError:
            raise ValueError(f"--scales {scales!r} must be numbers separated by commas, e.g. 0.75,1,1.25.") from None
        values = given(input=input, output=output, model=model, labels=labels, job_id=job_id, ray_address=address,
                       endpoint_url=endpoint_url, tracking_uri=tracking_uri, flip=flip, max_pixels=max_pixels,
                       export_png=export_png, retry_errors=retry_errors, scales=scale_list)
        spec = SegmentConfig.from_yaml(str(config), values) if config else \
            SegmentConfig.from_dict(values, source="command line")
        resources = given(batch_size=batch_size, actors_max=actors, gpus_per_actor=gpus_per_actor)
        if resources:
            spec = spec.with_resources(**resources)
        record = run_segment(spec)
    console.print(f"job {record.job_id}: {record.rows} rows ({record.ok_rows} ok, {record.error_rows} errors), "
                  f"{record.processed_this_run} processed this run at {record.images_per_second} img/s -> {spec.output}")
