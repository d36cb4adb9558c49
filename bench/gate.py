"""The champion gate measured: how often it promotes noise, and whether it promotes a clearly better model.

    python -m bench.gate                                   # CamVid, what docs/retraining.md quotes
    python -m bench.gate --data scenes --samples 400 --seeds 3

Trains `seeds` models of one recipe that differ only in their seed, and one more with `better` times the samples;
scores every validation image with each (per-image confusion counts, as the training job's gate does); then gates
every ordered pair of same-recipe models against each other (any promotion is a false one) and the longer-trained
model against each of them (a promotion is expected). Each gating is decided twice, side by side: by segmill's gate
(the paired bootstrap's lower bound above the margin, no class losing more than the set drop) and by the old one
(promote on any gain of the point estimate).
"""
from __future__ import annotations

import argparse
import itertools
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.hard_classes import DATASETS, _data


def _train(data: dict[str, str], root: Path, seed: int, samples: int, extra: dict) -> tuple[bytes, float]:
    from bench.hard_classes import _epoch_images
    from segmill.pipeline.train.config import TrainConfig
    from segmill.pipeline.train.driver import train

    base = TrainConfig(**data, storage_path=str(root / "runs"), tracking_uri=f"sqlite:///{root}/mlflow.db",
                       run_name=f"gate-seed{seed}-{samples}", seed=seed, overlays=0, **extra)
    config = base.replace(epochs=max(1, round(samples / _epoch_images(base))))
    outcome = train(config)
    return outcome.checkpoint_bytes, outcome.val_miou


def _counts(checkpoint: bytes, data: dict[str, str]) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    import torch

    from segmill.models.checkpoint import load_checkpoint
    from segmill.pipeline.train.data import list_pairs
    from segmill.pipeline.train.validate import counts_per_image

    model, spec = load_checkpoint(checkpoint)
    pairs, _ = list_pairs(data["val_images"], data["val_labels"], None)
    inter, union, _ = counts_per_image(model, spec, pairs, device=torch.device("cpu"), endpoint_url=None)
    return inter, union, spec.classes


def main(argv: list[str] | None = None) -> None:
    from segmill.models.comparison import paired_bootstrap
    from segmill.pipeline.tracking import decide
    from segmill.pipeline.train.config import TrainConfig

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", choices=("camvid", "scenes"), default="camvid")
    parser.add_argument("--datasets", type=Path, default=DATASETS)
    parser.add_argument("--seeds", type=int, default=4, help="Same-recipe models (seeds 0..N-1).")
    parser.add_argument("--samples", type=int, default=734, help="Training samples of each same-recipe model.")
    parser.add_argument("--better", type=float, default=4.0, help="The better model's samples, as a multiple.")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="A training option for every run (YAML value), e.g. --set crop_size=256.")
    parser.add_argument("--json", type=Path, help="Also write every figure here.")
    args = parser.parse_args(argv)

    import yaml

    extra = {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in args.set)}
    fields = TrainConfig.model_fields
    margin, max_drop = fields["champion_margin"].default, fields["max_class_drop"].default
    with tempfile.TemporaryDirectory(prefix="segmill-gate-") as tmp:
        root = Path(tmp)
        data, _, _ = _data(args.data, root, args.datasets)
        models, started = {}, time.time()
        runs = [(f"seed{s}", s, args.samples) for s in range(args.seeds)]
        runs.append(("better", 0, round(args.samples * args.better)))
        for name, seed, samples in runs:
            print(f"== training {name} ({samples} samples)", flush=True)
            checkpoint, miou = _train(data, root, seed, samples, extra)
            inter, union, classes = _counts(checkpoint, data)
            models[name] = (inter, union)
            print(f"   val mIoU {miou:.4f} ({time.time() - started:.0f} s so far)", flush=True)

    rows = []
    same = [f"seed{s}" for s in range(args.seeds)]
    for a, b in [*itertools.permutations(same, 2), *(("better", x) for x in same)]:
        challenger, champion = (b, a) if a != "better" else (a, b)
        c = paired_bootstrap(*models[champion], *models[challenger], classes)
        verdict = decide(c, "1", margin=margin, max_class_drop=max_drop)
        rows.append({"champion": champion, "challenger": challenger, "gain": c.gain, "low": c.low, "high": c.high,
                     "worst_class": c.worst_class()[0], "worst_change": c.worst_class()[1],
                     "promoted": verdict.promoted, "old_gate_promoted": c.gain > 0.0, "reason": verdict.reason,
                     "expected": challenger == "better"})
    false_new = sum(r["promoted"] for r in rows if not r["expected"])
    false_old = sum(r["old_gate_promoted"] for r in rows if not r["expected"])
    noise = [r for r in rows if not r["expected"]]
    real = [r for r in rows if r["expected"]]
    print(f"\n## The champion gate on {args.data} val ({models['seed0'][0].shape[0]} images); margin {margin}, "
          f"max class drop {max_drop}\n")
    print("| champion | challenger | gain | 95% interval | worst class | segmill gate | any-gain gate |")
    print("|---|---|---:|---|---|---|---|")
    for r in rows:
        print(f"| {r['champion']} | {r['challenger']} | {r['gain']:+.4f} | {r['low']:+.4f} to {r['high']:+.4f} | "
              f"{r['worst_class']} {r['worst_change']:+.3f} | {'promote' if r['promoted'] else 'keep'} | "
              f"{'promote' if r['old_gate_promoted'] else 'keep'} |")
    print(f"\nSame recipe, different seed ({len(noise)} gatings): segmill's gate promoted {false_new}, the any-gain "
          f"gate {false_old}.")
    print(f"Clearly better model ({len(real)} gatings): segmill's gate promoted {sum(r['promoted'] for r in real)}, "
          f"the any-gain gate {sum(r['old_gate_promoted'] for r in real)}.")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
