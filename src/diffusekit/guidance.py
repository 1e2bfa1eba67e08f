"""Classifier-free guidance (Ho & Salimans 2022) as a wrapper around a denoiser.

    D_w(x) = D(x | null) + w * (D(x | cond) - D(x | null))

w = 1 is the plain conditional model. Both halves are evaluated in one batched
network call. Guidance rescale (Lin et al. 2023, sec. 3.4, eq. 15-16) pulls the
per-sample standard deviation of the guided x0 back towards that of the conditional
one, which counters the over-saturation of large w:

    x_rescaled = x_cfg * std(x_cond) / std(x_cfg);  x = phi * x_rescaled + (1 - phi) * x_cfg

(applied here to the x0 prediction, the quantity every diffusekit denoiser returns).
"""

from __future__ import annotations

import torch

from diffusekit.sigmas import append_dims


def concat_cond(a: dict, b: dict) -> dict:
    """Batch two condition dicts with the same keys."""
    if a.keys() != b.keys():
        raise ValueError(f"conditions have different keys: {sorted(a)} vs {sorted(b)}")
    return {k: torch.cat([a[k], b[k]]) for k in a}


def rescale_guidance(guided: torch.Tensor, conditional: torch.Tensor, phi: float) -> torch.Tensor:
    dims = list(range(1, guided.ndim))
    factor = conditional.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True).clamp(min=1e-12)
    return phi * guided * factor + (1 - phi) * guided


class GuidedDenoiser:
    """D(x, sigma, cond) with classifier-free guidance; `uncond` is the null condition for this batch.
    `scale` is one number, or a tensor [B] of one scale per sample (guidance distillation draws them)."""

    def __init__(self, denoiser, uncond: dict, scale: float | torch.Tensor, rescale: float = 0.0):
        self.denoiser, self.uncond, self.scale, self.rescale = denoiser, uncond, scale, rescale

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond: dict | None = None) -> torch.Tensor:
        if cond is None or (not torch.is_tensor(self.scale) and self.scale == 1.0):
            return self.denoiser(x, sigma, cond)
        sigma2 = sigma.repeat(2) if sigma.ndim == 1 else sigma  # a per-sample sigma [B] covers both halves
        both = self.denoiser(torch.cat([x, x]), sigma2, concat_cond(cond, self.uncond))
        conditional, unconditional = both.chunk(2)
        scale = append_dims(self.scale, x) if torch.is_tensor(self.scale) else self.scale
        guided = unconditional + scale * (conditional - unconditional)
        return rescale_guidance(guided, conditional, self.rescale) if self.rescale > 0 else guided
