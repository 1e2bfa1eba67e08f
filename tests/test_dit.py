"""The Diffusion Transformer (nn/dit.py): shapes, conditioning, adaLN-Zero at initialisation,
input checks, masking, gradients, and parity with diffusers' DiTTransformer2DModel both ways."""

from __future__ import annotations

import pytest
import torch

from diffusekit.errors import UserError
from diffusekit.nn.dit import DiT

TINY = dict(hidden_size=32, depth=2, num_heads=2)


def tiny_dit(**kwargs) -> DiT:
    return DiT(**{"in_channels": 4, "sample_size": 8, "patch_size": 2, **TINY, **kwargs})


def perturb(module: torch.nn.Module, seed: int = 0, std: float = 0.3) -> torch.nn.Module:
    """Move every weight off its initialisation (adaLN-Zero and the final layer start at zero)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * std)
    return module


def inputs(batch=3, channels=4, size=8, seed=1):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, size, size, generator=generator)
    t = torch.tensor([0.5, 10.25, 999.0][:batch] + [3.0] * max(0, batch - 3))
    return x, t


@pytest.mark.parametrize(
    "channels, size, patch",
    [(1, 28, 2), (1, 28, 4), (4, 16, 2)],  # MNIST pixels (28 = 14 x 2 = 7 x 4) and SD-like latents
)
def test_output_has_the_input_shape(channels, size, patch):
    net = perturb(DiT(in_channels=channels, sample_size=size, patch_size=patch, **TINY))
    x, t = inputs(2, channels, size)
    assert net(x, t).shape == x.shape
    assert net(x, torch.tensor(5.0)).shape == x.shape  # a scalar t is expanded to the batch


def test_class_conditioning_and_the_null_class():
    net = perturb(tiny_dit(num_classes=10)).eval()
    x, t = inputs()
    assert net.transformer_blocks[0].norm1.emb.class_embedder["embedding_table"].num_embeddings == 11
    a, b = net(x, t, class_labels=torch.tensor([1, 2, 3])), net(x, t, class_labels=torch.tensor([4, 2, 3]))
    assert a.shape == x.shape
    assert not torch.allclose(a[0], b[0]) and torch.allclose(a[1:], b[1:])
    null = torch.full((3,), 10)
    assert torch.equal(net(x, t), net(x, t, class_labels=null))  # no labels: the null class (index num_classes)


def test_text_conditioning():
    net = perturb(tiny_dit(cross_attention_dim=12, num_classes=3))
    x, t = inputs()
    context, mask = torch.randn(3, 5, 12), torch.ones(3, 5)
    out = net(x, t, context=context, context_mask=mask)
    assert out.shape == x.shape
    assert not torch.allclose(out, net(x, t, context=torch.randn(3, 5, 12), context_mask=mask))
    assert net(x, t, class_labels=torch.tensor([0, 1, 2]), context=context).shape == x.shape
    with pytest.raises(UserError, match="text-conditioned.*width 12"):
        net(x, t)


def test_context_mask_hides_padding():
    net = perturb(tiny_dit(cross_attention_dim=12)).eval()
    x, t = inputs()
    context = torch.randn(3, 6, 12)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1], [1, 0, 0, 0, 0, 0]])
    changed = torch.where(mask.bool()[..., None], context, torch.randn(3, 6, 12) * 10)
    a, b = net(x, t, context=context, context_mask=mask), net(x, t, context=changed, context_mask=mask)
    assert torch.allclose(a, b, atol=1e-6, rtol=0)
    unmasked = net(x, t, context=changed, context_mask=torch.ones(3, 6))
    assert not torch.allclose(a[0], unmasked[0])  # the padding does matter once it is not masked


def test_adaln_zero_initialisation_is_the_identity():
    net = tiny_dit(num_classes=10, cross_attention_dim=12)
    x, t = inputs()
    context = torch.randn(3, 5, 12)
    assert torch.equal(net(x, t, context=context), torch.zeros_like(x))  # zero-initialised final layer
    tokens, c = torch.randn(3, 16, 32), torch.randn(3, 32)
    for block in net.transformer_blocks:
        _, gate_attn, (_, _, gate_mlp) = block.norm1(tokens, c)
        assert torch.equal(gate_attn, torch.zeros_like(gate_attn)) and torch.equal(gate_mlp, torch.zeros_like(gate_mlp))
        assert torch.equal(block(tokens, c, context), tokens)  # every block starts as the identity


def test_gradients_reach_every_parameter():
    net = perturb(tiny_dit(num_classes=4, cross_attention_dim=12, pos_embed="learned"), std=0.1)
    x, t = inputs()
    out = net(x, t, class_labels=torch.tensor([0, 4, 2]), context=torch.randn(3, 5, 12), context_mask=torch.tensor([[1, 1, 0, 0, 0]] * 3))
    out.square().mean().backward()
    missing = [name for name, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


def test_input_checks():
    net = DiT(in_channels=1, sample_size=28, patch_size=4, **TINY)
    with pytest.raises(UserError, match=r"30x30 does not divide into this DiT's 4x4 patches"):
        net(torch.randn(1, 1, 30, 30), torch.tensor([1.0]))
    with pytest.raises(UserError, match=r"shape \[batch, 1, H, W\]"):
        net(torch.randn(1, 3, 28, 28), torch.tensor([1.0]))
    assert net(torch.randn(2, 1, 16, 32), torch.tensor([1.0, 2.0])).shape == (2, 1, 16, 32)  # sincos: any grid
    learned = DiT(in_channels=1, sample_size=28, patch_size=4, pos_embed="learned", **TINY)
    with pytest.raises(UserError, match=r"learned position embeddings for 28x28 images and cannot take 32x32"):
        learned(torch.randn(1, 1, 32, 32), torch.tensor([1.0]))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(hidden_size=30, num_heads=4), "hidden_size 30 must be divisible by num_heads 4"),
        (dict(hidden_size=18, num_heads=3), "multiple of 4 for 2-D sin-cos"),
        (dict(sample_size=10, patch_size=4), "sample_size 10 must be a multiple of patch_size 4"),
        (dict(pos_embed="rope"), "pos_embed must be 'sincos' or 'learned'"),
        (dict(depth=0), "depth must be at least 1"),
        (dict(num_classes=-1), r"num_classes must be 0 \(off\) or positive, got -1"),
    ],
)
def test_constructor_checks(kwargs, message):
    with pytest.raises(UserError, match=message):
        tiny_dit(**kwargs)


# ----------------------------------------------------------------------------- parity with diffusers


def diffusers_dit():
    diffusers = pytest.importorskip("diffusers")
    return diffusers.DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, num_layers=2,
        sample_size=8, patch_size=2, num_embeds_ada_norm=10, norm_type="ada_norm_zero",
    ).eval()  # eval: in training mode diffusers drops class labels at random inside the model


@pytest.mark.parametrize("size", [8, 12])  # the native 4x4 grid, and a 6x6 one (sincos computed for it)
def test_diffusers_weights_load_into_our_dit(size):
    theirs = perturb(diffusers_dit(), seed=2)  # each block's embedder copy gets its own weights
    ours = tiny_dit(num_classes=10).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x, t = inputs(size=size)
    labels = torch.tensor([1, 10, 3])  # 10: the null class, at index num_embeds_ada_norm in diffusers too
    with torch.no_grad():
        expected = theirs(x, t, class_labels=labels).sample
        got = ours(x, t, class_labels=labels)
    assert expected.abs().max() > 1.0
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_our_dit_weights_load_into_diffusers():
    ours = perturb(tiny_dit(num_classes=10), seed=3).eval()
    theirs = diffusers_dit()
    theirs.load_state_dict(ours.state_dict(), strict=True)
    x, t = inputs()
    labels = torch.tensor([0, 9, 10])
    with torch.no_grad():
        torch.testing.assert_close(ours(x, t, class_labels=labels), theirs(x, t, class_labels=labels).sample, atol=1e-5, rtol=0)
