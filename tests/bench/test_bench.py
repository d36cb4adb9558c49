"""The throughput benchmark end to end on a handful of images: every program runs and is reported (no timings
are asserted: the machine is shared)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from bench.throughput import main


def test_bench_reports_every_program(dsb2018: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "bench.json"
    main(["--dataset", str(dsb2018 / "images"), "--limit", "3", "--size", "64", "--models",
          "lraspp_mobilenet_v3_large", "--native", "", "--workdir", str(tmp_path / "work"), "--output", str(out),
          "--dl-workers", "1", "--ray-actors", "1", "--segmill-jobs", "2"])
    report = json.loads(out.read_text())
    (case,) = report["cases"]
    results = {r["name"]: r for r in case["results"]}
    assert set(results) == {"bare_loop", "dataloader", "dataloader[fast path]", "ray_docs", "segmill"}
    for name, r in results.items():
        assert "failed" not in r, (name, r.get("failed"))
        assert r["images"] == 3 and r["images_per_second"] > 0 and r["peak_memory_bytes"] > 0, name
        assert r["stages"], name
        # The breakdown at the peak adds up to the peak; the CPU seconds name the processes that used them.
        assert sum(r["peak_memory_by_process"].values()) == r["peak_memory_bytes"], name
        assert sum(r["cpu_seconds_by_process"].values()) > 0, name
        assert 0 <= r["peak_shared_memory_bytes"] <= r["peak_memory_bytes"], name
        assert max(r["peak_memory_by_quarter_bytes"]) == r["peak_memory_bytes"], name
    # On one node segmill's model runs in a warm host (pipeline/bulk/pool.py), whose own work is its model stage.
    assert any(kind.startswith("ray::ModelHost") for kind in results["segmill"]["cpu_seconds_by_process"])
    assert results["segmill"]["stages"]["ModelHost.segment"] > 0
    # Same weights, same images: the plain fp32 programs give the bare loop's masks pixel for pixel; with
    # BatchNorm folded (segmill's default, the fast-path DataLoader) sums change order, so to rounding.
    for name in ("dataloader", "ray_docs"):
        assert results[name]["mask_agreement_vs_bare_loop"] == 1.0, name
    for name in ("dataloader[fast path]", "segmill"):
        assert results[name]["mask_agreement_vs_bare_loop"] >= 0.9999, name
    plain = {"bare_loop", "dataloader", "dataloader[fast path]", "ray_docs"}
    assert set(case["ratios"]) == {f"segmill / {p}" for p in plain} | {f"segmill warm job / {p}" for p in plain}
    # The second job of the same process: Ray up and the model checked, so no child process loads it again.
    (warm,) = results["segmill"]["warm_images_per_second"]
    assert warm > 0 and case["ratios"]["segmill warm job / ray_docs"]["steady"] is None
    assert report["cost_model"] and report["cost_model"][0]["bound_by"]
    assert "segmill / ray_docs" in capsys.readouterr().out


def test_repeated_rounds_report_the_median_run_and_keep_every_rate() -> None:
    from bench.throughput import _median_run

    runs = [{"name": "x", "images_per_second": total, "steady_images_per_second": steady, "peak_memory_bytes": 1}
            for total, steady in ((5.0, 9.0), (4.0, 7.0), (4.5, 8.0))]
    median = _median_run(runs)
    assert (median["images_per_second"], median["steady_images_per_second"]) == (4.5, 8.0)
    assert [r["steady_images_per_second"] for r in median["runs"]] == [9.0, 7.0, 8.0]
    assert _median_run([{"name": "x", "failed": ["boom"]}])["failed"] == ["boom"]


def test_memory_peaks_by_part_split_the_run_into_equal_spans() -> None:
    from bench.data import TreeMemory

    memory = TreeMemory(pid=0)
    memory.timeline = [(0.0, 5), (1.0, 9), (2.5, 4), (3.0, 7), (5.9, 6), (6.5, 3), (8.0, 2)]
    assert memory.peaks_by_part(4) == [9, 7, 6, 3]  # spans of 2 s; the last sample falls in the last span
    assert TreeMemory(pid=0).peaks_by_part(4) == []


def test_the_hard_class_table_gives_mean_and_spread_over_seeds() -> None:
    from bench.hard_classes import summarise

    def run(method: str, seed: int, miou: float, pole: float) -> dict:
        return {"method": method, "seed": seed, "miou": miou, "iou": {"road": 0.9, "pole": pole}, "best_miou": miou,
                "train_share": {"road": 0.9, "pole": 0.1}, "epochs": 3, "epoch_images": 10, "seconds": 60.0, "samples_per_second": 9.0}

    table = summarise([run("baseline", 0, 0.40, 0.1), run("baseline", 1, 0.44, 0.2), run("hard_crops", 0, 0.5, 0.4)],
                      ("road", "pole"), ("pole",))
    lines = table.splitlines()
    assert lines[0] == "| | baseline | hard_crops |"
    assert "| **mIoU** | **0.420 (0.400-0.440)** | **0.500** |" in lines
    assert "| pole (hard) | 0.150 (0.100-0.200) | 0.400 |" in lines
    assert "| seeds | 0,1 | 0 |" in lines


def test_busy_cores_take_their_cores_and_stop_with_the_benchmark(tmp_path: Path) -> None:
    """The contention option's burners really take a core while a program runs, stop when told, and stop by
    themselves when the benchmark that started them dies without telling them."""
    import subprocess
    import sys
    import time

    import psutil

    from bench.burner import BusyCores

    with BusyCores(1) as busy:
        pids = [p.pid for p in busy.processes]
        time.sleep(1.5)
        used = busy.cpu_seconds()
    assert used >= 0.3, used  # a spinning process gets a good share of a core even on a loaded machine
    assert not any(psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE for pid in pids)

    # A benchmark killed mid-run: its burner notices the new parent and exits.
    pid_file = tmp_path / "pid"
    code = ("import os, sys, time; from bench.burner import BusyCores; b = BusyCores(1).__enter__(); "
            f"open({str(pid_file)!r}, 'w').write(str(b.processes[0].pid)); os._exit(0)")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[2])
    orphan = int(pid_file.read_text())
    deadline = time.monotonic() + 10
    try:
        while psutil.pid_exists(orphan) and psutil.Process(orphan).status() != psutil.STATUS_ZOMBIE:
            assert time.monotonic() < deadline, "the burner outlived the benchmark that started it"
            time.sleep(0.1)
    finally:  # never leave a spinning process behind, even when the check fails
        try:
            psutil.Process(orphan).kill()
        except psutil.Error:
            pass


def test_a_program_runs_with_the_environment_it_is_given(dsb2018: Path, tmp_path: Path) -> None:
    """`--also-segmill-env` rows: the variables reach that program's process only, and the report says what it saw."""
    from bench.data import make_checkpoint, prepare_folder
    from bench.throughput import run_program

    images = prepare_folder(str(dsb2018 / "images"), tmp_path / "images", limit=2, size=32)
    checkpoint = make_checkpoint("lraspp_mobilenet_v3_large", tmp_path / "model.pt")
    options = {"env": {"SEGMILL_BENCH_PROBE": "on"}}
    result = run_program("bare", "bare_loop", images, checkpoint, str(tmp_path / "out"), options)
    assert "failed" not in result, result.get("failed")
    assert result["env"] == {"SEGMILL_BENCH_PROBE": "on"} and result["images"] == 2
    assert "SEGMILL_BENCH_PROBE" not in os.environ and options == {"env": {"SEGMILL_BENCH_PROBE": "on"}}


def test_a_malformed_environment_is_refused_before_any_program_runs(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="--also-segmill-env 'RAY_x' is not NAME=VALUE"):
        main(["--dataset", str(tmp_path), "--models", "lraspp_mobilenet_v3_large", "--native", "", "--workdir",
              str(tmp_path / "work"), "--output", str(tmp_path / "bench.json"), "--also-segmill-env", "RAY_x"])
    assert not (tmp_path / "work").exists() and not (tmp_path / "bench.json").exists()
