"""Prediction for images of any size: normalisation, padding, test-time augmentation, tiling. Pure torch.

Resize and pad policy (why: a mask must line up pixel for pixel with its image):

- By default nothing is resized. An image (HxWx3 uint8) is normalised with mean/std, padded at the bottom
  and right with zeros AFTER normalisation (that is, with the mean colour) up to a multiple of
  ``size_divisor`` (the model's output stride, 32 for most backbones), run, and the output cropped back,
  so the mask has exactly the image's size. Zeros rather than reflection because reflection cannot pad
  beyond the image's own size (a 1x1 image, or a small image batched with a large one).
- Images of different sizes share a batch the same way: each is padded at the bottom/right to the batch's
  largest size (rounded up to ``size_divisor``). Pixels never move or stretch.
- ``max_side``: if an image's long side exceeds it, the image is downscaled (bilinear, antialiased) to that
  long side for the forward pass, and the class probabilities are upsampled (bilinear) back to the
  original size before argmax. A mask is never resized.
- Test-time augmentation: for each scale the input is resized (bilinear), the logits resized back to the
  input size, and the softmax probabilities averaged over scales and horizontal flips (as in DeepLabv3).
- Large images (more than ``tile_threshold`` pixels, after ``max_side``) go through sliding-window
  inference: tiles of ``tile_size`` with ``tile_overlap``, the last tile of each row and column aligned to
  the image edge, overlapping probabilities averaged with a coverage-count map.

Models take normalised [B, 3, H, W] float input and return ``{"out": logits [B, K, H, W]}``.

The fast path (``FastPath``, applied by ``FastForward``; all off by default, so results are exactly the model's):
channels-last memory format, bf16/fp16 autocast (logits return as float32), optional ``torch.compile``, BatchNorm
folded into convolutions (``models/fold.py``), and pinned host memory so that host-to-device copies are
asynchronous. What each changes in masks and speed is measured in docs/throughput.md.
"""
from __future__ import annotations

import warnings
from typing import Iterator, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from segmill.models.fold import fold_batchnorm as fold_batchnorm_into_convs
from segmill.models.options import FastPath, InferenceOptions
from segmill.models.spec import IMAGENET_MEAN, IMAGENET_STD

Image = Union[np.ndarray, torch.Tensor]
Size = tuple[int, int]


def normalize(image: Image, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
              device: torch.device | str | None = None) -> torch.Tensor:
    """An HxWx3 image (uint8, or float in [0, 1]) as a normalised float32 [3, H, W] tensor on ``device``.

    The image travels to the device before conversion, so uint8 (4x smaller than float) crosses the bus.
    """
    if isinstance(image, np.ndarray):
        with warnings.catch_warnings():  # a read-only array (np.frombuffer) is fine: it is only read
            warnings.simplefilter("ignore", UserWarning)
            t = torch.from_numpy(np.ascontiguousarray(image))
    else:
        t = image
    if t.dim() != 3 or t.shape[-1] != 3:
        raise ValueError(f"image must be HxWx3 (RGB); got shape {tuple(t.shape)}. Convert it to RGB first.")
    if t.dtype != torch.uint8 and not t.is_floating_point():
        raise ValueError(f"image must be uint8 or float in [0, 1]; got {t.dtype}.")
    t = t.to(device if device is not None else t.device, non_blocking=True)
    x = t.permute(2, 0, 1).float()
    if t.dtype == torch.uint8:
        x = x / 255.0
    mean_t = torch.tensor(mean, dtype=torch.float32, device=x.device).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32, device=x.device).view(3, 1, 1)
    return ((x - mean_t) / std_t).contiguous()


AUTOCAST_DTYPES: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class FastForward(nn.Module):
    """``model(x)`` with the fast-path options applied; returns ``{"out": float32 logits}`` like the model."""

    def __init__(self, model: nn.Module, *, device_type: str, fast: FastPath = FastPath()):
        super().__init__()
        if fast.precision not in AUTOCAST_DTYPES:
            raise ValueError(f"precision must be one of {list(AUTOCAST_DTYPES)}; got {fast.precision!r}.")
        if fast.fold_batchnorm:  # in place: only for a model this forward owns and keeps in eval mode
            fold_batchnorm_into_convs(model.eval())
        self.model = model.to(memory_format=torch.channels_last) if fast.channels_last else model
        self.device_type, self.dtype = device_type, AUTOCAST_DTYPES[fast.precision]
        self.channels_last = fast.channels_last
        # dynamic=None: the first new size recompiles once, then shapes are treated as dynamic.
        self._run = torch.compile(self.model) if fast.compile else self.model

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device_type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None):
            out = self._run(x)["out"]
        return {"out": out.float()}


def _round_up(n: int, divisor: int) -> int:
    return -(-n // divisor) * divisor


def pad_to_multiple(x: torch.Tensor, divisor: int, value: float = 0.0) -> torch.Tensor:
    """Pad the last two dims at the bottom/right up to multiples of ``divisor``."""
    h, w = x.shape[-2:]
    ph, pw = _round_up(h, divisor) - h, _round_up(w, divisor) - w
    return F.pad(x, (0, pw, 0, ph), value=value) if ph or pw else x


def pad_batch(images: Sequence[torch.Tensor], divisor: int = 1,
              value: float = 0.0) -> tuple[torch.Tensor, list[Size]]:
    """Stack [C, H, W] images of different sizes into one [B, C, H', W'] batch, padded bottom/right.

    Returns the batch and each image's (H, W), for ``crop_to_sizes``.
    """
    if not images:
        raise ValueError("pad_batch needs at least one image.")
    sizes = [(int(im.shape[-2]), int(im.shape[-1])) for im in images]
    height = _round_up(max(h for h, _ in sizes), divisor)
    width = _round_up(max(w for _, w in sizes), divisor)
    first = images[0]
    batch = first.new_full((len(images), first.shape[0], height, width), value)
    for i, (im, (h, w)) in enumerate(zip(images, sizes)):
        batch[i, :, :h, :w] = im
    return batch, sizes


def crop_to_sizes(batch: torch.Tensor, sizes: Sequence[Size]) -> list[torch.Tensor]:
    """Undo ``pad_batch``: each item of a [B, ..., H', W'] batch cropped to its own (H, W)."""
    return [batch[i, ..., :h, :w] for i, (h, w) in enumerate(sizes)]


def _resize(x: torch.Tensor, size: Size, antialias: bool = False) -> torch.Tensor:
    """Bilinear resize of [B, C, H, W] (no-op at the same size)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=antialias)


def _logits(model: nn.Module, x: torch.Tensor, size_divisor: int) -> torch.Tensor:
    """Logits at x's size: pad to the divisor, run, crop (and upsample if the model returned a smaller map)."""
    h, w = x.shape[-2:]
    padded = pad_to_multiple(x, size_divisor)
    out = model(padded)["out"]
    out = _resize(out, tuple(padded.shape[-2:]))
    return out[..., :h, :w]


def tta_probs(model: nn.Module, batch: torch.Tensor, *, scales: Sequence[float] = (1.0,), flip: bool = False,
              size_divisor: int = 1) -> torch.Tensor:
    """Softmax probabilities [B, K, H, W] at input size, averaged over ``scales`` and horizontal flips.

    The average is of probabilities, not logits, as in DeepLabv3's multi-scale inference. A flip is applied
    to the padded input and undone on the padded output, so a flip-equivariant model gives the same result.
    """
    h, w = batch.shape[-2:]
    total: torch.Tensor | None = None
    count = 0
    for scale in scales:
        size = (max(1, round(h * scale)), max(1, round(w * scale)))
        x = pad_to_multiple(_resize(batch, size), size_divisor)
        for flipped in (False, True) if flip else (False,):
            logits = _logits(model, x.flip(-1) if flipped else x, size_divisor)
            logits = logits.flip(-1) if flipped else logits
            probs = _resize(logits[..., : size[0], : size[1]], (h, w)).softmax(1)
            total = probs if total is None else total.add_(probs)
            count += 1
    if total is None:
        raise ValueError("tta_probs needs at least one scale.")
    return total if count == 1 else total / count


def top_class_and_entropy(scores: torch.Tensor, are_logits: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per pixel of scores [K, H, W]: the top class's probability, the top class, and the entropy (nats).

    From logits no softmax is formed: with e_k = exp(l_k - l_max) and Z = sum_k e_k, the top probability is 1/Z
    and the entropy is ln Z - sum_k e_k (l_k - l_max) / Z: one exp pass and no log or division per class,
    the same numbers as softmax, max and p ln p to float rounding.
    """
    if not are_logits:
        top, mask = scores.max(0)
        return top, mask, torch.special.entr(scores).sum(0)  # -p ln p, 0 at p = 0
    best, mask = scores.max(0)
    shifted = scores - best
    weights = shifted.exp()
    total = weights.sum(0)
    top = total.reciprocal()
    return top, mask, total.log_().sub_(weights.mul_(shifted).sum(0).mul_(top))


def _window_starts(length: int, window: int, stride: int) -> list[int]:
    """Start offsets of windows covering [0, length); the last one is aligned to the end."""
    starts = list(range(0, length - window + 1, stride))
    if starts[-1] + window < length:
        starts.append(length - window)
    return starts


def sliding_window_probs(model: nn.Module, images: torch.Tensor, *, tile_size: int = InferenceOptions.tile_size,
                         overlap: float = InferenceOptions.tile_overlap, stride: int | None = None, scales: Sequence[float] = (1.0,),
                         flip: bool = False, size_divisor: int = 1, tiles_per_batch: int = 4) -> torch.Tensor:
    """Tiled ``tta_probs`` for large [B, 3, H, W] images: overlapping tiles averaged by coverage count.

    ``stride`` defaults to ``tile_size * (1 - overlap)``. Images smaller than a tile are run whole.
    """
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap must be in [0, 1); got {overlap}.")
    stride = stride or max(1, int(tile_size * (1 - overlap)))
    if not 0 < stride <= tile_size:
        raise ValueError(f"stride must be in (0, tile_size={tile_size}] so tiles cover the image; got {stride}.")
    b, _, h, w = images.shape
    th, tw = min(tile_size, h), min(tile_size, w)
    windows = [(y, x) for y in _window_starts(h, th, stride) for x in _window_starts(w, tw, stride)]
    probs: torch.Tensor | None = None
    coverage = images.new_zeros(h, w)
    for i in range(0, len(windows), tiles_per_batch):
        chunk = windows[i: i + tiles_per_batch]
        tiles = torch.cat([images[..., y: y + th, x: x + tw] for y, x in chunk])
        out = tta_probs(model, tiles, scales=scales, flip=flip, size_divisor=size_divisor)
        if probs is None:
            probs = images.new_zeros(b, out.shape[1], h, w)
        for j, (y, x) in enumerate(chunk):
            probs[..., y: y + th, x: x + tw] += out[j * b: (j + 1) * b]
            coverage[y: y + th, x: x + tw] += 1
    assert probs is not None
    return probs / coverage


class Predictor:
    """Runs a segmentation model on a list of images of any sizes; results come back at the original sizes.

    Results stay on ``device`` (the default is CUDA where present) so that statistics can be computed there;
    call ``.cpu()`` on what you keep.
    """

    def __init__(self, model: nn.Module, *, mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD, device: torch.device | str | None = None,
                 options: InferenceOptions = InferenceOptions(), fast: FastPath = FastPath()):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.to(self.device).eval()
        self.forward_model = FastForward(self.model, device_type=self.device.type, fast=fast)
        self.pin_memory = fast.pin_memory and self.device.type == "cuda"
        self.mean, self.std = tuple(mean), tuple(std)
        self.options = options

    def forward_size(self, size: Size) -> Size:
        """The size an image of ``size`` is run at: downscaled so its long side is at most ``max_side``."""
        max_side = self.options.max_side
        if not max_side or max(size) <= max_side:
            return size
        factor = max_side / max(size)
        return max(1, round(size[0] * factor)), max(1, round(size[1] * factor))

    def _prepare(self, image: Image) -> torch.Tensor:
        """Normalised [3, h, w] forward input on the device (downscaled past ``max_side``)."""
        if self.pin_memory and isinstance(image, np.ndarray):  # pinned: the copy below does not block the host
            image = torch.from_numpy(np.ascontiguousarray(image)).pin_memory()
        x = normalize(image, self.mean, self.std, self.device)
        return _resize(x[None], self.forward_size((x.shape[-2], x.shape[-1])), antialias=True)[0]

    def iter_scores(self, images: Sequence[Image]) -> Iterator[tuple[int, torch.Tensor, bool]]:
        """(index, scores [K, H, W] at original size, are_logits) per image, in batch order; under inference_mode.

        Scores are logits where one view is run at the image's own size (no test-time augmentation, no tiling,
        no ``max_side``): nothing is averaged or resized, and a softmax would only cost time. Elsewhere they are
        the averaged probabilities. Images go to the device one batch at a time, so a caller can reduce each
        result there and free it.
        """
        sizes = [(int(im.shape[0]), int(im.shape[1])) for im in images]
        options = self.options
        tta = dict(scales=tuple(options.scales), flip=options.flip, size_divisor=options.size_divisor)
        single_view = tuple(options.scales) == (1.0,) and not options.flip
        small = []
        for i, size in enumerate(sizes):
            h, w = self.forward_size(size)
            if h * w <= options.tile_threshold:
                small.append(i)
                continue
            probs = sliding_window_probs(self.forward_model, self._prepare(images[i])[None],
                                         tile_size=options.tile_size, overlap=options.tile_overlap, **tta)
            yield i, _resize(probs, size)[0], False
        small.sort(key=lambda i: self.forward_size(sizes[i]))  # similar sizes share a batch: less padding
        for start in range(0, len(small), options.batch_size):
            chunk = small[start: start + options.batch_size]
            batch, run_sizes = pad_batch([self._prepare(images[i]) for i in chunk], options.size_divisor)
            if single_view and all(run_sizes[j] == sizes[i] for j, i in enumerate(chunk)):
                for i, logits in zip(chunk, crop_to_sizes(_logits(self.forward_model, batch, options.size_divisor),
                                                          run_sizes)):
                    yield i, logits, True
                continue
            probs = tta_probs(self.forward_model, batch, **tta)
            for i, p in zip(chunk, crop_to_sizes(probs, run_sizes)):
                yield i, _resize(p[None], sizes[i])[0], False

    def iter_probs(self, images: Sequence[Image]) -> Iterator[tuple[int, torch.Tensor]]:
        """(index, probs [K, H, W] at original size) per image, in batch order; call under inference_mode."""
        for i, scores, are_logits in self.iter_scores(images):
            yield i, scores.softmax(0) if are_logits else scores

    @staticmethod
    def _as_list(images: Sequence[Image] | Image) -> Sequence[Image]:
        single = isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 3
        return [images] if single else images  # type: ignore[list-item,return-value]

    def predict_probs(self, images: Sequence[Image] | Image) -> list[torch.Tensor]:
        """Class probabilities [K, H, W] per image, at each image's original size, in input order."""
        images = self._as_list(images)
        out: list[torch.Tensor | None] = [None] * len(images)
        with torch.inference_mode():
            self.model.eval()
            for i, probs in self.iter_probs(images):
                out[i] = probs
        return out  # type: ignore[return-value]

    def predict(self, images: Sequence[Image] | Image) -> list[torch.Tensor]:
        """Masks [H, W] per image at original sizes: uint8 up to 256 classes, else int64."""
        images = self._as_list(images)
        out: list[torch.Tensor | None] = [None] * len(images)
        with torch.inference_mode():
            self.model.eval()
            for i, scores, _ in self.iter_scores(images):  # the same argmax for logits and probabilities
                mask = scores.argmax(0)
                out[i] = mask.to(torch.uint8) if scores.shape[0] <= 256 else mask
        return out  # type: ignore[return-value]


__all__ = [
    "AUTOCAST_DTYPES", "FastForward", "FastPath", "InferenceOptions", "IMAGENET_MEAN", "IMAGENET_STD", "Predictor", "crop_to_sizes", "normalize", "pad_batch",
    "pad_to_multiple", "sliding_window_probs", "top_class_and_entropy", "tta_probs",
]
