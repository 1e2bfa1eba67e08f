"""The KL autoencoder: shapes, the posterior's KL, parity with diffusers' AutoencoderKL, learning, clear errors."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKL as DiffusersAutoencoderKL
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

from diffusekit.errors import ConfigError, UserError
from diffusekit.nn.vae import AutoencoderKL, DiagonalGaussian, VAEConfig, check_vae_config


def make_vae(image_channels=1, channels=(8, 16, 16), latent_channels=4, layers_per_block=1, seed=0, **kwargs) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(image_channels, channels, layers_per_block, latent_channels, norm_groups=4, **kwargs).eval()


@pytest.mark.parametrize(
    "image_channels, channels, latent_channels, factor",
    [
        (1, (8, 16, 16), 4, 4),
        (3, (8, 16, 16), 3, 4),
        (3, (8, 8, 16, 16), 4, 8),
        (1, (8, 8, 16, 16), 3, 8),
    ],
)
def test_encode_decode_shapes(image_channels, channels, latent_channels, factor):
    vae = make_vae(image_channels, channels, latent_channels)
    assert vae.downsample_factor == factor
    x = torch.rand(2, image_channels, 16, 24) * 2 - 1
    with torch.no_grad():
        posterior = vae.encode(x)
        latent_shape = (2, latent_channels, 16 // factor, 24 // factor)
        assert posterior.mean.shape == posterior.logvar.shape == posterior.sample().shape == latent_shape
        out = vae.decode(posterior.mode())
    assert out.shape == x.shape and torch.isfinite(out).all()


# ----------------------------------------------------------------------------- the posterior


def posterior_parameters(seed=0) -> torch.Tensor:
    """Encoder-like output [B, 2 * 3, h, w], log-variances spread past the clamp range [-30, 20]."""
    g = torch.Generator().manual_seed(seed)
    mean = torch.randn(2, 3, 4, 4, generator=g)
    logvar = torch.randn(2, 3, 4, 4, generator=g) * 3
    logvar[0, 0, 0, :2] = torch.tensor([-50.0, 40.0])
    return torch.cat([mean, logvar], dim=1)


def test_kl_is_the_closed_form_of_a_diagonal_gaussian_against_the_standard_normal():
    params = posterior_parameters()
    posterior = DiagonalGaussian(params)
    mean, logvar = params.double().chunk(2, dim=1)
    logvar = logvar.clamp(-30, 20)
    q = torch.distributions.Normal(mean, (0.5 * logvar).exp())
    p = torch.distributions.Normal(torch.zeros_like(mean), torch.ones_like(mean))
    expected = torch.distributions.kl_divergence(q, p).sum(dim=(1, 2, 3))
    torch.testing.assert_close(posterior.kl().double(), expected, rtol=1e-5, atol=1e-4)
    assert posterior.kl().shape == (2,)


def test_posterior_matches_diffusers():
    params = posterior_parameters()
    ours, theirs = DiagonalGaussian(params), DiagonalGaussianDistribution(params)
    assert ours.logvar.min() == -30 and ours.logvar.max() == 20
    for name in ("mean", "logvar", "std", "var"):
        torch.testing.assert_close(getattr(ours, name), getattr(theirs, name), rtol=0, atol=0)
    torch.testing.assert_close(ours.kl(), theirs.kl(), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(ours.mode(), theirs.mode(), rtol=0, atol=0)


def test_sample_is_mean_plus_std_times_noise_from_per_sample_generators():
    posterior = DiagonalGaussian(posterior_parameters())
    both = posterior.sample([torch.Generator().manual_seed(s) for s in (7, 8)])
    noise = torch.randn(3, 4, 4, generator=torch.Generator().manual_seed(8))
    torch.testing.assert_close(both[1], posterior.mean[1] + posterior.std[1] * noise)


# ----------------------------------------------------------------------------- parity with diffusers


@pytest.mark.parametrize(
    "image_channels, channels, latent_channels, layers_per_block",
    [(3, (8, 16, 16), 4, 1), (1, (8, 8, 16, 16), 3, 2)],
)
def test_parity_with_diffusers_autoencoder_kl(image_channels, channels, latent_channels, layers_per_block):
    torch.manual_seed(0)
    reference = DiffusersAutoencoderKL(
        in_channels=image_channels,
        out_channels=image_channels,
        down_block_types=("DownEncoderBlock2D",) * len(channels),
        up_block_types=("UpDecoderBlock2D",) * len(channels),
        block_out_channels=channels,
        layers_per_block=layers_per_block,
        latent_channels=latent_channels,
        norm_num_groups=4,
    ).eval()
    with torch.no_grad():  # move every parameter (norm scales and biases too) off its default
        for p in reference.parameters():
            p.add_(0.1 * torch.randn_like(p))
    vae = make_vae(image_channels, channels, latent_channels, layers_per_block)
    vae.load_state_dict(reference.state_dict(), strict=True)

    x = torch.rand(2, image_channels, 16, 16) * 2 - 1
    z = torch.randn(2, latent_channels, 16 // vae.downsample_factor, 16 // vae.downsample_factor)
    with torch.no_grad():
        ours, theirs = vae.encode(x), reference.encode(x).latent_dist
        torch.testing.assert_close(ours.mean, theirs.mean, rtol=0, atol=1e-5)
        torch.testing.assert_close(ours.logvar, theirs.logvar, rtol=0, atol=1e-5)
        torch.testing.assert_close(vae.decode(z), reference.decode(z).sample, rtol=0, atol=1e-5)
        torch.testing.assert_close(vae(x, sample_posterior=False)[0], reference(x).sample, rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- learning


def square_images(count: int = 16, size: int = 8, side: int = 3) -> torch.Tensor:
    """White 3x3 squares at random places on black, in [-1, 1]."""
    g = torch.Generator().manual_seed(0)
    images = torch.full((count, 1, size, size), -1.0)
    for i in range(count):
        row, col = torch.randint(0, size - side + 1, (2,), generator=g).tolist()
        images[i, :, row : row + side, col : col + side] = 1.0
    return images


def reconstruction_mse(vae: AutoencoderKL, images: torch.Tensor) -> float:
    with torch.no_grad():
        return torch.mean((vae(images, sample_posterior=False)[0] - images) ** 2).item()


def test_a_tiny_vae_learns_to_reconstruct_a_tiny_dataset():
    images = square_images()  # variance ~0.48: predicting the mean image scores about that
    vae = make_vae(1, (8, 16), latent_channels=4).train()
    assert reconstruction_mse(vae, images) > 0.2
    optimizer = torch.optim.Adam(vae.parameters(), lr=3e-3)
    for step in range(100):
        reconstruction, posterior = vae(images, generator=torch.Generator().manual_seed(step))
        loss = torch.mean((reconstruction - images) ** 2) + 1e-4 * posterior.kl().mean() / images[0].numel()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert reconstruction_mse(vae, images) < 0.02


# ----------------------------------------------------------------------------- config, scaling, slicing, errors


def test_from_config_builds_the_configured_autoencoder():
    cfg = VAEConfig(channels=(8, 8, 16, 16), layers_per_block=1, latent_channels=3, norm_groups=4, scale_factor=0.5, shift_factor=0.1)
    vae = AutoencoderKL.from_config(cfg, image_channels=3)
    assert vae.downsample_factor == 8 and vae.latent_channels == 3 and vae.image_channels == 3
    z = torch.randn(2, 3, 2, 2)
    torch.testing.assert_close(vae.scale_latents(z), (z - 0.1) * 0.5)
    torch.testing.assert_close(vae.unscale_latents(vae.scale_latents(z)), z)


def test_widths_the_norm_groups_do_not_divide_are_a_config_error():
    with pytest.raises(ConfigError, match=r"vae.channels.*multiples of vae.norm_groups = 8"):
        check_vae_config(VAEConfig(channels=(8, 12), norm_groups=8))


def test_sliced_encode_and_decode_equal_the_whole_batch():
    vae = make_vae(1, (8, 16))
    x = torch.rand(3, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(vae.encode(x, slice_size=2).mean, vae.encode(x).mean)
        z = vae.encode(x).mode()
        torch.testing.assert_close(vae.decode(z, slice_size=1), vae.decode(z))


def test_image_size_not_divisible_by_the_factor_is_a_user_error():
    vae = make_vae(1, (8, 16, 16))
    with pytest.raises(UserError, match=r"30x30.*multiples of 4 \(e.g. 28 or 32\)"):
        vae.encode(torch.randn(1, 1, 30, 30))


def test_wrong_channel_counts_are_user_errors():
    vae = make_vae(3, (8, 16), latent_channels=4)
    with pytest.raises(UserError, match=r"images of shape \[batch, 3, H, W\], got \[1, 1, 8, 8\]"):
        vae.encode(torch.randn(1, 1, 8, 8))
    with pytest.raises(UserError, match=r"latents of shape \[batch, 4, h, w\], got \[1, 3, 4, 4\]"):
        vae.decode(torch.randn(1, 3, 4, 4))
