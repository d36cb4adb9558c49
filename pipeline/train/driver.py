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
import tempfile
import time
from dataclasses import dataclass, field

import torch

from segmill.models.allocator import ONE_ARENA_ENV
from segmill.models.checkpoint import ModelSpec, load_checkpoint
from segmill.models.metrics import SegmentationMetrics
from segmill.models.registry import list_models
from segmill.pipeline.common import settings
from segmill.pipeline.common.classes import load_class_file
from segmill.pipeline.common.model_source import resolve_model
from segmill.pipeline.common.runtime import ensure_ray
from segmill.pipeline.common.storage import (
    arrow_filesystem,
    join_uri,
    open_fs,
    protocol_of,
    redact,
)
from segmill.pipeline.tracking import (
    check_reachable,
    client,
    current_champion,
    decide,
    experiment_id,
    latest_evaluation,
    log_evaluation,
    register_version,
)
from segmill.pipeline.train.bootstrap import (
    bootstrap_summary,
    bootstrapped_epoch,
    hard_classes_from_iou,
    hard_classes_from_results,
)
from segmill.pipeline.train.config import AUTO, TrainConfig
from segmill.pipeline.train.data import LabelledSet, load_sets, training_dataset
from segmill.pipeline.train.loop import load_saved_model, train_loop_per_worker
from segmill.pipeline.train.report import confusion_png, overlay_pngs
from segmill.pipeline.train.validate import confusion_on_pairs, epoch_metrics

log = logging.getLogger(__name__)
RUN_RECORD = "segmill-run.json"


@dataclass
class TrainOutcome:
    run_id: str
    run_name: str
    val_miou: float
    val_iou: dict[str, float]
    checkpoint_uri: str
    hard_classes: list[str]
    bootstrap: dict[str, float | int]
    model_name: str | None = None
    model_version: str | None = None
    champion: bool = False
    decision: str = ""
    champion_miou: float | None = None
    skipped: dict[str, int] = field(default_factory=dict)


def train(config: TrainConfig) -> TrainOutcome:
    tracking_uri = config.resolved_tracking_uri()
    check_reachable(tracking_uri)
    classes = load_class_file(config.classes, endpoint_url=config.endpoint_url)
    if config.model not in list_models():
        raise ValueError(f"Model {config.model!r} is not a segmill architecture; choose one of {list_models()}.")
    spec = ModelSpec(arch=config.model, classes=classes.names, arch_kwargs=config.arch_kwargs,
                     palette=classes.palette, ignore_index=classes.ignore_index)
    spec.build()  # bad arch_kwargs fail here, in one sentence from the builder, not on every worker
    init = resolve_model(config.init_from, endpoint_url=config.endpoint_url, tracking_uri=tracking_uri).checkpoint \
        if config.init_from else None
    train_set, val_set = load_sets(config.images, config.labels, config.val_images, config.val_labels,
                                   config.val_fraction, len(classes.names), endpoint_url=config.endpoint_url,
                                   ignore_index=classes.ignore_index)
    skipped = _report_skipped(train_set, val_set)
    hard, hard_source = resolve_hard_classes(config, classes.names, tracking_uri)
    hard_ids = [classes.names.index(name) for name in hard]
    factor = config.bootstrap_factor if hard else 1
    epoch_rows = train_set.index.take(bootstrapped_epoch(train_set.index, hard_ids, factor))
    summary = bootstrap_summary(train_set.index, hard_ids, factor)
    log.info("hard classes %s (%s), factor %d: %s", hard, hard_source, factor, summary)

    ensure_ray(config.ray_address)
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    run_name, run_id = _open_run(config, tracking_uri)
    if not config.resume:
        _log_params(tracking_uri, run_id, config, hard, hard_source, factor, summary, skipped, train_set, val_set)
    use_gpu = bool(ray.cluster_resources().get("GPU")) if config.use_gpu is None else config.use_gpu
    _check_cpus_left_for_decoding(config, ray.cluster_resources().get("CPU", 0))
    val_usable = val_set.usable
    loop_config = {
        "spec": spec.to_dict(), "seed": config.seed, "backbone_weights": config.backbone_weights,
        "init_checkpoint": init, "freeze_backbone": config.freeze_backbone, "backbone_lr_mult": config.backbone_lr_mult,
        "lr": config.lr, "momentum": config.momentum, "weight_decay": config.weight_decay, "epochs": config.epochs,
        "batch_size": config.batch_size, "epoch_images": summary["epoch_images"], "ohem_fraction": config.ohem_fraction,
        "torch_threads": max(1, int(config.cpus_per_worker)), "endpoint_url": config.endpoint_url,
        "val_pairs": list(zip(val_usable["image_uri"].to_pylist(), val_usable["label_uri"].to_pylist())),
        "tracking_uri": tracking_uri, "run_id": run_id,
    }
    storage_filesystem, storage_path = _storage(config)
    dataset = training_dataset(epoch_rows, len(classes.names), classes.ignore_index, config.crop_size,
                               (config.scale_min, config.scale_max), config.endpoint_url,
                               blocks=max(config.workers * 2, min(64, epoch_rows.num_rows // 16)))
    trainer = TorchTrainer(
        train_loop_per_worker, train_loop_config=loop_config, datasets={"train": dataset},
        scaling_config=ScalingConfig(num_workers=config.workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": config.cpus_per_worker}),
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
    log.info("training finished in %.0f s", time.time() - started)
    return _finish(config, tracking_uri, run_name, run_id, spec, result, val_set, hard, summary, skipped)


def resolve_hard_classes(config: TrainConfig, class_names: tuple[str, ...], tracking_uri: str) -> tuple[list[str], str]:
    """The hard classes and where they came from: named, a results table, the champion's evaluation, or none."""
    if config.hard_classes is None:
        return [], "bootstrapping off"
    named = config.named_hard_classes()
    if named is not None:
        unknown = [name for name in named if name not in class_names]
        if unknown:
            raise ValueError(f"Hard classes {unknown} are not in the class file; its classes are {list(class_names)}.")
        return named, "named"
    if config.hard_classes_from:
        return hard_classes_from_results(config.hard_classes_from, class_names, config.hard_class_count,
                                         endpoint_url=config.endpoint_url), f"results {redact(config.hard_classes_from)}"
    evaluation = latest_evaluation(tracking_uri, config.register) if config.register else None
    if evaluation is None:
        log.warning("hard_classes=%s but there is no champion evaluation yet (register=%s): no bootstrapping this run",
                    AUTO, config.register)
        return [], "auto: no champion evaluation yet"
    iou = {name: evaluation.iou.get(name) for name in class_names}
    return hard_classes_from_iou(iou, config.hard_class_count), f"champion evaluation run {evaluation.run_id}"


def _report_skipped(train_set: LabelledSet, val_set: LabelledSet) -> dict[str, int]:
    for uri, error in (train_set.errors + val_set.errors)[:10]:
        log.warning("skipping %s: %s", redact(uri), error)
    skipped = {"unlabelled_images": len(train_set.unlabelled) + len(val_set.unlabelled),
               "bad_labels": len(train_set.errors) + len(val_set.errors)}
    if any(skipped.values()):
        log.warning("skipped %d images without a label and %d bad labels", *skipped.values())
    return skipped


def _check_cpus_left_for_decoding(config: TrainConfig, cluster_cpus: float) -> None:
    """Workers that take every CPU starve the decode stage and the job hangs; say so instead (local Ray only:
    a real cluster may autoscale)."""
    left = cluster_cpus - config.workers * config.cpus_per_worker
    if left < 0.5:
        message = (f"{config.workers} workers x {config.cpus_per_worker} CPUs leave {left:g} of the cluster's "
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


def _log_params(tracking_uri, run_id, config, hard, hard_source, factor, summary, skipped, train_set, val_set) -> None:
    from mlflow.entities import Param, RunTag

    params = {k: json.dumps(v) if isinstance(v, dict) else v for k, v in config.to_dict().items()}
    params.update({"hard_classes_resolved": ",".join(hard) or "-", "hard_classes_source": hard_source,
                   "bootstrap_factor_applied": factor})
    tags = {"segmill.train_fingerprint": train_set.fingerprint, "segmill.val_fingerprint": val_set.fingerprint}
    c = client(tracking_uri)
    c.log_batch(run_id, params=[Param(k, redact(str(v))[:6000]) for k, v in params.items()],
                tags=[RunTag(k, v) for k, v in tags.items()])
    for key, value in {**{f"bootstrap.{k}": v for k, v in summary.items()}, **{f"skipped.{k}": v for k, v in skipped.items()},
                       "val_images": val_set.usable.num_rows}.items():
        c.log_metric(run_id, key, float(value))


def _finish(config, tracking_uri, run_name, run_id, spec, result, val_set, hard, summary, skipped) -> TrainOutcome:
    c = client(tracking_uri)
    metrics = result.metrics
    classes = spec.classes
    with result.checkpoint.as_directory() as folder:
        checkpoint_bytes = load_saved_model(folder)
    model, _ = load_checkpoint(checkpoint_bytes)
    val_pairs = list(zip(val_set.usable["image_uri"].to_pylist(), val_set.usable["label_uri"].to_pylist()))
    with tempfile.TemporaryDirectory() as folder:
        os.makedirs(os.path.join(folder, "checkpoint"))
        with open(os.path.join(folder, "checkpoint", "model.pt"), "wb") as f:
            f.write(checkpoint_bytes)
        with open(os.path.join(folder, "confusion_matrix.png"), "wb") as f:
            f.write(confusion_png(metrics["confusion"], classes))
        os.makedirs(os.path.join(folder, "overlays"))
        for name, data in overlay_pngs(model, spec, val_pairs, config.overlays, endpoint_url=config.endpoint_url).items():
            with open(os.path.join(folder, "overlays", name), "wb") as f:
                f.write(data)
        with open(os.path.join(folder, "bootstrap.json"), "w") as f:
            json.dump({"hard_classes": hard, **summary, "skipped": skipped}, f, indent=2)
        c.log_artifacts(run_id, folder)
    val_iou = {name: metrics[f"val_iou.{name}"] for name in classes if f"val_iou.{name}" in metrics}
    outcome = TrainOutcome(run_id, run_name, metrics["val_miou"], val_iou, result.checkpoint.path, hard, summary,
                           skipped=skipped)
    if config.register:
        _register(config, tracking_uri, outcome, spec, val_pairs, val_set.fingerprint)
    c.set_terminated(run_id)
    return outcome


def _register(config, tracking_uri, outcome: TrainOutcome, spec: ModelSpec, val_pairs, val_fingerprint) -> None:
    """Register the run as a version; re-score the champion on this validation set to decide on promotion."""
    champion = current_champion(tracking_uri, config.register)
    champion_miou, comparable = None, True
    if champion is not None:
        resolved = resolve_model(f"models:/{config.register}/{champion.version}", tracking_uri=tracking_uri)
        comparable = tuple(resolved.spec.classes) == tuple(spec.classes)
        if comparable:
            model, _ = load_checkpoint(resolved.checkpoint)
            confusion, _ = confusion_on_pairs(model, resolved.spec, val_pairs, device=torch.device("cpu"),
                                              endpoint_url=config.endpoint_url)
            scores = epoch_metrics(SegmentationMetrics.from_confusion(confusion), spec.classes)
            champion_miou = scores["val_miou"]
            log_evaluation(tracking_uri, config.register, champion.version,
                           {k.removeprefix("val_iou."): v for k, v in scores.items() if k.startswith("val_iou.")},
                           miou=champion_miou, dataset=val_fingerprint)
    decision = decide(outcome.val_miou, champion_miou, champion.version if champion else None,
                      config.champion_margin, comparable)
    artifact_uri = client(tracking_uri).get_run(outcome.run_id).info.artifact_uri
    outcome.model_name = config.register
    outcome.model_version = register_version(tracking_uri, config.register, outcome.run_id, artifact_uri,
                                             challenger_miou=outcome.val_miou, decision=decision,
                                             val_fingerprint=val_fingerprint)
    outcome.champion, outcome.decision, outcome.champion_miou = decision.promoted, decision.reason, champion_miou
