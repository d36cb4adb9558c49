"""A training run's MLflow record: what it was asked and what it planned (at the start), then its artifacts, the
best validated epoch's weights as the run's model, and with `register` a version gated against the champion."""
from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch

from segmill.models.checkpoint import ModelSpec, load_checkpoint
from segmill.models.comparison import Comparison, paired_bootstrap
from segmill.models.iou import iou_from_counts
from segmill.pipeline.common.model_source import resolve_model
from segmill.pipeline.common.storage import redact, redact_values
from segmill.pipeline.tracking import (
    client,
    current_champion,
    decide,
    log_evaluation,
    log_mlflow_model,
    register_version,
)
from segmill.pipeline.train.loop import saved_models
from segmill.pipeline.train.report import confusion_png, overlay_pngs, training_report
from segmill.pipeline.train.validate import counts_per_image

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
    champion_version: str | None = None
    champion_iou: dict[str, float] | None = None  # the champion re-scored on this run's validation set
    comparison: Comparison | None = None  # the paired comparison the gate decided on
    checkpoint_bytes: bytes = field(default=b"", repr=False)


def log_run_start(tracking_uri, run_id, config, hard, hard_source, summary, skipped, train_set, val_set) -> None:
    """Every parameter, the hard classes and where they came from, the plan's figures, the sets' fingerprints."""
    from mlflow.entities import Param, RunTag

    # MLflow keeps params as text: unset values are left out (never "None"), booleans read true/false and
    # structures JSON; config.json beside them keeps every value with its type.
    values = redact_values(config.to_dict())
    params = {k: _param(v) for k, v in values.items() if v is not None}
    params.update({"hard_classes_resolved": ",".join(hard) or "-", "hard_classes_source": hard_source,
                   "sampling_applied": summary["sampling"]})
    tags = {"segmill.train_fingerprint": train_set.fingerprint, "segmill.val_fingerprint": val_set.fingerprint}
    c = client(tracking_uri)
    c.log_batch(run_id, params=[Param(k, v[:6000]) for k, v in params.items()],
                tags=[RunTag(k, v) for k, v in tags.items()])
    c.log_dict(run_id, values, "config.json")
    _log_datasets(c, run_id, config, train_set, val_set)
    figures = {f"bootstrap.{k}": v for k, v in summary.items() if isinstance(v, (int, float))}
    figures.update({f"dataset_share.{k}": v for k, v in summary["dataset_share"].items()})
    figures.update({f"class_weight.{k}": v for k, v in (summary["class_weights"] or {}).items()})
    figures.update({f"skipped.{k}": v for k, v in skipped.items()})
    figures["val_images"] = val_set.usable.num_rows
    for key, value in figures.items():
        c.log_metric(run_id, key, float(value))


def _param(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value)
    return str(value)


def _log_datasets(c, run_id: str, config, train_set, val_set) -> None:
    """The training and validation sets as MLflow datasets (their image and label URIs, digest the fingerprint
    that changes with any pair or label file), in the run's inputs."""
    import mlflow.data
    import pandas as pd
    from mlflow.entities import DatasetInput, InputTag

    inputs = []
    for name, subset, source in (("training", train_set, config.images),
                                 ("validation", val_set, config.val_images or config.images)):
        usable = subset.usable
        frame = pd.DataFrame({"image_uri": [redact(u) for u in usable["image_uri"].to_pylist()],
                              "label_uri": [redact(u) for u in usable["label_uri"].to_pylist()]})
        with warnings.catch_warnings():  # MLflow registers two local sources that both claim a plain path
            warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted")
            dataset = mlflow.data.from_pandas(frame, source=redact(source), name=name,
                                              digest=subset.fingerprint[:36])
        inputs.append(DatasetInput(dataset._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", name)]))
    c.log_inputs(run_id, datasets=inputs)


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
        overlays = overlay_pngs(model, spec, val_pairs, config.overlays, endpoint_url=config.endpoint_url)
        for name, data in overlays.items():
            with open(os.path.join(folder, "overlays", name), "wb") as f:
                f.write(data)
        with open(os.path.join(folder, "bootstrap.json"), "w") as f:
            json.dump({"hard_classes": outcome.hard_classes, **outcome.bootstrap, "skipped": outcome.skipped,
                       "best_epoch": best["epoch"]}, f, indent=2)
        c.log_artifacts(outcome.run_id, folder)
    c.log_metric(outcome.run_id, "best_epoch", float(best["epoch"]))
    outcome.val_miou, outcome.val_iou, outcome.best_epoch = best["val_miou"], best["val_iou"], best["epoch"]
    outcome.checkpoint_bytes = checkpoint_bytes
    if config.register:
        _register(config, tracking_uri, outcome, spec, val_pairs, val_set.fingerprint, model)
    _log_report(c, config, outcome, spec, best, overlays)
    c.set_terminated(outcome.run_id)
    return outcome


def _log_report(c, config, outcome: TrainOutcome, spec: ModelSpec, best: dict[str, Any], overlays) -> None:
    """report.html into the run's artifacts: the run against the champion it was gated against."""
    curve = [(m.step, m.value) for m in c.get_metric_history(outcome.run_id, "val_miou")]
    champion = None if outcome.champion_iou is None else {
        "version": outcome.champion_version, "miou": outcome.champion_miou, "iou": outcome.champion_iou}
    plan = outcome.bootstrap
    facts = [("model", f"{spec.arch} {json.dumps(spec.arch_kwargs)}"), ("epochs", config.epochs),
             ("hard classes", ", ".join(outcome.hard_classes) or "-"), ("sampling", plan.get("sampling")),
             ("hard-class crops planned", f"{plan.get('hard_crops_planned', 0):.2f}"),
             ("class weighting", config.class_weighting), ("OHEM", config.ohem_fraction),
             ("registered", f"{outcome.model_name} version {outcome.model_version}" if outcome.model_version else None),
             ("decision", outcome.decision or None)]
    html = training_report(run_name=outcome.run_name, run_id=outcome.run_id, spec=spec, best=best, facts=facts,
                           champion=champion, curve=curve, overlays=overlays)
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "report.html")
        with open(path, "w") as f:
            f.write(html)
        c.log_artifact(outcome.run_id, path)


def _register(config, tracking_uri, outcome: TrainOutcome, spec: ModelSpec, val_pairs, val_fingerprint, model) -> None:
    """Register the run as a version; score it and the champion on the same validation images, image by image, and
    let the paired comparison decide on promotion."""
    champion = current_champion(tracking_uri, config.register)
    comparison, comparable = None, True
    if champion is not None:
        resolved = resolve_model(f"models:/{config.register}/{champion.version}", tracking_uri=tracking_uri)
        comparable = tuple(resolved.spec.classes) == tuple(spec.classes)
        if comparable:
            theirs, _ = load_checkpoint(resolved.checkpoint)
            cpu = torch.device("cpu")
            inter_a, union_a, kept = counts_per_image(theirs, resolved.spec, val_pairs, device=cpu,
                                                      endpoint_url=config.endpoint_url)
            inter_b, union_b, kept_b = counts_per_image(model, spec, [val_pairs[i] for i in kept], device=cpu,
                                                        endpoint_url=config.endpoint_url)
            inter_a, union_a = inter_a[kept_b], union_a[kept_b]  # an image the second pass could not read: out
            comparison = paired_bootstrap(inter_a, union_a, inter_b, union_b, spec.classes, seed=config.seed)
            iou = iou_from_counts(inter_a.sum(0), union_a.sum(0))
            outcome.champion_iou = {c: float(v) for c, v in zip(spec.classes, iou) if v == v}
            outcome.champion_version, outcome.comparison = champion.version, comparison
            log_evaluation(tracking_uri, config.register, champion.version, outcome.champion_iou,
                           miou=comparison.miou_a, dataset=val_fingerprint)
    decision = decide(comparison, champion.version if champion else None, margin=config.champion_margin,
                      max_class_drop=config.max_class_drop, comparable=comparable)
    model_uri = log_mlflow_model(tracking_uri, outcome.run_id, outcome.checkpoint_bytes, spec)
    outcome.model_name = config.register
    outcome.model_version = register_version(tracking_uri, config.register, outcome.run_id, model_uri,
                                             challenger_miou=outcome.val_miou, decision=decision,
                                             val_fingerprint=val_fingerprint)
    outcome.champion, outcome.decision, outcome.champion_miou = decision.promoted, decision.reason, decision.champion_miou
