"""Rows that no stage committed (their Ray task or model actor failed past its retries) become error rows.

Rows out = images in, even when a batch kills its actor every time: the job goes on without those blocks
(`max_errored_blocks = -1`), and at the end every listed image that has no committed row gets one.
"""
from __future__ import annotations

import pyarrow.parquet as pq

from segmill.pipeline.bulk.results import (
    build_table,
    commit_table,
    committed_keys,
    is_committed,
)
from segmill.pipeline.bulk.rows import error_rows
from segmill.pipeline.common.decode import INFRASTRUCTURE
from segmill.pipeline.common.storage import open_fs, redact

LOST_REASON = "{uri} was not segmented: its batch failed repeatedly in Ray (task or model actor crashed)."


def commit_lost_rows(listing_dir: str, output: str, *, job_id: str, classes: tuple[str, ...], model_name: str,
                     model_version: str, endpoint_url: str | None, rows_per_file: int, row_group_rows: int) -> int:
    """Commit an error row for every listed image without a committed row; returns how many there were."""
    done = committed_keys(output, endpoint_url)
    fs, root = open_fs(listing_dir, endpoint_url=endpoint_url)
    lost = 0
    for chunk in sorted(fs.ls(root, detail=False)):
        with fs.open(chunk, "rb") as f:
            listing = pq.read_table(f)
        images, labels = listing["image_uri"].to_pylist(), listing["label_uri"].to_pylist()
        missing = [(u, l) for u, l, f in zip(images, labels, is_committed(done, images)) if not f]
        for start in range(0, len(missing), rows_per_file):
            part = missing[start : start + rows_per_file]
            uris = [u for u, _ in part]
            batch = error_rows(uris, [l for _, l in part], [LOST_REASON.format(uri=redact(u)) for u in uris],
                               len(classes), INFRASTRUCTURE)
            table = build_table(batch, classes, job_id=job_id, model_name=model_name, model_version=model_version)
            commit_table(table, output, job_id, endpoint_url=endpoint_url, row_group_rows=row_group_rows)
            lost += len(part)
    return lost
