"""What an epoch of training is made of, as pure functions of the class index and a seed.

- Class statistics from the cached class index (`bootstrap.class_presence_index`: pixels per class per label).
- Class weights for the loss: median-frequency balancing (Eigen & Fergus 2015, what SegNet used on CamVid:
  w_c = median_k(freq_k) / freq_c, where freq_c is class c's pixels over the pixels of the images that hold it)
  and a smoother choice, its square root (w_c = sqrt(median / freq_c), 1 at the median class).
- Image sampling: `presence` repeats every image holding a hard class `factor` times (DeepLabv3's bootstrapping);
  `pixel_mass` keeps every image once and draws the extra images by their hard-class pixels, with the classes
  weighted by rarity at a temperature (DAFormer's rare-class sampling, with pixel mass in place of presence):
  P(c) = softmax_c((1 - f_c) / T) over the hard classes, P(i | c) = n_ic / N_c, weight_i = sum_c P(c) P(i | c).
- Hard-class crops: a set share of the epoch's crops is placed on a pixel of a hard class the image holds (the
  class drawn by P(c) among those present); the crop itself is cut in `data.decode_and_augment`.

Every epoch's plan is drawn from (seed, epoch) alone, so a run, a replaced worker and a resumed run see the same
images in the same order with the same crops.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from segmill.pipeline.bulk.rows import OK

SAMPLINGS = ("none", "presence", "pixel_mass")
CLASS_WEIGHTINGS = ("none", "median_frequency", "inverse_sqrt_frequency")
NO_HARD_CROP = -1
PLAN_SCHEMA = pa.schema([("image_uri", pa.string()), ("label_uri", pa.string()), ("crop_class", pa.int16()),
                         ("seed", pa.int64())])


@dataclass(frozen=True)
class ClassStats:
    """Pixel counts of the usable labelled images: [images, classes], and which index rows they are."""

    rows: np.ndarray  # positions in the index of the usable rows
    pixels: np.ndarray  # int64 [len(rows), num_classes]

    @property
    def class_pixels(self) -> np.ndarray:
        return self.pixels.sum(0)

    @property
    def frequency(self) -> np.ndarray:
        """Each class's share of all labelled pixels."""
        total = self.pixels.sum()
        return self.class_pixels / total if total else np.zeros(self.pixels.shape[1])

    def holds(self, class_ids: Sequence[int]) -> np.ndarray:
        """Per usable image: whether it holds any of `class_ids`."""
        ids = list(class_ids)
        return (self.pixels[:, ids] > 0).any(1) if ids else np.zeros(len(self.rows), dtype=bool)


def class_stats(index: pa.Table, num_classes: int) -> ClassStats:
    usable = np.flatnonzero(pc.fill_null(pc.equal(index["status"], OK), False).to_numpy(zero_copy_only=False))
    lists = index["pixels"].to_pylist()
    pixels = np.array([lists[i] for i in usable], dtype=np.int64).reshape(len(usable), num_classes)
    return ClassStats(usable, pixels)


def class_weights(stats: ClassStats, method: str) -> np.ndarray | None:
    """Loss weight per class (None for `none`); a class absent from training gets 1 (it meets no target pixel)."""
    if method == "none":
        return None
    if method not in CLASS_WEIGHTINGS:
        raise ValueError(f"Class weighting {method!r} must be one of {list(CLASS_WEIGHTINGS)}.")
    labelled = stats.pixels.sum(1)  # per image
    present = stats.pixels > 0
    area = (present * labelled[:, None]).sum(0)  # pixels of the images holding each class
    seen = stats.class_pixels > 0
    freq = np.divide(stats.class_pixels, area, out=np.zeros(len(area)), where=area > 0)
    weights = np.ones(len(freq))
    weights[seen] = np.median(freq[seen]) / freq[seen]
    return np.sqrt(weights) if method == "inverse_sqrt_frequency" else weights


def hard_class_probabilities(stats: ClassStats, hard_ids: Sequence[int], temperature: float) -> np.ndarray:
    """P(c) over the hard classes (in `hard_ids` order): rarer classes more likely, evenly as T grows."""
    if temperature <= 0:
        raise ValueError(f"The sampling temperature must be positive, not {temperature}.")
    logits = (1 - stats.frequency[list(hard_ids)]) / temperature
    logits -= logits.max()
    return np.exp(logits) / np.exp(logits).sum()


def pixel_mass_weights(stats: ClassStats, hard_ids: Sequence[int], temperature: float) -> np.ndarray:
    """Sampling weight of each usable image, summing to 1: sum over hard classes of P(c) * its share of c's pixels."""
    ids = [c for c in hard_ids if stats.class_pixels[c] > 0]
    if not ids:
        return np.full(len(stats.rows), 1 / max(len(stats.rows), 1))
    share = stats.pixels[:, ids] / stats.class_pixels[ids]
    return share @ hard_class_probabilities(stats, ids, temperature)


@dataclass(frozen=True)
class EpochPlan:
    rows: np.ndarray  # index positions, in training order
    crop_class: np.ndarray  # int16 per row: the hard class the crop is placed on, or NO_HARD_CROP
    seeds: np.ndarray  # int64 per row: the seed of its augmentation

    def table(self, index: pa.Table) -> pa.Table:
        picked = index.take(pa.array(self.rows, pa.int64()))
        return pa.table({"image_uri": picked["image_uri"], "label_uri": picked["label_uri"],
                         "crop_class": pa.array(self.crop_class, pa.int16()), "seed": pa.array(self.seeds, pa.int64())},
                        schema=PLAN_SCHEMA)


def epoch_plan(stats: ClassStats, hard_ids: Sequence[int], *, sampling: str, factor: int, hard_crop_share: float,
               temperature: float, seed: int, epoch: int) -> EpochPlan:
    """One epoch: which images (index positions), in which order, which crops go on hard classes, and the seeds."""
    if sampling not in SAMPLINGS:
        raise ValueError(f"Sampling {sampling!r} must be one of {list(SAMPLINGS)}.")
    rng = np.random.default_rng([seed, epoch])
    holds = stats.holds(hard_ids)
    if sampling == "presence":
        positions = np.repeat(np.arange(len(stats.rows)), np.where(holds, factor, 1))
    elif sampling == "pixel_mass":
        extra = rng.choice(len(stats.rows), size=epoch_size(stats, hard_ids, sampling, factor) - len(stats.rows),
                           p=pixel_mass_weights(stats, hard_ids, temperature))
        positions = np.concatenate([np.arange(len(stats.rows)), extra])
    else:
        positions = np.arange(len(stats.rows))
    positions = rng.permutation(positions)
    crop_class = np.full(len(positions), NO_HARD_CROP, dtype=np.int16)
    candidates = np.flatnonzero(holds[positions])
    placed = rng.choice(candidates, size=min(len(candidates), round(hard_crop_share * len(positions))), replace=False)
    if len(placed):
        probabilities = hard_class_probabilities(stats, hard_ids, temperature)
        for i in placed:
            present = stats.pixels[positions[i], list(hard_ids)] > 0
            p = probabilities * present
            crop_class[i] = hard_ids[rng.choice(len(hard_ids), p=p / p.sum())]
    seeds = rng.integers(0, 2**62, size=len(positions), dtype=np.int64)
    return EpochPlan(stats.rows[positions], crop_class, seeds)


def epoch_size(stats: ClassStats, hard_ids: Sequence[int], sampling: str, factor: int) -> int:
    """Images per epoch: every usable image once, plus (factor - 1) per image holding a hard class."""
    if sampling == "none":
        return len(stats.rows)
    return len(stats.rows) + (factor - 1) * int(stats.holds(hard_ids).sum())


def choose_sampling(requested: str, stats: ClassStats, hard_ids: Sequence[int]) -> tuple[str, str]:
    """The sampling to run and why: presence sampling selects nothing when every image holds a hard class (it
    would only repeat the whole set), so the extra images are then drawn by hard-class pixel mass instead."""
    if not hard_ids:
        return "none", "no hard classes"
    if requested == "presence" and len(stats.rows) and stats.holds(hard_ids).all():
        return "pixel_mass", ("every training image holds a hard class, so presence sampling would only repeat the "
                              "whole set; the extra images are drawn by hard-class pixel mass instead")
    return requested, "as asked"


def plan_summary(stats: ClassStats, hard_ids: Sequence[int], classes: Sequence[str], *, sampling: str, factor: int,
                 hard_crop_share: float, temperature: float, seed: int,
                 weights: np.ndarray | None) -> dict:
    """What the hard classes do to an epoch (its first one), for the log and the MLflow run."""
    plan = epoch_plan(stats, hard_ids, sampling=sampling, factor=factor, hard_crop_share=hard_crop_share,
                      temperature=temperature, seed=seed, epoch=0)
    holds = stats.holds(hard_ids)
    position = {row: i for i, row in enumerate(stats.rows)}
    in_plan = holds[[position[row] for row in plan.rows]]
    return {
        "sampling": sampling, "factor": factor, "images": len(stats.rows), "hard_images": int(holds.sum()),
        "epoch_images": len(plan.rows),
        "hard_share_before": float(holds.mean()) if len(holds) else 0.0,
        "hard_share_after": float(in_plan.mean()) if len(in_plan) else 0.0,
        "hard_crops_planned": float((plan.crop_class != NO_HARD_CROP).mean()) if len(plan.rows) else 0.0,
        "dataset_share": dict(zip(classes, stats.frequency.tolist())),
        "class_weights": None if weights is None else dict(zip(classes, weights.tolist())),
    }
