"""Flow matching / rectified flow: the forward process as a straight line from data to noise.

Lipman et al. 2023 ("Flow Matching for Generative Modeling"), Liu et al. 2023 ("Flow Straight and
Fast"), Esser et al. 2024 ("Scaling Rectified Flow Transformers", SD3). With t in [0, 1]:

    x_t = (1 - t) x0 + t eps                                      (SD3 eq. 2, a_t = 1 - t, b_t = t)

and the network predicts the velocity v = dx_t/dt = eps - x0 (conditional flow matching, Lipman
eq. 23; SD3 eq. 3 and its "rectified flow" row of table 1). In k-diffusion's scaling x = x0 + sigma eps
the same point is x_t / (1 - t), with

    sigma = t / (1 - t),   t = sigma / (1 + sigma),   x_t = (1 - t)(x0 + sigma eps),

so a flow model is a denoiser D(x, sigma) -> x0_hat = x_t - t v (denoiser.py) and every sampler runs it.
FlowSchedule offers what NoiseSchedule (schedule.py) offers, for this process: the training draws of t,
the closed-form x_t, the sampling sigmas, and the maps between sigma and the network's time.

Training draws of t (SD3 sec. 3.1): "uniform", "logit_normal" (eq. 19: t = sigmoid(m + s n), n ~ N(0, 1);
SD3's default m = 0, s = 1) and "mode" (eq. 20: t = 1 - u - s (cos^2(pi u / 2) - 1 + u), u ~ U(0, 1)).
The time shift (SD3 sec. 5.3.2, eq. 23) t' = s t / (1 + (s - 1) t) moves every t towards noise; in
sigma it is simply sigma' = s sigma (the SNR divided by s^2). SD3 uses s = 3 at 1024 px; the shift
applies to the training draws and the sampling grid alike (as diffusers' SD3 training scripts do).
"""

from __future__ import annotations

import math

import torch

from diffusekit.errors import UserError
from diffusekit.sigmas import append_dims, karras_sigmas, logsnr_sigmas

TIMESTEP_SAMPLINGS = ("uniform", "logit_normal", "mode")
FLOW_SPACINGS = ("linspace", "trailing", "karras", "logsnr")

# t = 1 (pure noise) is sigma = infinity; sampling starts at this t instead. x0's weight 1 - t is then
# 2^-16: a float32 x at sigma_max = 65535 still resolves a step to the next level to ~1e-4, and the
# start differs from diffusers' t = 1 by 1.5e-5.
T_MAX = 1.0 - 2.0**-16


def sigma_to_t(sigma: torch.Tensor) -> torch.Tensor:
    """t = sigma / (1 + sigma), in float64 (sigma = inf gives 1)."""
    sigma = sigma.to(torch.float64)
    return torch.where(torch.isinf(sigma), torch.ones_like(sigma), sigma / (1 + sigma))


def t_to_sigma(t: torch.Tensor) -> torch.Tensor:
    """sigma = t / (1 - t), in float64 (t = 1 gives inf)."""
    t = t.to(torch.float64)
    return t / (1 - t)


def shift_t(t: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3 eq. 23: t' = s t / (1 + (s - 1) t); in sigma, sigma' = s sigma."""
    return shift * t / (1 + (shift - 1) * t)


class FlowSchedule:
    """The flow-matching process, with NoiseSchedule's interface (schedule.make_schedule picks one).

    timesteps: the network is conditioned on t * timesteps (diffusers' num_train_timesteps, 1000 in SD3),
    and a sampler takes at most that many steps.
    """

    process = "flow"

    def __init__(self, timesteps: int = 1000, shift: float = 1.0, sampling: str = "uniform", logit_mean: float = 0.0,
                 logit_std: float = 1.0, mode_scale: float = 1.29):
        if sampling not in TIMESTEP_SAMPLINGS:
            raise UserError(f"unknown timestep sampling '{sampling}'; use one of: {', '.join(TIMESTEP_SAMPLINGS)}")
        self.timesteps, self.shift, self.sampling = timesteps, shift, sampling
        self.logit_mean, self.logit_std, self.mode_scale = logit_mean, logit_std, mode_scale

    @classmethod
    def from_config(cls, cfg) -> "FlowSchedule":
        return cls(cfg.timesteps, cfg.shift, cfg.timestep_sampling, cfg.logit_mean, cfg.logit_std, cfg.mode_scale)

    @property
    def num_timesteps(self) -> int:
        return self.timesteps

    def resized(self, scale: float) -> "FlowSchedule":
        """The schedule for images `scale` times the training size (per side): SD3 eq. 23's resolution-dependent
        shift, alpha = sqrt(m / n) for m and n pixels (or latent positions), i.e. the side ratio, times this shift."""
        return FlowSchedule(self.timesteps, self.shift * scale, self.sampling, self.logit_mean, self.logit_std, self.mode_scale)

    def shifted(self, t: torch.Tensor) -> torch.Tensor:
        return shift_t(t, self.shift)

    @property
    def t_min(self) -> float:
        """The least noisy t sampled: the shifted 1 / timesteps (diffusers' sigma_min of the flow schedulers)."""
        return float(self.shifted(torch.tensor(1.0 / self.timesteps, dtype=torch.float64)))

    @property
    def sigma_min(self) -> float:
        return float(t_to_sigma(torch.tensor(self.t_min)))

    @property
    def sigma_max(self) -> float:
        return float(t_to_sigma(torch.tensor(T_MAX)))

    # ------------------------------------------------------------------ the process

    def coefficients(self, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(1 - t, t) for a k-diffusion sigma, float64: x_t = (1 - t) x0 + t eps is x / (1 + sigma) = x * (1 - t)."""
        t = sigma_to_t(sigma)
        return 1 - t, t

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        return sigma_to_t(sigma)

    def t_to_sigma(self, t: torch.Tensor) -> torch.Tensor:
        return t_to_sigma(t)

    def net_time(self, t: torch.Tensor) -> torch.Tensor:
        """What the network is conditioned on at flow time t: t * timesteps (SD3's timestep = 1000 t), float32."""
        return (t.to(torch.float64) * self.timesteps).to(torch.float32)

    def alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The coefficients (1 - t, t) of x0 and eps at the drawn t, float64."""
        t = t.to(torch.float64)
        return 1 - t, t

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        a, b = self.alpha_sigma(t)
        return (a / b) ** 2

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = (1 - t) x0 + t eps (SD3 eq. 2)."""
        t = append_dims(t, x0)
        return (1 - t) * x0 + t * noise

    def draw_t(self, n: int, generator: torch.Generator | None, device) -> torch.Tensor:
        """n training times in [0, 1] (float64) from the configured density, then shifted."""
        if self.sampling == "logit_normal":  # SD3 eq. 19
            t = torch.sigmoid(self.logit_mean + self.logit_std * torch.randn(n, generator=generator, device=device, dtype=torch.float64))
        else:
            u = torch.rand(n, generator=generator, device=device, dtype=torch.float64)
            t = u if self.sampling == "uniform" else 1 - u - self.mode_scale * (torch.cos(math.pi / 2 * u) ** 2 - 1 + u)  # SD3 eq. 20
        return self.shifted(t)

    def draw_sigma(self, n: int, generator: torch.Generator | None, device) -> torch.Tensor:
        """n training noise levels: sigma = t / (1 - t) of draw_t (float64)."""
        return t_to_sigma(self.draw_t(n, generator, device))

    # ------------------------------------------------------------------ inference steps

    def sampling_sigmas(self, steps: int, spacing: str = "linspace", rho: float = 7.0, steps_offset: int = 0) -> torch.Tensor:
        """steps + 1 decreasing sigmas ending in 0 (steps_offset is a DDPM option: unused here).

        linspace: diffusers' FlowMatchEulerDiscreteScheduler (SD3, FLUX): t evenly from 1 to t_min, then
                  shifted (so its last t is shifted twice, as in diffusers)
        trailing: t = 1, 1 - 1/n, ..., 1/n, then shifted (DDPM's trailing steps on the flow's t grid)
        karras:   Karras et al. 2022 eq. 5 between sigma_min and sigma_max
        logsnr:   uniform in log sigma (= in log-SNR) between them
        t = 1 becomes T_MAX (sigma = 65535).
        """
        if not 1 <= steps <= self.timesteps:
            raise UserError(f"{steps} sampling steps are out of range: this model has {self.timesteps} timesteps, so use between 1 and {self.timesteps}")
        if spacing == "linspace":
            t = self.shifted(torch.linspace(1.0, self.t_min, steps, dtype=torch.float64))
        elif spacing == "trailing":
            t = self.shifted(1 - torch.arange(steps, dtype=torch.float64) / steps)
        elif spacing == "karras":
            t = sigma_to_t(karras_sigmas(self.sigma_min, self.sigma_max, steps, rho))
        elif spacing == "logsnr":
            t = sigma_to_t(logsnr_sigmas(self.sigma_min, self.sigma_max, steps))
        else:
            raise UserError(f"step schedule '{spacing}' does not apply to a flow model (leading never starts at pure noise); "
                            f"use one of: {', '.join(FLOW_SPACINGS)}")
        sigmas = t_to_sigma(t.clamp(max=T_MAX))
        return torch.cat([sigmas, sigmas.new_zeros(1)])
