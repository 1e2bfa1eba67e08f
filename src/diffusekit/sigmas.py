"""What every noise process shares in the samplers' language x = x0 + sigma * eps: per-sample coefficients over
a batch, the sigma grids samplers walk down, and the deterministic step between two noise levels.

    append_dims(sigma, x)                  # [B] -> [B, 1, 1, 1]: one coefficient per image (k-diffusion's name)
    karras_sigmas(lo, hi, steps)           # Karras et al. 2022 eq. 5
    logsnr_sigmas(lo, hi, steps)           # uniform in log sigma, i.e. in log-SNR = -2 log sigma
    ddim_step(x, x0, sigma, sigma_next)    # DDIM with eta = 0 (Song et al. 2021 eq. 12): x0 + (sigma' / sigma)(x - x0)

The DDPM schedules (schedule.py) and flow matching (flow.py) build their sampling grids from these; the
samplers and the distillation targets take their steps with ddim_step.
"""

from __future__ import annotations

import math

import torch


def append_dims(c: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A per-sample coefficient [B] (or a scalar) shaped to multiply a batch like `like`, in its dtype."""
    return c.to(like.dtype).reshape(-1, *[1] * (like.ndim - 1))


def karras_sigmas(lo: float, hi: float, steps: int, rho: float = 7.0) -> torch.Tensor:
    """`steps` sigmas from hi down to lo, uniform in sigma^(1 / rho) (Karras et al. 2022 eq. 5), float64."""
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    return (hi ** (1 / rho) + ramp * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho


def logsnr_sigmas(lo: float, hi: float, steps: int) -> torch.Tensor:
    """`steps` sigmas from hi down to lo, uniform in log sigma (= in log-SNR), float64."""
    return torch.linspace(math.log(hi), math.log(lo), steps, dtype=torch.float64).exp()


def ddim_step(x: torch.Tensor, x0: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
    """Deterministic DDIM from sigma to sigma_next (scalars or per sample), written without float32 cancellation
    at large sigma: x0 + (sigma_next / sigma)(x - x0) = x + (x - x0) / sigma * (sigma_next - sigma)."""
    return x0 + append_dims(sigma_next / sigma, x) * (x - x0)
