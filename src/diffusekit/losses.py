"""The training loss: a (weighted) MSE between the network output and its target.

DDPM's simple loss (Ho et al. 2020, eq. 14) is the uniform case with eps
prediction: || eps - eps_theta(x_t, t) ||^2 with t uniform over 0..T-1.
"""

from __future__ import annotations

import torch

from diffusekit.denoiser import prediction_target
from diffusekit.distributed import draw_for_global_batch
from diffusekit.errors import UserError
from diffusekit.flow import FlowSchedule
from diffusekit.schedule import NoiseSchedule

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


def draw_t_and_noise(schedule: NoiseSchedule | FlowSchedule, x0: torch.Tensor, generator: torch.Generator | None = None, rank: int = 0, world: int = 1):
    """t per sample (DDPM: U{0..T-1}; flow: the schedule's density on [0, 1]) and eps ~ N(0, I),
    drawn on the generator's device, returned on x0's.

    With `world` processes, x0 is rank `rank`'s share of a global batch (its rows rank, rank + world, ...):
    t and eps are drawn for the whole global batch and this rank's rows returned, so that they do not
    depend on how many processes share the batch.
    """
    device = generator.device if generator is not None else x0.device
    t = draw_for_global_batch(lambda n: schedule.draw_t(n, generator, device), len(x0), rank, world)
    eps = draw_for_global_batch(lambda n: torch.randn((n, *x0.shape[1:]), generator=generator, device=device, dtype=x0.dtype), len(x0), rank, world)
    return t.to(x0.device), eps.to(x0.device)


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
    t: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    sample_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """One Monte-Carlo estimate of the loss: t ~ p(t), eps ~ N(0, I), MSE on the target (for a flow
    model with v prediction, conditional flow matching: || (eps - x0) - v_theta(x_t, t) ||^2, SD3 eq. 3).

    t and noise are drawn here unless given (gradient accumulation draws them for the
    whole batch first, so that splitting a batch does not change what it trains on).
    sample_weights [B] multiply each image's term (e.g. DreamBooth's prior weight on class images).
    """
    if t is None or noise is None:
        t, noise = draw_t_and_noise(schedule, x0, generator)
    x_t = schedule.q_sample(x0, t, noise)
    alpha, s = schedule.alpha_sigma(t)
    target = prediction_target(prediction, x0, noise, alpha, s, schedule.process)
    output = net(x_t, schedule.net_time(t), **(cond or {}))
    per_sample = (output.float() - target.float()).pow(2).flatten(1).mean(1)
    weights = loss_weights(weighting, prediction, schedule.snr(t), snr_gamma).to(per_sample.dtype)
    if sample_weights is not None:
        weights = weights * sample_weights.to(weights)
    return (weights * per_sample).mean()
