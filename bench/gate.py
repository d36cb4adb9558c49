"""The champion gate measured: how often it promotes noise, and whether it promotes a clearly better model.

    python -m bench.gate                                   # CamVid, from scratch (docs/loop.md)
    python -m bench.gate --from-champion 1468 --holdout    # fine-tunes of one champion, as `segmill improve` trains
    python -m bench.gate --data scenes --samples 400 --seeds 3

Trains `seeds` models of one recipe that differ only in their seed, and one more with `better` times the samples;
scores every validation image with each (per-image confusion counts, as the training job's gate does); then gates
every ordered pair of same-recipe models against each other (any promotion is a false one) and the longer-trained
model against each of them (a promotion is expected). Each gating is decided twice, side by side: by segmill's gate
(the paired bootstrap's lower bound above the margin, no class losing more than the set drop) and by the old one
(promote on any gain of the point estimate), and by segmill's rule with images drawn one by one instead of in blocks.

`--from-champion N` first trains a champion for N samples; every other model then starts from its weights (as a
challenger of `segmill improve` does). `--holdout` gates on the first half of the validation images (in path order:
for CamVid, the first half of the drive) and scores each gated pair on the second half too, which the gate never saw:
a promotion is borne out when the challenger is also better there.
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


def _train(data: dict[str, str], root: Path, seed: int, samples: int, extra: dict,
           name: str | None = None) -> tuple[bytes, float]:
    from bench.hard_classes import _epoch_images
    from segmill.pipeline.train.config import TrainConfig
    from segmill.pipeline.train.driver import train

    base = TrainConfig(**data, storage_path=str(root / "runs"), tracking_uri=f"sqlite:///{root}/mlflow.db",
                       run_name=name or f"gate-seed{seed}-{samples}", seed=seed, overlays=0, **extra)
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


def _miou(inter: np.ndarray, union: np.ndarray) -> float:
    from segmill.models.iou import iou_from_counts, nanmean

    return float(nanmean(iou_from_counts(inter.sum(0), union.sum(0))))


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
    parser.add_argument("--from-champion", type=int, default=0, metavar="SAMPLES",
                        help="Train a champion for this many samples first; every other model starts from it.")
    parser.add_argument("--holdout", action="store_true",
                        help="Gate on the first half of the validation images; check each pair on the second half.")
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
        if args.from_champion:
            print(f"== training the champion ({args.from_champion} samples)", flush=True)
            checkpoint, miou = _train(data, root, 100, args.from_champion, extra, name="gate-champion")
            (root / "champion.pt").write_bytes(checkpoint)
            extra = {**extra, "init_from": str(root / "champion.pt")}
            inter, union, classes = _counts(checkpoint, data)
            models["champion"] = (inter, union)
            print(f"   val mIoU {miou:.4f} ({time.time() - started:.0f} s so far)", flush=True)
        runs = [(f"seed{s}", s, args.samples) for s in range(args.seeds)]
        runs.append(("better", 0, round(args.samples * args.better)))
        for name, seed, samples in runs:
            print(f"== training {name} ({samples} samples)", flush=True)
            checkpoint, miou = _train(data, root, seed, samples, extra)
            inter, union, classes = _counts(checkpoint, data)
            models[name] = (inter, union)
            print(f"   val mIoU {miou:.4f} ({time.time() - started:.0f} s so far)", flush=True)

    images = models["seed0"][0].shape[0]
    gate_rows = slice(0, images // 2) if args.holdout else slice(0, images)
    held_rows = slice(images // 2, images)
    rows = []
    same = [f"seed{s}" for s in range(args.seeds)]
    for a, b in [*itertools.permutations(same, 2), *(("better", x) for x in same)]:
        challenger, champion = (b, a) if a != "better" else (a, b)
        counts = [x[gate_rows] for x in (*models[champion], *models[challenger])]
        c = paired_bootstrap(*counts, classes)
        iid = paired_bootstrap(*counts, classes, block=1)
        verdict = decide(c, "1", margin=margin, max_class_drop=max_drop)
        row = {"champion": champion, "challenger": challenger, "gain": c.gain, "low": c.low, "high": c.high,
               "block": c.block, "iid_low": iid.low, "iid_high": iid.high,
               "worst_class": c.worst_class()[0], "worst_change": c.worst_class()[1],
               "promoted": verdict.promoted, "old_gate_promoted": c.gain > 0.0,
               "iid_promoted": decide(iid, "1", margin=margin, max_class_drop=max_drop).promoted,
               "reason": verdict.reason, "expected": challenger == "better"}
        if args.holdout:
            row["held_out_gain"] = _miou(*(x[held_rows] for x in models[challenger])) - _miou(
                *(x[held_rows] for x in models[champion]))
        rows.append(row)
    noise = [r for r in rows if not r["expected"]]
    real = [r for r in rows if r["expected"]]
    where = f"the first {images // 2} of {images}" if args.holdout else f"all {images}"
    start = f"fine-tuned from one champion ({args.from_champion} samples), " if args.from_champion else "from scratch, "
    print(f"\n## The champion gate on {args.data} val: models {start}gated on {where} images; margin {margin}, "
          f"max class drop {max_drop}\n")
    for name, (inter, union) in models.items():
        print(f"- {name}: val mIoU {_miou(inter, union):.4f} (all images), {_miou(inter[gate_rows], union[gate_rows]):.4f} "
              f"(gated images)" + (f", {_miou(inter[held_rows], union[held_rows]):.4f} (held out)" if args.holdout else ""))
    held = " held-out gain |" if args.holdout else ""
    print(f"\n| champion | challenger | gain | 95% interval, blocks | 95% interval, one by one | worst class | "
          f"segmill gate | one-by-one gate | any-gain gate |{held}")
    print("|---|---|---:|---|---|---|---|---|---|" + ("---:|" if args.holdout else ""))
    for r in rows:
        print(f"| {r['champion']} | {r['challenger']} | {r['gain']:+.4f} | {r['low']:+.4f} to {r['high']:+.4f} "
              f"(runs of {r['block']}) | {r['iid_low']:+.4f} to {r['iid_high']:+.4f} | "
              f"{r['worst_class']} {r['worst_change']:+.3f} | {'promote' if r['promoted'] else 'keep'} | "
              f"{'promote' if r['iid_promoted'] else 'keep'} | {'promote' if r['old_gate_promoted'] else 'keep'} |"
              + (f" {r['held_out_gain']:+.4f} |" if args.holdout else ""))
    for label, group in (("Same recipe, different seed", noise), ("Clearly better model", real)):
        print(f"\n{label} ({len(group)} gatings): segmill's gate promoted {sum(r['promoted'] for r in group)}, "
              f"one by one {sum(r['iid_promoted'] for r in group)}, the any-gain gate "
              f"{sum(r['old_gate_promoted'] for r in group)}.")
        if args.holdout:
            for key, gate in (("promoted", "segmill's gate"), ("iid_promoted", "one by one"),
                              ("old_gate_promoted", "any gain")):
                chosen = [r for r in group if r[key]]
                borne = sum(r["held_out_gain"] > 0 for r in chosen)
                print(f"  {gate}: {borne} of its {len(chosen)} promotions also gain on the held-out images")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                         "models": {k: _miou(*v) for k, v in models.items()}, "rows": rows,
                                         "classes": list(classes),  # per-image counts, to gate them again later
                                         "counts": {k: [x.tolist() for x in v] for k, v in models.items()}}))


if __name__ == "__main__":
    main()
