"""`segmill schedule add|list|remove|firings` and `segmill scheduler`: job specs fired by cron or by the data."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import typer

from segmill.jobs.cli.common import console, examples, typer_app, user_errors

STATE_HELP = "Folder of the schedule store (schedules.db).  [default: $SEGMILL_STATE, else .segmill/schedules]"
schedule_app = typer_app(no_args_is_help=True, help="Schedules that fire a job spec by cron and/or data conditions.")


@schedule_app.command("add", epilog=examples("segmill schedule add weekly --spec train.yaml --cron \"0 3 * * 0\"", "segmill schedule add on-data --spec train.yaml --min-new-images 500"))
def schedule_add(
    name: str = typer.Argument(..., help="Schedule name (unique)."),
    spec: Path = typer.Option(..., "--spec", help="YAML job spec to fire (kind train|segment|evaluate); re-read at every firing."),
    cron: Optional[str] = typer.Option(None, help="Cron expression in UTC, e.g. '0 3 * * 0' (Sundays 03:00)."),
    min_new_images: Optional[int] = typer.Option(None, help="Condition: at least N labelled images added since the last successful firing."),
    iou_below: Optional[float] = typer.Option(None, help="Condition: the champion's mIoU (or --iou-class IoU) in its latest evaluation is below this."),
    iou_class: Optional[str] = typer.Option(None, help="Class whose IoU --iou-below watches.  [default: mIoU]"),
    state: Optional[Path] = typer.Option(None, help=STATE_HELP),
) -> None:
    """Add a schedule: by cron, by data conditions, or both (conditions then checked at each cron slot)."""
    from segmill.jobs.scheduling.scheduler import add_schedule
    from segmill.jobs.scheduling.store import ScheduleStore

    with user_errors():
        store = ScheduleStore(state)
        added = add_schedule(store, name, str(spec), cron=cron, min_new_images=min_new_images,
                             iou_below=iou_below, iou_class=iou_class)
    console.print(f"schedule {added.name}: {added.describe()} -> {added.spec} (state {store.path})", highlight=False)


@schedule_app.command("list", epilog=examples("segmill schedule list"))
def schedule_list(state: Optional[Path] = typer.Option(None, help=STATE_HELP)) -> None:
    """List the schedules with their last firing."""
    from rich.table import Table

    from segmill.jobs.scheduling.store import ScheduleStore

    with user_errors():
        store = ScheduleStore(state)
    table = Table("name", "when", "spec", "last slot", "status", title=f"schedules in {store.path}")
    for s in store.list():
        last = store.firings(s.name)[-1:]
        table.add_row(s.name, s.describe(), s.spec, last[0].slot if last else "-", last[0].status if last else "-")
    console.print(table)


@schedule_app.command("remove", epilog=examples("segmill schedule remove weekly"))
def schedule_remove(name: str = typer.Argument(..., help="Schedule name."),
                    state: Optional[Path] = typer.Option(None, help=STATE_HELP)) -> None:
    """Remove a schedule (its firings stay in the log)."""
    from segmill.jobs.scheduling.store import ScheduleStore

    with user_errors():
        ScheduleStore(state).remove(name)
    console.print(f"removed schedule {name}")


@schedule_app.command("firings", epilog=examples("segmill schedule firings weekly"))
def schedule_firings(name: Optional[str] = typer.Argument(None, help="Only this schedule."),
                     state: Optional[Path] = typer.Option(None, help=STATE_HELP)) -> None:
    """The firing log: every slot recorded, with its status (ok, failed, missed, condition-false, running)."""
    import json

    from rich.table import Table

    from segmill.jobs.scheduling.store import ScheduleStore

    table = Table("schedule", "slot", "status", "checked at", "finished at", "detail")
    with user_errors():
        firings = ScheduleStore(state).firings(name)
    for f in firings:
        table.add_row(f.schedule, f.slot, f.status, f.checked_at, f.finished_at or "-", json.dumps(f.detail, default=str)[:200])
    console.print(table)


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

    from segmill.jobs.scheduling.scheduler import Scheduler
    from segmill.jobs.scheduling.store import ScheduleStore

    logging.getLogger("segmill.jobs.scheduler").setLevel(logging.INFO)
    with user_errors():
        runner = Scheduler(ScheduleStore(state), address=address, interval_s=interval)
    if once:
        outcomes = runner.check()
        for outcome in outcomes:
            console.print(outcome.line(), highlight=False)
        console.print(f"{len(outcomes)} slot(s) handled; state {runner.store.path}")
        return
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    console.print(f"scheduler running on {runner.store.path} (Ctrl-C to stop)")
    try:
        runner.run(stop)
    except KeyboardInterrupt:
        pass
    console.print("scheduler stopped")
