"""The KL autoencoder of latent diffusion (Rombach et al. 2022, sec. 3 and appendix G).

The encoder maps an image to the mean and log-variance of a diagonal Gaussian
q(z | x) over latents 2^(levels-1) times smaller; the decoder maps a latent back
to an image. Trained with a reconstruction loss plus a small KL(q(z | x) || N(0, I))
(Kingma & Welling 2014), the latents stay close to unit scale; `scale_factor`
(LDM's 1 / std of the latents) and `shift_factor` finish the job for diffusion.

Structure and parameter names are those of diffusers' AutoencoderKL with
DownEncoderBlock2D / UpDecoderBlock2D blocks, so its state dicts (Stable
Diffusion's VAE included) load key for key:

    encoder: conv_in -> down_blocks[i] (resnets, downsamplers?) -> mid_block
             -> conv_norm_out -> conv_act -> conv_out (2 * latent_channels)
    quant_conv (1x1) -> DiagonalGaussian -> z -> post_quant_conv (1x1)
    decoder: conv_in -> mid_block -> up_blocks[i] (layers + 1 resnets, upsamplers?)
             -> conv_norm_out -> conv_act -> conv_out

All norms use eps = 1e-6 and the mid-block attention has one head as wide as the
block, as in diffusers' VAE.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from diffusekit.errors import ConfigError, UserError
from diffusekit.nn.blocks import Downsample2D, ResnetBlock2D, SelfAttention2D, Upsample2D
from diffusekit.seeds import randn

NORM_EPS = 1e-6  # every GroupNorm of diffusers' VAE
LOGVAR_RANGE = (-30.0, 20.0)  # diffusers' (and LDM's) clamp of the posterior log-variance


@dataclass
class VAEConfig:
    """The autoencoder (names follow diffusers' AutoencoderKL where they can)."""

    channels: tuple[int, ...] = (32, 64, 64)  # block_out_channels; 3 levels downsample by 4, 4 levels by 8
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_groups: int = 8
    scale_factor: float = 1.0  # latents for diffusion are (z - shift_factor) * scale_factor (LDM: 1 / std(z))
    shift_factor: float = 0.0

    @property
    def downsample_factor(self) -> int:
        """How many times smaller the latents are than the images: one halving per level but the last."""
        return 2 ** (len(self.channels) - 1)


def check_vae_config(cfg: VAEConfig, prefix: str = "vae") -> None:
    """ConfigError for values the autoencoder cannot be built from."""
    problems = []
    if not cfg.channels or any(c <= 0 for c in cfg.channels):
        problems.append(f"{prefix}.channels needs at least one positive width, e.g. 32,64,64")
    elif any(c % cfg.norm_groups for c in cfg.channels):
        problems.append(f"{prefix}.channels {list(cfg.channels)} must all be multiples of {prefix}.norm_groups = {cfg.norm_groups}")
    if cfg.layers_per_block < 1 or cfg.latent_channels < 1:
        problems.append(f"{prefix}.layers_per_block and {prefix}.latent_channels must be at least 1")
    if cfg.scale_factor <= 0:
        problems.append(f"{prefix}.scale_factor must be positive (it is 1 / std of the latents)")
    if problems:
        raise ConfigError("; ".join(problems))


class DiagonalGaussian:
    """q(z | x) = N(mean, diag(exp(logvar))), from the encoder's 2 * latent_channels output channels.

    The log-variance is clamped to [-30, 20] as in diffusers and LDM, so that exp stays finite.
    """

    def __init__(self, parameters: torch.Tensor):
        self.mean, logvar = parameters.chunk(2, dim=1)
        self.logvar = logvar.clamp(*LOGVAR_RANGE)

    @property
    def var(self) -> torch.Tensor:
        return self.logvar.exp()

    @property
    def std(self) -> torch.Tensor:
        return (0.5 * self.logvar).exp()

    def sample(self, generator: torch.Generator | list[torch.Generator] | None = None) -> torch.Tensor:
        """z = mean + std * noise (the reparameterisation trick); per-sample generators are welcome."""
        noise = randn(self.mean.shape, generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * noise

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) per sample: 0.5 * sum(mean^2 + var - 1 - logvar) over all non-batch dims."""
        terms = self.mean.pow(2) + self.var - 1.0 - self.logvar
        return 0.5 * terms.flatten(1).sum(dim=1)


class ResnetStage(nn.Module):
    """`layers` resnets (no time embedding), then an optional resampler under diffusers' name.

    `resample` is "down" (DownEncoderBlock2D: `downsamplers`), "up" (UpDecoderBlock2D: `upsamplers`) or "".
    """

    def __init__(self, in_ch: int, out_ch: int, layers: int, groups: int, resample: str = ""):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(in_ch if i == 0 else out_ch, out_ch, 0, groups, eps=NORM_EPS) for i in range(layers)])
        self.resample = resample
        if resample == "down":
            self.downsamplers = nn.ModuleList([Downsample2D(out_ch, padding=0)])
        elif resample == "up":
            self.upsamplers = nn.ModuleList([Upsample2D(out_ch)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x, None)
        if self.resample:
            x = (self.downsamplers if self.resample == "down" else self.upsamplers)[0](x)
        return x


class AttentionMidBlock(nn.Module):
    """resnet -> single-head self-attention -> resnet, at constant width (diffusers' UNetMidBlock2D in the VAE)."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(channels, channels, 0, groups, eps=NORM_EPS) for _ in range(2)])
        self.attentions = nn.ModuleList([SelfAttention2D(channels, heads=1, groups=groups, eps=NORM_EPS)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resnets[1](self.attentions[0](self.resnets[0](x, None)), None)


class Encoder(nn.Module):
    def __init__(self, image_channels: int, latent_channels: int, channels: tuple[int, ...], layers: int, groups: int):
        super().__init__()
        last = len(channels) - 1
        self.conv_in = nn.Conv2d(image_channels, channels[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            [ResnetStage(channels[max(i - 1, 0)], ch, layers, groups, "down" if i < last else "") for i, ch in enumerate(channels)]
        )
        self.mid_block = AttentionMidBlock(channels[-1], groups)
        self.conv_norm_out = nn.GroupNorm(groups, channels[-1], eps=NORM_EPS)
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(channels[-1], 2 * latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for block in self.down_blocks:
            h = block(h)
        return self.conv_out(self.conv_act(self.conv_norm_out(self.mid_block(h))))


class Decoder(nn.Module):
    def __init__(self, latent_channels: int, image_channels: int, channels: tuple[int, ...], layers: int, groups: int):
        super().__init__()
        widths = list(reversed(channels))
        last = len(widths) - 1
        self.conv_in = nn.Conv2d(latent_channels, widths[0], 3, padding=1)
        self.mid_block = AttentionMidBlock(widths[0], groups)
        self.up_blocks = nn.ModuleList(
            [ResnetStage(widths[max(i - 1, 0)], ch, layers + 1, groups, "up" if i < last else "") for i, ch in enumerate(widths)]
        )
        self.conv_norm_out = nn.GroupNorm(groups, channels[0], eps=NORM_EPS)
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(channels[0], image_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            h = block(h)
        return self.conv_out(self.conv_act(self.conv_norm_out(h)))


class AutoencoderKL(nn.Module):
    def __init__(
        self,
        image_channels: int = 3,
        channels: tuple[int, ...] = (32, 64, 64),
        layers_per_block: int = 1,
        latent_channels: int = 4,
        norm_groups: int = 8,
        scale_factor: float = 1.0,
        shift_factor: float = 0.0,
    ):
        super().__init__()
        self.image_channels, self.latent_channels = image_channels, latent_channels
        self.downsample_factor = VAEConfig(channels=tuple(channels)).downsample_factor
        # plain attributes, not buffers: diffusers keeps them in its config, not in the state dict
        self.scale_factor, self.shift_factor = scale_factor, shift_factor
        self.encoder = Encoder(image_channels, latent_channels, tuple(channels), layers_per_block, norm_groups)
        self.decoder = Decoder(latent_channels, image_channels, tuple(channels), layers_per_block, norm_groups)
        self.quant_conv = nn.Conv2d(2 * latent_channels, 2 * latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(latent_channels, latent_channels, 1)

    @classmethod
    def from_config(cls, cfg: VAEConfig, image_channels: int) -> "AutoencoderKL":
        """The autoencoder a VAEConfig describes (its fields are this constructor's keyword arguments)."""
        check_vae_config(cfg)
        return cls(image_channels, **{**dataclasses.asdict(cfg), "channels": tuple(cfg.channels)})

    def check_images(self, x: torch.Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != self.image_channels:
            raise UserError(f"the autoencoder takes images of shape [batch, {self.image_channels}, H, W], got {list(x.shape)}")
        h, w = x.shape[-2:]
        factor = self.downsample_factor
        if h % factor or w % factor:
            raise UserError(
                f"image size {h}x{w} cannot pass through this autoencoder: it shrinks images {factor} times, "
                f"so height and width must be multiples of {factor} (e.g. {max(factor, h // factor * factor)} or {(h // factor + 1) * factor})"
            )

    def check_latents(self, z: torch.Tensor) -> None:
        if z.ndim != 4 or z.shape[1] != self.latent_channels:
            raise UserError(f"the autoencoder decodes latents of shape [batch, {self.latent_channels}, h, w], got {list(z.shape)}")

    def encode(self, x: torch.Tensor, slice_size: int = 0) -> DiagonalGaussian:
        """q(z | x) for images in [-1, 1]; `slice_size` > 0 runs the batch in slices of that many to save memory."""
        self.check_images(x)
        return DiagonalGaussian(in_slices(lambda part: self.quant_conv(self.encoder(part)), x, slice_size))

    def decode(self, z: torch.Tensor, slice_size: int = 0) -> torch.Tensor:
        """Images (unclamped, about [-1, 1]) from unscaled latents z."""
        self.check_latents(z)
        return in_slices(lambda part: self.decoder(self.post_quant_conv(part)), z, slice_size)

    def forward(self, x: torch.Tensor, sample_posterior: bool = True, generator=None) -> tuple[torch.Tensor, DiagonalGaussian]:
        """(reconstruction, posterior): decode a sample of q(z | x) (or its mean) for training."""
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z), posterior

    def scale_latents(self, z: torch.Tensor) -> torch.Tensor:
        """Autoencoder latents -> diffusion latents: (z - shift_factor) * scale_factor."""
        return (z - self.shift_factor) * self.scale_factor

    def unscale_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Diffusion latents -> autoencoder latents: latents / scale_factor + shift_factor."""
        return latents / self.scale_factor + self.shift_factor


def in_slices(fn, x: torch.Tensor, slice_size: int) -> torch.Tensor:
    """fn(x), computed over batch slices of `slice_size` (all at once when it is 0)."""
    if slice_size <= 0 or len(x) <= slice_size:
        return fn(x)
    return torch.cat([fn(part) for part in x.split(slice_size)])
