"""The one seam between networks and samplers: D(x, sigma, cond) -> x0_hat.

All conversions between what a network predicts (eps, x0 or v) and the clean
image live here. With alpha = sqrt(abar), s = sqrt(1 - abar) and
x_t = alpha * x0 + s * eps (DDPM eq. 4):

    eps target:  eps                 x0 = (x_t - s * eps) / alpha
    x0 target:   x0                  x0 = output
    v target:    alpha*eps - s*x0    x0 = alpha * x_t - s * v    (Salimans & Ho 2022, sec. 4)

A flow model (flow.py) has alpha = 1 - t, s = t; eps and x0 convert as above, and its v is the
velocity dx_t/dt = eps - x0 (Lipman et al. 2023), so x0 = x_t - t * v.

Samplers use the k-diffusion variable x = x_t / alpha = x0 + sigma * eps.
"""

from __future__ import annotations

import torch

from diffusekit.errors import UserError, warn
from diffusekit.flow import FlowSchedule
from diffusekit.schedule import NoiseSchedule, sigma_to_alpha_sigma
from diffusekit.sigmas import append_dims

PREDICTIONS = ("eps", "x0", "v")
SIGMA_DATA = 0.5  # a consistency model's data scale (LCM, diffusers' LCMScheduler)
TIMESTEP_SCALING = 10.0  # LCM's: c_skip ~ 0 from the first timestep on


def prediction_target(prediction: str, x0, eps, alpha, s, process: str = "ddpm") -> torch.Tensor:
    """What the network is trained to output for x_t = alpha * x0 + s * eps."""
    if prediction == "eps":
        return eps
    if prediction == "x0":
        return x0
    if prediction == "v" and process == "flow":
        return eps - x0
    if prediction == "v":
        return append_dims(alpha, x0) * eps - append_dims(s, x0) * x0
    raise UserError(f"unknown prediction type '{prediction}'; use one of {PREDICTIONS}")


def x0_from_prediction(prediction: str, output, x_t, alpha, s, process: str = "ddpm") -> torch.Tensor:
    """The clean image implied by a network output at x_t = alpha * x0 + s * eps."""
    if prediction == "eps":
        return (x_t - append_dims(s, x_t) * output) / append_dims(alpha, x_t)
    if prediction == "x0":
        return output
    if prediction == "v" and process == "flow":
        return x_t - append_dims(s, x_t) * output
    if prediction == "v":
        return append_dims(alpha, x_t) * x_t - append_dims(s, x_t) * output
    raise UserError(f"unknown prediction type '{prediction}'; use one of {PREDICTIONS}")


def eps_from_x0(x0, x_t, alpha, s) -> torch.Tensor:
    return (x_t - append_dims(alpha, x_t) * x0) / append_dims(s, x_t)


def network_dtype(net) -> torch.dtype:
    """The dtype a network computes in: that of its (first) floating-point parameter, else (a plain function) float32."""
    parameters = net.parameters() if isinstance(net, torch.nn.Module) else ()
    return next((p.dtype for p in parameters if p.is_floating_point()), torch.float32)


def cast_floats(cond: dict | None, dtype: torch.dtype) -> dict:
    """Conditions with their floating-point tensors (text embeddings) in `dtype`; labels and masks unchanged."""
    return {k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in (cond or {}).items()}


class Denoiser:
    """Wraps a network net(x_t, t, **cond) as D(x, sigma, cond) -> x0_hat.

    sigma is mapped back to the network's time (a DDPM model's possibly fractional timestep, a
    flow model's t * timesteps), and x to the process's own scale x_t = x * alpha (DDPM:
    x / sqrt(1 + sigma^2), flow: x / (1 + sigma)), before the network is called. A network held in
    bfloat16 gets its inputs in bfloat16 and gives x0_hat back in x's dtype (float32): the
    samplers' arithmetic never sees the lower precision.
    """

    def __init__(self, net: torch.nn.Module, schedule: NoiseSchedule | FlowSchedule, prediction: str, warn_non_finite: bool = True):
        if prediction not in PREDICTIONS:
            raise UserError(f"unknown prediction type '{prediction}'; use one of {PREDICTIONS}")
        self.net, self.schedule, self.prediction = net, schedule, prediction
        self.warned = not warn_non_finite  # about a non-finite output: once per denoiser (a Pipeline keeps one; training has train.on_nan)

    def check_finite(self, output: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> None:
        """One warning when the network turns a finite input into NaN or infinity (a broken model, LoRA or scale)."""
        if not self.warned and not bool(torch.isfinite(output).all()) and bool(torch.isfinite(x).all()):
            self.warned = True
            warn(f"the network produced NaN or infinite values at timestep {float(t.max()):.0f}: the images will be blank; "
                 "check the model's and the LoRAs' weights and scales (--lora FILE:SCALE)")

    @property
    def sigma_min(self) -> float:
        return self.schedule.sigma_min

    @property
    def sigma_max(self) -> float:
        return self.schedule.sigma_max

    def network_inputs(self, x: torch.Tensor, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x_t, the network's time t, alpha, s) for x at sigma: what the network sees (a ControlNet too, control.py)."""
        sigma = sigma.to(x.device, torch.float64).expand(x.shape[0])
        alpha, s = self.schedule.coefficients(sigma)
        return x * append_dims(alpha, x), self.schedule.net_time(self.schedule.sigma_to_t(sigma)), alpha, s

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond: dict | None = None) -> torch.Tensor:
        x_t, t, alpha, s = self.network_inputs(x, sigma)
        dtype = network_dtype(self.net)
        output = self.net(x_t.to(dtype), t, **cast_floats(cond, dtype)).to(x.dtype)
        self.check_finite(output, x, t)
        return x0_from_prediction(self.prediction, output, x_t, alpha, s, self.schedule.process)


def boundary_scalings(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(c_skip, c_out) at timesteps t (LCM's scalings, Luo et al. 2023): c_skip = s^2 / ((10 t)^2 + s^2),
    c_out = 10 t / sqrt((10 t)^2 + s^2), s = SIGMA_DATA; c_skip = 1, c_out = 0 at t = 0."""
    scaled = TIMESTEP_SCALING * t.to(torch.float64)
    c_skip = SIGMA_DATA**2 / (scaled**2 + SIGMA_DATA**2)
    c_out = scaled / (scaled**2 + SIGMA_DATA**2).sqrt()
    return c_skip, c_out


class ConsistencyDenoiser:
    """A consistency model f(x, sigma) = c_skip x_t + c_out D(x, sigma) behind the denoiser seam (x_t = x / sqrt(1 +
    sigma^2), the DDPM scale, as LCM): f(x, sigma_min) = x, and f equals D's x0_hat everywhere but at the first
    timesteps. Samplers see it as a denoiser whose x0_hat is f (a consistency student, distill_losses.py)."""

    def __init__(self, denoiser, schedule: NoiseSchedule):
        self.denoiser, self.schedule = denoiser, schedule

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond: dict | None = None) -> torch.Tensor:
        sigma = sigma.to(x.device, torch.float64).expand(x.shape[0])
        c_skip, c_out = boundary_scalings(self.schedule.sigma_to_t(sigma))
        alpha, _ = sigma_to_alpha_sigma(sigma)
        return append_dims(c_skip * alpha, x) * x + append_dims(c_out, x) * self.denoiser(x, sigma, cond)
