"""An evaluation job: the bulk job over labelled images, then the dataset IoU from the results table.

When the model is a registered version (`models:/NAME@ALIAS` or `models:/NAME/N`), the scores are recorded in
MLflow against that version (`tracking.log_evaluation`), so "the champion's latest evaluation" exists for
hard-class bootstrapping and for deciding whether a challenger wins.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any, Iterator

from segmill.pipeline.config import SegmentConfig, read_spec_file, typed_from_dict


@dataclass(frozen=True)
class EvaluateConfig:
    """Which model, which labelled images, where the results table goes, and where scores are recorded."""

    model: str
    images: str
    output: str
    labels: str | None = None  # None: `images` is a manifest with a label_uri column
    dataset: str | None = None  # the name recorded with the scores; default: the label (or manifest) URI
    tracking_uri: str | None = None  # default: $MLFLOW_TRACKING_URI
    job_id: str | None = None
    ray_address: str | None = None
    endpoint_url: str | None = None
    segment: dict = field(default_factory=dict)  # other bulk-job keys: scales, flip, resources, ...

    def __post_init__(self) -> None:
        for name in ("model", "images", "output"):
            if not getattr(self, name):
                raise ValueError(f"Evaluate job needs a non-empty {name!r}.")

    def segment_config(self) -> SegmentConfig:
        """The bulk job this evaluation runs (its keys checked like any segment spec)."""
        taken = sorted(set(self.segment) & {"input", "output", "model", "labels", "job_id", "ray_address", "endpoint_url"})
        if taken:
            raise ValueError(f"The evaluate job's 'segment' options may not set {taken}; set them at the top level.")
        values = dict(input=self.images, output=self.output, model=self.model, labels=self.labels,
                      job_id=self.job_id, ray_address=self.ray_address, endpoint_url=self.endpoint_url)
        return SegmentConfig.from_dict({**{k: v for k, v in values.items() if v is not None}, **self.segment},
                                       source="evaluate job's segment options")

    def registered(self) -> bool:
        return self.model.startswith("models:/")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "evaluate job spec") -> "EvaluateConfig":
        config = typed_from_dict(cls, data, source)
        config.segment_config()  # fail now on bad segment options, not after listing the images
        return config

    @classmethod
    def from_yaml(cls, path: str) -> "EvaluateConfig":
        return cls.from_dict(read_spec_file(path), source=f"evaluate job spec {path}")


@dataclass(frozen=True)
class EvaluationOutcome:
    job_id: str
    model_name: str
    model_version: str
    miou: float
    iou: dict[str, float]
    output: str
    labelled_rows: int
    evaluation_run_id: str | None  # the MLflow run, for registered versions


def evaluate(config: EvaluateConfig) -> EvaluationOutcome:
    """Segment the labelled images, compute the exact dataset IoU, and record it for a registered version."""
    from segmill.pipeline.bootstrap import dataset_iou_from_results
    from segmill.pipeline.results import committed_rows
    from segmill.pipeline.segment import segment
    from segmill.pipeline.tracking import log_evaluation

    segment_config = config.segment_config()
    with _tracking_uri(config.tracking_uri):
        record = segment(segment_config)
        counts = committed_rows(config.output, config.endpoint_url, ["union"])
        classes = [f.name for f in counts.schema.field("union").type] if counts.num_rows else []
        iou = dataset_iou_from_results(config.output, classes, endpoint_url=config.endpoint_url)
        present = [v for v in iou.values() if v is not None and not math.isnan(v)]
        miou = sum(present) / len(present) if present else math.nan
        run_id = None
        if config.registered():
            run_id = log_evaluation(resolved_tracking_uri(config.tracking_uri), record.model_name,
                                    record.model_version, iou, miou=miou,
                                    dataset=config.dataset or config.labels or config.images)
    labelled = counts.num_rows - counts["union"].null_count if counts.num_rows else 0
    return EvaluationOutcome(record.job_id, record.model_name, record.model_version, miou, iou, config.output,
                             labelled, run_id)


def resolved_tracking_uri(tracking_uri: str | None) -> str:
    """The given URI, else $MLFLOW_TRACKING_URI, else MLflow's own default."""
    if tracking_uri:
        return tracking_uri
    import mlflow

    return mlflow.get_tracking_uri()


@contextlib.contextmanager
def _tracking_uri(tracking_uri: str | None) -> Iterator[None]:
    """Resolve `models:/` URIs against `tracking_uri` while the job runs (the bulk job reads the environment)."""
    if not tracking_uri:
        yield
        return
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = tracking_uri
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = previous
