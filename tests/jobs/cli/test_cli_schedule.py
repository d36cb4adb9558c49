"""The schedule commands end to end: add, list, firings, remove, and `scheduler --once` firing a real job spec."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from segmill.jobs.cli import app
from segmill.jobs.scheduling.scheduler import add_schedule
from segmill.jobs.scheduling.store import OK, ScheduleStore

runner = CliRunner()


@pytest.fixture()
def state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("SEGMILL_STATE", str(tmp_path / "state"))
    monkeypatch.setenv("SEGMILL_HISTORY", str(tmp_path / "history"))
    return tmp_path / "state"


def _train_spec(tmp_path: Path) -> Path:
    spec = tmp_path / "train.yaml"
    spec.write_text(yaml.safe_dump({"kind": "train", "images": str(tmp_path / "images"), "labels": str(tmp_path / "labels"),
                                    "classes": str(tmp_path / "classes.yaml"), "register": "roads"}))
    return spec


def test_add_list_firings_remove(state: Path, tmp_path: Path) -> None:
    from segmill.pipeline.common.scenes import classes_yaml

    (tmp_path / "classes.yaml").write_text(classes_yaml())
    spec = _train_spec(tmp_path)
    added = runner.invoke(app, ["schedule", "add", "weekly", "--spec", str(spec), "--cron", "0 3 * * 0",
                                "--iou-below", "0.4", "--iou-class", "pole"])
    assert added.exit_code == 0, added.output
    assert "cron '0 3 * * 0' and champion IoU of pole < 0.4" in added.output and str(state) in added.output
    listed = runner.invoke(app, ["schedule", "list"])
    assert listed.exit_code == 0 and "weekly" in listed.output
    assert runner.invoke(app, ["schedule", "firings"]).exit_code == 0
    assert runner.invoke(app, ["scheduler", "--once"]).output.startswith("0 slot(s) handled")
    removed = runner.invoke(app, ["schedule", "remove", "weekly"])
    assert removed.exit_code == 0 and ScheduleStore(state).list() == []


@pytest.mark.parametrize("args, message", [
    (["--cron", "at three"], "Cron expression 'at three' is not valid"),
    ([], "needs --cron, a condition"),
    (["--cron", "0 3 * * 0", "--iou-class", "pole"], "--iou-class 'pole' needs --iou-below"),
])
def test_add_errors_are_one_sentence(state: Path, tmp_path: Path, args: list[str], message: str) -> None:
    result = runner.invoke(app, ["schedule", "add", "x", "--spec", str(_train_spec(tmp_path)), *args])
    assert result.exit_code == 2 and message in result.output, result.output


def test_remove_names_an_unknown_schedule(state: Path) -> None:
    result = runner.invoke(app, ["schedule", "remove", "nope"])
    assert result.exit_code == 2 and "Schedule 'nope' does not exist" in result.output


def test_scheduler_once_fires_a_real_spec_once(state: Path, tmp_path: Path, ray_session, scenes_dir: Path,
                                               tiny_checkpoint: str) -> None:
    """Through segmill.jobs.specs.run_spec: a segment spec (fast) stands in for a training one."""
    output = tmp_path / "results"
    spec = tmp_path / "segment.yaml"
    spec.write_text(yaml.safe_dump({"kind": "segment", "input": str(scenes_dir / "images"), "output": str(output),
                                    "model": tiny_checkpoint}))
    created = datetime.now(timezone.utc) - timedelta(hours=2)  # so its hourly slot is already due
    add_schedule(ScheduleStore(state), "hourly", str(spec), cron="0 * * * *", now=created)
    first = runner.invoke(app, ["scheduler", "--once"])
    assert first.exit_code == 0, first.output
    assert "hourly" in first.output and ": ok" in first.output
    assert len(list(output.glob("part-*.parquet"))) >= 1
    [firing] = [f for f in ScheduleStore(state).firings("hourly") if f.status == OK]
    assert firing.detail["result"]["kind"] == "segment" and firing.detail["result"]["status"] == "SUCCEEDED"
    again = runner.invoke(app, ["scheduler", "--once"])
    assert again.exit_code == 0 and again.output.startswith("0 slot(s) handled"), "never the same slot twice"
