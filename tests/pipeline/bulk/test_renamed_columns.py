"""Tables written before `intersection`/`union` became `intersection_pixels`/`union_pixels` (`union` is an SQL
keyword) still read, alone or mixed with new parts (a job resumed across the rename), with pyarrow and DuckDB."""
from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from segmill.jobs.query import answer_sql, connect
from segmill.pipeline.bulk.results import committed_rows, dataset_iou

CLASSES = ("sky", "pole")


def _part(folder: Path, name: str, inter: list[list[int]], union: list[list[int]], *, old: bool) -> None:
    def struct(rows):
        return pa.array([dict(zip(CLASSES, r)) for r in rows], pa.struct([(c, pa.int64()) for c in CLASSES]))

    fractions = struct([[0, 0]] * len(inter)).cast(pa.struct([(c, pa.float32()) for c in CLASSES]))
    names = ("intersection", "union") if old else ("intersection_pixels", "union_pixels")
    pq.write_table(pa.table({"image_uri": [f"{name}-{i}" for i in range(len(inter))], "status": ["ok"] * len(inter),
                             "class_fraction": fractions, names[0]: struct(inter), names[1]: struct(union)}),
                   folder / f"part-{name}.parquet")


@pytest.mark.parametrize("mixed", [False, True])
def test_old_and_mixed_tables_read_under_the_new_names(tmp_path: Path, mixed: bool) -> None:
    _part(tmp_path, "a", [[90, 1]], [[100, 10]], old=True)
    _part(tmp_path, "b", [[50, 3]], [[100, 10]], old=not mixed)
    table = committed_rows(str(tmp_path), None, ["union_pixels"])
    assert sorted(r["sky"] for r in table["union_pixels"].to_pylist()) == [100, 100]
    iou = dataset_iou(str(tmp_path), CLASSES)
    assert iou == pytest.approx({"sky": 140 / 200, "pole": 4 / 20})
    con = connect(str(tmp_path))
    assert con.sql("SELECT sum(union_pixels.pole), sum(intersection_pixels.sky) FROM results").fetchall() == [(20, 140)]
    rows = con.sql(answer_sql(con, "iou")).fetchall()
    assert [r[0] for r in rows] == ["sky", "pole", "mIoU"] and rows[0][3] == pytest.approx(0.7)
