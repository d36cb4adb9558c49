"""An evaluation job: the bulk job over labelled images, then the dataset IoU from the results table.

When the model is a registered version (`models:/NAME@ALIAS` or `models:/NAME/N`), the scores are recorded in
MLflow against that version (`tracking.log_evaluation`), so "the champion's latest evaluation" exists for
hard-class training and for deciding whether a challenger wins.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, ClassVar

from pydantic import Field, model_validator

from segmill.models.iou import nanmean
from segmill.pipeline.bulk.config import SegmentConfig
from segmill.pipeline.common.config import Config

_SET_AT_THE_TOP = {"input", "output", "model", "labels", "job_id", "ray_address", "endpoint_url", "tracking_uri"}


class EvaluateConfig(Config):
    """Which model, which labelled images, where the results table goes, and where scores are recorded."""

    what: ClassVar[str] = "evaluate job"
    kind: ClassVar[str | None] = "evaluate"

    model: Annotated[str, Field(min_length=1)]
    images: Annotated[str, Field(min_length=1)]
    output: Annotated[str, Field(min_length=1)]
    labels: str | None = None  # None: `images` is a manifest with a label_uri column
    dataset: str | None = None  # the name recorded with the scores; default: the label (or manifest) URI
    tracking_uri: str | None = None  # default: $MLFLOW_TRACKING_URI
    job_id: str | None = None
    ray_address: str | None = None
    endpoint_url: str | None = None
    segment: dict[str, Any] = Field(default_factory=dict)  # other bulk-job keys: scales, flip, resources, ...

    @model_validator(mode="after")
    def _segment_options_are_valid(self) -> "EvaluateConfig":
        self.segment_config()  # fail now on bad segment options, not after listing the images
        return self

    def segment_config(self) -> SegmentConfig:
        """The bulk job this evaluation runs (its keys checked like any segment spec)."""
        taken = sorted(set(self.segment) & _SET_AT_THE_TOP)
        if taken:
            raise ValueError(f"The evaluate job's 'segment' options may not set {taken}; set them at the top level.")
        values = {key: getattr(self, key) for key in _SET_AT_THE_TOP - {"input"}}
        values["input"] = self.images
        return SegmentConfig.from_dict({**{k: v for k, v in values.items() if v is not None}, **self.segment},
                                       source="evaluate job's segment options")

    def registered(self) -> bool:
        return self.model.startswith("models:/")


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


def evaluate(config: EvaluateConfig, progress=None) -> EvaluationOutcome:
    """Segment the labelled images, compute the exact dataset IoU, and record it for a registered version."""
    from segmill.pipeline.bulk.job import segment
    from segmill.pipeline.bulk.results import committed_rows, dataset_iou, table_classes
    from segmill.pipeline.tracking import log_evaluation, resolved_tracking_uri

    record = segment(config.segment_config(), progress=progress)
    classes = table_classes(config.output, endpoint_url=config.endpoint_url)
    iou = dataset_iou(config.output, classes, endpoint_url=config.endpoint_url)
    miou = nanmean(list(iou.values()))
    run_id = None
    if config.registered():
        run_id = log_evaluation(resolved_tracking_uri(config.tracking_uri), record.model_name, record.model_version,
                                iou, miou=miou, dataset=config.dataset or config.labels or config.images)
    counts = committed_rows(config.output, config.endpoint_url, ["union_pixels"])
    labelled = counts.num_rows - counts["union_pixels"].null_count if counts.num_rows else 0
    return EvaluationOutcome(record.job_id, record.model_name, record.model_version, miou, iou, config.output,
                             labelled, run_id)
