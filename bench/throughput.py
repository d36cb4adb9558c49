"""Throughput benchmark: segmill's bulk job against a bare loop, a tuned DataLoader program and Ray's documented
batch-inference pattern, on the same images, weights and output (uint8 masks as PNG in Parquet).

    python -m bench.throughput                        # what `make bench` runs (from the repository's root)
    python -m bench.throughput --synthetic 1000,10000 --synthetic-side 64 --programs segmill
    python -m bench.throughput --busy-cores 1         # every program beside one core kept busy (bench/burner.py)

Each program runs in its own process; its peak memory is the summed PSS of that process and all it starts.
Prints images/s, the ratios of segmill to each program, peak memory and seconds per stage; writes JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SHARED_DSB = ROOT.parent / "shared" / "datasets" / "dsb2018" / "images"  # ../shared beside the repository
DEFAULT_MODELS = "deeplabv3_mobilenet_v3_large,lraspp_mobilenet_v3_large"
ALL_PROGRAMS = "bare_loop,dataloader,ray_docs,segmill"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.throughput", description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default=str(SHARED_DSB), help="folder of real images")
    p.add_argument("--models", default=DEFAULT_MODELS, help="registry names, comma-separated")
    p.add_argument("--size", type=int, default=512, help="side the images are resized to for the common comparison")
    p.add_argument("--limit", type=int, default=200, help="images taken from --dataset (0: all)")
    p.add_argument("--programs", default=ALL_PROGRAMS, help="comma-separated subset of " + ALL_PROGRAMS)
    p.add_argument("--native", default="deeplabv3_mobilenet_v3_large",
                   help="models also run at native resolution by the programs that can ('' for none)")
    p.add_argument("--synthetic", default="", help="image counts of synthetic scaling runs, e.g. 1000,10000")
    p.add_argument("--synthetic-side", type=int, default=64)
    p.add_argument("--synthetic-model", default="lraspp_mobilenet_v3_large")
    p.add_argument("--segmill", action="append", default=[], metavar="KEY=VALUE",
                   help="a ResourceConfig field for segmill's runs (repeatable), e.g. precision=bf16")
    p.add_argument("--also-segmill", action="append", default=[], metavar="KEY=VALUE[,KEY=VALUE]",
                   help="an extra segmill row with these ResourceConfig fields, e.g. precision=bf16")
    p.add_argument("--also-segmill-env", action="append", default=[], metavar="NAME=VALUE[,NAME=VALUE]",
                   help="an extra segmill row run with these environment variables, e.g. Ray's settings "
                        "RAY_task_events_report_interval_ms=0")
    p.add_argument("--dl-threads", type=int, default=2)
    p.add_argument("--dl-workers", type=int, default=1)
    p.add_argument("--dl-batch", type=int, default=1)
    p.add_argument("--dl-fast-path", action=argparse.BooleanOptionalAction, default=True,
                   help="also run the DataLoader program with segmill's CPU model optimisations")
    p.add_argument("--ray-actors", type=int, default=2)
    p.add_argument("--ray-cpus", type=float, default=0.5)
    p.add_argument("--ray-batch", type=int, default=4)
    p.add_argument("--segmill-jobs", type=int, default=1,
                   help="jobs segmill runs one after another in one process; the later ones are reported as warm")
    p.add_argument("--busy-cores", type=int, default=0,
                   help="cores kept busy by spinning processes while each program runs (contention on purpose)")
    p.add_argument("--repeat", type=int, default=1, help="rounds of every program; the median run is reported")
    p.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "segmill-bench"))
    p.add_argument("--output", default=".segmill/bench/bench.json", help="where the JSON report goes")
    p.add_argument("--child", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _fields(items: list[str]) -> dict[str, Any]:
    """KEY=VALUE strings as ResourceConfig fields (numbers, booleans and strings)."""
    fields: dict[str, Any] = {}
    for item in (part for entry in items for part in entry.split(",") if part):
        key, _, raw = item.partition("=")
        value: Any = {"true": True, "false": False}.get(raw.lower(), raw)
        if isinstance(value, str):
            try:
                value = int(raw) if raw.lstrip("-").isdigit() else float(raw)
            except ValueError:
                pass
        fields[key.strip()] = value
    return fields


def _environment(entry: str) -> dict[str, str]:
    """NAME=VALUE[,NAME=VALUE] as environment variables for one program's process."""
    env = {}
    for item in (part for part in entry.split(",") if part):
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            sys.exit(f"bench: --also-segmill-env {entry!r} is not NAME=VALUE[,NAME=VALUE].")
        env[name.strip()] = value
    return env


def run_program(name: str, program: str, images: str, checkpoint: str, output: str, options: dict,
                busy_cores: int = 0) -> dict:
    """Run one program in a fresh process, beside `busy_cores` spinning ones; its result plus the peak summed
    memory of its process tree (the spinning processes are not in it). `options["env"]`, if given, are environment
    variables set for that process only."""
    from bench.burner import BusyCores
    from bench.data import TreeMemory

    result_file = Path(output + ".result.json")
    options = dict(options)
    extra_env = options.pop("env", None) or {}
    spec = dict(program=program, images=images, checkpoint=checkpoint, output=output, options=options,
                result=str(result_file), env=sorted(extra_env))
    # The child finds `bench` as this process did, from wherever the benchmark was started.
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "SEGMILL_PROGRESS": "0", "PYTHONPATH": path, **extra_env}
    with BusyCores(busy_cores) as busy:
        started = time.perf_counter()
        process = subprocess.Popen([sys.executable, "-m", "bench.throughput", "--child", json.dumps(spec)], env=env,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        with TreeMemory(process.pid) as memory:
            _, stderr = process.communicate()
        busy_seconds = busy.cpu_seconds()
    if process.returncode or not result_file.exists():
        return {"name": name, "program": program, "failed": stderr.strip().splitlines()[-1:] or ["no result"]}
    result = json.loads(result_file.read_text())
    result.update(name=name, program=program, wall_seconds=time.perf_counter() - started,
                  images_per_second=result["images"] / result["seconds"],
                  steady_images_per_second=result["images"] / (result.get("steady_seconds") or result["seconds"]),
                  warm_images_per_second=[result["images"] / s for s in result.get("warm_seconds", [])] or None,
                  peak_memory_bytes=memory.peak,
                  peak_processes=memory.peak_processes, peak_memory_by_process=memory.peak_by_process,
                  cpu_seconds_by_process=memory.cpu_by_process, peak_shared_memory_bytes=memory.peak_shared,
                  peak_memory_by_quarter_bytes=memory.peaks_by_part(4))
    if busy_cores:
        result["busy_cores"] = busy_cores
        result["busy_cores_used"] = busy_seconds / result["wall_seconds"]  # cores the burners really took
    if memory.gpu_util:
        result["gpu_utilisation_mean"] = sum(memory.gpu_util) / len(memory.gpu_util)
    return result


def _child(spec_json: str) -> None:
    from bench.programs import PROGRAMS

    spec = json.loads(spec_json)
    import shutil

    shutil.rmtree(spec["output"], ignore_errors=True)
    result = PROGRAMS[spec["program"]](spec["images"], spec["checkpoint"], spec["output"], **spec["options"])
    if spec.get("env"):  # as the program's process saw them
        result["env"] = {name: os.environ.get(name) for name in spec["env"]}
    Path(spec["result"]).write_text(json.dumps(result))


def mask_agreement(reference: str, other: str) -> float | None:
    """Share of pixels equal between two programs' masks, matched by file name (None if nothing matches)."""
    import pyarrow.dataset as pads

    from segmill.pipeline.common.images import decode_png

    def masks(output: str) -> dict[str, bytes]:
        parts = sorted(str(p) for p in Path(output).rglob("*.parquet") if "_staging" not in str(p))
        table = pads.dataset(parts, format="parquet").to_table(columns=["image_uri", "mask"]) if parts else None
        if table is None:
            return {}
        return {Path(u).name: m for u, m in zip(table["image_uri"].to_pylist(), table["mask"].to_pylist()) if m}

    ref, oth = masks(reference), masks(other)
    equal = total = 0
    for key in ref.keys() & oth.keys():
        a, b = decode_png(ref[key]), decode_png(oth[key])
        total += a.size
        if a.shape == b.shape:  # a mask of another size agrees on no pixel
            equal += int((a == b).sum())
    return equal / total if total else None


def _median_run(runs: list[dict]) -> dict:
    """The run with the median steady rate, with every run's rates beside it (a noisy machine's spread)."""
    ran = [r for r in runs if "failed" not in r]
    if not ran:
        return runs[-1]
    ran.sort(key=lambda r: r["steady_images_per_second"])
    median = dict(ran[(len(ran) - 1) // 2])
    if len(runs) > 1:
        median["runs"] = [{k: r.get(k) for k in ("images_per_second", "steady_images_per_second", "peak_memory_bytes",
                                                 "warm_images_per_second")}
                          for r in runs]
    return median


def run_case(case: str, images: str, checkpoint: str, programs: list[tuple[str, str, dict]], work: Path,
             repeat: int = 1, busy_cores: int = 0) -> dict:
    """Every program on one image folder, `repeat` rounds taken in turn (so slow spells of a shared machine fall
    on every program); per program the median run, ratios of segmill to each, mask agreement with the first."""
    runs: dict[str, list[dict]] = {name: [] for name, _, _ in programs}
    for round_ in range(repeat):
        for name, program, options in programs:
            print(f"  {case}: {name} ..." + (f" (round {round_ + 1} of {repeat})" if repeat > 1 else ""), flush=True)
            runs[name].append(run_program(name, program, images, checkpoint, str(work / case / name), options,
                                          busy_cores))
    results = [_median_run(runs[name]) for name, _, _ in programs]
    ran = [r for r in results if "failed" not in r]
    if ran:
        for r in ran[1:]:
            r["mask_agreement_vs_" + ran[0]["name"]] = mask_agreement(str(work / case / ran[0]["name"]),
                                                                      str(work / case / r["name"]))
    ratios = {f"{s['name']} / {r['name']}": {"total": s["images_per_second"] / r["images_per_second"],
                                              "steady": s["steady_images_per_second"] / r["steady_images_per_second"]}
              for s in ran if s["program"] == "segmill" for r in ran if r["program"] != "segmill"}
    for s in ran:  # a later job of the same process: Ray up, model checked (its steady rate is the first job's)
        if s["program"] == "segmill" and s.get("warm_images_per_second"):
            warm = sorted(s["warm_images_per_second"])[(len(s["warm_images_per_second"]) - 1) // 2]
            ratios.update({f"{s['name']} warm job / {r['name']}": {"total": warm / r["images_per_second"],
                                                                  "steady": None}
                           for r in ran if r["program"] != "segmill"})
    return {"case": case, "images": images, "checkpoint": checkpoint, "busy_cores": busy_cores, "results": results,
            "ratios": ratios}


def _save(report: dict, output: str) -> None:
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    Path(output).write_text(json.dumps(report, indent=2))


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.child:
        _child(args.child)
        return {}
    from bench.data import make_checkpoint, prepare_folder, synthetic_folder
    from bench.report import cost_model, print_case, system_info

    work = Path(args.workdir)
    if (args.models or args.synthetic) and not Path(args.dataset).is_dir():
        sys.exit(f"bench: --dataset {args.dataset} is not a folder (DSB2018's images are in "
                 "shared/datasets/dsb2018/images beside the repository).")
    wanted = [p for p in args.programs.split(",") if p]
    segmill_fields = _fields(args.segmill)
    options = {"bare_loop": {}, "ray_docs": dict(size=args.size, actors=args.ray_actors, cpus_per_actor=args.ray_cpus,
                                                  batch_size=args.ray_batch),
               "dataloader": dict(threads=args.dl_threads, workers=args.dl_workers, batch_size=args.dl_batch),
               "segmill": dict(resources=segmill_fields, jobs=args.segmill_jobs)}
    lineup = [(p, p, options[p]) for p in wanted]
    if "dataloader" in wanted and args.dl_fast_path:
        lineup.insert(wanted.index("dataloader") + 1,
                      ("dataloader[fast path]", "dataloader", {**options["dataloader"], "fast_path": True}))
    if "segmill" in wanted:
        for extra in args.also_segmill:
            lineup.append((f"segmill[{extra}]", "segmill", dict(resources={**segmill_fields, **_fields([extra])},
                                                                 jobs=args.segmill_jobs)))
        for extra in args.also_segmill_env:
            lineup.append((f"segmill[env {extra}]", "segmill", dict(resources=segmill_fields, jobs=args.segmill_jobs,
                                                                    env=_environment(extra))))
    report: dict[str, Any] = {"command": " ".join(["python -m bench.throughput", *(argv or sys.argv[1:])]),
                              "system": system_info(), "cases": []}
    for arch in [m for m in args.models.split(",") if m]:
        checkpoint = make_checkpoint(arch, work / "checkpoints" / f"{arch}.pt")
        resized = prepare_folder(args.dataset, work / f"dsb-{args.size}-{args.limit}", limit=args.limit, size=args.size)
        cases = [(f"{arch} @ {args.size}x{args.size}", resized, lineup)]
        if arch in args.native.split(","):
            native = prepare_folder(args.dataset, work / f"dsb-native-{args.limit}", limit=args.limit, size=None)
            cases.append((f"{arch} @ native sizes", native, [row for row in lineup if row[1] != "ray_docs"]))
        for case, folder, rows in cases:
            report["cases"].append(run_case(case, folder, checkpoint, rows, work / "runs", args.repeat,
                                           args.busy_cores))
            print_case(report["cases"][-1])
            _save(report, args.output)  # after every case: a long run stopped early keeps what it measured
    for count in [int(c) for c in args.synthetic.split(",") if c]:
        folder = synthetic_folder(args.dataset, work / f"synthetic-{count}-{args.synthetic_side}", count=count,
                                  side=args.synthetic_side)
        checkpoint = make_checkpoint(args.synthetic_model, work / "checkpoints" / f"{args.synthetic_model}.pt")
        case = f"{args.synthetic_model} @ {count} synthetic {args.synthetic_side}x{args.synthetic_side}"
        report["cases"].append(run_case(case, folder, checkpoint, lineup, work / "runs", args.repeat,
                                           args.busy_cores))
        print_case(report["cases"][-1])
        _save(report, args.output)
    report["cost_model"] = cost_model(report["cases"])
    _save(report, args.output)
    print(f"\nwritten: {args.output}")
    return report


if __name__ == "__main__":
    main()
