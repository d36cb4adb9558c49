"""MLflow in one place: reachability, runs and evaluations, registered versions and the champion gate.

Metric names: a training run logs `val_miou` and `val_iou.<class>` per epoch; an evaluation run (experiment
`segmill-evaluations`, tagged with the model name and version) logs `miou` and `iou.<class>`.

The gate: a new version always gets alias `challenger`. It takes `champion` only if there is no champion, or if
its gain over the champion is not noise: both scored on the same validation images (the champion is re-evaluated
on them, never compared by a number from another set), the lower end of the gain's 95% interval (a paired
bootstrap over the images) above the margin, and no class losing more than a set IoU. The decision, the interval
and the per-class changes are tags on the version.
"""
from __future__ import annotations

import json
import logging
import math
import os
import warnings
from dataclasses import dataclass
from typing import Any
from unittest import mock

from segmill.models.comparison import Comparison
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
    comparison: Comparison | None = None


def decide(comparison: Comparison | None, champion_version: str | None, *, margin: float, max_class_drop: float,
           comparable: bool = True) -> Decision:
    """Promote only a gain that is not noise: the lower end of its 95% interval (a paired bootstrap over the
    validation images, models/comparison.py) above `margin`, and no class losing more than `max_class_drop` IoU."""
    if champion_version is None:
        return Decision(True, "no champion yet", None, None, comparison)
    if not comparable or comparison is None:
        return Decision(False, "the champion predicts other classes, so the two cannot be compared",
                        champion_version, None)
    c = comparison
    interval = (f"{c.gain:+.4f} mIoU (95% interval {c.low:+.4f} to {c.high:+.4f}, {c.images} images drawn in runs "
                f"of {c.block})")
    worst, change = c.worst_class()
    if c.low <= margin:
        return Decision(False, f"{interval} does not clear the margin {margin:g}", champion_version, c.miou_a, c)
    if change < -max_class_drop:
        return Decision(False, f"{interval} clears the margin {margin:g}, but {worst} loses {-change:.4f} IoU "
                               f"(more than {max_class_drop:g})", champion_version, c.miou_a, c)
    return Decision(True, f"{interval} clears the margin {margin:g}; no class loses more than {max_class_drop:g} IoU",
                    champion_version, c.miou_a, c)


def log_mlflow_model(tracking_uri: str, run_id: str, checkpoint: bytes, spec) -> str:
    """Log the checkpoint as an MLflow model of the run (pyfunc from code, pipeline/mlflow_model.py), with its
    signature: uint8 images N x H x W x 3 in, int32 class indices N x H x W out. Returns the model's URI."""
    import tempfile

    import mlflow
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    from segmill.pipeline import mlflow_model

    signature = ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1, 3))]),
                               outputs=Schema([TensorSpec(np.dtype(np.int32), (-1, -1, -1))]))
    with tempfile.TemporaryDirectory() as folder, _fluent(tracking_uri):
        os.makedirs(os.path.join(folder, mlflow_model.CHECKPOINT_ARTIFACT))
        with open(os.path.join(folder, mlflow_model.CHECKPOINT_ARTIFACT, "model.pt"), "wb") as f:
            f.write(checkpoint)
        with _in_run(mlflow, run_id), warnings.catch_warnings():
            # The signature is given, and an input example left out on purpose (it would be an image per version).
            warnings.filterwarnings("ignore", message=".*input example", category=UserWarning)
            info = mlflow.pyfunc.log_model(
                name="model", python_model=mlflow_model.__file__, signature=signature,
                artifacts={mlflow_model.CHECKPOINT_ARTIFACT: os.path.join(folder, mlflow_model.CHECKPOINT_ARTIFACT)},
                pip_requirements=_requirements(), metadata={"segmill.arch": spec.arch, "segmill.classes": list(spec.classes)})
    return info.model_uri


def _in_run(mlflow, run_id: str):
    """The fluent API inside run `run_id`, whatever run the caller has open: theirs stays open and active after
    (a run of another id is resumed nested, so that ending it pops only it; their own run is used as it is)."""
    import contextlib

    active = mlflow.active_run()
    if active is not None and active.info.run_id == run_id:
        return contextlib.nullcontext(active)
    return mlflow.start_run(run_id=run_id, nested=active is not None)


def _requirements() -> list[str]:
    from importlib.metadata import PackageNotFoundError, version

    wanted = []
    for package in ("segmill", "torch", "torchvision", "mlflow", "numpy", "pillow"):
        try:
            wanted.append(f"{package}=={version(package)}")
        except PackageNotFoundError:
            wanted.append(package)
    return wanted


class _fluent:
    """MLflow's fluent API (log_model wants it; so does the registry's lookup of a logged model) pointed at
    `tracking_uri` for a moment, then put back exactly: `set_tracking_uri` also writes $MLFLOW_TRACKING_URI, and
    restoring it through `get_tracking_uri()` would pin whatever the environment said at the time. A caller's
    `mlflow.set_experiment` is set aside too: resuming our run inside another experiment is refused."""

    _ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")

    def __init__(self, tracking_uri: str) -> None:
        self.tracking_uri = tracking_uri

    def __enter__(self) -> None:
        import mlflow
        from mlflow.tracking import fluent
        from mlflow.tracking._model_registry import utils as registry
        from mlflow.tracking._tracking_service import utils as tracking

        self.saved = (tracking._tracking_uri, registry._registry_uri, {k: os.environ.get(k) for k in self._ENV},
                      fluent._active_experiment_id)
        fluent._active_experiment_id = None
        mlflow.set_tracking_uri(self.tracking_uri)
        mlflow.set_registry_uri(self.tracking_uri)

    def __exit__(self, *_) -> None:
        import mlflow
        from mlflow.tracking import fluent
        from mlflow.tracking._model_registry import utils as registry

        mlflow.set_tracking_uri(self.saved[0])  # also resets the tracer provider that caches the URI
        registry._registry_uri = self.saved[1]
        fluent._active_experiment_id = self.saved[3]
        for key, value in self.saved[2].items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def register_version(tracking_uri: str, name: str, run_id: str, model_uri: str, *, challenger_miou: float,
                     decision: Decision, val_fingerprint: str) -> str:
    """Create the version of the logged MLflow model (`log_mlflow_model`), tag it, set its aliases."""
    from mlflow.exceptions import MlflowException

    c = client(tracking_uri)
    try:
        c.create_registered_model(name)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    model_id = model_uri.removeprefix("models:/") if model_uri.startswith("models:/m-") else None
    with _fluent(tracking_uri):  # the SQL registry looks the logged model up through the fluent client
        version = c.create_model_version(name, source=model_uri, run_id=run_id, model_id=model_id).version
    tags = {"segmill.decision": "champion" if decision.promoted else "challenger",
            "segmill.decision_reason": decision.reason, "segmill.challenger_miou": f"{challenger_miou:.6f}",
            "segmill.champion_version": decision.champion_version or "",
            "segmill.champion_miou": "" if decision.champion_miou is None else f"{decision.champion_miou:.6f}",
            "segmill.val_fingerprint": val_fingerprint}
    gate = decision.comparison
    if gate is not None:
        tags.update({"segmill.gain": f"{gate.gain:.6f}", "segmill.gain_low": f"{gate.low:.6f}",
                     "segmill.gain_high": f"{gate.high:.6f}", "segmill.gate_images": str(gate.images),
                     "segmill.gate_block": str(gate.block),
                     "segmill.class_change": json.dumps({k: round(v, 6) for k, v in gate.class_change.items()})})
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
