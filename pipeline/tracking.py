"""MLflow in one place: reachability, runs and evaluations, registered versions and the champion gate.

Metric names: a training run logs `val_miou` and `val_iou.<class>` per epoch; an evaluation run (experiment
`segmill-evaluations`, tagged with the model name and version) logs `miou` and `iou.<class>`.

The gate: a new version always gets alias `challenger`. It takes `champion` only if there is no champion, or if
its validation mIoU beats the champion's by more than the margin, with both scored on the same validation set
(the champion is re-evaluated on it, never compared by a number from another set). The decision and both scores
are tags on the version.
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from typing import Any
from unittest import mock

from segmill.pipeline.common import settings
from segmill.pipeline.common.storage import first_line, redact

log = logging.getLogger(__name__)
EVALUATION_EXPERIMENT = "segmill-evaluations"
MODEL_NAME_TAG, MODEL_VERSION_TAG = "segmill.model_name", "segmill.model_version"
CHAMPION, CHALLENGER = "champion", "challenger"
RETRIES_ENV = "MLFLOW_HTTP_REQUEST_MAX_RETRIES"


@dataclass(frozen=True)
class Evaluation:
    """Scores of one model version on one labelled set."""

    miou: float
    iou: dict[str, float]
    run_id: str
    dataset: str | None  # fingerprint or URI of the evaluated set
    timestamp_ms: int
    kind: str = "evaluation"  # or "training validation": the version's own run, when it has no evaluation yet


def client(tracking_uri: str):
    import mlflow

    return mlflow.MlflowClient(tracking_uri=tracking_uri)


def check_reachable(tracking_uri: str) -> None:
    """Fail in one sentence now, not after hours of training, if the tracking server cannot be used."""
    # MLflow's default retries back off for a minute or more before a dead server is reported; patch.dict is the
    # standard library's set-and-restore of a mapping.
    retries = {RETRIES_ENV: os.environ.get(RETRIES_ENV, "1")}
    try:
        with mock.patch.dict(os.environ, retries):
            client(tracking_uri).search_experiments(max_results=1)
    except Exception as exc:
        raise ValueError(f"MLflow tracking server {redact(tracking_uri)} is unreachable "
                         f"({type(exc).__name__}: {first_line(exc)}).") from None


def resolved_tracking_uri(tracking_uri: str | None = None) -> str:
    """The given URI, else $MLFLOW_TRACKING_URI, else MLflow's own default."""
    found = settings.tracking_uri(tracking_uri)
    if found:
        return found
    import mlflow

    return mlflow.get_tracking_uri()


def experiment_id(tracking_uri: str, name: str) -> str:
    """The experiment's id, creating it if needed; with SQLite its artifacts go beside the database file,
    not into ./mlruns of whatever folder the job happened to start in."""
    c = client(tracking_uri)
    experiment = c.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    location = None
    if tracking_uri.startswith("sqlite:///"):
        location = os.path.join(os.path.dirname(os.path.abspath(tracking_uri.removeprefix("sqlite:///"))), "mlartifacts")
    return c.create_experiment(name, artifact_location=location)


def log_evaluation(tracking_uri: str, name: str, version: str, iou: dict[str, float], *, miou: float,
                   dataset: str | None = None, extra: dict[str, float] | None = None) -> str:
    """Record an evaluation of registered version `name`/`version` as its own run; returns the run id."""
    c = client(tracking_uri)
    run = c.create_run(experiment_id(tracking_uri, EVALUATION_EXPERIMENT), tags={MODEL_NAME_TAG: name, MODEL_VERSION_TAG: str(version),
                                            "segmill.dataset": dataset or ""})
    metrics = {"miou": miou, **{f"iou.{k}": v for k, v in iou.items()}, **(extra or {})}
    for key, value in metrics.items():
        if value is not None and not math.isnan(value):
            c.log_metric(run.info.run_id, key, float(value))
    c.set_terminated(run.info.run_id)
    return run.info.run_id


def latest_evaluation(tracking_uri: str, name: str, alias: str = CHAMPION) -> Evaluation | None:
    """The newest evaluation of the version behind `name@alias`: an evaluation run, else its training run's last
    validation. None when the alias is not set."""
    c = client(tracking_uri)
    version = alias_version(tracking_uri, name, alias)
    if version is None:
        return None
    experiment = c.get_experiment_by_name(EVALUATION_EXPERIMENT)
    if experiment is not None:
        runs = c.search_runs([experiment.experiment_id], max_results=1, order_by=["attributes.start_time DESC"],
                             filter_string=f"tags.`{MODEL_NAME_TAG}` = '{name}' and "
                                           f"tags.`{MODEL_VERSION_TAG}` = '{version.version}'")
        if runs:
            return _evaluation(runs[0], "miou", "iou.", "evaluation")
    if version.run_id:
        return _evaluation(c.get_run(version.run_id), "val_miou", "val_iou.", "training validation")
    return None


def _evaluation(run: Any, miou_key: str, iou_prefix: str, kind: str) -> Evaluation | None:
    metrics = run.data.metrics
    if miou_key not in metrics:
        return None
    iou = {k[len(iou_prefix):]: v for k, v in metrics.items() if k.startswith(iou_prefix)}
    dataset = run.data.tags.get("segmill.dataset") or run.data.tags.get("segmill.val_fingerprint")
    return Evaluation(metrics[miou_key], iou, run.info.run_id, dataset, run.info.end_time or run.info.start_time, kind)


def alias_version(tracking_uri: str, name: str, alias: str):
    """The model version behind `name@alias`, or None when the model or the alias does not exist."""
    from mlflow.exceptions import MlflowException

    try:
        return client(tracking_uri).get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            return None
        raise


@dataclass(frozen=True)
class Decision:
    promoted: bool
    reason: str
    champion_version: str | None
    champion_miou: float | None


def decide(challenger_miou: float, champion_miou: float | None, champion_version: str | None, margin: float,
           comparable: bool = True) -> Decision:
    if champion_version is None:
        return Decision(True, "no champion yet", None, None)
    if not comparable or champion_miou is None:
        return Decision(False, "the champion predicts other classes, so the two cannot be compared",
                        champion_version, champion_miou)
    if challenger_miou > champion_miou + margin:
        return Decision(True, f"mIoU {challenger_miou:.4f} beats the champion's {champion_miou:.4f} by more than {margin}",
                        champion_version, champion_miou)
    return Decision(False, f"mIoU {challenger_miou:.4f} does not beat the champion's {champion_miou:.4f} by more "
                           f"than {margin}", champion_version, champion_miou)


def register_version(tracking_uri: str, name: str, run_id: str, artifact_uri: str, *, challenger_miou: float,
                     decision: Decision, val_fingerprint: str) -> str:
    """Create the version (source: the run's artifacts, holding checkpoint/model.pt), tag it, set its aliases."""
    from mlflow.exceptions import MlflowException

    c = client(tracking_uri)
    try:
        c.create_registered_model(name)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    version = c.create_model_version(name, source=artifact_uri, run_id=run_id).version
    tags = {"segmill.decision": "champion" if decision.promoted else "challenger",
            "segmill.decision_reason": decision.reason, "segmill.challenger_miou": f"{challenger_miou:.6f}",
            "segmill.champion_version": decision.champion_version or "",
            "segmill.champion_miou": "" if decision.champion_miou is None else f"{decision.champion_miou:.6f}",
            "segmill.val_fingerprint": val_fingerprint}
    for key, value in tags.items():
        c.set_model_version_tag(name, version, key, value)
    c.set_registered_model_alias(name, CHALLENGER, version)
    if decision.promoted:
        c.set_registered_model_alias(name, CHAMPION, version)
    log.info("registered %s version %s: %s", name, version, decision.reason)
    return str(version)


def current_champion(tracking_uri: str, name: str):
    """The champion's model version, or None."""
    return alias_version(tracking_uri, name, CHAMPION)
