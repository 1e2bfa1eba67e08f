"""The denoiser seam D(x, sigma) -> x0_hat, the prediction-type conversions and the loss."""

from __future__ import annotations

import pytest
import torch
from conftest import TargetNet, tiny_config, tiny_schedule
from diffusers import DDPMScheduler

from diffusekit.denoiser import PREDICTIONS, Denoiser, eps_from_x0, prediction_target, x0_from_prediction
from diffusekit.errors import UserError
from diffusekit.losses import diffusion_loss, loss_weights


def random_pair(batch: int = 64, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.randn(batch, 3, 4, 4, generator=gen, dtype=torch.float64)
    eps = torch.randn(batch, 3, 4, 4, generator=gen, dtype=torch.float64)
    abar = torch.logspace(-6, -1e-4, batch, dtype=torch.float64)  # from almost pure noise to almost clean
    return x0, eps, abar.sqrt(), (1 - abar).sqrt()


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_target_to_x0_round_trip(prediction):
    x0, eps, alpha, s = random_pair()
    x_t = alpha.view(-1, 1, 1, 1) * x0 + s.view(-1, 1, 1, 1) * eps
    target = prediction_target(prediction, x0, eps, alpha, s)
    torch.testing.assert_close(x0_from_prediction(prediction, target, x_t, alpha, s), x0, rtol=0, atol=1e-9)


def test_eps_from_x0_inverts_the_forward_process():
    x0, eps, alpha, s = random_pair()
    x_t = alpha.view(-1, 1, 1, 1) * x0 + s.view(-1, 1, 1, 1) * eps
    torch.testing.assert_close(eps_from_x0(x0, x_t, alpha, s), eps, rtol=0, atol=1e-9)


def test_v_target_matches_diffusers_velocity():
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    t = torch.tensor([0, 10, 300, 999])
    x0, eps = torch.randn(4, 1, 3, 3), torch.randn(4, 1, 3, 3)
    abar = scheduler.alphas_cumprod[t].double()
    ours = prediction_target("v", x0, eps, abar.sqrt(), (1 - abar).sqrt())
    torch.testing.assert_close(ours, scheduler.get_velocity(x0, eps, t), rtol=1e-5, atol=1e-6)


def test_unknown_prediction_type_is_refused():
    with pytest.raises(UserError, match="prediction"):
        Denoiser(torch.nn.Identity(), tiny_schedule(), "score")


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_denoiser_recovers_x0_from_an_exact_network(prediction):
    sched = tiny_schedule()
    x0 = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    net = TargetNet(x0, sched, prediction)
    denoiser = Denoiser(net, sched, prediction)
    on_grid = sched.sigmas[[0, 5, 50, 99]].tolist()
    between = sched.t_to_sigma(torch.tensor([0.5, 37.25, 98.9], dtype=torch.float64)).tolist()
    for sigma in on_grid + between:
        eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(2))
        x0_hat = denoiser(x0 + sigma * eps, torch.tensor(sigma))
        torch.testing.assert_close(x0_hat, x0, rtol=0, atol=2e-4 * max(1.0, sigma), msg=f"sigma = {sigma}")
    assert [c.shape for c in net.calls] == [torch.Size([2])] * 7
    assert net.calls[1].tolist() == [5.0, 5.0]


def test_denoiser_takes_one_sigma_per_sample():
    sched = tiny_schedule()
    x0 = torch.randn(3, 1, 4, 4)
    net = TargetNet(x0, sched, "eps")
    sigma = sched.sigmas[[3, 40, 90]]
    eps = torch.randn(x0.shape)
    x0_hat = Denoiser(net, sched, "eps")(x0 + sigma.float().view(-1, 1, 1, 1) * eps, sigma)
    torch.testing.assert_close(x0_hat, x0, rtol=0, atol=1e-3)
    assert net.calls[0].tolist() == [3.0, 40.0, 90.0]


# ----------------------------------------------------------------------------- loss weights


def implied_x0_mse(prediction, output_error, x_t, alpha, s) -> torch.Tensor:
    """The x0-space MSE that an error in the network output causes."""
    zero = x0_from_prediction(prediction, torch.zeros_like(output_error), x_t, alpha, s)
    return (x0_from_prediction(prediction, output_error, x_t, alpha, s) - zero).pow(2).flatten(1).mean(1)


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_min_snr_weight_is_min_snr_gamma_in_x0_space(prediction):
    """Hang et al. 2023 eq. 8: whatever the network predicts, the weighted loss equals min(SNR, gamma) * ||x0 error||^2."""
    x0, eps, alpha, s = random_pair()
    x_t = alpha.view(-1, 1, 1, 1) * x0 + s.view(-1, 1, 1, 1) * eps
    snr, gamma = alpha**2 / s**2, 5.0
    error = torch.randn_like(x0)
    weighted = loss_weights("min_snr", prediction, snr, gamma) * error.pow(2).flatten(1).mean(1)
    expected = snr.clamp(max=gamma) * implied_x0_mse(prediction, error, x_t, alpha, s)
    torch.testing.assert_close(weighted, expected, rtol=1e-9, atol=0)


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_uniform_weights_are_ones(prediction):
    snr = torch.logspace(-4, 4, 9, dtype=torch.float64)
    assert torch.equal(loss_weights("uniform", prediction, snr), torch.ones(9, dtype=torch.float64))


def test_unknown_weighting_is_refused():
    with pytest.raises(UserError, match="weighting"):
        loss_weights("p2", "eps", torch.ones(2))


# ----------------------------------------------------------------------------- the loss


class LossTargetNet(torch.nn.Module):
    """Returns the exact target for the batch x0 at integer timesteps (what diffusion_loss trains on), with the
    coefficients of their sigmas (a zero-terminal-SNR schedule's last sigma is finite: 4096)."""

    def __init__(self, x0, schedule, prediction, scale: float = 1.0):
        super().__init__()
        self.x0, self.schedule, self.prediction, self.scale = x0, schedule, prediction, scale

    def forward(self, x_t, t):
        alpha, s = self.schedule.coefficients(self.schedule.t_to_sigma(t.long()))
        eps = (x_t.double() - alpha.view(-1, 1, 1, 1) * self.x0.double()) / s.view(-1, 1, 1, 1)
        return self.scale * prediction_target(self.prediction, self.x0.double(), eps, alpha, s).float()


@pytest.mark.parametrize("weighting", ["uniform", "min_snr"])
@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_loss_of_the_exact_target_is_zero(prediction, weighting):
    sched = tiny_schedule(zero_terminal_snr=prediction != "eps", prediction=prediction)
    x0 = torch.rand(32, 1, 4, 4) * 2 - 1

    def loss(scale):
        return diffusion_loss(LossTargetNet(x0, sched, prediction, scale), sched, x0, prediction=prediction,
                              weighting=weighting, generator=torch.Generator().manual_seed(0))

    assert loss(1.0).item() < 1e-9
    assert loss(0.5).item() > 1e-3  # a wrong output does cost something


@pytest.mark.parametrize("process, prediction, weighting", [
    ("ddpm", "eps", "uniform"), ("ddpm", "eps", "min_snr"), ("ddpm", "v", "min_snr"), ("ddpm", "x0", "uniform"), ("flow", "v", "uniform"),
])
def test_the_loss_through_the_denoiser_equals_the_prediction_space_loss(process, prediction, weighting):
    """EDM's form (the x0 error of D(x0 + sigma eps, sigma), weighted by lambda(sigma)) against the formulation it
    replaced, written out here: the weighted MSE of the network's own output against its target at
    x_t = alpha x0 + s eps and timestep t, on the same draws and weights of a real (random) U-Net."""
    from diffusekit.flow import FlowSchedule
    from diffusekit.models import build_net

    schedule = FlowSchedule(100, sampling="logit_normal") if process == "flow" else tiny_schedule()
    torch.manual_seed(0)
    net = build_net(tiny_config()).eval()
    x0, noise = torch.rand(16, 1, 8, 8) * 2 - 1, torch.randn(16, 1, 8, 8)
    t = schedule.draw_t(16, torch.Generator().manual_seed(1), "cpu")
    with torch.no_grad():
        alpha, s = schedule.alpha_sigma(t)
        target = prediction_target(prediction, x0, noise, alpha, s, schedule.process)
        output = net(schedule.q_sample(x0, t, noise), schedule.net_time(t))
        old = (loss_weights(weighting, prediction, schedule.snr(t)) * (output - target).pow(2).flatten(1).mean(1)).mean()
        new = diffusion_loss(net, schedule, x0, prediction=prediction, weighting=weighting, sigma=schedule.t_to_sigma(t), noise=noise)
    torch.testing.assert_close(new.double(), old.double(), rtol=1e-4, atol=0)
