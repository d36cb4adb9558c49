"""The bulk segmentation job: list -> skip committed -> read+decode -> model actors -> commit Parquet.

    segment(SegmentConfig(input="s3://bucket/images/", output="s3://bucket/results/", model="models:/roads@champion"))

Everything that can make the job fail (no images, a model that does not load, an unwritable OUTPUT, OUTPUT
holding another job) is checked on the driver before any compute starts.
"""
from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from segmill.models.allocator import ONE_ARENA_ENV
from segmill.models.options import FastPath, InferenceOptions
from segmill.pipeline.config import SegmentConfig
from segmill.pipeline.job_record import JobRecord, write_job_record
from segmill.pipeline.listing import LISTING_SCHEMA, is_manifest, iter_image_batches
from segmill.pipeline.model_source import ModelCheck, ResolvedModel
from segmill.pipeline.ray_runtime import ensure_ray
from segmill.pipeline.recovery import commit_lost_rows
from segmill.pipeline.results import STAGING, committed_keys, committed_rows, is_committed
from segmill.pipeline.stages import SegmenterStage, commit_batch, decode_batch, encode_masks
from segmill.pipeline.storage import join_uri, open_fs, redact

log = logging.getLogger(__name__)
# Each listing chunk becomes at least one read block: small chunks let decoding start and commits land early.
LISTING_CHUNK_ROWS = 512
FINISHING_TASKS_PER_GPU_ACTOR = 4  # encode and commit tasks at once per GPU model actor (one per CPU actor)


@dataclass(frozen=True)
class _Plan:
    job_id: str
    model: ResolvedModel
    listing_dir: str
    pending: int
    already_done: int


def segment(config: SegmentConfig) -> JobRecord:
    """Run (or resume) a bulk segmentation job; returns its job record, also written to OUTPUT/_job.json."""
    started = time.time()
    plan = prepare(config)
    files: list[dict] = []
    if plan.pending:
        ensure_ray(config.ray_address, config.resources)
        for row in _dataset(config, plan).iter_rows():
            files.append(row)
            log.info("committed %s (%d rows)", row["file"], row["rows"])
        lost = commit_lost_rows(plan.listing_dir, config.output, job_id=plan.job_id, classes=plan.model.spec.classes,
                                model_name=plan.model.name, model_version=plan.model.version,
                                endpoint_url=config.endpoint_url, rows_per_file=config.resources.rows_per_file,
                                row_group_rows=config.resources.row_group_rows)
        if lost:
            log.warning("%d images were lost to failed Ray tasks or actors and are recorded as error rows", lost)
        files.append({"rows": lost})
    counts = committed_rows(config.output, config.endpoint_url, ["job_id", "status"])
    record = JobRecord.build(config, plan.job_id, plan.model.name, plan.model.version, started, counts,
                             processed=sum(int(f["rows"]) for f in files), resumed_from=plan.already_done)
    write_job_record(record, config.output, config.endpoint_url)
    _clear_staging(config, plan.job_id)
    return record


def prepare(config: SegmentConfig) -> _Plan:
    """All the checks that need no compute, and the listing of what is left to do.

    The model loads in a child process (`ModelCheck`) while the output's committed rows are read (a resumed job
    of millions of rows reads for a while); nothing is written, and Ray is not started, before the model has
    proved to load.
    """
    job_id = config.resolved_job_id()
    if config.labels and is_manifest(config.input):
        raise ValueError(f"Labels come from the manifest's label_uri column; drop --labels {redact(config.labels)}.")
    with ModelCheck(config.model, endpoint_url=config.endpoint_url) as check:
        committed = _committed_by_this_job(config, job_id)
        done_keys = committed_keys(config.output, config.endpoint_url)
        model = check.result()
    if config.labels:
        check_label_classes(config.labels, model.spec.classes, config.endpoint_url)
    _check_model_version(config, committed, model.version)
    _check_writable(config, job_id)
    listing_dir, total, pending = _list_pending(config, job_id, done_keys)
    log.info("job %s: %d images, %d already committed, %d to do", job_id, total, total - pending, pending)
    return _Plan(job_id, model, listing_dir, pending, total - pending)


def _list_pending(config: SegmentConfig, job_id: str, done_keys: np.ndarray) -> tuple[str, int, int]:
    """Write the input's images not in `done_keys` as listing chunks; (listing folder, images, images to do)."""
    fs, listings = open_fs(join_uri(config.output, STAGING, job_id, "listing"), endpoint_url=config.endpoint_url)
    if fs.exists(listings):
        fs.rm(listings, recursive=True)
    # A fresh folder per run: Ray workers keep their filesystem objects (and S3 metadata caches) between runs,
    # so a listing rewritten under the same name is read as the previous run's object (s3fs FileExpired).
    run = uuid.uuid4().hex[:12]
    listing_dir = join_uri(config.output, STAGING, job_id, "listing", run)
    root = join_uri(listings, run)
    fs.makedirs(root, exist_ok=True)
    total = pending = 0
    for chunk, table in enumerate(iter_image_batches(config.input, config.labels, endpoint_url=config.endpoint_url,
                                                              batch_rows=LISTING_CHUNK_ROWS)):
        total += table.num_rows
        if table["image_uri"].null_count:
            raise ValueError(f"Input {redact(config.input)} has rows without an image_uri; fix the manifest.")
        fresh = table.filter(pa.array(~is_committed(done_keys, table["image_uri"].to_pylist())))
        if fresh.num_rows:
            with fs.open(join_uri(root, f"chunk-{chunk:06d}.parquet"), "wb") as f:
                pq.write_table(fresh.cast(LISTING_SCHEMA), f)
            pending += fresh.num_rows
    if total == 0:
        raise ValueError(f"No images found at {redact(config.input)} (looked for jpg, jpeg, png, bmp, tif, tiff, webp).")
    return listing_dir, total, pending


def check_label_classes(labels: str, model_classes: tuple[str, ...], endpoint_url: str | None) -> None:
    """If the label set names its classes (classes.yaml in or beside the label prefix), they must be the model's."""
    import posixpath

    import yaml

    fs, root = open_fs(labels, endpoint_url=endpoint_url)
    for candidate in (join_uri(root, "classes.yaml"), join_uri(posixpath.dirname(root.rstrip("/")), "classes.yaml")):
        if fs.isfile(candidate):
            with fs.open(candidate, "r") as f:
                entries = (yaml.safe_load(f) or {}).get("classes", [])
            names = tuple(e["name"] if isinstance(e, dict) else str(e) for e in entries)
            if names != tuple(model_classes):
                raise ValueError(f"Labels at {redact(labels)} have classes {list(names)} but the model predicts "
                                 f"{list(model_classes)}; use a model trained on these classes.")
            return


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


def _check_writable(config: SegmentConfig, job_id: str) -> None:
    fs, root = open_fs(config.output, endpoint_url=config.endpoint_url)
    probe = join_uri(root, STAGING, job_id, "write-probe")
    try:
        fs.makedirs(join_uri(root, STAGING, job_id), exist_ok=True)
        with fs.open(probe, "wb") as f:
            f.write(b"ok")
        fs.rm(probe)
    except Exception as exc:
        raise ValueError(f"Output {redact(config.output)} cannot be written ({type(exc).__name__}: {exc}).") from None


def _check_model_version(config: SegmentConfig, committed: pa.Table, model_version: str) -> None:
    versions = set(committed["model_version"].to_pylist()) - {model_version}
    if versions:  # same job id, but the model's weights changed since: resuming would mix two models in one table
        raise ValueError(
            f"Output {redact(config.output)} holds results of model version {sorted(versions)[0]}, but "
            f"{redact(config.model)} is now version {model_version}; use another output folder."
        )


def _dataset(config: SegmentConfig, plan: _Plan):
    import ray

    from segmill.pipeline.storage import arrow_filesystem

    resources = config.resources.resolve(ray.cluster_resources())
    fs, listing_path = arrow_filesystem(plan.listing_dir, config.endpoint_url)
    # The job's settings go in a copy that its datasets capture, not in the process's context other jobs share.
    context = ray.data.DataContext.get_current().copy()
    context.max_errored_blocks = -1  # lost blocks become error rows (recovery.py)
    # Ray 2.60's new Parquet reader (ListFiles -> ReadFiles) made the model actor's memory grow by about the size
    # of its outputs with every batch, 0.1 GB a minute at 170 img/s; the V1 reader kept it flat (README "Throughput").
    context.use_datasource_v2 = False
    # Ray Data takes the lower of this and its own limit (QUEUE_MB_PER_CPU_ACTOR says why).
    context.execution_options.resource_limits = context.execution_options.resource_limits.copy(
        object_store_memory=resources.queue_memory_mb * 2**20)
    with ray.data.DataContext.current(context):
        return _pipeline(config, plan, resources, listing_path, fs)


def _pipeline(config: SegmentConfig, plan: _Plan, resources, listing_path: str, fs):
    import ray

    spec = plan.model.spec
    use_gpu = bool(resources.gpus_per_actor)
    # One mask-encoding task keeps up with a CPU model actor many times over (850+ img/s at 512x512); uncapped,
    # several ran at once whenever a backlog formed, each in a worker process (0.2-0.3 GB) Ray started and then
    # killed when idle. A GPU actor gets more: it can outrun one encoder.
    finishing_tasks = ray.data.TaskPoolStrategy(
        size=resources.actors_max * (FINISHING_TASKS_PER_GPU_ACTOR if use_gpu else 1))
    return (
        ray.data.read_parquet(listing_path, filesystem=fs)
        .map_batches(decode_batch, batch_size=resources.decode_batch_size, batch_format="pyarrow",
                     num_cpus=resources.decode_cpus,
                     fn_kwargs=dict(max_pixels=config.max_pixels, num_classes=spec.num_classes,
                                    ignore_index=spec.ignore_index, endpoint_url=config.endpoint_url,
                                    labels_expected=config.labels is not None,
                                    gpu_jpeg=resources.gpu_jpeg_decode))
        .map_batches(SegmenterStage, batch_size=resources.batch_size, batch_format="numpy",
                     compute=ray.data.ActorPoolStrategy(min_size=resources.actors_min, max_size=resources.actors_max),
                     num_cpus=resources.cpus_per_actor, num_gpus=resources.gpus_per_actor or None,
                     # Bounded, unlike Ray Data's default of -1: an image that kills its actor must not loop forever.
                     max_restarts=2, max_task_retries=2,
                     **_model_process_env(resources),
                     fn_constructor_kwargs=dict(checkpoint=plan.model.checkpoint, use_gpu=use_gpu,
                                                torch_threads=resources.torch_threads,
                                                options=InferenceOptions(scales=config.scales, flip=config.flip,
                                                                         tile_size=config.tile_size,
                                                                         tile_threshold=config.tile_threshold,
                                                                         max_side=config.max_side,
                                                                         batch_size=resources.batch_size),
                                                fast=FastPath(precision=resources.precision,
                                                              channels_last=resources.channels_last,
                                                              compile=resources.compile,
                                                              pin_memory=bool(resources.pin_memory),
                                                              fold_batchnorm=resources.fold_batchnorm),
                                                low_confidence=config.low_confidence,
                                                keep_host_memory=resources.keep_host_memory))
        .map_batches(encode_masks, batch_size=resources.batch_size, batch_format="numpy", num_cpus=0.25,
                     compute=finishing_tasks, fn_kwargs=dict(num_classes=spec.num_classes))
        .map_batches(commit_batch, batch_size=resources.rows_per_file, batch_format="numpy", num_cpus=0.5,
                     compute=finishing_tasks,
                     fn_kwargs=dict(classes=spec.classes, output=config.output, job_id=plan.job_id,
                                    model_name=plan.model.name, model_version=plan.model.version,
                                    endpoint_url=config.endpoint_url, row_group_rows=resources.row_group_rows,
                                    export_png=config.export_png, palette=spec.colours()))
    )


def _model_process_env(resources) -> dict:
    """The model actor's process starts with one malloc arena, so that the memory it keeps is reused by the thread
    Ray Data calls it from (models/allocator.py): 106 ms per image instead of 119-129 (README "Throughput")."""
    return {"runtime_env": {"env_vars": dict(ONE_ARENA_ENV)}} if resources.keep_host_memory else {}


def _clear_staging(config: SegmentConfig, job_id: str) -> None:
    fs, root = open_fs(join_uri(config.output, STAGING, job_id), endpoint_url=config.endpoint_url)
    if fs.exists(root):
        fs.rm(root, recursive=True)
