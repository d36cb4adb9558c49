"""SQL over a results table with DuckDB; object storage goes through segmill's own filesystem layer.

The table is registered as the view `results`, so `SELECT ... FROM results` works for any location.
"""
from __future__ import annotations

import duckdb

from segmill.pipeline.storage import join_uri, open_fs, protocol_of


def connect(results: str, *, endpoint_url: str | None = None) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection with `results` as a view over the committed part files (no extension downloads)."""
    con = duckdb.connect()
    if protocol_of(results) != "file":
        fs, _ = open_fs(results, endpoint_url=endpoint_url)
        con.register_filesystem(fs)
    pattern = join_uri(results, "part-*.parquet").replace("'", "''")
    con.execute(f"CREATE VIEW results AS SELECT * FROM read_parquet('{pattern}')")
    return con


def dataset_iou_sql(classes: tuple[str, ...]) -> str:
    """Exact dataset per-class IoU and mIoU from the stored counts (summed, never averaged per image)."""
    per_class = ", ".join(
        f'sum(intersection."{c}") / nullif(sum("union"."{c}"), 0) AS "{c}"' for c in classes
    )
    return f"SELECT {per_class}, sum(correct_pixels) / sum(labelled_pixels) AS pixel_accuracy FROM results"
