"""The champion gate's decision (MLflow's side is exercised end to end in tests/pipeline/train)."""
from __future__ import annotations

from segmill.models.comparison import Comparison
from segmill.pipeline.tracking import decide


def _comparison(low: float, high: float, change: dict[str, float]) -> Comparison:
    return Comparison(images=100, miou_a=0.60, miou_b=0.60 + (low + high) / 2, low=low, high=high, class_change=change)


def test_promotion_only_when_the_interval_clears_the_margin_and_no_class_falls() -> None:
    assert decide(None, None, margin=0.005, max_class_drop=0.05).promoted  # no champion yet
    clear = decide(_comparison(0.010, 0.030, {"road": 0.02}), "3", margin=0.005, max_class_drop=0.05)
    assert clear.promoted and "95% interval +0.0100 to +0.0300" in clear.reason and clear.champion_miou == 0.60
    noise = decide(_comparison(-0.004, 0.016, {"road": 0.006}), "3", margin=0.0, max_class_drop=0.05)
    assert not noise.promoted and "does not clear the margin 0" in noise.reason and noise.champion_version == "3"
    at_margin = decide(_comparison(0.005, 0.02, {}), "3", margin=0.005, max_class_drop=0.05)
    assert not at_margin.promoted  # the lower end must be above the margin, not on it
    falls = decide(_comparison(0.010, 0.030, {"road": 0.05, "Pole": -0.08}), "3", margin=0.005, max_class_drop=0.05)
    assert not falls.promoted and "Pole loses 0.0800 IoU" in falls.reason
    assert not decide(None, "3", margin=0.0, max_class_drop=0.05, comparable=False).promoted


def test_a_model_is_logged_into_its_run_whatever_run_the_caller_has_open(tmp_path, tiny_checkpoint: str,
                                                                          monkeypatch) -> None:
    """A notebook or an orchestrator often has an MLflow run open; logging a version's model must neither fail
    ("Run ... is already active") nor end or replace the caller's run."""
    from pathlib import Path

    import mlflow

    from segmill.models.checkpoint import load_checkpoint
    from segmill.pipeline.tracking import experiment_id, log_mlflow_model

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(experiment_id=experiment_id(uri, "callers"))
    data = Path(tiny_checkpoint).read_bytes()
    spec = load_checkpoint(data)[1]
    training = mlflow.MlflowClient(uri).create_run(experiment_id(uri, "callers")).info.run_id
    try:
        with mlflow.start_run() as caller:
            logged = log_mlflow_model(uri, training, data, spec)  # another run than the caller's
            assert mlflow.active_run().info.run_id == caller.info.run_id
            own = log_mlflow_model(uri, caller.info.run_id, data, spec)  # the caller's own run
            assert mlflow.active_run().info.run_id == caller.info.run_id
            assert mlflow.get_run(caller.info.run_id).info.status == "RUNNING"
        for model_uri, run_id in ((logged, training), (own, caller.info.run_id)):
            info = mlflow.models.get_model_info(model_uri)
            assert info.run_id == run_id and info.signature is not None
    finally:
        mlflow.set_tracking_uri(None)
