"""Hard-class bootstrapping, measured: the same model trained without and with it, per-class IoU side by side.

    python -m bench.bootstrap_experiment [--scenes 200] [--epochs 12] [--factor 3]   (or: make experiment)

The runs go through the real retraining job (Ray Train, MLflow on SQLite in a temporary folder):
1. a baseline without bootstrapping, registered as the first champion;
2. the same recipe with `hard_classes=auto`: the job takes the champion's lowest-IoU classes from its MLflow
   evaluation and repeats the images that hold them `factor` times per epoch; it runs fewer (longer) epochs,
   so both runs see the same number of samples.
Both are scored on held-out generated scenes (another seed) at native size.
"""
from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import torch

from segmill.models.checkpoint import load_checkpoint
from segmill.models.metrics import SegmentationMetrics
from segmill.models.spec import DEFAULT_IGNORE_INDEX
from segmill.pipeline.common.model_source import resolve_model
from segmill.pipeline.common.scenes import SCENE_CLASSES, write_scenes
from segmill.pipeline.train.bootstrap import bootstrap_summary
from segmill.pipeline.train.config import TrainConfig
from segmill.pipeline.train.data import load_sets
from segmill.pipeline.train.driver import resolve_hard_classes, train
from segmill.pipeline.train.validate import confusion_on_pairs

MODEL = "bootstrap-experiment"


def run(scenes: int, test_scenes: int, epochs: int, factor: int, workers: int, crop: int, seed: int,
        ohem: float | None) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        write_scenes(str(root / "train"), scenes, seed=seed)
        write_scenes(str(root / "test"), test_scenes, seed=seed + 1000)
        base = dict(images=str(root / "train" / "images"), labels=str(root / "train" / "labels"),
                    classes=str(root / "train" / "classes.yaml"), model="unet",
                    arch_kwargs={"base_channels": 16, "depth": 3}, epochs=epochs, batch_size=8, crop_size=crop,
                    lr=0.05, scale_min=0.75, scale_max=1.25, workers=workers, cpus_per_worker=1 / workers,
                    storage_path=str(root / "runs"), tracking_uri=f"sqlite:///{root}/mlflow.db", register=MODEL,
                    seed=seed, overlays=0)
        test_pairs = sorted(zip(map(str, sorted((root / "test" / "images").iterdir())),
                                map(str, sorted((root / "test" / "labels").iterdir()))))
        rows = {}
        bootstrapping = {"hard_classes": "auto", "bootstrap_factor": factor}
        variants = {"without": {}, "with": bootstrapping}
        if ohem:
            variants.update({"ohem": {"ohem_fraction": ohem}, "with+ohem": {**bootstrapping, "ohem_fraction": ohem}})
        for name, extra in variants.items():
            # the baseline stays champion (huge margin), so every variant's `auto` reads the same evaluation
            config = TrainConfig(**base, **extra, run_name=name.replace("+", "-"), champion_margin=0.0 if not extra else 1.0)
            if "hard_classes" in extra:
                config = config.replace(epochs=_epochs_for_same_samples(config, epochs))
            started = time.time()
            outcome = train(config)
            seconds = time.time() - started
            resolved = resolve_model(f"models:/{MODEL}/{outcome.model_version}", tracking_uri=base["tracking_uri"])
            model, spec = load_checkpoint(resolved.checkpoint)
            confusion, _ = confusion_on_pairs(model, spec, test_pairs, device=torch.device("cpu"), endpoint_url=None)
            metrics = SegmentationMetrics.from_confusion(confusion)
            rows[name] = {"iou": dict(zip(SCENE_CLASSES, metrics.iou.tolist())), "miou": metrics.mean_iou,
                          "hard_classes": outcome.hard_classes, "epoch_images": outcome.bootstrap["epoch_images"],
                          "hard_share": outcome.bootstrap["hard_share_after"],
                          "hard_share_before": outcome.bootstrap["hard_share_before"], "seconds": round(seconds),
                          "epochs": config.epochs, "samples": config.epochs * outcome.bootstrap["epoch_images"],
                          "registered_as": "champion" if outcome.champion else "challenger"}
        return {"scenes": scenes, "test_scenes": test_scenes, "epochs": epochs, "factor": factor, "ohem": ohem,
                "runs": rows}


def _epochs_for_same_samples(config: TrainConfig, baseline_epochs: int) -> int:
    """Fewer, longer epochs for the bootstrapped run, so both runs take the same number of SGD steps: the
    comparison then isolates what the model sees, not how long it trains."""
    hard, _ = resolve_hard_classes(config, SCENE_CLASSES, config.resolved_tracking_uri())
    train_set, _ = load_sets(config.images, config.labels, None, None, config.val_fraction, len(SCENE_CLASSES),
                             endpoint_url=None, ignore_index=DEFAULT_IGNORE_INDEX)
    summary = bootstrap_summary(train_set.index, [SCENE_CLASSES.index(c) for c in hard], config.bootstrap_factor)
    return max(1, round(baseline_epochs * summary["images"] / summary["epoch_images"]))


def markdown(result: dict) -> str:
    runs, names = result["runs"], list(result["runs"])
    titles = {"without": "without", "with": f"bootstrapping (K={result['factor']})",
              "ohem": f"OHEM {result['ohem']}", "with+ohem": "bootstrapping + OHEM"}
    lines = ["| class | " + " | ".join(titles[n] for n in names) + " |", "| --- |" + " ---: |" * len(names)]
    hard = runs["with"]["hard_classes"]
    for name in SCENE_CLASSES:
        lines.append(f"| {name}{' (hard)' if name in hard else ''} | "
                     + " | ".join(_f(runs[n]["iou"][name]) for n in names) + " |")
    lines.append("| **mIoU** | " + " | ".join(f"**{_f(runs[n]['miou'])}**" for n in names) + " |")
    lines.append("| images per epoch (hard-class share) | "
                 + " | ".join(f"{runs[n]['epoch_images']} ({_share(runs, n):.2f})" for n in names) + " |")
    lines.append("| epochs x images = samples | "
                 + " | ".join(f"{runs[n]['epochs']} x {runs[n]['epoch_images']} = {runs[n]['samples']}" for n in names) + " |")
    return "\n".join(lines)


def _share(runs: dict, name: str) -> float:
    """Share of an epoch's images holding a hard class; runs without bootstrapping see the set's own share."""
    return runs[name]["hard_share"] if runs[name]["hard_classes"] else runs["with"]["hard_share_before"]


def _f(value: float, sign: bool = False) -> str:
    return "n/a" if value is None or math.isnan(value) else (f"{value:+.3f}" if sign else f"{value:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scenes", type=int, default=200)
    parser.add_argument("--test-scenes", type=int, default=60)
    parser.add_argument("--epochs", type=int, default=20, help="Baseline epochs; the bootstrapped run gets the same samples.")
    parser.add_argument("--factor", type=int, default=3)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--crop", type=int, default=96)
    parser.add_argument("--ohem", type=float, default=None, help="Also run OHEM alone and with bootstrapping.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="Also write the figures here.")
    args = parser.parse_args()
    result = run(args.scenes, args.test_scenes, args.epochs, args.factor, args.workers, args.crop, args.seed, args.ohem)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    print(markdown(result))
    print(f"\nhard classes picked from the baseline champion's evaluation: {result['runs']['with']['hard_classes']}; "
          "training seconds: " + ", ".join(f"{n} {r['seconds']}" for n, r in result["runs"].items()))


if __name__ == "__main__":
    main()
