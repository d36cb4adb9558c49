"""The retraining job's parts that need no cluster: config, data sets, pictures, hard classes, fail-fast checks."""
from __future__ import annotations

import io
import shutil

import mlflow
import numpy as np
import pytest
from PIL import Image

from segmill.pipeline.common.images import encode_png
from segmill.pipeline.common.scenes import SCENE_CLASSES, write_scenes
from segmill.pipeline.tracking import CHAMPION, latest_evaluation, log_evaluation
from segmill.pipeline.train.config import TrainConfig
from segmill.pipeline.train.data import (
    decode_and_augment,
    in_validation_split,
    load_sets,
    split_key,
)
from segmill.pipeline.train.driver import resolve_hard_classes
from segmill.pipeline.train.report import confusion_png


def test_train_config_rejects_unknown_keys_and_wrong_types():
    with pytest.raises(ValueError, match="unknown key"):
        TrainConfig.from_dict({"images": "a", "classes": "c", "epoch": 3})
    with pytest.raises(ValueError, match="'epochs' must be of type int"):
        TrainConfig.from_dict({"images": "a", "classes": "c", "epochs": "3"})
    config = TrainConfig.from_dict({"images": "a", "classes": "c", "hard_classes": ["pole", "sign"]})
    assert config.named_hard_classes() == ["pole", "sign"]
    assert TrainConfig(images="a", classes="c", hard_classes="auto").named_hard_classes() is None


def test_labelled_sets_count_and_skip_bad_pairs(tmp_path):
    root = tmp_path / "set"
    write_scenes(str(root), 12, seed=1)
    images = sorted((root / "images").iterdir())
    # The split hashes the path under the images prefix: scene_00000 and scene_00002 are held out, wherever the
    # folder is. Two training-side pairs are spoiled, so both sides keep usable images.
    training_side = [p for p in images if not in_validation_split(p.name, 0.25)]
    assert len(training_side) == 10
    label_of = {p: root / "labels" / p.name for p in images}
    label_of[training_side[0]].write_bytes(encode_png(np.full((20, 20), 9, np.uint8)))  # class 9 of 7
    label_of[training_side[1]].unlink()  # an image without a label
    train, val = load_sets(str(root / "images"), str(root / "labels"), None, None, 0.25, len(SCENE_CLASSES),
                           endpoint_url=None, ignore_index=255)
    assert len(train.unlabelled) == 1
    errors = train.errors + val.errors
    assert len(errors) == 1 and "outside" in errors[0][1]
    assert train.usable.num_rows + val.usable.num_rows == 10
    assert set(train.usable["image_uri"].to_pylist()).isdisjoint(val.usable["image_uri"].to_pylist())
    again, _ = load_sets(str(root / "images"), str(root / "labels"), None, None, 0.25, len(SCENE_CLASSES),
                         endpoint_url=None, ignore_index=255)
    assert again.fingerprint == train.fingerprint
    assert in_validation_split("s3://b/x.png", 0.5) == in_validation_split("s3://b/x.png", 0.5)


def test_the_same_set_under_another_prefix_splits_the_same_way(tmp_path):
    def held_out(root):
        write_scenes(str(root), 16, seed=4)
        _, val = load_sets(str(root / "images"), str(root / "labels"), None, None, 0.25, len(SCENE_CLASSES),
                           endpoint_url=None, ignore_index=255)
        return sorted(uri.rsplit("/", 1)[1] for uri in val.usable["image_uri"].to_pylist())

    assert held_out(tmp_path / "a") == held_out(tmp_path / "copied" / "elsewhere")
    assert split_key("s3://bucket/set/images/sub/x.png", "s3://bucket/set/images/") == "sub/x.png"
    assert split_key("s3://other/x.png", "s3://bucket/manifest.parquet") == "s3://other/x.png"


def test_no_usable_labels_fails_before_training(tmp_path):
    write_scenes(str(tmp_path), 4, seed=2)
    shutil.rmtree(tmp_path / "labels")
    (tmp_path / "labels").mkdir()
    with pytest.raises(ValueError, match="at least one labelled image"):
        load_sets(str(tmp_path / "images"), str(tmp_path / "labels"), None, None, 0.25, 7, endpoint_url=None,
                  ignore_index=255)


def test_decode_and_augment_ignores_a_size_mismatch_and_crops_the_rest(tmp_path):
    """A bad pair becomes an all-ignore crop, not a missing one: every worker must take the same number of steps."""
    write_scenes(str(tmp_path), 2, seed=3)
    images, labels = sorted((tmp_path / "images").iterdir()), sorted((tmp_path / "labels").iterdir())
    labels[1].write_bytes(encode_png(np.zeros((5, 5), np.uint8)))
    batch = {"image_uri": np.array([str(p) for p in images]), "label_uri": np.array([str(p) for p in labels]),
             "crop_class": np.array([-1, -1]), "seed": np.array([1, 2])}
    out = decode_and_augment(batch, num_classes=7, ignore_index=255, crop=48, scale_range=(0.5, 2.0), endpoint_url=None)
    assert out["image"].shape == (2, 48, 48, 3) and out["mask"].shape == (2, 48, 48)
    assert out["valid"].tolist() == [True, False] and (out["mask"][1] == 255).all()
    assert set(np.unique(out["mask"][0])) <= set(range(7)) | {255}


def test_confusion_picture_is_a_png():
    picture = Image.open(io.BytesIO(confusion_png([[5, 1], [0, 4]], ("sky", "road"))))
    assert picture.format == "PNG" and picture.width > 56


def test_hard_classes_named_auto_and_from_champion_evaluation(tmp_path):
    tracking = f"sqlite:///{tmp_path}/mlflow.db"
    base = dict(images="i", classes="c", tracking_uri=tracking, register="scenes")
    with pytest.raises(ValueError, match="not in the class file"):
        resolve_hard_classes(TrainConfig(**base, hard_classes="pole,tree"), SCENE_CLASSES, tracking)
    assert resolve_hard_classes(TrainConfig(**base), SCENE_CLASSES, tracking) == ([], "no hard classes")
    hard, source = resolve_hard_classes(TrainConfig(**base, hard_classes="auto"), SCENE_CLASSES, tracking)
    assert hard == [] and "no champion" in source

    client = mlflow.MlflowClient(tracking_uri=tracking)
    client.create_registered_model("scenes")
    run = client.create_run(client.create_experiment("t"))
    version = client.create_model_version("scenes", source=run.info.artifact_uri, run_id=run.info.run_id).version
    client.set_registered_model_alias("scenes", CHAMPION, version)
    iou = {name: 0.9 for name in SCENE_CLASSES} | {"pole": 0.1, "vehicle": 0.3}
    log_evaluation(tracking, "scenes", version, iou, miou=0.8, dataset="fp")
    assert latest_evaluation(tracking, "scenes").iou["pole"] == pytest.approx(0.1)
    location = client.get_experiment_by_name("segmill-evaluations").artifact_location
    assert location.removeprefix("file://").startswith(str(tmp_path))  # beside the database, not ./mlruns
    hard, source = resolve_hard_classes(TrainConfig(**base, hard_classes="auto"), SCENE_CLASSES, tracking)
    assert hard == ["pole", "vehicle"] and "champion evaluation run" in source


def test_auto_hard_classes_break_a_tie_by_rarity_and_say_so(caplog):
    from segmill.pipeline.train.bootstrap import hard_classes_from_iou

    iou = {"sky": 0.9, "pole": 0.0, "fence": 0.0, "sign": 0.0, "road": 0.8}
    assert hard_classes_from_iou(iou, 2) == ["pole", "fence"]  # without a tie-break: the class file's order
    rarity = {"pole": 0.01, "fence": 0.02, "sign": 0.001}
    with caplog.at_level("WARNING"):
        assert hard_classes_from_iou(iou, 2, tie_break=rarity) == ["sign", "pole"]
    assert "sign, pole, fence tie at IoU 0.0000; took sign, pole" in caplog.text
    assert "rarest in training pixels" in caplog.text

def test_an_unreachable_tracking_server_fails_the_job_before_training(tmp_path):
    import time

    from segmill.pipeline.train.driver import train
    from testkit import free_port

    port = free_port()  # nobody listens on it
    config = TrainConfig(images=str(tmp_path / "none"), classes=str(tmp_path / "none.yaml"),
                         tracking_uri=f"http://127.0.0.1:{port}", storage_path=str(tmp_path / "runs"))
    started = time.time()
    with pytest.raises(ValueError, match=f"MLflow tracking server http://127.0.0.1:{port} is unreachable"):
        train(config)
    assert time.time() - started < 60 and not (tmp_path / "runs").exists()


def test_training_on_no_usable_pair_fails_before_training_and_registers_nothing(tmp_path):
    """All labels of the wrong size: the job exited 0 with val mIoU nan, and registered the result as champion."""
    import time

    from segmill.pipeline.train.driver import train

    write_scenes(str(tmp_path / "set"), 6, seed=1)
    for label in (tmp_path / "set" / "labels").glob("*.png"):
        label.write_bytes(encode_png(np.zeros((5, 5), np.uint8)))  # the class index cannot see a size
    tracking = f"sqlite:///{tmp_path}/mlflow.db"
    config = TrainConfig(images=str(tmp_path / "set" / "images"), labels=str(tmp_path / "set" / "labels"),
                         classes=str(tmp_path / "set" / "classes.yaml"), storage_path=str(tmp_path / "runs"),
                         tracking_uri=tracking, register="scenes", val_fraction=0.5)
    started = time.time()
    with pytest.raises(ValueError, match=r"None of the first \d+ training pairs can be used \(Label .* is 5x5 but "):
        train(config)
    assert time.time() - started < 30, "before any worker starts"
    assert mlflow.MlflowClient(tracking_uri=tracking).search_registered_models() == []


def test_the_weight_average_warms_its_decay_up_and_averages_batch_norm_statistics():
    """AveragedModel with segmill's update, against the recurrence by hand: the first update copies, the n-th
    (n = 1, 2, ...) moves the average by 1 - min(decay, (1 + n) / (10 + n)) towards the weights."""
    import torch

    from segmill.pipeline.train.loop import _ema

    model = torch.nn.Sequential(torch.nn.Conv2d(1, 1, 1, bias=False), torch.nn.BatchNorm2d(1))
    ema = _ema(model, 0.5)
    expected_w, expected_mean = None, None
    for n, value in enumerate([1.0, 3.0, 7.0, 15.0]):
        with torch.no_grad():
            model[0].weight.fill_(value)
            model[1].running_mean.fill_(-value)
        model[1].num_batches_tracked.fill_(n + 1)
        ema.update_parameters(model)
        if n == 0:
            expected_w, expected_mean = value, -value
        else:
            step = 1 - min(0.5, (1 + n) / (10 + n))  # 9/11, 9/12, 9/13: warming up (0.5 rules from n = 8)
            expected_w += step * (value - expected_w)
            expected_mean += step * (-value - expected_mean)
    assert ema.module[0].weight.item() == pytest.approx(expected_w)
    assert ema.module[1].running_mean.item() == pytest.approx(expected_mean)
    assert ema.module[1].num_batches_tracked.item() == 4  # counters are copied, not averaged
    assert int(ema.n_averaged) == 4 and model[0].weight.item() == 15.0, "the trained weights are left alone"
    assert _ema(model, 0.0) is None
