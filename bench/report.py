"""Printing the throughput benchmark, the machine it ran on, and the cost model drawn from segmill's stage times."""
from __future__ import annotations

import os
import platform
from typing import Any


def system_info() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"cpus": os.cpu_count(), "machine": platform.processor() or platform.machine(),
                            "python": platform.python_version(), "torch": torch.__version__,
                            "load_average_at_start": os.getloadavg()[0]}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        import ray

        info["ray"] = ray.__version__
    except ImportError:
        pass
    return info


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f}"


def print_case(case: dict[str, Any]) -> None:
    busy = f", beside {case['busy_cores']} busy core(s)" if case.get("busy_cores") else ""
    print(f"\n== {case['case']} ({case['images']}{busy})")
    print(f"{'program':<34}{'img/s':>8}{'steady':>8}{'peak GB':>9}{'procs':>6}  {'agree':>7}  stages (s, summed over workers)")
    for r in case["results"]:
        if "failed" in r:
            print(f"{r['name']:<34}{'failed':>8}  {' '.join(r['failed'])[:150]}")
            continue
        agree = next((v for k, v in r.items() if k.startswith("mask_agreement_vs_")), None)
        stages = ", ".join(f"{k} {v:.1f}" for k, v in r["stages"].items())
        gpu = f" gpu {r['gpu_utilisation_mean']:.0f}%" if "gpu_utilisation_mean" in r else ""
        agree_text = "-" if agree is None else f"{100 * agree:.3f}%"
        print(f"{r['name']:<34}{r['images_per_second']:>8.2f}{r['steady_images_per_second']:>8.2f}{_gb(r['peak_memory_bytes']):>9}"
              f"{r['peak_processes']:>6}  {agree_text:>7}  {stages}{gpu}")
    for r in case["results"]:
        if len(r.get("runs", [])) > 1:
            rates = ", ".join(f"{run['images_per_second'] or 0:.2f}/{run['steady_images_per_second'] or 0:.2f}"
                              for run in r["runs"] if run.get("images_per_second"))
            print(f"  every round, {r['name']} (total/steady img/s): {rates}")
        top = list(r.get("peak_memory_by_process", {}).items())[:5]
        if top:
            shared = f" (shared memory, e.g. Ray's object store: {_gb(r.get('peak_shared_memory_bytes', 0))})"
            print(f"  memory at peak{shared}, {r['name']}: " + ", ".join(f"{kind} {_gb(size)}" for kind, size in top))
        quarters = r.get("peak_memory_by_quarter_bytes")
        if quarters:
            print(f"  peak memory in each quarter of the run (GB), {r['name']}: " + ", ".join(_gb(q) for q in quarters))
        busiest = list(r.get("cpu_seconds_by_process", {}).items())[:5]
        if busiest:
            print(f"  CPU seconds, {r['name']}: " + ", ".join(f"{kind} {seconds:.1f}" for kind, seconds in busiest))
        if r.get("warm_images_per_second"):
            print(f"  later jobs in the same process, {r['name']} (total img/s): "
                  + ", ".join(f"{rate:.2f}" for rate in r["warm_images_per_second"]))
    for name, ratio in case["ratios"].items():
        steady = "" if ratio["steady"] is None else f", {ratio['steady']:.2f}x steady"
        print(f"  ratio {name}: {ratio['total']:.2f}x total{steady}")


def cost_model(cases: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per segmill run: seconds per image in each stage, images/s one model actor sustains, and the stage that
    bounds the job (the smallest ceiling: model actors in parallel, every other stage on every CPU)."""
    rows = []
    cpus = os.cpu_count() or 1
    for case in cases:
        for r in case["results"]:
            if r.get("program") != "segmill" or "failed" in r or not r["images"]:
                continue
            per_image = {stage: seconds / r["images"] for stage, seconds in r["stages"].items()}
            actors = r["settings"].get("actors_max") or 1
            # An actor running several batches at once sums their task times: its rate is that many times 1/time.
            concurrent = r["settings"].get("concurrent_batches") or 1
            ceilings = {}
            for stage, seconds in per_image.items():
                if seconds > 0:
                    ceilings[stage] = (actors * concurrent if _is_model(stage) else cpus) / seconds
            model = next((s for s in per_image if _is_model(s)), None)
            row = {"case": case["case"], "name": r["name"], "seconds_per_image": per_image,
                   "model_images_per_second_per_actor": concurrent / per_image[model] if model and per_image[model]
                   else None,
                   "ceilings_images_per_second": ceilings,
                   "bound_by": min(ceilings, key=ceilings.get) if ceilings else None,
                   "measured_images_per_second": r["images_per_second"]}
            rows.append(row)
            print(f"cost model, {case['case']}, {r['name']}: one model actor {row['model_images_per_second_per_actor'] or 0:.2f}"
                  f" img/s; bound by {row['bound_by']}; ceilings "
                  + ", ".join(f"{k} {v:.1f}" for k, v in ceilings.items()))
    return rows


def _is_model(stage: str) -> bool:
    """The model's own stage: Ray Data's model actors, or the warm hosts (the tasks that feed them only wait)."""
    return "Segmenter" in stage or "ModelHost" in stage
