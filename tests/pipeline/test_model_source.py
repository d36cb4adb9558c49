"""Resolving MODEL: checkpoint files, MLflow registry URIs (on SQLite, the embedded default), torchvision tags."""
from __future__ import annotations

from pathlib import Path

import pytest

from segmill.models.checkpoint import load_checkpoint
from segmill.pipeline.model_source import resolve_model


@pytest.fixture()
def registry(register_tiny_model) -> str:
    """A registered model `roads` whose version 1 holds the tiny checkpoint and carries the alias `champion`."""
    return register_tiny_model("roads")


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
