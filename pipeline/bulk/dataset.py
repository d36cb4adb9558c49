"""The bulk job's Ray Data plan, top to bottom as the data flows: read the listing -> decode -> model actors ->
encode masks -> commit part files. `build_dataset` is public so that a benchmark can read the stats of the very
dataset a job runs (`segmill.pipeline.bulk.job.run(config, plan, dataset)`).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from segmill.models.allocator import ONE_ARENA_ENV
from segmill.pipeline.bulk import pool
from segmill.pipeline.bulk.config import ResourceConfig, SegmentConfig
from segmill.pipeline.bulk.stages import (
    SegmenterStage,
    commit_batch,
    decode_batch,
    encode_masks,
)
from segmill.pipeline.common.model_source import ResolvedModel
from segmill.pipeline.common.storage import arrow_filesystem

if TYPE_CHECKING:
    import ray.data

FINISHING_TASKS_PER_GPU_ACTOR = 4  # encode and commit tasks at once per GPU model actor (one per CPU actor)
MAX_ACTOR_RESTARTS = 2  # bounded, unlike Ray Data's default of -1: an image that kills its actor must not loop
# A job of fewer blocks than the warm hosts' slots runs fewer model tasks at once: expected, not the user's to fix.
warnings.filterwarnings("ignore", category=UserWarning,
                        message=r"The maximum number of concurrent tasks for 'MapBatches\(segment_on_hosts\)'")


@dataclass(frozen=True)
class Plan:
    """What `job.prepare` decided: the job's id, its resolved model, and the listing of what is left to do."""

    job_id: str
    model: ResolvedModel
    listing_dir: str
    pending: int
    already_done: int
    skipped_files: dict[str, int] = field(default_factory=dict)  # files the listing left out, by extension
    checkpoint_uri: str = ""  # the model's bytes for the actors, under OUTPUT's staging folder


def build_dataset(config: SegmentConfig, plan: Plan, counter: Any = None) -> "ray.data.Dataset":
    """The job's dataset, not yet run; Ray must be started (the resources are resolved against the cluster).
    `counter` is a progress counter's handle (common/progress.py) the encoding stage adds its rows to."""
    import ray

    cluster, resources, warm = _placement(config)
    if not warm:  # Ray Data's own actors need the CPUs an earlier job's warm hosts hold
        pool.release()
    fs, listing_path = arrow_filesystem(plan.listing_dir, config.endpoint_url)
    # The job's settings go in a copy that its datasets capture, not in the process's context other jobs share.
    context = ray.data.DataContext.get_current().copy()
    context.max_errored_blocks = -1  # lost blocks become error rows (recovery.py)
    # Ray 2.60's new Parquet reader grew the model actor's memory with every batch; the V1 reader keeps it flat
    # (docs/throughput.md).
    context.use_datasource_v2 = False
    # Ray Data takes the lower of this and its own limit (config.QUEUE_MB_PER_CPU_ACTOR says why).
    limits = dict(object_store_memory=resources.queue_memory_mb * 2**20)
    if warm:  # the warm hosts hold their CPUs and GPUs outside Ray Data: its tasks get the rest
        limits.update(cpu=cluster.get("CPU", 0) - resources.actors_max * resources.cpus_per_actor,
                      gpu=cluster.get("GPU", 0) - resources.actors_max * (resources.gpus_per_actor or 0))
    context.execution_options.resource_limits = context.execution_options.resource_limits.copy(**limits)
    with ray.data.DataContext.current(context), warnings.catch_warnings():
        # Ray 2.60 deprecates ray_remote_args but names no parameter for the actors' bounded restarts: kept.
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated", category=DeprecationWarning)
        return _stages(config, plan, resources, ray.data.read_parquet(listing_path, filesystem=fs), counter, warm)


def _placement(config: SegmentConfig) -> tuple[dict[str, float], ResourceConfig, bool]:
    """The cluster's resources, the job's resources resolved against them, and whether warm hosts run the model."""
    import ray

    cluster = ray.cluster_resources()
    resources = config.resources.resolve(cluster)
    return cluster, resources, pool.fits(resources, cluster, nodes=sum(1 for n in ray.nodes() if n.get("Alive")))


def start_model_hosts(config: SegmentConfig) -> bool:
    """Start the job's warm model hosts now (Ray must be up), so that their processes start and import torch while
    the job is still being checked and listed; they load no model before `build_dataset`. Nothing where the job
    will use Ray Data's actors. True if new hosts were started (not an earlier job's reused)."""
    _, resources, warm = _placement(config)
    before = pool.current()
    return warm and pool.acquire(resources, use=False) is not before


def _stages(config: SegmentConfig, plan: Plan, resources: ResourceConfig, listing: "ray.data.Dataset", counter: Any,
            warm: bool = False):
    import ray

    spec = plan.model.spec
    use_gpu = bool(resources.gpus_per_actor)
    # Encode and commit keep up with a CPU model actor many times over; uncapped, a backlog ran several at once,
    # each in a worker process Ray started and killed when idle. A GPU actor can outrun one encoder.
    finishing_tasks = ray.data.TaskPoolStrategy(
        size=resources.actors_max * (FINISHING_TASKS_PER_GPU_ACTOR if use_gpu else 1))
    segmenter = dict(use_gpu=use_gpu, torch_threads=resources.torch_threads,
                     options=config.inference(resources.batch_size), fast=resources.fast_path(),
                     low_confidence=config.low_confidence, keep_host_memory=resources.keep_host_memory)
    decoded = listing.map_batches(decode_batch, batch_size=resources.decode_batch_size, batch_format="pyarrow",
                                  num_cpus=resources.decode_cpus,
                                  fn_kwargs=dict(max_pixels=config.max_pixels, num_classes=spec.num_classes,
                                                 ignore_index=spec.ignore_index, endpoint_url=config.endpoint_url,
                                                 labels_expected=config.labels is not None,
                                                 gpu_jpeg=resources.gpu_jpeg_decode))
    if warm:
        hosts = pool.acquire(resources)
        key = pool.model_key(plan.model.checkpoint, segmenter)
        load = dict(checkpoint_uri=plan.checkpoint_uri, endpoint_url=config.endpoint_url, segmenter=segmenter,
                    job_id=plan.job_id)
        hosts.preload(key, load)  # the model loads while the first images decode, not after
        # One task per batch the hosts can run at once; a task waits on its host and holds no CPU of its own.
        segmented = decoded.map_batches(
            pool.segment_on_hosts, batch_size=resources.batch_size, batch_format="numpy", num_cpus=0,
            compute=ray.data.TaskPoolStrategy(size=len(hosts.hosts) * (resources.concurrent_batches or 1)),
            max_retries=MAX_ACTOR_RESTARTS, fn_kwargs=dict(pool=hosts, key=key, load=load))
    else:
        segmented = decoded.map_batches(
            SegmenterStage, batch_size=resources.batch_size, batch_format="numpy", compute=_model_actors(resources),
            num_cpus=resources.cpus_per_actor, num_gpus=resources.gpus_per_actor or None,
            resources=resources.actor_resources, max_restarts=MAX_ACTOR_RESTARTS, max_task_retries=MAX_ACTOR_RESTARTS,
            **_model_process_env(resources),
            # The checkpoint is read from OUTPUT's staging folder, not carried as a constructor argument: in the
            # object store it could be lost, and a restarted actor could not be rebuilt.
            fn_constructor_kwargs=dict(checkpoint_uri=plan.checkpoint_uri, endpoint_url=config.endpoint_url,
                                       **segmenter))
    return (
        segmented
        .map_batches(encode_masks, batch_size=resources.batch_size, batch_format="numpy", num_cpus=0.25,
                     compute=finishing_tasks, fn_kwargs=dict(num_classes=spec.num_classes, counter=counter))
        .map_batches(commit_batch, batch_size=resources.rows_per_file, batch_format="numpy", num_cpus=0.5,
                     compute=finishing_tasks,
                     fn_kwargs=dict(classes=spec.classes, output=config.output, job_id=plan.job_id,
                                    model_name=plan.model.name, model_version=plan.model.version,
                                    endpoint_url=config.endpoint_url, row_group_rows=resources.row_group_rows,
                                    export_png=config.export_png, palette=spec.colours()))
    )


def _model_actors(resources: ResourceConfig) -> "ray.data.ActorPoolStrategy":
    """The model actors' pool; an actor that runs several batches at once is a threaded actor whose calls really
    run together (Ray Data serialises a callable class's calls unless told otherwise)."""
    import ray

    concurrent = resources.concurrent_batches or 1
    threads = dict(max_concurrent_calls_per_actor=concurrent, enable_true_multi_threading=True) if concurrent > 1 else {}
    return ray.data.ActorPoolStrategy(min_size=resources.actors_min, max_size=resources.actors_max, **threads)


def _model_process_env(resources: ResourceConfig) -> dict:
    """The model actor's process starts with one malloc arena, so that the memory it keeps is reused by the thread
    Ray Data calls it from (models/allocator.py)."""
    return {"runtime_env": {"env_vars": dict(ONE_ARENA_ENV)}} if resources.keep_host_memory else {}
