"""Training throughput: the retraining job (Ray Train, Ray Data decoding) against a plain single-process PyTorch
loop of the same model, recipe and data, side by side in one run, so that Ray Train's overhead is a known ratio.

    python -m bench.training                       # what `make bench-train` runs: CamVid, the default recipe
    python -m bench.training --samples 400 --data scenes

Both read the same images and labels with the same decoder, crop and augment them the same way (the job's
`decode_and_augment`, one seed per sample), and take the same optimiser steps in bf16 where native. The plain
loop decodes in its own process between steps; the job decodes in Ray tasks beside the training worker. Rates
are training samples per second, validation left out (the job's `train_samples_per_second`, the loop's clock).
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np


def plain_loop(data: dict[str, str], samples: int, *, crop: int, batch_size: int, threads: int) -> float:
    """Samples/s of a single-process loop: decode + augment, forward, backward, step."""
    import torch

    from segmill.models.allocator import keep_freed_memory
    from segmill.models.checkpoint import ModelSpec
    from segmill.models.training import autocast_dtype, optimizer_with_poly, train_step
    from segmill.pipeline.common.classes import load_class_file
    from segmill.pipeline.common.listing import iter_image_batches
    from segmill.pipeline.train.config import RECIPE_ARCH_KWARGS
    from segmill.pipeline.train.data import decode_and_augment

    torch.set_num_threads(threads)
    keep_freed_memory()
    classes = load_class_file(data["classes"])
    pairs = [(i, l) for batch in iter_image_batches(data["images"], data["labels"])
             for i, l in zip(batch["image_uri"].to_pylist(), batch["label_uri"].to_pylist()) if l]
    spec = ModelSpec(arch="unet", classes=classes.names, arch_kwargs=RECIPE_ARCH_KWARGS["unet"])
    model = spec.build().to(memory_format=torch.channels_last).train()
    steps = samples // batch_size
    optimizer, scheduler = optimizer_with_poly(model, lr=0.01, total_steps=steps)
    mean = torch.tensor(spec.mean).view(1, 3, 1, 1) * 255
    std = torch.tensor(spec.std).view(1, 3, 1, 1) * 255
    dtype = autocast_dtype("auto", torch.device("cpu"))
    rng = np.random.default_rng(0)
    started = time.perf_counter()
    for step in range(steps):
        picked = [pairs[i] for i in rng.integers(0, len(pairs), batch_size)]
        batch = decode_and_augment({"image_uri": np.array([p[0] for p in picked], dtype=object),
                                    "label_uri": np.array([p[1] for p in picked], dtype=object),
                                    "crop_class": np.full(batch_size, -1), "seed": rng.integers(0, 2**62, batch_size)},
                                   num_classes=len(classes.names), ignore_index=classes.ignore_index, crop=crop,
                                   scale_range=(0.5, 2.0), endpoint_url=None)
        images = ((torch.from_numpy(batch["image"]).permute(0, 3, 1, 2).float() - mean) / std)
        train_step(model, images.contiguous(memory_format=torch.channels_last),
                   torch.from_numpy(batch["mask"]).long(), optimizer, scheduler, autocast_dtype=dtype)
    return steps * batch_size / (time.perf_counter() - started)


def ray_train_job(data: dict[str, str], samples: int, root: Path, *, crop: int, batch_size: int) -> dict[str, float]:
    """The job's training samples/s (mean over epochs after the first) and its wall time."""
    import mlflow

    from segmill.pipeline.train.config import TrainConfig
    from segmill.pipeline.train.driver import train

    config = TrainConfig(**data, crop_size=crop, batch_size=batch_size, storage_path=str(root / "runs"),
                         tracking_uri=f"sqlite:///{root}/mlflow.db", overlays=0, epochs=1)
    epoch_images = _images(data)
    config = config.replace(epochs=max(2, round(samples / epoch_images)))
    started = time.perf_counter()
    outcome = train(config)
    wall = time.perf_counter() - started
    history = mlflow.MlflowClient(config.tracking_uri).get_metric_history(outcome.run_id, "train_samples_per_second")
    rates = [m.value for m in sorted(history, key=lambda m: m.step)][1:]  # the first epoch starts Ray Data's workers
    return {"samples_per_second": float(np.mean(rates)), "wall_seconds": wall, "epochs": config.epochs,
            "samples": config.epochs * epoch_images}


def _images(data: dict[str, str]) -> int:
    from segmill.pipeline.common.listing import iter_image_batches

    return sum(len(b) - b["label_uri"].null_count for b in iter_image_batches(data["images"], data["labels"]))


def main(argv: list[str] | None = None) -> None:
    from bench.hard_classes import _data

    parser = argparse.ArgumentParser(prog="python -m bench.training", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", choices=("camvid", "scenes"), default="camvid")
    parser.add_argument("--samples", type=int, default=1500, help="training samples per program")
    parser.add_argument("--crop", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2, help="the plain loop's torch threads")
    parser.add_argument("--json", type=Path, default=Path(".segmill/bench/training.json"))
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="segmill-bench-train-") as folder:
        root = Path(folder)
        data, _, _ = _data(args.data, root)
        train_data = {k: v for k, v in data.items() if not k.startswith("val_")} | \
            {"val_images": data["val_images"], "val_labels": data["val_labels"]}
        print("plain PyTorch loop ...", flush=True)
        plain = plain_loop(train_data, args.samples, crop=args.crop, batch_size=args.batch_size, threads=args.threads)
        print("segmill train (Ray Train) ...", flush=True)
        job = ray_train_job(train_data, args.samples, root, crop=args.crop, batch_size=args.batch_size)
    report = {"plain_samples_per_second": plain, "job": job, "ratio": job["samples_per_second"] / plain,
              "args": {k: str(v) for k, v in vars(args).items()}}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2))
    print(f"plain loop {plain:.2f} samples/s; segmill train {job['samples_per_second']:.2f} samples/s "
          f"({job['epochs']} epochs, {job['wall_seconds']:.0f} s with validation and start-up); "
          f"ratio {report['ratio']:.2f}x")


if __name__ == "__main__":
    main()
