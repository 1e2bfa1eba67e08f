"""One Pipeline.sample() call as the stages a reader can follow on one screen:

    plan = make_plan(pipe, request)                # settings -> sigmas -> conditions -> edit inputs; every check before any work
    for batch in plan.batches():
        x = start_latents(pipe, plan, batch)           # noise, or the init image noised to the strength's level
        denoiser, cond = compose_denoiser(pipe, plan, batch)  # ControlNets, guidance, inpainting: wrappers of D(x, sigma, cond)
        x = run_sampler(plan, denoiser, x, cond, batch, callback)  # the sampler (RePaint: its resampling loop around it)
        images = pipe.to_images(x)                     # decode

A new model family or conditioning (a ControlNet, another autoencoder) plugs into one stage.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from diffusekit.conditioning import conditions
from diffusekit.config import SampleConfig
from diffusekit.control import ControlNetDenoiser
from diffusekit.errors import UserError
from diffusekit.guidance import GuidedDenoiser
from diffusekit.inpaint import KnownRegionDenoiser, check_resampling, default_strength, noised_start, sample_resampled, strength_start
from diffusekit.models import image_shape
from diffusekit.samplers import get_sampler
from diffusekit.seeds import randn, sample_generators


@dataclass(frozen=True)
class SampleRequest:
    """What Pipeline.sample() was asked (None: the model's sample.* setting); see its docstring."""

    n: int = 16
    steps: int | None = None
    sampler: str | None = None
    spacing: str | None = None
    seed: int | None = None
    labels: object = None
    prompts: object = None
    negative: str | None = None
    guidance: float | None = None
    guidance_rescale: float | None = None
    eta: float | None = None
    variance: str | None = None
    batch_size: int | None = None
    size: int | None = None
    noise: torch.Tensor | None = None
    image: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    strength: float | None = None
    jump_length: int = 10
    jump_n_sample: int = 1
    first_index: int = 0
    control_image: object = None  # ControlNets' control images and settings (pipeline_controlnet.py)
    control: dict | None = None  # {"controlnet_conditioning_scale": ..., "control_guidance_start": ..., "control_guidance_end": ...}


@dataclass(frozen=True)
class Batch:
    """Images start .. start + count - 1 of a call, with their per-image generators."""

    start: int
    count: int
    generators: list

    @property
    def part(self) -> slice:
        return slice(self.start, self.start + self.count)


@dataclass(frozen=True)
class SamplingPlan:
    """Everything one call will do, checked: the settings, the sampler and its options, the sigmas it walks,
    the conditions and guidance, an edit's known image and mask."""

    request: SampleRequest
    settings: SampleConfig
    options: dict
    sigmas: torch.Tensor
    shape: tuple
    cond: dict | None
    uncond: dict | None
    scale: float  # classifier-free guidance (1: none)
    guidance_input: bool  # a guidance-distilled student takes the scale as an input: one call per step
    known: torch.Tensor | None
    mask: torch.Tensor | None
    strength: float
    controls: tuple = ()  # control.Control's: the ControlNets at work, their images and settings

    def batches(self):
        r, size = self.request, self.settings.batch_size
        for start in range(0, r.n, size):
            count = min(size, r.n - start)
            yield Batch(start, count, sample_generators(self.settings.seed, count, r.first_index + start))

    @property
    def network_batch(self) -> int:
        """The batch one network call sees: classifier-free guidance doubles it."""
        return min(self.settings.batch_size, self.request.n) * (2 if self.scale != 1.0 and not self.guidance_input else 1)

    @property
    def walks(self) -> int:
        return (len(self.sigmas) - 1) * self.request.jump_n_sample


def make_plan(pipe, r: SampleRequest) -> SamplingPlan:
    """settings -> sigmas -> conditions -> edit inputs, each checked before any work (UserError naming the fix)."""
    settings = pipe.settings(n=r.n, steps=r.steps, sampler=r.sampler, spacing=r.spacing, seed=r.seed, guidance=r.guidance,
                             guidance_rescale=r.guidance_rescale, eta=r.eta, variance=r.variance, batch_size=r.batch_size)
    options = pipe.sampler_options(settings, r.eta, r.variance)
    if r.size is not None:
        pipe.check_size(r.size, settings, f"size={r.size!r}")
    sigmas = pipe.sigmas(settings.steps, settings.spacing, r.size).to(pipe.device)
    if not isinstance(r.first_index, int) or r.first_index < 0:
        raise UserError(f"the first image index must be a whole number >= 0, got {r.first_index!r}")
    cond, uncond = conditions(pipe.config, pipe.text_encoder, pipe.device, r.n, r.labels, r.prompts, r.negative)
    if uncond is None and r.guidance not in (None, 1.0):  # unconditional samples: nothing to guide towards
        raise UserError("classifier-free guidance needs a condition: give a --label or a prompt")
    scale = settings.guidance if uncond is not None else 1.0
    guidance_input = pipe.check_student(settings, scale, r.negative)
    shape = image_shape(pipe.config, r.size)
    if r.noise is not None and tuple(r.noise.shape) != (r.n, *shape):
        raise UserError(f"noise has shape {list(r.noise.shape)}, but {r.n} samples need {[r.n, *shape]}")
    if r.image is None and (r.strength is not None or r.mask is not None):
        raise UserError("strength and a mask need an init image (image=...)")
    check_resampling(r.jump_length, r.jump_n_sample)
    known, mask = pipe.edit_inputs(r.image, r.mask, r.n, shape)
    strength = default_strength(r.strength, mask is not None)
    if r.image is not None:
        sigmas = sigmas[strength_start(settings.steps, strength):]
    controls = pipe.control_inputs(r.control_image, r.control or {}, r.n, shape)
    return SamplingPlan(r, settings, options, sigmas, shape, cond, uncond, scale, guidance_input, known, mask, strength, controls)


def one_or_each(tensor: torch.Tensor | None, batch: Batch) -> torch.Tensor | None:
    """A tensor given once for every image ([1, ...]) or per image ([n, ...]), for this batch."""
    return None if tensor is None else tensor[batch.part] if len(tensor) > 1 else tensor


def start_latents(pipe, plan: SamplingPlan, batch: Batch) -> torch.Tensor:
    """x at sigmas[0]: seeded noise (or the given noise) on the process's scale, or for an edit the init image noised to that level."""
    noise = plan.request.noise
    eps = randn((batch.count, *plan.shape), generator=batch.generators, device=pipe.device) if noise is None else noise[batch.part].to(pipe.device)
    pure = 1 / pipe.schedule.coefficients(plan.sigmas[:1])[0].float()  # pure noise on the process's scale, as x at sigmas[0]
    known = one_or_each(plan.known, batch)
    return eps * pure if known is None else noised_start(known, eps, plan.sigmas, plan.strength, pure)


def compose_denoiser(pipe, plan: SamplingPlan, batch: Batch):
    """(the denoiser this batch samples, its condition): the model's D wrapped in ControlNets, guidance and inpainting as asked."""
    cond = {k: v[batch.part] for k, v in plan.cond.items()} if plan.cond else None
    denoiser = pipe.denoiser
    if plan.controls:  # innermost: under guidance both halves of the batch get the control image
        denoiser = ControlNetDenoiser(denoiser, [replace(c, image=one_or_each(c.image, batch)) for c in plan.controls], plan.sigmas)
    if plan.guidance_input and cond is not None:  # the guidance scale is an input: one call per step
        cond["guidance"] = torch.full((batch.count,), float(plan.scale), device=pipe.device)
    elif plan.scale != 1.0:
        uncond = {k: v[batch.part] for k, v in plan.uncond.items()}
        denoiser = GuidedDenoiser(denoiser, uncond, plan.scale, plan.settings.guidance_rescale)
    if plan.mask is not None:
        denoiser = KnownRegionDenoiser(denoiser, one_or_each(plan.known, batch), one_or_each(plan.mask, batch))
    return denoiser, cond


def run_sampler(plan: SamplingPlan, denoiser, x: torch.Tensor, cond: dict | None, batch: Batch, callback=None) -> torch.Tensor:
    """The sampler down the plan's sigmas; with jump_n_sample > 1, RePaint's resampling loop around it (inpaint.py)."""
    sample_fn, r = get_sampler(plan.settings.sampler), plan.request
    if r.jump_n_sample == 1:
        return sample_fn(denoiser, x, plan.sigmas, cond=cond, generator=batch.generators, callback=callback, **plan.options)
    return sample_resampled(sample_fn, denoiser, x, plan.sigmas, cond=cond, generator=batch.generators, callback=callback,
                            jump_length=r.jump_length, jump_n_sample=r.jump_n_sample, **plan.options)
