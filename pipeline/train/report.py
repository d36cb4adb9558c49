"""What a training run leaves in MLflow for a person: the validation confusion matrix, a few validation images as
titled panels with a legend, and `report.html` (self-contained) with the per-class IoU of the run and of the
champion it was gated against, side by side."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from segmill.models.checkpoint import ModelSpec
from segmill.models.predict import Predictor
from segmill.pipeline.common import pictures
from segmill.pipeline.common.decode import DecodeError
from segmill.pipeline.common.images import overlay
from segmill.pipeline.common.report import Section, picture, render, table
from segmill.pipeline.common.storage import redact
from segmill.pipeline.train.data import read_pair


def confusion_png(confusion: list[list[int]], classes: tuple[str, ...]) -> bytes:
    """Row-normalised confusion matrix (rows: ground truth, columns: prediction) with full class names."""
    return pictures.confusion(confusion, classes, title="validation confusion matrix (rows sum to 1)")


def overlay_pngs(model: torch.nn.Module, spec: ModelSpec, pairs: list[tuple[str, str]], count: int, *,
                 endpoint_url: str | None) -> dict[str, bytes]:
    """For the first `count` readable pairs: image, prediction, ground truth and where they differ, with a legend."""
    predictor = Predictor(model.eval(), mean=spec.mean, std=spec.std, device="cpu")
    palette, found = spec.colours(), {}
    for image_uri, label_uri in pairs:
        if len(found) >= count:
            break
        try:
            image, label = read_pair(image_uri, label_uri, spec.num_classes, spec.ignore_index, endpoint_url)
        except DecodeError:
            continue
        with torch.inference_mode():
            pred = predictor.predict(image)[0].numpy().astype(np.int64)
        ignore = len(palette)
        truth = np.where(label < len(palette), label, ignore)
        labelled = truth != ignore
        accuracy = float((pred[labelled] == truth[labelled]).mean()) if labelled.any() else float("nan")
        panels = [("image", image), ("prediction", overlay(image, pred, palette)),
                  ("ground truth", overlay(image, truth, (*palette, (0, 0, 0)))),
                  ("where they differ", pictures.differences(image, pred, truth, ignore))]
        name = image_uri.rsplit("/", 1)[-1]
        present = sorted(set(np.unique(pred).tolist()) | set(np.unique(truth[labelled]).tolist()))
        found[name.rsplit(".", 1)[0] + ".png"] = pictures.panels(
            panels, spec.classes, palette, present=present, caption=f"{name}: pixel accuracy {accuracy:.3f}",
            max_side=480)
    return found


def training_report(*, run_name: str, run_id: str, spec: ModelSpec, best: dict[str, Any], facts: list[tuple[str, Any]],
                    champion: dict[str, Any] | None, curve: list[tuple[int, float]],
                    overlays: dict[str, bytes]) -> str:
    """report.html of a run: facts, per-class IoU against the champion, the learning curve, confusion, images.

    `champion`: {"version", "miou", "iou": {class: IoU}} as re-scored on this run's validation set, or None.
    """
    classes = list(spec.classes)
    ours = [best["val_iou"].get(c) for c in classes]
    headers = ["class", f"this run ({run_name})"]
    rows = [[c, v] for c, v in zip(classes, ours)]
    series = {"this run": ours}
    if champion:
        theirs = [champion["iou"].get(c) for c in classes]
        headers += [f"champion (version {champion['version']})", "change"]
        rows = [[c, v, w, None if v is None or w is None else v - w] for c, v, w in zip(classes, ours, theirs)]
        series[f"champion v{champion['version']}"] = theirs
    rows.append(["mIoU", best["val_miou"], *([champion["miou"], best["val_miou"] - champion["miou"]]
                                             if champion and champion["miou"] is not None else
                                             [None, None] if champion else [])])
    sections = [
        Section("iou", "Per-class IoU on the validation set", notes=[
            f"Best validated epoch {best['epoch'] + 1}; the champion re-scored on the same images."
            if champion else f"Best validated epoch {best['epoch'] + 1}; there was no champion to compare with."],
            tables=[table("iou-table", headers, rows)],
            pictures=[picture(pictures.bars(series, classes, title="validation IoU per class", xlabel="IoU"),
                              "Validation IoU per class")]),
    ]
    if curve:
        sections.append(Section("curve", "Validation mIoU by epoch", tables=[
            table("curve-table", ["epoch", "val mIoU"], [[epoch + 1, value] for epoch, value in curve])]))
    sections.append(Section("confusion", "Confusion matrix", pictures=[
        picture(confusion_png(best["confusion"], spec.classes), "Validation confusion matrix, rows sum to 1")]))
    if overlays:
        sections.append(Section("images", "Validation images", pictures=[
            picture(png, name) for name, png in overlays.items()]))
    return render(f"segmill training run {run_name}", [("MLflow run", run_id), *[(k, redact(str(v)) if v is not None
                                                                                      else None) for k, v in facts]],
                  sections)
