"""Data conditions that fire a retraining: new labelled images, and the champion's IoU below a threshold.

Both read the schedule's train spec (`images`, `labels`, `register`, tracking URI), re-read at every check.
- New images: labelled images under the spec's images/labels now, minus the count recorded at the schedule's
  last successful firing (0 before the first one: a new schedule fires once N labelled images exist).
- IoU: `latest_evaluation` of the champion of the spec's `register` model. No champion or no evaluation counts
  as true (there is no model to protect, so training one is the useful thing); a class the evaluation has no
  IoU for counts as false (nothing was measured to be bad).
When a schedule has several conditions, all must hold.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from segmill.jobs.scheduling.store import Schedule
from segmill.jobs.specs import load_spec as load_job_spec


@dataclass(frozen=True)
class Check:
    """The outcome of a schedule's conditions: met or not, why, and the evidence that identifies this state."""

    met: bool
    reasons: list[str] = field(default_factory=list)
    evidence: str = ""  # e.g. "images=240;evaluation=RUN_ID": a condition-only schedule fires once per evidence
    labelled_images: int | None = None


def load_spec(path: str) -> dict[str, Any]:
    """The job spec as a dict, validated by `segmill.jobs.specs.load_spec` (keys and types of its kind)."""
    return _load(path)[0]


def train_config(path: str):
    """What data conditions read of a train or improve spec: images, labels, classes, endpoint_url, register and
    resolved_tracking_uri()."""
    data, config = _load(path)
    if data["kind"] == "improve":
        from types import SimpleNamespace

        from segmill.pipeline.common import settings

        return SimpleNamespace(images=config.images, labels=config.labels, classes=config.classes,
                               endpoint_url=config.endpoint_url, register=config.model,
                               resolved_tracking_uri=lambda: settings.tracking_uri(config.tracking_uri))
    if data["kind"] != "train":
        raise ValueError(f"Job spec {path} is a {data['kind']} job; data conditions need a train or improve spec.")
    return config


def _load(path: str) -> tuple[dict[str, Any], Any]:
    job = load_job_spec(path)
    return job.data, job.config


def check_spec_for(schedule: Schedule) -> None:
    """Fail at `schedule add`, not at 3 a.m.: the spec loads, and conditions have what they read."""
    if not schedule.has_conditions:
        load_spec(schedule.spec)
        return
    config = train_config(schedule.spec)
    if schedule.iou_below is not None and not config.register:
        raise ValueError(f"Job spec {schedule.spec} has no 'register' model, so there is no champion IoU to watch.")
    if schedule.iou_class is not None:
        from segmill.pipeline.common.classes import load_class_file

        names = load_class_file(config.classes, endpoint_url=config.endpoint_url).names
        if schedule.iou_class not in names:
            raise ValueError(f"Class {schedule.iou_class!r} is not in {config.classes} (classes: {', '.join(names)}).")


def count_labelled_images(config) -> int:
    from segmill.pipeline.common.listing import iter_image_batches

    total = 0
    for batch in iter_image_batches(config.images, config.labels, endpoint_url=config.endpoint_url):
        total += len(batch) - batch["label_uri"].null_count
    return total


def evaluate_conditions(schedule: Schedule, baseline_images: int | None) -> Check:
    """Check every condition of `schedule`; `baseline_images` is the count at its last successful firing."""
    if not schedule.has_conditions:
        return Check(True)
    config = train_config(schedule.spec)
    results, evidence, labelled = [], [], None
    if schedule.min_new_images is not None:
        labelled = count_labelled_images(config)
        new = labelled - (baseline_images or 0)
        results.append((new >= schedule.min_new_images,
                        f"{new} new labelled images ({labelled} now, {baseline_images or 0} at the last firing), "
                        f"{schedule.min_new_images} needed"))
        evidence.append(f"images={labelled}")
    if schedule.iou_below is not None:
        met, reason, run_id = _iou_condition(config, schedule.iou_class, schedule.iou_below)
        results.append((met, reason))
        evidence.append(f"evaluation={run_id}")
    return Check(all(met for met, _ in results), [reason for _, reason in results], ";".join(evidence), labelled)


def _iou_condition(config, iou_class: str | None, threshold: float) -> tuple[bool, str, str]:
    from segmill.pipeline.tracking import latest_evaluation

    evaluation = latest_evaluation(config.resolved_tracking_uri(), config.register)
    if evaluation is None:
        return True, f"{config.register} has no champion evaluation (nothing to protect)", "none"
    what = f"IoU of {iou_class}" if iou_class else "mIoU"
    value = evaluation.iou.get(iou_class) if iou_class else evaluation.miou
    if value is None:
        return False, f"the champion's evaluation {evaluation.run_id} has no {what}", evaluation.run_id
    return value < threshold, f"champion {what} {value:.4f} vs threshold {threshold}", evaluation.run_id
