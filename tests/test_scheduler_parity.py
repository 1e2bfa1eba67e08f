"""Every diffusekit sampler against the diffusers scheduler that implements the same method.

Same eps-model function, same betas, same initial noise and the same per-step noise
(one torch.Generator drawn in the same order); the final samples must agree within 1e-4.
diffusers' DDPM/DDIM/DPM-Solver work on the DDPM scale x_t, its Euler/Heun on
x = x_t / sqrt(abar) like diffusekit, so the initial noise is rescaled accordingly.
"""

from __future__ import annotations

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from diffusekit.denoiser import Denoiser  # noqa: E402
from diffusekit.samplers import SAMPLERS  # noqa: E402
from diffusekit.schedule import NoiseSchedule, linear_betas  # noqa: E402

T = 1000
SHAPE = (2, 3, 8, 8)
ABAR = torch.cumprod(1 - linear_betas(T), 0).float()
MU, VAR = 0.3, 0.25


def eps_model(x_t, t, **_):
    """The exact eps of Gaussian data N(MU, VAR) plus a smooth nonlinear perturbation."""
    t = torch.as_tensor(t, dtype=torch.float32).reshape(-1)
    abar = ABAR[t.round().long().clamp(0, T - 1)].view(-1, 1, 1, 1)
    alpha, s = abar.sqrt(), (1 - abar).sqrt()
    return s * (x_t - alpha * MU) / (alpha**2 * VAR + s**2) + 0.05 * torch.sin(x_t + t.view(-1, 1, 1, 1) / 300)


def run_diffusers(scheduler, steps, x: torch.Tensor, seed: int, **step_kwargs) -> torch.Tensor:
    """steps: a number of steps, or an explicit list of timesteps."""
    scheduler.set_timesteps(**({"timesteps": steps} if isinstance(steps, list) else {"num_inference_steps": steps}))
    generator = torch.Generator().manual_seed(seed)
    takes_generator = "generator" in scheduler.step.__code__.co_varnames
    for t in scheduler.timesteps:
        out = eps_model(scheduler.scale_model_input(x, t), t)
        extra = {"generator": generator} if takes_generator else {}
        x = scheduler.step(out, t, x, **extra, **step_kwargs).prev_sample
    return x


def run_diffusekit(sampler: str, sigmas: torch.Tensor, x: torch.Tensor, seed: int, **options):
    generator = torch.Generator().manual_seed(seed)
    denoiser = Denoiser(eps_model, NoiseSchedule(linear_betas(T)), "eps")
    return SAMPLERS[sampler](denoiser, x, sigmas, generator=generator, **options), generator


def sigmas_of(timesteps) -> torch.Tensor:
    schedule = NoiseSchedule(linear_betas(T))
    return torch.cat([schedule.sigmas[torch.as_tensor(timesteps).long()], torch.zeros(1, dtype=torch.float64)])


def make(cls, **config):
    return cls(num_train_timesteps=T, beta_schedule="linear", beta_start=1e-4, beta_end=0.02, **config)


NOISE = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))

# (diffusekit sampler, its options, diffusers class, config, step kwargs, works on the DDPM scale x_t)
CASES = {
    "ddim": ("ddim", {}, "DDIMScheduler", {"set_alpha_to_one": True, "clip_sample": False}, {}, True),
    "ddim_eta1": ("ddim", {"eta": 1.0}, "DDIMScheduler", {"set_alpha_to_one": True, "clip_sample": False}, {"eta": 1.0}, True),
    "ddpm": ("ddpm", {}, "DDPMScheduler", {"clip_sample": False}, {}, True),
    "euler": ("euler", {}, "EulerDiscreteScheduler", {}, {}, False),
    "euler_ancestral": ("euler_ancestral", {}, "EulerAncestralDiscreteScheduler", {}, {}, False),
    "heun": ("heun", {}, "HeunDiscreteScheduler", {}, {}, False),
    "dpmpp_2m": ("dpmpp_2m", {}, "DPMSolverMultistepScheduler", {}, {}, True),
    "dpmpp_2m_sde": ("dpmpp_2m_sde", {}, "DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}, {}, True),
    "dpmpp_3m": ("dpmpp_3m", {}, "DPMSolverMultistepScheduler", {"solver_order": 3}, {}, True),
}


@pytest.mark.parametrize("steps", [5, 10, 20])
@pytest.mark.parametrize("case", sorted(CASES))
def test_sampler_matches_diffusers(case, steps):
    sampler, options, cls_name, config, step_kwargs, ddpm_scale = CASES[case]
    scheduler = make(getattr(diffusers, cls_name), timestep_spacing="trailing", **config)
    scheduler.set_timesteps(steps)
    if ddpm_scale:
        sigmas = scheduler.sigmas.double() if hasattr(scheduler, "sigmas") else sigmas_of(scheduler.timesteps)
        ours_x, theirs_x = NOISE * (1 + sigmas[0] ** 2).sqrt().float(), NOISE
    else:
        sigmas = torch.unique_consecutive(scheduler.sigmas.double())  # Heun lists each inner sigma twice
        ours_x = theirs_x = NOISE * scheduler.init_noise_sigma
    theirs = run_diffusers(scheduler, steps, theirs_x, seed=7, **step_kwargs)
    ours, _ = run_diffusekit(sampler, sigmas, ours_x, seed=7, **options)
    assert theirs.abs().max() > 0.5  # a real sample, not a collapsed one
    assert (ours - theirs).abs().max() < 1e-4


def test_ddpm_fixed_large_matches_diffusers_over_all_timesteps():
    t_small = 50  # a short chain keeps the full-length run fast
    betas = torch.linspace(1e-3, 0.2, t_small, dtype=torch.float64)
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=t_small, trained_betas=betas.float().numpy(), variance_type="fixed_large", clip_sample=False)
    schedule = NoiseSchedule(betas)
    denoiser = Denoiser(lambda x, t, **_: 0.5 * torch.tanh(x), schedule, "eps")
    scheduler.set_timesteps(t_small)
    generator = torch.Generator().manual_seed(3)
    x = NOISE.clone()
    for t in scheduler.timesteps:
        x = scheduler.step(0.5 * torch.tanh(x), t, x, generator=generator).prev_sample
    sigmas = torch.cat([schedule.sigmas.flip(0), torch.zeros(1, dtype=torch.float64)])
    ours = SAMPLERS["ddpm"](denoiser, NOISE * (1 + sigmas[0] ** 2).sqrt().float(), sigmas, generator=torch.Generator().manual_seed(3), variance="fixed_large")
    assert (ours - x).abs().max() < 1e-4


def test_strided_ddpm_fixed_large_adds_no_noise_on_the_last_step_unlike_diffusers():
    """Deliberate difference: Ho et al. Algorithm 2 sets z = 0 on the final step. diffusers adds
    noise whenever t > 0, so with strided timesteps (last t = 199) its fixed_large variance
    beta = 1 - abar_199 puts noise of std ~0.58 on the finished image. diffusekit's result is
    diffusers' minus exactly that last noise term."""
    steps = 5
    scheduler = make(diffusers.DDPMScheduler, timestep_spacing="trailing", clip_sample=False, variance_type="fixed_large")
    scheduler.set_timesteps(steps)
    sigmas = sigmas_of(scheduler.timesteps)
    theirs = run_diffusers(scheduler, steps, NOISE, seed=7)
    ours, generator = run_diffusekit("ddpm", sigmas, NOISE * (1 + sigmas[0] ** 2).sqrt().float(), seed=7, variance="fixed_large")
    last_t = int(scheduler.timesteps[-1])
    last_noise = torch.randn(SHAPE, generator=generator)  # the draw diffusers makes and diffusekit skips
    assert (theirs - ours).abs().max() > 0.1
    assert (theirs - (ours + (1 - ABAR[last_t]).sqrt() * last_noise)).abs().max() < 1e-4


def test_ddim_uses_the_listed_timesteps_under_linspace_spacing_unlike_diffusers():
    """Deliberate difference (diffusers issues 11347 and 12633): diffusers' DDIM steps from t to
    t - T // n whatever the spacing, so under linspace spacing it denoises towards timesteps that
    are not the ones it evaluates next. diffusekit steps between the listed sigmas, which is the
    DDIM update of the schedule actually used; it therefore equals diffusers' Euler (the same ODE
    step in the sigma scaling) on the same linspace schedule, and differs from diffusers' DDIM."""
    steps = 7
    ddim = make(diffusers.DDIMScheduler, timestep_spacing="linspace", set_alpha_to_one=True, clip_sample=False)
    ddim.set_timesteps(steps)
    sigmas = sigmas_of(ddim.timesteps)
    ours, _ = run_diffusekit("ddim", sigmas, NOISE * (1 + sigmas[0] ** 2).sqrt().float(), seed=0)
    theirs_ddim = run_diffusers(ddim, steps, NOISE, seed=0)
    euler = make(diffusers.EulerDiscreteScheduler)
    theirs_euler = run_diffusers(euler, ddim.timesteps.tolist(), NOISE * (1 + sigmas[0] ** 2).sqrt().float(), seed=0)
    assert torch.allclose(euler.sigmas.double(), sigmas, rtol=1e-4)  # diffusers keeps sigmas in float32
    assert (ours - theirs_euler).abs().max() < 1e-4
    assert (ours - theirs_ddim).abs().max() > 1e-2


# ----------------------------------------------------------------------------- UniPC and consistency sampling


@pytest.mark.parametrize("steps", [5, 10, 20])
@pytest.mark.parametrize("order", [1, 2, 3])
def test_unipc_bh2_matches_diffusers(order, steps):
    scheduler = make(diffusers.UniPCMultistepScheduler, timestep_spacing="trailing", solver_type="bh2", solver_order=order)
    scheduler.set_timesteps(steps)
    sigmas = scheduler.sigmas.double()
    theirs = run_diffusers(scheduler, steps, NOISE, seed=0)
    ours, _ = run_diffusekit("unipc", sigmas, NOISE * (1 + sigmas[0] ** 2).sqrt().float(), seed=0, order=order)
    assert theirs.abs().max() > 0.5
    assert (ours - theirs).abs().max() < 1e-4


@pytest.mark.parametrize("lower_order_final", [True, False])
@pytest.mark.parametrize("order", [2, 3])
def test_unipc_bh1_matches_diffusers_down_to_sigma_min(order, lower_order_final):
    """bh1 is compared on a schedule that ends at sigma_min (final_sigmas_type="sigma_min"): with diffusers'
    default final sigma 0, its bh1 update multiplies B(h) = -inf by a zero residual and returns NaN; diffusekit
    skips that zero term, so its bh1 lands on x0_hat there as bh2 does (checked below)."""
    steps = 8
    scheduler = make(diffusers.UniPCMultistepScheduler, timestep_spacing="trailing", solver_type="bh1", solver_order=order,
                     final_sigmas_type="sigma_min", lower_order_final=lower_order_final)
    scheduler.set_timesteps(steps)
    sigmas = scheduler.sigmas.double()
    theirs = run_diffusers(scheduler, steps, NOISE, seed=0)
    ours, _ = run_diffusekit("unipc", sigmas, NOISE * (1 + sigmas[0] ** 2).sqrt().float(), seed=0, order=order, variant="bh1",
                             lower_order_final=lower_order_final)
    alpha_last = 1 / (1 + sigmas[-1] ** 2).sqrt()  # diffusers' x is on the DDPM scale
    assert (ours * alpha_last.float() - theirs).abs().max() < 1e-4
    to_zero = sigmas_of(scheduler.timesteps)
    finite, _ = run_diffusekit("unipc_bh1", to_zero, NOISE * (1 + to_zero[0] ** 2).sqrt().float(), seed=0)
    assert torch.isfinite(finite).all()


def test_consistency_sampling_matches_diffusers_lcm_scheduler():
    """Multistep consistency sampling over the consistency function f = c_skip x_t + c_out x0_hat (LCM's
    boundary scaling, denoiser.ConsistencyDenoiser) against diffusers' LCMScheduler: same network,
    timesteps and noise."""
    from diffusekit.denoiser import ConsistencyDenoiser

    scheduler = make(diffusers.LCMScheduler, timestep_spacing="trailing", original_inference_steps=50)
    scheduler.set_timesteps(4)
    timesteps = scheduler.timesteps.tolist()
    theirs = run_diffusers(scheduler, 4, NOISE, seed=5)
    schedule = NoiseSchedule(linear_betas(T))
    denoiser = ConsistencyDenoiser(Denoiser(eps_model, schedule, "eps"), schedule)
    sigmas = sigmas_of(timesteps)
    ours = SAMPLERS["consistency"](denoiser, NOISE * (1 + sigmas[0] ** 2).sqrt().float(), sigmas, generator=torch.Generator().manual_seed(5))
    assert timesteps == [999, 759, 499, 259]
    assert theirs.abs().max() > 0.5
    assert (ours - theirs).abs().max() < 1e-4
