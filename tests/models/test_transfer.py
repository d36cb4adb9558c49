"""Backbone weights (local files, torchvision tags without the network), freezing and parameter groups."""
from __future__ import annotations

import pytest
import torch
import torchvision.models._api as tv_api
from torch import nn
from torchvision.models import (
    MobileNet_V3_Large_Weights,
    ResNet50_Weights,
    VGG16_BN_Weights,
    VGG16_Weights,
    mobilenet_v3_large,
)

from segmill.models import get_model
from segmill.models.architectures.backbones import vgg16_features
from segmill.models.transfer import (
    freeze_backbone,
    param_groups,
    set_backbone_bn_eval,
    unfreeze_backbone,
)

SMALL = {
    "unet": {"base_channels": 8, "depth": 2},
    "fcn8s_vgg16": {"fc_channels": 64},
    "segnet_vgg16": {},
    "deconvnet_vgg16": {"fc_channels": 64},
    "fcn_resnet50": {},
    "lraspp_mobilenet_v3_large": {},
}


def build(name: str, seed: int = 0, **kwargs) -> nn.Module:
    torch.manual_seed(seed)
    return get_model(name, num_classes=3, **SMALL.get(name, {}), **kwargs)


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("name", sorted(SMALL))
def test_backbone_weights_from_local_file(name: str, tmp_path) -> None:
    source = build(name, seed=0)
    path = tmp_path / "backbone.pt"
    torch.save(source.backbone.state_dict(), path)
    model = build(name, seed=1, backbone_weights=str(path))
    assert_same_tensors(model.backbone.state_dict(), source.backbone.state_dict())
    head = [n for n, _ in model.named_parameters() if not n.startswith("backbone.")]
    assert any(not torch.equal(model.get_parameter(n), source.get_parameter(n)) for n in head)


@pytest.fixture
def fake_download(monkeypatch: pytest.MonkeyPatch) -> dict[str, dict[str, torch.Tensor]]:
    """Serve torchvision weight URLs from a dict instead of the network; records what was asked for."""
    served: dict[str, dict[str, torch.Tensor]] = {}

    def load_state_dict_from_url(url: str, *args, **kwargs) -> dict[str, torch.Tensor]:
        assert kwargs.get("progress") is False
        return served[url]

    monkeypatch.setattr(tv_api, "load_state_dict_from_url", load_state_dict_from_url)
    return served


def test_tag_resolves_through_resnet_enum(fake_download) -> None:
    source = build("fcn_resnet50", seed=5).backbone.state_dict()
    fake_download[ResNet50_Weights.IMAGENET1K_V1.url] = {
        **source,
        "fc.weight": torch.zeros(1000, 2048),  # classifier tensors are ignored
        "fc.bias": torch.zeros(1000),
    }
    model = build("fcn_resnet50", backbone_weights="IMAGENET1K_V1")
    assert_same_tensors(model.backbone.state_dict(), source)


def test_tag_strips_mobilenet_prefix(fake_download) -> None:
    torch.manual_seed(7)
    net = mobilenet_v3_large(dilated=True)
    fake_download[MobileNet_V3_Large_Weights.IMAGENET1K_V2.url] = net.state_dict()
    model = build("lraspp_mobilenet_v3_large", backbone_weights="IMAGENET1K_V2")
    expected = {k: v for k, v in net.features.state_dict().items() if k in model.backbone.state_dict()}
    assert_same_tensors(model.backbone.state_dict(), expected)


def test_vgg_classifier_becomes_fc6_fc7(fake_download) -> None:
    features = vgg16_features().state_dict()
    fc6 = torch.arange(4096 * 25088, dtype=torch.float32).reshape(4096, 25088)
    fc7 = torch.randn(4096, 4096)
    fake_download[VGG16_Weights.IMAGENET1K_V1.url] = {
        **{f"features.{k}": v for k, v in features.items()},
        "classifier.0.weight": fc6,
        "classifier.0.bias": torch.ones(4096),
        "classifier.3.weight": fc7,
        "classifier.3.bias": torch.zeros(4096),
        "classifier.6.weight": torch.zeros(1000, 4096),
        "classifier.6.bias": torch.zeros(1000),
    }
    model = get_model("fcn32s_vgg16", num_classes=3, backbone_weights="IMAGENET1K_V1")
    assert torch.equal(model.backbone.features[0].weight, features["0.weight"])
    assert torch.equal(model.backbone.fc6.weight, fc6.view(4096, 512, 7, 7))
    assert torch.equal(model.backbone.fc7.weight[:, :, 0, 0], fc7)
    del model
    narrow = get_model("fcn32s_vgg16", num_classes=3, fc_channels=64, backbone_weights="IMAGENET1K_V1")
    assert torch.equal(narrow.backbone.features[0].weight, features["0.weight"])  # fc6/fc7 stay random


def test_deconvnet_takes_vgg16_bn_with_its_classifier_as_fc6_fc7(fake_download) -> None:
    """The encoder and fc6/fc7 come from VGG16-BN (the paper's VGG16, with BatchNorm); the BatchNorms after fc6 and
    fc7, which VGG16-BN lacks, keep their initialisation."""
    torch.manual_seed(2)
    features = vgg16_features(batch_norm=True).state_dict()
    fc6, fc7 = torch.randn(4096, 25088), torch.randn(4096, 4096)
    fake_download[VGG16_BN_Weights.IMAGENET1K_V1.url] = {
        **{f"features.{k}": v for k, v in features.items()},
        "classifier.0.weight": fc6, "classifier.0.bias": torch.ones(4096),
        "classifier.3.weight": fc7, "classifier.3.bias": torch.zeros(4096),
        "classifier.6.weight": torch.zeros(1000, 4096), "classifier.6.bias": torch.zeros(1000),
    }
    model = get_model("deconvnet_vgg16", num_classes=3, backbone_weights="IMAGENET1K_V1")
    assert_same_tensors({k: v for k, v in model.backbone.features.state_dict().items()}, features)
    assert torch.equal(model.backbone.fc6.weight, fc6.view(4096, 512, 7, 7))
    assert torch.equal(model.backbone.fc7.weight[:, :, 0, 0], fc7)
    assert torch.equal(model.backbone.fc6_bn.weight, torch.ones(4096)), "fc6's BatchNorm keeps its initialisation"


@pytest.mark.parametrize(
    ("name", "kwargs", "match"),
    [
        ("fcn_resnet50", {"backbone_weights": "IMAGENET_NOPE"}, "'IMAGENET_NOPE'.*ResNet50_Weights"),
        ("segnet_vgg16", {"backbone_weights": "NOPE_V9"}, "'NOPE_V9'.*VGG16_BN_Weights"),
        ("unet", {"backbone_weights": "IMAGENET1K_V1"}, "'IMAGENET1K_V1'.*local file"),
        ("unet", {"backbone_weights": "/no/such/dir/backbone.pt"}, "'/no/such/dir/backbone.pt' does not exist"),
        ("lraspp_mobilenet_v3_large", {"weights": "VOC_NOPE"}, "'VOC_NOPE'.*LRASPP_MobileNet_V3_Large_Weights"),
        ("lraspp_mobilenet_v3_large", {"weights": "COCO_WITH_VOC_LABELS_V1"}, "num_classes=21"),
        ("deeplabv3_mobilenet_v3_large", {"weights": "DEFAULT", "backbone_weights": "DEFAULT"}, "not both"),
    ],
)
def test_bad_weights_are_one_clear_error(name: str, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build(name, **kwargs)


def test_weights_for_another_backbone_are_refused(tmp_path) -> None:
    path = tmp_path / "wide.pt"
    torch.save(get_model("unet", base_channels=16, depth=2).backbone.state_dict(), path)
    with pytest.raises(ValueError, match="shape"):
        build("unet", backbone_weights=str(path))
    torch.save({"x": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match="lack"):
        build("unet", backbone_weights=str(path))


def test_param_groups_lower_backbone_lr() -> None:
    model = build("unet")
    groups = param_groups(model, lr=0.01, backbone_lr_mult=0.1, weight_decay=1e-4)
    by_name = {g["name"]: g for g in groups}
    assert by_name["backbone"]["lr"] == pytest.approx(0.001)
    assert by_name["head"]["lr"] == pytest.approx(0.01)
    assert {id(p) for p in by_name["backbone"]["params"]} == {id(p) for p in model.backbone.parameters()}
    assert len(by_name["backbone"]["params"]) + len(by_name["head"]["params"]) == len(list(model.parameters()))
    torch.optim.SGD(groups, lr=0.01, momentum=0.9)  # torch accepts the groups as they are


def test_param_groups_leave_out_fixed_layers() -> None:
    model = build("fcn8s_vgg16")
    head = {id(p) for g in param_groups(model, lr=0.01) for p in g["params"]}
    assert id(model.upscore_final.weight) not in head


def test_freeze_backbone() -> None:
    model = freeze_backbone(build("unet"))
    groups = param_groups(model, lr=0.01)
    assert [g["name"] for g in groups] == ["head"]
    assert not any(p.requires_grad for p in model.backbone.parameters())

    model.train()  # switches every BatchNorm back to training...
    set_backbone_bn_eval(model)  # ...so the training loop re-applies this after model.train()
    backbone_bn = [m for m in model.backbone.modules() if isinstance(m, nn.BatchNorm2d)]
    assert backbone_bn and not any(m.training for m in backbone_bn)
    assert all(m.training for m in model.decoder.modules() if isinstance(m, nn.BatchNorm2d))

    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    optimizer = torch.optim.SGD(groups, lr=0.1)
    model(torch.randn(2, 3, 33, 47))["out"].mean().backward()
    optimizer.step()
    assert_same_tensors(model.backbone.state_dict(), before)  # weights and running statistics

    unfreeze_backbone(model)
    assert all(p.requires_grad for p in model.backbone.parameters())
    assert all(m.training for m in backbone_bn)
