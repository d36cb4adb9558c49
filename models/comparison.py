"""Is one model better than another on the same labelled images, or only luckier? A paired bootstrap over images.

Both models are scored on the same images, each image giving per-class intersection and union counts. A resample
draws images with replacement (the same draw for both models: the pairing), sums each model's counts over it and
takes the mIoU of the sums, exactly as the dataset figure is computed; the gain's 2.5th and 97.5th percentiles over
the resamples are its 95% interval. numpy only: the gate runs in a driver that may have no GPU.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from segmill.models.iou import iou_from_counts, nanmean

RESAMPLES = 2000


@dataclass(frozen=True)
class Comparison:
    """The challenger (b) against the champion (a) on the same images."""

    images: int
    miou_a: float
    miou_b: float
    low: float  # the gain's 95% interval over resamples of the images
    high: float
    class_change: dict[str, float]  # IoU of b minus a per class, on all the images; classes never seen left out

    @property
    def gain(self) -> float:
        return self.miou_b - self.miou_a

    def worst_class(self) -> tuple[str | None, float]:
        """The class that lost most IoU (None where none is defined) and its change."""
        if not self.class_change:
            return None, 0.0
        name = min(self.class_change, key=self.class_change.get)
        return name, self.class_change[name]


def paired_bootstrap(inter_a: np.ndarray, union_a: np.ndarray, inter_b: np.ndarray, union_b: np.ndarray,
                     classes: tuple[str, ...], *, resamples: int = RESAMPLES, seed: int = 0) -> Comparison:
    """Compare b against a from per-image counts (images x classes each, rows the same images in the same order)."""
    arrays = [np.asarray(x, dtype=np.float64) for x in (inter_a, union_a, inter_b, union_b)]
    n = arrays[0].shape[0]
    if n == 0 or any(x.shape != arrays[0].shape for x in arrays):
        raise ValueError(f"A paired comparison needs the same images scored by both models, not {[x.shape for x in arrays]}.")
    rng = np.random.default_rng(seed)
    # Each resample as how often it drew each image: the summed counts of a resample are then one matrix product.
    draws = rng.multinomial(n, np.full(n, 1.0 / n), size=resamples).astype(np.float64)
    sums = [draws @ x for x in arrays]  # resamples x classes each
    gains = nanmean(iou_from_counts(sums[2], sums[3]), axis=1) - nanmean(iou_from_counts(sums[0], sums[1]), axis=1)
    iou_a = iou_from_counts(arrays[0].sum(0), arrays[1].sum(0))
    iou_b = iou_from_counts(arrays[2].sum(0), arrays[3].sum(0))
    change = {c: float(b - a) for c, a, b in zip(classes, iou_a, iou_b) if not (np.isnan(a) or np.isnan(b))}
    low, high = np.nanpercentile(gains, [2.5, 97.5])
    return Comparison(n, float(nanmean(iou_a)), float(nanmean(iou_b)), float(low), float(high), change)


__all__ = ["Comparison", "RESAMPLES", "paired_bootstrap"]
