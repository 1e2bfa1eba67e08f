"""LoRA (Hu et al. 2021, eq. 3: h = W0 x + (alpha / r) B A x): the layer module."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import max_diff

from diffusekit.errors import UserError
from diffusekit.nn import lora
from diffusekit.nn.unet import UNet

TOL = 1e-4


def tiny_unet(seed: int = 0) -> UNet:
    torch.manual_seed(seed)
    return UNet(4, 4, channels=(16, 32), attention_levels=(0,), cross_attention_dim=32, attention_heads=2, norm_groups=8).eval()


def unet_inputs(n: int = 2):
    g = torch.Generator().manual_seed(11)
    return torch.randn(n, 4, 8, 8, generator=g), torch.tensor([10.0, 700.0])[:n], torch.randn(n, 7, 32, generator=g)


def randomize(loras, seed: int, std: float = 0.2) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for x in loras:
            x.down.normal_(0, std, generator=g)
            x.up.normal_(0, std, generator=g)


# ----------------------------------------------------------------------------- the layer module


def test_merge_then_unmerge_gives_back_the_weights_and_merged_equals_unmerged():
    net = tiny_unet()
    x, t, ctx = unet_inputs()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with torch.no_grad():
        base = net(x, t, context=ctx)
    randomize(lora.inject_lora(net, "a", 4, 8, targets=("attention", "ff", "proj", "conv")).values(), 1)
    lora.set_scales(net, {"a": 0.7})
    with torch.no_grad():
        unmerged = net(x, t, context=ctx)
        lora.merge(net)
        merged = net(x, t, context=ctx)
    assert max_diff(merged, unmerged) <= 1e-5 and max_diff(unmerged, base) > 1e-2
    assert max(max_diff(net.state_dict()[k], before[k]) for k in before) > 1e-2  # merging changed the weights ...
    with pytest.raises(UserError, match="unmerge"):
        lora.set_scales(net, {"a": 0.5})
    lora.unmerge(net)
    assert max(max_diff(net.state_dict()[k], before[k]) for k in before) <= 1e-6  # ... and unmerging undid it


def test_several_loras_on_one_layer_add_their_own_scaled_deltas():
    layer, x = nn.Linear(6, 5).requires_grad_(False), torch.randn(3, 6)
    a, b = lora.add_lora(layer, "a", 2, alpha=4).requires_grad_(False), lora.add_lora(layer, "b", 3).requires_grad_(False)
    randomize([a, b], 2)
    lora.set_scales(layer, {"a": 0.8, "b": -0.5})
    expected = x @ layer.weight.T + layer.bias + 0.8 * (4 / 2) * x @ (a.up @ a.down).T - 0.5 * (3 / 3) * x @ (b.up @ b.down).T
    assert max_diff(layer(x), expected) <= 1e-5
    lora.set_scales(layer, {"a": 0.0})
    assert max_diff(layer(x), x @ layer.weight.T + layer.bias - 0.5 * x @ (b.up @ b.down).T) <= 1e-5
    with pytest.raises(UserError, match="finite number"):
        lora.set_scales(layer, {"b": "0.5"})


def test_injection_keeps_the_base_state_dict_and_a_new_lora_changes_nothing():
    net, x, t, ctx = tiny_unet(), *unet_inputs()
    run = torch.no_grad()(lambda: net(x, t, context=ctx))
    keys, out = list(net.state_dict()), run()
    injected = lora.inject_lora(net, "a", 4)
    assert len(injected) == 4 * 2 * 4  # q, k, v, out of attn1 and attn2 in 4 transformers (down 1, mid 1, up 2)
    assert all(path.endswith(("to_q", "to_k", "to_v", "to_out.0")) for path in injected)
    assert list(net.state_dict()) == keys
    net.load_state_dict(tiny_unet(1).state_dict())  # strict: a base checkpoint still loads
    net.load_state_dict(tiny_unet(0).state_dict())
    assert max_diff(run(), out) == 0  # B = 0 at the start
    down = injected["mid_block.attentions.0.transformer_blocks.0.attn2.to_k"].down
    assert down.shape == (4, 32) and down.std() > 0 and down.abs().max() <= 1 / 32**0.5  # Kaiming-uniform, a = sqrt(5)
    assert len(lora.lora_parameters(net)) == 2 * len(injected) and all(p.requires_grad for p in lora.lora_parameters(net))
    assert set(lora.lora_state_dict(net, "a")) == {f"{p}.lora_{m}.weight" for p in injected for m in "AB"}
    lora.remove_lora(net)
    assert lora.adapter_names(net) == [] and not hasattr(net.mid_block.attentions[0].proj_in, "lora")


def test_a_conv_lora_is_a_down_conv_with_the_base_kernel_and_a_1x1_up_conv():
    conv = nn.Conv2d(3, 5, 3, stride=2, padding=1).requires_grad_(False)
    x = lora.add_lora(conv, "a", 2, alpha=1).requires_grad_(False)
    assert (x.down.shape, x.up.shape) == ((2, 3, 3, 3), (5, 2, 1, 1))
    randomize([x], 3)
    inp = torch.randn(1, 3, 8, 8)
    expected = nn.functional.conv2d(inp, conv.weight + x.delta(), conv.bias, stride=2, padding=1)
    assert max_diff(conv(inp), expected) <= 1e-5


def test_wrong_targets_names_and_ranks_are_user_errors():
    with pytest.raises(UserError, match="this model has no attention layers to fine-tune"):
        lora.inject_lora(nn.Sequential(nn.Conv2d(3, 3, 3)), "a", 4)
    net = tiny_unet()
    lora.inject_lora(net, "a", 4)
    with pytest.raises(UserError, match="already loaded"):
        lora.inject_lora(net, "a", 4)
    with pytest.raises(UserError, match="rank"):
        lora.inject_lora(net, "b", 0)
    mixed = nn.Sequential(nn.Linear(4, 4), nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(UserError, match="groups = 1"):
        lora.inject_lora(mixed, "b", 2, targets=("0", "1"))
    assert lora.adapter_names(net) == ["a"] and lora.adapter_names(mixed) == [] and not hasattr(mixed[0], "lora")  # all or nothing
    with pytest.raises(UserError, match="no LoRA named 'c'.*loaded: a"):
        lora.set_scales(net, {"c": 1.0})
