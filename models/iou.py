"""IoU from intersection and union counts, in numpy alone: the results table's writers and readers use it
without loading torch (`models/metrics.py` gives the same figures for tensors).

A class whose union is 0 (absent from ground truth and prediction) has no IoU: NaN, left out of the mean.
"""
from __future__ import annotations

import numpy as np


def iou_from_counts(intersection: np.ndarray, union: np.ndarray) -> np.ndarray:
    """float64 IoU of counts of any shape (summed over images for a dataset figure); NaN where union is 0."""
    inter, uni = np.asarray(intersection, dtype=np.float64), np.asarray(union, dtype=np.float64)
    out = np.full(np.broadcast(inter, uni).shape, np.nan)
    np.divide(inter, uni, out=out, where=uni > 0)
    return out


def nanmean(values: np.ndarray, axis: int | None = None) -> float | np.ndarray:
    """Mean over the defined (non-NaN) entries, NaN where none is, without numpy's warning."""
    arr = np.asarray(values, dtype=np.float64)
    defined = ~np.isnan(arr)
    count = defined.sum(axis=axis)
    total = np.where(defined, arr, 0.0).sum(axis=axis)
    mean = np.divide(total, count, out=np.full(np.shape(total), np.nan), where=count > 0)
    return float(mean) if axis is None else mean


def mean_iou(intersection: np.ndarray, union: np.ndarray) -> float:
    """mIoU over the classes with a defined IoU."""
    return nanmean(iou_from_counts(intersection, union))


__all__ = ["iou_from_counts", "mean_iou", "nanmean"]
