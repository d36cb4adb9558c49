"""End to end on a local Ray with local files: the results table read back with DuckDB and pyarrow.

Runs are shared by module-scoped fixtures (each costs ~10 s here); every test reads what one run committed.
"""
from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from segmill.models.checkpoint import load_checkpoint
from segmill.models.metrics import (
    ConfusionAccumulator,
    SegmentationMetrics,
    confusion_matrix,
)
from segmill.models.options import InferenceOptions
from segmill.models.predict import Predictor
from segmill.pipeline import SegmentConfig, segment
from segmill.pipeline.bulk.export import png_key
from segmill.pipeline.bulk.record import JobRecord, read_job_record
from segmill.pipeline.common.decode import decode_image
from segmill.pipeline.common.images import decode_png
from segmill.pipeline.common.listing import iter_image_batches
from segmill.pipeline.common.scenes import SCENE_CLASSES, SCENE_PALETTE

NO_LIMIT = 10**9


@dataclass(frozen=True)
class Run:
    config: SegmentConfig
    record: JobRecord
    table: pa.Table  # read back with pyarrow

    @property
    def rows(self) -> dict[str, dict]:
        return {row["image_uri"]: row for row in self.table.to_pylist()}


def _run(config: SegmentConfig, results_reader) -> Run:
    record = segment(config)
    return Run(config, record, results_reader(config.output))


def _sql(output: str, query: str) -> list[tuple]:
    """Run `query` with `results` bound to the table as DuckDB reads it (read_parquet over OUTPUT/*.parquet)."""
    con = duckdb.connect()
    con.execute(f"CREATE VIEW results AS SELECT * FROM read_parquet('{output}/*.parquet')")
    return con.execute(query).fetchall()


def _none_to_nan(values) -> np.ndarray:
    return np.array([math.nan if v is None else v for v in values], dtype=np.float64)


@pytest.fixture(scope="module")
def scenes_run(ray_session, scenes_dir: Path, tiny_checkpoint: str, tmp_path_factory, results_reader) -> Run:
    config = SegmentConfig(input=str(scenes_dir / "images"), labels=str(scenes_dir / "labels"),
                           output=str(tmp_path_factory.mktemp("local") / "out"), model=tiny_checkpoint)
    return _run(config, results_reader)


@pytest.fixture(scope="module")
def manifest_run(ray_session, scenes_dir: Path, tiny_checkpoint: str, tmp_path_factory, results_reader) -> Run:
    """Five of the scenes through a CSV manifest (image_uri, label_uri), with PNG export."""
    root = tmp_path_factory.mktemp("manifest")
    names = sorted(p.name for p in (scenes_dir / "images").glob("*.png"))[::2][:5]
    with open(root / "manifest.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image_uri", "label_uri"])
        writer.writerows([str(scenes_dir / "images" / n), str(scenes_dir / "labels" / n)] for n in names)
    config = SegmentConfig(input=str(root / "manifest.csv"), output=str(root / "out"), model=tiny_checkpoint,
                           export_png=True)
    return _run(config, results_reader)


# The scenes, listed from a prefix with labels


def test_every_input_once_read_with_pyarrow_and_duckdb(scenes_run: Run, scenes_dir: Path) -> None:
    images = sorted(str(p) for p in (scenes_dir / "images").glob("*.png"))
    assert len(images) == 12
    assert sorted(scenes_run.table["image_uri"].to_pylist()) == images  # pyarrow: each exactly once
    rows = _sql(scenes_run.config.output, "SELECT image_uri, count(*) FROM results GROUP BY image_uri ORDER BY 1")
    assert rows == [(uri, 1) for uri in images]  # DuckDB: the same
    assert _sql(scenes_run.config.output, "SELECT DISTINCT status FROM results") == [("ok",)]
    assert set(scenes_run.table["error"].to_pylist()) == {None}
    for uri, row in scenes_run.rows.items():
        width, height = Image.open(uri).size
        assert (row["height"], row["width"]) == (height, width), uri
        assert row["label_uri"] == str(scenes_dir / "labels" / Path(uri).name)


def test_masks_are_what_the_model_predicts(scenes_run: Run, tiny_checkpoint: str) -> None:
    model, spec = load_checkpoint(tiny_checkpoint)
    predictor = Predictor(model, mean=spec.mean, std=spec.std, device="cpu")
    rows = _sql(scenes_run.config.output,
                "SELECT image_uri, mask, height, width FROM results ORDER BY image_uri LIMIT 3")
    classes_seen = set()
    for uri, png, height, width in rows:
        mask = decode_png(png)
        assert mask.dtype == np.uint8 and mask.shape == (height, width)
        image = np.asarray(Image.open(uri).convert("RGB"))
        expected = predictor.predict(image)[0].numpy()
        np.testing.assert_array_equal(mask, expected, err_msg=uri)
        classes_seen |= set(np.unique(mask).tolist())
    assert len(classes_seen) >= 3, "the test model should predict several classes, or this check proves little"


def test_dataset_iou_from_sql_equals_the_metrics_module(scenes_run: Run, scenes_dir: Path) -> None:
    sums = ", ".join(f'sum(intersection_pixels.{c}), sum(union_pixels.{c})' for c in SCENE_CLASSES)
    totals = _sql(scenes_run.config.output, f"SELECT {sums}, sum(correct_pixels), sum(labelled_pixels) FROM results")[0]
    inter, union = np.array(totals[0:-2:2], dtype=np.int64), np.array(totals[1:-2:2], dtype=np.int64)

    accumulator = ConfusionAccumulator(len(SCENE_CLASSES))
    for uri, png in _sql(scenes_run.config.output, "SELECT image_uri, mask FROM results"):
        label = np.asarray(Image.open(scenes_dir / "labels" / Path(uri).name))
        accumulator.update(torch.from_numpy(decode_png(png)), torch.from_numpy(label))
    metrics = accumulator.compute()
    np.testing.assert_array_equal(inter, metrics.intersection.numpy())
    np.testing.assert_array_equal(union, metrics.union.numpy())
    sql_iou = np.array([i / u if u else math.nan for i, u in zip(inter, union)])
    np.testing.assert_allclose(sql_iou, metrics.iou.numpy(), equal_nan=True)
    assert totals[-2] / totals[-1] == pytest.approx(metrics.pixel_accuracy)

    # The same per-class IoU straight from one SQL aggregate, with the class addressed by name.
    road = _sql(scenes_run.config.output,
                'SELECT sum(intersection_pixels.road)::DOUBLE / nullif(sum(union_pixels.road), 0) FROM results')[0][0]
    expected_road = metrics.iou[SCENE_CLASSES.index("road")].item()
    assert (road is None and math.isnan(expected_road)) or road == pytest.approx(expected_road)


def test_per_image_metrics_equal_the_metrics_module(scenes_run: Run, scenes_dir: Path) -> None:
    for uri, row in scenes_run.rows.items():
        label = np.asarray(Image.open(scenes_dir / "labels" / Path(uri).name))
        metrics = SegmentationMetrics.from_confusion(
            confusion_matrix(decode_png(row["mask"]), label, len(SCENE_CLASSES)))
        np.testing.assert_array_equal([row["intersection_pixels"][c] for c in SCENE_CLASSES], metrics.intersection.numpy())
        np.testing.assert_array_equal([row["union_pixels"][c] for c in SCENE_CLASSES], metrics.union.numpy())
        np.testing.assert_allclose(_none_to_nan(row["iou"][c] for c in SCENE_CLASSES), metrics.iou.numpy(),
                                   equal_nan=True)
        assert row["miou"] == pytest.approx(metrics.mean_iou)
        assert row["pixel_accuracy"] == pytest.approx(metrics.pixel_accuracy)
        assert row["labelled_pixels"] == label.size and row["correct_pixels"] == int(metrics.intersection.sum())


def test_class_fractions_and_confidence(scenes_run: Run) -> None:
    for uri, row in scenes_run.rows.items():
        mask = decode_png(row["mask"])
        fractions = np.array([row["class_fraction"][c] for c in SCENE_CLASSES])
        assert fractions.sum() == pytest.approx(1.0, abs=1e-5), uri
        counts = np.bincount(mask.ravel(), minlength=len(SCENE_CLASSES))
        assert [row["class_pixels"][c] for c in SCENE_CLASSES] == counts.tolist()
        np.testing.assert_allclose(fractions, counts / mask.size, rtol=1e-5)
        assert 1 / len(SCENE_CLASSES) <= row["confidence_mean"] <= 1
        assert 0 <= row["entropy_mean"] <= math.log(len(SCENE_CLASSES)) + 1e-5
        assert 0 <= row["low_confidence_fraction"] <= 1
    # Addressable by class name in SQL, as a user would filter.
    (count,) = _sql(scenes_run.config.output, "SELECT count(*) FROM results WHERE class_fraction.road >= 0")[0]
    assert count == 12


def test_model_and_job_columns(scenes_run: Run) -> None:
    rows = _sql(scenes_run.config.output, "SELECT DISTINCT model_name, model_version, job_id FROM results")
    assert rows == [("scenes-unet", scenes_run.record.model_version, scenes_run.config.resolved_job_id())]
    assert scenes_run.record.model_version.startswith("sha256:")
    assert scenes_run.table.schema.field("processed_at").type == pa.timestamp("ms", tz="UTC")


def test_job_record(scenes_run: Run) -> None:
    record = read_job_record(scenes_run.config.output)
    assert record["job_id"] == scenes_run.config.resolved_job_id()
    assert (record["rows"], record["ok_rows"], record["error_rows"]) == (12, 12, 0)
    assert (record["processed_this_run"], record["resumed_from"]) == (12, 0)
    assert record["model_name"] == "scenes-unet" and record["model_version"] == scenes_run.record.model_version
    assert record["spec"]["input"] == scenes_run.config.input and record["images_per_second"] > 0
    assert record["started_at"] <= record["finished_at"]


def test_results_files_are_committed_parquet_only(scenes_run: Run) -> None:
    out = Path(scenes_run.config.output)
    visible = sorted(p.name for p in out.iterdir() if not p.name.startswith("_"))
    assert visible and all(name.startswith("part-") and name.endswith(".parquet") for name in visible)
    assert not (out / "_staging").exists() or not any((out / "_staging").rglob("*.parquet"))
    for name in visible:
        pq.ParquetFile(out / name).metadata  # whole files: the footer reads


# Manifests


def test_csv_and_parquet_manifests_list_the_same_rows_as_the_prefix(scenes_dir: Path, tmp_path: Path) -> None:
    listed = pa.concat_tables(iter_image_batches(str(scenes_dir / "images"), str(scenes_dir / "labels")))
    assert listed.num_rows == 12 and listed["label_uri"].null_count == 0
    pq.write_table(listed, tmp_path / "manifest.parquet")
    with open(tmp_path / "manifest.csv", "w", newline="") as f:
        csv.writer(f).writerows([["image_uri", "label_uri"], *zip(*listed.to_pydict().values())])
    for manifest in ("manifest.parquet", "manifest.csv"):
        from_manifest = pa.concat_tables(iter_image_batches(str(tmp_path / manifest)))
        assert from_manifest.to_pylist() == listed.to_pylist(), manifest


def test_manifest_without_labels_and_without_image_uri(tmp_path: Path) -> None:
    (tmp_path / "only.csv").write_text("image_uri\n/a.png\n/b.png\n")
    listed = pa.concat_tables(iter_image_batches(str(tmp_path / "only.csv")))
    assert listed["image_uri"].to_pylist() == ["/a.png", "/b.png"] and listed["label_uri"].null_count == 2
    (tmp_path / "bad.csv").write_text("path\n/a.png\n")
    with pytest.raises(ValueError, match="no 'image_uri' column"):
        list(iter_image_batches(str(tmp_path / "bad.csv")))


def test_a_csv_manifest_gives_the_same_rows(manifest_run: Run, scenes_run: Run) -> None:
    assert manifest_run.record.rows == 5 and manifest_run.record.ok_rows == 5
    reference = scenes_run.rows
    compared = ["label_uri", "status", "height", "width", "class_fraction", "class_pixels", "iou", "intersection_pixels",
                "union_pixels", "miou", "pixel_accuracy", "labelled_pixels", "correct_pixels", "model_name", "model_version"]
    for uri, row in manifest_run.rows.items():
        assert {k: row[k] for k in compared} == {k: reference[uri][k] for k in compared}, uri
        np.testing.assert_array_equal(decode_png(row["mask"]), decode_png(reference[uri]["mask"]))
        assert row["confidence_mean"] == pytest.approx(reference[uri]["confidence_mean"], abs=1e-5)
    assert manifest_run.record.job_id != scenes_run.record.job_id


def test_png_export_writes_masks_and_overlays_with_a_legend(manifest_run: Run) -> None:
    out = Path(manifest_run.config.output)
    palette = np.array(SCENE_PALETTE, dtype=np.uint8)
    assert len(list((out / "png" / "masks").iterdir())) == 5
    assert len(list((out / "png" / "overlays").iterdir())) == 5
    for uri, row in manifest_run.rows.items():
        image = np.asarray(Image.open(uri).convert("RGB"))
        colour = np.asarray(Image.open(out / "png" / "masks" / png_key(uri)))
        overlay = np.asarray(Image.open(out / "png" / "overlays" / png_key(uri)))
        height, width = image.shape[:2]
        assert colour.shape == image.shape and overlay.shape[1:] == image.shape[1:] and overlay.shape[0] > height
        np.testing.assert_array_equal(colour, palette[decode_png(row["mask"])])
        expected = np.round(0.5 * image.astype(np.float32) + 0.5 * colour.astype(np.float32))
        assert np.abs(overlay[:height].astype(int) - expected.astype(int)).max() <= 1
        legend = overlay[height:].reshape(-1, 3)  # under the overlay: every class's colour beside its name
        for rgb in SCENE_PALETTE:
            assert (legend == rgb).all(axis=1).sum() >= 100, rgb


# Real images: DSB2018 nuclei, through a Parquet manifest


def _dsb_sample(root: Path) -> list[str]:
    """Six images of three sizes (256x256, 320x256, 360x360), chosen by name: deterministic."""
    wanted = {(256, 256): 3, (320, 256): 2, (360, 360): 1}
    chosen = []
    for path in sorted((root / "images").glob("*.png")):
        size = Image.open(path).size
        if wanted.get(size, 0):
            wanted[size] -= 1
            chosen.append(path.name)
    return chosen


@pytest.fixture(scope="module")
def dsb_run(ray_session, dsb2018: Path, nuclei_checkpoint: str, tmp_path_factory, results_reader) -> Run:
    root = tmp_path_factory.mktemp("dsb")
    names = _dsb_sample(dsb2018)
    pq.write_table(pa.table({"image_uri": [str(dsb2018 / "images" / n) for n in names],
                             "label_uri": [str(dsb2018 / "masks" / n) for n in names]}), root / "manifest.parquet")
    config = SegmentConfig(input=str(root / "manifest.parquet"), output=str(root / "out"), model=nuclei_checkpoint)
    return _run(config, results_reader)


def test_dsb2018_iou_in_the_table_equals_the_metrics_module(dsb_run: Run, nuclei_checkpoint: str) -> None:
    classes = ("background", "nucleus")
    assert dsb_run.record.rows == 6 and dsb_run.record.ok_rows == 6
    model, spec = load_checkpoint(nuclei_checkpoint)
    predictor = Predictor(model, mean=spec.mean, std=spec.std, device="cpu")
    accumulator = ConfusionAccumulator(2)
    for uri, row in dsb_run.rows.items():
        image = decode_image(Path(uri).read_bytes(), uri, NO_LIMIT)
        label = np.asarray(Image.open(row["label_uri"]))
        mask = decode_png(row["mask"])
        assert mask.shape == label.shape == (row["height"], row["width"])
        np.testing.assert_array_equal(mask, predictor.predict(image)[0].numpy(), err_msg=uri)
        metrics = SegmentationMetrics.from_confusion(confusion_matrix(mask, label, 2))
        np.testing.assert_allclose(_none_to_nan(row["iou"][c] for c in classes), metrics.iou.numpy(), equal_nan=True)
        assert row["miou"] == pytest.approx(metrics.mean_iou)
        accumulator.update(mask, label)
    dataset = accumulator.compute()
    (iou_background, iou_nucleus, miou) = _sql(dsb_run.config.output, """
        WITH t AS (SELECT sum(intersection_pixels.background)::DOUBLE / sum(union_pixels.background) AS bg,
                          sum(intersection_pixels.nucleus)::DOUBLE / sum(union_pixels.nucleus) AS nu FROM results)
        SELECT bg, nu, (bg + nu) / 2 FROM t""")[0]
    assert [iou_background, iou_nucleus] == pytest.approx(dataset.iou.tolist())
    assert miou == pytest.approx(dataset.mean_iou)
    assert 0 < dataset.pixel_accuracy < 1 and 0 < iou_nucleus < 1, "the test model should get some pixels right"


# A queue budget smaller than one decoded block (ResourceConfig.queue_memory_mb)


def test_a_queue_budget_smaller_than_one_block_still_finishes(ray_session, tiny_checkpoint: str, tmp_path: Path,
                                                                results_reader) -> None:
    """Ray Data must still run one block at a time when a block alone exceeds the job's object-store cap (large
    images on a small budget), not wait forever: 4 images of 0.9 MB decoded, one 3.7 MB block, a 1 MB cap."""
    from segmill.pipeline.bulk.config import ResourceConfig
    from segmill.pipeline.common.images import encode_png
    from segmill.pipeline.common.scenes import render_scene

    (tmp_path / "images").mkdir()
    for i in range(4):
        tile = render_scene(7, i)[0]
        big = np.resize(tile, (480, 640, 3)).astype(np.uint8)
        (tmp_path / "images" / f"big_{i}.png").write_bytes(encode_png(big))
    config = SegmentConfig(input=str(tmp_path / "images"), output=str(tmp_path / "out"), model=tiny_checkpoint,
                           resources=ResourceConfig(queue_memory_mb=1, decode_batch_size=4))
    run = _run(config, results_reader)
    assert (run.record.ok_rows, run.record.error_rows) == (4, 0), run.record
    assert [(r["status"], r["height"], r["width"]) for r in run.rows.values()] == [("ok", 480, 640)] * 4


# Several batches at once in one model actor (ResourceConfig.concurrent_batches, the CPU default)


@pytest.mark.parametrize("warm", [True, False], ids=["warm-actors", "ray-data-actors"])
def test_batches_run_at_once_in_one_actor_give_the_rows_of_one_at_a_time(ray_session, scenes_dir: Path,
                                                                            tiny_checkpoint: str, tmp_path: Path,
                                                                            results_reader, warm: bool) -> None:
    """Threads sharing one model must not mix their batches up: one image per batch, four batches at once
    against one at a time, every mask and statistic equal, in warm actors (pool.py) and in Ray Data's."""
    from segmill.pipeline.bulk.config import ResourceConfig
    from segmill.pipeline.bulk.dataset import _model_actors

    runs = {}
    for concurrent in (1, 4):
        resources = ResourceConfig(batch_size=1, concurrent_batches=concurrent, actors_max=1, warm_actors=warm)
        strategy = _model_actors(resources.resolve({"CPU": 4.0}))
        assert strategy.max_concurrent_calls_per_actor == (concurrent if concurrent > 1 else None)
        assert strategy.enable_true_multi_threading == (concurrent > 1)
        config = SegmentConfig(input=str(scenes_dir / "images"), labels=str(scenes_dir / "labels"),
                               output=str(tmp_path / f"out-{concurrent}"), model=tiny_checkpoint, resources=resources)
        runs[concurrent] = _run(config, results_reader).rows
    assert len(runs[4]) == len(runs[1]) > 4 and runs[4].keys() == runs[1].keys()
    compared = ("status", "mask", "class_pixels", "confidence_mean", "entropy_mean", "low_confidence_fraction",
                "intersection_pixels", "union_pixels", "iou")
    for uri, row in runs[1].items():
        for column in compared:
            assert runs[4][uri][column] == row[column], (uri, column)


# The model stage alone (no Ray): a mask must not depend on the other images of its batch


def test_a_mask_does_not_depend_on_its_batch(tiny_checkpoint: str) -> None:
    from segmill.pipeline.bulk.rows import decoded_rows
    from segmill.pipeline.bulk.segmenter import Segmenter
    from segmill.pipeline.common.scenes import render_scene

    # Sizes that are multiples of the model's stride: alone, such an image is not padded at all, so padding it
    # to a larger neighbour's size is what would change its edges.
    images = [render_scene(5, i)[0][:h, :w] for i, (h, w) in enumerate([(64, 96), (96, 96), (64, 64), (96, 64)])]
    n = len(images)
    batch = decoded_rows([f"/x/{i}.png" for i in range(n)], [None] * n)
    batch["height"][:] = [im.shape[0] for im in images]
    batch["width"][:] = [im.shape[1] for im in images]
    batch["pixels"] = np.array([im.tobytes() for im in images], dtype=object)
    segmenter = Segmenter(Path(tiny_checkpoint).read_bytes(), use_gpu=False, torch_threads=1, options=InferenceOptions(batch_size=n))
    together = segmenter(batch)
    for i in range(n):
        alone = segmenter({k: v[i: i + 1] for k, v in batch.items()})
        assert alone["mask"][0] == together["mask"][i], i
        for key in ("confidence_mean", "entropy_mean", "low_confidence_fraction", "class_pixels"):
            np.testing.assert_array_equal(alone[key][0], together[key][i], err_msg=f"{key} of image {i}")
