"""A training run's MLflow record: what it was asked and what it planned (at the start), then its artifacts, the
best validated epoch's weights as the run's model, and with `register` a version gated against the champion."""
from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from dataclasses import dataclass, field
from typing import Any

import torch

from segmill.models.checkpoint import ModelSpec, load_checkpoint
from segmill.models.metrics import SegmentationMetrics
from segmill.pipeline.common.model_source import resolve_model
from segmill.pipeline.common.storage import redact
from segmill.pipeline.tracking import client, current_champion, decide, log_evaluation, register_version
from segmill.pipeline.train.loop import saved_models
from segmill.pipeline.train.report import confusion_png, overlay_pngs
from segmill.pipeline.train.validate import confusion_on_pairs, epoch_metrics

log = logging.getLogger(__name__)


@dataclass
class TrainOutcome:
    run_id: str
    run_name: str
    val_miou: float  # of the best validated epoch, whose weights are the run's model
    val_iou: dict[str, float]
    checkpoint_uri: str
    hard_classes: list[str]
    bootstrap: dict[str, Any]  # what the hard classes did to the epoch (sampling.plan_summary)
    best_epoch: int = -1
    model_name: str | None = None
    model_version: str | None = None
    champion: bool = False
    decision: str = ""
    champion_miou: float | None = None
    skipped: dict[str, int] = field(default_factory=dict)


def log_run_start(tracking_uri, run_id, config, hard, hard_source, summary, skipped, train_set, val_set) -> None:
    """Every parameter, the hard classes and where they came from, the plan's figures, the sets' fingerprints."""
    from mlflow.entities import Param, RunTag

    params = {k: json.dumps(v) if isinstance(v, dict) else v for k, v in config.to_dict().items()}
    params.update({"hard_classes_resolved": ",".join(hard) or "-", "hard_classes_source": hard_source,
                   "sampling_applied": summary["sampling"]})
    tags = {"segmill.train_fingerprint": train_set.fingerprint, "segmill.val_fingerprint": val_set.fingerprint}
    c = client(tracking_uri)
    c.log_batch(run_id, params=[Param(k, redact(str(v))[:6000]) for k, v in params.items()],
                tags=[RunTag(k, v) for k, v in tags.items()])
    figures = {f"bootstrap.{k}": v for k, v in summary.items() if isinstance(v, (int, float))}
    figures.update({f"dataset_share.{k}": v for k, v in summary["dataset_share"].items()})
    figures.update({f"class_weight.{k}": v for k, v in (summary["class_weights"] or {}).items()})
    figures.update({f"skipped.{k}": v for k, v in skipped.items()})
    figures["val_images"] = val_set.usable.num_rows
    for key, value in figures.items():
        c.log_metric(run_id, key, float(value))


def finish_run(config, tracking_uri: str, outcome: TrainOutcome, spec: ModelSpec, result, val_set) -> TrainOutcome:
    """Log the artifacts of the best validated epoch, and register it when asked; a run whose every epoch scored NaN
    (no usable validation pixel) is marked failed and never registered."""
    c = client(tracking_uri)
    best = result.metrics["best"]
    if best["epoch"] < 0 or not math.isfinite(best["val_miou"]):
        c.set_terminated(outcome.run_id, status="FAILED")
        raise ValueError(f"Run {outcome.run_name} validated no epoch to a finite mIoU (no usable validation pixel); "
                         "nothing is saved as its model.")
    with result.checkpoint.as_directory() as folder:
        _, checkpoint_bytes = saved_models(folder)
    model, _ = load_checkpoint(checkpoint_bytes)
    val_pairs = list(zip(val_set.usable["image_uri"].to_pylist(), val_set.usable["label_uri"].to_pylist()))
    with tempfile.TemporaryDirectory() as folder:
        os.makedirs(os.path.join(folder, "checkpoint"))
        with open(os.path.join(folder, "checkpoint", "model.pt"), "wb") as f:
            f.write(checkpoint_bytes)
        with open(os.path.join(folder, "confusion_matrix.png"), "wb") as f:
            f.write(confusion_png(best["confusion"], spec.classes))
        os.makedirs(os.path.join(folder, "overlays"))
        for name, data in overlay_pngs(model, spec, val_pairs, config.overlays, endpoint_url=config.endpoint_url).items():
            with open(os.path.join(folder, "overlays", name), "wb") as f:
                f.write(data)
        with open(os.path.join(folder, "bootstrap.json"), "w") as f:
            json.dump({"hard_classes": outcome.hard_classes, **outcome.bootstrap, "skipped": outcome.skipped,
                       "best_epoch": best["epoch"]}, f, indent=2)
        c.log_artifacts(outcome.run_id, folder)
    c.log_metric(outcome.run_id, "best_epoch", float(best["epoch"]))
    outcome.val_miou, outcome.val_iou, outcome.best_epoch = best["val_miou"], best["val_iou"], best["epoch"]
    if config.register:
        _register(config, tracking_uri, outcome, spec, val_pairs, val_set.fingerprint)
    c.set_terminated(outcome.run_id)
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
