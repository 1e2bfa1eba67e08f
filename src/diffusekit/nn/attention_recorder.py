"""Cross-attention probabilities, recorded through the attention layers' own seam (DAAM: Tang et al. 2023,
"What the DAAM: Interpreting Stable Diffusion Using Cross Attention", sec. 3).

    recorder = CrossAttentionRecorder(size=(32, 32), positions=[1, 2], rows=4)
    with recording(net, recorder):         # each cross-attention layer of net hands it its queries and keys
        net(x, t, context=hidden, context_mask=mask)
    recorder.total                         # [4, 2, 32, 32]: tokens 1 and 2's probabilities, summed over layers and heads
    recorder.count                         # how many (layer call, head) maps that sum holds

Every blocks.Attention holds `recorder = None` (a class attribute): the one check a layer pays when nothing
records. The fused kernel (scaled_dot_product_attention) gives no probabilities, so the recorder computes
P = softmax(q k^T / sqrt(d)) again, in float32, for the layers it watches; their outputs are untouched.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from diffusekit.nn.blocks import Attention


def attention_probabilities(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """P = softmax(q k^T / sqrt(d)) [B, heads, N, L] of q [B, heads, N, d] and k [B, heads, L, d], float32; mask
    (broadcast to P, True: attend) gives hidden keys probability 0. Each row (query) sums to 1 over the L keys."""
    scores = (q.float() @ k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(-1)


class CrossAttentionRecorder:
    """Sums what the watched layers attend to, per token, as maps over the image (DAAM eq. 4 and 5).

    size: (H, W) every layer's map is upsampled to, bicubically as DAAM, negative overshoot clamped to 0.
    positions: the token positions (keys) to keep, e.g. a prompt's words without padding and special tokens
    (None: all L). rows: how many of a call's batch rows to keep: with classifier-free guidance the batch is
    [conditional; unconditional] and only the first, conditional half is recorded.
    """

    def __init__(self, size: tuple[int, int], positions: list[int] | None = None, rows: int | None = None):
        self.size, self.positions, self.rows = tuple(size), positions, rows
        self.total: torch.Tensor | None = None  # [rows, tokens, H, W]
        self.count = 0

    def record(self, q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None) -> None:
        rows = slice(0, self.rows)
        probs = attention_probabilities(q[rows], k[rows], mask[rows] if mask is not None else None)  # [B, heads, N, L]
        summed = probs.sum(1)  # over heads: [B, N, L]
        if self.positions is not None:
            summed = summed[..., self.positions]
        b, n, tokens = summed.shape
        side = math.isqrt(n)  # the layer's queries are the pixels of a square feature map (U-Net) or of its patches (DiT)
        if side * side != n:
            raise ValueError(f"a cross-attention layer has {n} queries, not the pixels of a square map")
        maps = summed.transpose(1, 2).reshape(b, tokens, side, side)
        maps = F.interpolate(maps, size=self.size, mode="bicubic", align_corners=False).clamp_(min=0)
        self.total = maps if self.total is None else self.total + maps
        self.count += probs.shape[1]


def cross_attention_layers(net: torch.nn.Module) -> list[Attention]:
    """The attention layers of `net` that attend to a context (the text): none in an unconditional or class model."""
    return [m for m in net.modules() if isinstance(m, Attention) and m.cross]


@contextmanager
def recording(net: torch.nn.Module, recorder):
    """Within the block, every cross-attention layer of `net` hands `recorder` its queries, keys and mask."""
    layers = cross_attention_layers(net)
    if not layers:
        raise ValueError("the network has no cross-attention layers to record")
    for layer in layers:
        layer.recorder = recorder
    try:
        yield recorder
    finally:
        for layer in layers:
            del layer.recorder  # back to the class's None
