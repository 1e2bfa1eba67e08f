"""The model factory: a Config -> its networks, for training, loading and export alike.

    parts = build_parts(config, weights, vae_weights, source)   # a config's networks with given weights
    net = build_net(config)                     # the denoising network of a config (U-Net or DiT), freshly initialised

A diffusekit checkpoint becomes ModelParts through io/checkpoint.py (load_parts), a diffusers folder through
io/diffusers.py (read_parts): io/ reads files and calls this factory, which reads none;
pipeline.Pipeline puts parts on a device and samples them.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

from diffusekit.config import Config
from diffusekit.errors import UserError
from diffusekit.nn.dit import DiT
from diffusekit.nn.state import load_state_dict_checked
from diffusekit.nn.unet import UNet
from diffusekit.nn.vae import AutoencoderKL


def image_shape(config: Config, size: int | None = None) -> tuple[int, int, int]:
    """What the network denoises for images of `size` (default: the training size): images, or a latent model's latents."""
    size = size or config.data.image_size
    if config.latent.vae:
        factor = config.vae.downsample_factor
        if size % factor:
            raise UserError(f"--size {size} is not a multiple of {factor}, the autoencoder's down-sampling factor")
        return (config.vae.latent_channels, size // factor, size // factor)
    return (config.data.channels, size, size)


def size_multiple(config: Config) -> int:
    """Image sizes the model can make are multiples of this: the autoencoder's down-sampling factor (latent models)
    times the 2^(levels - 1) by which the U-Net halves its input, or the DiT's patch size."""
    factor = config.vae.downsample_factor if config.latent.vae else 1
    return factor * (config.model.patch_size if config.model.type == "dit" else 2 ** (len(config.model.channels) - 1))


def build_net(config: Config) -> UNet | DiT:
    """The denoising network of model.type: the U-Net, or the DiT (sized for the training images or latents)."""
    channels, size, _ = image_shape(config)
    m = config.model
    if m.type == "dit":
        return DiT(in_channels=channels, sample_size=size, patch_size=m.patch_size, hidden_size=m.hidden_size, depth=m.depth,
                   num_heads=m.num_heads, mlp_ratio=m.mlp_ratio, num_classes=m.num_classes, cross_attention_dim=m.cross_attention_dim,
                   pos_embed=m.pos_embed, dropout=m.dropout)
    return UNet.from_config(m, in_channels=channels)


build_unet = build_net  # the name before the DiT, kept for code that still calls it


def example_inputs(config: Config, batch: int, device, size: int | None = None) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(x, t, cond) of the network's shape for a batch, to time it: noise, a middle timestep, and zero text
    embeddings or class 0 where the model takes them (the values do not change the time a call takes)."""
    x = torch.randn(batch, *image_shape(config, size), device=device)
    t = torch.full((batch,), 500.0, device=device).clamp(max=config.diffusion.timesteps - 1)
    cond = {}
    if config.model.cross_attention_dim:
        cond["context"] = torch.zeros(batch, config.text.max_length, config.model.cross_attention_dim, device=device)
    if config.model.num_classes:
        cond["class_labels"] = torch.zeros(batch, dtype=torch.long, device=device)
    return x, t, cond

NETWORK_NAMES = {"unet": "U-Net", "dit": "DiT"}
SIGNATURE_KEYS = {"dit": "pos_embed.proj.weight", "unet": "conv_in.weight"}  # a weight only that network has


def load_net(config: Config, weights: dict[str, torch.Tensor], source: str) -> UNet | DiT:
    """The network of `config` with `weights`, checked; the weights of the other kind of network name model.type."""
    kind = next((k for k, key in SIGNATURE_KEYS.items() if key in weights), config.model.type)
    if kind != config.model.type:
        raise UserError(
            f"the weights in {source} are a {NETWORK_NAMES[kind]}'s, but the config says model.type = {config.model.type!r} "
            f"(a {NETWORK_NAMES[config.model.type]}): set model.type = {kind!r} with that network's sizes, or use the config.json saved with those weights"
        )
    net = build_net(config)
    load_state_dict_checked(net, weights, source=source)
    return net


def build_vae(config: Config) -> AutoencoderKL:
    return AutoencoderKL.from_config(config.vae, config.data.channels)


def build_text_encoder(config: Config, device=None):
    """The model's text encoder (None for a model without text conditioning)."""
    if not config.text.encoder:
        return None
    from diffusekit.nn.text import TextEncoder  # imports transformers: only for text models

    encoder = TextEncoder(config.text.encoder, config.text.max_length)
    if encoder.dim != config.model.cross_attention_dim:
        raise UserError(
            f"the text encoder '{config.text.encoder}' gives {encoder.dim}-wide embeddings but model.cross_attention_dim = "
            f"{config.model.cross_attention_dim}; set model.cross_attention_dim={encoder.dim}"
        )
    return encoder.to(device) if device is not None else encoder


def text_condition(hidden: torch.Tensor, mask: torch.Tensor, mask_padding: bool) -> dict:
    """The U-Net's text inputs: token embeddings, and the padding mask unless the model attends to padding."""
    return {"context": hidden, "context_mask": mask} if mask_padding else {"context": hidden}


@dataclass
class ModelParts:
    """A diffusion model as loaded: its config and networks (on the CPU), and where they came from."""

    config: Config
    net: torch.nn.Module
    vae: AutoencoderKL | None = None
    text_encoder: torch.nn.Module | None = None
    source: Path | None = None  # the checkpoint or diffusers folder
    step: int | None = None  # optimizer steps trained, where known


def build_parts(config: Config, net_weights: dict, vae_weights: dict | None, source: Path, step: int | None = None) -> ModelParts:
    """The networks of `config` with the given weights (each checked against the config's shapes)."""
    net = load_net(config, net_weights, str(source))
    vae = None
    if config.latent.vae:
        if vae_weights is None:
            raise UserError(f"'{source}' is a latent model but holds no autoencoder weights; it is incomplete")
        vae = build_vae(config)
        load_state_dict_checked(vae, vae_weights, source=str(source))
    return ModelParts(config, net, vae, build_text_encoder(config), source, step)


def default_model() -> Path:
    """The text-to-image demo model shipped in the package."""
    path = Path(str(resources.files("diffusekit") / "assets" / "emoji-t2i"))
    if not (path / "config.json").is_file():
        raise UserError("no shipped demo model in this installation; give a text-to-image run with --model RUN")
    return path
