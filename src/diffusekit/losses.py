"""The training loss, in the samplers' language (EDM's form, Karras et al. 2022, eq. 2 and their EDMLoss):

    sigma, eps ~ the schedule's training draw;   x = x0 + sigma * eps
    loss = lambda(sigma) || D(x, sigma, cond) - x0 ||^2

with D the same denoiser sampling calls (denoiser.py: it maps sigma to the network's own time input and
scale, and its output to x0_hat). lambda(sigma) turns the x0-space error into the error of what the network
predicts (an eps error is the x0 error / sigma, a v error the x0 error / s, s the process's noise coefficient)
times the chosen weighting, so the loss equals the prediction-space MSE: DDPM's simple loss (Ho et al. 2020,
eq. 14) || eps - eps_theta(x_t, t) ||^2 for eps prediction with uniform weights, conditional flow matching
(SD3 eq. 3) for a flow model's v.
"""

from __future__ import annotations

import torch

from diffusekit.denoiser import Denoiser
from diffusekit.distributed import draw_for_global_batch
from diffusekit.errors import UserError
from diffusekit.flow import FlowSchedule
from diffusekit.schedule import NoiseSchedule
from diffusekit.sigmas import append_dims

WEIGHTINGS = ("uniform", "min_snr")


def loss_weights(weighting: str, prediction: str, snr: torch.Tensor, gamma: float = 5.0) -> torch.Tensor:
    """Per-sample weights on the MSE of the raw network output.

    min-SNR-gamma (Hang et al. 2023, eq. 8) caps the x0-space weight at gamma:
    w_x0 = min(SNR, gamma). An eps-MSE already carries a factor SNR relative to an
    x0-MSE, and a v-MSE a factor SNR + 1, so the weights divide by those.
    """
    if weighting == "uniform":
        return torch.ones_like(snr)
    if weighting == "min_snr":
        clipped = snr.clamp(max=gamma)
        if prediction == "eps":
            return clipped / snr.clamp(min=1e-12)
        if prediction == "x0":
            return clipped
        if prediction == "v":
            return clipped / (snr + 1)
    raise UserError(f"unknown loss weighting '{weighting}'; use one of {WEIGHTINGS}")


def x0_loss_weights(weighting: str, prediction: str, sigma: torch.Tensor, schedule, gamma: float = 5.0) -> torch.Tensor:
    """lambda(sigma): the weight on || x0_hat - x0 ||^2 that makes it the weighted MSE of the prediction itself.
    x0_hat - x0 is -sigma (eps_hat - eps) for eps, -s (v_hat - v) for v (DDPM: s = sqrt(1 - abar); flow: s = t)."""
    sigma = sigma.to(torch.float64)
    _, s = schedule.coefficients(sigma)
    to_prediction = {"eps": 1 / sigma**2, "x0": torch.ones_like(sigma), "v": 1 / s**2}.get(prediction)
    if to_prediction is None:
        raise UserError(f"unknown prediction type '{prediction}'")
    return loss_weights(weighting, prediction, 1 / sigma**2, gamma) * to_prediction


def draw_sigma_and_noise(schedule: NoiseSchedule | FlowSchedule, x0: torch.Tensor, generator: torch.Generator | None = None,
                         rank: int = 0, world: int = 1):
    """sigma per sample (the schedule's training draw: DDPM's uniform timesteps, a flow's density on t) and eps ~ N(0, I),
    drawn on the generator's device, returned on x0's.

    With `world` processes, x0 is rank `rank`'s share of a global batch (its rows rank, rank + world, ...):
    sigma and eps are drawn for the whole global batch and this rank's rows returned, so that they do not
    depend on how many processes share the batch.
    """
    device = generator.device if generator is not None else x0.device
    sigma = draw_for_global_batch(lambda n: schedule.draw_sigma(n, generator, device), len(x0), rank, world)
    eps = draw_for_global_batch(lambda n: torch.randn((n, *x0.shape[1:]), generator=generator, device=device, dtype=x0.dtype), len(x0), rank, world)
    return sigma.to(x0.device), eps.to(x0.device)


def diffusion_loss(
    net,
    schedule: NoiseSchedule | FlowSchedule,
    x0: torch.Tensor,
    *,
    prediction: str = "eps",
    weighting: str = "uniform",
    snr_gamma: float = 5.0,
    cond: dict | None = None,
    generator: torch.Generator | None = None,
    sigma: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    sample_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """One Monte-Carlo estimate of the loss (the module's formula): sigma and noise are drawn here unless given
    (gradient accumulation draws them for the whole batch first, so that splitting a batch does not change what
    it trains on). sample_weights [B] multiply each image's term (e.g. DreamBooth's prior weight on class images)."""
    if sigma is None or noise is None:
        sigma, noise = draw_sigma_and_noise(schedule, x0, generator)
    x0_hat = Denoiser(net, schedule, prediction, warn_non_finite=False)(x0 + append_dims(sigma, x0) * noise, sigma, cond)
    per_sample = (x0_hat.float() - x0.float()).pow(2).flatten(1).mean(1)
    weights = x0_loss_weights(weighting, prediction, sigma, schedule, snr_gamma).to(per_sample.dtype)
    if sample_weights is not None:
        weights = weights * sample_weights.to(weights)
    return (weights * per_sample).mean()
