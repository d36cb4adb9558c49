"""Registering a trained model as an MLflow model version, and the champion/challenger decision.

A new version always gets alias `challenger`. It takes `champion` only if there is no champion, or if its
validation mIoU beats the champion's by more than the margin, with both scored on the same validation set
(the champion is re-evaluated on it, never compared by a number from another set). The decision and both
scores are tags on the version.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

from segmill.pipeline.tracking import CHALLENGER, CHAMPION, alias_version, client

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Decision:
    promoted: bool
    reason: str
    champion_version: str | None
    champion_miou: float | None


def decide(challenger_miou: float, champion_miou: float | None, champion_version: str | None, margin: float,
           comparable: bool = True) -> Decision:
    if champion_version is None:
        return Decision(True, "no champion yet", None, None)
    if not comparable or champion_miou is None:
        return Decision(False, "the champion predicts other classes, so the two cannot be compared",
                        champion_version, champion_miou)
    if challenger_miou > champion_miou + margin:
        return Decision(True, f"mIoU {challenger_miou:.4f} beats the champion's {champion_miou:.4f} by more than {margin}",
                        champion_version, champion_miou)
    return Decision(False, f"mIoU {challenger_miou:.4f} does not beat the champion's {champion_miou:.4f} by more "
                           f"than {margin}", champion_version, champion_miou)


def register_version(tracking_uri: str, name: str, run_id: str, artifact_uri: str, *, challenger_miou: float,
                     decision: Decision, val_fingerprint: str) -> str:
    """Create the version (source: the run's artifacts, holding checkpoint/model.pt), tag it, set its aliases."""
    from mlflow.exceptions import MlflowException

    c = client(tracking_uri)
    try:
        c.create_registered_model(name)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    version = c.create_model_version(name, source=artifact_uri, run_id=run_id).version
    tags = {"segmill.decision": "champion" if decision.promoted else "challenger",
            "segmill.decision_reason": decision.reason, "segmill.challenger_miou": f"{challenger_miou:.6f}",
            "segmill.champion_version": decision.champion_version or "",
            "segmill.champion_miou": "" if decision.champion_miou is None else f"{decision.champion_miou:.6f}",
            "segmill.val_fingerprint": val_fingerprint}
    for key, value in tags.items():
        c.set_model_version_tag(name, version, key, value)
    c.set_registered_model_alias(name, CHALLENGER, version)
    if decision.promoted:
        c.set_registered_model_alias(name, CHAMPION, version)
    log.info("registered %s version %s: %s", name, version, decision.reason)
    return str(version)


def current_champion(tracking_uri: str, name: str):
    """The champion's model version, or None."""
    return alias_version(tracking_uri, name, CHAMPION)
