"""Job specs: validated before anything runs (keys, types, reachable inputs), run here, recorded in the history."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from segmill.jobs.cli import app
from segmill.jobs.history import (
    JobEvent,
    connect_history,
    job_state,
    read_jobs,
    record_event,
)
from segmill.jobs.specs import check_inputs, load_spec, run_spec
from segmill.pipeline.bulk.evaluate import EvaluateConfig
from segmill.pipeline.train.config import TrainConfig

runner = CliRunner()


def _write(path: Path, data: dict) -> str:
    path.write_text(yaml.safe_dump(data))
    return str(path)


@pytest.mark.parametrize("data, sentence", [
    ({"input": "a", "output": "b", "model": "m"}, "needs 'kind' set to one of ['evaluate', 'improve', 'segment', 'train']"),
    ({"kind": "segment", "input": "a", "output": "b", "model": "m", "batchsize": 4}, "unknown key(s) ['batchsize']"),
    ({"kind": "segment", "input": "a", "output": "b", "model": "m", "flip": "yes"}, "key 'flip' must be of type bool"),
    ({"kind": "train", "images": "a", "classes": "c", "epochs": "ten"}, "key 'epochs' must be of type int"),
    ({"kind": "evaluate", "model": "m", "images": "a", "output": "o", "segment": {"scale": [1]}}, "unknown key(s) ['scale']"),
    ({"kind": "evaluate", "model": "m", "images": "a", "output": "o", "segment": {"input": "x"}}, "may not set ['input']"),
])
def test_bad_specs_fail_in_one_sentence_naming_the_key(tmp_path: Path, data: dict, sentence: str) -> None:
    with pytest.raises(ValueError, match=None) as info:
        load_spec(_write(tmp_path / "job.yaml", data))
    assert sentence in str(info.value) and len(str(info.value).splitlines()) == 1
    result = runner.invoke(app, ["submit", str(tmp_path / "job.yaml")])
    assert result.exit_code == 2 and sentence in result.output.replace("\n", " ")


def test_each_kind_loads_into_its_typed_config(tmp_path: Path) -> None:
    train = load_spec({"kind": "train", "images": "i", "classes": "c.yaml", "hard_classes": ["pole", "sign"]})
    assert isinstance(train.config, TrainConfig) and train.config.hard_classes == "pole,sign"
    evaluate = load_spec({"kind": "evaluate", "model": "models:/roads@champion", "images": "i", "labels": "l",
                          "output": "o", "segment": {"flip": True}})
    assert isinstance(evaluate.config, EvaluateConfig) and evaluate.config.segment_config().flip is True
    assert evaluate.data["kind"] == "evaluate" and evaluate.output == "o"


def test_unreachable_inputs_fail_before_any_work(tmp_path: Path, scenes_dir: Path, tiny_checkpoint: str) -> None:
    good = {"kind": "segment", "input": str(scenes_dir / "images"), "labels": str(scenes_dir / "labels"),
            "output": str(tmp_path / "out"), "model": tiny_checkpoint}
    check_inputs(load_spec(good))
    assert not (tmp_path / "out").exists(), "the write probe leaves nothing behind"
    blocked = tmp_path / "file-not-folder"
    blocked.write_text("x")
    cases = {
        "input": (str(tmp_path / "nowhere"), "segment job spec: input"),
        "labels": (str(tmp_path / "no-labels"), "labels"),
        "model": (str(tmp_path / "missing.pt"), "model"),
        "output": (str(blocked / "out"), "cannot be written"),
    }
    for key, (value, phrase) in cases.items():
        with pytest.raises(ValueError) as info:
            check_inputs(load_spec({**good, key: value}))
        assert phrase in str(info.value) and len(str(info.value).splitlines()) == 1, str(info.value)
    train = {"kind": "train", "images": str(scenes_dir / "images"), "labels": str(scenes_dir / "labels"),
             "classes": str(scenes_dir / "classes.yaml"), "storage_path": str(tmp_path / "train"),
             "tracking_uri": "http://127.0.0.1:9/"}
    with pytest.raises(ValueError, match="MLflow tracking server http://127.0.0.1:9/ is unreachable"):
        check_inputs(load_spec(train))


def test_a_local_segment_run_is_recorded_in_the_history(tmp_path: Path, scenes_dir: Path, tiny_checkpoint: str,
                                                       ray_session, one_torch_thread) -> None:
    history = str(tmp_path / "history")
    spec = {"kind": "segment", "input": str(scenes_dir / "images"), "output": str(tmp_path / "out"),
            "model": tiny_checkpoint}
    result = run_spec(spec, history_uri=history)
    assert result["status"] == "SUCCEEDED" and result["rows"] == 12
    (job,) = read_jobs(history)
    assert job["job_id"] == result["job_id"] and job["status"] == "SUCCEEDED" and job["kind"] == "segment"
    assert job["output"] == str(tmp_path / "out") and job["model_version"] == result["model_version"]
    events = connect_history(history).sql("SELECT event FROM history ORDER BY recorded_at").fetchall()
    assert [e for (e,) in events] == ["started", "finished"]

    with pytest.raises(ValueError):  # a failing run is recorded as FAILED with its sentence
        run_spec({**spec, "output": str(tmp_path / "out2"), "input": str(tmp_path / "empty")}, history_uri=history,
                 check=False)
    failed = [j for j in read_jobs(history) if j["status"] == "FAILED"]
    assert len(failed) == 1 and "does not exist" in failed[0]["message"]


@pytest.fixture()
def registry(register_tiny_model) -> str:
    """A registered model `scenes` whose version 1 holds the tiny checkpoint and carries the alias `champion`."""
    return register_tiny_model("scenes")


def test_evaluating_the_champion_records_its_latest_evaluation(tmp_path: Path, scenes_dir: Path, registry: str,
                                                              ray_session, one_torch_thread) -> None:
    from segmill.pipeline.bulk.results import dataset_iou
    from segmill.pipeline.common.scenes import SCENE_CLASSES
    from segmill.pipeline.tracking import latest_evaluation

    spec = _write(tmp_path / "eval.yaml", {
        "kind": "evaluate", "model": "models:/scenes@champion", "images": str(scenes_dir / "images"),
        "labels": str(scenes_dir / "labels"), "output": str(tmp_path / "eval"), "dataset": "scenes-12"})
    result = runner.invoke(app, ["submit", spec, "--history", str(tmp_path / "history")])
    assert result.exit_code == 0, result.output
    evaluation = latest_evaluation(registry, "scenes")
    assert evaluation is not None and evaluation.dataset == "scenes-12"
    expected = dataset_iou(str(tmp_path / "eval"), SCENE_CLASSES)
    assert evaluation.iou == pytest.approx({k: v for k, v in expected.items() if v == v})
    (job,) = read_jobs(str(tmp_path / "history"))
    assert (job["kind"], job["status"], job["model_name"], job["model_version"]) == ("evaluate", "SUCCEEDED", "scenes", "1")


def test_history_folds_events_per_job_and_lives_on_s3(s3_server) -> None:
    bucket = s3_server.create_bucket("segmill-history")
    history = f"s3://{bucket}/history"
    assert read_jobs(history) == [] and job_state("x", history) is None
    record_event(JobEvent("train-1", "submitted", kind="train", status="PENDING", spec={"images": "s3://u:pw@b/i"},
                          address="http://head:8265"), history)
    record_event(JobEvent("train-1", "started", kind="train", status="RUNNING"), history)
    record_event(JobEvent("train-1", "finished", kind="train", status="SUCCEEDED", output="s3://b/ckpt",
                          model_name="roads", model_version="7"), history)
    record_event(JobEvent("segment-1", "started", kind="segment", status="RUNNING"), history)
    jobs = {j["job_id"]: j for j in read_jobs(history)}
    assert jobs["train-1"]["status"] == "SUCCEEDED" and jobs["train-1"]["model_version"] == "7"
    assert jobs["train-1"]["address"] == "http://head:8265" and "pw" not in jobs["train-1"]["spec"]
    assert jobs["segment-1"]["status"] == "RUNNING"
    assert [j["job_id"] for j in read_jobs(history, kind="train")] == ["train-1"]
    result = runner.invoke(app, ["jobs", "history", "--history", history])
    assert result.exit_code == 0 and "train-1" in result.output and "s3://b/ckpt" in result.output


def test_a_train_spec_runs_the_training_job_and_records_the_new_version(tmp_path: Path, scenes_dir: Path,
                                                                        ray_session) -> None:
    data = tmp_path / "scenes"
    shutil.copytree(scenes_dir, data)  # the job caches its class-presence index beside the labels
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    spec = {"kind": "train", "images": str(data / "images"), "labels": str(data / "labels"),
            "classes": str(data / "classes.yaml"), "storage_path": str(tmp_path / "train"), "tracking_uri": tracking,
            "register": "scenes", "epochs": 1, "model": "unet", "arch_kwargs": {"base_channels": 8, "depth": 2},
            "batch_size": 4, "crop_size": 64, "val_fraction": 0.25, "overlays": 0}
    result = run_spec(spec, history_uri=str(tmp_path / "history"))
    assert (result["model_version"], result["champion"]) == ("1", True)
    assert result["output"].startswith(str(tmp_path / "train"))
    (job,) = read_jobs(str(tmp_path / "history"))
    assert (job["kind"], job["status"], job["model_name"], job["model_version"]) == ("train", "SUCCEEDED", "scenes", "1")
    import mlflow

    assert str(mlflow.MlflowClient(tracking).get_model_version_by_alias("scenes", "champion").version) == "1"
