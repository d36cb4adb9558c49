"""`segmill scenes`, `segmill models` and `segmill demo`: test data, the model registry, the embedded default."""
from __future__ import annotations

from pathlib import Path

import typer

from segmill.jobs.cli.common import console, user_errors


def scenes(
    uri: str = typer.Argument(..., help="Where to write images/, labels/ and classes.yaml (local or object storage)."),
    count: int = typer.Option(64, help="Number of scenes."),
    seed: int = typer.Option(0, help="The same seed always gives the same scenes."),
) -> None:
    """Generate labelled street-like scenes (7 classes; poles and signs are rare and small)."""
    from segmill.pipeline.common.scenes import write_scenes

    with user_errors():
        written = write_scenes(uri, count, seed=seed)
    console.print(f"wrote {len(written)} scenes with labels to {uri}")


def models(flops: bool = typer.Option(False, help="Also measure GFLOPs at 512x512 (slow on CPU).")) -> None:
    """List the registered architectures with their paper and size."""
    from rich.table import Table

    from segmill.models.profile import model_table

    table = Table("name", "paper", "params (M)", *(["GFLOPs@512"] if flops else []))
    for row in model_table(with_flops=flops):
        table.add_row(row["name"], row["paper"], f"{row['params']:.1f}", *([f"{row['gflops_512']:.1f}"] if flops else []))
    console.print(table)


def demo(state: Path = typer.Option(Path(".segmill"), help="Folder for the demo model, images and results."),
         images: int = typer.Option(64, help="Number of generated images to segment.")) -> None:
    """The embedded default job: train (once) a small U-Net on generated scenes, then segment new ones."""
    from segmill.jobs.demo import run_demo

    with user_errors():
        run_demo(state, images, console)
