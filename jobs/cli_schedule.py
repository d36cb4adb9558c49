"""CLI commands for schedules (`schedule add|list|remove|firings`, `scheduler`), `query` and `show`.

Registered on the main app by `register(app)` at the end of jobs/cli.py; `_fail` and `console` are imported from
there lazily (inside the commands), so the two modules never import each other at load time.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import typer

STATE_HELP = "Folder of the schedule store (schedules.db); default $SEGMILL_STATE, else .segmill/schedules."
ENDPOINT_HELP = "S3-compatible endpoint (default: $AWS_ENDPOINT_URL)."
schedule_app = typer.Typer(no_args_is_help=True, help="Schedules that fire a job spec by cron and/or data conditions.")


def _cli():
    from segmill.jobs import cli

    return cli


@schedule_app.command("add")
def schedule_add(
    name: str = typer.Argument(..., help="Schedule name (unique)."),
    spec: Path = typer.Option(..., "--spec", help="YAML job spec to fire (kind train|segment|evaluate); re-read at every firing."),
    cron: Optional[str] = typer.Option(None, help="Cron expression in UTC, e.g. '0 3 * * 0' (Sundays 03:00)."),
    min_new_images: Optional[int] = typer.Option(None, help="Condition: at least N labelled images added since the last successful firing."),
    iou_below: Optional[float] = typer.Option(None, help="Condition: the champion's mIoU (or --iou-class IoU) in its latest evaluation is below this."),
    iou_class: Optional[str] = typer.Option(None, help="Class whose IoU --iou-below watches (default: mIoU)."),
    state: Optional[Path] = typer.Option(None, help=STATE_HELP),
) -> None:
    """Add a schedule: by cron, by data conditions, or both (conditions then checked at each cron slot)."""
    from segmill.jobs.schedule import ScheduleStore
    from segmill.jobs.scheduler import add_schedule

    cli = _cli()
    try:
        store = ScheduleStore(state)
        added = add_schedule(store, name, str(spec), cron=cron, min_new_images=min_new_images,
                             iou_below=iou_below, iou_class=iou_class)
    except ValueError as exc:
        cli._fail(exc)
    cli.console.print(f"schedule {added.name}: {added.describe()} -> {added.spec} (state {store.path})", highlight=False)


@schedule_app.command("list")
def schedule_list(state: Optional[Path] = typer.Option(None, help=STATE_HELP)) -> None:
    """List the schedules with their last firing."""
    from rich.table import Table

    from segmill.jobs.schedule import ScheduleStore

    cli = _cli()
    try:
        store = ScheduleStore(state)
    except ValueError as exc:
        cli._fail(exc)
    table = Table("name", "when", "spec", "last slot", "status", title=f"schedules in {store.path}")
    for s in store.list():
        last = store.firings(s.name)[-1:]
        table.add_row(s.name, s.describe(), s.spec, last[0].slot if last else "-", last[0].status if last else "-")
    cli.console.print(table)


@schedule_app.command("remove")
def schedule_remove(name: str = typer.Argument(..., help="Schedule name."),
                    state: Optional[Path] = typer.Option(None, help=STATE_HELP)) -> None:
    """Remove a schedule (its firings stay in the log)."""
    from segmill.jobs.schedule import ScheduleStore

    cli = _cli()
    try:
        ScheduleStore(state).remove(name)
    except ValueError as exc:
        cli._fail(exc)
    cli.console.print(f"removed schedule {name}")


@schedule_app.command("firings")
def schedule_firings(name: Optional[str] = typer.Argument(None, help="Only this schedule."),
                     state: Optional[Path] = typer.Option(None, help=STATE_HELP)) -> None:
    """The firing log: every slot recorded, with its status (ok, failed, missed, condition-false, running)."""
    import json

    from rich.table import Table

    from segmill.jobs.schedule import ScheduleStore

    cli = _cli()
    table = Table("schedule", "slot", "status", "checked at", "finished at", "detail")
    try:
        firings = ScheduleStore(state).firings(name)
    except ValueError as exc:
        cli._fail(exc)
    for f in firings:
        table.add_row(f.schedule, f.slot, f.status, f.checked_at, f.finished_at or "-", json.dumps(f.detail, default=str)[:200])
    cli.console.print(table)


def scheduler(
    once: bool = typer.Option(False, "--once", help="Check once, fire what is due now, and exit (for cron or a Kubernetes CronJob)."),
    address: Optional[str] = typer.Option(None, help="Submit firings to this Ray cluster instead of running them here."),
    state: Optional[Path] = typer.Option(None, help=STATE_HELP),
    interval: float = typer.Option(300.0, help="Seconds between checks of condition-only schedules."),
) -> None:
    """Fire due schedules, each slot at most once (also across restarts and with two schedulers).

    Slots missed while no scheduler ran: the latest fires once on start-up, older ones are recorded as missed.
    """
    import signal
    import threading

    from segmill.jobs.schedule import ScheduleStore
    from segmill.jobs.scheduler import Scheduler

    cli = _cli()
    logging.getLogger("segmill.jobs.scheduler").setLevel(logging.INFO)
    try:
        runner = Scheduler(ScheduleStore(state), address=address, interval_s=interval)
    except ValueError as exc:
        cli._fail(exc)
    if once:
        outcomes = runner.check()
        for outcome in outcomes:
            cli.console.print(outcome.line(), highlight=False)
        cli.console.print(f"{len(outcomes)} slot(s) handled; state {runner.store.path}")
        return
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    cli.console.print(f"scheduler running on {runner.store.path} (Ctrl-C to stop)")
    try:
        runner.run(stop)
    except KeyboardInterrupt:
        pass
    cli.console.print("scheduler stopped")


def query(
    results: str = typer.Argument(..., help="Results folder of a segment job (local or object storage)."),
    sql: Optional[str] = typer.Argument(None, help="SQL over the view `results`, e.g. \"SELECT image_uri, miou FROM results ORDER BY miou LIMIT 5\"."),
    answer: Optional[str] = typer.Option(None, help="A ready answer instead of SQL: iou, least-confident, class-above, errors, class-distribution."),
    n: Optional[int] = typer.Option(None, "--n", help="Rows for least-confident (default 10), class-above and errors."),
    class_name: Optional[str] = typer.Option(None, "--class", help="Class for class-above."),
    fraction: Optional[float] = typer.Option(None, help="Pixel fraction for class-above, e.g. 0.3."),
    output: Optional[str] = typer.Option(None, help="Write rows to FILE.csv, .json or .parquet (local or object storage) instead of printing."),
    show_sql: bool = typer.Option(False, "--show-sql", help="Print the SQL of --answer and exit."),
    endpoint_url: Optional[str] = typer.Option(None, help=ENDPOINT_HELP),
) -> None:
    """Run SQL (DuckDB) or a ready answer over a results table; print it or write it to a file."""
    from segmill.jobs.answers import answer_sql
    from segmill.jobs.query import connect, run_sql, write_table

    cli = _cli()
    try:
        if (sql is None) == (answer is None):
            raise ValueError("Give either SQL or --answer NAME (not both, not neither).")
        con = connect(results, endpoint_url=endpoint_url)
        text = answer_sql(con, answer, n=n, class_name=class_name, fraction=fraction) if answer else sql
        if show_sql:
            cli.console.print(text, highlight=False, markup=False)
            return
        relation = run_sql(con, text)
        if output:
            table = relation.arrow()
            table = table.read_all() if hasattr(table, "read_all") else table
            write_table(table, output, endpoint_url=endpoint_url)
            cli.console.print(f"{table.num_rows} rows -> {output}")
        else:
            cli.console.print(relation)
    except (ValueError, OSError) as exc:
        cli._fail(exc)


def show(
    results: str = typer.Argument(..., help="Results folder of a segment job."),
    image_uri: str = typer.Argument(..., help="The image's image_uri exactly as stored in the table."),
    output: str = typer.Option("overlay.png", help="PNG to write (local or object storage)."),
    endpoint_url: Optional[str] = typer.Option(None, help=ENDPOINT_HELP),
) -> None:
    """Write the image with its mask overlaid (and the ground truth beside it when the job had labels) as a PNG."""
    from segmill.jobs.show import render, write_png

    cli = _cli()
    try:
        picture = render(results, image_uri, endpoint_url=endpoint_url)
        write_png(picture, output, endpoint_url=endpoint_url)
    except (ValueError, OSError) as exc:
        cli._fail(exc)
    cli.console.print(f"{picture.shape[1]}x{picture.shape[0]} overlay -> {output}")


def register(app: typer.Typer) -> None:
    app.add_typer(schedule_app, name="schedule")
    app.command("scheduler")(scheduler)
    app.command("query")(query)
    app.command("show")(show)
