"""The champion gate's decision (MLflow's side is exercised end to end in tests/pipeline/train)."""
from __future__ import annotations

from segmill.pipeline.tracking import decide


def test_promotion_decision():
    assert decide(0.5, None, None, 0.0).promoted
    assert decide(0.61, 0.60, "3", 0.0).promoted
    held = decide(0.61, 0.60, "3", 0.02)
    assert not held.promoted and "0.6000" in held.reason and held.champion_version == "3"
    assert not decide(0.9, None, "3", 0.0, comparable=False).promoted
