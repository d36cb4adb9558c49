"""SQL over a results table with DuckDB; object storage goes through segmill's own filesystem layer.

The table is registered as the view `results`, so `SELECT ... FROM results` works for any location.
"""
from __future__ import annotations

import base64
import json

import duckdb
import pyarrow as pa

from segmill.pipeline.storage import join_uri, open_fs, protocol_of, redact

OUTPUT_FORMATS = (".csv", ".json", ".parquet")


def connect(results: str, *, endpoint_url: str | None = None) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection with `results` as a view over the committed part files (no extension downloads)."""
    from segmill.pipeline.results import committed_parts

    try:
        found = committed_parts(results, endpoint_url)
    except OSError as exc:
        raise ValueError(f"Results {redact(results)} cannot be listed ({type(exc).__name__}: {redact(str(exc))[:200]}).") from None
    if not found:
        raise ValueError(f"Results {redact(results)} holds no part-*.parquet files; is it the output folder of a segment job?")
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


def run_sql(con: duckdb.DuckDBPyConnection, sql: str) -> duckdb.DuckDBPyRelation:
    """The relation of `sql`; a DuckDB error becomes one ValueError sentence."""
    try:
        return con.sql(sql)
    except duckdb.Error as exc:
        raise ValueError(f"Query failed: {str(exc).splitlines()[0]}") from None


def write_table(table: pa.Table, output: str, *, endpoint_url: str | None = None) -> str:
    """Write a query's rows as CSV, JSON (an array of objects; binary as base64) or Parquet, by `output`'s extension."""
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    extension = "." + output.rsplit(".", 1)[-1].lower() if "." in output else ""
    if extension not in OUTPUT_FORMATS:
        raise ValueError(f"Output {redact(output)} must end in {', '.join(OUTPUT_FORMATS)}.")
    fs, path = open_fs(output, endpoint_url=endpoint_url)
    parent = path.rsplit("/", 1)[0] if "/" in path else ""
    if parent:
        fs.makedirs(parent, exist_ok=True)
    with fs.open(path, "wb") as f:
        if extension == ".parquet":
            pq.write_table(table, f)
        elif extension == ".csv":
            binary = [i for i, t in enumerate(table.schema.types) if pa.types.is_binary(t) or pa.types.is_struct(t)]
            for i in binary:  # CSV has no nested or binary cells: write them as JSON text
                values = [json.dumps(v, default=_json_default) if v is not None else None for v in table.column(i).to_pylist()]
                table = table.set_column(i, table.schema.names[i], pa.array(values, pa.string()))
            pacsv.write_csv(table, f)
        else:
            f.write(json.dumps(table.to_pylist(), default=_json_default, indent=1).encode())
    return output


def _json_default(value: object) -> object:
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    return str(value)
