"""ControlNet (Zhang, Rao & Agrawala 2023): a trainable copy of a U-Net's encoder that steers the frozen U-Net.

Parameter names are those of diffusers' ControlNetModel, so its state dicts load key for key:

    control image [B, 3, H, W] in [0, 1] -> controlnet_cond_embedding (convs, stride 2 down to the latent size,
                                            conv_out zero-initialised)
    x -> conv_in (+ the embedded control) -> down_blocks -> mid_block       (the U-Net's own block classes)
    every skip -> controlnet_down_blocks[i] (1x1, zero-initialised); mid -> controlnet_mid_block (1x1, zero)

The outputs, times conditioning_scale, are added to the U-Net's skips and mid-block output (UNet.forward's
down_block_additional_residuals / mid_block_additional_residual). With zero convolutions a fresh ControlNet
changes nothing, so training starts from the base model's behaviour.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from diffusekit.errors import UserError
from diffusekit.nn.unet import UNet

EMBEDDING_CHANNELS = (16, 32, 96, 256)  # Stable Diffusion's conditioning embedding: 8x down to the latent size


def zero_conv(channels_in: int, channels_out: int, kernel: int = 1) -> nn.Conv2d:
    conv = nn.Conv2d(channels_in, channels_out, kernel, padding=kernel // 2)
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


class ConditioningEmbedding(nn.Module):
    """The control image to the U-Net's first width at the latent resolution: conv, then per level a conv and a stride-2 conv,
    SiLU after each; conv_out zero-initialised (diffusers' ControlNetConditioningEmbedding)."""

    def __init__(self, out_channels: int, conditioning_channels: int, channels: tuple[int, ...]):
        super().__init__()
        self.conv_in = nn.Conv2d(conditioning_channels, channels[0], 3, padding=1)
        self.blocks = nn.ModuleList()
        for ch_in, ch_out in zip(channels[:-1], channels[1:]):
            self.blocks.append(nn.Conv2d(ch_in, ch_in, 3, padding=1))
            self.blocks.append(nn.Conv2d(ch_in, ch_out, 3, padding=1, stride=2))
        self.conv_out = zero_conv(channels[-1], out_channels, 3)

    def forward(self, control: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.conv_in(control))
        for block in self.blocks:
            h = F.silu(block(h))
        return self.conv_out(h)


@dataclass(frozen=True)
class ControlNetShape:
    """What a ControlNet is built from: its U-Net's model config and input channels, the control image's channels and
    the widths of its conditioning embedding (one stride-2 step per entry after the first: the autoencoder's factor)."""

    model: object  # config.ModelConfig (its U-Net fields)
    in_channels: int
    conditioning_channels: int = 3
    embedding_channels: tuple[int, ...] = EMBEDDING_CHANNELS
    global_pool: bool = False  # diffusers' global_pool_conditions (shuffle ControlNets): residuals averaged over the image


class ControlNet(nn.Module):
    """Residuals for a U-Net of the same shape from a control image (see the module docstring)."""

    def __init__(self, shape: ControlNetShape):
        super().__init__()
        if shape.model.type != "unet":
            raise UserError(f"a ControlNet copies a U-Net's encoder; this model is a {shape.model.type} (model.type = \"unet\" is needed)")
        self.shape = shape
        base = UNet.from_config(shape.model, shape.in_channels)  # the U-Net's own layers; its up path is dropped
        self.in_channels, self.num_levels, self.num_classes = base.in_channels, base.num_levels, base.num_classes
        self.flip_sin_to_cos, self.freq_shift = base.flip_sin_to_cos, base.freq_shift
        self.cross_attention_dim, self.guidance_embedding = base.cross_attention_dim, base.guidance_embedding
        self.conv_in, self.time_embedding = base.conv_in, base.time_embedding
        if base.num_classes:
            self.class_embedding = base.class_embedding
        self.controlnet_cond_embedding = ConditioningEmbedding(base.conv_in.out_channels, shape.conditioning_channels, shape.embedding_channels)
        self.down_blocks, self.mid_block = base.down_blocks, base.mid_block
        self.controlnet_down_blocks = nn.ModuleList([zero_conv(ch, ch) for ch in skip_channels(base)])
        self.controlnet_mid_block = zero_conv(shape.model.channels[-1], shape.model.channels[-1])

    @classmethod
    def from_unet(cls, unet: UNet, model, conditioning_channels: int = 3,
                  embedding_channels: tuple[int, ...] = EMBEDDING_CHANNELS) -> "ControlNet":
        """A ControlNet whose encoder starts as a copy of `unet`'s (diffusers' ControlNetModel.from_unet): conv_in, the time
        and class embeddings, down blocks and mid block; the conditioning embedding fresh, the zero convolutions zero."""
        net = cls(ControlNetShape(model, unet.in_channels, conditioning_channels, tuple(embedding_channels)))
        copied = {k: v for k, v in unet.state_dict().items() if k.split(".")[0] in COPIED_FROM_UNET}
        missing, unexpected = net.load_state_dict(copied, strict=False)
        assert not unexpected and all(k.split(".")[0] not in COPIED_FROM_UNET for k in missing), (missing, unexpected)
        return net.to(next(unet.parameters()).dtype)

    @property
    def downsample_factor(self) -> int:
        """How much smaller than the control image the U-Net's input is."""
        return 2 ** (len(self.shape.embedding_channels) - 1)

    def forward(self, x: torch.Tensor, t: torch.Tensor, control: torch.Tensor, conditioning_scale: float = 1.0,
                class_labels: torch.Tensor | None = None, context: torch.Tensor | None = None, context_mask: torch.Tensor | None = None,
                guidance: torch.Tensor | None = None, guess_mode: bool = False) -> tuple[list[torch.Tensor], torch.Tensor]:
        """(down residuals, mid residual) for the U-Net's input x at times t with `control` [B, C, H * f, W * f] in [0, 1].
        guess_mode: residuals scaled from 0.1 (the first skip) to 1 (the mid block), diffusers' logspace."""
        UNet.check_input(self, x, context)
        emb = UNet.embed(self, x, t, class_labels, guidance)
        h = self.conv_in(x) + self.controlnet_cond_embedding(control.to(x.dtype))
        skips = [h]
        for block in self.down_blocks:
            h, block_skips = block(h, emb, context, context_mask)
            skips += block_skips
        h = self.mid_block(h, emb, context, context_mask)
        down = [zero(skip) for zero, skip in zip(self.controlnet_down_blocks, skips)]
        mid = self.controlnet_mid_block(h)
        if guess_mode and not self.shape.global_pool:
            scales = torch.logspace(-1, 0, len(down) + 1, device=x.device) * conditioning_scale
            down, mid = [d * s for d, s in zip(down, scales)], mid * scales[-1]
        else:
            down, mid = [d * conditioning_scale for d in down], mid * conditioning_scale
        if self.shape.global_pool:
            down, mid = [d.mean(dim=(2, 3), keepdim=True) for d in down], mid.mean(dim=(2, 3), keepdim=True)
        return down, mid


class ControlledUNet(nn.Module):
    """A U-Net steered by a ControlNet, as one network net(x, t, control, **cond) for training (controlnet_training.py):
    the condition's `control` [B, C, H, W] in [0, 1] goes to the ControlNet, its residuals and the rest to the U-Net."""

    def __init__(self, unet: UNet, controlnet: ControlNet):
        super().__init__()
        self.unet, self.controlnet = unet, controlnet

    def forward(self, x: torch.Tensor, t: torch.Tensor, control: torch.Tensor, **cond) -> torch.Tensor:
        down, mid = self.controlnet(x, t, control, **cond)
        return self.unet(x, t, **cond, down_block_additional_residuals=down, mid_block_additional_residual=mid)


def embedding_channels_for(factor: int) -> tuple[int, ...]:
    """The conditioning embedding's widths for a model whose latents are `factor` times smaller than its images
    (Stable Diffusion's (16, 32, 96, 256) for 8; its first entries for 4, 2, 1)."""
    steps = factor.bit_length() - 1
    if factor < 1 or 2**steps != factor or steps >= len(EMBEDDING_CHANNELS):
        raise UserError(f"a ControlNet's conditioning embedding halves the control image up to 8x; this model's latents are {factor}x smaller")
    return EMBEDDING_CHANNELS[: steps + 1]


COPIED_FROM_UNET = ("conv_in", "time_embedding", "class_embedding", "down_blocks", "mid_block")


def skip_channels(unet: UNet) -> list[int]:
    """The channels of every skip the U-Net's up path consumes: conv_in's, then each down block's resnets and downsampler."""
    channels = [unet.conv_in.out_channels]
    for block in unet.down_blocks:
        channels += [resnet.conv2.out_channels for resnet in block.resnets]
        if hasattr(block, "downsamplers"):
            channels.append(block.resnets[-1].conv2.out_channels)
    return channels


def check_fits(controlnet: ControlNet, unet: nn.Module, name: str) -> None:
    """A ControlNet steers only a U-Net with its input channels, skips and cross-attention width: else one UserError."""
    if not isinstance(unet, UNet):
        raise UserError(f"ControlNet '{name}' needs a U-Net base model; this model's network is a {type(unet).__name__}")
    ours, theirs = (controlnet.in_channels, skip_channels(controlnet), controlnet.cross_attention_dim), \
        (unet.in_channels, skip_channels(unet), unet.cross_attention_dim)
    if ours != theirs:
        raise UserError(f"ControlNet '{name}' was made for another base model: it has {ours[0]} input channels, skips of {ours[1]} "
                        f"channels and cross-attention width {ours[2]}, this model {theirs[0]}, {theirs[1]} and {theirs[2]}; "
                        "use a ControlNet trained for this base model (or train one: diffusekit train-controlnet)")

