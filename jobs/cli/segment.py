"""`segmill segment`: the bulk job over a prefix or a manifest, from options or a YAML spec."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from segmill.jobs.cli.common import DASHBOARD_HELP, console, dashboard, given, user_errors
from segmill.pipeline.bulk.config import ResourceConfig, SegmentConfig
from segmill.pipeline.common.config import describe


def segment(
    input: Optional[str] = typer.Argument(None, help=describe(SegmentConfig, "input")),
    output: Optional[str] = typer.Argument(None, help=describe(SegmentConfig, "output")),
    model: Optional[str] = typer.Option(None, help=describe(SegmentConfig, "model")),
    labels: Optional[str] = typer.Option(None, help=describe(SegmentConfig, "labels")),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML job spec (kind: segment, keys as these "
                                          "options, resources: {batch_size, actors_max, ...}); options override it."),
    job_id: Optional[str] = typer.Option(None, help=describe(SegmentConfig, "job_id")),
    address: Optional[str] = typer.Option(None, "--ray-address", "--address", help=describe(SegmentConfig, "ray_address")),
    endpoint_url: Optional[str] = typer.Option(None, help=describe(SegmentConfig, "endpoint_url")),
    tracking_uri: Optional[str] = typer.Option(None, help=describe(SegmentConfig, "tracking_uri")),
    scales: Optional[str] = typer.Option(None, help=describe(SegmentConfig, "scales")),
    flip: Optional[bool] = typer.Option(None, "--flip/--no-flip", help=describe(SegmentConfig, "flip")),
    batch_size: Optional[int] = typer.Option(None, help=describe(ResourceConfig, "batch_size")),
    actors: Optional[int] = typer.Option(None, "--actors-max", "--actors", help=describe(ResourceConfig, "actors_max")),
    gpus_per_actor: Optional[float] = typer.Option(None, help=describe(ResourceConfig, "gpus_per_actor")),
    max_pixels: Optional[int] = typer.Option(None, help=describe(SegmentConfig, "max_pixels")),
    export_png: Optional[bool] = typer.Option(None, "--export-png/--no-export-png",
                                              help=describe(SegmentConfig, "export_png")),
    retry_errors: Optional[bool] = typer.Option(None, "--retry-errors/--no-retry-errors",
                                                help=describe(SegmentConfig, "retry_errors")),
    report: bool = typer.Option(True, "--report/--no-report", help="Write OUTPUT/report.html when the job ends."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress, only the summary."),
    show_dashboard: bool = typer.Option(False, "--dashboard", help=DASHBOARD_HELP),
) -> None:
    """Segment every image under INPUT and write one Parquet row per image to OUTPUT."""
    import time

    from segmill.jobs.progress import ProgressView, images
    from segmill.jobs.report import try_write_report
    from segmill.jobs.summary import segment_summary
    from segmill.pipeline.bulk.job import segment as run_segment

    dashboard(show_dashboard)
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
        started = time.time()
        with ProgressView(console, images, title="segment", quiet=quiet) as view:
            record = run_segment(spec, progress=view)
        seconds = time.time() - started
        written = try_write_report(spec.output, endpoint_url=spec.endpoint_url) if report and record.rows else None
        for line in segment_summary(record, spec.output, endpoint_url=spec.endpoint_url, seconds=seconds,
                                    report=written):
            console.print(line, highlight=False, markup=False)
