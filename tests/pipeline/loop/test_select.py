"""`select`: the ranking of unlabelled images, checked against figures computed by hand from the module's formulas."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from segmill.pipeline.loop.select import diverse_order, group_of, scores, select

CLASSES = ("road", "car", "pole")


def _results(folder: Path, rows: list[dict]) -> str:
    """A results table with the columns `select` reads (a real segment job writes more)."""
    struct = pa.struct([(c, pa.float32()) for c in CLASSES])
    table = pa.table({
        "image_uri": [r["uri"] for r in rows],
        "label_uri": [r.get("label") for r in rows],
        "status": [r.get("status", "ok") for r in rows],
        "confidence_mean": pa.array([r["confidence"] for r in rows], pa.float32()),
        "entropy_mean": pa.array([r["entropy"] for r in rows], pa.float32()),
        "class_fraction": pa.array([dict(zip(CLASSES, r["fractions"])) for r in rows], struct),
    })
    folder.mkdir(parents=True)
    pq.write_table(table, folder / "part-00000-test.parquet")
    return str(folder)


def test_scores_follow_the_formulas():
    confidence = np.array([0.9, 0.4])
    entropy = np.array([0.2, 0.9])
    fractions = np.array([[0.97, 0.02, 0.01], [0.5, 0.3, 0.2]])
    score, uncertainty, hard = scores(confidence, entropy, fractions, [2], "balanced")
    # uncertainty = ((1 - c) + e / ln 3) / 2; hard = min(1, pole fraction / 0.05)
    assert uncertainty == pytest.approx([(0.1 + 0.2 / math.log(3)) / 2, (0.6 + 0.9 / math.log(3)) / 2])
    assert hard == pytest.approx([0.2, 1.0])
    assert score == pytest.approx(uncertainty + hard)
    assert scores(confidence, entropy, fractions, [2], "uncertainty")[0] == pytest.approx(uncertainty)
    assert scores(confidence, entropy, fractions, [2], "hard-classes")[0] == pytest.approx(hard)


def test_frames_of_one_sequence_are_one_group():
    assert group_of("s3://b/camvid/0001TP_006690.png") == "s3://b/camvid/0001TP"
    assert group_of("s3://b/camvid/0001TP_006720.png") == "s3://b/camvid/0001TP"
    assert group_of("/data/a/frame-12.jpg") == "/data/a/frame"
    assert group_of("/data/a/cat.jpg") != group_of("/data/b/cat.jpg")


def test_diversity_puts_a_different_image_before_a_near_copy_of_the_first():
    score = np.array([1.0, 0.95, 0.7])
    fractions = np.array([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    # After picking 0: image 1 gains 0.95 - 0.5 * (0.5 * 1 + 0.5 * 1) = 0.45 (same classes, same group);
    # image 2 gains 0.7 - 0.5 * (0.5 * 0 + 0.5 * 0) = 0.7 (other classes, other group): 2 comes before 1.
    assert diverse_order(score, fractions, ["a/seq", "a/seq", "b/other"], 3) == [0, 2, 1]
    assert diverse_order(score, fractions, ["a/seq", "a/seq", "b/other"], 3, diversity=0.0) == [0, 1, 2]


def test_select_ranks_unlabelled_ok_images_and_says_why(tmp_path: Path):
    rows = [
        dict(uri="/d/seq_001.png", confidence=0.50, entropy=0.60, fractions=(0.90, 0.05, 0.05)),
        dict(uri="/d/seq_002.png", confidence=0.52, entropy=0.58, fractions=(0.90, 0.05, 0.05)),
        dict(uri="/d/street.png", confidence=0.80, entropy=0.30, fractions=(0.60, 0.40, 0.00)),
        dict(uri="/d/calm.png", confidence=0.99, entropy=0.01, fractions=(1.00, 0.00, 0.00)),
        dict(uri="/d/labelled.png", confidence=0.10, entropy=1.00, fractions=(0.5, 0.0, 0.5), label="/l/x.png"),
        dict(uri="/d/broken.png", confidence=0.0, entropy=0.0, fractions=(0, 0, 0), status="error"),
    ]
    results = _results(tmp_path / "results", rows)

    chosen = select(results, 3, strategy="balanced", hard_classes=["pole"])

    assert chosen.candidates == 4  # the labelled and the error row are not candidates
    # Scores by hand (ln 3 = 1.0986): seq_001 u = (0.50 + 0.60/1.0986)/2 = 0.5231, hard = 1 -> 1.5231;
    # seq_002 u = (0.48 + 0.58/1.0986)/2 = 0.5040 -> 1.5040; street u = (0.20 + 0.30/1.0986)/2 = 0.2365, hard 0;
    # calm u = (0.01 + 0.01/1.0986)/2 = 0.0096. seq_002 after seq_001 gains 1.5040 - 0.5 x 1 = 1.0040, still above
    # street's 0.2365 - 0.5 x 0.5 x cos(seq, street) (0.8602) = 0.0215; so seq_001, seq_002, then street.
    table = chosen.table.to_pydict()
    assert table["image_uri"] == ["/d/seq_001.png", "/d/seq_002.png", "/d/street.png"]
    assert table["rank"] == [1, 2, 3]
    assert table["score"] == pytest.approx([1.5231, 1.5040, 0.2365], abs=1e-3)
    assert table["reasons"][0] == "mean confidence 0.50; uncertain; predicted hard classes: pole 5.0%"
    assert table["reasons"][2] == "mean confidence 0.80; no hard class predicted"
    assert table["fraction.car"] == pytest.approx([0.05, 0.05, 0.40])

    by_uncertainty = select(results, 4, strategy="uncertainty")
    assert by_uncertainty.table["image_uri"].to_pylist()[-1] == "/d/calm.png"
    shuffled = select(results, 4, strategy="random", seed=1)
    assert sorted(shuffled.table["image_uri"].to_pylist()) == sorted(r["uri"] for r in rows[:4])
    assert select(results, 4, strategy="random", seed=1).table.equals(shuffled.table)


def test_select_refuses_what_it_cannot_do_in_one_sentence(tmp_path: Path):
    results = _results(tmp_path / "results", [dict(uri="/d/a.png", confidence=0.5, entropy=0.5,
                                                   fractions=(1, 0, 0), label="/l/a.png")])
    with pytest.raises(ValueError, match="Strategy 'smart' is not known; choose one of balanced"):
        select(results, 1, strategy="smart")
    with pytest.raises(ValueError, match=r"Hard classes \['tree'\] are not classes of the results"):
        select(results, 1, hard_classes=["tree"])
    with pytest.raises(ValueError, match="Every ok image of .* has a label already"):
        select(results, 1)
    with pytest.raises(ValueError, match="Strategy 'hard-classes' needs hard classes"):
        select(results, 1, strategy="hard-classes")
    broken = _results(tmp_path / "broken", [dict(uri="/d/b.png", confidence=0, entropy=0, fractions=(0, 0, 0),
                                                 status="error")])
    with pytest.raises(ValueError, match="hold no ok row"):
        select(broken, 1)
    with pytest.raises(ValueError, match="hold no rows"):
        select(str(tmp_path / "empty"), 1)
