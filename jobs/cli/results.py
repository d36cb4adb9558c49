"""`segmill query` (SQL or a ready answer over a results table) and `segmill show` (one image as a picture)."""
from __future__ import annotations

from typing import Optional

import typer

from segmill.jobs.cli.common import ENDPOINT_HELP, console, user_errors


def query(
    results: str = typer.Argument(..., help="Results folder of a segment job (local or object storage)."),
    sql: Optional[str] = typer.Argument(None, help="SQL over the view `results`, e.g. \"SELECT image_uri, miou FROM results ORDER BY miou LIMIT 5\"."),
    answer: Optional[str] = typer.Option(None, help="A ready answer instead of SQL: iou, least-confident, class-above, errors, class-distribution."),
    n: Optional[int] = typer.Option(None, "--n", help="Rows for least-confident (10 unless given), class-above and errors."),
    class_name: Optional[str] = typer.Option(None, "--class", help="Class for class-above."),
    fraction: Optional[float] = typer.Option(None, help="Pixel fraction for class-above, e.g. 0.3."),
    output: Optional[str] = typer.Option(None, help="Write rows to FILE.csv, .json or .parquet (local or object storage) instead of printing."),
    show_sql: bool = typer.Option(False, "--show-sql", help="Print the SQL of --answer and exit."),
    endpoint_url: Optional[str] = typer.Option(None, help=ENDPOINT_HELP),
) -> None:
    """Run SQL (DuckDB) or a ready answer over a results table; print it or write it to a file."""
    from segmill.jobs.query import answer_sql, connect, run_sql, write_table

    with user_errors():
        if (sql is None) == (answer is None):
            raise ValueError("Give either SQL or --answer NAME (not both, not neither).")
        con = connect(results, endpoint_url=endpoint_url)
        text = answer_sql(con, answer, n=n, class_name=class_name, fraction=fraction) if answer else sql
        if show_sql:
            console.print(text, highlight=False, markup=False)
            return
        relation = run_sql(con, text)
        if output:
            table = relation.arrow()
            table = table.read_all() if hasattr(table, "read_all") else table
            write_table(table, output, endpoint_url=endpoint_url)
            console.print(f"{table.num_rows} rows -> {output}")
        else:
            console.print(relation)


def show(
    results: str = typer.Argument(..., help="Results folder of a segment job."),
    image_uri: str = typer.Argument(..., help="The image: its image_uri in the table, the path given to segment "
                                    "(relative or absolute) or its file name when that is unique."),
    output: str = typer.Option("overlay.png", help="PNG to write (local or object storage)."),
    endpoint_url: Optional[str] = typer.Option(None, help=ENDPOINT_HELP),
) -> None:
    """Draw one image of a results table: the image, its mask over it, and with a label the ground truth and where
    they differ; titled panels, a legend of class names and colours, and its IoU in the caption."""
    from segmill.jobs.show import render, write_png

    with user_errors():
        picture = render(results, image_uri, endpoint_url=endpoint_url)
        write_png(picture, output, endpoint_url=endpoint_url)
    console.print(f"picture of {image_uri} -> {output}", highlight=False, markup=False)


def report(
    results: str = typer.Argument(..., help="Results folder of a segment job (local or object storage)."),
    gallery: int = typer.Option(6, help="Images in each gallery (worst mIoU, least confident)."),
    endpoint_url: Optional[str] = typer.Option(None, help=ENDPOINT_HELP),
) -> None:
    """Write (again) RESULTS/report.html: counts, errors, classes, confidence, IoU and galleries, in one file."""
    from segmill.jobs.report import write_report

    with user_errors():
        uri = write_report(results, endpoint_url=endpoint_url, gallery=gallery)
    console.print(f"report -> {uri}", highlight=False, markup=False)
