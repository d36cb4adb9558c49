"""Resolving MODEL: checkpoint files, MLflow registry URIs (on SQLite, the embedded default), torchvision tags."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from segmill.models.checkpoint import load_checkpoint
from segmill.pipeline.common.model_source import ModelCheck, resolve_model


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


def test_isolated_resolution_matches_and_keeps_torch_out_of_the_caller(registry: str, tiny_checkpoint: str,
                                                                        tmp_path: Path) -> None:
    """The bulk job's driver resolves in a child process; it gets the same model and never imports torch."""

    def resolve_model_isolated(uri: str):
        with ModelCheck(uri) as check:
            return check.result()

    for uri in (tiny_checkpoint, "models:/roads@champion"):
        isolated, direct = resolve_model_isolated(uri), resolve_model(uri)
        assert (isolated.name, isolated.version, isolated.spec) == (direct.name, direct.version, direct.spec)
        assert isolated.checkpoint == direct.checkpoint
    with pytest.raises(ValueError, match=r"models:/roads@nobody could not be resolved in MLflow"):
        resolve_model_isolated("models:/roads@nobody")
    not_a_checkpoint = tmp_path / "notes.pt"
    not_a_checkpoint.write_text("hello")
    with pytest.raises(ValueError, match="is not a usable segmill checkpoint"):
        resolve_model_isolated(str(not_a_checkpoint))
    probe = ("import sys; import segmill.pipeline, segmill.pipeline.bulk.job, segmill.pipeline.bulk.dataset\n"
             "from segmill.pipeline.common.model_source import ModelCheck\n"
             f"with ModelCheck({tiny_checkpoint!r}) as check: assert check.result().spec.num_classes > 1\n"
             "print(sorted(m for m in sys.modules if m == 'torch'))")
    found = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert found.strip() == "[]"


def test_a_model_checked_once_is_not_loaded_again_until_its_bytes_may_have_changed(registry: str,
                                                                                   tiny_checkpoint: str,
                                                                                   tmp_path: Path) -> None:
    """Many small jobs in one process check each model once: a file by size and modification time, a registry
    version as named; an alias moves, so it is checked every time."""
    import os
    import shutil

    def check(uri: str) -> tuple[bool, str]:
        with ModelCheck(uri) as found:
            return found.spawned, found.result().version

    copy = tmp_path / "roads.pt"
    shutil.copy(tiny_checkpoint, copy)
    first = check(str(copy))
    assert first[0] and check(str(copy)) == (False, first[1])
    # New bytes under the same name (another model saved over it): checked again, and its new version seen.
    from segmill.models.checkpoint import ModelSpec, save_random_checkpoint

    save_random_checkpoint(copy, ModelSpec(arch="unet", classes=("a", "b"), arch_kwargs={"base_channels": 4, "depth": 2}),
                           seed=3)
    os.utime(copy, (1, 1))  # a different modification time even on a coarse clock
    changed = check(str(copy))
    assert changed[0] and changed[1] != first[1]
    assert check("models:/roads/1") == (True, "1") and check("models:/roads/1") == (False, "1")
    assert check("models:/roads@champion")[0] and check("models:/roads@champion")[0]
    # A bad model is never remembered as checked.
    bad = tmp_path / "notes.pt"
    bad.write_text("hello")
    for _ in range(2):
        with pytest.raises(ValueError, match="is not a usable segmill checkpoint"):
            check(str(bad))
