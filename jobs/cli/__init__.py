"""The `segmill` command line: the app and its commands, one file per group; each command parses, loads the
config and calls one library function. Imports flow one way: this package -> its group modules -> common."""
from __future__ import annotations

import typer

from segmill.jobs.cli import jobs, loop, results, schedule, segment, tools, train
from segmill.jobs.cli.common import console, examples, filter_native_logs, setup_logging, typer_app

app = typer_app(add_completion=False, no_args_is_help=True,
                help="segmill: semantic segmentation at scale (bulk inference on Ray, results in Parquet).",
                epilog=examples("segmill demo", "segmill segment s3://bucket/images s3://bucket/results --model "
                                "models:/roads@champion", "segmill query s3://bucket/results --answer iou",
                                "segmill COMMAND --help"))


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        console.print(f"segmill {version('segmill')}", highlight=False)
        raise typer.Exit()


@app.callback()
def _main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Also other libraries' log lines (INFO)."),
          version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print segmill's version and exit.")) -> None:
    setup_logging(verbose)


def _command(function, name: str | None = None, *lines: str) -> None:
    app.command(name, epilog=examples(*lines))(function)


_command(segment.segment, "segment", "segmill segment images/ results/ --model unet.pt --labels labels/",
         "segmill segment s3://bucket/images s3://bucket/results --model models:/roads@champion --flip",
         "segmill segment --config segment.yaml --actors-max 4")
_command(train.train, "train", "segmill train --images data/images --labels data/labels --classes data/classes.yaml "
         "--model unet --epochs 30 --register roads",
         "segmill train --config train.yaml --hard-classes auto --hard-crop-share 0.5",
         "segmill train --config train.yaml --resume")
_command(results.query, "query", 'segmill query results/ "SELECT image_uri, miou FROM results ORDER BY miou LIMIT 5"',
         "segmill query results/ --answer iou", "segmill query s3://bucket/results --answer errors --output errors.csv")
_command(results.show, "show", "segmill show results/ images/street_0042.png --output street.png")
_command(results.report, "report", "segmill report results/ --gallery 12")
_command(loop.select, "select", "segmill select results/ to-label/ --n 200",
         "segmill select s3://bucket/results s3://bucket/to-label --model roads --strategy balanced")
app.add_typer(loop.labels_app, name="labels")
_command(loop.improve, "improve", "segmill improve improve.yaml", "segmill schedule add weekly --spec improve.yaml "
         '--cron "0 3 * * 0"')
_command(tools.scenes, "scenes", "segmill scenes data/ --count 200")
_command(tools.models, "models", "segmill models --flops")
_command(tools.demo, "demo", "segmill demo --state .segmill")
_command(jobs.submit, "submit", "segmill submit segment.yaml --address http://head:8265", "segmill submit train.yaml")
_command(jobs.run_spec_command, "run-spec", "segmill run-spec segment.yaml")
app.add_typer(jobs.jobs_app, name="jobs")
app.add_typer(schedule.schedule_app, name="schedule")
_command(schedule.scheduler, "scheduler", "segmill scheduler --once", "segmill scheduler --address http://head:8265")


def main() -> None:
    import sys

    if not {"-v", "--verbose"} & set(sys.argv[1:]):
        filter_native_logs()
    app()
