"""The U-Net: shapes, clear errors for inputs it cannot take, and parity with diffusers' UNet2DModel."""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DModel

from diffusekit.errors import UserError
from diffusekit.nn.unet import UNet

SMALL = {"attention_head_dim": 8, "norm_groups": 4}


def make_unet(in_channels=1, channels=(8, 16), attention_levels=(1,), num_classes=0, seed=0, **kwargs) -> UNet:
    torch.manual_seed(seed)
    return UNet(in_channels, in_channels, channels=channels, attention_levels=attention_levels, num_classes=num_classes, **{**SMALL, **kwargs}).eval()


@pytest.mark.parametrize(
    "in_channels, channels, attention_levels, mid_attention, layers, size",
    [
        (1, (8, 16), (1,), True, 1, 8),
        (3, (8, 16), (), False, 1, 16),
        (1, (8, 16, 16), (0, 2), True, 2, 12),
        (3, (8, 8, 16, 16), (3,), True, 1, 24),
    ],
)
def test_output_shape_matches_input(in_channels, channels, attention_levels, mid_attention, layers, size):
    net = make_unet(in_channels, channels, attention_levels, mid_attention=mid_attention, layers_per_block=layers)
    x = torch.randn(2, in_channels, size, size)
    with torch.no_grad():
        out = net(x, torch.tensor([3.0, 71.5]))
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_class_labels_change_the_output():
    net = make_unet(num_classes=3)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([10.0])
    with torch.no_grad():
        a, b = net(x, t, class_labels=torch.tensor([0, 0])), net(x, t, class_labels=torch.tensor([1, 2]))
    assert a.shape == x.shape
    assert not torch.allclose(a, b)


def test_missing_labels_use_the_null_class():
    net = make_unet(num_classes=3)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([10.0])
    with torch.no_grad():
        torch.testing.assert_close(net(x, t), net(x, t, class_labels=torch.tensor([3, 3])), rtol=0, atol=0)


def test_image_size_the_unet_cannot_take_is_a_user_error():
    net = make_unet(channels=(8, 16, 16))
    with pytest.raises(UserError, match=r"30x30.*multiples of 4"):
        net(torch.randn(1, 1, 30, 30), torch.tensor([1.0]))


def test_wrong_channel_count_is_a_user_error():
    net = make_unet(in_channels=3)
    with pytest.raises(UserError, match=r"\[batch, 3, H, W\].*\[1, 1, 8, 8\]"):
        net(torch.randn(1, 1, 8, 8), torch.tensor([1.0]))


# ----------------------------------------------------------------------------- parity with diffusers


def diffusers_twin(in_channels, channels, attention_levels, layers, mid_attention, num_classes) -> UNet2DModel:
    down = [("AttnDownBlock2D" if i in attention_levels else "DownBlock2D") for i in range(len(channels))]
    up = [("AttnUpBlock2D" if i in attention_levels else "UpBlock2D") for i in reversed(range(len(channels)))]
    torch.manual_seed(1)
    return UNet2DModel(
        in_channels=in_channels, out_channels=in_channels, block_out_channels=channels, layers_per_block=layers,
        down_block_types=down, up_block_types=up, add_attention=mid_attention, attention_head_dim=SMALL["attention_head_dim"],
        norm_num_groups=SMALL["norm_groups"], num_class_embeds=num_classes + 1 if num_classes else None,
    ).eval()


@pytest.mark.parametrize(
    "in_channels, channels, attention_levels, layers, mid_attention, num_classes",
    [
        (1, (8, 16), (1,), 1, True, 0),
        (3, (8, 16, 16), (0, 2), 2, False, 0),
        (1, (8, 16, 16), (), 1, True, 4),
    ],
)
def test_parity_with_diffusers_unet2dmodel(in_channels, channels, attention_levels, layers, mid_attention, num_classes):
    ref = diffusers_twin(in_channels, channels, attention_levels, layers, mid_attention, num_classes)
    ours = make_unet(in_channels, channels, attention_levels, num_classes, layers_per_block=layers, mid_attention=mid_attention)
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(3, in_channels, 16, 16, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([0.0, 17.0, 999.0])
    labels = torch.tensor([0, num_classes - 1, num_classes]) if num_classes else None
    with torch.no_grad():
        expected = ref(x, t, class_labels=labels).sample
        got = ours(x, t, class_labels=labels)
    assert expected.abs().max() > 0.01
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_plain_matmul_attention_is_torchs_attention_and_serves_only_bf16_training():
    """The plain-matmul attention that bf16 training on a CPU uses equals the fused kernel (float32: to 1e-6; with
    a mask), its gradients too; sampling, float32 and long key sequences keep the fused kernel."""
    import torch.nn.functional as F

    from diffusekit.nn.blocks import matmul_attention, plain_matmuls_are_faster

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, n, 8, dtype=torch.float64, requires_grad=True) for n in (10, 7, 7))
    mask = torch.rand(2, 1, 1, 7) > 0.3
    mask[..., 0] = True  # every query sees a key
    ours, theirs = matmul_attention(q, k, v, mask), F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert (ours - theirs).abs().max() < 1e-10
    grads = [torch.autograd.grad(out.square().sum(), (q, k, v)) for out in (ours, theirs)]
    assert all((a - b).abs().max() < 1e-10 for a, b in zip(*grads))
    small = torch.randn(2, 2, 49, 8, dtype=torch.bfloat16, requires_grad=True)
    large = torch.randn(2, 2, 1024, 8, dtype=torch.bfloat16, requires_grad=True)  # 1024 queries x 1024 keys
    assert plain_matmuls_are_faster(small, small) and plain_matmuls_are_faster(large, small)  # few keys
    assert not plain_matmuls_are_faster(small.float(), small.float()) and not plain_matmuls_are_faster(large, large)
    with torch.no_grad():
        assert not plain_matmuls_are_faster(small, small)
