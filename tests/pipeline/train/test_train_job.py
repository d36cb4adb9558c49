"""The retraining job end to end on real parts: local Ray (2 DDP workers), moto's S3, a real `mlflow server`.

Worker failure is real too: a training worker process is SIGKILLed mid-run and Ray Train must replace it and
go on from the last checkpoint; a stopped driver's run is continued with `resume`.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import mlflow
import numpy as np
import psutil
import pytest
from conftest import images_loaded, table_cells
from PIL import Image

from segmill.pipeline import SegmentConfig, segment
from segmill.pipeline.common.model_source import resolve_model
from segmill.pipeline.common.scenes import SCENE_CLASSES
from segmill.pipeline.tracking import CHALLENGER, CHAMPION, latest_evaluation
from segmill.pipeline.train.config import TrainConfig
from segmill.pipeline.train.driver import RUN_RECORD, train

SEGMILL = str(Path(sys.executable).with_name("segmill"))
TINY = dict(model="unet", arch_kwargs={"base_channels": 8, "depth": 2}, batch_size=4, crop_size=64,
            cpus_per_worker=1.0, val_fraction=0.25)


def _upload(fs, local: Path, remote: str) -> None:
    for path in sorted(local.rglob("*")):
        if path.is_file() and not path.name.startswith("_"):
            fs.put_file(str(path), f"{remote}/{path.relative_to(local)}")


def _steps(tracking: str, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in mlflow.MlflowClient(tracking_uri=tracking).get_metric_history(run_id, key))


def test_train_on_s3_tracks_registers_and_promotes_only_when_better(ray_session, s3_server, mlflow_server, train_scenes,
                                                                    tmp_path, request):
    bucket = s3_server.create_bucket("train-job")
    fs = s3_server.filesystem()
    _upload(fs, train_scenes, f"{bucket}/scenes")
    config = TrainConfig(images=f"s3://{bucket}/scenes/images", labels=f"s3://{bucket}/scenes/labels",
                         classes=f"s3://{bucket}/scenes/classes.yaml", epochs=2, workers=2, hard_classes="pole,sign",
                         bootstrap_factor=3, register="scenes-s3", storage_path=f"s3://{bucket}/train",
                         tracking_uri=mlflow_server, endpoint_url=s3_server.endpoint_url, overlays=2, **TINY)
    first = train(config)

    assert (first.model_version, first.champion, first.decision) == ("1", True, "no champion yet")
    summary = first.bootstrap
    assert summary["hard_images"] > 0
    assert summary["epoch_images"] == summary["images"] + 2 * summary["hard_images"]
    client = mlflow.MlflowClient(tracking_uri=mlflow_server)
    run = client.get_run(first.run_id)
    given = {k for k, v in config.to_dict().items() if v is not None}
    assert given <= set(run.data.params) and "None" not in run.data.params.values()
    assert run.data.params["resume"] == "false" and run.data.params["epochs"] == "2"
    typed = json.loads(Path(mlflow.artifacts.download_artifacts(run_id=first.run_id, artifact_path="config.json",
                                                                dst_path=str(tmp_path), tracking_uri=mlflow_server))
                       .read_text())
    assert typed["epochs"] == 2 and typed["resume"] is False and typed["val_images"] is None
    inputs = {d.dataset.name: d for d in run.inputs.dataset_inputs}
    assert set(inputs) == {"training", "validation"}
    assert inputs["training"].dataset.digest == run.data.tags["segmill.train_fingerprint"][:36]
    assert run.data.params["hard_classes_resolved"] == "pole,sign"
    assert run.data.tags["segmill.train_fingerprint"] and run.data.tags["segmill.val_fingerprint"]
    assert _steps(mlflow_server, first.run_id, "loss") == [0, 1]
    assert _steps(mlflow_server, first.run_id, "val_miou") == [0, 1]
    assert any(k.startswith("val_iou.") for k in run.data.metrics)
    artifacts = {a.path for a in client.list_artifacts(first.run_id)}
    assert {"checkpoint", "confusion_matrix.png", "overlays", "bootstrap.json", "report.html"} <= artifacts
    assert len(client.list_artifacts(first.run_id, "overlays")) == 2
    assert any(key.endswith("checkpoint/model.pt") for key in fs.find("mlflow-artifacts"))  # on S3, via the server
    assert fs.find(f"{bucket}/train/{first.run_name}")  # Ray Train checkpoints on S3 too

    served = resolve_model("models:/scenes-s3@champion", tracking_uri=mlflow_server)
    assert served.version == "1" and served.spec.classes == SCENE_CLASSES
    mlflow.set_tracking_uri(mlflow_server)  # a real MLflow model: loads and predicts with MLflow alone
    try:
        pyfunc = mlflow.pyfunc.load_model("models:/scenes-s3@champion")
    finally:
        mlflow.set_tracking_uri(None)
    assert [str(s.type) for s in pyfunc.metadata.signature.inputs.inputs] == ["uint8"]
    image = np.asarray(Image.open(sorted((train_scenes / "images").glob("*.png"))[0]).convert("RGB"))
    batch = np.stack([image, image[:, ::-1]])  # one size per call
    masks = pyfunc.predict(batch)
    assert masks.shape == batch.shape[:3] and masks.dtype == np.int32 and masks.max() < len(SCENE_CLASSES)
    os.environ["MLFLOW_TRACKING_URI"] = mlflow_server  # the bulk job's actors resolve models:/ through it
    try:
        record = segment(SegmentConfig(input=f"s3://{bucket}/scenes/images", output=f"s3://{bucket}/served",
                                       labels=f"s3://{bucket}/scenes/labels", model="models:/scenes-s3@champion",
                                       endpoint_url=s3_server.endpoint_url))
    finally:
        del os.environ["MLFLOW_TRACKING_URI"]
    assert (record.rows, record.error_rows) == (48, 0)

    second = train(TrainConfig(**{**config.to_dict(), "epochs": 1, "champion_margin": 1.0}))
    assert (second.model_version, second.champion) == ("2", False)
    assert second.champion_miou is not None and "does not clear the margin 1" in second.decision
    assert client.get_model_version_by_alias("scenes-s3", CHAMPION).version == "1"
    assert client.get_model_version_by_alias("scenes-s3", CHALLENGER).version == "2"
    tags = client.get_model_version("scenes-s3", "2").tags
    assert tags["segmill.decision"] == "challenger" and float(tags["segmill.champion_miou"]) == pytest.approx(
        second.champion_miou, abs=1e-6)
    assert float(tags["segmill.gain_low"]) <= float(tags["segmill.gain"]) <= float(tags["segmill.gain_high"])
    assert int(tags["segmill.gate_block"]) >= 1
    assert set(json.loads(tags["segmill.class_change"])) <= set(SCENE_CLASSES)
    evaluation = latest_evaluation(mlflow_server, "scenes-s3")  # the champion, re-scored on the same val set
    assert evaluation.dataset == run.data.tags["segmill.val_fingerprint"]

    # The second run's report, opened in Chromium: its IoU beside the champion's, as scored for the gate.
    report = Path(client.download_artifacts(second.run_id, "report.html", str(tmp_path)))
    page = request.getfixturevalue("browser").open(report)  # skips here, last, where no browser can be had
    assert all(images_loaded(page)) and len(images_loaded(page)) == 1 + 1 + 2  # IoU bars, confusion, 2 overlays
    cells = {row[0]: row[1:] for row in table_cells(page, "iou-table")}
    assert list(cells) == [*SCENE_CLASSES, "mIoU"]
    for name in SCENE_CLASSES:
        ours, theirs = second.val_iou[name], evaluation.iou[name]
        assert cells[name][0] == ("-" if ours != ours else f"{ours:.4f}")
        assert cells[name][1] == ("-" if theirs != theirs else f"{theirs:.4f}")
    assert cells["mIoU"][:2] == [f"{second.val_miou:.4f}", f"{second.champion_miou:.4f}"]


def _train_workers() -> list[int]:
    """PIDs of Ray Train worker processes descended from this test process."""
    return [p.pid for p in psutil.Process().children(recursive=True) if _is_train_worker(p)]


def _is_train_worker(process: psutil.Process) -> bool:
    try:
        return "RayTrainWorker" in " ".join(process.cmdline())
    except psutil.Error:
        return False


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _first_checkpoint(root: Path, timeout: float) -> None:
    """Wait until Ray Train has committed a checkpoint (its manager's snapshot names one), not just begun writing."""
    def committed() -> bool:
        return any("checkpoint_" in p.read_text(errors="replace") for p in root.glob("*/checkpoint_manager_snapshot.json"))

    deadline = time.time() + timeout
    while not committed():
        if time.time() > deadline:
            raise TimeoutError(f"no checkpoint under {root} after {timeout} s")
        time.sleep(0.2)


def test_a_killed_worker_is_replaced_and_training_goes_on_from_the_checkpoint(ray_session, train_scenes, tmp_path):
    tracking = f"sqlite:///{tmp_path}/mlflow.db"
    storage = tmp_path / "train"
    config = TrainConfig(images=str(train_scenes / "images"), labels=str(train_scenes / "labels"),
                         classes=str(train_scenes / "classes.yaml"), epochs=3, workers=2, max_failures=1,
                         ema_decay=0.9, storage_path=str(storage), tracking_uri=tracking, overlays=0, **TINY)
    killed: list[int] = []

    def kill_a_worker() -> None:
        _first_checkpoint(storage, timeout=240)
        victim = _train_workers()[-1]
        killed.append(victim)
        os.kill(victim, signal.SIGKILL)

    killer = threading.Thread(target=kill_a_worker, daemon=True)
    killer.start()
    outcome = train(config)
    killer.join(timeout=5)

    assert killed, "no worker was killed"
    assert _gone(killed[0])
    steps = _steps(tracking, outcome.run_id, "loss")
    assert steps.count(0) == 1, f"epoch 0 ran again: {steps}"  # restarted from the checkpoint, not from scratch
    assert sorted(set(steps)) == [0, 1, 2]
    # The weight average came back with the checkpoint: it counts every step of the three epochs, not only those
    # after the restart.
    import torch

    from segmill.pipeline.train.loop import EMA_FILE, steps_per_epoch

    averaged = torch.load(Path(outcome.checkpoint_uri) / EMA_FILE, weights_only=True)
    assert int(averaged["n_averaged"]) == 3 * steps_per_epoch(outcome.bootstrap["epoch_images"], TINY["batch_size"], 2)


# Three CLI runs, each starting Ray and Ray Train (about 110 s on 2 cores): `make test-slow`.
@pytest.mark.slow
def test_resume_continues_a_stopped_run(train_scenes, tmp_path):
    tracking = f"sqlite:///{tmp_path}/mlflow.db"
    storage = tmp_path / "train"
    args = ["--images", str(train_scenes / "images"), "--labels", str(train_scenes / "labels"),
            "--classes", str(train_scenes / "classes.yaml"), "--arch-kwargs", '{"base_channels": 8, "depth": 2}',
            "--epochs", "3", "--batch-size", "4", "--crop-size", "64", "--cpus-per-worker", "1", "--ema-decay", "0.9",
            "--storage", str(storage), "--tracking-uri", tracking, "--run-name", "stopped"]
    driver = subprocess.Popen([SEGMILL, "train", *args], start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _first_checkpoint(storage, timeout=240)
    finally:
        os.killpg(driver.pid, signal.SIGKILL)  # the driver and the Ray it started, as a lost machine would
        driver.wait()
    assert (storage / "stopped" / RUN_RECORD).exists()

    env = {**os.environ, "RAY_ADDRESS": ""}
    done = subprocess.run([SEGMILL, "train", *args, "--resume"], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    run_id = mlflow.MlflowClient(tracking_uri=tracking).search_runs(
        [mlflow.MlflowClient(tracking_uri=tracking).get_experiment_by_name("segmill-train").experiment_id])[0].info.run_id
    steps = _steps(tracking, run_id, "loss")
    assert steps.count(0) == 1 and sorted(set(steps)) == [0, 1, 2], steps

    again = subprocess.run([SEGMILL, "train", *args, "--resume", "--register", "scenes"], env=env,
                           capture_output=True, text=True, timeout=300)  # the run is finished now
    assert again.returncode == 2 and "finished already" in again.stderr and "Traceback" not in again.stderr
    assert not mlflow.MlflowClient(tracking_uri=tracking).search_registered_models(), "nothing registered"


def test_hard_class_options_reach_the_workers_and_the_best_epoch_is_the_model(ray_session, train_scenes, tmp_path):
    """Hard crops, pixel-mass sampling and class weights, end to end: what the workers logged is what was asked."""
    tracking = f"sqlite:///{tmp_path}/mlflow.db"
    config = TrainConfig(images=str(train_scenes / "images"), labels=str(train_scenes / "labels"),
                         classes=str(train_scenes / "classes.yaml"), epochs=2, hard_classes="pole,sign",
                         sampling="pixel_mass", bootstrap_factor=2, hard_crop_share=0.4,
                         class_weighting="median_frequency", storage_path=str(tmp_path / "train"),
                         tracking_uri=tracking, overlays=0, **TINY)
    outcome = train(config)
    client = mlflow.MlflowClient(tracking_uri=tracking)
    metrics = client.get_run(outcome.run_id).data.metrics
    crop_shares = [m.value for m in client.get_metric_history(outcome.run_id, "hard_crop_share")]
    assert len(crop_shares) == 2 and min(crop_shares) >= 0.4, crop_shares
    assert outcome.bootstrap["sampling"] == "pixel_mass"
    assert outcome.bootstrap["hard_crops_planned"] == pytest.approx(0.4, abs=0.02)
    assert outcome.bootstrap["epoch_images"] == outcome.bootstrap["images"] + outcome.bootstrap["hard_images"]
    assert metrics["class_weight.pole"] > metrics["class_weight.sky"], "the rare class weighs more"
    assert sum(metrics[f"train_share.{c}"] for c in SCENE_CLASSES) == pytest.approx(1.0)
    # The crops see far more pole than the data set holds: the share of labelled pixels, before and after.
    assert metrics["train_share.pole"] > 3 * metrics["dataset_share.pole"]
    history = {m.step: m.value for m in client.get_metric_history(outcome.run_id, "val_miou")}
    assert outcome.val_miou == pytest.approx(max(history.values())) and history[outcome.best_epoch] == outcome.val_miou
    assert metrics["best_epoch"] == outcome.best_epoch


def test_the_weight_average_is_what_is_validated_and_registered(ray_session, train_scenes, tmp_path):
    """With --ema-decay the run's model is the moving average (weights and batch-norm statistics), kept in the
    checkpoint beside the trained weights (which training resumes from), updated once per step."""
    import torch

    from segmill.models.checkpoint import load_checkpoint
    from segmill.pipeline.train.loop import EMA_FILE, MODEL_FILE, steps_per_epoch

    config = TrainConfig(images=str(train_scenes / "images"), labels=str(train_scenes / "labels"),
                         classes=str(train_scenes / "classes.yaml"), epochs=2, val_every=2, ema_decay=0.9,
                         storage_path=str(tmp_path / "train"), tracking_uri=f"sqlite:///{tmp_path}/mlflow.db",
                         overlays=0, **TINY)
    outcome = train(config)
    assert outcome.best_epoch == 1  # only the last epoch is validated, so the model is the last average
    folder = Path(outcome.checkpoint_uri)
    averaged = torch.load(folder / EMA_FILE, weights_only=True)
    assert int(averaged["n_averaged"]) == 2 * steps_per_epoch(outcome.bootstrap["epoch_images"], TINY["batch_size"], 1)
    registered = load_checkpoint(outcome.checkpoint_bytes)[0].state_dict()
    trained = load_checkpoint((folder / MODEL_FILE).read_bytes())[0].state_dict()
    assert set(registered) == {k.removeprefix("module.") for k in averaged if k.startswith("module.")}
    assert all(torch.equal(registered[k], averaged[f"module.{k}"]) for k in registered)
    floats = [k for k, v in registered.items() if v.is_floating_point()]
    assert any(not torch.equal(registered[k], trained[k]) for k in floats), "the average is not the trained weights"
