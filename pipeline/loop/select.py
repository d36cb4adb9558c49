"""What to label next: the unlabelled images of a results table, ranked by what a label would teach the model.

Each image scores from its own row (no image is read again):

    uncertainty = ((1 - confidence_mean) + entropy_mean / ln K) / 2            in [0, 1]
    hard        = min(1, sum of the hard classes' predicted pixel fractions / HARD_FULL)   in [0, 1]
    score       = uncertainty + HARD_WEIGHT * hard     ("balanced"; "uncertainty" and "hard-classes" use one part)

Then a greedy pick keeps the batch diverse: each next image maximises its score minus DIVERSITY times its
similarity to the most similar image already picked, where similarity is half the cosine of the predicted class
fractions and half "same group" (the same folder and file-name stem without its trailing frame number, so the
frames of one video sequence are one group). Only the best POOL_FACTOR x N by score are considered, so a million
rows cost one sort. "random" is the baseline to compare a strategy with.
"""
from __future__ import annotations

import math
import posixpath
import re
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from segmill.pipeline.bulk.results import committed_rows
from segmill.pipeline.common.storage import redact

STRATEGIES = ("balanced", "uncertainty", "hard-classes", "random")
HARD_FULL = 0.05  # a hard-class share of the predicted pixels that counts fully
HARD_WEIGHT = 1.0
DIVERSITY = 0.5
POOL_FACTOR = 20
_FRAME = re.compile(r"[-_.]?\d+$")


@dataclass(frozen=True)
class Selection:
    """The picked images, best first, with their figures and reasons, and what they were picked from."""

    table: pa.Table  # image_uri, rank, score, uncertainty, hard, group, reasons, fraction.<class>...
    candidates: int  # unlabelled ok rows considered
    classes: tuple[str, ...]


def group_of(image_uri: str) -> str:
    """The folder and the stem without a trailing frame number: `seq/0001TP_006690.png` -> `seq/0001TP`."""
    folder, name = posixpath.split(image_uri)
    return f"{folder}/{_FRAME.sub('', posixpath.splitext(name)[0])}"


def scores(confidence: np.ndarray, entropy: np.ndarray, fractions: np.ndarray, hard_ids: list[int],
           strategy: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(score, uncertainty, hard) per image (see the module's formulas); `fractions` is images x classes."""
    k = fractions.shape[1]
    uncertainty = ((1 - confidence) + entropy / math.log(max(k, 2))) / 2
    hard = np.minimum(1.0, fractions[:, hard_ids].sum(1) / HARD_FULL) if hard_ids else np.zeros(len(confidence))
    score = {"balanced": uncertainty + HARD_WEIGHT * hard, "uncertainty": uncertainty, "hard-classes": hard}
    return score.get(strategy, np.zeros(len(confidence))), uncertainty, hard


def diverse_order(score: np.ndarray, fractions: np.ndarray, groups: list[str], n: int,
                  diversity: float = DIVERSITY) -> list[int]:
    """Greedy: the best score first, then each time the image whose score minus `diversity` x its similarity to
    the most similar image picked so far is highest."""
    norms = np.linalg.norm(fractions, axis=1, keepdims=True)
    unit = np.divide(fractions, norms, out=np.zeros_like(fractions), where=norms > 0)
    group_ids = np.unique(np.array(groups, dtype=object), return_inverse=True)[1]
    picked: list[int] = []
    closest = np.zeros(len(score))  # each candidate's similarity to its most similar picked image
    available = np.ones(len(score), dtype=bool)
    for _ in range(min(n, len(score))):
        gain = np.where(available, score - diversity * closest, -np.inf)
        best = int(np.argmax(gain))
        picked.append(best)
        available[best] = False
        similarity = 0.5 * (unit @ unit[best]) + 0.5 * (group_ids == group_ids[best])
        closest = np.maximum(closest, similarity)
    return picked


def select(results: str, n: int, *, strategy: str = "balanced", hard_classes: list[str] | None = None,
           seed: int = 0, endpoint_url: str | None = None) -> Selection:
    """The `n` unlabelled ok images of `results` to label next (best first)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"Strategy {strategy!r} is not known; choose one of {', '.join(STRATEGIES)}.")
    if n < 1:
        raise ValueError(f"The number of images to select must be at least 1, not {n}.")
    rows = committed_rows(results, endpoint_url, ["image_uri", "label_uri", "status", "confidence_mean",
                                                  "entropy_mean", "class_fraction"])
    if rows.num_rows == 0:
        raise ValueError(f"Results {redact(results)} hold no rows to select from.")
    classes = tuple(f.name for f in rows.schema.field("class_fraction").type)
    unknown = [c for c in hard_classes or [] if c not in classes]
    if unknown:
        raise ValueError(f"Hard classes {unknown} are not classes of the results at {redact(results)}: {list(classes)}.")
    hard_ids = [classes.index(c) for c in hard_classes or []]
    if strategy == "hard-classes" and not hard_ids:
        raise ValueError("Strategy 'hard-classes' needs hard classes: name them (--hard-classes) or give the model "
                         "whose evaluation names them (--model).")
    ok = pc.equal(rows["status"], "ok")
    if not pc.any(ok).as_py():
        raise ValueError(f"Results {redact(results)} hold no ok row (every image is an error row): nothing to select.")
    rows = rows.filter(pc.and_(ok, pc.is_null(rows["label_uri"])))
    if rows.num_rows == 0:
        raise ValueError(f"Every ok image of {redact(results)} has a label already: there is nothing to select.")
    fractions = np.stack([np.nan_to_num(rows["class_fraction"].combine_chunks().field(c).to_numpy(zero_copy_only=False)
                                        .astype(np.float64)) for c in classes], axis=1)
    confidence = rows["confidence_mean"].to_numpy().astype(np.float64)
    entropy = rows["entropy_mean"].to_numpy().astype(np.float64)
    uris = rows["image_uri"].to_pylist()
    score, uncertainty, hard = scores(confidence, entropy, fractions, hard_ids, strategy)
    if strategy == "random":
        order = np.random.default_rng(seed).permutation(len(uris))[:n].tolist()
    else:
        pool = np.argsort(-score, kind="stable")[: POOL_FACTOR * n]
        groups = [group_of(uris[i]) for i in pool]
        order = [int(pool[i]) for i in diverse_order(score[pool], fractions[pool], groups, n)]
    reasons = [_reasons(confidence[i], uncertainty[i], hard[i], fractions[i], classes, hard_ids) for i in order]
    columns = {"image_uri": [uris[i] for i in order], "rank": list(range(1, len(order) + 1)),
               "score": score[order], "uncertainty": uncertainty[order], "hard": hard[order],
               "group": [group_of(uris[i]) for i in order], "reasons": reasons}
    columns.update({f"fraction.{c}": fractions[order, k] for k, c in enumerate(classes)})
    return Selection(pa.table(columns), len(uris), classes)


def _reasons(confidence: float, uncertainty: float, hard: float, fractions: np.ndarray, classes, hard_ids) -> str:
    """Why an image was picked, in words a labeller's lead reads."""
    parts = [f"mean confidence {confidence:.2f}"]
    if uncertainty >= 0.5:
        parts.append("uncertain")
    present = [f"{classes[c]} {fractions[c]:.1%}" for c in hard_ids if fractions[c] > 0]
    if present:
        parts.append("predicted hard classes: " + ", ".join(present))
    elif hard_ids:
        parts.append("no hard class predicted")
    return "; ".join(parts)
