"""Is one model better than another on the same labelled images, or only luckier? A paired bootstrap over images.

Both models are scored on the same images, each image giving per-class intersection and union counts. A resample
draws images with replacement (the same draw for both models: the pairing), sums each model's counts over it and
takes the mIoU of the sums, exactly as the dataset figure is computed; the gain's 2.5th and 97.5th percentiles over
the resamples are its 95% interval. numpy only: the gate runs in a driver that may have no GPU.

Images are drawn in runs of neighbours (a circular block bootstrap, Politis & Romano 1992), in the order the
validation set lists them (paths sorted): validation sets are often frames of videos, and neighbouring frames are
near copies, so drawing them one by one treats 101 frames of one drive as 101 independent scenes and gives an
interval too narrow. Blocks of n^(1/3) images (the rate-optimal order for a variance, Hall, Horowitz & Jing 1995)
keep that dependence; for images that are independent, blocks change little.
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
    block: int = 1  # images per drawn run of neighbours

    @property
    def gain(self) -> float:
        return self.miou_b - self.miou_a

    def worst_class(self) -> tuple[str | None, float]:
        """The class that lost most IoU (None where none is defined) and its change."""
        if not self.class_change:
            return None, 0.0
        name = min(self.class_change, key=self.class_change.get)
        return name, self.class_change[name]


def block_length(images: int) -> int:
    """Images per block for a set of this many: round(n^(1/3)), at least 1 (5 for CamVid's 101 val frames)."""
    return max(1, round(images ** (1 / 3)))


def resample_counts(images: int, resamples: int, block: int, rng: np.random.Generator) -> np.ndarray:
    """How often each image is drawn in each resample (resamples x images): ceil(n / block) runs of `block`
    neighbours from uniform starts, wrapping at the end, cut to n images. block 1 is the ordinary bootstrap."""
    runs = -(-images // block)
    starts = rng.integers(0, images, size=(resamples, runs))
    drawn = ((starts[:, :, None] + np.arange(block)) % images).reshape(resamples, -1)[:, :images]
    flat = drawn + (np.arange(resamples) * images)[:, None]  # one bincount for every resample at once
    return np.bincount(flat.ravel(), minlength=resamples * images).reshape(resamples, images).astype(np.float64)


def paired_bootstrap(inter_a: np.ndarray, union_a: np.ndarray, inter_b: np.ndarray, union_b: np.ndarray,
                     classes: tuple[str, ...], *, resamples: int = RESAMPLES, seed: int = 0,
                     block: int | None = None) -> Comparison:
    """Compare b against a from per-image counts (images x classes each, rows the same images in the same order,
    neighbours next to each other); `block` images per drawn run, by default `block_length(n)`."""
    arrays = [np.asarray(x, dtype=np.float64) for x in (inter_a, union_a, inter_b, union_b)]
    n = arrays[0].shape[0]
    if n == 0 or any(x.shape != arrays[0].shape for x in arrays):
        raise ValueError(f"A paired comparison needs the same images scored by both models, not {[x.shape for x in arrays]}.")
    block = block_length(n) if block is None else max(1, min(int(block), n))
    # Each resample as how often it drew each image: the summed counts of a resample are then one matrix product.
    draws = resample_counts(n, resamples, block, np.random.default_rng(seed))
    sums = [draws @ x for x in arrays]  # resamples x classes each
    gains = nanmean(iou_from_counts(sums[2], sums[3]), axis=1) - nanmean(iou_from_counts(sums[0], sums[1]), axis=1)
    iou_a = iou_from_counts(arrays[0].sum(0), arrays[1].sum(0))
    iou_b = iou_from_counts(arrays[2].sum(0), arrays[3].sum(0))
    change = {c: float(b - a) for c, a, b in zip(classes, iou_a, iou_b) if not (np.isnan(a) or np.isnan(b))}
    low, high = np.nanpercentile(gains, [2.5, 97.5])
    return Comparison(n, float(nanmean(iou_a)), float(nanmean(iou_b)), float(low), float(high), change, block)


__all__ = ["Comparison", "RESAMPLES", "block_length", "paired_bootstrap", "resample_counts"]
