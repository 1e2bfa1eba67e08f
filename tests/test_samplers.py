"""Samplers over the denoiser seam: closed-form checks, oracle denoisers and parity with diffusers."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config, tiny_schedule
from diffusers import DDIMScheduler, DDPMScheduler

from diffusekit.config import DiffusionConfig
from diffusekit.denoiser import Denoiser
from diffusekit.errors import UserError
from diffusekit.nn.unet import UNet
from diffusekit.pipeline import Pipeline
from diffusekit.samplers import SAMPLERS, get_sampler, sample_ddim, sample_ddpm
from diffusekit.schedule import NoiseSchedule
from diffusekit.seeds import sample_generators

# every registered sampler with its default options, plus the options that make another method
EXTRA_CASES = {"ddpm[fixed_large]": ("ddpm", {"variance": "fixed_large"}), "ddim[eta=0.5]": ("ddim", {"eta": 0.5}), "ddim[eta=1]": ("ddim", {"eta": 1.0})}
SAMPLER_CASES = {**{name: (name, {}) for name in SAMPLERS}, **EXTRA_CASES}


def run_case(case: str, denoiser, x, sigmas, **kwargs):
    name, options = SAMPLER_CASES[case]
    return SAMPLERS[name](denoiser, x, sigmas, **kwargs, **options)


def tiny_unet(seed: int = 0, channels: int = 1) -> UNet:
    torch.manual_seed(seed)
    return UNet.from_config(tiny_config().model, in_channels=channels).eval()


def start_noise(n: int, sigma0, seed: int = 0, shape=(1, 8, 8)) -> torch.Tensor:
    """x at sigmas[0] for pure-noise starts: N(0, 1 + sigma_0^2), i.e. x_T ~ N(0, I) on the DDPM scale."""
    return torch.randn((n, *shape), generator=torch.Generator().manual_seed(seed)) * (1 + sigma0**2).sqrt().float()


def point_oracle(point: torch.Tensor):
    """The exact denoiser of a data set with a single image: always that image."""
    return lambda x, sigma, cond=None: point.expand_as(x).clone()


def gaussian_oracle(mu: float, tau: float):
    """The exact denoiser E[x0 | x] of data x0 ~ N(mu, tau^2 I)."""
    return lambda x, sigma, cond=None: mu + tau**2 / (tau**2 + sigma**2) * (x - mu)


class GaussianEpsNet(torch.nn.Module):
    """A plausible eps-network on the DDPM scale: the exact eps of data N(0, 0.25 I), plus a small random U-Net.

    Its outputs stay O(1) at every timestep (a bare random U-Net's do not), so absolute tolerances mean something.
    """

    def __init__(self, alphas_cumprod: torch.Tensor, seed: int = 0):
        super().__init__()
        self.abar, self.unet, self.tau2 = alphas_cumprod.double(), tiny_unet(seed), 0.25

    def forward(self, x_t, t):
        abar = self.abar[t.round().long()].view(-1, 1, 1, 1)
        # x_t = a x0 + s eps with x0 ~ N(0, tau2): E[eps | x_t] = s x_t / (a^2 tau2 + s^2)
        eps = (1 - abar).sqrt() * x_t.double() / (abar * self.tau2 + 1 - abar)
        return eps.float() + 0.1 * self.unet(x_t, t)


def test_unknown_sampler_or_variance_is_refused():
    with pytest.raises(UserError, match="unknown sampler 'euler_x'"):
        get_sampler("euler_x")
    sigmas = tiny_schedule().sampling_sigmas(3)
    with pytest.raises(UserError, match="variance"):
        sample_ddpm(point_oracle(torch.zeros(1)), torch.zeros(1, 1), sigmas, variance="learned")


# ----------------------------------------------------------------------------- closed forms


def test_ddim_eta_one_is_ddpm_fixed_small():
    sched = tiny_schedule()
    denoiser = Denoiser(GaussianEpsNet(sched.alphas_cumprod), sched, "eps")
    sigmas = sched.sampling_sigmas(10, "trailing")
    x = start_noise(3, sigmas[0])
    ddpm = sample_ddpm(denoiser, x, sigmas, generator=sample_generators(7, 3), variance="fixed_small")
    ddim = sample_ddim(denoiser, x, sigmas, generator=sample_generators(7, 3), eta=1.0)
    torch.testing.assert_close(ddim, ddpm, rtol=0, atol=1e-5)


def test_ddim_eta_zero_is_deterministic_euler_in_sigma():
    sched = tiny_schedule()
    denoiser = Denoiser(GaussianEpsNet(sched.alphas_cumprod), sched, "eps")
    sigmas = sched.sampling_sigmas(6, "trailing")
    x = start_noise(2, sigmas[0])
    steps = []
    out = sample_ddim(denoiser, x, sigmas, generator=sample_generators(0, 2), callback=lambda info: steps.append(info["x"]))
    again = sample_ddim(denoiser, x, sigmas, generator=sample_generators(99, 2))
    assert torch.equal(out, again)
    # one Euler step of the probability-flow ODE dx/dsigma = (x - D(x, sigma)) / sigma
    for i, (before, after) in enumerate(zip([x, *steps[:-1]], steps)):
        derivative = (before - denoiser(before, sigmas[i])) / sigmas[i]
        euler = before + (sigmas[i + 1] - sigmas[i]).float() * derivative
        torch.testing.assert_close(after, euler, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", sorted(SAMPLER_CASES))
def test_single_point_oracle_lands_on_the_point(case):
    sigmas = tiny_schedule().sampling_sigmas(8, "trailing")
    point = torch.linspace(-1, 1, 64).view(1, 1, 8, 8)
    out = run_case(case, point_oracle(point), start_noise(4, sigmas[0]), sigmas, generator=sample_generators(1, 4))
    torch.testing.assert_close(out, point.expand(4, 1, 8, 8), rtol=0, atol=1e-6)


@pytest.mark.parametrize("case", sorted(set(SAMPLER_CASES) - {"ddpm[fixed_large]"}))
def test_single_point_oracle_keeps_the_exact_marginals(case):
    """For one-point data x = point + sigma * eps is exact; a sampler must keep std(x - point) = sigma at every step."""
    sigmas = tiny_schedule().sampling_sigmas(8, "trailing")
    point = torch.full((1, 1, 8, 8), 0.25)
    seen = []
    run_case(case, point_oracle(point), start_noise(1000, sigmas[0]), sigmas, generator=sample_generators(2, 1000),
             callback=lambda info: seen.append(info["x"] - point))
    assert len(seen) == 8
    for offset, sigma in zip(seen[:-1], sigmas[1:-1]):
        assert offset.std().item() == pytest.approx(sigma.item(), rel=0.02)
        assert abs(offset.mean().item()) < 0.02 * sigma.item()


def test_ddim_with_a_point_oracle_keeps_its_noise_direction():
    """With D = point, DDIM(eta=0) moves along x = point + sigma * eps for one fixed eps."""
    sigmas = tiny_schedule().sampling_sigmas(8, "trailing")
    point = torch.full((1, 1, 8, 8), 0.25)
    x = start_noise(2, sigmas[0])
    eps = (x - point) / sigmas[0].float()
    seen = []
    sample_ddim(point_oracle(point), x, sigmas, callback=lambda info: seen.append(info["x"]))
    for i, x_i in enumerate(seen):
        torch.testing.assert_close(x_i, point + sigmas[i + 1].float() * eps, rtol=1e-5, atol=1e-5)


def test_ddpm_fixed_large_adds_more_noise_than_fixed_small():
    sigmas = tiny_schedule().sampling_sigmas(8, "trailing")
    point = torch.zeros(1, 1, 8, 8)
    spread = {}
    for variance in ("fixed_small", "fixed_large"):
        seen = []
        sample_ddpm(point_oracle(point), start_noise(200, sigmas[0]), sigmas, generator=sample_generators(3, 200),
                    callback=lambda info: seen.append(info["x"]), variance=variance)
        spread[variance] = torch.tensor([x_i.std() / sigma for x_i, sigma in zip(seen[:-1], sigmas[1:-1])])
    # beta_t > beta~_t: the larger variance overshoots sigma, most near the end (where beta~_t << beta_t)
    assert spread["fixed_small"][-1] == pytest.approx(1, abs=0.03)
    assert spread["fixed_large"][-1] > 1.3 and spread["fixed_large"].mean() > spread["fixed_small"].mean()


@pytest.mark.parametrize("case", sorted(set(SAMPLER_CASES) - {"consistency"}))  # it takes a consistency function: next test
def test_gaussian_data_is_reproduced(case):
    """With the exact denoiser of N(mu, tau^2) and a fine schedule, samples have mean mu and std tau."""
    mu, tau = 0.3, 0.5
    sigmas = NoiseSchedule.from_config(DiffusionConfig()).sampling_sigmas(1000, "trailing")
    gen = torch.Generator().manual_seed(0)
    x = mu + (tau**2 + sigmas[0] ** 2).sqrt().float() * torch.randn(2000, 16, generator=gen)
    out = run_case(case, gaussian_oracle(mu, tau), x, sigmas, generator=gen)
    assert out.mean().item() == pytest.approx(mu, abs=0.015)
    assert out.std().item() == pytest.approx(tau, rel=0.02)


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_multistep_consistency_sampling_of_the_exact_consistency_function_reproduces_gaussian_data(steps):
    """For data N(mu, tau^2) the probability-flow ODE maps x at sigma to mu + tau / sqrt(tau^2 + sigma^2) (x - mu): the exact
    consistency function. One call already gives N(mu, tau^2), and so does every number of steps (Song et al. Algorithm 1)."""
    mu, tau = 0.3, 0.5
    flow = lambda x, sigma, cond=None: mu + tau / (tau**2 + sigma.double() ** 2).sqrt().float() * (x - mu)  # noqa: E731
    sigmas = NoiseSchedule.from_config(DiffusionConfig()).sampling_sigmas(steps, "trailing")
    gen = torch.Generator().manual_seed(0)
    x = mu + (tau**2 + sigmas[0] ** 2).sqrt().float() * torch.randn(4000, 16, generator=gen)
    out = SAMPLERS["consistency"](flow, x, sigmas, generator=gen)
    assert out.mean().item() == pytest.approx(mu, abs=0.01)
    assert out.std().item() == pytest.approx(tau, rel=0.01)


# ----------------------------------------------------------------------------- the pipeline


def test_images_do_not_depend_on_the_batch_size():
    pipe = Pipeline(tiny_config(), tiny_unet())
    options = {"steps": 4, "sampler": "ddim", "eta": 0.7, "seed": 5}
    whole = pipe.sample(8, batch_size=8, **options)
    in_threes = pipe.sample(8, batch_size=3, **options)
    first_five = pipe.sample(5, batch_size=2, **options)
    # float32 convolutions may take other kernels for other batch sizes (seen: 3e-5 apart on an AVX2 EPYC);
    # noise that depended on the batch would move the images by O(1)
    torch.testing.assert_close(in_threes, whole, rtol=0, atol=1e-4)
    torch.testing.assert_close(first_five, whole[:5], rtol=0, atol=1e-4)
    assert not torch.allclose(whole[0], whole[1], atol=0.1)  # but the images differ from each other


def test_pipeline_seed_changes_the_images():
    pipe = Pipeline(tiny_config(), tiny_unet())
    a, b = pipe.sample(2, steps=3, seed=0), pipe.sample(2, steps=3, seed=1)
    assert a.shape == (2, 1, 8, 8) and -1 <= a.min() and a.max() <= 1
    assert not torch.allclose(a, b, atol=0.1)


# ----------------------------------------------------------------------------- parity with diffusers


def run_diffusers(scheduler, net, x_T, generator=None) -> torch.Tensor:
    x = x_T
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.step(net(x, t.float().expand(len(x))), t, x, generator=generator).prev_sample
    return x


@pytest.mark.parametrize("prediction, diffusers_name", [("eps", "epsilon"), ("v", "v_prediction")])
def test_ddim_matches_diffusers(prediction, diffusers_name):
    """DDIM, eta = 0, 10 trailing steps of T = 100 (10 divides 100: diffusers steps to t - T // n)."""
    sched = tiny_schedule()
    net = GaussianEpsNet(sched.alphas_cumprod, seed=3)
    beta_start, beta_end = tiny_config().diffusion.beta_start, tiny_config().diffusion.beta_end
    ref = DDIMScheduler(num_train_timesteps=100, beta_start=beta_start, beta_end=beta_end, beta_schedule="linear", clip_sample=False,
                        set_alpha_to_one=True, timestep_spacing="trailing", prediction_type=diffusers_name)
    ref.set_timesteps(10)
    noise = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(4))
    expected = run_diffusers(ref, net, noise)
    sigmas = sched.sampling_sigmas(10, "trailing")
    got = sample_ddim(Denoiser(net, sched, prediction), noise * (1 + sigmas[0] ** 2).sqrt().float(), sigmas)
    assert 0.1 < expected.abs().max() < 10
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)


@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large"])
def test_ddpm_matches_diffusers_with_the_same_noise(variance):
    """All 50 steps of a T = 50 schedule; both draw per-sample noise from the same generators in the same order."""
    sched = NoiseSchedule.from_config(DiffusionConfig(timesteps=50, beta_start=2e-3, beta_end=0.4))
    net = GaussianEpsNet(sched.alphas_cumprod, seed=5)
    ref = DDPMScheduler(num_train_timesteps=50, beta_start=2e-3, beta_end=0.4, variance_type=variance, clip_sample=False)
    noise = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(6))
    expected = run_diffusers(ref, net, noise, generator=sample_generators(8, 2))
    sigmas = sched.sampling_sigmas(50, "trailing")
    x = noise * (1 + sigmas[0] ** 2).sqrt().float()
    got = sample_ddpm(Denoiser(net, sched, "eps"), x, sigmas, generator=sample_generators(8, 2), variance=variance)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)


def test_the_declared_sampler_options_are_the_functions_own():
    """SAMPLER_OPTIONS (what Pipeline.sample may pass a sampler) holds exactly the eta / variance parameters of each function."""
    import inspect

    from diffusekit.samplers import SAMPLER_OPTIONS, SAMPLERS

    for name, fn in SAMPLERS.items():
        own = {p for p in inspect.signature(fn).parameters if p in ("eta", "variance")}
        assert own == set(SAMPLER_OPTIONS.get(name, ())), name
