"""The Diffusion Transformer (Peebles & Xie 2023, "Scalable Diffusion Models with Transformers").

Patchify (sec. 3.1): p x p patches, each embedded linearly (a Conv2d of kernel = stride = p), plus
2-D sin-cos (or learned) position embeddings: T = (H/p)(W/p) tokens. Then N blocks with adaLN-Zero
conditioning (sec. 3.2) on c = MLP(sinusoid(t)) + E[y] (+ a pooled text vector):

    (beta1, gamma1, alpha1, beta2, gamma2, alpha2) = Linear(SiLU(c))
    x <- x + alpha1 * SelfAttn(LN(x) * (1 + gamma1) + beta1)
    x <- x + CrossAttn(LN'(x), text)                          (text models only)
    x <- x + alpha2 * MLP(LN(x) * (1 + gamma2) + beta2)

That Linear starts at zero, so every gate alpha is 0 and each block is the identity ("adaLN-Zero").
The decoder (sec. 3.1, "Transformer decoder"): a final adaptive LayerNorm (shift, scale from c) and a
linear layer to p * p * C values per token, both zero-initialised too (a fresh DiT outputs exactly 0);
then "unpatchify" puts the tokens back into an image.

Text: a cross-attention layer per block after self-attention (sec. 3.2's "cross-attention block"),
with its own LayerNorm and a zero-initialised output projection as in PixArt-alpha (Chen et al. 2023),
so blocks stay the identity at initialisation; and the masked mean of the text tokens, through a small
MLP, is added to c. We chose this over MMDiT's joint attention (Esser et al. 2024, sec. 4: text and
image tokens in one sequence, with a second set of block weights for the text stream): at the tiny
sizes we train on a CPU it is cheaper (one set of weights, N image queries only), and it keeps the
U-Net's text interface (context [B, L, D], mask [B, L]), so encoders, guidance and pipelines are shared.

Names and layout are those of diffusers' DiTTransformer2DModel (norm_type="ada_norm_zero"): its state
dicts (out_channels == in_channels) load key for key and give the same output. Two of its choices differ
from the original DiT code and are kept for that: every block owns a copy of the timestep/class embedder
(`transformer_blocks.i.norm1.emb`; diffusers' converter writes the original single embedder into each,
and the final layer reads block 0's), and the timestep frequencies are 10000^(-i / (half - 1))
(freq_shift=1; the original DiT has i / half). The text branch (norm2, attn2, pooled_text_proj) is ours.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from diffusekit.errors import UserError
from diffusekit.nn.blocks import Attention, FeedForward, TimestepEmbedding, check_text_context, timestep_embedding


def sincos_2d(dim: int, rows: int, cols: int, base: int) -> torch.Tensor:
    """Fixed 2-D sin-cos position embeddings [1, rows * cols, dim] (MAE, He et al. 2022; DiT sec. 3.1).

    The first half of the channels encodes the column, the second the row, each as
    [sin(pos * w_k), cos(pos * w_k)], w_k = 10000^(-k / (dim / 4)). Positions are scaled so that any
    grid spans the base x base grid the model was built for (as diffusers does; identity at that size).
    """
    omega = 1.0 / 10_000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))

    def axis(n: int) -> torch.Tensor:  # [n, dim / 2]
        pos = (torch.arange(n, dtype=torch.float32) / (n / base)).double()  # float32 positions, as diffusers has them
        angles = pos[:, None] * omega[None, :]
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    col, row = axis(cols)[None, :, :].expand(rows, cols, -1), axis(rows)[:, None, :].expand(rows, cols, -1)
    return torch.cat([col, row], dim=-1).reshape(1, rows * cols, dim).float()


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The adaptive LayerNorm's affine step, per sample: x * (1 + scale) + shift over tokens [B, T, D]."""
    return x * (1 + scale[:, None]) + shift[:, None]


class PatchEmbed(nn.Module):
    """Patchify plus position embeddings (diffusers' PatchEmbed: `proj`, and `pos_embed`, a
    non-persistent buffer for sincos, a parameter when learned)."""

    def __init__(self, in_channels: int, dim: int, patch_size: int, sample_size: int, kind: str):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)
        self.patch_size, self.grid, self.kind = patch_size, sample_size // patch_size, kind
        if kind == "sincos":
            self.register_buffer("pos_embed", sincos_2d(dim, self.grid, self.grid, self.grid), persistent=False)
        else:
            self.pos_embed = nn.Parameter(torch.zeros(1, self.grid**2, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows, cols = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
        tokens = self.proj(x).flatten(2).transpose(1, 2)  # [B, rows * cols, dim], row-major
        pos = self.pos_embed
        if (rows, cols) != (self.grid, self.grid):  # only sincos gets here (DiT.check_input)
            pos = sincos_2d(tokens.shape[-1], rows, cols, self.grid).to(x.device)
        return tokens + pos.to(tokens.dtype)


class ConditionEmbedding(nn.Module):
    """c = MLP(sinusoid(t)) + E[y] (diffusers' CombinedTimestepLabelEmbeddings names). E has
    num_classes + 1 rows: the last one is the null class of classifier-free guidance."""

    def __init__(self, freq_dim: int, dim: int, num_classes: int):
        super().__init__()
        self.timestep_embedder = TimestepEmbedding(freq_dim, dim)
        if num_classes:
            self.class_embedder = nn.ModuleDict({"embedding_table": nn.Embedding(num_classes + 1, dim)})

    def forward(self, t_freq: torch.Tensor, class_labels: torch.Tensor | None) -> torch.Tensor:
        c = self.timestep_embedder(t_freq)
        if class_labels is not None:
            c = c + self.class_embedder["embedding_table"](class_labels).to(c.dtype)
        return c


class AdaLayerNormZero(nn.Module):
    """LayerNorm (no affine) modulated from c; returns the normed input for self-attention, its gate
    alpha1, and (shift, scale, gate) for the MLP (sec. 3.2)."""

    def __init__(self, dim: int, freq_dim: int, num_classes: int):
        super().__init__()
        self.emb = ConditionEmbedding(freq_dim, dim, num_classes)
        self.linear = nn.Linear(dim, 6 * dim)
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)

    def forward(self, x: torch.Tensor, c: torch.Tensor):
        shift, scale, gate, *mlp = self.linear(F.silu(c)).chunk(6, dim=1)
        return modulate(self.norm(x), shift, scale), gate, mlp


class DiTBlock(nn.Module):
    """One DiT block (diffusers' BasicTransformerBlock with norm_type="ada_norm_zero" names)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int, freq_dim: int, num_classes: int, context_dim: int, dropout: float):
        super().__init__()
        self.norm1 = AdaLayerNormZero(dim, freq_dim, num_classes)
        self.attn1 = Attention(dim, heads, bias=True, dropout=dropout)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6) if context_dim else None
        self.attn2 = Attention(dim, heads, context_dim=context_dim, bias=True, dropout=dropout) if context_dim else None
        self.norm3 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-5)  # diffusers' norm_eps here, 1e-6 in norm1
        self.ff = FeedForward(dim, mlp_ratio, dropout, activation="gelu-approximate")

    def forward(self, x: torch.Tensor, c: torch.Tensor, context: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        h, gate_attn, (shift_mlp, scale_mlp, gate_mlp) = self.norm1(x, c)
        x = x + gate_attn[:, None] * self.attn1(h)
        if self.attn2 is not None:
            x = x + self.attn2(self.norm2(x), context, mask)
        return x + gate_mlp[:, None] * self.ff(modulate(self.norm3(x), shift_mlp, scale_mlp))


def check_args(pos_embed: str, **sizes: int) -> None:
    """The constructor's arguments, each mistake with its own message (sizes: name -> value)."""
    for name, value in sizes.items():
        optional = name in ("num_classes", "cross_attention_dim")  # 0: off
        if value < (0 if optional else 1):
            raise UserError(f"DiT {name} must be {'0 (off) or positive' if optional else 'at least 1'}, got {value}")
    if pos_embed not in ("sincos", "learned"):
        raise UserError(f"DiT pos_embed must be 'sincos' or 'learned', got {pos_embed!r}")
    hidden, heads, sample, patch = (sizes[k] for k in ("hidden_size", "num_heads", "sample_size", "patch_size"))
    if hidden % heads:
        raise UserError(f"DiT hidden_size {hidden} must be divisible by num_heads {heads}")
    if pos_embed == "sincos" and hidden % 4:
        raise UserError(f"DiT hidden_size {hidden} must be a multiple of 4 for 2-D sin-cos position embeddings")
    if sample % patch:
        raise UserError(f"DiT sample_size {sample} must be a multiple of patch_size {patch}")


class DiT(nn.Module):
    """A DiT over [B, in_channels, H, W] images of sample_size (any size that divides into patches with
    sincos position embeddings); num_classes > 0: class-conditional, cross_attention_dim > 0: text."""

    def __init__(self, in_channels: int = 4, out_channels: int | None = None, sample_size: int = 32, patch_size: int = 2,
                 hidden_size: int = 384, depth: int = 12, num_heads: int = 6, mlp_ratio: int = 4, num_classes: int = 0,
                 cross_attention_dim: int = 0, pos_embed: str = "sincos", dropout: float = 0.0, freq_dim: int = 256, freq_shift: float = 1.0):
        super().__init__()
        check_args(pos_embed, in_channels=in_channels, sample_size=sample_size, patch_size=patch_size, hidden_size=hidden_size, depth=depth,
                   num_heads=num_heads, mlp_ratio=mlp_ratio, num_classes=num_classes, cross_attention_dim=cross_attention_dim)
        self.in_channels, self.out_channels = in_channels, out_channels or in_channels
        self.sample_size, self.patch_size, self.num_classes = sample_size, patch_size, num_classes
        self.cross_attention_dim, self.freq_dim, self.freq_shift = cross_attention_dim, freq_dim, freq_shift
        self.pos_embed = PatchEmbed(in_channels, hidden_size, patch_size, sample_size, pos_embed)
        if cross_attention_dim:
            self.pooled_text_proj = TimestepEmbedding(cross_attention_dim, hidden_size)  # Linear -> SiLU -> Linear
        self.transformer_blocks = nn.ModuleList(
            [DiTBlock(hidden_size, num_heads, mlp_ratio, freq_dim, num_classes, cross_attention_dim, dropout) for _ in range(depth)]
        )
        self.norm_out = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.proj_out_1 = nn.Linear(hidden_size, 2 * hidden_size)
        self.proj_out_2 = nn.Linear(hidden_size, patch_size * patch_size * self.out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """DiT's initialisation: Xavier-uniform linear layers (and patch projection) with zero biases,
        N(0, 0.02) timestep MLP and class table; zero for adaLN-Zero's modulation, the final layer and
        (PixArt-alpha) the cross-attention output."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        proj = self.pos_embed.proj
        nn.init.xavier_uniform_(proj.weight.view(proj.weight.shape[0], -1))
        nn.init.zeros_(proj.bias)
        if isinstance(self.pos_embed.pos_embed, nn.Parameter):
            nn.init.trunc_normal_(self.pos_embed.pos_embed, std=0.02)
        zeroed = [self.proj_out_1, self.proj_out_2]
        for block in self.transformer_blocks:
            emb = block.norm1.emb
            for layer in (emb.timestep_embedder.linear_1, emb.timestep_embedder.linear_2):
                nn.init.normal_(layer.weight, std=0.02)
            if self.num_classes:
                nn.init.normal_(emb.class_embedder["embedding_table"].weight, std=0.02)
            zeroed += [block.norm1.linear] + ([block.attn2.to_out[0]] if block.attn2 is not None else [])
        for layer in zeroed:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def check_input(self, x: torch.Tensor, context: torch.Tensor | None) -> None:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise UserError(f"the DiT takes images of shape [batch, {self.in_channels}, H, W], got {list(x.shape)}")
        h, w, p, size = *x.shape[-2:], self.patch_size, self.sample_size
        if h % p or w % p:
            raise UserError(f"image size {h}x{w} does not divide into this DiT's {p}x{p} patches: height and width must be multiples of {p}")
        if self.pos_embed.kind == "learned" and (h, w) != (size, size):
            raise UserError(
                f"this DiT has learned position embeddings for {size}x{size} images and cannot take {h}x{w} ones "
                f"(use {size}x{size} images, or a DiT with pos_embed='sincos')"
            )
        check_text_context("DiT", self.cross_attention_dim, context)

    def pooled_text(self, context: torch.Tensor, context_mask: torch.Tensor | None) -> torch.Tensor:
        """The masked mean of the text tokens through a small MLP: a global text vector for c."""
        if context_mask is None:
            pooled = context.mean(dim=1)
        else:
            keep = context_mask.bool()[..., None]
            pooled = context.masked_fill(~keep, 0).sum(dim=1) / keep.sum(dim=1).clamp(min=1).to(context.dtype)
        return self.pooled_text_proj(pooled)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        class_labels: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x [B, C, H, W] at (possibly fractional) timesteps t; class labels (None: the null class), or
        text token embeddings `context` [B, L, D] with `context_mask` [B, L] (1: a real token, 0: padding)."""
        self.check_input(x, context)
        b, _, height, width = x.shape
        t = t.to(x.device, torch.float32).reshape(-1).expand(b)
        t_freq = timestep_embedding(t, self.freq_dim, flip_sin_to_cos=True, freq_shift=self.freq_shift).to(x.dtype)
        if self.num_classes and class_labels is None:
            class_labels = torch.full((b,), self.num_classes, device=x.device, dtype=torch.long)
        labels = class_labels if self.num_classes else None
        text = self.pooled_text(context, context_mask) if self.cross_attention_dim else 0.0

        h = self.pos_embed(x)
        conds = [block.norm1.emb(t_freq, labels) + text for block in self.transformer_blocks]
        for block, c in zip(self.transformer_blocks, conds):
            h = block(h, c, context, context_mask)
        shift, scale = self.proj_out_1(F.silu(conds[0])).chunk(2, dim=1)  # the final layer reads block 0's c
        h = self.proj_out_2(modulate(self.norm_out(h), shift, scale))  # [B, T, p * p * C]

        p, rows, cols = self.patch_size, height // self.patch_size, width // self.patch_size
        h = h.reshape(b, rows, cols, p, p, self.out_channels).permute(0, 5, 1, 3, 2, 4)  # [B, C, rows, p, cols, p]
        return h.reshape(b, self.out_channels, height, width)
