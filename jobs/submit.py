"""Submit specs to a Ray cluster through its Jobs API, and follow them (list, status, logs, stop).

The runtime environment carries segmill itself (`py_modules`: the package's own source, built into a folder
named `segmill`), so a plain `ray start --head` cluster runs a job without segmill installed; on the project's
image it is installed already and the shipped copy is the same code. The spec travels as the job's working
directory; the entrypoint is `segmill run-spec` through the Python that runs the cluster.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from segmill.jobs import history
from segmill.pipeline.common import settings
from segmill.pipeline.common.storage import first_line, protocol_of, redact

SPEC_FILE = "segmill-job.yaml"
ENTRYPOINT = 'python -c "from segmill.jobs.cli import main; main()" run-spec'
KIND_KEY = "segmill.kind"
JOB_KEY = "segmill.job_id"  # the job's id, which `jobs status|logs|stop` take: a re-submitted job keeps it
# Passed to the job when set here; credentials are not: the cluster brings its own (service account, secrets).
PASSED_ENV = ("MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION", "AWS_REGION")
_LOOPBACK = ("127.0.0.1", "localhost", "::1")


def client(address: str | None):
    """A Jobs API client for `address` (default $RAY_ADDRESS), or one sentence saying why there is none."""
    from ray.job_submission import JobSubmissionClient

    address = settings.ray_address(address)
    if not address:
        raise ValueError("No Ray cluster given; pass --address http://HEAD:8265 or set RAY_ADDRESS.")
    try:
        return JobSubmissionClient(address)
    except Exception as exc:
        raise ValueError(_cluster_error(address, exc)) from None


def _cluster_error(address: str, exc: Exception) -> str:
    if type(exc).__name__ == "AuthenticationError":
        return (f"The Ray cluster at {redact(address)} wants an authentication token; set RAY_AUTH_MODE=token "
                "and RAY_AUTH_TOKEN (or ~/.ray/auth_token).")
    return (f"The Ray cluster at {redact(address)} cannot be reached through its Jobs API "
            f"({type(exc).__name__}: {first_line(exc)}).")


def package_source(into: Path) -> Path:
    """Copy segmill's own source (models, pipeline, jobs) into INTO/segmill, as Ray's `py_modules` ships it."""
    import segmill.jobs
    import segmill.models
    import segmill.pipeline

    root = into / "segmill"
    for package in (segmill.models, segmill.pipeline, segmill.jobs):
        source = Path(list(package.__path__)[0])
        shutil.copytree(source, root / package.__name__.rsplit(".", 1)[1],
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return root


def runtime_env(spec: dict[str, Any], workdir: Path, history_uri: str | None) -> dict[str, Any]:
    """The job's runtime environment: segmill's source, the spec as working directory, non-secret settings."""
    (workdir / "spec").mkdir()
    (workdir / "spec" / SPEC_FILE).write_text(yaml.safe_dump(spec, sort_keys=False))
    env = {k: os.environ[k] for k in PASSED_ENV if os.environ.get(k)}
    if history_uri:
        env[settings.HISTORY_ENV] = history_uri
    return {"working_dir": str(workdir / "spec"), "py_modules": [str(package_source(workdir / "code"))],
            "env_vars": env}


def history_for_cluster(history_uri: str | None, address: str) -> str | None:
    """Where the job itself records its events: the same history when the cluster can reach it (object storage,
    or a local folder when the cluster runs on this machine), else nowhere (status checks record the end)."""
    location = history.history_location(history_uri)
    if protocol_of(location) != "file":
        return location
    host = urlsplit(address if "://" in address else f"http://{address}").hostname
    return os.path.abspath(location.removeprefix("file://")) if host in _LOOPBACK else None


def submit(kind: str, spec: dict[str, Any], source: str, output: str, address: str, *,
           history_uri: str | None = None, job_id: str | None = None) -> dict[str, Any]:
    """Submit a validated spec (its kind, mapping, where it came from and its output); returns at once with the
    job's id. Ray's submission id is the job id, with a suffix when the job was submitted before (a resumed
    segment job): Ray wants a new one per submission, a person one per job."""
    jobs = client(address)
    job_id = job_id or history.new_job_id(kind)
    submitted = history.now()
    earlier = [info for info in jobs.list_jobs() if (info.metadata or {}).get(JOB_KEY) == job_id]
    submission_id = f"{job_id}-{len(earlier) + 1}" if earlier else job_id
    with tempfile.TemporaryDirectory(prefix="segmill-submit-") as tmp:
        env = runtime_env(spec, Path(tmp), history_for_cluster(history_uri, address))
        try:
            jobs.submit_job(entrypoint=f"{ENTRYPOINT} {SPEC_FILE} --job-id {job_id}",
                            submission_id=submission_id, runtime_env=env,
                            metadata={KIND_KEY: kind, JOB_KEY: job_id, "segmill.spec": source[:200]})
        except Exception as exc:
            raise ValueError(f"Submitting {source} to {redact(address)} failed "
                             f"({type(exc).__name__}: {first_line(exc)}).") from None
    history.record_event(history.JobEvent(job_id=job_id, event="submitted", kind=kind, status="PENDING",
                                          spec=spec, address=address, submitted_at=submitted, output=output),
                         history_uri)
    return {"job_id": job_id, "kind": kind, "status": "PENDING", "address": address, "output": output,
            "submission_id": submission_id}


def _submission(jobs, job_id: str):
    """The cluster's latest submission of a job (by segmill's job id, or a Ray submission id as such)."""
    mine = [info for info in jobs.list_jobs() if (info.metadata or {}).get(JOB_KEY) == job_id]
    if mine:
        return max(mine, key=lambda info: info.start_time or 0)
    try:
        return jobs.get_job_info(job_id)
    except Exception:
        raise ValueError(f"The Ray cluster at {redact(jobs.get_address())} has no job {job_id!r}; "
                         "see `segmill jobs list`.") from None


def job_info(job_id: str, address: str | None) -> dict[str, Any]:
    """Status, message, times and kind of one job on the cluster (its latest submission)."""
    return _info_row(_submission(client(address), job_id))


def list_jobs(address: str | None, *, everything: bool = False) -> list[dict[str, Any]]:
    """Jobs on the cluster, newest first; only segmill's unless `everything`."""
    jobs = client(address)
    rows = [_info_row(info) for info in jobs.list_jobs() if everything or KIND_KEY in (info.metadata or {})]
    return sorted(rows, key=lambda r: r["start_time"] or "", reverse=True)


def job_logs(job_id: str, address: str | None) -> str:
    jobs = client(address)
    return jobs.get_job_logs(_submission(jobs, job_id).submission_id)


def stop_job(job_id: str, address: str | None) -> bool:
    jobs = client(address)
    return jobs.stop_job(_submission(jobs, job_id).submission_id)


def _info_row(info: Any) -> dict[str, Any]:
    def when(ms: int | None) -> str | None:
        return datetime.fromtimestamp(ms / 1000, timezone.utc).isoformat(timespec="seconds") if ms else None

    metadata = info.metadata or {}
    return {"job_id": metadata.get(JOB_KEY) or info.submission_id or info.job_id, "kind": metadata.get(KIND_KEY),
            "status": str(getattr(info.status, "value", info.status)), "message": info.message,
            "start_time": when(info.start_time), "end_time": when(info.end_time), "entrypoint": info.entrypoint}


def observe(row: dict[str, Any], history_uri: str | None = None) -> None:
    """Record a terminal state seen on the cluster when the history knows the job but not how it ended."""
    if row["status"] not in history.TERMINAL:
        return
    known = history.job_state(row["job_id"], history_uri)
    if known is None or known["status"] in history.TERMINAL:
        return
    ended = datetime.fromisoformat(row["end_time"]) if row["end_time"] else history.now()
    history.record_event(history.JobEvent(job_id=row["job_id"], event="observed", kind=row["kind"],
                                          status=row["status"], finished_at=ended,
                                          message=row["message"] if row["status"] != "SUCCEEDED" else None),
                         history_uri)
