"""S3 that misbehaves: a bulk job and a training job through a proxy that injects 500s, 503 SlowDowns, connection
resets and slow answers in front of the S3 test server. Both finish with every image exactly once, the requests
retried by the filesystem layer (botocore's standard retry mode, SEGMILL_S3_ATTEMPTS attempts)."""
from __future__ import annotations

from pathlib import Path

import pytest
from s3faults import FaultProxy, FaultRates

from segmill.pipeline import SegmentConfig, segment
from segmill.pipeline.train.config import TrainConfig
from segmill.pipeline.train.driver import train

RATES = FaultRates(error_500=0.04, slow_down_503=0.04, reset=0.03, slow=0.05)


def _upload(fs, local: Path, remote: str) -> None:
    for path in sorted(local.rglob("*")):
        if path.is_file() and not path.name.startswith("_"):
            fs.put_file(str(path), f"{remote}/{path.relative_to(local)}")


@pytest.fixture(scope="module")
def scenes_on_s3(s3_server, scenes_dir: Path) -> str:
    bucket = s3_server.create_bucket("faulty")
    _upload(s3_server.filesystem(), scenes_dir, f"{bucket}/scenes")
    return bucket


def _report(name: str, proxy: FaultProxy, failed: int) -> None:
    counts = proxy.counts
    print(f"\n{name}: {counts['requests']} S3 requests, faults injected {proxy.injected} (500: {counts['500']}, "
          f"503 SlowDown: {counts['503']}, resets: {counts['reset']}; slow answers {counts['slow']}), all retried; "
          f"failed {failed}")


def test_a_bulk_job_survives_a_faulty_s3_with_nothing_lost_or_doubled(ray_session, s3_server, scenes_on_s3,
                                                                     tiny_checkpoint, results_reader) -> None:
    with FaultProxy(s3_server.endpoint_url, RATES, seed=1) as proxy:
        config = SegmentConfig(input=f"s3://{scenes_on_s3}/scenes/images", labels=f"s3://{scenes_on_s3}/scenes/labels",
                               output=f"s3://{scenes_on_s3}/results", model=tiny_checkpoint,
                               endpoint_url=proxy.endpoint_url)
        record = segment(config)
    table = results_reader(f"s3://{scenes_on_s3}/results", s3_server.filesystem())  # read straight from the server
    uris = table["image_uri"].to_pylist()
    _report("bulk job", proxy, record.error_rows)
    assert proxy.injected >= 5, "the proxy injected too few faults to prove anything"
    assert (record.rows, record.ok_rows, len(uris), len(set(uris))) == (12, 12, 12, 12)


def test_a_training_job_survives_a_faulty_s3(ray_session, s3_server, scenes_on_s3, tmp_path) -> None:
    with FaultProxy(s3_server.endpoint_url, RATES, seed=2) as proxy:
        config = TrainConfig(images=f"s3://{scenes_on_s3}/scenes/images", labels=f"s3://{scenes_on_s3}/scenes/labels",
                             classes=f"s3://{scenes_on_s3}/scenes/classes.yaml", model="unet",
                             arch_kwargs={"base_channels": 8, "depth": 2}, epochs=2, batch_size=4, crop_size=64,
                             val_fraction=0.25, storage_path=f"s3://{scenes_on_s3}/train",
                             tracking_uri=f"sqlite:///{tmp_path}/mlflow.db", endpoint_url=proxy.endpoint_url,
                             overlays=1)
        outcome = train(config)
    _report("training job", proxy, outcome.skipped.get("bad_labels", 0))
    assert proxy.injected >= 5
    assert outcome.best_epoch >= 0 and outcome.bootstrap["images"] + len(outcome.skipped) > 0
    assert outcome.skipped == {"unlabelled_images": 0, "bad_labels": 0}, "no label was lost to a fault"
