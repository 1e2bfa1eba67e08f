"""Noise schedules, the closed-form forward process and inference step spacings."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from diffusers.schedulers.scheduling_ddim import rescale_zero_terminal_snr as diffusers_rescale

from diffusekit.config import DiffusionConfig
from diffusekit.errors import UserError
from diffusekit.schedule import (
    BETA_SCHEDULES,
    MIN_ALPHA_CUMPROD,
    NoiseSchedule,
    cosine_betas,
    linear_betas,
    log_snr_to_sigma,
    scaled_linear_betas,
    sigma_to_alpha_sigma,
    sigma_to_log_snr,
)

SCHEDULES = sorted(BETA_SCHEDULES)
DIFFUSERS_NAMES = {"linear": "linear", "scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2", "sigmoid": "sigmoid"}


def schedule(name: str = "linear", T: int = 1000, zero_terminal_snr: bool = False) -> NoiseSchedule:
    defaults = {"scaled_linear": (0.00085, 0.012)}.get(name, (1e-4, 0.02))
    cfg = DiffusionConfig(schedule=name, timesteps=T, beta_start=defaults[0], beta_end=defaults[1], zero_terminal_snr=zero_terminal_snr)
    return NoiseSchedule.from_config(cfg)


# ----------------------------------------------------------------------------- betas and abar


@pytest.mark.parametrize("zero_terminal_snr", [False, True])
@pytest.mark.parametrize("name", SCHEDULES)
@pytest.mark.parametrize("T", [100, 1000])
def test_abar_strictly_decreasing(name, T, zero_terminal_snr):
    abar = schedule(name, T, zero_terminal_snr).alphas_cumprod
    assert abar.dtype == torch.float64 and abar.shape == (T,)
    assert torch.all(abar[1:] < abar[:-1])
    assert abar[0] < 1 and abar[-1] >= 0


@pytest.mark.parametrize("name", SCHEDULES)
def test_abar_runs_from_clean_to_noise_over_1000_steps(name):
    abar = schedule(name).alphas_cumprod
    assert 0.999 < abar[0] < 1 and abar[-1] < 0.01


@pytest.mark.parametrize("name", SCHEDULES)
def test_alphas_cumprod_match_diffusers(name):
    ours = schedule(name).alphas_cumprod
    defaults = {"scaled_linear": (0.00085, 0.012)}.get(name, (1e-4, 0.02))
    ref = DDPMScheduler(num_train_timesteps=1000, beta_schedule=DIFFUSERS_NAMES[name], beta_start=defaults[0], beta_end=defaults[1]).alphas_cumprod
    torch.testing.assert_close(ours.float(), ref, rtol=1e-5, atol=1e-7)


def test_linear_betas_are_ho_et_al():
    betas = linear_betas(1000)
    assert betas[0].item() == pytest.approx(1e-4, abs=1e-15) and betas[-1].item() == pytest.approx(0.02, abs=1e-15)
    steps = betas.diff()
    torch.testing.assert_close(steps, torch.full_like(steps, (0.02 - 1e-4) / 999))


def test_scaled_linear_is_linear_in_sqrt_beta():
    betas = scaled_linear_betas(1000)
    assert betas[0].item() == pytest.approx(0.00085) and betas[-1].item() == pytest.approx(0.012)
    steps = betas.sqrt().diff()
    torch.testing.assert_close(steps, torch.full_like(steps, (0.012**0.5 - 0.00085**0.5) / 999))
    assert not torch.allclose(betas.diff(), betas.diff()[:1].expand(999))  # and so not linear in beta


def test_cosine_abar_is_nichol_dhariwal_closed_form():
    T, s = 1000, 0.008
    abar = NoiseSchedule(cosine_betas(T)).alphas_cumprod.numpy()

    def f(t):
        return np.cos((t + s) / (1 + s) * np.pi / 2) ** 2

    closed = f(np.arange(1, T + 1) / T) / f(0)  # timestep i (0-based) ends at t = (i + 1) / T
    unclipped = cosine_betas(T).numpy() < 0.999
    assert unclipped.sum() >= T - 1
    np.testing.assert_allclose(abar[unclipped], closed[unclipped], rtol=1e-10, atol=1e-15)
    assert abar[0] == pytest.approx(1, abs=1e-4)
    assert abar[-1] < 1e-8


# ----------------------------------------------------------------------------- SNR and sigma


def test_snr_and_log_snr_definitions():
    sched = schedule()
    t = torch.arange(1000)
    abar = sched.alphas_cumprod
    torch.testing.assert_close(sched.snr(t), abar / (1 - abar), rtol=1e-12, atol=0)
    torch.testing.assert_close(sched.log_snr(t), -2 * sched.sigmas.log(), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(sigma_to_log_snr(sched.sigmas), sched.log_snr(t), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(log_snr_to_sigma(sched.log_snr(t)), sched.sigmas, rtol=1e-10, atol=0)


def test_sigma_is_the_variance_exploding_view_of_abar():
    sched = schedule()
    abar = sched.alphas_cumprod
    torch.testing.assert_close(sched.sigmas, ((1 - abar) / abar).sqrt(), rtol=1e-12, atol=0)
    alpha, s = sigma_to_alpha_sigma(sched.sigmas)
    torch.testing.assert_close(alpha, abar.sqrt(), rtol=1e-12, atol=0)
    torch.testing.assert_close(s, (1 - abar).sqrt(), rtol=1e-12, atol=0)
    assert torch.all(sched.sigmas.diff() > 0)


@pytest.mark.parametrize("name", SCHEDULES)
def test_zero_terminal_snr(name):
    plain, rescaled = schedule(name), schedule(name, zero_terminal_snr=True)
    assert rescaled.alphas_cumprod[-1].item() == 0.0
    assert rescaled.snr(torch.tensor([999])).item() == 0.0
    assert rescaled.alphas_cumprod[0].item() == pytest.approx(plain.alphas_cumprod[0].item(), rel=1e-12)
    ref = diffusers_rescale(plain.betas.clone())
    torch.testing.assert_close(rescaled.betas, ref.to(torch.float64), rtol=1e-6, atol=1e-9)
    # sigma cannot be infinite: the last one is floored as diffusers does
    assert rescaled.sigma_max == pytest.approx(math.sqrt((1 - MIN_ALPHA_CUMPROD) / MIN_ALPHA_CUMPROD))


# ----------------------------------------------------------------------------- forward process


def test_q_sample_statistics():
    sched = schedule()
    x0 = torch.tensor([-0.8, 0.0, 0.5, 1.0])
    n = 50_000
    for step in (0, 250, 999):
        t = torch.full((n,), step)
        noise = torch.randn((n, 4), generator=torch.Generator().manual_seed(step))
        x_t = sched.q_sample(x0.expand(n, 4), t, noise).double()
        abar = sched.alphas_cumprod[step].item()
        mean_tol = 5 * math.sqrt((1 - abar) / n)
        torch.testing.assert_close(x_t.mean(0), math.sqrt(abar) * x0.double(), rtol=0, atol=mean_tol)
        torch.testing.assert_close(x_t.var(0), torch.full((4,), 1 - abar, dtype=torch.float64), rtol=0.03, atol=1e-9)


def test_q_sample_uses_each_samples_own_timestep():
    sched = schedule()
    x0 = torch.ones(3, 1, 2, 2)
    out = sched.q_sample(x0, torch.tensor([0, 500, 999]), torch.zeros_like(x0))
    expected = sched.alphas_cumprod[[0, 500, 999]].sqrt().float()
    torch.testing.assert_close(out.flatten(1), expected[:, None].expand(3, 4))


# ----------------------------------------------------------------------------- sigma <-> t


def test_sigma_to_t_round_trip_on_the_grid():
    sched = schedule()
    t = torch.arange(1000, dtype=torch.float64)
    torch.testing.assert_close(sched.sigma_to_t(sched.sigmas), t, rtol=0, atol=1e-9)
    torch.testing.assert_close(sched.t_to_sigma(t), sched.sigmas, rtol=1e-12, atol=0)


def test_sigma_to_t_interpolates_log_sigma_between_steps():
    sched = schedule()
    k = torch.tensor([0, 10, 500, 998], dtype=torch.float64)
    geometric_mean = (sched.sigmas[k.long()] * sched.sigmas[k.long() + 1]).sqrt()
    torch.testing.assert_close(sched.sigma_to_t(geometric_mean), k + 0.5, rtol=0, atol=1e-9)
    torch.testing.assert_close(sched.t_to_sigma(k + 0.5), geometric_mean, rtol=1e-12, atol=0)
    t = torch.rand(100, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 999
    torch.testing.assert_close(sched.sigma_to_t(sched.t_to_sigma(t)), t, rtol=0, atol=1e-9)


def test_sigma_to_t_clamps_outside_the_schedule():
    sched = schedule()
    t = sched.sigma_to_t(torch.tensor([0.0, sched.sigma_min / 2, sched.sigma_max * 2]))
    assert t.tolist() == [0.0, 0.0, 999.0]


# ----------------------------------------------------------------------------- inference timesteps


def reference_timesteps(T: int, steps: int, spacing: str, offset: int = 0) -> np.ndarray:
    """diffusers' DDIMScheduler.set_timesteps, in numpy."""
    if spacing == "leading":
        return (np.arange(0, steps) * (T // steps)).round()[::-1].astype(np.int64) + offset
    if spacing == "trailing":
        return np.round(np.arange(T, 0, -T / steps)).astype(np.int64) - 1
    return np.linspace(0, T - 1, steps).round()[::-1].astype(np.int64)


def diffusers_timesteps(T: int, steps: int, spacing: str, offset: int = 0) -> list[int]:
    scheduler = DDIMScheduler(num_train_timesteps=T, timestep_spacing=spacing, steps_offset=offset)
    scheduler.set_timesteps(steps)
    return scheduler.timesteps.tolist()


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("T, steps", [(1000, 1), (1000, 10), (1000, 20), (1000, 50), (1000, 250), (1000, 1000), (100, 7), (100, 100)])
def test_timesteps_match_diffusers(T, steps, spacing):
    ours = schedule(T=T).timesteps(steps, spacing).tolist()
    assert ours == reference_timesteps(T, steps, spacing).tolist()
    assert ours == diffusers_timesteps(T, steps, spacing)


def test_leading_timesteps_steps_offset():
    ours = schedule().timesteps(50, "leading", steps_offset=1).tolist()
    assert ours == diffusers_timesteps(1000, 50, "leading", offset=1)
    assert ours[0] == 981 and ours[-1] == 1


def test_trailing_starts_at_the_noisiest_step_and_leading_never_does():
    sched = schedule()
    assert sched.timesteps(10, "trailing")[0] == 999
    assert sched.timesteps(10, "leading")[0] == 900


@pytest.mark.parametrize(
    "spacing",
    ["leading", "linspace", "trailing"],
)
def test_timesteps_count_and_order_for_every_step_count(spacing):
    sched = schedule(T=100)
    for steps in range(1, 101):
        ts = sched.timesteps(steps, spacing)
        assert len(ts) == steps, f"{steps} steps gave {len(ts)} timesteps"
        assert torch.all(ts.diff() < 0) and 0 <= ts.min() and ts.max() <= 99


@pytest.mark.parametrize("spacing", ["trailing", "linspace"])
def test_timesteps_match_diffusers_at_rounding_ties(spacing):
    sched = schedule()
    mismatched = []
    for steps in range(1, 1001):
        ref = reference_timesteps(1000, steps, spacing)
        if len(ref) == steps and sched.timesteps(steps, spacing).tolist() != ref.tolist():
            mismatched.append(steps)
    assert mismatched == []


def test_timesteps_rejects_bad_requests():
    sched = schedule(T=100)
    for steps in (0, 101):
        with pytest.raises(UserError, match="between 1 and 100"):
            sched.timesteps(steps)
    with pytest.raises(UserError, match="step schedule 'sideways'"):
        sched.timesteps(10, "sideways")


# ----------------------------------------------------------------------------- sampling sigmas


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace", "karras", "logsnr"])
def test_sampling_sigmas_decrease_to_zero(spacing):
    sigmas = schedule().sampling_sigmas(10, spacing)
    assert sigmas.shape == (11,) and sigmas[-1].item() == 0.0
    assert torch.all(sigmas.diff() < 0)


def test_trailing_sampling_sigmas_are_the_schedule_sigmas_at_the_timesteps():
    sched = schedule()
    sigmas = sched.sampling_sigmas(10, "trailing")
    torch.testing.assert_close(sigmas[:-1], sched.sigmas[sched.timesteps(10, "trailing")], rtol=0, atol=0)
    assert sigmas[0].item() == sched.sigma_max


def test_karras_sigmas():
    sched, rho = schedule(), 7.0
    sigmas = sched.sampling_sigmas(12, "karras", rho=rho)[:-1]
    assert sigmas[0].item() == pytest.approx(sched.sigma_max, rel=1e-12)
    assert sigmas[-1].item() == pytest.approx(sched.sigma_min, rel=1e-12)
    ramp = sigmas ** (1 / rho)
    torch.testing.assert_close(ramp.diff(), torch.full((11,), (ramp[-1] - ramp[0]).item() / 11, dtype=torch.float64))


def test_logsnr_sigmas_are_uniform_in_log_snr():
    sched = schedule()
    sigmas = sched.sampling_sigmas(12, "logsnr")[:-1]
    assert sigmas[0].item() == pytest.approx(sched.sigma_max, rel=1e-12)
    assert sigmas[-1].item() == pytest.approx(sched.sigma_min, rel=1e-12)
    log_snr = sigma_to_log_snr(sigmas)
    torch.testing.assert_close(log_snr.diff(), torch.full((11,), (log_snr[-1] - log_snr[0]).item() / 11, dtype=torch.float64))
