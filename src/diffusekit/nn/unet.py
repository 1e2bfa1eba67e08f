"""The denoising U-Net (Ronneberger et al. 2015, as used by Ho et al. 2020 and Rombach et al. 2022).

Structure and parameter names are those of diffusers' UNet2DModel (self-attention
levels: AttnDownBlock2D / AttnUpBlock2D, UNetMidBlock2D) and, with text conditioning
(cross_attention_dim > 0), of UNet2DConditionModel (CrossAttnDownBlock2D /
CrossAttnUpBlock2D, UNetMidBlock2DCrossAttn with Transformer2DModel attentions), so
diffusers state dicts of the same shape load key for key:

    conv_in -> down_blocks[i] (resnets, attentions?, downsamplers?) -> mid_block
    -> up_blocks[i] (resnets fed with skips, attentions?, upsamplers?) -> conv_out

Every down-path output (after conv_in, each resnet, each downsampler) is kept as
a skip and consumed, last first, by one up-path resnet.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable

import torch
from torch import nn

from diffusekit.errors import UserError
from diffusekit.nn.blocks import (
    Downsample2D,
    GroupNorm,
    ResnetBlock2D,
    SelfAttention2D,
    TimestepEmbedding,
    Transformer2D,
    Upsample2D,
    check_text_context,
    timestep_embedding,
)

AttentionFactory = Callable[[int], nn.Module]  # channels -> an attention module taking (x, context, mask)


class DownBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, temb: int, layers: int, attention: AttentionFactory | None, downsample: bool,
                 groups: int, dropout: float, eps: float, downsample_padding: int):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(in_ch if i == 0 else out_ch, out_ch, temb, groups, dropout, eps) for i in range(layers)])
        if attention:
            self.attentions = nn.ModuleList([attention(out_ch) for _ in range(layers)])
        if downsample:
            self.downsamplers = nn.ModuleList([Downsample2D(out_ch, downsample_padding)])

    def forward(self, x, temb, context=None, mask=None):
        skips = []
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, temb)
            if hasattr(self, "attentions"):
                x = self.attentions[i](x, context, mask)
            skips.append(x)
        if hasattr(self, "downsamplers"):
            x = self.downsamplers[0](x)
            skips.append(x)
        return x, skips


class MidBlock(nn.Module):
    def __init__(self, ch: int, temb: int, attention: AttentionFactory | None, groups: int, dropout: float, eps: float):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(ch, ch, temb, groups, dropout, eps) for _ in range(2)])
        if attention:
            self.attentions = nn.ModuleList([attention(ch)])

    def forward(self, x, temb, context=None, mask=None):
        x = self.resnets[0](x, temb)
        if hasattr(self, "attentions"):
            x = self.attentions[0](x, context, mask)
        return self.resnets[1](x, temb)


class UpBlock(nn.Module):
    def __init__(self, prev_ch: int, out_ch: int, skip_chs: list[int], temb: int, attention: AttentionFactory | None, upsample: bool,
                 groups: int, dropout: float, eps: float):
        super().__init__()
        self.resnets = nn.ModuleList(
            [ResnetBlock2D((prev_ch if i == 0 else out_ch) + skip, out_ch, temb, groups, dropout, eps) for i, skip in enumerate(skip_chs)]
        )
        if attention:
            self.attentions = nn.ModuleList([attention(out_ch) for _ in skip_chs])
        if upsample:
            self.upsamplers = nn.ModuleList([Upsample2D(out_ch)])

    def forward(self, x, temb, skips: list[torch.Tensor], context=None, mask=None):
        for i, resnet in enumerate(self.resnets):
            x = resnet(torch.cat([x, skips.pop()], dim=1), temb)
            if hasattr(self, "attentions"):
                x = self.attentions[i](x, context, mask)
        if hasattr(self, "upsamplers"):
            x = self.upsamplers[0](x)
        return x


class UNet(nn.Module):
    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        channels: tuple[int, ...] = (32, 64, 64),
        layers_per_block: int = 1,
        attention_levels: tuple[int, ...] = (2,),
        mid_attention: bool = True,
        attention_head_dim: int = 32,
        norm_groups: int = 8,
        dropout: float = 0.0,
        num_classes: int = 0,
        cross_attention_dim: int = 0,
        attention_heads: int = 0,
        transformer_layers: int = 1,
        linear_projection: bool = False,
        norm_eps: float = 1e-5,
        flip_sin_to_cos: bool = True,
        freq_shift: float = 0.0,
        downsample_padding: int = 1,
        guidance_embedding: int = 0,
    ):
        super().__init__()
        self.in_channels, self.num_levels, self.num_classes = in_channels, len(channels), num_classes
        self.flip_sin_to_cos, self.freq_shift = flip_sin_to_cos, freq_shift
        self.cross_attention_dim = cross_attention_dim
        temb = channels[0] * 4
        self.conv_in = nn.Conv2d(in_channels, channels[0], 3, padding=1)
        self.guidance_embedding = guidance_embedding  # width of the guidance-scale embedding (a distilled student's); 0: none
        self.time_embedding = TimestepEmbedding(channels[0], temb, guidance_embedding)
        if num_classes:
            # index num_classes is the null class: "no label", learned by label dropout for guidance
            self.class_embedding = nn.Embedding(num_classes + 1, temb)

        def heads(ch: int) -> int:  # a fixed head count (Stable Diffusion 1.x) or a fixed head width
            return attention_heads or ch // attention_head_dim

        def attention(ch: int) -> nn.Module:
            if cross_attention_dim:
                return Transformer2D(ch, heads(ch), cross_attention_dim, norm_groups, transformer_layers, linear_projection, dropout)
            return SelfAttention2D(ch, heads(ch), norm_groups, norm_eps)

        last = len(channels) - 1
        skip_chs = [channels[0]]
        self.down_blocks = nn.ModuleList()
        for level, ch in enumerate(channels):
            prev = channels[max(level - 1, 0)]
            attn = attention if level in attention_levels else None
            self.down_blocks.append(DownBlock(prev, ch, temb, layers_per_block, attn, level != last, norm_groups, dropout, norm_eps, downsample_padding))
            skip_chs += [ch] * layers_per_block + ([ch] if level != last else [])
        self.mid_block = MidBlock(channels[-1], temb, attention if mid_attention else None, norm_groups, dropout, norm_eps)
        self.up_blocks = nn.ModuleList()
        prev = channels[-1]
        for level in reversed(range(len(channels))):
            ch = channels[level]
            block_skips = [skip_chs.pop() for _ in range(layers_per_block + 1)]
            attn = attention if level in attention_levels else None
            self.up_blocks.append(UpBlock(prev, ch, block_skips, temb, attn, level != 0, norm_groups, dropout, norm_eps))
            prev = ch
        self.conv_norm_out = GroupNorm(norm_groups, channels[0], eps=norm_eps)
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(channels[0], out_channels, 3, padding=1)

    @classmethod
    def from_config(cls, cfg, in_channels: int, out_channels: int | None = None) -> "UNet":
        """The U-Net a ModelConfig describes (its U-Net fields are this constructor's keyword arguments; the DiT's are not)."""
        accepted = inspect.signature(cls.__init__).parameters
        fields = {**dataclasses.asdict(cfg), "channels": tuple(cfg.channels), "attention_levels": tuple(cfg.attention_levels)}
        return cls(in_channels, out_channels or in_channels, **{k: v for k, v in fields.items() if k in accepted})

    def check_input(self, x: torch.Tensor, context: torch.Tensor | None) -> None:
        factor = 2 ** (self.num_levels - 1)
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise UserError(f"the U-Net takes images of shape [batch, {self.in_channels}, H, W], got {list(x.shape)}")
        h, w = x.shape[-2:]
        if h % factor or w % factor:
            raise UserError(
                f"image size {h}x{w} cannot pass through this U-Net: its {self.num_levels} levels halve the size "
                f"{self.num_levels - 1} times, so height and width must be multiples of {factor}"
            )
        check_text_context("U-Net", self.cross_attention_dim, context)

    def embed_guidance(self, guidance: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
        """The guidance scale w as LCM embeds it (Luo et al. 2023; diffusers' get_guidance_scale_embedding):
        sinusoids of (w - 1) * 1000, [sin, cos], frequencies 10000^(-i / (half - 1))."""
        w = torch.ones(x.shape[0], device=x.device) if guidance is None else guidance.to(x.device, torch.float32).reshape(-1).expand(x.shape[0])
        return timestep_embedding((w - 1) * 1000, self.guidance_embedding, flip_sin_to_cos=False, freq_shift=1)

    def embed(self, x: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor | None, guidance: torch.Tensor | None) -> torch.Tensor:
        """The time embedding (plus the class's and the guidance scale's) every resnet receives; a ControlNet
        (nn/controlnet.py) calls this on its own copy of these layers."""
        t = t.to(x.device, torch.float32).reshape(-1).expand(x.shape[0])
        emb = timestep_embedding(t, self.conv_in.out_channels, self.flip_sin_to_cos, self.freq_shift).to(x.dtype)
        emb = self.time_embedding(emb, UNet.embed_guidance(self, guidance, x) if self.guidance_embedding else None)
        if self.num_classes:
            if class_labels is None:
                class_labels = torch.full((x.shape[0],), self.num_classes, device=x.device, dtype=torch.long)
            emb = emb + self.class_embedding(class_labels).to(emb.dtype)
        return emb

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        class_labels: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
        guidance: torch.Tensor | None = None,
        down_block_additional_residuals: list[torch.Tensor] | None = None,
        mid_block_additional_residual: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x [B, C, H, W] at (possibly fractional) timesteps t; class labels, or text token embeddings
        `context` [B, L, D] with `context_mask` [B, L] (1: a real token, 0: padding); `guidance` [B], the
        classifier-free guidance scale a guidance-distilled U-Net takes as an input (default 1: none).
        A ControlNet's residuals (diffusers' names) are added to the skips and to the mid block's output."""
        self.check_input(x, context)
        emb = self.embed(x, t, class_labels, guidance)

        h = self.conv_in(x)
        skips = [h]
        for block in self.down_blocks:
            h, block_skips = block(h, emb, context, context_mask)
            skips += block_skips
        if down_block_additional_residuals is not None:
            skips = [skip + residual for skip, residual in zip(skips, down_block_additional_residuals, strict=True)]
        h = self.mid_block(h, emb, context, context_mask)
        if mid_block_additional_residual is not None:
            h = h + mid_block_additional_residual
        for block in self.up_blocks:
            h = block(h, emb, skips, context, context_mask)
        return self.conv_out(self.conv_act(self.conv_norm_out(h)))
