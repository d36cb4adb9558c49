"""The bulk job's HTML report, opened in a real headless Chromium: it renders, its pictures load, and its tables hold
the numbers of the results table (read back with DuckDB through the ready answers)."""
from __future__ import annotations

from pathlib import Path

import pytest
from conftest import images_loaded, table_cells

from segmill.jobs.query import answer_sql, connect
from segmill.jobs.report import REPORT_FILE, write_report
from segmill.pipeline.common.scenes import SCENE_CLASSES


def _number(text: str) -> float | None:
    return None if text == "-" else float(text)


@pytest.fixture(scope="module")
def report(scene_results) -> Path:
    uri = write_report(scene_results.output, gallery=3)
    assert uri.endswith(REPORT_FILE)
    return Path(uri)


def test_report_renders_with_every_picture_loaded(report: Path, browser, scene_results) -> None:
    page = browser.open(report)
    assert page.title().startswith("segmill bulk job seg-")
    loaded = images_loaded(page)
    # class bars, confidence histogram, IoU bars, and the galleries (3 worst, 3 least confident; overlaps drawn once)
    assert len(loaded) == 3 + 3 + 3 and all(loaded)
    facts = dict(zip(page.eval_on_selector_all("dl.facts dt", "e => e.map(x => x.innerText)"),
                     page.eval_on_selector_all("dl.facts dd", "e => e.map(x => x.innerText)")))
    rows = scene_results.table.to_pylist()
    assert int(facts["images"]) == len(rows) == 8
    assert int(facts["errors"]) == sum(r["status"] == "error" for r in rows) == 1
    assert int(facts["labelled"]) == 6


def test_report_tables_hold_the_numbers_of_the_results_table(report: Path, browser, scene_results) -> None:
    page = browser.open(report)
    con = connect(scene_results.output)
    iou = con.sql(answer_sql(con, "iou")).fetchall()
    shown = table_cells(page, "iou-table")
    assert [row[0] for row in shown] == [*SCENE_CLASSES, "mIoU"]
    for (name, inter, union, value), cells in zip(iou, shown):
        assert _number(cells[1]) == inter and _number(cells[2]) == union
        assert (value is None and cells[3] == "-") or _number(cells[3]) == pytest.approx(value, abs=5e-5)
    distribution = con.sql(answer_sql(con, "class-distribution")).fetchall()
    assert [[c[0], int(c[1]), int(c[3])] for c in table_cells(page, "classes-table")] == \
        [[name, pixels, images] for name, pixels, _, images in distribution]
    errors = table_cells(page, "errors-table")
    assert len(errors) == 1 and errors[0][1] == "1" and errors[0][3] == scene_results.broken
    assert page.locator("#worst figure").count() == 3 and page.locator("#least-confident figure").count() == 3
    worst = con.sql("SELECT image_uri FROM results WHERE miou IS NOT NULL ORDER BY miou, image_uri LIMIT 1").fetchall()
    assert page.locator("#worst figcaption").first.inner_text().startswith(worst[0][0])


def test_report_is_written_beside_results_on_object_storage(scene_results, s3_server, browser) -> None:
    bucket = s3_server.create_bucket("segmill-report")
    fs = s3_server.filesystem()
    for path in Path(scene_results.output).glob("*"):
        if path.is_file():
            fs.put_file(str(path), f"{bucket}/results/{path.name}")
    uri = write_report(f"s3://{bucket}/results", gallery=2)
    assert uri == f"s3://{bucket}/results/{REPORT_FILE}"
    with fs.open(f"{bucket}/results/{REPORT_FILE}", "r") as f:
        page = browser.open(f.read())  # self-contained: nothing to fetch beside it
    assert all(images_loaded(page)) and [r[0] for r in table_cells(page, "iou-table")][-1] == "mIoU"
