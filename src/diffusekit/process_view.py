"""The diffusion process of a Pipeline as numbers and pictures for whoever watches it (the studio's "inside" panel).

    curves = schedule_curves(pipe, steps=20, spacing="karras")
    curves["t"], curves["alpha_bar"], curves["log_snr"]   # the process over its time: DDPM's timesteps 0..T-1, flow's t in (0, 1)
    curves["sigmas"]                                        # pipe.sigmas(steps, spacing, size): steps + 1 levels ending in 0
    curves["marks"]                                         # the first `steps` of them as t, alpha_bar, log_snr: where the network is called
    noisy_preview(pipe, info)                               # a sampler step's x_t on the process's own scale (decoded for a latent model)

alpha_bar is the squared weight of x0 in x_t = a x0 + b eps (DDPM's abar_t; flow matching's (1 - t)^2) and
log-SNR = log(a^2 / b^2): for DDPM log(abar / (1 - abar)), and for both processes -2 log sigma in the samplers'
x = x0 + sigma eps. DDPM's abar is floored at schedule.MIN_ALPHA_CUMPROD as the samplers floor it, so the curves
stay finite with a zero-terminal-SNR schedule.
"""

from __future__ import annotations

import torch

FLOW_POINTS = 199  # a flow model's curve: t = 0.005, 0.01, ..., 0.995 (its ends have log-SNR +-infinity)


def signal_and_log_snr(schedule, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha_bar, log-SNR) at k-diffusion sigmas > 0: a^2 and log(a^2 / b^2) of the process's x_t = a x0 + b eps."""
    a, b = schedule.coefficients(sigma.to(torch.float64))
    return a**2, 2 * (a / b).log()


def schedule_curves(pipe, steps: int | None = None, spacing: str | None = None, size: int | None = None) -> dict:
    """The model's noise schedule as lists of floats (JSON-ready): alpha_bar and log-SNR over the process's time t,
    and the sigmas a sampler walks for these settings (Pipeline.sigmas) with their t, alpha_bar and log-SNR."""
    schedule, settings = pipe.schedule, pipe.settings(steps=steps, spacing=spacing)
    flow = schedule.process == "flow"
    t = torch.linspace(0, 1, FLOW_POINTS + 2, dtype=torch.float64)[1:-1] if flow else torch.arange(schedule.num_timesteps)
    alpha_bar, log_snr = signal_and_log_snr(schedule, schedule.t_to_sigma(t))
    sigmas = pipe.sigmas(settings.steps, settings.spacing, size)
    called = sigmas[:-1]  # the last sigma, 0, is where the sampler ends: no network call there
    mark_alpha_bar, mark_log_snr = signal_and_log_snr(schedule, called)
    return {"process": schedule.process, "t": t.double().tolist(), "t_max": 1.0 if flow else schedule.num_timesteps - 1,
            "alpha_bar": alpha_bar.tolist(), "log_snr": log_snr.tolist(), "steps": settings.steps, "schedule": settings.spacing,
            "sigmas": sigmas.double().tolist(),
            "marks": {"t": schedule.sigma_to_t(called).double().tolist(), "alpha_bar": mark_alpha_bar.tolist(), "log_snr": mark_log_snr.tolist()}}


def noisy_preview(pipe, info: dict, count: int | None = None) -> torch.Tensor:
    """A sampler callback's current x_t [count, C, H, W] in [-1, 1] on the CPU, on the process's own scale
    (x * a at sigma_next: what the forward process would have made); a latent model's x_t decoded by its autoencoder."""
    if pipe.vae is None:
        return pipe.preview(info, count, noisy=True)
    a, _ = pipe.schedule.coefficients(torch.as_tensor(info["sigma_next"], dtype=torch.float64))
    return pipe.decode(info["x"][:count] * a.float().to(info["x"].device))
