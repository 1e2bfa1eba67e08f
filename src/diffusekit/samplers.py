"""Samplers: one function each, one signature, over the denoiser D(x, sigma, cond) -> x0_hat.

    sample_xxx(denoiser, x, sigmas, cond=None, generator=None, callback=None, **options) -> x

x starts as noise at sigmas[0] (x = x0 + sigmas[0] * eps, k-diffusion scaling) and
the loop walks down the decreasing `sigmas`, which end at 0. After every step,
`callback(info)` gets a dict with k-diffusion's keys: "i" (the step), "steps" (their
number), "sigma" (where the network predicted "denoised", the x0_hat), "sigma_next" (the
level the new "x" is at). `generator` is None, a torch.Generator or a list of per-sample
generators (see seeds.randn). The flow samplers step in flow time t = sigma / (1 + sigma)
on x_t = x / (1 + sigma) (flow.py), as SD3 and FLUX users know them; they run any denoiser.

Steps are written as x0_hat + (sigma' / sigma)(x - x0_hat) rather than x + slope * (sigma' - sigma): the same
number, without float32 cancellation when sigma is large (zero-terminal-SNR and flow models start at 4096 or more).

In this scaling the DDPM forward chain is Brownian motion: x_{sigma'} = x_{sigma} +
sqrt(sigma'^2 - sigma^2) z. Its reverse posterior q(x_s | x_t, x0) (Ho et al. eq. 7)
is the Brownian bridge with mean x0 + (s^2/t^2)(x_t - x0) and variance
s^2 (t^2 - s^2) / t^2; DDIM (Song et al. 2021, eq. 12) keeps the same marginals and
splits that step into a deterministic part and eta times the bridge noise.
"""

from __future__ import annotations

import torch

from diffusekit.errors import UserError
from diffusekit.flow import sigma_to_t
from diffusekit.seeds import randn
from diffusekit.sigmas import ddim_step


def report(callback, i: int, sigmas: torch.Tensor, x: torch.Tensor, x0: torch.Tensor) -> None:
    """Tell the callback (if any) where step i left x."""
    if callback is not None:
        callback({"i": i, "steps": len(sigmas) - 1, "sigma": sigmas[i], "sigma_next": sigmas[i + 1], "x": x, "denoised": x0})


def _noise_like(x: torch.Tensor, generator) -> torch.Tensor:
    return randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def ancestral_step(sigma: torch.Tensor, sigma_next: torch.Tensor, eta: float = 1.0):
    """Split a step sigma -> sigma_next into a deterministic move to sigma_down plus noise sigma_up.

    sigma_up = eta * sqrt(s^2 (t^2 - s^2) / t^2) (DDIM's sigma_t(eta) in this scaling),
    sigma_down = sqrt(s^2 - sigma_up^2), so the marginal at sigma_next is kept.
    """
    if eta == 0 or sigma_next == 0:
        return sigma_next, sigma_next * 0
    sigma_up = torch.minimum(sigma_next, eta * (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2).sqrt())
    sigma_down = (sigma_next**2 - sigma_up**2).sqrt()
    return sigma_down, sigma_up


@torch.no_grad()
def sample_ddpm(denoiser, x, sigmas, cond=None, generator=None, callback=None, variance: str = "fixed_small"):
    """DDPM ancestral sampling (Ho et al. 2020, Algorithm 2), also over a subset of timesteps.

    variance "fixed_small" is the true posterior variance beta~_t, "fixed_large" is beta_t
    (in the sigma scaling: (t^2 - s^2)(1 + s^2)/(1 + t^2)). No noise is added on the last step.
    """
    if variance not in ("fixed_small", "fixed_large"):
        raise UserError(f"unknown DDPM variance '{variance}'; use fixed_small or fixed_large")
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        x0 = denoiser(x, sigma, cond)
        x = x0 + (sigma_next**2 / sigma**2) * (x - x0)  # posterior mean
        if sigma_next > 0:
            if variance == "fixed_small":
                std = sigma_next * (sigma**2 - sigma_next**2).sqrt() / sigma
            else:
                std = ((sigma**2 - sigma_next**2) * (1 + sigma_next**2) / (1 + sigma**2)).sqrt()
            x = x + std.to(x.dtype) * _noise_like(x, generator)
        report(callback, i, sigmas, x, x0)
    return x


@torch.no_grad()
def sample_euler_ancestral(denoiser, x, sigmas, cond=None, generator=None, callback=None, eta: float = 1.0):
    """Euler steps to sigma_down plus fresh noise sigma_up (k-diffusion; diffusers' EulerAncestralDiscrete at eta = 1).

    With the DDPM timesteps' sigmas this is exactly DDIM (Song et al. 2021, eq. 12) with the same eta:
    eta = 0 is deterministic DDIM = Euler on the probability-flow ODE dx/dsigma = (x - x0_hat) / sigma.
    """
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        x0 = denoiser(x, sigma, cond)
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
        x = ddim_step(x, x0, sigma, sigma_down)
        if sigma_up > 0:
            x = x + sigma_up.to(x.dtype) * _noise_like(x, generator)
        report(callback, i, sigmas, x, x0)
    return x


def sample_ddim(denoiser, x, sigmas, cond=None, generator=None, callback=None, eta: float = 0.0):
    """DDIM (Song et al. 2021): eta = 0 deterministic, eta = 1 the DDPM posterior (fixed-small variance)."""
    return sample_euler_ancestral(denoiser, x, sigmas, cond, generator, callback, eta=eta)


def sample_euler(denoiser, x, sigmas, cond=None, generator=None, callback=None):
    """Euler on the probability-flow ODE (Karras et al. 2022, Algorithm 1 without churn)."""
    return sample_euler_ancestral(denoiser, x, sigmas, cond, generator, callback, eta=0.0)


@torch.no_grad()
def sample_heun(denoiser, x, sigmas, cond=None, generator=None, callback=None):
    """Heun's 2nd-order method (Karras et al. 2022, Algorithm 1): an Euler step corrected by the
    slope at its end point; the last step, to sigma = 0, stays Euler. 2 * steps - 1 network calls."""
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        x0 = denoiser(x, sigma, cond)
        slope = (x - x0) / sigma
        dt = (sigma_next - sigma).to(x.dtype)
        x_euler = ddim_step(x, x0, sigma, sigma_next)  # x + slope * dt, without cancellation at a large sigma
        if sigma_next == 0:
            x = x_euler
        else:
            slope_next = (x_euler - denoiser(x_euler, sigma_next, cond)) / sigma_next
            x = x_euler + (slope_next - slope) / 2 * dt  # = x + (slope + slope_next) / 2 * dt
        report(callback, i, sigmas, x, x0)
    return x


def _dpmpp_data_term(history, h, phi):
    """The x0 estimate the DPM-Solver++ step integrates, from the last 1-3 (lambda, x0_hat) pairs.

    2nd order (midpoint): x0 + D1/2 with D1 = (x0 - x0_prev) / r0, r0 = h_prev / h.
    3rd order: x0 + (c1 D1 + c2 D2) / phi with the coefficients of the DPM-Solver authors' and
    diffusers' multistep update, c1 = 1 - (1 - e^-h)/h, c2 = (1 - e^-h - h)/h^2 + 1/2.
    """
    lam, x0 = history[-1]
    if len(history) == 1:
        return x0
    r0 = ((lam - history[-2][0]) / h).to(x0.dtype)
    d1_0 = (x0 - history[-2][1]) / r0
    if len(history) == 2:
        return x0 + 0.5 * d1_0
    r1 = ((history[-2][0] - history[-3][0]) / h).to(x0.dtype)
    d1_1 = (history[-2][1] - history[-3][1]) / r1
    d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
    d2 = (d1_0 - d1_1) / (r0 + r1)
    c1 = 1 + torch.expm1(-h) / h
    c2 = (-torch.expm1(-h) - h) / h**2 + 0.5
    return x0 + ((c1 / phi).to(x0.dtype) * d1 + (c2 / phi).to(x0.dtype) * d2)


@torch.no_grad()
def sample_dpmpp(denoiser, x, sigmas, cond=None, generator=None, callback=None, order: int = 2, eta: float = 0.0):
    """Multistep DPM-Solver++ (Lu et al. 2022, "DPM-Solver++", Algorithm 2 and its 3rd-order and SDE forms).

    In this scaling lambda = -log(sigma) and h = lambda_next - lambda. Past x0_hat values give
    divided differences D1, D2 (in units of h); the update integrates the exponential exactly:
        x' = (s'/s) e^{-eta h} x + (1 - e^{-(1 + eta) h}) (D0 + D1 / 2)  [+ s' sqrt(1 - e^{-2 eta h}) z]
    eta = 0 is the ODE solver (2M, 3M), eta = 1 the SDE solver (2M SDE). The order rises from 1
    as history builds up; the step to sigma = 0 is first order, and with fewer than 15 steps
    the one before it is at most second order (as in diffusers), which keeps few-step sampling stable.
    """
    if order not in (1, 2, 3) or (order == 3 and eta != 0):
        raise UserError("DPM-Solver++ supports order 1, 2 or 3 (order 3 only with eta = 0)")
    steps = len(sigmas) - 1
    history: list[tuple[torch.Tensor, torch.Tensor]] = []  # (lambda, x0_hat), newest last
    for i in range(steps):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        x0 = denoiser(x, sigma, cond)
        lam = -sigma.log()
        history = (history + [(lam, x0)])[-order:]
        if sigma_next == 0:
            x = x0
        else:
            use = min(order, len(history), 2 if (i == steps - 2 and steps < 15) else order)
            h = -sigma_next.log() - lam
            phi = -torch.expm1(-(1 + eta) * h)  # 1 - e^{-(1+eta) h}
            x = ((sigma_next / sigma) * torch.exp(-eta * h)).to(x.dtype) * x + phi.to(x.dtype) * _dpmpp_data_term(history[-use:], h, phi)
            if eta > 0:
                x = x + (sigma_next * (-torch.expm1(-2 * eta * h)).sqrt()).to(x.dtype) * _noise_like(x, generator)
        report(callback, i, sigmas, x, x0)
    return x


def sample_dpmpp_2m(denoiser, x, sigmas, cond=None, generator=None, callback=None):
    return sample_dpmpp(denoiser, x, sigmas, cond, generator, callback, order=2, eta=0.0)


def sample_dpmpp_2m_sde(denoiser, x, sigmas, cond=None, generator=None, callback=None, eta: float = 1.0):
    return sample_dpmpp(denoiser, x, sigmas, cond, generator, callback, order=2, eta=eta)


def sample_dpmpp_3m(denoiser, x, sigmas, cond=None, generator=None, callback=None):
    return sample_dpmpp(denoiser, x, sigmas, cond, generator, callback, order=3, eta=0.0)


def _unipc_coefficients(h: torch.Tensor, rks: torch.Tensor, order: int, variant: str):
    """(h phi_1, B(h), R, b) of UniPC's B(h) update in data prediction (Zhao et al. 2023, the bh1 / bh2
    choices of B(h)), computed as diffusers' UniPCMultistepScheduler does: hh = -h,
    h phi_1 = e^{hh} - 1, B(h) = hh (bh1) or e^{hh} - 1 (bh2), R[i] = rks^i, b[i] = h phi_{i+1} i! / B(h)."""
    hh = -h
    h_phi_1 = torch.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1
    b_h = hh if variant == "bh1" else torch.expm1(hh)
    rows, b, factorial = [], [], 1
    for i in range(1, order + 1):
        rows.append(rks ** (i - 1))
        b.append(h_phi_k * factorial / b_h)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    return h_phi_1, b_h, torch.stack(rows), torch.stack(b)


def _unipc_update(x, sigma, sigma_next, history, order: int, variant: str, x0_next=None):
    """One UniP-p step from (sigma, x) to sigma_next using the newest `order` (lambda, x0_hat) pairs of
    `history` (the newest at sigma); with x0_next (the model output at sigma_next, already computed for
    the next step) it is the corrector UniC-p instead, which makes the step one order higher for free.
    In this scaling x' = (s'/s) x - h phi_1 x0 - B(h) sum_k rho_k D1_k with D1_k = (x0_k - x0) / r_k."""
    lam, x0 = history[-1]
    h = -sigma_next.log() - lam  # inf at sigma_next = 0, where the step lands on x0 exactly
    past = history[-order:-1][::-1]  # older points, the nearest first
    rks = [((lam_k - lam) / h) for lam_k, _ in past] + [torch.ones((), dtype=h.dtype, device=h.device)]
    d1s = [(x0_k - x0) / rk.to(x0.dtype) for (_, x0_k), rk in zip(past, rks)]
    h_phi_1, b_h, rows, b = _unipc_coefficients(h, torch.stack(rks), order, variant)
    if x0_next is None:  # predictor: rho from R[:-1, :-1] rho = b[:-1] (order 2: rho = 1/2)
        rhos = [] if order == 1 else [0.5] if order == 2 else torch.linalg.solve(rows[:-1, :-1], b[:-1]).tolist()
        terms = list(zip(rhos, d1s))
    else:  # corrector: R rho = b over the older points and the new output (order 1: rho = 1/2)
        rhos = [0.5] if order == 1 else torch.linalg.solve(rows, b).tolist()
        terms = list(zip(rhos, [*d1s, x0_next - x0]))
    x = (sigma_next / sigma).to(x.dtype) * x - h_phi_1.to(x.dtype) * x0
    if terms:  # (skipped when empty: bh1's B(h) is infinite on the step to sigma = 0)
        x = x - b_h.to(x.dtype) * sum(rho * d for rho, d in terms)
    return x


@torch.no_grad()
def sample_unipc(denoiser, x, sigmas, cond=None, generator=None, callback=None, order: int = 2, variant: str = "bh2",
                 lower_order_final: bool = True):
    """UniPC (Zhao et al. 2023), multistep with data prediction, as diffusers' UniPCMultistepScheduler
    (predict_x0=True, solver_type bh1 / bh2). Each step first corrects the point it is at with UniC, using
    the network output just computed there (no extra call), then predicts the next one with UniP. The order
    rises from 1 as history builds up; with lower_order_final the last steps use at most the steps left."""
    if order not in (1, 2, 3) or variant not in ("bh1", "bh2"):
        raise UserError("UniPC supports order 1, 2 or 3 and variant bh1 or bh2")
    steps = len(sigmas) - 1
    history: list[tuple[torch.Tensor, torch.Tensor]] = []  # (lambda, x0_hat), newest last
    previous = None  # (the point before, its sigma, the order of the step that left it)
    for i in range(steps):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        x0 = denoiser(x, sigma, cond)
        if previous is not None:
            x = _unipc_update(previous[0], previous[1], sigma, history, previous[2], variant, x0_next=x0)
        history = (history + [(-sigma.log(), x0)])[-order:]
        this_order = min(order, steps - i, len(history)) if lower_order_final else min(order, len(history))
        previous = (x, sigma, this_order)
        x = _unipc_update(x, sigma, sigma_next, history, this_order, variant)
        report(callback, i, sigmas, x, x0)
    return x


def sample_unipc_bh1(denoiser, x, sigmas, cond=None, generator=None, callback=None):
    return sample_unipc(denoiser, x, sigmas, cond, generator, callback, variant="bh1")


@torch.no_grad()
def sample_consistency(denoiser, x, sigmas, cond=None, generator=None, callback=None):
    """Multistep consistency sampling (Song et al. 2023, Algorithm 1) over a consistency model D = f(x, sigma):
    x0 = f(x, sigma_i), then fresh noise up to the next level, x = x0 + sigma_{i+1} z (as diffusers'
    LCMScheduler). One step is the one-step generator; more steps trade calls for quality."""
    for i in range(len(sigmas) - 1):
        x0 = denoiser(x, sigmas[i], cond)
        x = x0 + sigmas[i + 1].to(x.dtype) * _noise_like(x, generator) if sigmas[i + 1] > 0 else x0
        report(callback, i, sigmas, x, x0)
    return x


def _flow_velocity(denoiser, x_t, sigma, t, cond):  # Heun's average is in flow time, so it steps x_t = x / (1 + sigma)
    """(v, x0_hat) at flow time t for x_t = (1 - t) x0 + t eps, i.e. x = x_t (1 + sigma): v = (x_t - x0_hat) / t."""
    x0 = denoiser(x_t * (1 + sigma).to(x_t.dtype), sigma, cond)
    return (x_t - x0) / t.to(x_t.dtype), x0


@torch.no_grad()
def sample_flow_heun(denoiser, x, sigmas, cond=None, generator=None, callback=None):
    """Heun in flow time t (diffusers' FlowMatchHeunDiscreteScheduler): the Euler step's end velocity
    averaged with its start velocity; the last step, to t = 0, stays Euler. 2 * steps - 1 network calls."""
    ts = sigma_to_t(sigmas)
    x_t = x / (1 + sigmas[0]).to(x.dtype)
    for i in range(len(sigmas) - 1):
        v, x0 = _flow_velocity(denoiser, x_t, sigmas[i], ts[i], cond)
        dt = (ts[i + 1] - ts[i]).to(x.dtype)
        x_euler = x_t + dt * v
        if sigmas[i + 1] == 0:
            x_t = x_euler
        else:
            v_next, _ = _flow_velocity(denoiser, x_euler, sigmas[i + 1], ts[i + 1], cond)
            x_t = x_t + dt * (v + v_next) / 2
        report(callback, i, sigmas, x_t * (1 + sigmas[i + 1]).to(x.dtype), x0)
    return x_t * (1 + sigmas[-1]).to(x.dtype)


SAMPLERS = {
    "ddpm": sample_ddpm,
    "ddim": sample_ddim,
    "euler": sample_euler,
    "euler_ancestral": sample_euler_ancestral,
    "heun": sample_heun,
    "dpmpp_2m": sample_dpmpp_2m,
    "dpmpp_2m_sde": sample_dpmpp_2m_sde,
    "dpmpp_3m": sample_dpmpp_3m,
    "unipc": sample_unipc,
    "unipc_bh1": sample_unipc_bh1,
    "consistency": sample_consistency,
    # Euler in flow time t (SD3, FLUX; diffusers' FlowMatchEulerDiscreteScheduler), x_t' = x_t + (t' - t) v, is this
    # same step in sigma: an Euler step of the probability-flow ODE does not depend on the scaling (tests/test_flow.py).
    "flow_euler": sample_euler,
    "flow_heun": sample_flow_heun,
}


# The options a sampler takes beyond the common signature, as Pipeline.sample passes them (tests/test_samplers.py
# holds this table to the functions' signatures).
SAMPLER_OPTIONS = {"ddpm": ("variance",), "ddim": ("eta",), "euler_ancestral": ("eta",), "dpmpp_2m_sde": ("eta",)}


def get_sampler(name: str):
    if name not in SAMPLERS:
        raise UserError(f"unknown sampler '{name}'; choose one of: {', '.join(SAMPLERS)}")
    return SAMPLERS[name]
