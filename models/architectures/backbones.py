"""Backbones shared by the model families, and the one place backbone weights are resolved and loaded.

`backbone_weights` is the same argument on every builder:
- None: random initialisation (the default; nothing is downloaded);
- a torchvision weights tag such as "IMAGENET1K_V1" or "DEFAULT", looked up in the backbone's weights enum
  (e.g. `ResNet50_Weights`) and downloaded by torchvision (needs network access or a warm torch hub cache);
- a path to a local state-dict file (`torch.save(model.backbone.state_dict(), path)`, or a torchvision
  classification checkpoint), read with `torch.load(..., weights_only=True)`.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import Tensor, nn
from torchvision.models import ResNet50_Weights, ResNet101_Weights, resnet50, resnet101
from torchvision.models._api import WeightsEnum
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.vgg import cfgs as _VGG_CFGS
from torchvision.models.vgg import make_layers

Convert = Callable[[dict[str, Tensor]], dict[str, Tensor]]

_WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


def resolve_weights_enum(enum_cls: type[WeightsEnum] | None, tag: str, what: str = "weights") -> WeightsEnum:
    """Look up a torchvision weights tag (e.g. "IMAGENET1K_V1") in `enum_cls`, with a one-sentence error."""
    if enum_cls is None:
        raise ValueError(f"Unknown {what} {tag!r}: this model has no published weights; pass a local file path.")
    try:
        return enum_cls[tag]
    except KeyError:
        choices = ", ".join(enum_cls.__members__)
        raise ValueError(
            f"Unknown {what} {tag!r} for {enum_cls.__name__}; use one of {choices} or a local file path."
        ) from None


def _read_state_dict(weights: str, enum_cls: type[WeightsEnum] | None) -> dict[str, Tensor]:
    path = Path(os.path.expanduser(weights))
    if path.is_file():
        state = torch.load(path, weights_only=True, map_location="cpu")
        if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
            raise ValueError(f"Backbone weights file {weights!r} does not hold a state dict of tensors.")
        return dict(state)
    looks_like_path = os.sep in weights or "/" in weights or weights.endswith(_WEIGHT_SUFFIXES)
    if looks_like_path or path.exists():
        raise ValueError(f"Backbone weights file {weights!r} does not exist or is not a file.")
    return dict(resolve_weights_enum(enum_cls, weights, "backbone weights").get_state_dict(progress=False))


def load_backbone_weights(
    backbone: nn.Module,
    weights: str | None,
    enum_cls: type[WeightsEnum] | None,
    *,
    convert: Convert | None = None,
) -> None:
    """Load `weights` (None, a torchvision tag of `enum_cls`, or a local file) into `backbone` in place.

    The source may hold more tensors than the backbone (a classifier's `fc.*` is ignored), but every tensor of
    the backbone must be present with the same shape. `convert` renames or reshapes the source first (e.g. to
    strip a "features." prefix).
    """
    if weights is None:
        return
    state = _read_state_dict(str(weights), enum_cls)
    if convert is not None:
        state = convert(state)
    own = backbone.state_dict()
    missing = [k for k in own if k not in state]
    if missing:
        raise ValueError(
            f"Backbone weights {weights!r} lack {len(missing)} of the backbone's tensors (first: {missing[0]!r}); "
            "check that they are for this backbone."
        )
    wrong = [k for k, v in own.items() if state[k].shape != v.shape]
    if wrong:
        k = wrong[0]
        raise ValueError(
            f"Backbone weights {weights!r} have shape {tuple(state[k].shape)} for {k!r} where the backbone "
            f"has {tuple(own[k].shape)}; check that they are for this backbone."
        )
    backbone.load_state_dict({k: state[k] for k in own}, strict=True)


def strip_prefix(prefix: str) -> Convert:
    """A `convert` for `load_backbone_weights` that drops `prefix` from the keys that have it."""

    def convert(state: dict[str, Tensor]) -> dict[str, Tensor]:
        return {k.removeprefix(prefix): v for k, v in state.items()}

    return convert


def vgg_classifier_as_conv(backbone: nn.Module) -> Convert:
    """A `convert` that reshapes VGG16's classifier.0/.3 into the backbone's `fc6` (7x7) and `fc7` (1x1) convolutions,
    as FCN and DeconvNet initialise them; any other fc6/fc7 tensor the source lacks (a BatchNorm added after them,
    or weights of another width when `fc_channels` != 4096) keeps the backbone's own initialisation."""
    own = backbone.state_dict()

    def convert(state: dict[str, Tensor]) -> dict[str, Tensor]:
        state = dict(state)
        for key in (k for k in own if k.startswith(("fc6", "fc7")) and k not in state):
            layer, _, kind = key.partition(".")
            source = state.get(f"classifier.{0 if layer == 'fc6' else 3}.{kind}") if layer in ("fc6", "fc7") else None
            fits = source is not None and source.numel() == own[key].numel()
            state[key] = source.reshape(own[key].shape) if fits else own[key]
        return state

    return convert


def vgg16_features(*, batch_norm: bool = False) -> nn.Sequential:
    """VGG16's 13 conv layers and 5 max-pools, indexed like torchvision's `vgg16[_bn]().features`.

    Built without the 120M-parameter classifier; initialised as torchvision initialises VGG.
    """
    features = make_layers(_VGG_CFGS["D"], batch_norm=batch_norm)
    for m in features.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    return features


_RESNETS = {50: (resnet50, ResNet50_Weights), 101: (resnet101, ResNet101_Weights)}


def resnet_backbone(
    depth: int,
    weights: str | None,
    *,
    replace_stride_with_dilation: list[bool],
    return_layers: dict[str, str],
) -> IntermediateLayerGetter:
    """A torchvision ResNet-`depth` with dilation instead of stride where asked, returning named feature maps.

    Weights are loaded after wrapping, so a file saved from `model.backbone.state_dict()` loads back as is.
    """
    if depth not in _RESNETS:
        raise ValueError(f"Unsupported ResNet depth {depth}; use one of {sorted(_RESNETS)}.")
    build, enum_cls = _RESNETS[depth]
    net = build(weights=None, replace_stride_with_dilation=replace_stride_with_dilation)
    backbone = IntermediateLayerGetter(net, return_layers=return_layers)
    load_backbone_weights(backbone, weights, enum_cls)
    return backbone
