"""One command that improves the model: `segmill improve SPEC` (kind: improve), also what a schedule fires.

    evaluate the champion on the labelled validation set (its scores recorded against its version)
      -> hard classes: its lowest-IoU classes (`hard_classes: auto` of the training job)
      -> train a challenger from the champion's weights with the hard-class methods
      -> the gate: both scored image by image on the same validation set, promoted only when the gain is not noise
      -> if promoted, segment the named image set with the new champion into a new output (the old results stay)
      -> OUTPUT/improve.json and OUTPUT/improve.html: both models' per-class IoU, the interval, the decision, counts

With nothing new to learn from (the labelled set the champion was trained on, unchanged) it trains nothing and
says so, unless `force`.
"""
from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import asdict, dataclass, field
from typing import Annotated, Any, Callable, ClassVar

from pydantic import Field, model_validator

from segmill.pipeline.common import settings
from segmill.pipeline.common.config import Config
from segmill.pipeline.common.storage import join_uri, open_fs, redact

log = logging.getLogger(__name__)
# What the challenger's training does unless the spec's `train` says otherwise: the hard-class methods measured
# on CamVid (docs/retraining.md).
TRAIN_DEFAULTS: dict[str, Any] = {"hard_classes": "auto", "hard_crop_share": 0.5,
                                  "class_weighting": "inverse_sqrt_frequency"}
_SET_HERE = {"images", "labels", "classes", "val_images", "val_labels", "register", "init_from", "tracking_uri",
             "endpoint_url", "ray_address", "storage_path", "model", "arch_kwargs"}


class ImproveConfig(Config):
    """The registered model to improve, its labelled data, and what to re-segment when it improves."""

    what: ClassVar[str] = "improve job"
    kind: ClassVar[str | None] = "improve"

    model: Annotated[str, Field(min_length=1)] = Field(description="Registered MLflow model to improve (its "
                                                                     "champion is the starting point).")
    images: Annotated[str, Field(min_length=1)] = Field(description="Labelled training images.")
    labels: Annotated[str, Field(min_length=1)] = Field(description="Their labels.")
    classes: Annotated[str, Field(min_length=1)] = Field(description="Class file.")
    val_images: Annotated[str, Field(min_length=1)] = Field(description="Validation images: the champion and the "
                                                                          "challenger are scored on them.")
    val_labels: Annotated[str, Field(min_length=1)] = Field(description="Validation labels.")
    output: Annotated[str, Field(min_length=1)] = Field(description="Folder for the comparison (improve.json, "
                                                                      "improve.html) and the evaluation's table.")
    segment_input: str | None = Field(None, description="Images to segment again with a new champion.")
    segment_output: str | None = Field(None, description="Parent folder of the new results (one folder per version).")
    train: dict[str, Any] = Field(default_factory=dict, description="Training options (segmill train's keys) over "
                                                                     "the hard-class defaults.")
    force: bool = Field(False, description="Train even when there are no new labels.")
    storage_path: str | None = None
    tracking_uri: str | None = None
    endpoint_url: str | None = None
    ray_address: str | None = None

    @model_validator(mode="after")
    def _both_or_neither(self) -> "ImproveConfig":
        if (self.segment_input is None) != (self.segment_output is None):
            raise ValueError("segment_input and segment_output go together: give both to re-segment with a new "
                             "champion, or neither")
        return self

    def train_config(self, arch: str, arch_kwargs: dict[str, Any]):
        from segmill.pipeline.train.config import TrainConfig

        taken = sorted(set(self.train) & _SET_HERE)
        if taken:
            raise ValueError(f"The improve job's 'train' options may not set {taken}; they come from the job itself.")
        values = {"images": self.images, "labels": self.labels, "classes": self.classes,
                  "val_images": self.val_images, "val_labels": self.val_labels, "register": self.model,
                  "init_from": f"models:/{self.model}@champion", "model": arch, "arch_kwargs": arch_kwargs,
                  "tracking_uri": self.tracking_uri, "endpoint_url": self.endpoint_url,
                  "ray_address": self.ray_address, "storage_path": self.storage_path,
                  **TRAIN_DEFAULTS, **self.train}
        return TrainConfig.from_dict({k: v for k, v in values.items() if v is not None},
                                     source="improve job's training options")


@dataclass
class ImproveOutcome:
    model: str
    champion_version: str
    decision: str
    promoted: bool = False
    trained: bool = False
    new_version: str | None = None
    hard_classes: list[str] = field(default_factory=list)
    champion_miou: float | None = None
    challenger_miou: float | None = None
    gain_interval: tuple[float, float] | None = None
    per_class: dict[str, dict[str, float | None]] = field(default_factory=dict)
    train_images: int = 0
    val_images: int = 0
    resegmented: str | None = None
    resegmented_rows: int | None = None
    run_id: str | None = None
    report: str | None = None


def _no_view(describer: str, title: str):
    return contextlib.nullcontext(None)


def improve(config: ImproveConfig, progress: Callable[[str, str], Any] | None = None) -> ImproveOutcome:
    """`progress(describer, title)` gives a context manager whose value is a step's progress callback
    (jobs/progress.py: "images" for the evaluation and the re-segmentation, "training" for the training)."""
    views = progress or _no_view
    from segmill.pipeline.bulk.evaluate import EvaluateConfig, evaluate
    from segmill.pipeline.common.classes import load_class_file
    from segmill.pipeline.common.model_source import resolve_model
    from segmill.pipeline.tracking import CHALLENGER, alias_version, check_reachable, client, current_champion
    from segmill.pipeline.train.data import load_sets

    tracking = settings.tracking_uri(config.tracking_uri)
    if not tracking:
        raise ValueError("The improve job needs tracking_uri (or $MLFLOW_TRACKING_URI): its model lives in MLflow.")
    check_reachable(tracking)
    champion = current_champion(tracking, config.model)
    if champion is None:
        raise ValueError(f"Model {config.model} has no champion to improve; register one first "
                         f"(segmill train ... --register {config.model}).")
    resolved = resolve_model(f"models:/{config.model}@champion", tracking_uri=tracking)
    train_config = config.train_config(resolved.spec.arch, dict(resolved.spec.arch_kwargs))  # checked before work
    classes = load_class_file(config.classes, endpoint_url=config.endpoint_url)
    train_set, val_set = load_sets(config.images, config.labels, config.val_images, config.val_labels, 0.0,
                                   len(classes.names), endpoint_url=config.endpoint_url,
                                   ignore_index=classes.ignore_index)
    outcome = ImproveOutcome(config.model, str(champion.version), "", train_images=train_set.usable.num_rows,
                             val_images=val_set.usable.num_rows)
    # Nothing new to learn from: the champion, or the last challenger the gate kept out, was trained on these labels.
    challenger = alias_version(tracking, config.model, CHALLENGER)
    for version, how in ((champion, ""), (challenger, ", not promoted,")):
        trained_on = client(tracking).get_run(version.run_id).data.tags.get("segmill.train_fingerprint") \
            if version is not None and version.run_id else None
        if trained_on == train_set.fingerprint and not config.force:
            outcome.decision = (f"no new labels since version {version.version}{how} was trained on these images; "
                                "nothing trained (force: true trains anyway)")
            log.warning("improve %s: %s", config.model, outcome.decision)
            return _finish(config, outcome)

    log.info("improve %s: evaluating champion version %s on %d validation images", config.model, champion.version,
             outcome.val_images)
    with views("images", f"evaluate v{champion.version}") as view:
        evaluation = evaluate(EvaluateConfig(model=f"models:/{config.model}@champion", images=config.val_images,
                                             labels=config.val_labels,
                                             output=join_uri(config.output, "evaluation",
                                                             f"v{champion.version}-{val_set.fingerprint[:12]}"),
                                             dataset=val_set.fingerprint, tracking_uri=tracking,
                                             endpoint_url=config.endpoint_url, ray_address=config.ray_address),
                              progress=view)
    log.info("improve %s: champion mIoU %.4f on the validation set", config.model, evaluation.miou)

    from segmill.pipeline.train.driver import train

    with views("training", "train challenger") as view:
        trained = train(train_config, progress=view)
    outcome.trained, outcome.run_id, outcome.new_version = True, trained.run_id, trained.model_version
    outcome.promoted, outcome.decision, outcome.hard_classes = trained.champion, trained.decision, trained.hard_classes
    outcome.challenger_miou, outcome.champion_miou = trained.val_miou, trained.champion_miou
    champion_iou, challenger_iou = trained.champion_iou or {}, dict(trained.val_iou)
    gate = trained.comparison
    if gate is not None:  # both as the gate scored them, on the same images (training's validation differs a bit)
        outcome.gain_interval = (gate.low, gate.high)
        outcome.champion_miou, outcome.challenger_miou = gate.miou_a, gate.miou_b
        challenger_iou = {c: champion_iou[c] + change for c, change in gate.class_change.items() if c in champion_iou}
    outcome.per_class = {c: {"champion": champion_iou.get(c), "challenger": challenger_iou.get(c)}
                         for c in classes.names}
    if outcome.promoted and config.segment_input and config.segment_output:
        from segmill.pipeline.bulk.config import SegmentConfig
        from segmill.pipeline.bulk.job import segment

        target = join_uri(config.segment_output, f"{config.model}-v{trained.model_version}")
        with views("images", f"segment v{trained.model_version}") as view:
            record = segment(SegmentConfig(input=config.segment_input, output=target,
                                           model=f"models:/{config.model}/{trained.model_version}",
                                           tracking_uri=tracking, endpoint_url=config.endpoint_url,
                                           ray_address=config.ray_address), progress=view)
        outcome.resegmented, outcome.resegmented_rows = target, record.rows
    return _finish(config, outcome)


def _finish(config: ImproveConfig, outcome: ImproveOutcome) -> ImproveOutcome:
    """improve.json and improve.html in OUTPUT."""
    from segmill.pipeline.common.report import Section, render, table

    fs, root = open_fs(config.output, endpoint_url=config.endpoint_url)
    fs.makedirs(root, exist_ok=True)
    with fs.open(join_uri(root, "improve.json"), "w") as f:
        json.dump(asdict(outcome), f, indent=2, default=str)
    rows = [[c, v["champion"], v["challenger"], None if v["champion"] is None or v["challenger"] is None
             else v["challenger"] - v["champion"]] for c, v in outcome.per_class.items()]
    rows.append(["mIoU", outcome.champion_miou, outcome.challenger_miou,
                 None if outcome.champion_miou is None or outcome.challenger_miou is None
                 else outcome.challenger_miou - outcome.champion_miou])
    interval = outcome.gain_interval
    facts = [("model", outcome.model), ("champion version", outcome.champion_version),
             ("challenger version", outcome.new_version), ("promoted", "yes" if outcome.promoted else "no"),
             ("decision", outcome.decision),
             ("gain's 95% interval", f"{interval[0]:+.4f} to {interval[1]:+.4f}" if interval else None),
             ("hard classes", ", ".join(outcome.hard_classes) or None), ("training images", outcome.train_images),
             ("validation images", outcome.val_images),
             ("re-segmented", f"{redact(outcome.resegmented)} ({outcome.resegmented_rows} rows)"
              if outcome.resegmented else None)]
    sections = [Section("iou", "Per-class IoU on the validation set", notes=[
        "Both models scored on the same images; the gate decides on the paired bootstrap of the gain."],
        tables=[table("iou-table", ["class", "champion", "challenger", "change"], rows)])] if outcome.trained else []
    with fs.open(join_uri(root, "improve.html"), "w") as f:
        f.write(render(f"segmill improve {outcome.model}", facts, sections))
    outcome.report = join_uri(config.output, "improve.html")
    return outcome
