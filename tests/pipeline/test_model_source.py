"""Resolving MODEL: checkpoint files, MLflow registry URIs (on SQLite, the embedded default), torchvision tags."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from segmill.models.checkpoint import load_checkpoint
from segmill.pipeline.model_source import MLFLOW_CHECKPOINT_ARTIFACT, resolve_model


@pytest.fixture()
def registry(tmp_path: Path, tiny_checkpoint: str, monkeypatch) -> str:
    """A registered model `roads` whose version 1 holds the checkpoint and carries the alias `champion`."""
    import mlflow

    from segmill.pipeline.tracking import experiment_id

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_experiment(experiment_id=experiment_id(uri, "model-source"))  # artifacts under tmp_path, not ./mlruns
    folder, name = MLFLOW_CHECKPOINT_ARTIFACT.split("/")
    staged = tmp_path / "staged" / name
    staged.parent.mkdir()
    shutil.copy(tiny_checkpoint, staged)
    with mlflow.start_run() as run:
        mlflow.log_artifact(str(staged), artifact_path=folder)
    client = mlflow.MlflowClient(uri)
    client.create_registered_model("roads")
    version = client.create_model_version("roads", source=run.info.artifact_uri, run_id=run.info.run_id)
    client.set_registered_model_alias("roads", "champion", version.version)
    return uri


def test_alias_and_version_uris_resolve_to_the_registered_checkpoint(registry: str, tiny_checkpoint: str) -> None:
    for uri in ("models:/roads@champion", "models:/roads/1"):
        resolved = resolve_model(uri)
        assert (resolved.name, resolved.version) == ("roads", "1")
        assert resolved.checkpoint == Path(tiny_checkpoint).read_bytes()
        assert load_checkpoint(resolved.checkpoint)[1] == resolved.spec


def test_unknown_registry_entries_fail_with_one_clear_sentence(registry: str) -> None:
    with pytest.raises(ValueError, match=r"models:/roads@nobody could not be resolved in MLflow"):
        resolve_model("models:/roads@nobody")
    with pytest.raises(ValueError, match="must look like models:/NAME@ALIAS"):
        resolve_model("models:/roads/latest/extra")


def test_a_checkpoint_file_is_versioned_by_its_content(tiny_checkpoint: str) -> None:
    resolved = resolve_model(tiny_checkpoint)
    assert resolved.name == Path(tiny_checkpoint).stem and resolved.version.startswith("sha256:")
    assert resolve_model(tiny_checkpoint).version == resolved.version


def test_torchvision_tags_are_checked_against_the_weights_enum() -> None:
    with pytest.raises(ValueError, match="is not a torchvision weights tag"):
        resolve_model("lraspp_mobilenet_v3_large:NOT_A_TAG")
    with pytest.raises(ValueError, match="is not a torchvision weights tag"):
        resolve_model("unet:IMAGENET1K_V1")
