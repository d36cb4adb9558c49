"""SQL over a results table with DuckDB, and ready answers: named SQL that users can print (`--show-sql`), reuse
and edit.

The table is registered as the view `results`, so `SELECT ... FROM results` works for any location; object
storage goes through segmill's own filesystem layer. Class names come from the fields of the table's
`class_fraction` struct, so the same SQL works for any model.
"""
from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from typing import Callable

import duckdb
import pyarrow as pa

from segmill.pipeline.common.storage import join_uri, open_fs, protocol_of, redact

OUTPUT_FORMATS = (".csv", ".json", ".parquet")


def connect(results: str, *, endpoint_url: str | None = None) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection with `results` as a view over the committed part files (no extension downloads)."""
    from segmill.pipeline.bulk.results import RENAMED, committed_parts

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
    source = f"read_parquet('{pattern}', union_by_name = true)"
    columns = {row[0] for row in con.sql(f"DESCRIBE SELECT * FROM {source}").fetchall()}
    renamed = ", ".join(f"coalesce({ident(new)}, {ident(old)}) AS {new}" if new in columns else f"{ident(old)} AS {new}"
                        for new, old in RENAMED.items() if old in columns)
    replaced = ", ".join(ident(new) for new, old in RENAMED.items() if new in columns and old in columns)
    select = f"* EXCLUDE ({replaced}), {renamed}" if replaced else f"*, {renamed}" if renamed else "*"
    con.execute(f"CREATE VIEW results AS SELECT {select} FROM {source}")  # old tables: the new names too
    return con


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


# ---- ready answers

def ident(name: str) -> str:
    """A quoted SQL identifier (class names may hold spaces or quotes)."""
    return '"' + name.replace('"', '""') + '"'


def literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def table_classes(con: duckdb.DuckDBPyConnection) -> tuple[str, ...]:
    """The class names of the table, from the fields of its `class_fraction` struct."""
    kind = con.sql("SELECT class_fraction FROM results LIMIT 0").types[0]
    return tuple(name for name, _ in kind.children)


def iou_sql(classes: tuple[str, ...]) -> str:
    """Exact dataset IoU per class from the summed counts, then mIoU over the classes with a defined IoU."""
    per_class = "\n  UNION ALL ".join(
        f"SELECT {i} AS ord, {literal(c)} AS class, sum(intersection_pixels.{ident(c)}) AS intersection_pixels, "
        f"sum(union_pixels.{ident(c)}) AS union_pixels FROM results WHERE status = 'ok'" for i, c in enumerate(classes))
    return (f"WITH per_class AS (\n  {per_class}\n),\n"
            "scored AS (SELECT *, intersection_pixels / nullif(union_pixels, 0) AS iou FROM per_class)\n"
            "SELECT class, intersection_pixels, union_pixels, iou FROM (\n"
            '  SELECT * FROM scored\n'
            f"  UNION ALL SELECT {len(classes)}, 'mIoU', NULL, NULL, avg(iou) FROM scored\n"
            ") ORDER BY ord")


def least_confident_sql(n: int) -> str:
    return ("SELECT image_uri, confidence_mean, low_confidence_fraction, entropy_mean FROM results\n"
            f"WHERE status = 'ok' ORDER BY confidence_mean ASC, image_uri LIMIT {int(n)}")


def class_above_sql(class_name: str, fraction: float, n: int | None) -> str:
    limit = f" LIMIT {int(n)}" if n else ""
    return (f"SELECT image_uri, class_fraction.{ident(class_name)} AS fraction FROM results\n"
            f"WHERE status = 'ok' AND class_fraction.{ident(class_name)} > {float(fraction)!r}\n"
            f"ORDER BY fraction DESC, image_uri{limit}")


def errors_sql(n: int | None) -> str:
    limit = f" LIMIT {int(n)}" if n else ""
    return (f"SELECT image_uri, label_uri, error, error_kind FROM results WHERE status = 'error' "
            f"ORDER BY image_uri{limit}")


def class_distribution_sql(classes: tuple[str, ...]) -> str:
    """Predicted pixels per class over the job, their share, and in how many images each class appears."""
    rows = "\n  UNION ALL ".join(
        f"SELECT {i} AS ord, {literal(c)} AS class, sum(class_pixels.{ident(c)}) AS pixels, "
        f"count(*) FILTER (WHERE class_pixels.{ident(c)} > 0) AS images FROM results WHERE status = 'ok'"
        for i, c in enumerate(classes))
    return (f"WITH per_class AS (\n  {rows}\n)\n"
            "SELECT class, pixels, pixels / nullif(sum(pixels) OVER (), 0) AS pixel_share, images\n"
            "FROM per_class ORDER BY ord")


@dataclass(frozen=True)
class Answer:
    name: str
    help: str
    build: Callable[..., str]


ANSWERS = {
    "iou": Answer("iou", "dataset IoU per class and mIoU from the summed counts (needs a job run with labels)",
                  lambda classes, **_: iou_sql(classes)),
    "least-confident": Answer("least-confident", "the N images with the lowest mean confidence",
                              lambda classes, n=None, **_: least_confident_sql(n or 10)),
    "class-above": Answer("class-above", "images where --class covers more than --fraction of the pixels",
                          lambda classes, n=None, class_name=None, fraction=None, **_:
                          class_above_sql(_known(class_name, classes), _fraction(fraction), n)),
    "errors": Answer("errors", "error rows with their reasons", lambda classes, n=None, **_: errors_sql(n)),
    "class-distribution": Answer("class-distribution", "predicted pixels and images per class",
                                 lambda classes, **_: class_distribution_sql(classes)),
}


def _known(class_name: str | None, classes: tuple[str, ...]) -> str:
    if class_name is None:
        raise ValueError("The class-above answer needs --class NAME (and --fraction X).")
    if class_name not in classes:
        raise ValueError(f"Class {class_name!r} is not in the results table; its classes are {', '.join(classes)}.")
    return class_name


def _fraction(fraction: float | None) -> float:
    if fraction is None or not 0 <= fraction < 1:
        raise ValueError(f"The class-above answer needs --fraction between 0 and 1, not {fraction}.")
    return fraction


def answer_sql(con: duckdb.DuckDBPyConnection, name: str, **options) -> str:
    """The SQL of answer `name` for the table behind `con`."""
    if name not in ANSWERS:
        raise ValueError(f"Answer {name!r} is not known; choose one of {', '.join(ANSWERS)}.")
    return ANSWERS[name].build(table_classes(con), **options)
