"""`segmill submit`, `segmill run-spec` and `segmill jobs list|status|logs|stop|history`: job specs on a cluster."""
from __future__ import annotations

import json
from typing import Any, Optional

import typer

from segmill.jobs.cli.common import console, examples, typer_app, user_errors

ADDRESS_HELP = "Ray Jobs API address, e.g. http://HEAD:8265.  [default: $RAY_ADDRESS]"
HISTORY_HELP = "Job history folder, local or s3://.  [default: $SEGMILL_HISTORY, else .segmill/history]"
jobs_app = typer_app(no_args_is_help=True, help="Follow jobs on a Ray cluster, and the job history.")


def _print_result(result: dict[str, Any]) -> None:
    console.print(json.dumps(result, indent=2, default=str), highlight=False, soft_wrap=True)


def submit(
    spec: str = typer.Argument(..., help="YAML job spec: kind (segment, train or evaluate) plus that kind's keys."),
    address: Optional[str] = typer.Option(None, help="Ray Jobs API address, e.g. http://HEAD:8265; without one the job runs here, in-process."),
    history: Optional[str] = typer.Option(None, help=HISTORY_HELP),
    check: bool = typer.Option(True, "--check/--no-check", help="Check inputs, outputs and the tracking server from here first (skip when only the cluster can reach them)."),
) -> None:
    """Validate a job spec, then submit it to a Ray cluster (prints the job id at once) or run it here."""
    from segmill.jobs.specs import run_spec

    with user_errors():
        result = run_spec(spec, address=address, history_uri=history, check=check)
    if address:
        console.print(result["job_id"], highlight=False)
    else:
        _print_result(result)


def run_spec_command(
    spec: str = typer.Argument(..., help="YAML job spec: kind (segment, train or evaluate) plus that kind's keys."),
    job_id: Optional[str] = typer.Option(None, help="The job's id.  [default: a segment job's own, derived from "
                                         "its spec; a new one for other kinds]"),
    history: Optional[str] = typer.Option(None, help=HISTORY_HELP),
) -> None:
    """Run a job spec in this process (what a submitted job runs on the cluster)."""
    from segmill.jobs.specs import check_inputs, load_spec, run_local, with_job_id

    with user_errors():
        job = load_spec(spec)
        check_inputs(job)
        job, job_id = with_job_id(job, job_id)
        result = run_local(job, job_id=job_id, history_uri=history)
    _print_result(result)


@jobs_app.command("list", epilog=examples("segmill jobs list --address http://head:8265"))
def list_command(address: Optional[str] = typer.Option(None, help=ADDRESS_HELP),
                 all_jobs: bool = typer.Option(False, "--all", help="Also list jobs that segmill did not submit."),
                 history: Optional[str] = typer.Option(None, help=HISTORY_HELP)) -> None:
    """List the jobs on a Ray cluster, newest first."""
    from segmill.jobs.submit import list_jobs, observe

    with user_errors():
        rows = list_jobs(address, everything=all_jobs)
        for row in rows:
            observe(row, history)
    _print_rows(rows, {"job id": "job_id", "kind": "kind", "status": "status", "started": "start_time",
                       "ended": "end_time"})


@jobs_app.command("status", epilog=examples("segmill jobs status seg-0123456789ab"))
def status_command(job_id: str = typer.Argument(..., help="Job id printed by `segmill submit`."),
                   address: Optional[str] = typer.Option(None, help=ADDRESS_HELP),
                   history: Optional[str] = typer.Option(None, help=HISTORY_HELP)) -> None:
    """Print a job's status (PENDING, RUNNING, SUCCEEDED, FAILED or STOPPED) and its message."""
    from segmill.jobs.submit import job_info, observe

    with user_errors():
        row = job_info(job_id, address)
        observe(row, history)
    console.print(f"{row['status']}" + (f": {row['message']}" if row["message"] else ""), highlight=False)


@jobs_app.command("logs", epilog=examples("segmill jobs logs seg-0123456789ab"))
def logs_command(job_id: str = typer.Argument(..., help="Job id printed by `segmill submit`."),
                 address: Optional[str] = typer.Option(None, help=ADDRESS_HELP)) -> None:
    """Print a job's driver logs so far."""
    from segmill.jobs.submit import job_logs

    with user_errors():
        text = job_logs(job_id, address)
    console.print(text, markup=False, highlight=False, end="")


@jobs_app.command("stop", epilog=examples("segmill jobs stop seg-0123456789ab"))
def stop_command(job_id: str = typer.Argument(..., help="Job id printed by `segmill submit`."),
                 address: Optional[str] = typer.Option(None, help=ADDRESS_HELP)) -> None:
    """Ask the cluster to stop a job."""
    from segmill.jobs.submit import stop_job

    with user_errors():
        stopped = stop_job(job_id, address)
    console.print(f"{job_id}: {'stopping' if stopped else 'already finished'}", highlight=False)


@jobs_app.command("history", epilog=examples("segmill jobs history --kind train", "segmill jobs history --sql \"SELECT * FROM jobs WHERE status = 'FAILED'\""))
def history_command(history: Optional[str] = typer.Option(None, help=HISTORY_HELP),
                    kind: Optional[str] = typer.Option(None, help="Only jobs of this kind (segment, train, evaluate)."),
                    limit: int = typer.Option(20, help="Most jobs to show, newest first."),
                    sql: Optional[str] = typer.Option(None, help="SQL over the views `jobs` (one row per job) and `history` (every event) instead.")) -> None:
    """Print the job history: id, kind, status, times, output and model version of each job."""
    from segmill.jobs.history import query_history, read_jobs

    with user_errors():
        if sql:
            console.print(query_history(sql, history))
            return
        rows = read_jobs(history, kind=kind, limit=limit)
    _print_rows(rows, {"job id": "job_id", "kind": "kind", "status": "status", "submitted": "submitted_at",
                       "finished": "finished_at", "output": "output", "model version": "model_version"})


def _print_rows(rows: list[dict[str, Any]], columns: dict[str, str]) -> None:
    """Aligned columns, one line per job, never wrapped or cut: ids and URIs stay copyable and greppable."""
    cells = [list(columns)] + [[_cell(row[key]) for key in columns.values()] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    for line in cells:
        console.print("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip(), markup=False,
                             highlight=False, soft_wrap=True)


def _cell(value: Any) -> str:
    if value is None:
        return ""
    return value.isoformat(timespec="seconds") if hasattr(value, "isoformat") else str(value)
