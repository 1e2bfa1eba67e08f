"""Image-to-image (SDEdit) and inpainting (RePaint) as pieces around the samplers, never inside them.

SDEdit (Meng et al. 2022, sec. 3): noise the init image x0 to a level sigma_s with the closed-form
forward process (DDPM eq. 4, in the k-diffusion scaling x = x_t / sqrt(abar) this is
x = x0 + sigma_s * eps) and run the sampler down the rest of the schedule. `strength` picks
sigma_s as diffusers' img2img pipelines do: of the `steps` sampling sigmas the last
int(steps * strength) are walked. At strength 1 the start is pure noise, exactly the start of
text-to-image (as diffusers' inpainting pipeline does at strength 1), so that the init image is
then forgotten entirely.

Inpainting: a mask m (1: repaint, 0: keep) and the known clean image x0_known.
`KnownRegionDenoiser` returns m * D(x) + (1 - m) * x0_known. Every sampler moves x towards its
x0_hat: a DDIM / Euler step is x' = x0_hat + (sigma'/sigma)(x - x0_hat), so in the known region
x' = x0_known + (sigma'/sigma)(x - x0_known): a known region at x0_known + sigma * eps moves to
x0_known + sigma' * eps, the init image noised to the next level, which is where RePaint
(Lugmayr et al. 2022, eq. 8) puts it. DDPM's ancestral step gives x0_known + (sigma'^2/sigma) eps
+ std * z, of variance sigma'^2 (samplers.py): a draw of q(x_sigma' | x0_known), as in RePaint.
The one difference: RePaint draws fresh noise for the known region at every step, while here a
deterministic sampler keeps one noise path through it (the same marginals at every level). The
multistep and second-order samplers (DPM-Solver++, Heun) see x0_hat = x0_known there at every
step, so their updates reduce to the same move. At sigma = 0 the known region is x0_known exactly.

Resampling (RePaint sec. 4.2): after walking `jump_length` steps, jump back up by the forward
process (in this scaling Brownian motion, x_sigma = x_sigma' + sqrt(sigma^2 - sigma'^2) z) and walk
them again, `jump_n_sample` times in all, so that the new region harmonises with the known one.
"""

from __future__ import annotations

import torch

from diffusekit.errors import UserError
from diffusekit.seeds import randn


def default_strength(strength: float | None, masked: bool) -> float:
    """diffusers' defaults: 0.8 for image-to-image, 1.0 for inpainting (the masked region starts from pure noise)."""
    return strength if strength is not None else 1.0 if masked else 0.8


def strength_start(steps: int, strength: float) -> int:
    """Index of the first of the `steps` sampling sigmas an image-to-image run of `strength` starts at:
    steps - int(steps * strength), as diffusers' StableDiffusionImg2ImgPipeline computes it."""
    if not isinstance(strength, (int, float)) or not 0 < strength <= 1:
        raise UserError(f"strength must be in (0, 1] (1: the init image is forgotten, near 0: it is kept), got {strength!r}")
    walked = min(int(steps * strength), steps)
    if walked < 1:
        raise UserError(f"strength {strength} of {steps} steps leaves no step to take (int(steps * strength) = 0); "
                        f"use a strength of at least {1 / steps:.3g} or more steps")
    return steps - walked


def noised_start(known: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor, strength: float, pure: torch.Tensor) -> torch.Tensor:
    """The sampler's first x for an edit from `sigmas[0]`: known + sigma * noise (the closed-form forward process),
    or at strength 1 the text-to-image start noise * pure (1 / alpha: sqrt(1 + sigma^2) for DDPM, 1 + sigma for flow)."""
    if strength >= 1:
        return noise * pure
    return known.to(noise.dtype) + sigmas[0].to(noise.dtype) * noise


class KnownRegionDenoiser:
    """D(x, sigma, cond) whose x0_hat is the known image where the mask is 0 (soft masks blend linearly).

    known: [B or 1, C, H, W] clean images (latents for latent models); mask: [B or 1, 1, H, W] in [0, 1], 1 = repaint."""

    def __init__(self, denoiser, known: torch.Tensor, mask: torch.Tensor):
        self.denoiser, self.known, self.mask = denoiser, known, mask

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond: dict | None = None) -> torch.Tensor:
        x0 = self.denoiser(x, sigma, cond)
        mask = self.mask.to(x0.dtype)
        return mask * x0 + (1 - mask) * self.known.to(x0.dtype)


def check_resampling(jump_length, jump_n_sample) -> None:
    if not (isinstance(jump_length, int) and isinstance(jump_n_sample, int) and jump_n_sample >= 1 and jump_length >= 1):
        raise UserError(f"jump_length ({jump_length}) and jump_n_sample ({jump_n_sample}) must be at least 1 (jump_n_sample 1: no resampling)")


def sample_resampled(sample_fn, denoiser, x, sigmas, cond=None, generator=None, callback=None, jump_length: int = 10,
                     jump_n_sample: int = 1, **options) -> torch.Tensor:
    """Run `sample_fn` down `sigmas` in chunks of `jump_length` steps, each walked `jump_n_sample` times:
    between the walks x is noised back up to the chunk's first sigma (RePaint's resampling, sec. 4.2).
    jump_n_sample = 1 is the plain sampler. The callback sees the step index within the whole schedule."""
    check_resampling(jump_length, jump_n_sample)
    steps = len(sigmas) - 1
    if jump_n_sample == 1:
        return sample_fn(denoiser, x, sigmas, cond=cond, generator=generator, callback=callback, **options)
    for begin in range(0, steps, jump_length):
        part = sigmas[begin:min(begin + jump_length, steps) + 1]

        def shifted(info, begin=begin):
            if callback is not None:
                callback({**info, "i": info["i"] + begin, "steps": steps})

        for walk in range(jump_n_sample):
            x = sample_fn(denoiser, x, part, cond=cond, generator=generator, callback=shifted, **options)
            if walk < jump_n_sample - 1:
                up = (part[0] ** 2 - part[-1] ** 2).sqrt().to(x.dtype)
                x = x + up * randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return x
