"""What makes each architecture itself: FCN skips and bilinear kernels, SegNet's and DeconvNet's index unpooling,
DeepLabv3's atrous rates, output stride and cascaded blocks, U-Net's skips and odd sizes."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from segmill.models import get_model
from segmill.models.architectures.deeplabv3 import ImagePooling
from segmill.models.architectures.fcn import bilinear_kernel, bilinear_upsampler

# ---------------------------------------------------------------- FCN on VGG16


def fcn(name: str) -> nn.Module:
    torch.manual_seed(0)
    return get_model(name, num_classes=3, fc_channels=64).eval()


def test_fcn_variants_fuse_their_pools() -> None:
    assert set(fcn("fcn32s_vgg16").score_pool) == set()
    assert set(fcn("fcn16s_vgg16").score_pool) == {"pool4"}
    assert set(fcn("fcn8s_vgg16").score_pool) == {"pool4", "pool3"}
    assert [fcn(n).output_stride for n in ("fcn32s_vgg16", "fcn16s_vgg16", "fcn8s_vgg16")] == [32, 16, 8]


def test_fcn8s_uses_pool3_and_pool4() -> None:
    model = fcn("fcn8s_vgg16")
    seen: dict[str, tuple[int, ...]] = {}
    for skip, conv in model.score_pool.items():
        assert not conv.weight.any() and not conv.bias.any(), "score_pool layers start at zero (paper)"
        conv.register_forward_hook(lambda m, i, o, skip=skip: seen.__setitem__(skip, tuple(i[0].shape)))
    x = torch.randn(1, 3, 65, 97)
    with torch.no_grad():
        before = model(x)["out"]
        assert seen == {"pool3": (1, 256, 8, 12), "pool4": (1, 512, 4, 6)}
        for skip in ("pool3", "pool4"):
            model.score_pool[skip].weight.normal_()
            after = model(x)["out"]
            assert not torch.allclose(before, after), f"{skip} does not reach the output"
            before = after


def test_fcn_upsampling_starts_bilinear() -> None:
    model = fcn("fcn8s_vgg16")
    ups = [*model.upscore2x.values(), model.upscore_final]
    for up in ups:
        assert torch.equal(up.weight, bilinear_kernel(3, 3, up.kernel_size[0]))
    assert not model.upscore_final.weight.requires_grad, "the last upsampling is fixed bilinear (paper)"
    assert all(up.weight.requires_grad for up in model.upscore2x.values())


@pytest.mark.parametrize("stride", [2, 8, 32])
def test_bilinear_upsampler_matches_interpolate(stride: int) -> None:
    x = torch.randn(1, 2, 5, 7)
    with torch.no_grad():
        up = bilinear_upsampler(2, stride)(x)
    ref = F.interpolate(x, scale_factor=stride, mode="bilinear", align_corners=False)
    b = stride // 2  # borders differ: interpolate clamps, the transposed conv pads with zeros
    torch.testing.assert_close(up[..., b:-b, b:-b], ref[..., b:-b, b:-b])


# ---------------------------------------------------------------- SegNet


def test_segnet_unpools_at_encoder_argmax() -> None:
    torch.manual_seed(0)
    model = get_model("segnet_vgg16", num_classes=3).eval()
    pools = [m for m in model.backbone.modules() if isinstance(m, nn.MaxPool2d)]
    unpools = [stage.unpool for stage in model.decoder]
    assert len(pools) == len(unpools) == 5
    pool_io, unpool_io = {}, {}
    for p in pools:
        p.register_forward_hook(lambda m, i, o: pool_io.__setitem__(m, (i[0], *o)))
    for u in unpools:
        u.register_forward_hook(lambda m, i, o: unpool_io.__setitem__(m, (i[0], i[1], o)))
    with torch.no_grad():
        model(torch.randn(1, 3, 33, 47))
    for pool, unpool in zip(reversed(pools), unpools):
        pre, values, indices = pool_io[pool]
        x, unpool_indices, out = unpool_io[unpool]
        assert torch.equal(unpool_indices, indices), "decoder uses its paired encoder's indices"
        assert out.shape == pre.shape, "unpooling restores the pre-pool size (odd sizes too)"
        flat_idx = indices.flatten(2)
        assert torch.equal(pre.flatten(2).gather(2, flat_idx), values.flatten(2)), "indices are the maxima"
        assert torch.equal(out.flatten(2).gather(2, flat_idx), x.flatten(2)), "values land on the maxima"
        rest = out.flatten(2).scatter(2, flat_idx, 0.0)
        assert not rest.any(), "everything off the maxima is zero"


# ---------------------------------------------------------------- DeepLabv3


@pytest.fixture(scope="module", params=[16, 8])
def deeplab(request: pytest.FixtureRequest) -> nn.Module:
    torch.manual_seed(0)
    return get_model("deeplabv3_resnet50", num_classes=3, output_stride=request.param).eval()


def test_deeplab_output_stride(deeplab: nn.Module) -> None:
    os_ = deeplab.output_stride
    with torch.no_grad():
        features = deeplab.backbone(torch.randn(1, 3, 64, 96))["out"]
    assert features.shape[-2:] == (64 // os_, 96 // os_)


def test_deeplab_multi_grid(deeplab: nn.Module) -> None:
    unit = 32 // deeplab.output_stride  # 2 at OS16, 4 at OS8
    convs = [block.conv2 for block in deeplab.backbone.layer4]
    assert [c.dilation for c in convs] == [(unit * g, unit * g) for g in (1, 2, 4)]
    assert [c.padding for c in convs] == [c.dilation for c in convs]
    assert all(c.stride == (1, 1) for c in convs)


def test_deeplab_aspp(deeplab: nn.Module) -> None:
    aspp = deeplab.aspp
    expected = (6, 12, 18) if deeplab.output_stride == 16 else (12, 24, 36)
    assert aspp.rates == expected
    assert len(aspp.branches) == 5
    atrous = [b[0] for b in aspp.branches[1:4]]
    assert [c.dilation for c in atrous] == [(r, r) for r in expected]
    assert aspp.branches[0][0].kernel_size == (1, 1)
    assert isinstance(aspp.branches[4], ImagePooling)
    assert aspp.project[0][0].in_channels == 5 * 256


def test_deeplab_custom_multi_grid_and_bad_stride() -> None:
    model = get_model("deeplabv3_resnet50", num_classes=3, multi_grid=(1, 1, 1))
    assert [b.conv2.dilation for b in model.backbone.layer4] == [(2, 2)] * 3
    with pytest.raises(ValueError, match="output_stride"):
        get_model("deeplabv3_resnet50", num_classes=3, output_stride=32)
    with pytest.raises(ValueError, match="multi_grid"):
        get_model("deeplabv3_resnet50", num_classes=3, multi_grid=(1, 2))


# ---------------------------------------------------------------- U-Net


@pytest.mark.parametrize("bilinear", [False, True])
@pytest.mark.parametrize("depth", [2, 4])
def test_unet_odd_sizes(bilinear: bool, depth: int) -> None:
    model = get_model("unet", num_classes=3, base_channels=8, depth=depth, bilinear=bilinear).eval()
    with torch.no_grad():
        for size in [(65, 97), (33, 47), (17, 23)]:
            assert model(torch.randn(1, 3, *size))["out"].shape == (1, 3, *size)


def test_unet_skips_are_concatenated() -> None:
    model = get_model("unet", num_classes=3, base_channels=8, depth=4).eval()
    assert model.backbone.channels == [8, 16, 32, 64, 128]
    seen = []
    for block in model.decoder:
        block.conv.register_forward_pre_hook(lambda m, i: seen.append(i[0].shape[1]))
    with torch.no_grad():
        model(torch.randn(1, 3, 33, 47))
    assert seen == [2 * 64, 2 * 32, 2 * 16, 2 * 8], "each decoder block sees upsampled + skip channels"
    backbone_ids = {id(p) for p in model.backbone.parameters()}
    assert not any(id(p) in backbone_ids for p in model.decoder.parameters())


# ---------------------------------------------------------------- DeconvNet


@pytest.fixture(scope="module")
def deconvnet() -> nn.Module:
    torch.manual_seed(0)
    return get_model("deconvnet_vgg16", num_classes=3, fc_channels=64).eval()


def test_deconvnet_unpools_at_encoder_argmax(deconvnet: nn.Module) -> None:
    pools = [m for m in deconvnet.backbone.features if isinstance(m, nn.MaxPool2d)]
    unpools = [stage.unpool for stage in deconvnet.decoder]
    assert len(pools) == len(unpools) == 5
    pool_io, unpool_io = {}, {}
    hooks = [p.register_forward_hook(lambda m, i, o: pool_io.__setitem__(m, (i[0], *o))) for p in pools]
    hooks += [u.register_forward_hook(lambda m, i, o: unpool_io.__setitem__(m, (i[0], i[1], o))) for u in unpools]
    with torch.no_grad():
        deconvnet(torch.randn(1, 3, 33, 47))
    for hook in hooks:
        hook.remove()
    for pool, unpool in zip(reversed(pools), unpools):
        pre, values, indices = pool_io[pool]
        x, unpool_indices, out = unpool_io[unpool]
        assert torch.equal(unpool_indices, indices), "each unpooling uses its paired pool's argmax indices"
        flat = indices.flatten(2)
        assert torch.equal(pre.flatten(2).gather(2, flat), values.flatten(2)), "the indices are the maxima"
        assert torch.equal(out.flatten(2).gather(2, flat), x.flatten(2)), "values land on the maxima"
        assert not out.flatten(2).scatter(2, flat, 0.0).any(), "everything off the maxima is zero"


@pytest.mark.parametrize("size", [(224, 224), (65, 97), (33, 47)])
def test_deconvnet_decoder_mirrors_the_encoder(deconvnet: nn.Module, size: tuple[int, int]) -> None:
    """Each decoder stage gives back the shape its encoder stage took; at the paper's 224x224, fc6 is 1x1."""
    encoder_in, decoder_out = [], []
    convs = [m for m in deconvnet.backbone.features if isinstance(m, nn.Conv2d)]
    stage_starts = [convs[i] for i in (0, 2, 4, 7, 10)]  # the first conv of each VGG16 stage
    hooks = [c.register_forward_hook(lambda m, i, o: encoder_in.append(tuple(i[0].shape))) for c in stage_starts]
    hooks += [s.register_forward_hook(lambda m, i, o: decoder_out.append(tuple(o.shape))) for s in deconvnet.decoder]
    fc6 = []
    hooks.append(deconvnet.backbone.fc6.register_forward_hook(lambda m, i, o: fc6.append(tuple(o.shape[-2:]))))
    with torch.no_grad():
        out = deconvnet(torch.randn(1, 3, *size))["out"]
    for hook in hooks:
        hook.remove()
    assert out.shape == (1, 3, *size)
    # The stage undoing pool k gives back the size encoder stage k took (its width that of stage k - 1).
    assert len(encoder_in) == len(decoder_out) == 5
    for produced, taken in zip(decoder_out, reversed(encoder_in)):
        assert produced[-2:] == taken[-2:], (produced, taken)
    assert [shape[1] for shape in decoder_out] == [512, 256, 128, 64, 64]
    if size == (224, 224):
        assert fc6 == [(1, 1)], "the paper's fc6: a 7x7 convolution of the 7x7 pool5 map"


def test_deconvnet_deconvolutions_are_transposed_convolutions(deconvnet: nn.Module) -> None:
    deconvs = [m for stage in deconvnet.decoder for m in stage.modules() if isinstance(m, nn.ConvTranspose2d)]
    assert len(deconvs) == 13, "one deconvolution per encoder convolution"
    assert isinstance(deconvnet.deconv6[0], nn.ConvTranspose2d) and deconvnet.deconv6[0].kernel_size == (7, 7)
    assert deconvnet.backbone.fc6.kernel_size == (7, 7) and deconvnet.backbone.fc7.kernel_size == (1, 1)


# ---------------------------------------------------------------- DeepLabv3's cascaded blocks


@pytest.mark.parametrize("output_stride", [16, 8])
@pytest.mark.parametrize("cascade_blocks", [1, 3])
def test_cascaded_blocks_keep_the_output_stride_with_doubling_rates(output_stride: int, cascade_blocks: int) -> None:
    torch.manual_seed(0)
    model = get_model("deeplabv3_resnet50", num_classes=3, output_stride=output_stride,
                      cascade_blocks=cascade_blocks).eval()
    assert len(model.cascade) == cascade_blocks
    unit = 32 // output_stride  # block4's unit rate
    for k, block in enumerate(model.cascade, start=1):  # block5, block6, block7
        rate = unit * 2 ** k
        assert [b.conv2.dilation for b in block] == [(rate * g, rate * g) for g in (1, 2, 4)], f"block{4 + k}"
        assert all(b.conv2.stride == (1, 1) and b.conv2.padding == b.conv2.dilation for b in block)
    seen = []
    hook = model.cascade[-1].register_forward_hook(lambda m, i, o: seen.append(tuple(o.shape[-2:])))
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 96))["out"].shape == (1, 3, 64, 96)
    hook.remove()
    assert seen == [(64 // output_stride, 96 // output_stride)], "the last cascaded block keeps the output stride"


def test_each_cascaded_block_adds_one_block4_copy_of_parameters() -> None:
    """A copy of block4 on 2048 channels: three bottlenecks of 1x1 2048->512, 3x3 512->512, 1x1 512->2048 (no
    biases), each with its three BatchNorms."""
    per_bottleneck = 2048 * 512 + 512 * 512 * 9 + 512 * 2048 + 2 * (512 + 512 + 2048)
    counts = [sum(p.numel() for p in get_model("deeplabv3_resnet50", num_classes=3, cascade_blocks=n).parameters())
              for n in range(4)]
    assert [b - a for a, b in zip(counts, counts[1:])] == [3 * per_bottleneck] * 3


def test_cascade_without_aspp_scores_the_last_block() -> None:
    model = get_model("deeplabv3_resnet50", num_classes=3, cascade_blocks=3, aspp=False).eval()
    assert model.aspp is None and model.classifier.logits.in_channels == 2048
    with torch.no_grad():
        assert model(torch.randn(1, 3, 33, 47))["out"].shape == (1, 3, 33, 47)
    with pytest.raises(ValueError, match="cascade_blocks"):
        get_model("deeplabv3_resnet50", num_classes=3, cascade_blocks=4)
