"""The CLI parses and delegates; errors a user can hit are one clear line with exit code 2."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from segmill.jobs.cli import app

runner = CliRunner()
COMMANDS = ["segment", "scenes", "models", "query", "demo"]


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_every_help_explains_itself(command: str | None) -> None:
    result = runner.invoke(app, [command, "--help"] if command else ["--help"])
    assert result.exit_code == 0, result.output
    if command:
        assert "Usage: " in result.output and len(result.output.split()) > 15
    else:
        assert all(c in result.output for c in COMMANDS)


def test_scenes_writes_images_labels_and_classes(tmp_path: Path) -> None:
    result = runner.invoke(app, ["scenes", str(tmp_path / "s"), "--count", "3", "--seed", "4"])
    assert result.exit_code == 0, result.output
    assert len(list((tmp_path / "s" / "images").glob("*.png"))) == 3
    assert len(list((tmp_path / "s" / "labels").glob("*.png"))) == 3
    assert [c["name"] for c in yaml.safe_load((tmp_path / "s" / "classes.yaml").read_text())["classes"]][-2:] == ["pole", "sign"]


def test_segment_rejects_a_spec_with_an_unknown_key(tmp_path: Path) -> None:
    spec = tmp_path / "job.yaml"
    spec.write_text(yaml.safe_dump({"input": "x", "output": "y", "model": "m", "batchsize": 4}))
    result = runner.invoke(app, ["segment", "--config", str(spec)])
    assert result.exit_code == 2
    assert "unknown key(s) ['batchsize']" in result.output


def test_segment_rejects_a_model_that_does_not_exist_before_any_work(tmp_path: Path) -> None:
    runner.invoke(app, ["scenes", str(tmp_path / "s"), "--count", "1"])
    result = runner.invoke(app, ["segment", str(tmp_path / "s" / "images"), str(tmp_path / "out"),
                                 "--model", str(tmp_path / "missing.pt")])
    assert result.exit_code == 2
    assert "missing.pt is neither a registered architecture nor an existing checkpoint file" in result.output
    assert not (tmp_path / "out").exists(), "nothing may be written when the job cannot start"


def test_segment_rejects_an_architecture_without_weights(tmp_path: Path) -> None:
    result = runner.invoke(app, ["segment", str(tmp_path), str(tmp_path / "out"), "--model", "unet"])
    assert result.exit_code == 2
    assert "without weights" in result.output
