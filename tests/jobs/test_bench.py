"""The throughput benchmark end to end on a handful of images: every program runs and is reported (no timings
are asserted: the machine is shared)."""
from __future__ import annotations

import json
from pathlib import Path

from segmill.jobs.bench import main


def test_bench_reports_every_program(dsb2018: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "bench.json"
    main(["--dataset", str(dsb2018 / "images"), "--limit", "3", "--size", "64", "--models",
          "lraspp_mobilenet_v3_large", "--native", "", "--workdir", str(tmp_path / "work"), "--output", str(out),
          "--dl-workers", "1", "--ray-actors", "1"])
    report = json.loads(out.read_text())
    (case,) = report["cases"]
    results = {r["name"]: r for r in case["results"]}
    assert set(results) == {"bare_loop", "dataloader", "ray_docs", "segmill"}
    for name, r in results.items():
        assert "failed" not in r, (name, r.get("failed"))
        assert r["images"] == 3 and r["images_per_second"] > 0 and r["peak_memory_bytes"] > 0, name
        assert r["stages"], name
    # Same weights, same images, fp32 (channels-last in segmill): the masks are the bare loop's, pixel for pixel.
    for name in ("dataloader", "ray_docs", "segmill"):
        assert results[name]["mask_agreement_vs_bare_loop"] == 1.0, name
    assert set(case["ratios"]) == {"segmill / bare_loop", "segmill / dataloader", "segmill / ray_docs"}
    assert report["cost_model"] and report["cost_model"][0]["bound_by"]
    assert "segmill / ray_docs" in capsys.readouterr().out
