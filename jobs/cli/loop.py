"""`segmill select`, `segmill labels import` and `segmill improve`: the loop from results to a better model."""
from __future__ import annotations

from typing import Optional

import typer

from segmill.jobs.cli.common import ENDPOINT_HELP, console, examples, typer_app, user_errors

labels_app = typer_app(no_args_is_help=True, help="Labels in from labelling tools (CVAT).")


def select(
    results: str = typer.Argument(..., help="Results folder of a segment job (local or object storage)."),
    output: str = typer.Argument(..., help="Folder for the manifest and the CVAT and Label Studio packages."),
    n: int = typer.Option(100, "--n", help="Images to select."),
    strategy: str = typer.Option("balanced", help="balanced (uncertainty + hard classes, spread out), uncertainty, "
                                                  "hard-classes or random (a baseline)."),
    hard_classes: Optional[str] = typer.Option(None, help="Comma-separated hard classes.  [default: the lowest-IoU "
                                                          "classes of --model's latest evaluation, if given]"),
    model: Optional[str] = typer.Option(None, help="Registered model whose champion evaluation names the hard classes."),
    classes: Optional[str] = typer.Option(None, help="Class file (names and colours for the labelling tools).  "
                                                     "[default: the model's classes and palette]"),
    tracking_uri: Optional[str] = typer.Option(None, help="MLflow tracking URI.  [default: $MLFLOW_TRACKING_URI]"),
    endpoint_url: Optional[str] = typer.Option(None, help=ENDPOINT_HELP),
) -> None:
    """Rank the unlabelled images of a results table by what a label would teach, and package the best for labelling."""
    from segmill.jobs.labelling import run_select

    with user_errors():
        written = run_select(results, output, n=n, strategy=strategy, hard_classes=hard_classes, model=model,
                             classes=classes, tracking_uri=tracking_uri, endpoint_url=endpoint_url)
    for line in written:
        console.print(line, highlight=False, markup=False)


@labels_app.command("import", epilog=examples("segmill labels import task-export.zip --classes classes.yaml "
                                              "--output data/labels"))
def labels_import(
    export: str = typer.Argument(..., help="A CVAT 'Segmentation mask 1.1' export: the .zip or its folder."),
    classes: str = typer.Option(..., help="Class file the labels must match (names, ignore index)."),
    output: str = typer.Option(..., help="Label folder to write class-index PNGs into (what train --labels reads)."),
    endpoint_url: Optional[str] = typer.Option(None, help=ENDPOINT_HELP),
) -> None:
    """Turn a CVAT export (colour masks + label map) into class-index label PNGs, checked against the class file."""
    from segmill.pipeline.common.classes import load_class_file
    from segmill.pipeline.loop.labelling import import_cvat

    with user_errors():
        done = import_cvat(export, load_class_file(classes, endpoint_url=endpoint_url), output,
                           endpoint_url=endpoint_url)
    labelled = ", ".join(f"{c} {v}" for c, v in done.classes_seen.items() if v)
    console.print(f"imported {done.labels} labels into {output} (labelled pixels: {labelled or 'none'})",
                  highlight=False, markup=False)


def _views(quiet: bool):
    """A progress view per step of the improve job (evaluate, train, re-segment)."""
    from segmill.jobs import progress

    def view(describer: str, title: str):
        return progress.ProgressView(console, getattr(progress, describer), title=title, quiet=quiet)

    return view


def improve(
    spec: str = typer.Argument(..., help="YAML spec of kind improve: model, images, labels, classes, val_images, "
                                         "val_labels, output[, segment_input, segment_output, train, force]."),
    history: Optional[str] = typer.Option(None, help="Job history folder.  [default: $SEGMILL_HISTORY, else "
                                                     ".segmill/history]"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress, only the outcome."),
) -> None:
    """Evaluate the champion, train a challenger on its hard classes, gate it, and re-segment when it wins."""
    from segmill.jobs.specs import load_spec, run_spec

    with user_errors():
        job = load_spec(spec)
        if job.kind != "improve":
            raise ValueError(f"Job spec {spec} is a {job.kind!r} spec; `segmill improve` runs kind: improve.")
        result = run_spec(spec, history_uri=history, progress=_views(quiet))
    verdict = "promoted" if result["promoted"] else "not promoted"
    console.print(f"{result['model_name']}: {verdict} ({result['decision']})", highlight=False, markup=False)
    if result.get("resegmented"):
        console.print(f"  re-segmented with version {result['model_version']} -> {result['resegmented']}",
                      highlight=False, markup=False)
    console.print(f"  comparison: {result['output']}", highlight=False, markup=False)
