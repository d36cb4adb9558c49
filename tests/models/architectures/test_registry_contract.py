"""Every registered model is built and checked the same way: odd input sizes, backward, save/load, aux head."""
from __future__ import annotations

import copy
import inspect

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from segmill.models import get_model, list_models
from segmill.models.registry import get_model_builder

NAMES = list_models()
NUM_CLASSES = 3
ODD_SIZES = [(65, 97), (33, 47)]
AUX_NAMES = [n for n in NAMES if "aux_loss" in inspect.signature(get_model_builder(n)).parameters]


def build(name: str, seed: int = 0, **kwargs) -> nn.Module:
    torch.manual_seed(seed)
    return get_model(name, num_classes=NUM_CLASSES, **kwargs)


def train_step(model: nn.Module, size: tuple[int, int] = (65, 97)) -> dict[str, torch.Tensor]:
    """One forward/backward in train mode on a batch of 2 (BatchNorm needs more than one value)."""
    model.train()
    torch.manual_seed(1)
    x = torch.randn(2, 3, *size)
    target = torch.randint(0, NUM_CLASSES, (2, *size))
    out = model(x)
    loss = sum(F.cross_entropy(logits, target) for logits in out.values())
    loss.backward()
    return out


@pytest.fixture(scope="module", params=NAMES)
def built(request: pytest.FixtureRequest) -> tuple[str, nn.Module]:
    return request.param, build(request.param)


def test_registry_lists_every_family() -> None:
    for family in ("fcn32s_", "fcn16s_", "fcn8s_", "fcn_resnet", "segnet_", "deconvnet_", "unet", "deeplabv3_resnet",
                   "lraspp_"):
        assert any(n.startswith(family) for n in NAMES), family


@pytest.mark.parametrize("name", NAMES)
def test_builder_signature(name: str) -> None:
    params = inspect.signature(get_model_builder(name)).parameters
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params.values())
    assert "num_classes" in params
    assert params["backbone_weights"].default is None


def test_forward_odd_sizes(built: tuple[str, nn.Module]) -> None:
    name, model = built
    model.eval()
    with torch.no_grad():
        for size in ODD_SIZES:
            out = model(torch.randn(1, 3, *size))
            assert set(out) == {"out"}, name
            assert out["out"].shape == (1, NUM_CLASSES, *size), name
            assert torch.isfinite(out["out"]).all(), name


def test_backbone_and_head_are_separate(built: tuple[str, nn.Module]) -> None:
    _, model = built
    assert isinstance(model.backbone, nn.Module)
    backbone_ids = {id(p) for p in model.backbone.parameters()}
    assert backbone_ids
    assert any(id(p) not in backbone_ids for p in model.parameters())


def test_backward_reaches_backbone(built: tuple[str, nn.Module]) -> None:
    name, model = built
    model = copy.deepcopy(model)
    train_step(model)
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"{name}: no gradient for {missing[:3]}"
    assert any(p.grad.abs().sum() > 0 for p in model.backbone.parameters()), name


def test_state_dict_round_trip(built: tuple[str, nn.Module], tmp_path) -> None:
    name, model = built
    path = tmp_path / "model.pt"
    torch.save(model.state_dict(), path)
    fresh = build(name, seed=123)
    fresh.load_state_dict(torch.load(path, weights_only=True, map_location="cpu"))
    x = torch.randn(1, 3, *ODD_SIZES[1])
    with torch.no_grad():
        assert torch.equal(model.eval()(x)["out"], fresh.eval()(x)["out"]), name


@pytest.mark.parametrize("name", AUX_NAMES)
def test_aux_head(name: str) -> None:
    model = build(name, aux_loss=True)
    with torch.no_grad():
        out = model.eval()(torch.randn(1, 3, *ODD_SIZES[1]))
    assert set(out) == {"out", "aux"}
    assert out["aux"].shape == (1, NUM_CLASSES, *ODD_SIZES[1])
    train_step(model, ODD_SIZES[1])
    assert all(p.grad is not None for p in model.aux_classifier.parameters())
