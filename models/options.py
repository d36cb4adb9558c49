"""How a model is run, as two small option objects that travel unchanged from a job's config to the predictor.

Plain Python (no torch), so that a bulk job's driver can build them without loading torch. `InferenceOptions` is
what is computed (test-time augmentation, tiling, downscaling, batching): the one place its defaults live.
`FastPath` is how fast (`models/predict.py` says what each option changes).
"""
from __future__ import annotations

from dataclasses import dataclass

PRECISIONS = ("fp32", "bf16", "fp16")
OPTIMIZERS = ("sgd", "adamw")  # models/training.py builds them


@dataclass(frozen=True)
class InferenceOptions:
    """How images are run: test-time augmentation, tiling of large images, downscaling, batching.

    The one place these defaults live: the bulk job's config and the model actor take them from here.
    """

    scales: tuple[float, ...] = (1.0,)
    flip: bool = False
    tile_size: int = 512
    tile_overlap: float = 0.25
    tile_threshold: int = 2048 * 2048  # images with more pixels (after max_side) go through sliding windows
    max_side: int | None = None
    size_divisor: int = 32  # the output stride of most backbones: inputs are padded to a multiple of it
    batch_size: int = 8


@dataclass(frozen=True)
class FastPath:
    """Speed-ups that change only the order of float sums, or for bf16/fp16 the precision (`models/predict.py`)."""

    precision: str = "fp32"
    channels_last: bool = False
    compile: bool = False
    fold_batchnorm: bool = False
    pin_memory: bool = False
