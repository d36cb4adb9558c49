"""The `segmill` command line: the app and its commands, one file per group; each command parses, loads the
config and calls one library function. Imports flow one way: this package -> its group modules -> common."""
from __future__ import annotations

import typer

from segmill.jobs.cli import jobs, results, schedule, segment, tools, train
from segmill.jobs.cli.common import setup_logging

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="segmill: semantic segmentation at scale (bulk inference on Ray, results in Parquet).")


@app.callback()
def _main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Log progress (INFO).")) -> None:
    setup_logging(verbose)


app.command()(segment.segment)
app.command()(train.train)
app.command()(results.query)
app.command()(results.show)
app.command()(tools.scenes)
app.command("models")(tools.models)
app.command()(tools.demo)
app.command("submit")(jobs.submit)
app.command("run-spec")(jobs.run_spec_command)
app.add_typer(jobs.jobs_app, name="jobs")
app.add_typer(schedule.schedule_app, name="schedule")
app.command("scheduler")(schedule.scheduler)


def main() -> None:
    app()
