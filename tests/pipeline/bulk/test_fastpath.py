"""Correctness under speed: the fast path's masks against plain fp32 (channels-last identical; reduced precision
within a stated agreement), GPU JPEG decoding's logic on CPU, and the same checks on a GPU where there is one."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from segmill.models.checkpoint import ModelSpec, load_checkpoint, save_random_checkpoint
from segmill.models.options import FastPath, InferenceOptions
from segmill.models.predict import Predictor
from segmill.pipeline.bulk.config import ResourceConfig
from segmill.pipeline.bulk.rows import OK
from segmill.pipeline.bulk.segmenter import Segmenter
from segmill.pipeline.bulk.stages import decode_batch
from segmill.pipeline.common.scenes import render_scene

# Measured here (AMD EPYC, torch 2.15 CPU, random weights with a sharpened classifier): bf16 autocast agreed
# with fp32 on 98.8% of pixels for the tiny 7-class U-Net on scenes and 99.6% for LR-ASPP on DSB2018. Random
# weights leave many pixels near a tie between classes, so this is below the 99.9% a trained model should reach;
# the assertion is the measured floor. fp32 (channels-last included) is asserted identical.
BF16_AGREEMENT = 0.985


def _images(dsb2018: Path, n: int = 4, side: int = 96) -> list[np.ndarray]:
    files = sorted((dsb2018 / "images").glob("*.png"))[:n]
    return [np.asarray(Image.open(p).convert("RGB").resize((side + 8 * i, side), Image.BILINEAR))
            for i, p in enumerate(files)]


DSB_CLASSES = ("background", "nucleus")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tiny_checkpoint) -> dict[str, str]:
    root = tmp_path_factory.mktemp("fastpath")
    save_random_checkpoint(root / "lraspp.pt", ModelSpec(arch="lraspp_mobilenet_v3_large", classes=DSB_CLASSES))
    return {"unet": tiny_checkpoint, "lraspp": str(root / "lraspp.pt")}


def _case(name: str, dsb2018: Path) -> list[np.ndarray]:
    """The tiny U-Net is a scene model (7 classes): scenes for it; DSB2018 nuclei for LR-ASPP (2 classes)."""
    return [render_scene(5, i)[0] for i in range(4)] if name == "unet" else _images(dsb2018)


def _masks(checkpoint: str, images, device: str = "cpu", **fast) -> list[torch.Tensor]:
    model, spec = load_checkpoint(checkpoint, map_location=device)
    predictor = Predictor(model, mean=spec.mean, std=spec.std, device=device, options=InferenceOptions(batch_size=2),
                          fast=FastPath(**fast))
    return [m.cpu() for m in predictor.predict(images)]


def _agreement(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return sum(int((x == y).sum()) for x, y in zip(a, b)) / sum(x.numel() for x in a)


@pytest.mark.parametrize("name", ["unet", "lraspp"])
def test_channels_last_gives_identical_masks(name, checkpoints, dsb2018, one_torch_thread) -> None:
    images = _case(name, dsb2018)
    plain = _masks(checkpoints[name], images)
    assert len(set(torch.cat([m.flatten() for m in plain]).tolist())) >= 2, "several classes, or this proves little"
    for fast, reference in zip(_masks(checkpoints[name], images, channels_last=True), plain):
        assert torch.equal(fast, reference)


@pytest.mark.parametrize("name", ["unet", "lraspp"])
def test_folded_batchnorm_agrees_with_plain_fp32(name, checkpoints, dsb2018, one_torch_thread) -> None:
    """The bulk job's default CPU path (BatchNorm folded, channels-last) against the model as trained."""
    images = _case(name, dsb2018)
    plain = _masks(checkpoints[name], images)
    fast = _masks(checkpoints[name], images, channels_last=True, fold_batchnorm=True)
    agreement = _agreement(fast, plain)
    print(f"folded BatchNorm vs plain, {name}: {100 * agreement:.4f}% of pixels equal")
    assert agreement >= 0.9999


@pytest.mark.parametrize("name", ["unet", "lraspp"])
def test_bf16_autocast_agrees_with_fp32(name, checkpoints, dsb2018, one_torch_thread) -> None:
    images = _case(name, dsb2018)
    plain = _masks(checkpoints[name], images)
    fast = _masks(checkpoints[name], images, channels_last=True, precision="bf16")
    assert all(f.shape == p.shape and f.dtype == p.dtype for f, p in zip(fast, plain))
    agreement = _agreement(fast, plain)
    print(f"bf16 vs fp32, {name}: {100 * agreement:.3f}% of pixels equal")
    assert agreement >= BF16_AGREEMENT


def test_resource_config_checks_precision_and_pins_only_with_a_gpu() -> None:
    with pytest.raises(ValueError, match="precision"):
        ResourceConfig(precision="int4")
    assert ResourceConfig().resolve({"CPU": 2.0}).pin_memory is False
    assert ResourceConfig().resolve({"CPU": 8.0, "GPU": 1.0}).pin_memory is True
    assert ResourceConfig().channels_last and ResourceConfig().precision == "fp32" and not ResourceConfig().compile


def _jpeg(image: np.ndarray, **kwargs) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=95, **kwargs)
    return buffer.getvalue()


def _decoded(tmp_path: Path, files: dict[str, bytes], gpu_jpeg: bool) -> dict[str, np.ndarray]:
    uris = []
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
        uris.append(str(tmp_path / name))
    listing = pa.table({"image_uri": uris, "label_uri": pa.array([None] * len(uris), pa.string())})
    return decode_batch(listing, max_pixels=10**8, num_classes=2, ignore_index=255, endpoint_url=None,
                        gpu_jpeg=gpu_jpeg)


def test_jpegs_decoded_in_the_model_actor_give_the_same_masks(checkpoints, dsb2018, tmp_path, sample_files,
                                                              one_torch_thread) -> None:
    """GPU JPEG decoding's logic, run on CPU: plain JPEGs travel encoded, others are decoded as before."""
    images = _images(dsb2018, n=3)
    files = {f"{i}.jpg": _jpeg(im) for i, im in enumerate(images)}
    files["rotated.jpg"] = sample_files["rotated"].data  # EXIF rotation: decoded on the CPU as before
    files["scene.png"] = _png(images[0])
    encoded, pixels = _decoded(tmp_path, files, True), _decoded(tmp_path, files, False)
    assert [len(b) > 0 for b in encoded["jpeg"]] == [True, True, True, False, False]
    assert list(encoded["height"]) == list(pixels["height"]) and list(encoded["width"]) == list(pixels["width"])
    segmenter = Segmenter(Path(checkpoints["lraspp"]).read_bytes(), use_gpu=False, torch_threads=1,
                          options=InferenceOptions(batch_size=4), fast=FastPath(channels_last=True))
    a, b = segmenter(encoded), segmenter(pixels)
    assert list(a["status"]) == [OK] * 5
    same = sum(int((np.frombuffer(x, np.uint8) == np.frombuffer(y, np.uint8)).sum()) for x, y in zip(a["mask"], b["mask"]))
    total = sum(len(x) for x in b["mask"])
    assert same / total >= 0.99  # two JPEG decoders (libjpeg-turbo in Pillow, torchvision's) may round differently


def _png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_gpu_fast_path_agrees_with_cpu_fp32(precision, checkpoints, dsb2018) -> None:
    images = _images(dsb2018)
    plain = _masks(checkpoints["lraspp"], images)
    fast = _masks(checkpoints["lraspp"], images, device="cuda", channels_last=True, precision=precision,
                  pin_memory=True, fold_batchnorm=True)
    assert _agreement(fast, plain) >= (0.999 if precision == "fp32" else BF16_AGREEMENT)


@pytest.mark.gpu
@cuda
def test_gpu_jpeg_decoding_in_the_segmenter(checkpoints, dsb2018, tmp_path) -> None:
    images = _images(dsb2018, n=3)
    files = {f"{i}.jpg": _jpeg(im) for i, im in enumerate(images)}
    encoded, pixels = _decoded(tmp_path, files, True), _decoded(tmp_path, files, False)
    segmenter = Segmenter(Path(checkpoints["lraspp"]).read_bytes(), use_gpu=True, torch_threads=1,
                          options=InferenceOptions(batch_size=4), fast=FastPath(channels_last=True, pin_memory=True))
    a, b = segmenter(encoded), segmenter(pixels)
    assert list(a["status"]) == [OK] * 3
    same = sum(int((np.frombuffer(x, np.uint8) == np.frombuffer(y, np.uint8)).sum()) for x, y in zip(a["mask"], b["mask"]))
    assert same / sum(len(x) for x in b["mask"]) >= 0.99
