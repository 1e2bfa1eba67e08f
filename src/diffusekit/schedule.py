"""Noise schedules and the closed-form forward process.

Notation (Ho et al. 2020): beta_t the per-step noise, alpha_t = 1 - beta_t,
abar_t = prod_{s<=t} alpha_s. The forward process in closed form (DDPM eq. 4):

    x_t = sqrt(abar_t) * x0 + sqrt(1 - abar_t) * eps,   eps ~ N(0, I).

Samplers work in the k-diffusion ("variance exploding") view of the same process,
x = x0 + sigma * eps with sigma_t = sqrt((1 - abar_t) / abar_t): that x is the
DDPM x_t divided by sqrt(abar_t). log-SNR = log(abar / (1 - abar)) = -2 log sigma.
Timesteps are 0-based: t = 0 is the least noisy, t = T - 1 the noisiest.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from diffusekit.errors import UserError
from diffusekit.flow import FlowSchedule
from diffusekit.sigmas import append_dims, karras_sigmas, logsnr_sigmas

# abar_T = 0 (zero terminal SNR) would make sigma infinite; samplers use this
# floor instead, as diffusers does (2**-24, i.e. sigma_max ~ 4096).
MIN_ALPHA_CUMPROD = 2.0**-24


def linear_betas(T: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """Ho et al. 2020: betas evenly spaced from 1e-4 to 0.02 over T = 1000 steps."""
    return torch.linspace(beta_start, beta_end, T, dtype=torch.float64)


def scaled_linear_betas(T: int, beta_start: float = 0.00085, beta_end: float = 0.012) -> torch.Tensor:
    """Stable Diffusion's schedule: linear in sqrt(beta)."""
    return torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float64) ** 2


def cosine_alpha_cumprod(t: torch.Tensor, s: float = 0.008) -> torch.Tensor:
    """Nichol & Dhariwal 2021 eq. 17: abar(t) = f(t) / f(0), f(t) = cos^2(pi/2 (t + s) / (1 + s)), t in [0, 1]."""
    f = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2
    return f / math.cos(s / (1 + s) * math.pi / 2) ** 2


def cosine_betas(T: int, beta_start: float = 0.0, beta_end: float = 0.0, max_beta: float = 0.999) -> torch.Tensor:
    """Nichol & Dhariwal 2021: beta_t = 1 - abar(t+1)/abar(t), clipped at 0.999 near t = T."""
    grid = torch.arange(T + 1, dtype=torch.float64) / T
    abar = cosine_alpha_cumprod(grid)
    return (1 - abar[1:] / abar[:-1]).clamp(max=max_beta)


def sigmoid_betas(T: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """Betas along a sigmoid from beta_start to beta_end (GeoDiff; diffusers' "sigmoid")."""
    return torch.sigmoid(torch.linspace(-6, 6, T, dtype=torch.float64)) * (beta_end - beta_start) + beta_start


BETA_SCHEDULES = {
    "linear": linear_betas,
    "scaled_linear": scaled_linear_betas,
    "cosine": cosine_betas,
    "sigmoid": sigmoid_betas,
}


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2023, Algorithm 1: shift and scale sqrt(abar) so that abar_0 is kept and abar_T = 0."""
    abar_sqrt = torch.cumprod(1 - betas, 0).sqrt()
    first, last = abar_sqrt[0].clone(), abar_sqrt[-1].clone()
    abar_sqrt = (abar_sqrt - last) * first / (first - last)
    abar = abar_sqrt**2
    alphas = torch.cat([abar[:1], abar[1:] / abar[:-1]])
    return 1 - alphas


# ----------------------------------------------------------------------------- conversions


def sigma_to_alpha_sigma(sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """k-diffusion sigma -> the DDPM coefficients (sqrt(abar), sqrt(1 - abar))."""
    alpha = 1 / torch.sqrt(1 + sigma**2)
    return alpha, sigma * alpha


def sigma_to_log_snr(sigma: torch.Tensor) -> torch.Tensor:
    return -2 * torch.log(sigma)


def log_snr_to_sigma(log_snr: torch.Tensor) -> torch.Tensor:
    return torch.exp(-log_snr / 2)


def _interp(x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """np.interp for increasing xp, clamped at the ends."""
    x = x.clamp(xp[0], xp[-1])
    idx = torch.searchsorted(xp, x).clamp(1, len(xp) - 1)
    x0, x1, f0, f1 = xp[idx - 1], xp[idx], fp[idx - 1], fp[idx]
    w = (x - x0) / (x1 - x0)
    return f0 + w * (f1 - f0)


# ----------------------------------------------------------------------------- the schedule

SPACINGS = ("leading", "trailing", "linspace", "karras", "logsnr")


class NoiseSchedule:
    """A discrete-time forward process defined by its betas (float64 throughout).

    flow.FlowSchedule has the same interface for flow matching; make_schedule picks one from a config.
    """

    process = "ddpm"

    def __init__(self, betas: torch.Tensor):
        self.betas = betas.to(torch.float64)
        self.alphas_cumprod = torch.cumprod(1 - self.betas, 0)
        abar = self.alphas_cumprod.clamp(min=MIN_ALPHA_CUMPROD)
        self.sigmas = ((1 - abar) / abar).sqrt()  # increasing in t
        self.log_sigmas = self.sigmas.log()

    @classmethod
    def from_config(cls, cfg) -> "NoiseSchedule":
        betas = BETA_SCHEDULES[cfg.schedule](cfg.timesteps, cfg.beta_start, cfg.beta_end)
        if cfg.zero_terminal_snr:
            betas = rescale_zero_terminal_snr(betas)
        return cls(betas)

    @property
    def num_timesteps(self) -> int:
        return len(self.betas)

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def resized(self, scale: float) -> "NoiseSchedule":
        """The schedule for images `scale` times the training size: the same (only flow models shift by resolution)."""
        return self

    def coefficients(self, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(sqrt(abar), sqrt(1 - abar)) at a k-diffusion sigma: x_t = x * sqrt(abar)."""
        return sigma_to_alpha_sigma(sigma.to(torch.float64))

    def net_time(self, t: torch.Tensor) -> torch.Tensor:
        """What the network is conditioned on: the (possibly fractional) timestep itself, float32."""
        return t.to(torch.float32)

    def draw_t(self, n: int, generator: torch.Generator | None, device) -> torch.Tensor:
        """n training timesteps, uniform over 0..T-1 (DDPM eq. 14)."""
        return torch.randint(0, self.num_timesteps, (n,), generator=generator, device=device)

    def draw_sigma(self, n: int, generator: torch.Generator | None, device) -> torch.Tensor:
        """n training noise levels: the sigmas of uniform timesteps (float64)."""
        return self.sigmas.to(device)[self.draw_t(n, generator, device)]

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        abar = self.alphas_cumprod.to(t.device)[t]
        return abar / (1 - abar)

    def log_snr(self, t: torch.Tensor) -> torch.Tensor:
        return self.snr(t).log()

    def alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(sqrt(abar_t), sqrt(1 - abar_t)) for integer timesteps, float64."""
        abar = self.alphas_cumprod.to(t.device)[t]
        return abar.sqrt(), (1 - abar).sqrt()

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Closed-form forward process, DDPM eq. 4: sqrt(abar_t) x0 + sqrt(1 - abar_t) eps."""
        alpha, sigma = (append_dims(c, x0) for c in self.alpha_sigma(t))
        return alpha * x0 + sigma * noise

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        """Continuous timestep for a sigma, interpolating log-sigma between the discrete steps."""
        log_sigma = sigma.to(torch.float64).clamp(min=1e-12).log()
        t = torch.arange(self.num_timesteps, dtype=torch.float64, device=sigma.device)
        return _interp(log_sigma, self.log_sigmas.to(sigma.device), t)

    def t_to_sigma(self, t: torch.Tensor) -> torch.Tensor:
        """sigma at timesteps t: the table's own value at whole timesteps (an integer tensor), else interpolated in log sigma."""
        if not t.is_floating_point():
            return self.sigmas.to(t.device)[t]
        grid = torch.arange(self.num_timesteps, dtype=torch.float64, device=t.device)
        return _interp(t.to(torch.float64), grid, self.log_sigmas.to(t.device)).exp()

    # ------------------------------------------------------------------ inference steps

    def timesteps(self, steps: int, spacing: str = "trailing", steps_offset: int = 0) -> torch.Tensor:
        """Descending integer timesteps for `steps` network calls (spacings as in diffusers).

        leading:  0, T/n, 2T/n, ...  (never reaches T-1; DDIM paper)
        trailing: ..., T-1-T/n, T-1  (Lin et al. 2023: always starts at the noisiest step)
        linspace: round(linspace(0, T-1, n))
        """
        T = self.num_timesteps
        if not 1 <= steps <= T:
            raise UserError(f"{steps} sampling steps are out of range: this model has {T} timesteps, so use between 1 and {T}")
        # numpy, as diffusers computes them, so that rounding ties land on the same integers
        if spacing == "leading":
            ts = (np.arange(steps) * (T // steps)).round() + steps_offset
        elif spacing == "trailing":
            ts = np.round(np.arange(T, 0, -T / steps))[:steps][::-1] - 1  # a float arange can give steps + 1 values
        elif spacing == "linspace":
            ts = np.linspace(0, T - 1, steps).round()
        else:
            raise UserError(f"unknown step schedule '{spacing}'; use one of: {', '.join(SPACINGS)}")
        return torch.from_numpy(ts.copy()).clamp(0, T - 1).long().flip(0)

    def sampling_sigmas(self, steps: int, spacing: str = "trailing", rho: float = 7.0, steps_offset: int = 0) -> torch.Tensor:
        """steps + 1 decreasing sigmas ending in 0: the sampler evaluates the network at the first `steps`.
        steps_offset shifts "leading" timesteps (Stable Diffusion 1.x samples with 1)."""
        if spacing == "karras":
            sigmas = karras_sigmas(self.sigma_min, self.sigma_max, steps, rho)
        elif spacing == "logsnr":
            sigmas = logsnr_sigmas(self.sigma_min, self.sigma_max, steps)
        else:
            sigmas = self.sigmas[self.timesteps(steps, spacing, steps_offset)]
        return torch.cat([sigmas, sigmas.new_zeros(1)])


def make_schedule(cfg):
    """The forward process of a DiffusionConfig: DDPM betas (NoiseSchedule) or flow matching (flow.FlowSchedule)."""
    if cfg.process == "flow":
        return FlowSchedule.from_config(cfg)
    return NoiseSchedule.from_config(cfg)
