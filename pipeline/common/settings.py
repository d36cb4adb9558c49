"""Every environment variable segmill reads, in one place: what it sets, and the default when it is unset.

| variable              | what it sets                                              | unset                          |
|-----------------------|-----------------------------------------------------------|--------------------------------|
| `AWS_ENDPOINT_URL`    | S3-compatible endpoint for `s3://` URIs                   | AWS itself                     |
| `RAY_ADDRESS`         | the Ray cluster a job joins (also the Jobs API address);  | an in-process Ray              |
|                       | `local` means an in-process Ray, as unset does            |                                |
| `MLFLOW_TRACKING_URI` | tracking server and registry (`models:/` URIs, training)  | SQLite beside the run storage  |
| `SEGMILL_HISTORY`     | the job history folder (local or object storage)          | `.segmill/history`             |
| `SEGMILL_STATE`       | the schedule store's folder                               | `.segmill/schedules`           |
| `SEGMILL_PROGRESS`    | `1` turns on Ray Data's progress bars                     | off                            |
| `SEGMILL_S3_ATTEMPTS` | attempts per S3 request (botocore's standard retry mode:  | 8                              |
|                       | 500/503/SlowDown, throttling, connection resets, backoff) |                                |

Credentials are never read here: boto3, s3fs and MLflow find them the usual way (environment, profiles, roles).
Every getter reads the environment when called, so a change takes effect for the next job in the same process.
"""
from __future__ import annotations

import os

ENDPOINT_ENV = "AWS_ENDPOINT_URL"
RAY_ADDRESS_ENV = "RAY_ADDRESS"
TRACKING_ENV = "MLFLOW_TRACKING_URI"
HISTORY_ENV = "SEGMILL_HISTORY"
STATE_ENV = "SEGMILL_STATE"
PROGRESS_ENV = "SEGMILL_PROGRESS"
S3_ATTEMPTS_ENV = "SEGMILL_S3_ATTEMPTS"
DEFAULT_S3_ATTEMPTS = 8
DEFAULT_HISTORY = ".segmill/history"
DEFAULT_STATE = ".segmill/schedules"


def endpoint_url(given: str | None = None) -> str | None:
    return given or os.environ.get(ENDPOINT_ENV) or None


def ray_address(given: str | None = None) -> str | None:
    """The cluster to join, or None for a Ray of this process's own (never whatever Ray happens to run here)."""
    address = given or os.environ.get(RAY_ADDRESS_ENV) or None
    return None if address == "local" else address


def tracking_uri(given: str | None = None) -> str | None:
    """The given URI, else $MLFLOW_TRACKING_URI; a relative SQLite file or folder made absolute, since Ray workers
    run in other folders and would each open a database of their own."""
    found = given or os.environ.get(TRACKING_ENV) or None
    if found and found.startswith("sqlite:///") and not found.startswith("sqlite:////"):
        return "sqlite:///" + os.path.abspath(found.removeprefix("sqlite:///"))
    if found and "://" not in found and not found.startswith("databricks"):
        return os.path.abspath(found)
    return found


def history_location(given: str | None = None) -> str:
    return given or os.environ.get(HISTORY_ENV) or DEFAULT_HISTORY


def state_folder(given: str | os.PathLike | None = None) -> str:
    return str(given or os.environ.get(STATE_ENV) or DEFAULT_STATE)


def progress_bars() -> bool:
    return os.environ.get(PROGRESS_ENV, "0") == "1"


def s3_attempts() -> int:
    """Attempts per S3 request; a value that is not a positive integer is a one-sentence error."""
    raw = os.environ.get(S3_ATTEMPTS_ENV)
    if raw is None:
        return DEFAULT_S3_ATTEMPTS
    if not raw.isdigit() or int(raw) < 1:
        raise ValueError(f"{S3_ATTEMPTS_ENV}={raw!r} must be a positive whole number of attempts.")
    return int(raw)
