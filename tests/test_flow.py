"""Flow matching (flow.py): the closed forms, the denoiser seam, the training draws, the sampling grid,
the flow samplers against diffusers' FlowMatch schedulers, and every sampler on a flow denoiser."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_config

from diffusekit.config import DiffusionConfig
from diffusekit.denoiser import Denoiser, prediction_target, x0_from_prediction
from diffusekit.errors import UserError
from diffusekit.flow import T_MAX, FlowSchedule, shift_t, sigma_to_t, t_to_sigma
from diffusekit.losses import diffusion_loss
from diffusekit.models import build_net
from diffusekit.pipeline import Pipeline
from diffusekit.samplers import SAMPLERS
from diffusekit.schedule import NoiseSchedule, make_schedule

T = 1000
MU, VAR = 0.3, 0.25


def gaussian_velocity(x_t: torch.Tensor, timestep: torch.Tensor, wobble: float = 0.0, **_) -> torch.Tensor:
    """The exact velocity E[eps - x0 | x_t] of data N(MU, VAR) at x_t = (1 - t) x0 + t eps, t = timestep / T,
    plus an optional smooth nonlinear perturbation (so that a sampler's errors are not those of a linear model)."""
    t = (torch.as_tensor(timestep, dtype=torch.float64).reshape(-1) / T).view(-1, *[1] * (x_t.ndim - 1))
    x = x_t.double()
    x0 = MU + (1 - t) * VAR / ((1 - t) ** 2 * VAR + t**2) * (x - (1 - t) * MU)  # E[x0 | x_t], Gaussian conditioning
    return ((x - x0) / t + wobble * torch.sin(x + 3 * t)).to(x_t.dtype)


def wobbly(x_t, timestep, **cond):
    return gaussian_velocity(x_t, timestep, wobble=0.05)


# ----------------------------------------------------------------------------- closed forms


def test_x_t_runs_from_the_data_to_the_noise_and_its_velocity_is_the_target():
    schedule = FlowSchedule(T)
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 1, 4, 4, generator=g), torch.randn(3, 1, 4, 4, generator=g)
    assert torch.equal(schedule.q_sample(x0, torch.zeros(3), eps), x0)
    assert torch.equal(schedule.q_sample(x0, torch.ones(3), eps), eps)
    t, h = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64), 1e-6
    x0, eps = x0.double(), eps.double()
    derivative = (schedule.q_sample(x0, t + h, eps) - schedule.q_sample(x0, t - h, eps)) / (2 * h)
    target = prediction_target("v", x0, eps, *schedule.alpha_sigma(t), process="flow")
    torch.testing.assert_close(target, eps - x0, rtol=0, atol=0)
    torch.testing.assert_close(derivative, target, rtol=0, atol=1e-8)  # v = dx_t/dt
    x_t = schedule.q_sample(x0, t, eps)
    torch.testing.assert_close(x0_from_prediction("v", target, x_t, *schedule.alpha_sigma(t), process="flow"), x0, rtol=0, atol=1e-12)


def test_sigma_and_t_map_both_ways():
    t = torch.tensor([0.0, 0.1, 0.5, 0.75, 0.999, T_MAX], dtype=torch.float64)
    sigma = t_to_sigma(t)
    torch.testing.assert_close(sigma[:4], torch.tensor([0.0, 1 / 9, 1.0, 3.0], dtype=torch.float64))
    torch.testing.assert_close(sigma_to_t(sigma), t, rtol=0, atol=1e-15)
    torch.testing.assert_close(t_to_sigma(sigma_to_t(torch.tensor([0.01, 2.0, 4096.0]))), torch.tensor([0.01, 2.0, 4096.0], dtype=torch.float64))
    assert sigma_to_t(torch.tensor([math.inf])).item() == 1.0 and t_to_sigma(torch.tensor([1.0])).item() == math.inf
    assert t_to_sigma(torch.tensor(T_MAX)).item() == pytest.approx(2**16 - 1)


def test_the_flow_point_is_the_k_diffusion_point_scaled():
    """x_flow = (1 - t) x0 + t eps = (1 - t)(x0 + sigma eps): the coefficients are the denoiser's scale."""
    schedule = FlowSchedule(T)
    x0, eps = torch.randn(4, 1, 2, 2, dtype=torch.float64), torch.randn(4, 1, 2, 2, dtype=torch.float64)
    sigma = torch.tensor([0.05, 1.0, 7.0, 300.0], dtype=torch.float64)
    alpha, s = schedule.coefficients(sigma)
    x_flow = schedule.q_sample(x0, sigma_to_t(sigma), eps)
    torch.testing.assert_close(x_flow, alpha.view(-1, 1, 1, 1) * (x0 + sigma.view(-1, 1, 1, 1) * eps))
    torch.testing.assert_close(s, sigma / (1 + sigma)) and torch.testing.assert_close(alpha + s, torch.ones(4, dtype=torch.float64))


def test_the_shift_is_sd3s_and_multiplies_sigma():
    t = torch.linspace(0, 1, 11, dtype=torch.float64)
    torch.testing.assert_close(shift_t(t, 3.0), 3 * t / (1 + 2 * t))
    torch.testing.assert_close(shift_t(t, 1.0), t)
    assert shift_t(torch.tensor([0.0, 1.0]), 3.0).tolist() == [0.0, 1.0]
    assert (shift_t(t[1:-1], 3.0) > t[1:-1]).all()  # towards noise
    inner = t[1:-1]
    torch.testing.assert_close(t_to_sigma(shift_t(inner, 3.0)), 3 * t_to_sigma(inner))  # sigma' = s sigma: SNR / s^2


def test_a_flow_denoiser_recovers_x0_from_the_exact_velocity():
    """A 'network' that knows x0 and eps returns eps - x0 at the time it is called with; D must give back x0."""
    x0 = torch.randn(3, 1, 4, 4)
    eps = torch.randn(3, 1, 4, 4)
    sigma = torch.tensor([0.02, 1.5, 900.0], dtype=torch.float64)
    schedule = FlowSchedule(T)
    calls = []

    def exact(x_t, t, **_):
        calls.append(t)
        torch.testing.assert_close(x_t, schedule.q_sample(x0, t.double() / T, eps), rtol=1e-5, atol=1e-5)
        return eps - x0

    x = x0 + sigma.float().view(-1, 1, 1, 1) * eps
    torch.testing.assert_close(Denoiser(exact, schedule, "v")(x, sigma), x0, rtol=0, atol=1e-4)
    torch.testing.assert_close(calls[0].double(), T * sigma / (1 + sigma), rtol=1e-6, atol=0)  # conditioned on t * T


def test_the_loss_of_the_exact_velocity_is_zero_and_of_a_wrong_one_is_not():
    schedule = FlowSchedule(T, sampling="logit_normal")
    x0 = torch.randn(8, 1, 4, 4)
    noise = torch.randn(8, 1, 4, 4)
    sigma = schedule.draw_sigma(8, torch.Generator().manual_seed(0), "cpu")
    exact = lambda x_t, t_net: noise - x0  # noqa: E731
    assert diffusion_loss(exact, schedule, x0, prediction="v", sigma=sigma, noise=noise).item() < 1e-10  # zero up to float32 rounding
    assert diffusion_loss(lambda x_t, t_net: noise, schedule, x0, prediction="v", sigma=sigma, noise=noise).item() == pytest.approx(x0.pow(2).mean().item())


# ----------------------------------------------------------------------------- training draws


def draws(**kwargs) -> torch.Tensor:
    return FlowSchedule(T, **kwargs).draw_t(200_000, torch.Generator().manual_seed(0), "cpu")


def test_uniform_draws():
    t = draws()
    assert t.min() >= 0 and t.max() < 1 and t.mean().item() == pytest.approx(0.5, abs=0.005)
    assert torch.histc(t.float(), bins=4, min=0, max=1).div(len(t)).tolist() == pytest.approx([0.25] * 4, abs=0.005)


def test_logit_normal_draws_are_sd3s_and_the_shift_moves_their_mean_by_log_s():
    for mean, std, shift in ((0.0, 1.0, 1.0), (0.5, 0.6, 1.0), (0.0, 1.0, 3.0)):
        logit = draws(sampling="logit_normal", logit_mean=mean, logit_std=std, shift=shift).logit()
        assert logit.mean().item() == pytest.approx(mean + math.log(shift), abs=0.01)
        assert logit.std().item() == pytest.approx(std, rel=0.01)


def test_mode_draws_follow_sd3s_mode_density():
    """SD3 eq. 20: t = f(u) = 1 - u - s (cos^2(pi u / 2) - 1 + u); its CDF at f(u) is 1 - u, and it is symmetric about 1/2."""
    scale = 1.29
    t = draws(sampling="mode", mode_scale=scale)
    u = torch.tensor([0.1, 0.3, 0.6, 0.9], dtype=torch.float64)
    f = 1 - u - scale * (torch.cos(math.pi / 2 * u) ** 2 - 1 + u)
    assert [(t <= v).double().mean().item() for v in f] == pytest.approx((1 - u).tolist(), abs=0.005)
    assert t.mean().item() == pytest.approx(0.5, abs=0.005)
    assert (t - 0.5).abs().mean() < (draws() - 0.5).abs().mean()  # s > 0 puts more weight in the middle than uniform
    assert torch.allclose(draws(sampling="mode", mode_scale=0.0), 1 - draws())  # s = 0: uniform


def test_the_config_picks_the_process():
    assert isinstance(make_schedule(DiffusionConfig()), NoiseSchedule)
    flow = make_schedule(DiffusionConfig(process="flow", prediction="v", shift=2.0, timestep_sampling="mode", mode_scale=0.5))
    assert isinstance(flow, FlowSchedule) and (flow.shift, flow.sampling, flow.mode_scale, flow.num_timesteps) == (2.0, "mode", 0.5, 1000)


# ----------------------------------------------------------------------------- sampling grids and samplers


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("steps", [1, 4, 28])
def test_linspace_sigmas_are_diffusers_flow_match_grid(shift, steps):
    diffusers = pytest.importorskip("diffusers")
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=T, shift=shift)
    scheduler.set_timesteps(steps)
    ours = sigma_to_t(FlowSchedule(T, shift).sampling_sigmas(steps, "linspace"))
    assert ours[0].item() == T_MAX and scheduler.sigmas[0].item() == 1.0  # t = 1 is sigma = inf: we start 2^-16 below it
    torch.testing.assert_close(ours[1:].float(), scheduler.sigmas[1:], rtol=0, atol=1e-6)


def test_other_step_schedules():
    schedule = FlowSchedule(T, shift=3.0)
    trailing = sigma_to_t(schedule.sampling_sigmas(4, "trailing"))
    torch.testing.assert_close(trailing[1:], shift_t(torch.tensor([0.75, 0.5, 0.25, 0.0], dtype=torch.float64), 3.0))
    for spacing in ("karras", "logsnr"):
        sigmas = schedule.sampling_sigmas(10, spacing)
        assert sigmas[0].item() == pytest.approx(schedule.sigma_max) and sigmas[-2].item() == pytest.approx(schedule.sigma_min)
        assert (sigmas[1:] < sigmas[:-1]).all() and sigmas[-1] == 0
    logsnr = schedule.sampling_sigmas(10, "logsnr")[:-1].log()
    torch.testing.assert_close(logsnr.diff(), logsnr.diff()[:1].expand(9))
    with pytest.raises(UserError, match="'leading' does not apply to a flow model.*linspace"):
        schedule.sampling_sigmas(10, "leading")
    with pytest.raises(UserError, match="out of range"):
        schedule.sampling_sigmas(1001)


def run_diffusers(cls_name: str, shift: float, steps: int, noise: torch.Tensor) -> torch.Tensor:
    diffusers = pytest.importorskip("diffusers")
    scheduler = getattr(diffusers, cls_name)(num_train_timesteps=T, shift=shift)
    scheduler.set_timesteps(steps)
    x = noise.clone()
    for t in scheduler.timesteps:
        x = scheduler.step(wobbly(x, t.expand(len(x))), t, x).prev_sample
    return x


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("steps", [5, 10, 20])
@pytest.mark.parametrize("sampler, cls_name", [("flow_euler", "FlowMatchEulerDiscreteScheduler"), ("flow_heun", "FlowMatchHeunDiscreteScheduler")])
def test_flow_samplers_match_diffusers(sampler, cls_name, shift, steps):
    noise = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    expected = run_diffusers(cls_name, shift, steps, noise)
    schedule = FlowSchedule(T, shift)
    sigmas = schedule.sampling_sigmas(steps, "linspace")
    calls = []
    denoiser = Denoiser(lambda x, t: calls.append(t) or wobbly(x, t), schedule, "v")
    got = SAMPLERS[sampler](denoiser, noise * (1 + sigmas[0]).float(), sigmas)
    assert len(calls) == (steps if sampler == "flow_euler" else 2 * steps - 1)
    assert (expected - noise).abs().max() > 0.5
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)


def test_flow_euler_is_euler_in_sigma():
    """An Euler step of the probability-flow ODE is the same in t on x_t (SD3's x_t' = x_t + (t' - t) v, written out
    here) and in sigma on x (DDIM's invariance), so flow_euler is the euler sampler."""
    from diffusekit.flow import sigma_to_t

    schedule = FlowSchedule(T, 3.0)
    sigmas = schedule.sampling_sigmas(6, "linspace")
    denoiser = Denoiser(wobbly, schedule, "v")
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(2)) * (1 + sigmas[0]).float()
    ts, x_t = sigma_to_t(sigmas), x / (1 + sigmas[0]).float()
    for i in range(len(sigmas) - 1):
        x0 = denoiser(x_t * (1 + sigmas[i]).float(), sigmas[i])
        x_t = x_t + (ts[i + 1] - ts[i]).float() * (x_t - x0) / ts[i].float()  # v = (x_t - x0_hat) / t
    torch.testing.assert_close(SAMPLERS["flow_euler"](denoiser, x, sigmas), x_t * (1 + sigmas[-1]).float(), rtol=0, atol=1e-5)


@pytest.mark.parametrize("sampler", sorted(set(SAMPLERS) - {"consistency"}))  # it takes a consistency function, not a denoiser
def test_every_sampler_runs_a_flow_denoiser_and_reproduces_gaussian_data(sampler):
    """The exact velocity of N(MU, VAR) behind the flow denoiser, a fine grid: samples have mean MU and variance VAR."""
    schedule = FlowSchedule(T)
    sigmas = schedule.sampling_sigmas(200 if sampler.endswith("heun") else 400, "trailing")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2000, 16, generator=gen) * (1 + sigmas[0]).float()
    out = SAMPLERS[sampler](Denoiser(gaussian_velocity, schedule, "v"), x, sigmas, generator=gen)
    assert out.mean().item() == pytest.approx(MU, abs=0.015)
    assert out.std().item() == pytest.approx(VAR**0.5, rel=0.02)


def test_sampling_at_another_size_shifts_by_the_side_ratio():
    """SD3 eq. 23: alpha = sqrt(m / n) for m and n pixels; twice the side is twice the shift (DDPM models keep their grid)."""
    flow = tiny_config(diffusion__process="flow", diffusion__prediction="v", diffusion__beta_start=1e-4, diffusion__beta_end=0.02,
                       diffusion__shift=1.5, sample__spacing="linspace")
    pipe = Pipeline(flow, build_net(flow))
    torch.testing.assert_close(pipe.sigmas(6, size=16), FlowSchedule(100, 3.0).sampling_sigmas(6, "linspace"))
    torch.testing.assert_close(pipe.sigmas(6, size=8), pipe.sigmas(6))
    assert pipe.sample(2, steps=3, size=16).shape == (2, 1, 16, 16)
    ddpm = Pipeline(tiny_config(), build_net(tiny_config()))
    torch.testing.assert_close(ddpm.sigmas(6, size=16), ddpm.sigmas(6))
