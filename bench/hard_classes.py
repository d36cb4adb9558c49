"""Hard-class training measured on real road scenes (CamVid) or generated ones: each method against the baseline
at equal samples, over seeds, through the real retraining job (Ray Train, MLflow on SQLite in a temporary folder).

    python -m bench.hard_classes                        # what `make experiment` runs: CamVid, every method, 2 seeds
    python -m bench.hard_classes --methods baseline,hard_crops --seeds 0 --samples 3000 --data scenes

Every run uses the default recipe (`segmill train` with only images, labels, classes, model and epochs) plus its
method; the hard classes are named (CamVid's rare thin classes: Pole, SignSymbol, Pedestrian, Bicyclist). Scores
are the job's own validation at the last epoch on the held-out split (CamVid val at its native 360x480: logits
upsampled, labels never resized), so no epoch is picked on the data that scores it.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

DATASETS = Path(__file__).resolve().parents[2] / "shared" / "datasets"  # ../shared beside the repository
CAMVID_HARD = ("Pole", "SignSymbol", "Pedestrian", "Bicyclist")
SCENES_HARD = ("pole", "sign")
UNWEIGHTED = {"class_weighting": "none"}  # the training default weighs classes (inverse sqrt); the baseline does not
METHODS: dict[str, dict[str, Any]] = {
    "baseline": UNWEIGHTED,
    "presence": {"sampling": "presence", "bootstrap_factor": 2, **UNWEIGHTED},  # DeepLabv3's bootstrapping
    "pixel_mass": {"sampling": "pixel_mass", "bootstrap_factor": 2, **UNWEIGHTED},
    "hard_crops": {"sampling": "none", "hard_crop_share": 0.5, **UNWEIGHTED},
    "median_frequency": {"class_weighting": "median_frequency"},
    "inverse_sqrt": {"class_weighting": "inverse_sqrt_frequency"},  # the default recipe
    "ohem": {"ohem_fraction": 0.25, **UNWEIGHTED},
    "crops+inverse_sqrt": {"sampling": "none", "hard_crop_share": 0.5, "class_weighting": "inverse_sqrt_frequency"},
}
HARD_METHODS = {"presence", "pixel_mass", "hard_crops", "crops+inverse_sqrt"}  # the ones that need hard classes


def _data(name: str, root: Path, datasets: Path = DATASETS) -> tuple[dict[str, str], tuple[str, ...], tuple[str, ...]]:
    """Train/val locations, the class names and the hard classes of a data set."""
    if name == "camvid":
        camvid = datasets / "camvid"
        if not (camvid / "train" / "images").is_dir():
            raise SystemExit(f"CamVid is not at {camvid} (it lives beside the project, in ../shared/datasets).")
        import yaml

        names = tuple(c["name"] for c in yaml.safe_load((camvid / "classes.yaml").read_text())["classes"])
        return ({"images": str(camvid / "train" / "images"), "labels": str(camvid / "train" / "labels"),
                 "val_images": str(camvid / "val" / "images"), "val_labels": str(camvid / "val" / "labels"),
                 "classes": str(camvid / "classes.yaml")}, names, CAMVID_HARD)
    from segmill.pipeline.common.scenes import SCENE_CLASSES, write_scenes

    write_scenes(str(root / "train"), 200, seed=0)
    write_scenes(str(root / "val"), 60, seed=1000)
    return ({"images": str(root / "train" / "images"), "labels": str(root / "train" / "labels"),
             "val_images": str(root / "val" / "images"), "val_labels": str(root / "val" / "labels"),
             "classes": str(root / "train" / "classes.yaml")}, SCENE_CLASSES, SCENES_HARD)


def run_one(method: str, seed: int, samples: int, data: dict[str, str], hard: tuple[str, ...], root: Path,
            extra: dict[str, Any]) -> dict[str, Any]:
    """One training run; its figures at the last epoch (and at the best, which the job registers)."""
    import mlflow

    from segmill.pipeline.train.config import TrainConfig
    from segmill.pipeline.train.driver import train

    options = {**METHODS[method], **extra}
    if method in HARD_METHODS:
        options["hard_classes"] = ",".join(hard)
    base = TrainConfig(**data, storage_path=str(root / "runs"), tracking_uri=f"sqlite:///{root}/mlflow.db",
                       run_name=f"{method}-seed{seed}", seed=seed, overlays=0, **options)
    epoch_images = _epoch_images(base)
    config = base.replace(epochs=max(1, round(samples / epoch_images)))
    started = time.time()
    outcome = train(config)
    seconds = time.time() - started
    history = mlflow.MlflowClient(config.tracking_uri).get_run(outcome.run_id).data.metrics
    iou = {k.removeprefix("val_iou."): v for k, v in history.items() if k.startswith("val_iou.")}
    return {"method": method, "seed": seed, "epochs": config.epochs, "epoch_images": epoch_images,
            "samples": config.epochs * epoch_images, "miou": history["val_miou"], "iou": iou,
            "best_miou": outcome.val_miou, "best_epoch": outcome.best_epoch, "seconds": round(seconds, 1),
            "samples_per_second": history.get("train_samples_per_second"),
            "hard_crop_share": history.get("hard_crop_share"), "sampling": outcome.bootstrap["sampling"],
            "train_share": {k.removeprefix("train_share."): v for k, v in history.items()
                            if k.startswith("train_share.")},
            "dataset_share": outcome.bootstrap["dataset_share"],
            "hard_share": outcome.bootstrap["hard_share_after"], "options": options}


def _epoch_images(config) -> int:
    """The epoch length the job will plan for this config (so every method gets the same number of samples)."""
    from segmill.pipeline.common.classes import load_class_file
    from segmill.pipeline.train.data import load_sets
    from segmill.pipeline.train.sampling import choose_sampling, class_stats, epoch_size

    classes = load_class_file(config.classes)
    train_set, _ = load_sets(config.images, config.labels, config.val_images, config.val_labels,
                             config.val_fraction, len(classes.names), endpoint_url=None,
                             ignore_index=classes.ignore_index)
    stats = class_stats(train_set.index, len(classes.names))
    named = config.named_hard_classes() or []
    hard_ids = [classes.names.index(n) for n in named]
    sampling, _ = choose_sampling(config.sampling, stats, hard_ids)
    return epoch_size(stats, hard_ids, sampling, config.bootstrap_factor)


def _class_names(name: str, datasets: Path) -> tuple[str, ...]:
    if name == "camvid":
        import yaml

        return tuple(c["name"] for c in yaml.safe_load((datasets / "camvid" / "classes.yaml").read_text())["classes"])
    from segmill.pipeline.common.scenes import SCENE_CLASSES

    return SCENE_CLASSES


def summarise(runs: list[dict[str, Any]], classes: tuple[str, ...], hard: tuple[str, ...]) -> str:
    """Markdown: per method, mean (spread) of mIoU, of the hard classes' mean IoU, per-class IoU, time, speed."""
    methods = list(dict.fromkeys(r["method"] for r in runs))
    by = {m: [r for r in runs if r["method"] == m] for m in methods}

    def cell(values: list[float]) -> str:
        values = [v for v in values if v is not None and not math.isnan(v)]
        if not values:
            return "n/a"
        spread = f" ({min(values):.3f}-{max(values):.3f})" if len(values) > 1 else ""
        return f"{statistics.mean(values):.3f}{spread}"

    def hard_mean(run: dict[str, Any]) -> float:
        return statistics.mean(run["iou"].get(c, 0.0) for c in hard)

    lines = ["| | " + " | ".join(methods) + " |", "|---|" + "---:|" * len(methods)]
    lines.append("| **mIoU** | " + " | ".join(f"**{cell([r['miou'] for r in by[m]])}**" for m in methods) + " |")
    lines.append("| **hard classes' mean IoU** | " + " | ".join(f"**{cell([hard_mean(r) for r in by[m]])}**"
                                                          for m in methods) + " |")
    for c in classes:
        lines.append(f"| {c}{' (hard)' if c in hard else ''} | "
                     + " | ".join(cell([r["iou"].get(c) for r in by[m]]) for m in methods) + " |")
    lines.append("| best-epoch mIoU (registered) | " + " | ".join(cell([r["best_miou"] for r in by[m]])
                                                             for m in methods) + " |")
    lines.append("| hard classes' share of trained pixels | " + " | ".join(
        cell([sum(r["train_share"].get(c, 0.0) for c in hard) for r in by[m]]) for m in methods) + " |")
    lines.append("| epochs x images | " + " | ".join(f"{by[m][0]['epochs']} x {by[m][0]['epoch_images']}"
                                                     for m in methods) + " |")
    lines.append("| run seconds | " + " | ".join(cell([r["seconds"] for r in by[m]]) for m in methods) + " |")
    lines.append("| train samples/s | " + " | ".join(cell([r["samples_per_second"] for r in by[m]])
                                                     for m in methods) + " |")
    lines.append("| seeds | " + " | ".join(",".join(str(r["seed"]) for r in by[m]) for m in methods) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.hard_classes", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", choices=("camvid", "scenes"), default="camvid")
    parser.add_argument("--datasets", type=Path, default=DATASETS, help="the folder holding camvid/")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, of {', '.join(METHODS)}")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--samples", type=int, default=8000, help="training samples per run (epochs follow)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                        help="a TrainConfig value for every run, e.g. crop_size=256 or precision='\"bf16\"'")
    parser.add_argument("--runs", help="explicit METHOD:SEED pairs in this order, e.g. the seeds that matter first: "
                                           "baseline:0,hard_crops:0,baseline:1 (instead of --methods x --seeds)")
    parser.add_argument("--json", type=Path, default=Path(".segmill/bench/hard_classes.json"))
    parser.add_argument("--table", type=Path, nargs="+", help="print the table of these saved JSON files (their "
                                                              "runs together) and exit")
    args = parser.parse_args(argv)
    if args.table:
        saved = [json.loads(path.read_text()) for path in args.table]
        names = _class_names(args.data, args.datasets)
        print(summarise([r for s in saved for r in s["runs"]], names, CAMVID_HARD if args.data == "camvid" else SCENES_HARD))
        return
    extra = {k: json.loads(v) for k, v in (item.split("=", 1) for item in args.set)}
    pairs = [(m, int(s)) for m, s in (item.rsplit(":", 1) for item in args.runs.split(","))] if args.runs else \
        [(m, int(s)) for s in args.seeds.split(",") for m in args.methods.split(",")]
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="segmill-hard-classes-") as folder:
        root = Path(folder)
        data, classes, hard = _data(args.data, root, args.datasets)
        for method, seed in pairs:  # one run per (method, seed), in the order asked; saved after each
            print(f"== {method}, seed {seed}", flush=True)
            runs.append(run_one(method, seed, args.samples, data, hard, root, extra))
            print(json.dumps({k: runs[-1][k] for k in ("miou", "best_miou", "seconds", "samples")}), flush=True)
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "runs": runs},
                                            indent=2, default=str))
    print(summarise(runs, classes, hard))


if __name__ == "__main__":
    main()
