"""U-Net building blocks. Module and parameter names follow diffusers (ResnetBlock2D,
Attention, Downsample2D, Upsample2D, TimestepEmbedding), so that diffusers
state dicts map onto these modules key for key.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from diffusekit.errors import UserError


def check_text_context(network: str, width: int, context: torch.Tensor | None) -> None:
    """A text-conditioned network (width > 0) needs token embeddings of its cross-attention width."""
    if width and (context is None or context.shape[-1] != width):
        got = "none" if context is None else f"width {context.shape[-1]}"
        raise UserError(f"this {network} is text-conditioned and needs text embeddings of width {width} (got {got})")


def timestep_embedding(t: torch.Tensor, dim: int, flip_sin_to_cos: bool = True, freq_shift: float = 0.0, max_period: float = 10_000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps (Vaswani et al. 2017, sec. 3.5; DDPM appendix B).

    Frequencies max_period^(-i / (half - freq_shift)), i = 0..half-1; [cos, sin] when flip_sin_to_cos.
    """
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / (half - freq_shift)
    angles = t.float()[:, None] * exponent.exp()[None, :]
    emb = torch.cat([angles.sin(), angles.cos()], dim=-1)
    if flip_sin_to_cos:
        emb = torch.cat([emb[:, half:], emb[:, :half]], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class TimestepEmbedding(nn.Module):
    """The MLP on the sinusoidal embedding: Linear -> SiLU -> Linear.

    cond_dim > 0 adds diffusers' `cond_proj` (time_cond_proj_dim): a bias-free projection of another
    embedding (a guidance scale's) added to the sinusoidal input, zero at initialisation."""

    def __init__(self, in_dim: int, dim: int, cond_dim: int = 0):
        super().__init__()
        if cond_dim:
            self.cond_proj = nn.Linear(cond_dim, in_dim, bias=False)
            nn.init.zeros_(self.cond_proj.weight)
        self.linear_1 = nn.Linear(in_dim, dim)
        self.act = nn.SiLU()
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        if condition is not None:
            x = x + self.cond_proj(condition.to(x.dtype))
        return self.linear_2(self.act(self.linear_1(x)))


class GroupNorm(nn.GroupNorm):
    """nn.GroupNorm (the same parameters and state dict) that can normalise a channels-last input as an NCHW copy
    (`nchw_inside`, set per network by layout.py): PyTorch's channels-last GroupNorm kernel is up to 10x slower
    than its NCHW one in bf16 on an AMD EPYC Zen 5 (4.4 vs 0.4 ms at [64, 64, 28, 28]), more than two copies cost,
    while the convolutions around it are fastest channels-last."""

    nchw_inside = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.nchw_inside and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
            return super().forward(x.contiguous()).contiguous(memory_format=torch.channels_last)
        return super().forward(x)


def silu_of_fresh(x: torch.Tensor) -> torch.Tensor:
    """SiLU of a tensor nothing else holds (a norm's output): in place where autograd does not need the input."""
    return F.silu(x, inplace=not (torch.is_grad_enabled() and x.requires_grad))


class ResnetBlock2D(nn.Module):
    """GroupNorm -> SiLU -> conv, plus a projection of the time embedding, twice, with a skip."""

    def __init__(self, in_channels: int, out_channels: int, temb_channels: int, groups: int = 32, dropout: float = 0.0, eps: float = 1e-5, output_scale_factor: float = 1.0):
        super().__init__()
        self.norm1 = GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_channels, out_channels) if temb_channels else None
        self.norm2 = GroupNorm(groups, out_channels, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nonlinearity = nn.SiLU()
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None
        self.output_scale_factor = output_scale_factor

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None) -> torch.Tensor:
        # diffusers' arithmetic, with fewer passes over memory: the adds go into the fresh convolution outputs
        # (their backward does not need them), SiLU overwrites the fresh GroupNorm output where no backward
        # follows, and a scale factor of 1 divides nothing. The values are bit for bit the same.
        h = self.conv1(silu_of_fresh(self.norm1(x)))
        if self.time_emb_proj is not None and temb is not None:
            h.add_(self.time_emb_proj(self.nonlinearity(temb))[:, :, None, None])
        h = self.conv2(self.dropout(silu_of_fresh(self.norm2(h))))
        h.add_(self.conv_shortcut(x) if self.conv_shortcut is not None else x)
        return h if self.output_scale_factor == 1 else h / self.output_scale_factor


def sliced_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, query_chunk: int) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v over [B, heads, N, d] tensors, computed for at most `query_chunk` queries at a time."""
    if plain_matmuls_are_faster(q, k):
        return matmul_attention(q, k, v, mask)
    if q.shape[2] <= query_chunk:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return torch.cat([F.scaled_dot_product_attention(part, k, v, attn_mask=mask) for part in q.split(query_chunk, dim=2)], dim=2)


def plain_matmuls_are_faster(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Training in bf16 on a CPU with few keys or a small score matrix: there PyTorch's fused attention kernel
    spends most of its time in backward. Forward + backward under bf16 autocast on an AMD EPYC Zen 5 (torch 2.13):
    [64, 2, 49, 32] 8.2 ms fused vs 1.6 ms plain, [64, 2, 196, 32] 27 vs 13, [2, 8, 1024, 40] x 77 keys 6.6 vs 2.9,
    but [2, 8, 1024, 40] x 1024 keys 44 vs 75. Sampling keeps the fused kernel (more precise in bf16, as fast);
    float32 keeps it too (plain matmuls 1.4x slower there)."""
    return (torch.is_grad_enabled() and q.requires_grad and q.device.type == "cpu" and q.dtype == torch.bfloat16
            and (k.shape[2] <= 256 or q.shape[2] * k.shape[2] <= 256 * 256))


def matmul_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v with plain matrix products (Vaswani et al. 2017, eq. 1); mask True: attend."""
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(-1).to(v.dtype) @ v


class Attention(nn.Module):
    """Multi-head (cross-)attention over token sequences [B, N, dim] (diffusers' `Attention` names).

    Keys and values come from `context` [B, L, context_dim] when given (cross-attention),
    else from the input itself. `mask` [B, L] (True or 1: attend) hides padding tokens.
    `recorder`: None, or an object whose record(q, k, mask) sees a cross-attention layer's queries and keys
    (nn/attention_recorder.py sets it on the layers it watches: DAAM's maps); the output is the same either way.
    """

    # Inputs with more queries than this are attended in slices of this many queries: the same result,
    # with at most query_chunk x L attention scores alive at a time. (PyTorch's fused kernels avoid the
    # full N x L matrix anyway; the slicing bounds memory where it falls back to the plain math kernel.)
    query_chunk = 4096
    recorder = None  # what watches this layer's probabilities (attention_recorder.recording); None: nothing, the usual case

    def __init__(self, dim: int, heads: int, context_dim: int | None = None, bias: bool = False, dropout: float = 0.0):
        super().__init__()
        self.heads = heads
        self.cross = context_dim is not None  # attends to a context (the text), not to its own input
        self.to_q = nn.Linear(dim, dim, bias=bias)
        self.to_k = nn.Linear(context_dim or dim, dim, bias=bias)
        self.to_v = nn.Linear(context_dim or dim, dim, bias=bias)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim), nn.Dropout(dropout)])

    def attend(self, x: torch.Tensor, context: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        b, n, dim = x.shape
        context = x if context is None else context
        q = self.to_q(x).view(b, n, self.heads, -1).transpose(1, 2)
        k, v = (proj(context).view(b, context.shape[1], self.heads, -1).transpose(1, 2) for proj in (self.to_k, self.to_v))
        attn_mask = mask.bool()[:, None, None, :] if mask is not None else None
        if self.recorder is not None:
            self.recorder.record(q, k, attn_mask)
        out = sliced_attention(q, k, v, attn_mask, self.query_chunk).transpose(1, 2).reshape(b, n, dim)
        for layer in self.to_out:
            out = layer(out)
        return out

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.attend(x, context, mask)


class SelfAttention2D(Attention):
    """Self-attention over the pixels of a feature map, with GroupNorm and a residual
    (diffusers builds it as `Attention(..., norm_num_groups=..., residual_connection=True)`)."""

    def __init__(self, channels: int, heads: int, groups: int = 32, eps: float = 1e-5, dropout: float = 0.0, output_scale_factor: float = 1.0):
        super().__init__(channels, heads, bias=True, dropout=dropout)
        self.group_norm = GroupNorm(groups, channels, eps=eps)
        self.output_scale_factor = output_scale_factor

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Self-attention only: a text context, if passed, is not used here."""
        b, c, h, w = x.shape
        tokens = self.group_norm(x).flatten(2).transpose(1, 2)  # [B, HW, C]
        out = self.attend(tokens).transpose(1, 2).reshape(b, c, h, w)
        out = out + x
        return out if self.output_scale_factor == 1 else out / self.output_scale_factor


class GEGLU(nn.Module):
    """GELU-gated linear unit (Shazeer 2020): a * gelu(b), with [a, b] = proj(x)."""

    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, inner * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, gate = self.proj(x).chunk(2, dim=-1)
        return a * F.gelu(gate)


class GELU(nn.Module):
    """A linear layer, then GELU (Hendrycks & Gimpel 2016); approximate="tanh" is the tanh form of ViT and DiT."""

    def __init__(self, dim: int, inner: int, approximate: str = "none"):
        super().__init__()
        self.proj = nn.Linear(dim, inner)
        self.approximate = approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(x), approximate=self.approximate)


class FeedForward(nn.Module):
    """A projection with its activation, dropout, a linear layer back: "geglu" (Stable Diffusion) or
    "gelu-approximate" (DiT, ViT: tanh GELU)."""

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0, activation: str = "geglu"):
        super().__init__()
        if activation not in ("geglu", "gelu-approximate"):
            raise ValueError(f"unknown feed-forward activation {activation!r}")
        first = GEGLU(dim, dim * mult) if activation == "geglu" else GELU(dim, dim * mult, approximate="tanh")
        self.net = nn.ModuleList([first, nn.Dropout(dropout), nn.Linear(dim * mult, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.net:
            x = layer(x)
        return x


class BasicTransformerBlock(nn.Module):
    """Pre-norm transformer layer: self-attention, cross-attention to the text tokens, GEGLU feed-forward."""

    def __init__(self, dim: int, heads: int, context_dim: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads, dropout=dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, heads, context_dim=context_dim, dropout=dropout)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, dropout=dropout)

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context, mask) + x
        return self.ff(self.norm3(x)) + x


class Transformer2D(nn.Module):
    """Stable Diffusion's spatial transformer (diffusers' Transformer2DModel): GroupNorm, 1x1 projection
    to tokens, `layers` transformer blocks attending to the text, projection back, residual."""

    def __init__(self, channels: int, heads: int, context_dim: int, groups: int = 32, layers: int = 1, linear_projection: bool = False, dropout: float = 0.0):
        super().__init__()
        self.norm = GroupNorm(groups, channels, eps=1e-6)
        self.linear_projection = linear_projection
        projection = (lambda: nn.Linear(channels, channels)) if linear_projection else (lambda: nn.Conv2d(channels, channels, 1))
        self.proj_in = projection()
        self.transformer_blocks = nn.ModuleList([BasicTransformerBlock(channels, heads, context_dim, dropout) for _ in range(layers)])
        self.proj_out = projection()

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        b, c, h, w = x.shape
        h_ = self.norm(x)
        if self.linear_projection:
            tokens = self.proj_in(h_.flatten(2).transpose(1, 2))
        else:
            tokens = self.proj_in(h_).flatten(2).transpose(1, 2)
        for block in self.transformer_blocks:
            tokens = block(tokens, context, mask)
        if self.linear_projection:
            out = self.proj_out(tokens).transpose(1, 2).reshape(b, c, h, w)
        else:
            out = self.proj_out(tokens.transpose(1, 2).reshape(b, c, h, w))
        return out + x


class Downsample2D(nn.Module):
    """Halve the resolution with a stride-2 3x3 convolution.

    padding 1 pads all sides (Stable Diffusion's U-Net); padding 0 pads one zero row and column
    on the right and bottom only (the autoencoder, and the original DDPM U-Nets): their weights
    expect it."""

    def __init__(self, channels: int, padding: int = 1):
        super().__init__()
        self.asymmetric = padding == 0
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)) if self.asymmetric else x)


class Upsample2D(nn.Module):
    """Double the resolution: nearest-neighbour upsampling, then a 3x3 convolution."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
