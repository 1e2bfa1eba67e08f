"""From a checkpoint to images: one object for the CLI and the Python API.

    pipe = Pipeline.from_pretrained("runs/mnist")          # a run or a checkpoint folder
    images = pipe(n=16, steps=50, sampler="ddim", seed=0)  # list of PIL images
    x = pipe.sample(n=16)                                  # tensor [16, C, H, W] in [-1, 1]

    pipe = Pipeline.from_pretrained("runs/emoji-ldm")      # text-to-image
    images = pipe("a red apple", n=4, steps=20, guidance=4, negative="blurry")
    images = pipe("a green apple", image=init, strength=0.6)                 # image-to-image (SDEdit)
    images = pipe("a green apple", image=init, mask_image=mask, mask_blur=1)  # inpainting (white: repaint)

    name = pipe.load_lora("style.safetensors", scale=0.8)  # a LoRA (diffusers / peft or kohya layout)
    pipe.set_lora_scales({name: 0.5}); pipe.unload_lora()  # the base model's weights are never changed
"""

from __future__ import annotations

import functools
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from diffusekit.compiled import compile_network
from diffusekit.config import Config, SampleConfig
from diffusekit.config_checks import check_image_size, check_sample
from diffusekit.denoiser import ConsistencyDenoiser, Denoiser, network_dtype
from diffusekit.devices import pick_device, prepare_module, use_all_cores
from diffusekit.errors import UserError, warn
from diffusekit.image_info import ImageOutput, describe, fingerprint, model_name, with_fused_loras
from diffusekit.io import diffusers, single_file
from diffusekit.io.checkpoint import load_parts
from diffusekit.layout import apply_layout, choose_layout
from diffusekit.models import ModelParts, example_inputs, image_shape, size_multiple
from diffusekit.nn.lora import fused_digests
from diffusekit.nn.state import weights_fingerprint
from diffusekit.nn.vae import AutoencoderKL
from diffusekit.pipeline_controlnet import ControlNetMethods, check_control_names
from diffusekit.pipeline_lora import LoRAMethods
from diffusekit.precision import dtype_name, resolve_dtype
from diffusekit.samplers import SAMPLER_OPTIONS
from diffusekit.sampling import SampleRequest, compose_denoiser, make_plan, run_sampler, start_latents
from diffusekit.schedule import make_schedule

LARGE_IMAGE_PIXELS = 256 * 256  # from this size on, the VAE decodes one image at a time


def load_model(path: str | Path, weights: str = "ema", config: str | Path | None = None, overrides=()) -> ModelParts:
    """The networks of a diffusekit run or checkpoint folder (EMA weights unless weights="model"), of a diffusers folder or of
    a Stable Diffusion single file (config: a diffusers folder's configs for it; overrides: --set strings), on the CPU."""
    if single_file.is_single_file(path):
        return single_file.read_single_file(path, config, overrides)
    if config is not None or overrides:
        raise UserError(f"--config and --set apply to single-file checkpoints (.safetensors / .ckpt) only, and '{path}' is a folder; leave them out")
    if diffusers.is_diffusers_folder(path):  # a Stable Diffusion / diffusers folder (model_index.json or a UNet config.json)
        if weights != "ema":
            raise UserError(f"'{path}' is a diffusers folder: it has one set of weights, so --weights {weights} does not apply")
        return diffusers.read_parts(path)
    return load_parts(path, weights)


class Pipeline(LoRAMethods, ControlNetMethods):
    """Samples of a diffusion model; for a latent model `vae` decodes the sampled latents."""

    def __init__(self, config: Config, net: torch.nn.Module, device: torch.device | str = "cpu", checkpoint: Path | None = None,
                 step: int | None = None, vae: AutoencoderKL | None = None, text_encoder=None, dtype="fp32", compile: bool = False):
        """dtype: what the denoising network computes in, a torch dtype or auto / fp32 / bf16 / fp16 (precision.py;
        the network is converted in place; the samplers, the text encoder and the VAE stay float32).
        compile: torch.compile the network (compiled.py: a warning and eager mode where that fails)."""
        self.config, self.device = config, torch.device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.net, self.vae = net.eval(), vae.eval() if vae is not None else None
        if network_dtype(net) != self.dtype:
            self.stored_fingerprints  # taken from the weights as stored, before the cast changes their values
            self.net = net.to(self.dtype)
        self.sampling_net = compile_network(self.net) if compile else self.net
        self.text_encoder = text_encoder
        self.schedule = make_schedule(config.diffusion)
        self.denoiser = self.make_denoiser()
        self.checkpoint, self.step = checkpoint, step
        self.layouts: dict[tuple, str] = {}  # (batch, size, device) -> the network's memory layout for it (use_fastest_layout)
        self.layout_now: str | None = None  # the layout the network is in (None: as placed)
        self.name = model_name(checkpoint)
        self.controlnets: dict = {}  # name -> (ControlNet, its hash), in the order they steer (pipeline_controlnet.py)

    def make_denoiser(self):
        """D(x, sigma, cond) over the (compiled) network; a consistency student's x0_hat is its consistency function."""
        denoiser = Denoiser(self.sampling_net, self.schedule, self.config.diffusion.prediction)
        return ConsistencyDenoiser(denoiser, self.schedule) if self.config.distill.method == "consistency" else denoiser

    @functools.cached_property
    def stored_fingerprints(self) -> dict[str, str]:
        """{"model": the short Model hash of the U-Net and VAE, "unet": the U-Net's full weights_fingerprint}, of the
        weights as stored (float32 view): taken before a cast to bf16 or a LoRA fuse changes them, so the same model
        has the same identity at any precision, in any memory layout, on any CPU."""
        return {"model": fingerprint(self.net, self.vae), "unet": weights_fingerprint(self.net)}

    @functools.cached_property
    def fingerprint(self) -> str:
        """The "Model hash" images record: the stored model's, joined with the LoRAs fused into it (image_info)."""
        fused = [digest for net in self.lora_networks() for digest in fused_digests(net)]
        return with_fused_loras(self.stored_fingerprints["model"], fused)

    @classmethod
    def from_pretrained(cls, path: str | Path, weights: str = "ema", device: str = "auto", dtype="fp32", torch_dtype=None,
                        compile: bool = False, controlnet=None, config: str | Path | None = None, overrides=()) -> "Pipeline":
        """A diffusekit run or checkpoint folder (EMA weights unless weights="model"), or a diffusers folder.
        dtype (or diffusers' name torch_dtype): "auto" picks bf16 where the hardware has it natively.
        controlnet: ControlNet folder(s) to load (a ControlNet pipeline folder's controlnet/ is loaded by default)."""
        use_all_cores()
        pipe = cls.from_parts(load_model(path, weights, config, overrides), device, dtype=torch_dtype if torch_dtype is not None else dtype, compile=compile)
        return pipe.load_controlnets(path, controlnet)

    @classmethod
    def from_single_file(cls, path: str | Path, config: str | Path | None = None, device: str = "auto", dtype="fp32", overrides=()) -> "Pipeline":
        """An SD 1.x / 2.x .safetensors / .ckpt file; config: a diffusers folder's configs for it (io/single_file.py)."""
        if not single_file.is_single_file(path):
            raise UserError(f"'{path}' is not a .safetensors or .ckpt file; give a Stable Diffusion single file")
        return cls.from_pretrained(path, device=device, dtype=dtype, config=config, overrides=overrides)

    @classmethod
    def from_parts(cls, parts: ModelParts, device: str = "auto", dtype="fp32", compile: bool = False) -> "Pipeline":
        dev = pick_device(device, option="--device ")
        vae = prepare_module(parts.vae, dev) if parts.vae is not None else None
        text_encoder = parts.text_encoder.to(dev) if parts.text_encoder is not None else None
        return cls(parts.config, prepare_module(parts.net, dev), dev, checkpoint=parts.source, step=parts.step, vae=vae,
                   text_encoder=text_encoder, dtype=dtype, compile=compile)

    @property
    def precision(self) -> str:
        """fp32 / bf16 / fp16: what the denoising network computes in."""
        return dtype_name(self.dtype)

    def to(self, device: torch.device | str) -> "Pipeline":
        """Move the networks (U-Net, VAE, text encoder) to `device`, as pipe.to("cuda") in diffusers."""
        self.device = pick_device(str(device), option="--device ")
        self.net, self.layout_now = prepare_module(self.net, self.device), None
        if self.sampling_net is not self.net:  # compiled for the old device: compile again
            self.sampling_net = compile_network(self.net)
        self.denoiser = self.make_denoiser()
        if self.vae is not None:
            self.vae = prepare_module(self.vae, self.device)
        if self.text_encoder is not None:
            self.text_encoder = self.text_encoder.to(self.device)
        self.controlnets = {name: (net.to(self.device), hash_) for name, (net, hash_) in self.controlnets.items()}
        return self

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        """Scaled latents -> images in [-1, 1] (z = latent / scale + shift, then the decoder).
        Large images are decoded one at a time: a 512 px decode alone takes about a GB of activations."""
        vae = self.vae
        pixels = latents.shape[-2] * latents.shape[-1] * vae.downsample_factor**2
        slice_size = 1 if pixels >= LARGE_IMAGE_PIXELS else 0
        parts = [vae.decode(vae.unscale_latents(part.to(self.device)), slice_size).clamp(-1, 1).cpu() for part in latents.split(batch_size)]
        return torch.cat(parts)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] -> the scaled latents the U-Net denoises (the posterior mean: no sampling noise)."""
        return self.vae.scale_latents(self.vae.encode(images.to(self.device)).mode())

    def preview(self, info: dict, count: int | None = None, noisy: bool = False) -> torch.Tensor:
        """A sampler callback's step as images [count, C, H, W] in [-1, 1] on the CPU: x0_hat (decoded for a latent
        model), or with noisy=True for a pixel model the current x on the DDPM scale (the reverse process itself)."""
        if noisy and self.vae is None:
            alpha, _ = self.schedule.coefficients(info["sigma_next"])
            return (info["x"][:count] * alpha.float().to(info["x"].device)).clamp(-1, 1).cpu()
        x0 = info["denoised"][:count]
        return self.decode(x0) if self.vae is not None else x0.clamp(-1, 1).cpu()

    def settings(self, **given) -> SampleConfig:
        """The model's sample config with the values given here (None: the model's own), checked."""
        return check_sample(replace(self.config.sample, **{k: v for k, v in given.items() if v is not None}), self.schedule.num_timesteps)

    def sigmas(self, steps: int | None = None, spacing: str | None = None, size: int | None = None) -> torch.Tensor:
        """The steps + 1 noise levels a sampler walks down (the model's sample.steps / spacing by default); for
        another image size than the training one, a flow model's time shift scales with it (SD3 eq. 23)."""
        settings = self.settings(steps=steps, spacing=spacing)
        schedule = self.schedule if size is None else self.schedule.resized(size / self.config.data.image_size)
        return schedule.sampling_sigmas(settings.steps, settings.spacing, steps_offset=settings.steps_offset)

    def sampler_options(self, settings: SampleConfig, eta: float | None, variance: str | None) -> dict:
        """The keyword options of the chosen sampler: eta (given, or sample.eta for DDIM) and DDPM's variance."""
        accepted = SAMPLER_OPTIONS.get(settings.sampler, ())
        for name, value in (("eta", eta), ("variance", variance)):
            if value is not None and name not in accepted:
                raise UserError(f"the {settings.sampler} sampler has no option '{name}'; drop it or pick a sampler that takes it")
        options = {"eta": settings.eta} if eta is not None or settings.sampler == "ddim" else {}
        return {**options, "variance": settings.variance} if "variance" in accepted else options

    def check_student(self, settings: SampleConfig, scale: float, negative: str | None) -> bool:
        """For a distilled student: warn (once per call) when the sampling ignores the schedule it was distilled for,
        refuse what a guidance-distilled student cannot do; whether it takes the guidance scale as an input."""
        d, guided = self.config.distill, bool(self.config.model.guidance_embedding)
        if guided and (negative or settings.guidance_rescale > 0):
            raise UserError(f"this student learned guidance against the {'null class' if self.config.model.num_classes else 'empty prompt'} "
                            "(guidance distillation), so it takes no negative prompt or guidance rescale; sample its teacher "
                            f"('{d.teacher}') for those")
        if guided and not d.guidance_min <= scale <= d.guidance_max and scale != 1.0:
            warn(f"guidance {scale:g} is outside the scales {d.guidance_min:g} to {d.guidance_max:g} this student learned; expect worse images")
        if d.method == "progressive":
            n = d.trained_steps or d.steps
            trained = self.schedule.sampling_sigmas(n, "trailing")
            used = self.schedule.sampling_sigmas(settings.steps, settings.spacing, steps_offset=settings.steps_offset)
            if settings.sampler not in ("ddim", "euler") or settings.eta != 0 or not torch.equal(trained, used):
                warn(f"this progressive student was distilled for DDIM at its {n} trailing timesteps (--sampler ddim --steps {n}); "
                     f"{settings.sampler} with {settings.steps} {settings.spacing} steps ignores that schedule, expect worse images")
        elif d.method == "consistency" and settings.sampler != "consistency":
            warn(f"this consistency student samples with --sampler consistency (1 to {d.solver_steps} steps); {settings.sampler} ignores "
                 "how it was distilled, expect worse images")
        return guided

    @torch.no_grad()
    def sample(
        self,
        n: int = 16,
        steps: int | None = None,
        sampler: str | None = None,
        spacing: str | None = None,
        seed: int | None = None,
        labels=None,
        prompts=None,
        negative: str | None = None,
        guidance: float | None = None,
        guidance_rescale: float | None = None,
        eta: float | None = None,
        variance: str | None = None,
        batch_size: int | None = None,
        size: int | None = None,
        noise: torch.Tensor | None = None,
        callback=None,
        progress: bool = False,
        image: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        strength: float | None = None,
        jump_length: int = 10,
        jump_n_sample: int = 1,
        first_index: int = 0,
        attention=None,
        control_image=None,
        **control,
    ) -> torch.Tensor:
        """n images as a tensor in [-1, 1] (a latent model's samples decoded). Image i depends only on (seed, i), not on batch_size.

        steps, sampler, spacing, seed, guidance, guidance_rescale, eta, variance and batch_size replace the
        model's sample.* settings for this call (None keeps them). labels: class label(s) of a class-conditional
        model; prompts: text(s) of a text-to-image model (both repeated to n); negative: the prompt guidance
        steers away from (default ""). size: another image size than the training one (a flow model's time
        shift grows with it, SD3 eq. 23). noise: the initial
        noise [n, *shape] (standard normal, as diffusers' `latents`) instead of the seeded draw.
        callback(info) sees each batch after every step: the sampler's info (samplers.py) plus "start",
        the index of the batch's first image.

        image-to-image (SDEdit) and inpainting (inpaint.py): image [1 or n, C, H, W] in [-1, 1] at the output size,
        mask [1 or n, 1, H, W] in [0, 1] (1: repaint), strength in (0, 1] (default 0.8, or 1 with a mask: how much
        of the schedule is walked); jump_n_sample > 1 resamples every jump_length steps (RePaint).
        first_index: the index of the first image in the seed's stream, so that image i of a seed can be made alone.
        attention: an attention_maps.AttentionCollector that records each batch's cross-attention maps (DAAM).
        control_image (a picture or [1 or n, 3, H, W] in [-1, 1]; a list: one per loaded ControlNet) with control settings
        controlnet_conditioning_scale, control_guidance_start, control_guidance_end (diffusers' names; pipeline_controlnet.py).
        """
        request = SampleRequest(n, steps, sampler, spacing, seed, labels, prompts, negative, guidance, guidance_rescale, eta, variance,
                                batch_size, size, noise, image, mask, strength, jump_length, jump_n_sample, first_index, control_image,
                                check_control_names(control))
        plan = make_plan(self, request)  # the stages: sampling.py
        self.use_fastest_layout(plan.network_batch, size)
        bar = tqdm(total=n * plan.walks, desc=f"sampling ({plan.settings.sampler}, {plan.walks} steps)", unit="step", disable=not progress, leave=False)
        out = []
        for batch in plan.batches():

            def on_step(info, batch=batch):
                bar.update(batch.count)
                if callback is not None:
                    callback({**info, "start": batch.start})

            x = start_latents(self, plan, batch)
            denoiser, cond = compose_denoiser(self, plan, batch)
            with attention.recording(self, plan, batch) if attention is not None else nullcontext():
                x = run_sampler(plan, denoiser, x, cond, batch, on_step)
            out.append(self.decode(x) if self.vae is not None else x.clamp(-1, 1).cpu())
        bar.close()
        return torch.cat(out)

    def check_size(self, size, settings: SampleConfig, what: str) -> int:
        """An image size asked for (size=, --size, a PNG's Size), checked against the model's sizes and this machine's
        memory for settings.n images, settings.batch_size at a time (config_checks.check_image_size), before any work."""
        return check_image_size(self.config, size, size_multiple(self.config), what, settings.n, settings.batch_size)

    def use_fastest_layout(self, batch: int, size: int | None) -> None:
        """Put the network in the memory layout it runs fastest in for this batch shape on this CPU (layout.py:
        measured on first use, then cached); a compiled network keeps the layout it was compiled in."""
        if self.sampling_net is not self.net:
            return
        key = (batch, size, self.device.type)
        if key not in self.layouts:
            self.layouts[key] = choose_layout(self.net, example_inputs(self.config, batch, self.device, size))
            self.layout_now = self.layouts[key]  # choose_layout leaves the network in it
        if self.layout_now != self.layouts[key]:  # converting every weight again on each call would cost time for nothing
            self.layout_now = self.layouts[key]
            apply_layout(self.net, self.layout_now)

    def edit_inputs(self, image, mask, n: int, shape) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(x0 of the init image [1 or n, *shape], the mask at the U-Net's resolution [1 or n, 1, h, w]) of an edit.
        A latent cell is repainted as much as the most repainted pixel it covers (max-pooling the mask)."""
        if image is None:
            return None, None
        size, channels = shape[-1] * (self.vae.downsample_factor if self.vae is not None else 1), self.config.data.channels
        if not isinstance(image, torch.Tensor) or image.ndim != 4 or image.shape[0] not in (1, n) or tuple(image.shape[1:]) != (channels, size, size):
            got = list(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
            raise UserError(f"the init image is {got}, but this call makes images of [1 or {n}, {channels}, {size}, {size}] in [-1, 1]")
        known = self.encode(image) if self.vae is not None else image.to(self.device).float()
        if mask is None:
            return known, None
        if not isinstance(mask, torch.Tensor) or mask.ndim != 4 or mask.shape[0] not in (1, n) or tuple(mask.shape[1:]) != (1, size, size):
            got = list(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise UserError(f"the mask is {got}, but it must be [1 or {n}, 1, {size}, {size}] in [0, 1] (1: repaint), the init image's size")
        mask = mask.to(self.device).float().clamp(0, 1)
        return known, F.adaptive_max_pool2d(mask, shape[-2:]) if self.vae is not None else mask

    def __call__(self, prompt=None, n: int | None = None, *, num_images_per_prompt: int | None = None, height: int | None = None,
                 width: int | None = None, generator: torch.Generator | None = None, image=None, mask_image=None, mask_blur: float = 0.0,
                 return_attention: bool = False, **kwargs) -> "ImageOutput":
        """PIL images: pipe("a red apple", n=4, steps=20, guidance=4) for a text-to-image model,
        pipe(n=16) for an unconditional one (labels=... for a class-conditional one).

        n defaults to 4 for one prompt or none, else one image per prompt. diffusers' names work too:
        num_inference_steps, guidance_scale, negative_prompt, latents, num_images_per_prompt
        (each prompt's images next to each other), height and width (equal: the images are square),
        and generator, which draws the initial noise (the per-step noise of stochastic samplers
        still comes from `seed`). image (a PIL image, cropped and resized to the output size) and
        mask_image (white: repaint; blurred by mask_blur pixels) edit an image (sample()'s strength, ...).
        Returns an ImageOutput: a list of PIL images with `.images` and each image's `.parameters`; with
        return_attention=True its `.attention` holds each token's cross-attention maps (attention_maps.AttentionMaps)."""
        from diffusekit.attention_maps import AttentionCollector
        from diffusekit.images import image_tensor, make_grid, mask_tensor, to_pil

        kwargs = rename_diffusers_arguments(kwargs)
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if num_images_per_prompt is not None:
            if n is not None:
                raise UserError("give n or num_images_per_prompt, not both")
            prompts = [p for p in prompts for _ in range(num_images_per_prompt)] if prompts else None
            n = len(prompts) if prompts else num_images_per_prompt
        elif n is None:
            n = len(prompts) if prompts and len(prompts) > 1 else 4
        if height is not None or width is not None:
            if kwargs.get("size") is not None or (height and width and height != width):
                raise UserError(f"height {height} and width {width}: diffusekit makes square images, so give equal values (or size=)")
            kwargs["size"] = height or width
        if generator is not None and kwargs.get("noise") is None:
            shape = (n, *image_shape(self.config, kwargs.get("size")))
            kwargs["noise"] = torch.randn(shape, generator=generator, device=generator.device)
        size, channels = kwargs.get("size") or self.config.data.image_size, self.config.data.channels
        if mask_image is not None and not isinstance(mask_image, torch.Tensor):
            if image is None or isinstance(image, torch.Tensor):
                raise UserError("mask_image as a picture needs image= as a picture too (the mask is cropped and resized as the image is)")
            kwargs["mask"] = mask_tensor(mask_image, image, size, mask_blur)
        elif mask_image is not None:
            kwargs["mask"] = mask_image
        if image is not None:
            kwargs["image"] = image if isinstance(image, torch.Tensor) else image_tensor(image, size, channels)
        attention = AttentionCollector(self, prompts) if return_attention else None
        images = self.sample(n, prompts=prompts, attention=attention, **kwargs)
        texts = describe(self, n, prompts=prompts, edit=image is not None, masked=mask_image is not None, mask_blur=mask_blur, **kwargs)
        pictures = [to_pil(make_grid(img[None], ncols=1, padding=0)) for img in images]
        for picture, text in zip(pictures, texts):
            picture.info["parameters"] = text
        return ImageOutput(pictures, texts, attention.result() if attention is not None else None)


# diffusers' StableDiffusionPipeline names for arguments Pipeline.sample takes under its own names
DIFFUSERS_NAMES = {"num_inference_steps": "steps", "guidance_scale": "guidance", "negative_prompt": "negative", "latents": "noise"}


def rename_diffusers_arguments(kwargs: dict) -> dict:
    renamed = dict(kwargs)
    for theirs, ours in DIFFUSERS_NAMES.items():
        if theirs in renamed:
            if ours in renamed:
                raise UserError(f"give {theirs} or {ours}, not both (they are the same thing)")
            renamed[ours] = renamed.pop(theirs)
    return renamed
