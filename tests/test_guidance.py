"""Classifier-free guidance: the closed form, one batched call, rescale, and label dropout."""

from __future__ import annotations

import torch

from diffusekit.config import Config, DataConfig, ModelConfig, TrainConfig
from diffusekit.guidance import GuidedDenoiser, rescale_guidance


class CountingDenoiser:
    """x0_hat = x * (1 + label) / 10: every label gives a different answer; counts its calls."""

    def __init__(self):
        self.calls = 0

    def __call__(self, x, sigma, cond=None):
        self.calls += 1
        labels = cond["class_labels"].float().view(-1, 1, 1, 1)
        return x * (1 + labels) / 10


def test_guidance_is_uncond_plus_scale_times_difference_in_one_call():
    base = CountingDenoiser()
    x = torch.randn(3, 1, 4, 4)
    cond, null = {"class_labels": torch.tensor([1, 2, 3])}, {"class_labels": torch.full((3,), 10)}
    guided = GuidedDenoiser(base, null, scale=4.0)(x, torch.tensor(1.0), cond)
    assert base.calls == 1
    c, u = base(x, None, cond), base(x, None, null)
    assert torch.allclose(guided, u + 4.0 * (c - u), atol=1e-6)


def test_guidance_scale_one_is_the_plain_conditional_model():
    base = CountingDenoiser()
    x = torch.randn(2, 1, 4, 4)
    cond = {"class_labels": torch.tensor([4, 5])}
    out = GuidedDenoiser(base, {"class_labels": torch.full((2,), 10)}, scale=1.0)(x, torch.tensor(2.0), cond)
    assert torch.equal(out, base(x, None, cond))


def test_rescale_matches_the_conditional_std_at_phi_one_and_is_identity_at_zero():
    guided, conditional = torch.randn(4, 3, 8, 8) * 3, torch.randn(4, 3, 8, 8)
    full = rescale_guidance(guided, conditional, 1.0)
    assert torch.allclose(full.std(dim=(1, 2, 3)), conditional.std(dim=(1, 2, 3)), rtol=1e-5)
    assert torch.equal(rescale_guidance(guided, conditional, 0.0), guided)


def test_label_dropout_replaces_the_configured_share_with_the_null_class(tmp_path):
    from diffusekit.diffusion_training import DiffusionRecipe
    from diffusekit.trainer import Trainer

    config = Config(
        model=ModelConfig(channels=(8, 16), attention_levels=(), mid_attention=False, norm_groups=4, num_classes=10),
        data=DataConfig(dataset="mnist", image_size=8, limit=512),
        train=TrainConfig(batch_size=256, label_dropout=0.25),
    )
    trainer = Trainer(config, tmp_path, DiffusionRecipe, progress=False)
    labels = torch.cat([trainer.recipe.batches.next_batch()[1]["class_labels"] for _ in range(8)])
    null_share = (labels == 10).float().mean().item()
    assert 0.2 < null_share < 0.3
    assert set(labels[labels != 10].tolist()) == set(range(10))
