"""The distillation losses: what a few-step student is trained to match (the math of distill.py).

All in the samplers' scaling x = x0 + sigma * eps, over denoisers D(x, sigma, cond) -> x0_hat.

Progressive distillation (Salimans & Ho 2022, Algorithm 2): two DDIM steps of the teacher,
sigma -> sigma_mid -> sigma_next, land at x''. The student's one DDIM step
x0 + (sigma_next / sigma)(x - x0) lands there too exactly when its x0 is

    x~ = (x'' - (sigma_next / sigma) x) / (1 - sigma_next / sigma)

(their x~_t, written in this scaling: their z_t = alpha_t x). The student learns x~ with the
"truncated SNR" weight max(SNR, 1) on the x-space error (their sec. 4).

Consistency distillation (Song et al. 2023, Algorithm 2): one teacher ODE step (DDIM) from
sigma_{n+1} to sigma_n; the student's f(x_{n+1}, sigma_{n+1}) learns the target network's
f(x^_n, sigma_n), with f the consistency function of denoiser.ConsistencyDenoiser (LCM's boundary
scalings), so that a student initialised from the teacher starts as a one-step DDIM sampler. The distance is the pseudo-Huber
metric of Song & Dhariwal 2023 (iCT): sqrt(|a - b|^2 + c^2) - c, c = 0.00054 sqrt(d).

Guidance distillation (Meng et al. 2023, their stage one): a student that takes the guidance scale w as an
input learns the teacher's guided x0_hat, D_u + w (D_c - D_u), for w drawn from a range.
"""

from __future__ import annotations

import math

import torch

from diffusekit.errors import UserError
from diffusekit.sigmas import append_dims, ddim_step

CONSISTENCY_LOSSES = ("pseudo_huber", "l2")


@torch.no_grad()
def progressive_target(teacher, x: torch.Tensor, sigma: torch.Tensor, sigma_mid: torch.Tensor, sigma_next: torch.Tensor,
                       cond: dict | None = None) -> torch.Tensor:
    """x~ of Salimans & Ho's Algorithm 2: the x0 whose one DDIM step sigma -> sigma_next lands where two
    teacher DDIM steps (via sigma_mid) land. sigma, sigma_mid, sigma_next: [B], decreasing; sigma_next may be 0."""
    x_mid = ddim_step(x, teacher(x, sigma, cond), sigma, sigma_mid)
    x_next = ddim_step(x_mid, teacher(x_mid, sigma_mid, cond), sigma_mid, sigma_next)
    ratio = append_dims(sigma_next / sigma, x)
    return (x_next - ratio * x) / (1 - ratio)


def truncated_snr_weight(sigma: torch.Tensor) -> torch.Tensor:
    """max(SNR, 1) with SNR = 1 / sigma^2 (Salimans & Ho 2022, sec. 4): the x-space loss of an eps-MSE at
    low noise, and at least the plain x-space loss at high noise, where eps says nothing about x0."""
    return (1 / sigma.to(torch.float64) ** 2).clamp(min=1.0)


def x0_loss(student_x0: torch.Tensor, target: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The truncated-SNR weighted MSE between a student's x0_hat and its target, averaged over the batch."""
    per_sample = (student_x0.float() - target.float()).pow(2).flatten(1).mean(1)
    return (truncated_snr_weight(sigma).to(per_sample) * per_sample).mean()


def pseudo_huber(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample sqrt(|a - b|^2 + c^2) - c with c = 0.00054 sqrt(d) (iCT's choice for d = 3 x 32 x 32 and up)."""
    d = a[0].numel()
    c = 0.00054 * math.sqrt(d)
    return ((a.float() - b.float()).pow(2).flatten(1).sum(1) + c**2).sqrt() - c


def consistency_loss(student: torch.Tensor, target: torch.Tensor, metric: str = "pseudo_huber") -> torch.Tensor:
    """The distance between f_theta(x_{n+1}) and the target network's f(x^_n), averaged over the batch."""
    if metric == "pseudo_huber":
        return pseudo_huber(student, target).mean()
    if metric == "l2":
        return (student.float() - target.float()).pow(2).flatten(1).mean(1).mean()
    raise UserError(f"unknown consistency loss '{metric}'; use one of {', '.join(CONSISTENCY_LOSSES)}")
