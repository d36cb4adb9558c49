"""`segmill query` and the ready answers, with DuckDB over a table the bulk job made (tests/jobs/conftest.py)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from segmill.jobs.cli import app
from segmill.jobs.query import ANSWERS, answer_sql, connect, run_sql, table_classes
from segmill.pipeline.common.scenes import SCENE_CLASSES

runner = CliRunner()


def _answer(results: str, name: str, **options) -> list[dict]:
    con = connect(results)
    relation = run_sql(con, answer_sql(con, name, **options))
    return [dict(zip(relation.columns, row)) for row in relation.fetchall()]


def _ok(scene_results) -> list[dict]:
    return [r for r in scene_results.table.to_pylist() if r["status"] == "ok"]


def test_class_names_come_from_the_table(scene_results) -> None:
    assert table_classes(connect(scene_results.output)) == SCENE_CLASSES


def test_iou_is_summed_counts_and_miou_their_mean(scene_results) -> None:
    rows = _answer(scene_results.output, "iou")
    assert [r["class"] for r in rows] == [*SCENE_CLASSES, "mIoU"]
    labelled = [r for r in _ok(scene_results) if r["label_uri"]]
    assert len(labelled) == 6
    expected = {}
    for c in SCENE_CLASSES:
        inter = sum(r["intersection_pixels"][c] for r in labelled)
        union = sum(r["union_pixels"][c] for r in labelled)
        expected[c] = inter / union if union else None
        row = rows[SCENE_CLASSES.index(c)]
        assert (row["intersection_pixels"], row["union_pixels"]) == (inter, union)
        assert row["iou"] == pytest.approx(expected[c]) if union else row["iou"] is None
    defined = [v for v in expected.values() if v is not None]
    assert rows[-1]["iou"] == pytest.approx(sum(defined) / len(defined))


def test_least_confident(scene_results) -> None:
    rows = _answer(scene_results.output, "least-confident", n=3)
    expected = sorted(_ok(scene_results), key=lambda r: r["confidence_mean"])[:3]
    assert [r["image_uri"] for r in rows] == [r["image_uri"] for r in expected]
    assert len(_answer(scene_results.output, "least-confident")) == 7, "default 10, 7 ok rows"


def test_class_above(scene_results) -> None:
    fractions = sorted(r["class_fraction"]["road"] for r in _ok(scene_results))
    threshold = float(np.median(fractions))
    rows = _answer(scene_results.output, "class-above", class_name="road", fraction=threshold)
    expected = {r["image_uri"] for r in _ok(scene_results) if r["class_fraction"]["road"] > threshold}
    assert {r["image_uri"] for r in rows} == expected and 0 < len(expected) < 7
    assert [r["fraction"] for r in rows] == sorted((r["fraction"] for r in rows), reverse=True)
    with pytest.raises(ValueError, match="'lake' is not in the results table"):
        _answer(scene_results.output, "class-above", class_name="lake", fraction=0.1)
    with pytest.raises(ValueError, match="needs --fraction"):
        _answer(scene_results.output, "class-above", class_name="road")


def test_errors_with_their_reasons(scene_results) -> None:
    [row] = _answer(scene_results.output, "errors")
    assert row["image_uri"] == scene_results.broken and "not a readable image" in row["error"]


def test_class_distribution(scene_results) -> None:
    rows = _answer(scene_results.output, "class-distribution")
    ok = _ok(scene_results)
    total = sum(sum(r["class_pixels"].values()) for r in ok)
    for row, c in zip(rows, SCENE_CLASSES):
        pixels = sum(r["class_pixels"][c] for r in ok)
        assert (row["class"], row["pixels"], row["images"]) == (c, pixels, sum(r["class_pixels"][c] > 0 for r in ok))
        assert row["pixel_share"] == pytest.approx(pixels / total)
    assert math.isclose(sum(r["pixel_share"] for r in rows), 1.0)


def test_cli_sql_prints_a_table(scene_results) -> None:
    result = runner.invoke(app, ["query", scene_results.output, "SELECT count(*) AS n FROM results"])
    assert result.exit_code == 0, result.output
    assert "8" in result.output


@pytest.mark.parametrize("extension", ["csv", "json", "parquet"])
def test_cli_answer_to_a_file(scene_results, tmp_path: Path, extension: str) -> None:
    out = tmp_path / f"least.{extension}"
    result = runner.invoke(app, ["query", scene_results.output, "--answer", "least-confident", "--n", "2",
                                 "--output", str(out)])
    assert result.exit_code == 0, result.output
    if extension == "parquet":
        rows = pq.read_table(out).to_pylist()
    elif extension == "json":
        rows = json.loads(out.read_text())
    else:
        lines = out.read_text().splitlines()
        rows = [dict(zip(lines[0].replace('"', "").split(","), line.split(","))) for line in lines[1:]]
    assert len(rows) == 2
    assert rows[0]["image_uri"].strip('"') == _answer(scene_results.output, "least-confident", n=1)[0]["image_uri"]


def test_cli_show_sql_prints_reusable_sql(scene_results) -> None:
    result = runner.invoke(app, ["query", scene_results.output, "--answer", "iou", "--show-sql"])
    assert result.exit_code == 0, result.output
    assert 'sum(intersection_pixels."road")' in result.output
    rerun = runner.invoke(app, ["query", scene_results.output, result.output])
    assert rerun.exit_code == 0 and "mIoU" in rerun.output


@pytest.mark.parametrize("args, message", [
    (["SELECT nope FROM results"], "Query failed"),
    ([], "Give either SQL or --answer"),
    (["--answer", "best"], "Answer 'best' is not known"),
    (["--answer", "errors", "--output", "x.xlsx"], "must end in .csv, .json, .parquet"),
])
def test_cli_errors_are_one_sentence(scene_results, args: list[str], message: str) -> None:
    result = runner.invoke(app, ["query", scene_results.output, *args])
    assert result.exit_code == 2 and message in result.output, result.output


def test_cli_names_a_folder_without_results(tmp_path: Path) -> None:
    result = runner.invoke(app, ["query", str(tmp_path), "SELECT 1"])
    assert result.exit_code == 2 and "holds no part-*.parquet files" in result.output


def test_every_answer_has_help() -> None:
    assert set(ANSWERS) == {"iou", "least-confident", "class-above", "errors", "class-distribution"}
    assert all(a.help for a in ANSWERS.values())


def test_query_and_show_on_object_storage(scene_results, s3_server, tmp_path: Path) -> None:
    """The same table on S3 (moto): read through segmill's fsspec layer, the answer written back to S3."""
    bucket = s3_server.create_bucket("segmill-query")
    fs = s3_server.filesystem()
    for path in Path(scene_results.output).glob("*"):
        if path.is_file():
            fs.put_file(str(path), f"{bucket}/results/{path.name}")
    results = f"s3://{bucket}/results"
    result = runner.invoke(app, ["query", results, "--answer", "iou", "--output", f"s3://{bucket}/answers/iou.parquet"])
    assert result.exit_code == 0, result.output
    with fs.open(f"{bucket}/answers/iou.parquet", "rb") as f:
        remote = pq.read_table(f).to_pylist()
    assert remote == _answer(scene_results.output, "iou")
    image_uri = str(sorted(scene_results.images.glob("scene_*.png"))[0])
    shown = runner.invoke(app, ["show", results, image_uri, "--output", str(tmp_path / "s3.png")])
    assert shown.exit_code == 0, shown.output
    local = runner.invoke(app, ["show", scene_results.output, image_uri, "--output", str(tmp_path / "local.png")])
    assert local.exit_code == 0 and (tmp_path / "s3.png").read_bytes() == (tmp_path / "local.png").read_bytes()
