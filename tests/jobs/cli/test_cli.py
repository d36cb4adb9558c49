"""The CLI parses and delegates; errors a user can hit are one clear line with exit code 2."""
from __future__ import annotations

from pathlib import Path

import pytest
import typer
import yaml
from typer.testing import CliRunner

from segmill.jobs.cli import app

runner = CliRunner()
COMMANDS = ["segment", "train", "query", "show", "report", "scenes", "models", "demo", "submit", "run-spec",
            "scheduler", "jobs list", "jobs status", "jobs logs", "jobs stop", "jobs history", "schedule add",
            "schedule list", "schedule remove", "schedule firings"]


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_every_help_explains_itself_with_an_example(command: str | None) -> None:
    result = runner.invoke(app, [*command.split(), "--help"] if command else ["--help"])
    assert result.exit_code == 0, result.output
    assert "Usage: " in result.output and len(result.output.split()) > 15
    examples = result.output.split("Examples:\n", 1)[1].splitlines()
    assert examples and all(line.strip().startswith("segmill ") for line in examples if line.strip())
    assert "<bool>" not in result.output and "PydanticUndefined" not in result.output
    assert "(default" not in result.output, "defaults read [default: X], nowhere (default: X)"
    if command is None:
        assert all(c.split()[0] in result.output for c in COMMANDS)


def test_version() -> None:
    from importlib.metadata import version

    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"segmill {version('segmill')}"


def test_flags_are_the_spec_keys() -> None:
    """Every option of `segment` and `train` that sets a config key is spelt as the key (old spellings remain as
    aliases): one YAML file and one command line say the same things in the same words."""
    import click

    from segmill.pipeline.bulk.config import ResourceConfig, SegmentConfig
    from segmill.pipeline.train.config import TrainConfig

    group = typer.main.get_command(app)
    for name, keys in (("segment", set(SegmentConfig.model_fields) | set(ResourceConfig.model_fields)),
                       ("train", set(TrainConfig.model_fields))):
        command = group.commands[name]
        for param in command.params:
            if isinstance(param, click.Option) and param.name not in ("config", "quiet", "show_dashboard", "report",
                                                                      "help"):
                first = param.opts[0].removeprefix("--").replace("-", "_")
                assert first in keys, f"{name} --{first.replace('_', '-')} sets no key of the same name"


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
