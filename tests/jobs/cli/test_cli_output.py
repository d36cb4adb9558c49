"""What a person sees: progress while a job runs, a summary that answers the first questions, and nothing of Ray's
own logging unless -v. The end-to-end check runs the real `segmill` entry point in a subprocess (a pipe, so the
plain progress lines, not the live bar)."""
from __future__ import annotations

import io
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from rich.console import Console
from typer.testing import CliRunner

from segmill.jobs import progress
from segmill.jobs.cli import app
from segmill.pipeline.common.progress import Snapshot
from segmill.pipeline.train.config import TrainConfig

SEGMILL = str(Path(sys.executable).with_name("segmill"))
runner = CliRunner()


def test_segment_shows_progress_a_summary_and_no_library_lines(tmp_path: Path, tiny_checkpoint: str) -> None:
    from segmill.pipeline.common.scenes import write_scenes

    write_scenes(str(tmp_path / "s"), 6, seed=8)
    (tmp_path / "s" / "images" / "broken.png").write_bytes(b"not an image")
    out = tmp_path / "out"
    done = subprocess.run([SEGMILL, "segment", str(tmp_path / "s" / "images"), str(out), "--model", tiny_checkpoint,
                           "--labels", str(tmp_path / "s" / "labels"), "--dashboard"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert any(re.fullmatch(r"segment: 7/7 images \(6 ok, 1 errors\), [\d.]+ img/s, 0s left", line) for line in lines), lines
    assert any(re.match(r"job seg-[0-9a-f]{12}: 7 rows \(6 ok, 1 errors\), 7 segmented this run", line) for line in lines)
    assert "  errors: 1 x <image> is not a readable image file." in lines
    assert any(line.startswith("  with labels: mIoU ") and "pole" in line for line in lines)
    assert any(line.endswith(f"report: {out}/report.html") for line in lines) and (out / "report.html").is_file()
    assert lines[-1] == f"  next: segmill query {out} --answer errors"
    assert not any("\x1b[" in line for line in lines), "no colour codes in a pipe"
    # stderr: the dashboard's address and nothing else: no Ray, MLflow or deprecation lines, no C++ core lines.
    assert re.fullmatch(r"Ray dashboard: http://127\.0\.0\.1:\d+\n", done.stderr), done.stderr


def test_select_then_labels_import_from_the_command_line(tmp_path: Path, tiny_checkpoint: str) -> None:
    """The loop's first half as a person runs it: segment unlabelled images, pick what to label, take the labels
    (here the pre-labels, as a labeller who accepts them all) back in."""
    from segmill.pipeline.common.scenes import write_scenes

    write_scenes(str(tmp_path / "s"), 5, seed=9)
    out, batch, labels = tmp_path / "out", tmp_path / "batch", tmp_path / "labels"
    run = [SEGMILL, "segment", str(tmp_path / "s" / "images"), str(out), "--model", tiny_checkpoint, "--quiet"]
    assert subprocess.run(run, capture_output=True, text=True, timeout=300).returncode == 0
    done = subprocess.run([SEGMILL, "select", str(out), str(batch), "--n", "3", "--hard-classes", "pole,sign"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "selected 3 of 5 unlabelled images (balanced; hard classes: pole, sign from named)"
    assert re.match(r"  1\. .*scene_\d+\.png \(score [\d.]+: mean confidence [\d.]+", lines[1]), lines
    assert (batch / "manifest.csv").is_file() and (batch / "label-studio" / "tasks.json").is_file()
    imported = subprocess.run([SEGMILL, "labels", "import", str(batch / "cvat" / "prelabels.zip"), "--classes",
                               str(tmp_path / "s" / "classes.yaml"), "--output", str(labels)],
                              capture_output=True, text=True, timeout=120)
    assert imported.returncode == 0, imported.stderr
    assert imported.stdout.startswith(f"imported 3 labels into {labels} (labelled pixels: ")
    assert len(list(labels.glob("*.png"))) == 3
    wrong = subprocess.run([SEGMILL, "select", str(out), str(batch), "--strategy", "clever"], capture_output=True,
                           text=True, timeout=120)
    assert wrong.returncode == 2 and "Traceback" not in wrong.stderr
    assert "Strategy 'clever' is not known" in wrong.stderr


def _snapshot(counts=None, values=None, total=None, started=None, finished=False) -> Snapshot:
    return Snapshot(counts or {}, values or {}, total, started or time.time() - 10, finished)


def test_plain_progress_is_a_line_every_interval_and_one_at_the_end(monkeypatch) -> None:
    buffer = io.StringIO()
    console = Console(file=buffer, force_terminal=False, soft_wrap=True)
    with progress.ProgressView(console, progress.images, title="segment") as view:
        view(_snapshot({"ok": 3, "errors": 1}, total=10))  # within the interval: nothing yet
        assert buffer.getvalue() == ""
        monkeypatch.setattr(progress, "PLAIN_EVERY_S", 0.0)
        view(_snapshot({}, total=10))  # before the first image: what it is waiting for, not "0.0 img/s, ? left"
        view(_snapshot({"ok": 4, "errors": 1}, total=10))
        view(_snapshot({"ok": 9, "errors": 1}, total=10, finished=True))
    lines = buffer.getvalue().splitlines()
    assert lines[0] == "segment: 0/10 images, starting the model actors"
    assert lines[1].startswith("segment: 5/10 images (4 ok, 1 errors), 0.5 img/s, 10s left")
    assert lines[-1].startswith("segment: 10/10 images (9 ok, 1 errors), 1.0 img/s, 0s left")


def test_a_terminal_gets_a_live_bar_and_quiet_gets_nothing() -> None:
    buffer = io.StringIO()
    terminal = Console(file=buffer, force_terminal=True, width=120)
    with progress.ProgressView(terminal, progress.images, title="segment") as view:
        view(_snapshot({"ok": 5}, total=10))
    assert "segment" in buffer.getvalue() and "5/10 images" in buffer.getvalue() and "\x1b[" in buffer.getvalue()
    quiet = io.StringIO()
    with progress.ProgressView(Console(file=quiet), progress.images, title="segment", quiet=True) as view:
        view(_snapshot({"ok": 5}, total=10, finished=True))
    assert quiet.getvalue() == ""


def test_the_training_line_has_epoch_step_loss_lr_speed_eta_and_the_last_val_miou() -> None:
    now = time.time()
    values = {"epoch": 1, "epochs": 3, "step": 60, "first_step": 40, "first_step_at": now - 20, "loss": 0.5,
              "lr": 0.0012, "samples_per_second": 8.04, "val_miou": 0.3, "val_epoch": 0}
    done, line = progress.training(_snapshot(values=values, total=120, started=now - 300))
    # 20 steps in 20 s since the workers' first step: 60 to go is 1m00s, whatever the start-up took.
    assert done == 60
    assert line == "epoch 2/3, step 60/120, loss 0.500, lr 0.0012, 8.0 samples/s, 1m00s left, val mIoU 0.300 (epoch 1)"
    assert progress.training(_snapshot(total=120))[1] == "starting the workers"


def test_one_spec_runs_with_its_own_command_and_is_refused_by_another(tmp_path: Path) -> None:
    spec = tmp_path / "train.yaml"
    spec.write_text(yaml.safe_dump({"kind": "train", "images": "i", "labels": "l", "classes": "c.yaml",
                                    "storage_path": str(tmp_path / "runs")}))
    assert TrainConfig.from_yaml(str(spec)).images == "i"  # what `train --config` and `submit` both read
    wrong = runner.invoke(app, ["segment", "--config", str(spec)])
    assert wrong.exit_code == 2
    assert f"segment job spec {spec} is a 'train' spec, not a 'segment' one" in wrong.output


@pytest.mark.parametrize("flag", ["--storage-path", "--storage"])
def test_renamed_flags_keep_their_old_spelling(flag: str, tmp_path: Path) -> None:
    result = runner.invoke(app, ["train", "--images", str(tmp_path / "none"), "--labels", "l", "--classes", "c",
                                 flag, str(tmp_path / "runs"), "--tracking-uri", "http://127.0.0.1:9/"])
    assert result.exit_code == 2 and "No such option" not in result.output, result.output
