"""The job record: what ran, with which model, when, and what came out (OUTPUT/_job.json)."""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from segmill.pipeline.common.storage import join_uri, open_fs, redact_values

JOB_RECORD = "_job.json"


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, timezone.utc).isoformat(timespec="seconds")


@dataclass(frozen=True)
class JobRecord:
    job_id: str
    spec: dict[str, Any]
    model_name: str
    model_version: str
    started_at: str
    finished_at: str
    rows: int
    ok_rows: int
    error_rows: int
    processed_this_run: int
    resumed_from: int
    images_per_second: float
    skipped_files: dict[str, int] = field(default_factory=dict)  # files of INPUT that are not images, by extension

    @classmethod
    def build(cls, config, job_id: str, model_name: str, model_version: str, started: float, committed: pa.Table,
              *, processed: int, resumed_from: int, skipped_files: dict[str, int] | None = None) -> "JobRecord":
        seconds = max(time.time() - started, 1e-9)
        ok = int(pc.sum(pc.equal(committed["status"], "ok")).as_py() or 0) if committed.num_rows else 0
        spec = redact_values(config.to_dict())
        return cls(job_id, spec, model_name, model_version, _iso(started), _iso(time.time()), committed.num_rows, ok,
                   committed.num_rows - ok, processed, resumed_from, round(processed / seconds, 3),
                   dict(skipped_files or {}))

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def write_job_record(record: JobRecord, output: str, endpoint_url: str | None) -> str:
    fs, root = open_fs(output, endpoint_url=endpoint_url)
    with fs.open(join_uri(root, JOB_RECORD), "w") as f:
        f.write(record.to_json())
    return join_uri(output, JOB_RECORD)


def read_job_record(output: str, endpoint_url: str | None = None) -> dict[str, Any]:
    fs, root = open_fs(output, endpoint_url=endpoint_url)
    with fs.open(join_uri(root, JOB_RECORD)) as f:
        return json.load(f)
