"""The bulk segmentation job: prepare (every check, then the listing of what is left) -> the Ray Data plan
(dataset.py) -> run it, recover lost rows, write the job record.

    segment(SegmentConfig(input="s3://bucket/images/", output="s3://bucket/results/", model="models:/roads@champion"))

Everything that can make the job fail (no images, a model that does not load, an unwritable OUTPUT, OUTPUT
holding another job) is checked on the driver before anything runs on Ray (which starts meanwhile).
"""
from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from segmill.pipeline.bulk import pool
from segmill.pipeline.bulk.config import SegmentConfig
from segmill.pipeline.bulk.dataset import Plan, build_dataset, start_model_hosts
from segmill.pipeline.bulk.lease import JobLease
from segmill.pipeline.bulk.record import JobRecord, write_job_record
from segmill.pipeline.bulk.recovery import commit_lost_rows
from segmill.pipeline.bulk.results import (
    STAGING,
    committed_keys,
    committed_rows,
    is_committed,
    uncommit_errors,
)
from segmill.pipeline.common.classes import find_class_file
from segmill.pipeline.common.listing import (
    IMAGE_EXTENSIONS,
    LISTING_SCHEMA,
    Skipped,
    is_manifest,
    iter_image_batches,
)
from segmill.pipeline.common.model_source import ModelCheck
from segmill.pipeline.common.progress import Counter, ProgressCallback
from segmill.pipeline.common.runtime import BackgroundStart, ensure_ray, refuse_local_paths
from segmill.pipeline.common.storage import check_writable, join_uri, open_fs, redact

log = logging.getLogger(__name__)
# Each listing chunk becomes at least one read block: small chunks let decoding start and commits land early.
LISTING_CHUNK_ROWS = 512
MODEL_FILE = "model.pt"  # the checkpoint the model actors load, under OUTPUT/_staging/JOB


def segment(config: SegmentConfig, progress: ProgressCallback | None = None) -> JobRecord:
    """Run (or resume) a bulk segmentation job; returns its job record, also written to OUTPUT/_job.json.

    `progress` is called twice a second with the images done so far (common/progress.py), from a driver thread.
    """
    started = time.time()
    lease = JobLease(config.output, config.resolved_job_id(), STAGING, endpoint_url=config.endpoint_url)
    begun = None
    try:
        begun = start(config, lease, progress)
        return run(config, begun.plan, begun.dataset, started=started, lease=lease)
    finally:
        if begun is not None and begun.counter is not None:
            begun.counter.stop()
        lease.release()


@dataclass
class Started:
    """A job that passed its checks: its plan, and its dataset, not yet run (None when nothing is left to do)."""

    plan: Plan
    dataset: Any = None
    counter: Counter | None = None


def start(config: SegmentConfig, lease: JobLease | None = None, progress: ProgressCallback | None = None) -> Started:
    """`prepare` the job while Ray and the warm model hosts start, then build its dataset (`run` runs it).

    Nothing runs on Ray before the model has loaded, and a job that is rejected (or has nothing to do) stops
    what its start started: in a notebook the user's own ray.init would otherwise fail.
    """
    runtime = BackgroundStart(lambda: _start_runtime(config))
    counter = None
    try:
        plan = prepare(config, lease)
        if not plan.pending:
            runtime.abandon(_release_new_hosts)
            return Started(plan)
        runtime.wait()
        refuse_local_paths({"input": config.input, "labels": config.labels, "output": config.output})
        counter = Counter.start(progress, total=plan.pending)
        return Started(plan, build_dataset(config, plan, counter.handle if counter else None), counter)
    except BaseException:
        if counter is not None:
            counter.stop()
        runtime.abandon(_release_new_hosts)
        raise


def _start_runtime(config: SegmentConfig) -> bool:
    """Ray, then the job's warm model hosts; True if this started new hosts."""
    ensure_ray(config.ray_address, config.resources)
    return start_model_hosts(config)


def _release_new_hosts(started_hosts: bool) -> None:
    if started_hosts:
        pool.release()


def run(config: SegmentConfig, plan: Plan, dataset, *, started: float | None = None,
        lease: JobLease | None = None) -> JobRecord:
    """Run a prepared job's dataset (None when nothing is left to do), fill in lost rows, write the record."""
    started = time.time() if started is None else started
    processed = 0
    if dataset is not None:
        for row in dataset.iter_rows():
            processed += int(row["rows"])
            log.info("committed %s (%d rows)", row["file"], row["rows"])
        lost = commit_lost_rows(plan.listing_dir, config.output, job_id=plan.job_id, classes=plan.model.spec.classes,
                                model_name=plan.model.name, model_version=plan.model.version,
                                endpoint_url=config.endpoint_url, rows_per_file=config.resources.rows_per_file,
                                row_group_rows=config.resources.row_group_rows)
        if lost:
            log.warning("%d images were lost to failed Ray tasks or actors and are recorded as error rows", lost)
        processed += lost
    counts = committed_rows(config.output, config.endpoint_url, ["job_id", "status"])
    record = JobRecord.build(config, plan.job_id, plan.model.name, plan.model.version, started, counts,
                             processed=processed, resumed_from=plan.already_done, skipped_files=plan.skipped_files)
    write_job_record(record, config.output, config.endpoint_url)
    if lease is not None:
        lease.release()  # before the staging folder goes, so that no renewal writes it back
    _clear_staging(config, plan.job_id)
    return record


def prepare(config: SegmentConfig, lease: JobLease | None = None) -> Plan:
    """All the checks that need no compute, and the listing of what is left to do.

    The model loads in a child process (`ModelCheck`; not again for a model this process has checked) while the
    output's committed rows are read (a resumed job of millions of rows reads for a while); nothing is written,
    and nothing runs on Ray (which `segment` starts meanwhile), before the model has proved to load.
    """
    job_id = config.resolved_job_id()
    if config.labels and is_manifest(config.input):
        raise ValueError(f"Labels come from the manifest's label_uri column; drop --labels {redact(config.labels)}.")
    with ModelCheck(config.model, endpoint_url=config.endpoint_url, tracking_uri=config.tracking_uri) as check:
        committed = _committed_by_this_job(config, job_id)
        done_keys = committed_keys(config.output, config.endpoint_url)
        model = check.result()
    if config.labels:
        _check_label_classes(config.labels, model.spec.classes, config.endpoint_url)
    _check_model_version(config, committed, model.version)
    check_writable(config.output, "Output", config.endpoint_url)
    if lease is not None:  # the first write of the job, once nothing else can stop it
        lease.acquire()
    retried = uncommit_errors(config.output, job_id, everything=config.retry_errors, endpoint_url=config.endpoint_url,
                              row_group_rows=config.resources.row_group_rows)
    if retried:
        log.warning("%d error rows of an earlier run are tried again%s", retried,
                    "" if config.retry_errors else " (their errors were the infrastructure's, not the images')")
        done_keys = committed_keys(config.output, config.endpoint_url)
    skipped = Skipped()
    listing_dir, total, pending = _list_pending(config, job_id, done_keys, skipped)
    if skipped:
        log.warning("left out %d files of %s that are not images Pillow reads: %s", sum(skipped.values()),
                    redact(config.input), skipped.describe())
    log.info("job %s: %d images, %d already committed, %d to do", job_id, total, total - pending, pending)
    checkpoint_uri = join_uri(config.output, STAGING, job_id, MODEL_FILE)
    if pending:
        fs, path = open_fs(checkpoint_uri, endpoint_url=config.endpoint_url)
        with fs.open(path, "wb") as f:
            f.write(model.checkpoint)
    return Plan(job_id, model, listing_dir, pending, total - pending, dict(skipped), checkpoint_uri)


def _list_pending(config: SegmentConfig, job_id: str, done_keys: np.ndarray,
                  skipped: Skipped) -> tuple[str, int, int]:
    """Write the input's images not in `done_keys` as listing chunks; (listing folder, images, images to do).

    OUTPUT is never listed, even when it lies inside INPUT: a re-run must not segment the job's own PNGs."""
    fs, listings = open_fs(join_uri(config.output, STAGING, job_id, "listing"), endpoint_url=config.endpoint_url)
    if fs.exists(listings):
        fs.rm(listings, recursive=True)
    # A fresh folder per run: Ray workers keep their filesystem objects (and S3 metadata caches) between runs,
    # so a listing rewritten under the same name is read as the previous run's object (s3fs FileExpired).
    attempt = uuid.uuid4().hex[:12]
    listing_dir = join_uri(config.output, STAGING, job_id, "listing", attempt)
    root = join_uri(listings, attempt)
    fs.makedirs(root, exist_ok=True)
    total = pending = 0
    batches = iter_image_batches(config.input, config.labels, endpoint_url=config.endpoint_url,
                                 batch_rows=LISTING_CHUNK_ROWS, skipped=skipped, exclude=config.output)
    for chunk, table in enumerate(batches):
        total += table.num_rows
        if table["image_uri"].null_count:
            raise ValueError(f"Input {redact(config.input)} has rows without an image_uri; fix the manifest.")
        fresh = table.filter(pa.array(~is_committed(done_keys, table["image_uri"].to_pylist())))
        if fresh.num_rows:
            with fs.open(join_uri(root, f"chunk-{chunk:06d}.parquet"), "wb") as f:
                pq.write_table(fresh.cast(LISTING_SCHEMA), f)
            pending += fresh.num_rows
    if total == 0:
        looked = ", ".join(sorted(e.lstrip(".") for e in IMAGE_EXTENSIONS))
        raise ValueError(f"No images found at {redact(config.input)} (looked for {looked}).")
    return listing_dir, total, pending


def _check_label_classes(labels: str, model_classes: tuple[str, ...], endpoint_url: str | None) -> None:
    """If the label set names its classes (classes.yaml in or beside the label prefix), they must be the model's."""
    found = find_class_file(labels, endpoint_url=endpoint_url)
    if found is not None and found.names != tuple(model_classes):
        raise ValueError(f"Labels at {redact(labels)} have classes {list(found.names)} but the model predicts "
                         f"{list(model_classes)}; use a model trained on these classes.")


def _committed_by_this_job(config: SegmentConfig, job_id: str) -> pa.Table:
    """The job ids and model versions of OUTPUT's rows, which must all be this job's."""
    committed = committed_rows(config.output, config.endpoint_url, ["job_id", "model_version"])
    others = set(committed["job_id"].to_pylist()) - {job_id}
    if others:
        raise ValueError(
            f"Output {redact(config.output)} already holds results of job {sorted(others)[0]}; "
            "use another output folder, or pass that job id to resume it."
        )
    return committed


def _check_model_version(config: SegmentConfig, committed: pa.Table, model_version: str) -> None:
    versions = set(committed["model_version"].to_pylist()) - {model_version}
    if versions:  # same job id, but the model's weights changed since: resuming would mix two models in one table
        raise ValueError(
            f"Output {redact(config.output)} holds results of model version {sorted(versions)[0]}, but "
            f"{redact(config.model)} is now version {model_version}; use another output folder."
        )


def _clear_staging(config: SegmentConfig, job_id: str) -> None:
    """Remove the job's staging folder, and the staging root when no other job's is left in it."""
    fs, staging = open_fs(join_uri(config.output, STAGING), endpoint_url=config.endpoint_url)
    root = join_uri(staging, job_id)
    if fs.exists(root):
        fs.rm(root, recursive=True)
    if fs.isdir(staging) and not fs.ls(staging, detail=False):
        fs.rmdir(staging)
