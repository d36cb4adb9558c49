"""MLflow tracking and registry: reachability, evaluations of registered versions, champion/challenger.

Metric names: a training run logs `val_miou` and `val_iou.<class>` per epoch; an evaluation run (experiment
`segmill-evaluations`, tagged with the model name and version) logs `miou` and `iou.<class>`.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

from segmill.pipeline.storage import redact

log = logging.getLogger(__name__)
EVALUATION_EXPERIMENT = "segmill-evaluations"
MODEL_NAME_TAG, MODEL_VERSION_TAG = "segmill.model_name", "segmill.model_version"
CHAMPION, CHALLENGER = "champion", "challenger"


@dataclass(frozen=True)
class Evaluation:
    """Scores of one model version on one labelled set."""

    miou: float
    iou: dict[str, float]
    run_id: str
    dataset: str | None  # fingerprint or URI of the evaluated set
    timestamp_ms: int


def client(tracking_uri: str):
    import mlflow

    return mlflow.MlflowClient(tracking_uri=tracking_uri)


def check_reachable(tracking_uri: str) -> None:
    """Fail in one sentence now, not after hours of training, if the tracking server cannot be used."""
    import os

    retries = os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")  # the default backs off for a minute or more
    try:
        client(tracking_uri).search_experiments(max_results=1)
    except Exception as exc:
        raise ValueError(f"MLflow tracking server {redact(tracking_uri)} is unreachable "
                         f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]}).") from None
    finally:
        if retries is None:
            os.environ.pop("MLFLOW_HTTP_REQUEST_MAX_RETRIES", None)


def experiment_id(tracking_uri: str, name: str) -> str:
    """The experiment's id, creating it if needed; with SQLite its artifacts go beside the database file,
    not into ./mlruns of whatever folder the job happened to start in."""
    c = client(tracking_uri)
    experiment = c.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    location = None
    if tracking_uri.startswith("sqlite:///"):
        import os

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
            return _evaluation(runs[0], "miou", "iou.")
    if version.run_id:
        return _evaluation(c.get_run(version.run_id), "val_miou", "val_iou.")
    return None


def _evaluation(run: Any, miou_key: str, iou_prefix: str) -> Evaluation | None:
    metrics = run.data.metrics
    if miou_key not in metrics:
        return None
    iou = {k[len(iou_prefix):]: v for k, v in metrics.items() if k.startswith(iou_prefix)}
    dataset = run.data.tags.get("segmill.dataset") or run.data.tags.get("segmill.val_fingerprint")
    return Evaluation(metrics[miou_key], iou, run.info.run_id, dataset, run.info.end_time or run.info.start_time)


def alias_version(tracking_uri: str, name: str, alias: str):
    """The model version behind `name@alias`, or None when the model or the alias does not exist."""
    from mlflow.exceptions import MlflowException

    try:
        return client(tracking_uri).get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            return None
        raise
