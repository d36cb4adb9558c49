"""Folding inference-mode BatchNorm into the convolution before it: the same function, one layer fewer.

Folded, the model computes the same affine map with one pass fewer over every feature map, the sums in another
order, so masks agree to rounding (tested; the speed-up is in docs/throughput.md).

Only pairs whose data flow is certain are folded: consecutive children of a plain ``nn.Sequential`` (one that
does not override ``forward``) or of torchvision's ``IntermediateLayerGetter`` (a backbone run child by child;
not where the conv's own output is returned), and the ``convN``/``bnN`` pairs of torchvision's ResNet blocks.
Anything else is left as it is, so folding never changes what a model computes beyond rounding.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval


def _foldable(conv: nn.Module, bn: nn.Module) -> bool:
    return (type(conv) is nn.Conv2d and type(bn) is nn.BatchNorm2d and bn.track_running_stats
            and bn.running_mean is not None and bn.num_features == conv.out_channels)


def _resnet_blocks() -> tuple[type, ...]:
    try:
        from torchvision.models.resnet import BasicBlock, Bottleneck
    except ImportError:
        return ()
    return BasicBlock, Bottleneck


def _sequential_children(module: nn.Module) -> tuple[list[str], set[str]] | None:
    """Names of children that `module` runs one after another, each on the last one's output, and those whose
    own output is also returned (never folded into); None if `module` does not run its children so."""
    if isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward:
        return list(module._modules), set()
    try:
        from torchvision.models._utils import IntermediateLayerGetter
    except ImportError:
        return None
    if type(module) is IntermediateLayerGetter:
        return list(module._modules), set(module.return_layers)
    return None


@torch.no_grad()
def fold_batchnorm(model: nn.Module) -> int:
    """Fold, in place, every BatchNorm2d that directly follows a Conv2d; returns how many were folded.

    The model must stay in eval mode afterwards (the folded statistics are the running ones); call it on a model
    used only for inference.
    """
    if model.training:
        raise ValueError("fold_batchnorm needs a model in eval mode: it folds the running statistics.")
    folded = 0
    resnet_blocks = _resnet_blocks()
    for module in list(model.modules()):
        children = _sequential_children(module)
        if children is not None:
            names, returned = children
            for first, second in zip(names, names[1:]):
                conv, bn = module._modules[first], module._modules[second]
                if first not in returned and _foldable(conv, bn):
                    module._modules[first] = fuse_conv_bn_eval(conv, bn)
                    module._modules[second] = nn.Identity()
                    folded += 1
        elif resnet_blocks and type(module) in resnet_blocks:
            for n in (1, 2, 3):
                conv, bn = getattr(module, f"conv{n}", None), getattr(module, f"bn{n}", None)
                if conv is not None and bn is not None and _foldable(conv, bn):
                    setattr(module, f"conv{n}", fuse_conv_bn_eval(conv, bn))
                    setattr(module, f"bn{n}", nn.Identity())
                    folded += 1
    return folded


__all__ = ["fold_batchnorm"]
