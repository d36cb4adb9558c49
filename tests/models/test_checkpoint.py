"""Checkpoints: weights + spec round trip, safe loading (no pickled code runs), and spec validation."""
from __future__ import annotations

import io
import pickle
from pathlib import Path

import pytest
import torch
from torch import nn

from segmill.models import get_model
from segmill.models.checkpoint import (
    CHECKPOINT_FORMAT,
    ModelSpec,
    default_palette,
    load_checkpoint,
    save_checkpoint,
)

CLASSES = ("background", "road", "car")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def small_unet() -> nn.Module:
    torch.manual_seed(0)
    model = get_model("unet", num_classes=3, base_channels=8)
    # Non-default BatchNorm statistics, so the round trip must carry buffers as well as parameters.
    with torch.no_grad():
        model.train()(torch.randn(2, 3, 32, 32))
    return model.eval()


def small_spec() -> ModelSpec:
    return ModelSpec(
        arch="unet",
        classes=CLASSES,
        arch_kwargs={"base_channels": 8},
        palette=((0, 0, 0), (128, 64, 128), (0, 0, 142)),
        mean=(0.5, 0.4, 0.3),
        std=(0.2, 0.25, 0.3),
    )


@pytest.mark.parametrize("target", ["path", "bytesio"])
def test_round_trip_gives_identical_outputs_and_spec(target: str, tmp_path: Path) -> None:
    model, spec = small_unet(), small_spec()
    sink: Path | io.BytesIO = tmp_path / "model.pt" if target == "path" else io.BytesIO()
    save_checkpoint(sink, model, spec)
    if isinstance(sink, io.BytesIO):
        sink.seek(0)
    loaded, loaded_spec = load_checkpoint(sink)

    assert not loaded.training
    assert loaded_spec == spec
    assert loaded_spec.palette == spec.palette
    assert (loaded_spec.mean, loaded_spec.std) == (spec.mean, spec.std)
    assert loaded_spec.arch_kwargs == {"base_channels": 8}
    x = torch.randn(1, 3, 40, 56)
    with torch.no_grad():
        assert torch.equal(loaded(x)["out"], model(x)["out"])


def test_load_accepts_bytes() -> None:
    buffer = io.BytesIO()
    save_checkpoint(buffer, small_unet(), small_spec())
    _, spec = load_checkpoint(buffer.getvalue())
    assert spec.classes == CLASSES


class _CreatesMarker:
    """Unpickling this object calls open(marker, "w"): a stand-in for arbitrary code execution."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_malicious_payload_is_real(tmp_path: Path) -> None:
    """Control for the test below: plain pickle does run the payload, so its absence there means something."""
    marker = tmp_path / "ran"
    pickle.loads(pickle.dumps(_CreatesMarker(marker))).close()
    assert marker.exists()


@pytest.mark.parametrize("writer", ["pickle", "torch.save"])
def test_malicious_pickle_is_rejected_without_running(writer: str, tmp_path: Path) -> None:
    marker, path = tmp_path / "pwned", tmp_path / "evil.pt"
    payload = {"format": CHECKPOINT_FORMAT, "spec": {}, "state_dict": {}, "x": _CreatesMarker(marker)}
    if writer == "pickle":
        path.write_bytes(pickle.dumps(payload, protocol=2))
    else:
        torch.save(payload, path)
    with pytest.raises(ValueError, match="not a readable segmill checkpoint"):
        load_checkpoint(path)
    assert not marker.exists()


def test_non_checkpoint_dict_names_the_header(tmp_path: Path) -> None:
    path = tmp_path / "state.pt"
    torch.save(small_unet().state_dict(), path)
    with pytest.raises(ValueError, match="header") as excinfo:
        load_checkpoint(path)
    assert CHECKPOINT_FORMAT in str(excinfo.value)


def test_missing_path_raises_file_not_found_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "nowhere" / "model.pt"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_checkpoint(str(path))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"classes": ()}, "no classes"),
        ({"classes": ("a", "b", "a")}, "duplicate"),
        ({"classes": ("a", "b"), "palette": ((0, 0, 0),)}, "palette"),
    ],
)
def test_spec_validation(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ModelSpec(arch="unet", **kwargs)


def test_from_dict_rejects_unknown_keys() -> None:
    data = small_spec().to_dict()
    assert ModelSpec.from_dict(data) == small_spec()
    with pytest.raises(ValueError, match="unknown keys.*'colour_map'"):
        ModelSpec.from_dict({**data, "colour_map": []})


def test_default_palette_is_distinct_and_used_when_spec_has_none() -> None:
    palette = default_palette(21)
    assert len(palette) == 21 and len(set(palette)) == 21
    assert palette[:3] == ((0, 0, 0), (128, 0, 0), (0, 128, 0))  # PASCAL VOC's first colours
    assert all(0 <= c <= 255 for rgb in palette for c in rgb)
    assert ModelSpec(arch="unet", classes=CLASSES).colours() == default_palette(3)
