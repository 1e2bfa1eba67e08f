"""ControlNets as a wrapper of the denoiser: D_c(x, sigma, cond) = D(x, sigma, cond + the ControlNets' residuals).

Each ControlNet sees what the U-Net sees (x_t, its time t, the text or class condition) and its control image, and
gives residuals for the U-Net's skips and mid block; those of several ControlNets are summed (diffusers'
MultiControlNetModel). Each has a scale and a [start, end) fraction of the steps it acts in, as diffusers'
controlnet_conditioning_scale and control_guidance_start / end: at step i of N it acts unless
i / N < start or (i + 1) / N > end. Under classifier-free guidance this wrapper sits inside GuidedDenoiser, so
both halves of the batch get the control image (diffusers without guess mode).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from diffusekit.denoiser import Denoiser, cast_floats, network_dtype


@dataclass(frozen=True)
class Control:
    """One ControlNet at work: net(x_t, t, control, scale, **cond) -> (down residuals, mid residual); its control
    image [1 or B, C, H, W] in [0, 1] (the ControlNet's input range); its scale and its fraction of the steps."""

    net: torch.nn.Module
    image: torch.Tensor
    scale: float = 1.0
    start: float = 0.0
    end: float = 1.0

    def acts_at(self, step: int, steps: int) -> bool:
        return not (step / steps < self.start or (step + 1) / steps > self.end)


def step_of(sigma: float, sigmas: torch.Tensor) -> int:
    """The step of the walk down `sigmas` that a call at `sigma` belongs to (a sampler's intermediate calls count to the
    step whose noise level they are at or below)."""
    return int((sigmas[:-1] > sigma * (1 + 1e-6)).sum())


def batch_of(image: torch.Tensor, size: int) -> torch.Tensor:
    """A control image for a network batch of `size`: one image for all, or one per sample repeated over guidance's halves."""
    return image.expand(size, *image.shape[1:]) if len(image) == 1 else image.repeat(size // len(image), 1, 1, 1)


class ControlNetDenoiser:
    """D(x, sigma, cond) with the residuals of the ControlNets acting at this step added to the condition."""

    def __init__(self, denoiser: Denoiser, controls: list[Control], sigmas: torch.Tensor):
        self.denoiser, self.controls, self.sigmas = denoiser, controls, sigmas.double().cpu()

    def residuals(self, x: torch.Tensor, sigma: torch.Tensor, cond: dict | None) -> dict:
        """{"down_block_additional_residuals": [...], "mid_block_additional_residual": ...}, summed over the acting ControlNets."""
        step, steps = step_of(float(sigma.reshape(-1)[0]), self.sigmas), len(self.sigmas) - 1
        acting = [c for c in self.controls if c.acts_at(step, steps)]
        if not acting:
            return {}
        x_t, t, _, _ = self.denoiser.network_inputs(x, sigma)
        down, mid = None, None
        for control in acting:
            dtype = network_dtype(control.net)
            image = batch_of(control.image.to(x.device, dtype), len(x))
            d, m = control.net(x_t.to(dtype), t, image, control.scale, **cast_floats(cond, dtype))
            down = d if down is None else [a + b for a, b in zip(down, d)]
            mid = m if mid is None else mid + m
        dtype = network_dtype(self.denoiser.net)
        return {"down_block_additional_residuals": [d.to(dtype) for d in down], "mid_block_additional_residual": mid.to(dtype)}

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond: dict | None = None) -> torch.Tensor:
        return self.denoiser(x, sigma, {**(cond or {}), **self.residuals(x, sigma, cond)})
