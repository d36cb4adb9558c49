"""Job history: one small Parquet file per event under a history folder, readable by any Parquet reader.

    .segmill/history/20261121T082145123456-segment-20261121-082145-1a2b3c-finished.parquet

Events of one job share its id: `submitted` (sent to a cluster), `started` and `finished` (written by the run
itself), `observed` (a terminal state seen by `segmill jobs status|list`). The folder is a plain Parquet
dataset, so DuckDB reads it directly: `SELECT * FROM read_parquet('.segmill/history/*.parquet', union_by_name=true)`;
`jobs_view` folds the events into one row per job. The folder may be on object storage (`s3://...`).
"""
from __future__ import annotations

import json
import secrets
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from segmill.pipeline.common import settings
from segmill.pipeline.common.storage import (
    join_uri,
    open_fs,
    protocol_of,
    redact,
    redact_values,
)

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
EVENT_SCHEMA = pa.schema([
    ("job_id", pa.string()), ("event", pa.string()), ("kind", pa.string()), ("status", pa.string()),
    ("spec", pa.string()), ("address", pa.string()), ("submitted_at", pa.timestamp("ms", tz="UTC")),
    ("finished_at", pa.timestamp("ms", tz="UTC")), ("output", pa.string()), ("model_name", pa.string()),
    ("model_version", pa.string()), ("message", pa.string()), ("recorded_at", pa.timestamp("us", tz="UTC")),
])
# One row per job: the first submission time, the newest status, the newest non-empty output and model version.
JOBS_SQL = """
SELECT job_id, any_value(kind) AS kind, arg_max(status, recorded_at) AS status,
       min(submitted_at) AS submitted_at, max(finished_at) AS finished_at,
       arg_max(output, recorded_at) FILTER (WHERE output IS NOT NULL) AS output,
       arg_max(model_name, recorded_at) FILTER (WHERE model_name IS NOT NULL) AS model_name,
       arg_max(model_version, recorded_at) FILTER (WHERE model_version IS NOT NULL) AS model_version,
       arg_max(address, recorded_at) FILTER (WHERE address IS NOT NULL) AS address,
       arg_max(message, recorded_at) FILTER (WHERE message IS NOT NULL) AS message,
       arg_max(spec, recorded_at) FILTER (WHERE spec IS NOT NULL) AS spec
FROM history GROUP BY job_id
"""


def history_location(location: str | None = None) -> str:
    """The history folder: the given one, else $SEGMILL_HISTORY, else `.segmill/history`."""
    return settings.history_location(location)


def now() -> datetime:
    return datetime.now(timezone.utc)


def new_job_id(kind: str) -> str:
    return f"{kind}-{now():%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"


@dataclass(frozen=True)
class JobEvent:
    """What one moment of a job's life adds to the history."""

    job_id: str
    event: str
    kind: str | None = None
    status: str | None = None
    spec: dict[str, Any] | None = None
    address: str | None = None
    submitted_at: datetime | None = None
    finished_at: datetime | None = None
    output: str | None = None
    model_name: str | None = None
    model_version: str | None = None
    message: str | None = None

    def row(self) -> dict[str, Any]:
        row = {name: getattr(self, name) for name in EVENT_SCHEMA.names if name != "recorded_at"}
        row["spec"] = json.dumps(redact_values(self.spec), sort_keys=True) if self.spec is not None else None
        for key in ("address", "output", "message"):
            row[key] = redact(row[key]) if row[key] else row[key]
        row["recorded_at"] = now()
        return row


def record_event(event: JobEvent, location: str | None = None, *, endpoint_url: str | None = None) -> str:
    """Write `event` as its own Parquet file (never rewriting another), returning its URI."""
    row = event.row()
    name = f"{row['recorded_at']:%Y%m%dT%H%M%S%f}-{event.job_id}-{event.event}-{uuid.uuid4().hex[:6]}.parquet"
    root = history_location(location)
    fs, path = open_fs(root, endpoint_url=endpoint_url)
    fs.makedirs(path, exist_ok=True)
    with fs.open(join_uri(path, name), "wb") as f:
        pq.write_table(pa.Table.from_pylist([row], schema=EVENT_SCHEMA), f)
    return join_uri(root, name)


def connect_history(location: str | None = None, *, endpoint_url: str | None = None) -> duckdb.DuckDBPyConnection:
    """DuckDB with the views `history` (every event) and `jobs` (one row per job); empty when nothing ran yet."""
    root = history_location(location)
    fs, path = open_fs(root, endpoint_url=endpoint_url)
    con = duckdb.connect()
    if fs.exists(path) and fs.glob(join_uri(path, "*.parquet")):
        if protocol_of(root) != "file":
            con.register_filesystem(fs)
        pattern = join_uri(root, "*.parquet").replace("'", "''")
        con.execute(f"CREATE VIEW history AS SELECT * FROM read_parquet('{pattern}', union_by_name=true)")
    else:
        con.register("empty_history", EVENT_SCHEMA.empty_table())
        con.execute("CREATE VIEW history AS SELECT * FROM empty_history")
    con.execute(f"CREATE VIEW jobs AS {JOBS_SQL}")
    return con


def read_jobs(location: str | None = None, *, kind: str | None = None, limit: int | None = None,
              endpoint_url: str | None = None) -> list[dict[str, Any]]:
    """One dict per job, newest submission first."""
    con = connect_history(location, endpoint_url=endpoint_url)
    where = "WHERE kind = $kind" if kind else ""
    sql = f"SELECT * FROM jobs {where} ORDER BY submitted_at DESC NULLS LAST, job_id"
    if limit:
        sql += f" LIMIT {int(limit)}"
    # Through Arrow: DuckDB's own Python rows need pytz for time zones.
    return con.sql(sql, params={"kind": kind} if kind else None).to_arrow_table().to_pylist()


def job_state(job_id: str, location: str | None = None, *, endpoint_url: str | None = None) -> dict[str, Any] | None:
    """The folded row of one job, or None when the history does not know it."""
    con = connect_history(location, endpoint_url=endpoint_url)
    rows = con.sql("SELECT * FROM jobs WHERE job_id = $id", params={"id": job_id}).to_arrow_table().to_pylist()
    return rows[0] if rows else None


def query_history(sql: str, location: str | None = None, *, endpoint_url: str | None = None) -> duckdb.DuckDBPyRelation:
    """`sql` over the views `jobs` and `history`; a DuckDB error becomes one ValueError sentence."""
    try:
        return connect_history(location, endpoint_url=endpoint_url).sql(sql)
    except duckdb.Error as exc:
        raise ValueError(f"Reading the job history failed: {(str(exc).splitlines() or [''])[0]}") from None
