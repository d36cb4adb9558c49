"""The retraining job's driver: check everything, plan the bootstrapped stream, run Ray Train, track, register.

Everything that can fail fast does so before a worker starts: the tracking server, the class file, the
architecture, the starting weights, the labelled set (bad pairs are counted and skipped, and an empty set is
an error), the hard classes. After training, the run gets its artifacts and, with `register`, a model version
that becomes champion only if it beats the current one on this run's validation set.
"""
from __future__ import annotations

import json
import logging
import os
import time

from segmill.models.allocator import ONE_ARENA_ENV
from segmill.models.checkpoint import ModelSpec
from segmill.models.registry import list_models
from segmill.pipeline.bulk import pool as warm_pool
from segmill.pipeline.common import settings
from segmill.pipeline.common.classes import load_class_file
from segmill.pipeline.common.decode import DecodeError
from segmill.pipeline.common.model_source import resolve_model
from segmill.pipeline.common.progress import Counter, ProgressCallback
from segmill.pipeline.common.runtime import ensure_ray, refuse_local_paths
from segmill.pipeline.common.storage import arrow_filesystem, join_uri, open_fs, protocol_of, redact
from segmill.pipeline.tracking import check_reachable, client, experiment_id, latest_evaluation
from segmill.pipeline.train.bootstrap import hard_classes_from_iou, hard_classes_from_results
from segmill.pipeline.train.config import AUTO, TrainConfig
from segmill.pipeline.train.data import LabelledSet, load_sets, read_pair
from segmill.pipeline.train.finish import TrainOutcome, finish_run, log_run_start
from segmill.pipeline.train.loop import LoopConfig, steps_per_epoch, train_loop_per_worker
from segmill.pipeline.train.sampling import choose_sampling, class_stats, class_weights, plan_summary

log = logging.getLogger(__name__)
RUN_RECORD = "segmill-run.json"
PROBED_PAIRS = 8


def train(config: TrainConfig, progress: ProgressCallback | None = None) -> TrainOutcome:
    """Train, track and (with `register`) register; `progress` is called twice a second with the steps done, the
    loss, lr, samples/s and the last val mIoU (common/progress.py), from a driver thread."""
    tracking_uri = config.resolved_tracking_uri()
    check_reachable(tracking_uri)
    classes = load_class_file(config.classes, endpoint_url=config.endpoint_url)
    if config.model not in list_models():
        raise ValueError(f"Model {config.model!r} is not a segmill architecture; choose one of {list_models()}.")
    spec = ModelSpec(arch=config.model, classes=classes.names, arch_kwargs=config.model_arguments(),
                     palette=classes.palette, ignore_index=classes.ignore_index)
    spec.build()  # bad arch_kwargs fail here, in one sentence from the builder, not on every worker
    init = resolve_model(config.init_from, endpoint_url=config.endpoint_url, tracking_uri=tracking_uri).checkpoint \
        if config.init_from else None
    train_set, val_set = load_sets(config.images, config.labels, config.val_images, config.val_labels,
                                   config.val_fraction, len(classes.names), endpoint_url=config.endpoint_url,
                                   ignore_index=classes.ignore_index)
    skipped = _report_skipped(train_set, val_set)
    for name, subset in (("training", train_set), ("validation", val_set)):
        probe_pairs(subset, name, len(classes.names), classes.ignore_index, config.endpoint_url)
    stats = class_stats(train_set.index, len(classes.names))
    hard, hard_source = resolve_hard_classes(config, classes.names, tracking_uri,
                                             tie_break=dict(zip(classes.names, stats.frequency.tolist())))
    hard_ids = [classes.names.index(name) for name in hard]
    sampling, why = choose_sampling(config.sampling, stats, hard_ids)
    if sampling != config.sampling and hard:
        log.warning("sampling %s: %s", sampling, why)
    weights = class_weights(stats, config.class_weighting)
    summary = plan_summary(stats, hard_ids, classes.names, sampling=sampling, factor=config.bootstrap_factor,
                           hard_crop_share=config.hard_crop_share, temperature=config.sampling_temperature,
                           seed=config.seed, weights=weights)
    log.info("hard classes %s (%s); %s", hard, hard_source, summary)
    if hard and summary["hard_crops_planned"] < config.hard_crop_share - 0.01:
        log.warning("only %.2f of an epoch's images hold a hard class, so %.2f of its crops (not %.2f) are placed "
                    "on one", summary["hard_share_after"], summary["hard_crops_planned"], config.hard_crop_share)

    ensure_ray(config.ray_address)
    warm_pool.release()  # a bulk job's warm model actors would hold the CPUs or GPUs the workers need
    refuse_local_paths({"images": config.images, "labels": config.labels, "val_images": config.val_images,
                        "val_labels": config.val_labels, "storage": config.storage_path})
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    run_name, run_id = _open_run(config, tracking_uri)
    if not config.resume:
        log_run_start(tracking_uri, run_id, config, hard, hard_source, summary, skipped, train_set, val_set)
    cluster = ray.cluster_resources()
    use_gpu = bool(cluster.get("GPU")) if config.use_gpu is None else config.use_gpu
    threads, cpus_per_worker = _worker_cpus(config, cluster.get("CPU", 1), use_gpu)
    _check_cpus_left_for_decoding(config, cpus_per_worker, cluster.get("CPU", 0))
    val_usable = val_set.usable
    counter = Counter.start(progress, total=config.epochs * steps_per_epoch(summary["epoch_images"],
                                                                            config.batch_size, config.workers))
    loop = LoopConfig(
        spec=spec.to_dict(), index=ray.put(train_set.index), hard_ids=hard_ids, sampling=sampling,
        bootstrap_factor=config.bootstrap_factor, hard_crop_share=config.hard_crop_share if hard else 0.0,
        sampling_temperature=config.sampling_temperature, class_weights=None if weights is None else weights.tolist(),
        seed=config.seed, epochs=config.epochs, batch_size=config.batch_size, crop_size=config.crop_size,
        scale_range=(config.scale_min, config.scale_max), optimizer=config.optimizer, lr=config.lr,
        momentum=config.momentum, weight_decay=config.weight_decay, backbone_lr_mult=config.backbone_lr_mult,
        ohem_fraction=config.ohem_fraction, precision=config.precision, channels_last=config.channels_last,
        torch_threads=threads,
        decode_cpus=config.decode_cpus,
        val_pairs=list(zip(val_usable["image_uri"].to_pylist(), val_usable["label_uri"].to_pylist())),
        val_every=config.val_every, tracking_uri=tracking_uri, run_id=run_id, endpoint_url=config.endpoint_url,
        backbone_weights=config.backbone_weights, init_checkpoint=init, freeze_backbone=config.freeze_backbone,
        ema_decay=config.ema_decay,
        progress=counter.handle if counter else None)
    storage_filesystem, storage_path = _storage(config)
    trainer = TorchTrainer(
        train_loop_per_worker, train_loop_config={"loop": loop},
        scaling_config=ScalingConfig(num_workers=config.workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": cpus_per_worker},
                                     placement_strategy=config.placement_strategy),
        run_config=RunConfig(name=run_name, storage_path=storage_path, storage_filesystem=storage_filesystem,
                             failure_config=FailureConfig(max_failures=config.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2),
                             # The training thread then reuses the memory its worker keeps (models/allocator.py).
                             worker_runtime_env={"env_vars": dict(ONE_ARENA_ENV)}),
    )
    started = time.time()
    try:
        result = trainer.fit()
    except Exception:
        client(tracking_uri).set_terminated(run_id, status="FAILED")
        raise
    finally:
        if counter is not None:
            counter.stop()
    log.info("training finished in %.0f s", time.time() - started)
    outcome = TrainOutcome(run_id, run_name, float("nan"), {}, result.checkpoint.path, hard, summary, skipped=skipped)
    return finish_run(config, tracking_uri, outcome, spec, result, val_set)


def _worker_cpus(config: TrainConfig, cluster_cpus: float, use_gpu: bool) -> tuple[int, float]:
    """(torch threads, CPUs reserved) per worker: as given, else the cluster's CPUs per worker (at most 4 threads,
    and no more than this machine's cores when Ray runs here) reserving half of them, as the bulk job's actors do,
    so that the decode tasks have the rest."""
    available = cluster_cpus / config.workers
    if settings.ray_address(config.ray_address) is None:
        available = min(available, os.cpu_count() or 1)
    threads = config.torch_threads or max(1, min(4, int(available)))
    reserved = config.cpus_per_worker or (1.0 if use_gpu else max(0.5, threads / 2))
    return threads, reserved


def resolve_hard_classes(config: TrainConfig, class_names: tuple[str, ...], tracking_uri: str,
                         tie_break: dict[str, float] | None = None) -> tuple[list[str], str]:
    """The hard classes and where they came from: named, a results table, the champion's evaluation, or none.
    Classes tied at the cut are taken by `tie_break` (lowest first: the training set's pixel shares), and said."""
    if config.hard_classes is None:
        return [], "no hard classes"
    named = config.named_hard_classes()
    if named is not None:
        unknown = [name for name in named if name not in class_names]
        if unknown:
            raise ValueError(f"Hard classes {unknown} are not in the class file; its classes are {list(class_names)}.")
        return named, "named"
    if config.hard_classes_from:
        hard = hard_classes_from_results(config.hard_classes_from, class_names, config.hard_class_count,
                                         endpoint_url=config.endpoint_url, tie_break=tie_break)
        return hard, f"results {redact(config.hard_classes_from)}"
    evaluation = latest_evaluation(tracking_uri, config.register) if config.register else None
    if evaluation is None:
        log.warning("hard_classes=%s but there is no champion evaluation yet (register=%s): no hard classes this run",
                    AUTO, config.register)
        return [], "auto: no champion evaluation yet"
    iou = {name: evaluation.iou.get(name) for name in class_names}
    hard = hard_classes_from_iou(iou, config.hard_class_count, tie_break=tie_break)
    return hard, f"champion {evaluation.kind} run {evaluation.run_id}"


def probe_pairs(subset: LabelledSet, name: str, num_classes: int, ignore_index: int, endpoint_url: str | None,
                count: int = PROBED_PAIRS) -> None:
    """Decode the first `count` pairs of a set: when none decodes (e.g. every label of the wrong size, which the
    class index cannot see), fail now in one sentence rather than train on nothing."""
    usable = subset.usable
    reasons = []
    for image_uri, label_uri in zip(usable["image_uri"].to_pylist()[:count], usable["label_uri"].to_pylist()[:count]):
        try:
            read_pair(image_uri, label_uri, num_classes, ignore_index, endpoint_url)
            return
        except DecodeError as exc:
            reasons.append(str(exc))
    if reasons:
        raise ValueError(f"None of the first {len(reasons)} {name} pairs can be used ({reasons[0]}); fix the "
                         "labels or the pairing before training.")


def _report_skipped(train_set: LabelledSet, val_set: LabelledSet) -> dict[str, int]:
    for uri, error in (train_set.errors + val_set.errors)[:10]:
        log.warning("skipping %s: %s", redact(uri), error)
    skipped = {"unlabelled_images": len(train_set.unlabelled) + len(val_set.unlabelled),
               "bad_labels": len(train_set.errors) + len(val_set.errors)}
    if any(skipped.values()):
        log.warning("skipped %d images without a label and %d bad labels", *skipped.values())
    return skipped


def _check_cpus_left_for_decoding(config: TrainConfig, cpus_per_worker: float, cluster_cpus: float) -> None:
    """Workers that take every CPU starve the decode stage and the job hangs; say so instead (local Ray only:
    a real cluster may autoscale)."""
    left = cluster_cpus - config.workers * cpus_per_worker
    if left < config.decode_cpus:
        message = (f"{config.workers} workers x {cpus_per_worker:g} CPUs leave {left:g} of the cluster's "
                   f"{cluster_cpus:g} CPUs for decoding; lower workers or cpus_per_worker.")
        if settings.ray_address(config.ray_address) is None:
            raise ValueError(message)
        log.warning(message)


def _storage(config: TrainConfig):
    if protocol_of(config.storage_path) == "file":
        return None, os.path.abspath(config.storage_path.removeprefix("file://"))
    return arrow_filesystem(config.storage_path, config.endpoint_url)


def _open_run(config: TrainConfig, tracking_uri: str) -> tuple[str, str]:
    """(Ray Train run name, MLflow run id): a new pair, or with `resume` the latest (or named) stopped run's."""
    fs, root = open_fs(config.storage_path, endpoint_url=config.endpoint_url)
    if config.resume:
        records = sorted((fs.info(p).get("mtime", 0) if protocol_of(config.storage_path) == "file" else 0, p)
                         for p in fs.glob(join_uri(root, config.run_name or "*", RUN_RECORD)))
        if not records:
            raise ValueError(f"There is no run {config.run_name or ''} to resume under {redact(config.storage_path)}.")
        with fs.open(records[-1][1], "r") as f:
            record = json.load(f)
        if client(tracking_uri).get_run(record["run_id"]).info.status == "FINISHED":
            raise ValueError(f"Run {record['run_name']} finished already (MLflow run {record['run_id']}): there is "
                             "nothing to resume, and nothing is registered again; start a new run without resume.")
        client(tracking_uri).update_run(record["run_id"], status="RUNNING")
        return record["run_name"], record["run_id"]
    run_name = config.run_name or f"{config.register or config.model}-{time.strftime('%Y%m%d-%H%M%S')}"
    if fs.exists(join_uri(root, run_name)):
        raise ValueError(f"Run {run_name} already exists under {redact(config.storage_path)}; "
                         "pass resume to continue it, or another run name.")
    run_id = client(tracking_uri).create_run(experiment_id(tracking_uri, config.experiment), run_name=run_name).info.run_id
    fs.makedirs(join_uri(root, run_name), exist_ok=True)
    with fs.open(join_uri(root, run_name, RUN_RECORD), "w") as f:
        json.dump({"run_name": run_name, "run_id": run_id, "tracking_uri": redact(tracking_uri)}, f)
    return run_name, run_id
