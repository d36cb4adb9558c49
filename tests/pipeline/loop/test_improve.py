"""`segmill improve` end to end on real parts: local Ray (Ray Train and Ray Data), MLflow on SQLite, Chromium."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mlflow
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import table_cells

from segmill.jobs.specs import run_spec
from segmill.pipeline.common.scenes import write_scenes
from segmill.pipeline.tracking import latest_evaluation

SEGMILL = str(Path(sys.executable).with_name("segmill"))


def test_improve_promotes_a_better_model_resegments_and_then_has_nothing_to_learn(
        ray_session, register_tiny_model, scenes_dir: Path, tmp_path: Path, browser):
    tracking = register_tiny_model("scenes")  # version 1: a random-init U-Net, the champion to beat
    write_scenes(str(tmp_path / "val"), 8, seed=11)
    spec = {"kind": "improve", "model": "scenes", "images": str(scenes_dir / "images"),
            "labels": str(scenes_dir / "labels"), "classes": str(scenes_dir / "classes.yaml"),
            "val_images": str(tmp_path / "val" / "images"), "val_labels": str(tmp_path / "val" / "labels"),
            "output": str(tmp_path / "improve"), "segment_input": str(tmp_path / "val" / "images"),
            "segment_output": str(tmp_path / "segmented"), "tracking_uri": tracking,
            "storage_path": str(tmp_path / "ray"),
            "train": {"epochs": 4, "workers": 1, "batch_size": 4, "crop_size": 64, "cpus_per_worker": 1.0}}
    (tmp_path / "improve.yaml").write_text(yaml.safe_dump(spec))

    first = run_spec(str(tmp_path / "improve.yaml"), history_uri=str(tmp_path / "history"))

    record = json.loads((tmp_path / "improve" / "improve.json").read_text())
    assert first["promoted"] is True and first["model_version"] == "2", record["decision"]
    assert record["champion_version"] == "1" and record["trained"] is True
    low, high = record["gain_interval"]
    assert 0.005 < low <= high  # the gate's margin, cleared by the paired bootstrap's lower bound
    assert record["challenger_miou"] > record["champion_miou"]
    assert len(record["hard_classes"]) >= 1  # chosen from the champion's evaluation on the validation set
    champion = latest_evaluation(tracking, "scenes")
    assert champion is not None and champion.kind in ("evaluation", "training validation")
    client = mlflow.MlflowClient(tracking)
    assert str(client.get_model_version_by_alias("scenes", "champion").version) == "2"
    evaluations = client.search_runs([client.get_experiment_by_name("segmill-evaluations").experiment_id],
                                     filter_string="tags.`segmill.model_version` = '1'")
    assert evaluations, "the champion's evaluation is recorded against version 1"
    resegmented = Path(first["resegmented"])
    assert resegmented == tmp_path / "segmented" / "scenes-v2"
    rows = pq.read_table(resegmented, columns=["status"]).column("status").to_pylist()
    assert rows == ["ok"] * 8
    page = browser.open(tmp_path / "improve" / "improve.html")
    cells = table_cells(page, "iou-table")
    assert cells[-1][0] == "mIoU" and float(cells[-1][2]) > float(cells[-1][1])

    # The same labels again: nothing new to learn from, so nothing is trained, and the person is told why.
    again = subprocess.run([SEGMILL, "improve", str(tmp_path / "improve.yaml"), "--history",
                            str(tmp_path / "history")], capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert "scenes: not promoted (no new labels since version 2 was trained on these images" in again.stdout
    assert "Traceback" not in again.stderr
    assert len(client.search_model_versions("name = 'scenes'")) == 2


def test_improve_spec_mistakes_are_one_sentence_before_any_work(tmp_path: Path, register_tiny_model):
    tracking = register_tiny_model("scenes")
    spec = {"kind": "improve", "model": "scenes", "images": str(tmp_path / "nowhere"), "labels": str(tmp_path),
            "classes": str(tmp_path / "c.yaml"), "val_images": str(tmp_path), "val_labels": str(tmp_path),
            "output": str(tmp_path / "out"), "tracking_uri": tracking, "train": {"model": "fcn8s"}}
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(spec))
    done = subprocess.run([SEGMILL, "improve", str(tmp_path / "bad.yaml")], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert "nowhere" in done.stderr
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="segment_input and segment_output go together"):
        from segmill.pipeline.loop.improve import ImproveConfig

        ImproveConfig.from_dict({**{k: v for k, v in spec.items() if k != "kind"}, "segment_input": str(tmp_path)})
    with pytest.raises(ValueError, match=r"may not set \['model'\]"):
        from segmill.pipeline.loop.improve import ImproveConfig

        ImproveConfig.from_dict({k: v for k, v in spec.items() if k != "kind"}).train_config("unet", {})
