"""Confusion-matrix metrics for semantic segmentation: exact, and on whatever device the masks are.

Every figure comes from a confusion matrix ``cm`` (int64 [C, C], rows = ground truth, columns =
prediction) counted over the valid pixels (``target != ignore_index``). Dataset-level figures come from
the SUM of per-image matrices (or of per-class intersection and union counts), never from averaging
per-image means: such an average over-weights small images and classes that are rare in one image.

Convention for classes that do not occur:

- IoU_c = cm[c, c] / (row_c + col_c - cm[c, c]). A class absent from both ground truth and prediction
  has union 0: its IoU is undefined, NaN in the per-class vector, and left out of mean IoU (nanmean).
  A class absent from ground truth but predicted has IoU 0 and counts in the mean (a false alarm is an
  error).
- Class accuracy (recall) of c = cm[c, c] / row_c; classes absent from ground truth are NaN and left out
  of mean class accuracy.
- Frequency-weighted IoU = sum over classes present in ground truth of (row_c / total) * IoU_c.
- With no valid pixel at all, pixel accuracy and every mean are NaN.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Union

import numpy as np
import torch

from segmill.models import iou as numpy_iou
from segmill.models.spec import DEFAULT_IGNORE_INDEX

Mask = Union[torch.Tensor, np.ndarray]
Counts = Union[torch.Tensor, np.ndarray]


def _as_long(x: Mask, device: torch.device | None = None) -> torch.Tensor:
    """A mask as an int64 tensor (numpy arrays are wrapped without a copy where possible)."""
    t = torch.from_numpy(np.ascontiguousarray(x)) if isinstance(x, np.ndarray) else x
    return t.to(device=device if device is not None else t.device, dtype=torch.long)


def _check_values(pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor, num_classes: int,
                  ignore_index: int) -> None:
    """Raise ValueError if a valid pixel holds a class id outside [0, num_classes); one device sync."""
    bad_t = valid & ((target < 0) | (target >= num_classes))
    bad_p = valid & ((pred < 0) | (pred >= num_classes))
    if not bool(torch.stack([bad_t.any(), bad_p.any()]).any()):
        return
    if bool(bad_t.any()):
        values = torch.unique(target[bad_t])[:8].tolist()
        raise ValueError(
            f"target holds values {values} outside [0, {num_classes}) that are not "
            f"ignore_index={ignore_index}; remap them to class ids or to the ignore index."
        )
    values = torch.unique(pred[bad_p])[:8].tolist()
    raise ValueError(
        f"pred holds class ids {values} outside [0, {num_classes}); check num_classes matches the model."
    )


def confusion_matrix(pred: Mask, target: Mask, num_classes: int, ignore_index: int = DEFAULT_IGNORE_INDEX) -> torch.Tensor:
    """Confusion matrix (int64 [C, C], rows = ground truth, cols = prediction) of masks of any shape.

    Counted on ``target``'s device with one bincount; pixels whose target is ``ignore_index`` are skipped.
    """
    target = _as_long(target)
    pred = _as_long(pred, target.device)
    if pred.shape != target.shape:
        raise ValueError(f"pred shape {tuple(pred.shape)} differs from target shape {tuple(target.shape)}.")
    valid = target != ignore_index
    _check_values(pred, target, valid, num_classes, ignore_index)
    cc = num_classes * num_classes
    # Invalid pixels go to one extra bin that is dropped: no boolean indexing, so no device sync here.
    index = torch.where(valid, target * num_classes + pred, cc)
    return torch.bincount(index.flatten(), minlength=cc + 1)[:cc].view(num_classes, num_classes)


def intersection_and_union(confusion: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class intersection and union counts of [..., C, C] confusion matrices (batched is fine)."""
    inter = torch.diagonal(confusion, dim1=-2, dim2=-1)
    union = confusion.sum(-1) + confusion.sum(-2) - inter
    return inter, union


def iou_from_counts(intersection: Counts, union: Counts) -> Counts:
    """IoU from intersection and union counts (summed over images for a dataset figure); NaN where union is 0.

    Returns the same kind as the input: float64 numpy array (`models/iou.py`) or float64 tensor.
    """
    if isinstance(intersection, np.ndarray) or isinstance(union, np.ndarray):
        return numpy_iou.iou_from_counts(intersection, union)
    inter, uni = intersection.double(), union.double()
    return torch.where(uni > 0, inter / uni.clamp(min=1), torch.full_like(uni, math.nan))


def nanmean(values: Counts) -> float:
    """Mean over the defined (non-NaN) entries; NaN when none is defined, without a warning."""
    arr = values.detach().cpu().double().numpy() if isinstance(values, torch.Tensor) else np.asarray(values, float)
    return numpy_iou.nanmean(arr)


@dataclass(frozen=True, eq=False)
class SegmentationMetrics:
    """Every standard figure of one confusion matrix (kept on the CPU, int64)."""

    confusion: torch.Tensor

    @classmethod
    def from_confusion(cls, confusion: Counts) -> SegmentationMetrics:
        cm = torch.as_tensor(confusion).detach().to("cpu", torch.int64)
        if cm.dim() != 2 or cm.shape[0] != cm.shape[1]:
            raise ValueError(f"a confusion matrix must be square [C, C]; got shape {tuple(cm.shape)}.")
        return cls(cm)

    @property
    def num_classes(self) -> int:
        return self.confusion.shape[0]

    @property
    def intersection(self) -> torch.Tensor:
        return intersection_and_union(self.confusion)[0]

    @property
    def union(self) -> torch.Tensor:
        return intersection_and_union(self.confusion)[1]

    @property
    def gt_pixels(self) -> torch.Tensor:
        """Ground-truth pixels per class (row sums)."""
        return self.confusion.sum(1)

    @property
    def pred_pixels(self) -> torch.Tensor:
        """Predicted pixels per class (column sums)."""
        return self.confusion.sum(0)

    @property
    def iou(self) -> torch.Tensor:
        """Per-class IoU, float64; NaN for classes absent from both ground truth and prediction."""
        return iou_from_counts(self.intersection, self.union)

    @property
    def mean_iou(self) -> float:
        return nanmean(self.iou)

    @property
    def pixel_accuracy(self) -> float:
        total = int(self.confusion.sum())
        return int(self.intersection.sum()) / total if total else math.nan

    @property
    def class_accuracy(self) -> torch.Tensor:
        """Per-class recall, float64; NaN for classes absent from ground truth."""
        return iou_from_counts(self.intersection, self.gt_pixels)

    @property
    def mean_class_accuracy(self) -> float:
        return nanmean(self.class_accuracy)

    @property
    def frequency_weighted_iou(self) -> float:
        gt = self.gt_pixels.double()
        total = float(gt.sum())
        if not total:
            return math.nan
        present = gt > 0
        return float((gt[present] / total * self.iou[present]).sum())

    def summary(self) -> dict[str, float]:
        """The scalar figures, for logging."""
        return {
            "mean_iou": self.mean_iou,
            "pixel_accuracy": self.pixel_accuracy,
            "mean_class_accuracy": self.mean_class_accuracy,
            "frequency_weighted_iou": self.frequency_weighted_iou,
        }


class ConfusionAccumulator:
    """Sums confusion matrices over images for dataset-level figures."""

    def __init__(self, num_classes: int, ignore_index: int = DEFAULT_IGNORE_INDEX, device: torch.device | str | None = None):
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    def update(self, pred: Mask, target: Mask) -> None:
        """Add masks of any shape (one image or a batch)."""
        cm = confusion_matrix(pred, target, self.num_classes, self.ignore_index)
        self.confusion += cm.to(self.confusion.device)

    def compute(self) -> SegmentationMetrics:
        return SegmentationMetrics.from_confusion(self.confusion)
