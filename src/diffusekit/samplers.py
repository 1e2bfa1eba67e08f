"""Samplers: one function each, one signature, over the denoiser D(x, sigma, cond) -> x0_hat.

    sample_xxx(denoiser, x, sigmas, cond=None, generator=None, callback=None, **options) -> x

x starts as noise at sigmas[0] (x = x0 + sigmas[0] * eps, k-diffusion scaling) and
the loop walks down the decreasing `sigmas`, which end at 0. `callback(i, x, x0_hat)`
is called after every step; `generator` is None, a torch.Generator or a list of
per-sample generators (see runtime.randn).

In this scaling the DDPM forward chain is Brownian motion: x_{sigma'} = x_{sigma} +
sqrt(sigma'^2 - sigma^2) z. Its reverse posterior q(x_s | x_t, x0) (Ho et al. eq. 7)
is the Brownian bridge with mean x0 + (s^2/t^2)(x_t - x0) and variance
s^2 (t^2 - s^2) / t^2; DDIM (Song et al. 2021, eq. 12) keeps the same marginals and
splits that step into a deterministic part and eta times the bridge noise.
"""

from __future__ import annotations

import torch

from diffusekit.runtime import randn


def _noise_like(x: torch.Tensor, generator) -> torch.Tensor:
    return randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def ancestral_step(sigma: torch.Tensor, sigma_next: torch.Tensor, eta: float = 1.0):
    """Split a step sigma -> sigma_next into a deterministic move to sigma_down plus noise sigma_up.

    sigma_up = eta * sqrt(s^2 (t^2 - s^2) / t^2) (DDIM's sigma_t(eta) in this scaling),
    sigma_down = sqrt(s^2 - sigma_up^2), so the marginal at sigma_next is kept.
    """
    if eta == 0 or sigma_next == 0:
        return sigma_next, sigma_next * 0
    sigma_up = torch.minimum(sigma_next, eta * (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2).sqrt())
    sigma_down = (sigma_next**2 - sigma_up**2).sqrt()
    return sigma_down, sigma_up


@torch.no_grad()
def sample_ddpm(denoiser, x, sigmas, cond=None, generator=None, callback=None, variance: str = "fixed_small"):
    """DDPM ancestral sampling (Ho et al. 2020, Algorithm 2), also over a subset of timesteps.

    variance "fixed_small" is the true posterior variance beta~_t, "fixed_large" is beta_t
    (in the sigma scaling: (t^2 - s^2)(1 + s^2)/(1 + t^2)). No noise is added on the last step.
    """
    if variance not in ("fixed_small", "fixed_large"):
        raise ValueError(f"unknown DDPM variance '{variance}'; use fixed_small or fixed_large")
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        x0 = denoiser(x, sigma, cond)
        x = x0 + (sigma_next**2 / sigma**2) * (x - x0)  # posterior mean
        if sigma_next > 0:
            if variance == "fixed_small":
                std = sigma_next * (sigma**2 - sigma_next**2).sqrt() / sigma
            else:
                std = ((sigma**2 - sigma_next**2) * (1 + sigma_next**2) / (1 + sigma**2)).sqrt()
            x = x + std.to(x.dtype) * _noise_like(x, generator)
        if callback is not None:
            callback(i, x, x0)
    return x


@torch.no_grad()
def sample_ddim(denoiser, x, sigmas, cond=None, generator=None, callback=None, eta: float = 0.0):
    """DDIM (Song et al. 2021, eq. 12). eta = 0: deterministic (Euler in sigma); eta = 1: DDPM fixed-small."""
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        x0 = denoiser(x, sigma, cond)
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
        eps = (x - x0) / sigma
        x = x0 + sigma_down.to(x.dtype) * eps
        if sigma_up > 0:
            x = x + sigma_up.to(x.dtype) * _noise_like(x, generator)
        if callback is not None:
            callback(i, x, x0)
    return x


SAMPLERS = {
    "ddpm": sample_ddpm,
    "ddim": sample_ddim,
}


def get_sampler(name: str):
    from diffusekit.errors import UserError

    if name not in SAMPLERS:
        raise UserError(f"unknown sampler '{name}'; choose one of: {', '.join(SAMPLERS)}")
    return SAMPLERS[name]
