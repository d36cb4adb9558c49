"""Prediction at any size: padding, batching, TTA, tiling and max_side, with tiny deterministic models."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from segmill.models.predict import (
    IMAGENET_MEAN,
    InferenceOptions,
    Predictor,
    crop_to_sizes,
    normalize,
    pad_batch,
    pad_to_multiple,
    sliding_window_probs,
    top_class_and_entropy,
    tta_probs,
)

NUM_CLASSES = 4


class PixelModel(nn.Module):
    """A 1x1 conv: every pixel's output depends on that pixel alone (translation and flip equivariant)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, NUM_CLASSES, 1)
        self.shapes: list[tuple[int, ...]] = []

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        self.shapes.append(tuple(x.shape))
        return {"out": self.conv(x) * 3}


class StridedModel(nn.Module):
    """Stride-4 features upsampled to the input: needs inputs divisible by 4.

    With ``symmetric`` the convs have stride 1 and horizontally symmetric kernels, so the model commutes
    with a horizontal flip (a stride-2 grid does not: it samples even columns only).
    """

    def __init__(self, symmetric: bool = False) -> None:
        super().__init__()
        torch.manual_seed(1)
        stride = 1 if symmetric else 2
        self.down = nn.Conv2d(3, 8, 3, stride=stride, padding=1)
        self.down2 = nn.Conv2d(8, 8, 3, stride=stride, padding=1)
        self.head = nn.Conv2d(8, NUM_CLASSES, 1)
        self.inference_flags: list[bool] = []
        if symmetric:
            with torch.no_grad():
                for conv in (self.down, self.down2):
                    conv.weight.copy_((conv.weight + conv.weight.flip(-1)) / 2)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        assert x.shape[-2] % 4 == 0 and x.shape[-1] % 4 == 0, x.shape
        self.inference_flags.append(torch.is_inference_mode_enabled() and not self.training)
        y = self.head(F.relu(self.down2(F.relu(self.down(x)))))
        return {"out": F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)}


def random_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_normalize_accepts_numpy_and_tensor() -> None:
    image = random_image(5, 7)
    x = normalize(image)
    assert x.shape == (3, 5, 7) and x.dtype == torch.float32
    assert torch.equal(x, normalize(torch.from_numpy(image)))
    mean_colour = np.full((1, 1, 3), 0, np.float32) + np.array(IMAGENET_MEAN, np.float32)
    assert torch.allclose(normalize(mean_colour), torch.zeros(3, 1, 1), atol=1e-6)
    with pytest.raises(ValueError, match="HxWx3"):
        normalize(np.zeros((5, 7), np.uint8))


def test_pad_to_multiple_and_pad_batch_round_trip() -> None:
    x = torch.randn(3, 31, 65)
    padded = pad_to_multiple(x, 32)
    assert padded.shape == (3, 32, 96)
    assert torch.equal(padded[:, :31, :65], x) and padded[:, 31:].abs().sum() == 0
    images = [torch.randn(3, 31, 200), torch.randn(3, 65, 97), torch.randn(3, 1, 1)]
    batch, sizes = pad_batch(images, divisor=32)
    assert batch.shape == (3, 3, 96, 224) and sizes == [(31, 200), (65, 97), (1, 1)]
    for original, cropped in zip(images, crop_to_sizes(batch, sizes)):
        assert torch.equal(original, cropped)


@pytest.mark.parametrize("size", [(65, 97), (1, 1), (31, 200), (32, 32)])
def test_masks_come_back_at_original_size(size: tuple[int, int]) -> None:
    predictor = Predictor(StridedModel(), device="cpu", options=InferenceOptions(size_divisor=32))
    image = random_image(*size)
    (mask,) = predictor.predict([image])
    assert mask.shape == size and mask.dtype == torch.uint8
    (probs,) = predictor.predict_probs(image)  # a single image is accepted too
    assert probs.shape == (NUM_CLASSES, *size)
    assert torch.allclose(probs.sum(0), torch.ones(size), atol=1e-5)
    assert torch.equal(probs.argmax(0).to(torch.uint8), mask)


def test_predictor_runs_in_eval_and_inference_mode() -> None:
    model = StridedModel().train()
    predictor = Predictor(model, device="cpu", options=InferenceOptions(size_divisor=4))
    predictor.predict([random_image(8, 8)])
    assert not model.training and model.inference_flags == [True]


def test_batching_different_sizes_matches_one_at_a_time() -> None:
    images = [random_image(h, w, seed=i) for i, (h, w) in enumerate([(65, 97), (31, 200), (1, 1), (40, 40)])]
    together = Predictor(PixelModel(), device="cpu", options=InferenceOptions(batch_size=8)).predict_probs(images)
    alone = Predictor(PixelModel(), device="cpu", options=InferenceOptions(batch_size=1)).predict_probs(images)
    for a, b, im in zip(together, alone, images):
        assert a.shape == (NUM_CLASSES, *im.shape[:2])
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_flip_tta_with_flip_equivariant_model_changes_nothing() -> None:
    image = random_image(37, 53)
    plain = Predictor(StridedModel(symmetric=True), device="cpu", options=InferenceOptions(size_divisor=4)).predict_probs(image)[0]
    flipped = Predictor(StridedModel(symmetric=True), device="cpu", options=InferenceOptions(size_divisor=4, flip=True)).predict_probs(image)[0]
    torch.testing.assert_close(plain, flipped, rtol=0, atol=1e-5)
    # The check has teeth: with an asymmetric model the flip does change the result.
    asym = Predictor(StridedModel(), device="cpu", options=InferenceOptions(size_divisor=4, flip=True)).predict_probs(image)[0]
    assert not torch.allclose(Predictor(StridedModel(), device="cpu", options=InferenceOptions(size_divisor=4)).predict_probs(image)[0], asym)


def test_multi_scale_averages_single_scale_probabilities() -> None:
    model = StridedModel().eval()
    batch = normalize(random_image(40, 56))[None]
    with torch.inference_mode():
        per_scale = [tta_probs(model, batch, scales=(s,), size_divisor=4) for s in (0.5, 1.0, 1.5)]
        combined = tta_probs(model, batch, scales=(0.5, 1.0, 1.5), size_divisor=4)
        direct = model(batch)["out"].softmax(1)
    torch.testing.assert_close(combined, sum(per_scale) / 3, rtol=0, atol=1e-6)
    torch.testing.assert_close(per_scale[1], direct, rtol=0, atol=1e-6)
    assert combined.shape == (1, NUM_CLASSES, 40, 56)


@pytest.mark.parametrize("size,tile,stride", [((130, 203), 64, None), ((130, 203), 64, 50), ((40, 300), 64, 37)])
def test_sliding_window_equals_full_image_for_per_pixel_model(size: tuple[int, int], tile: int,
                                                              stride: int | None) -> None:
    model = PixelModel().eval()
    batch = torch.stack([normalize(random_image(*size, seed=s)) for s in range(2)])
    with torch.inference_mode():
        full = tta_probs(model, batch)
        tiled = sliding_window_probs(model, batch, tile_size=tile, overlap=0.25, stride=stride, tiles_per_batch=3)
    torch.testing.assert_close(tiled, full, rtol=0, atol=1e-5)


def test_predictor_tiles_large_images_automatically() -> None:
    image = random_image(150, 170)
    model = PixelModel()
    tiled = Predictor(model, device="cpu", options=InferenceOptions(tile_size=64, tile_threshold=100 * 100)).predict_probs(image)[0]
    assert {shape[-2:] for shape in model.shapes} == {(64, 64)}
    whole = Predictor(PixelModel(), device="cpu").predict_probs(image)[0]
    torch.testing.assert_close(tiled, whole, rtol=0, atol=1e-5)


def test_max_side_downscales_the_forward_but_not_the_mask() -> None:
    model = PixelModel()
    predictor = Predictor(model, device="cpu", options=InferenceOptions(size_divisor=8, max_side=32))
    image = random_image(65, 97)
    (mask,) = predictor.predict(image)
    assert mask.shape == (65, 97)
    assert model.shapes == [(1, 3, 24, 32)]  # 65x97 -> 21x32, padded to a multiple of 8
    # On a flat image the per-pixel probabilities do not depend on the resolution of the forward pass.
    flat = np.full((65, 97, 3), (200, 30, 90), np.uint8)
    small = predictor.predict_probs(flat)[0]
    full = Predictor(PixelModel(), device="cpu").predict_probs(flat)[0]
    assert small.shape == full.shape == (NUM_CLASSES, 65, 97)
    torch.testing.assert_close(small, full, rtol=0, atol=1e-5)


def test_top_class_and_entropy_from_logits_equal_those_of_the_softmax() -> None:
    torch.manual_seed(3)
    logits = torch.randn(7, 33, 21) * 6
    logits[:, 0, 0] = torch.tensor([50.0, -50, 0, 0, 0, 0, 0])  # one pixel almost certain: p ln p underflows
    probs = logits.softmax(0)
    for got, expected in zip(top_class_and_entropy(logits, True), top_class_and_entropy(probs, False)):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    top, mask, entropy = top_class_and_entropy(probs, False)
    assert torch.equal(mask, probs.argmax(0))
    torch.testing.assert_close(entropy, -(probs * probs.clamp_min(1e-30).log()).sum(0), rtol=1e-5, atol=1e-6)


def test_scores_are_logits_only_for_one_view_at_the_image_size() -> None:
    images = [random_image(20, 24), random_image(13, 9)]
    plain = Predictor(PixelModel(), device="cpu", options=InferenceOptions(size_divisor=8))
    with torch.inference_mode():
        found = {i: (scores, are_logits) for i, scores, are_logits in plain.iter_scores(images)}
        probs = dict(plain.iter_probs(images))
        assert [found[i][1] for i in (0, 1)] == [True, True]
        for i in (0, 1):
            torch.testing.assert_close(found[i][0].softmax(0), probs[i])
        for changed in (dict(flip=True), dict(scales=(0.5, 1.0)), dict(max_side=16), dict(tile_threshold=100)):
            predictor = Predictor(PixelModel(), device="cpu", options=InferenceOptions(size_divisor=8, tile_size=16, **changed))
            flags = [are_logits for _, _, are_logits in predictor.iter_scores(images)]
            assert not any(flags), changed
            masks = predictor.predict(images)
            assert all(m.shape == im.shape[:2] for m, im in zip(masks, images))
