"""From a checkpoint to images: one object for the CLI and the Python API.

    pipe = Pipeline.from_pretrained("runs/mnist")          # a run or a checkpoint folder
    images = pipe(n=16, steps=50, sampler="ddim", seed=0)  # list of PIL images
    x = pipe.sample(n=16)                                  # tensor [16, C, H, W] in [-1, 1]

    pipe = Pipeline.from_pretrained("runs/emoji-ldm")      # text-to-image
    images = pipe("a red apple", n=4, steps=20, guidance=4, negative="blurry")
"""

from __future__ import annotations

import inspect
import math
from importlib import resources
from pathlib import Path

import torch
from tqdm.auto import tqdm

from diffusekit.config import Config, config_from_dict
from diffusekit.denoiser import Denoiser
from diffusekit.errors import UserError
from diffusekit.files import read_json, read_tensors
from diffusekit.guidance import GuidedDenoiser
from diffusekit.io.checkpoint import load_weights, resolve_checkpoint
from diffusekit.nn.state import load_state_dict_checked
from diffusekit.nn.unet import UNet
from diffusekit.nn.vae import AutoencoderKL
from diffusekit.runtime import pick_device, prepare_module, randn, sample_generators, use_all_cores
from diffusekit.samplers import get_sampler
from diffusekit.schedule import SPACINGS, NoiseSchedule

LARGE_IMAGE_PIXELS = 256 * 256  # from this size on, the VAE decodes one image at a time


def image_shape(config: Config, size: int | None = None) -> tuple[int, int, int]:
    """What the U-Net denoises for images of `size` (default: the training size): images, or a latent model's latents."""
    size = size or config.data.image_size
    if config.latent.vae:
        factor = config.vae.downsample_factor
        if size % factor:
            raise UserError(f"--size {size} is not a multiple of {factor}, the autoencoder's down-sampling factor")
        return (config.vae.latent_channels, size // factor, size // factor)
    return (config.data.channels, size, size)


def default_model() -> Path:
    """The text-to-image demo model shipped in the package."""
    path = Path(str(resources.files("diffusekit") / "assets" / "emoji-t2i"))
    if not (path / "config.json").is_file():
        raise UserError("no shipped demo model in this installation; give a text-to-image run with --model RUN")
    return path


def build_unet(config: Config) -> UNet:
    return UNet.from_config(config.model, in_channels=image_shape(config)[0])


def build_vae(config: Config) -> AutoencoderKL:
    return AutoencoderKL.from_config(config.vae, config.data.channels)


def build_text_encoder(config: Config, device=None):
    """The model's text encoder (None for a model without text conditioning)."""
    if not config.text.encoder:
        return None
    from diffusekit.nn.text import TextEncoder

    encoder = TextEncoder(config.text.encoder, config.text.max_length)
    if encoder.dim != config.model.cross_attention_dim:
        raise UserError(
            f"the text encoder '{config.text.encoder}' gives {encoder.dim}-wide embeddings but model.cross_attention_dim = "
            f"{config.model.cross_attention_dim}; set model.cross_attention_dim={encoder.dim}"
        )
    return encoder.to(device) if device is not None else encoder


def text_condition(hidden: torch.Tensor, mask: torch.Tensor, mask_padding: bool) -> dict:
    """The U-Net's text inputs: token embeddings, and the padding mask unless the model attends to padding."""
    return {"context": hidden, "context_mask": mask} if mask_padding else {"context": hidden}


def load_config(ckpt: Path) -> Config:
    return config_from_dict(read_json(Path(ckpt) / "config.json", "config"), where=f"{ckpt}/config.json")


def check_sampling_values(n: int, batch_size: int, guidance: float | None, rescale: float, eta: float | None) -> None:
    """The ranges config.validate() enforces for sample.*, for values given at sampling time."""
    if n < 1 or batch_size < 1:
        raise UserError(f"the number of images ({n}) and the batch size ({batch_size}) must be at least 1")
    if guidance is not None and guidance < 0:
        raise UserError(f"the guidance scale must be >= 0 (1: none), got {guidance}")
    if not 0.0 <= rescale <= 1.0:
        raise UserError(f"the guidance rescale must be in [0, 1], got {rescale}")
    if eta is not None and eta < 0:
        raise UserError(f"eta must be >= 0 (0: deterministic), got {eta}")


class Pipeline:
    """Samples of a diffusion model; for a latent model `vae` decodes the sampled latents."""

    def __init__(self, config: Config, net: torch.nn.Module, device: torch.device | str = "cpu", checkpoint: Path | None = None,
                 step: int | None = None, vae: AutoencoderKL | None = None, text_encoder=None):
        self.config, self.net, self.device = config, net.eval(), torch.device(device)
        self.text_encoder = text_encoder
        self.schedule = NoiseSchedule.from_config(config.diffusion)
        self.denoiser = Denoiser(self.net, self.schedule, config.diffusion.prediction)
        self.checkpoint, self.step = checkpoint, step
        self.vae = vae.eval() if vae is not None else None

    @classmethod
    def from_pretrained(cls, path: str | Path, weights: str = "ema", device: str = "auto") -> "Pipeline":
        use_all_cores()
        from diffusekit.io import diffusers

        if diffusers.is_diffusers_folder(path):  # a Stable Diffusion / diffusers folder (model_index.json or a UNet config.json)
            if weights != "ema":
                raise UserError(f"'{path}' is a diffusers folder: it has one set of weights, so --weights {weights} does not apply")
            return diffusers.load_pipeline(path, device=device)
        ckpt = resolve_checkpoint(path)
        config = load_config(ckpt)
        if config.task != "diffusion":
            raise UserError(f"'{path}' holds an {config.task} (from train-vae), not a diffusion model: sample from a diffusion run")
        dev = pick_device(device)
        net = build_unet(config)
        load_state_dict_checked(net, load_weights(ckpt, weights), source=str(ckpt))
        vae = None
        if config.latent.vae:
            vae = build_vae(config)
            load_state_dict_checked(vae, read_tensors(ckpt / "vae.safetensors"), source=str(ckpt))
            vae = prepare_module(vae, dev)
        state = read_json(ckpt / "state.json", "training state")
        return cls(config, prepare_module(net, dev), dev, checkpoint=ckpt, step=state.get("step"), vae=vae, text_encoder=build_text_encoder(config, dev))

    def to(self, device: torch.device | str) -> "Pipeline":
        """Move the networks (U-Net, VAE, text encoder) to `device`, as pipe.to("cuda") in diffusers."""
        self.device = pick_device(str(device))
        self.net = prepare_module(self.net, self.device)
        if self.vae is not None:
            self.vae = prepare_module(self.vae, self.device)
        if self.text_encoder is not None:
            self.text_encoder = self.text_encoder.to(self.device)
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

    def sigmas(self, steps: int, spacing: str) -> torch.Tensor:
        if spacing not in SPACINGS:
            raise UserError(f"unknown step schedule '{spacing}'; use one of: {', '.join(SPACINGS)}")
        T = self.schedule.num_timesteps
        if not 1 <= steps <= T:
            raise UserError(f"--steps {steps} is out of range: this model has {T} timesteps, so use 1 to {T}")
        return self.schedule.sampling_sigmas(steps, spacing, steps_offset=self.config.sample.steps_offset)

    def _labels(self, labels, n: int) -> torch.Tensor | None:
        if labels is None:
            return None
        num_classes = self.config.model.num_classes
        if not num_classes:
            raise UserError("this model is not class-conditional: it takes no --label; train one with e.g. --preset mnist-cond")
        labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
        labels = labels.repeat(math.ceil(n / len(labels)))[:n]
        if ((labels < 0) | (labels >= num_classes)).any():
            raise UserError(f"labels must be between 0 and {num_classes - 1} for this model")
        return labels

    def encode_prompts(self, prompts: list[str]) -> dict:
        """Text conditions for a list of prompts, each distinct prompt encoded once."""
        if self.text_encoder is None:
            raise UserError("this model is not text-conditioned: it takes no prompt; use a text-to-image run (e.g. --preset emoji-ldm)")
        unique = list(dict.fromkeys(prompts))
        hidden, mask = self.text_encoder.encode(unique)
        rows = torch.tensor([unique.index(p) for p in prompts])
        return text_condition(hidden[rows].to(self.device), mask[rows].to(self.device), self.config.text.mask_padding)

    def conditions(self, n: int, labels=None, prompts=None, negative: str | None = None) -> tuple[dict | None, dict | None]:
        """(cond, uncond) for all n samples. uncond is the null class, the empty prompt or the negative prompt.
        Several prompts take turns (p1, p2, p1, p2, ...), so n must be a multiple of their number."""
        if prompts is not None:
            prompts = [prompts] if isinstance(prompts, str) else list(prompts)
            if not prompts or n % len(prompts):
                raise UserError(f"{len(prompts)} prompts cannot share {n} images evenly; ask for a multiple of {max(len(prompts), 1)} images")
            prompts = prompts * (n // len(prompts))
            return self.encode_prompts(prompts), self.encode_prompts([negative or ""] * n)
        if negative:
            raise UserError("a negative prompt needs a prompt")
        all_labels = self._labels(labels, n)
        if all_labels is not None:
            null = torch.full((n,), self.config.model.num_classes, dtype=torch.long)
            return {"class_labels": all_labels.to(self.device)}, {"class_labels": null.to(self.device)}
        if self.text_encoder is not None:  # a text model without a prompt: the unconditional model
            return self.encode_prompts([""] * n), None
        return None, None

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
        batch_size: int = 64,
        size: int | None = None,
        noise: torch.Tensor | None = None,
        callback=None,
        progress: bool = False,
        **sampler_options,
    ) -> torch.Tensor:
        """n images as a tensor in [-1, 1] (a latent model's samples decoded). Image i depends only on (seed, i), not on batch_size.

        labels: class label(s) of a class-conditional model; prompts: text(s) of a text-to-image
        model (both repeated to n); negative: the prompt guidance steers away from (default "").
        guidance: the classifier-free guidance scale; size: another image size than the training one.
        noise: the initial noise [n, *shape] (standard normal, as diffusers' `latents`) instead of the seeded draw.
        callback(first_index, step, x, x0_hat)
        sees each batch's state after every step.
        """
        defaults = self.config.sample
        steps, sampler = defaults.steps if steps is None else steps, sampler or defaults.sampler
        spacing, seed = spacing or defaults.spacing, defaults.seed if seed is None else seed
        rescale = defaults.guidance_rescale if guidance_rescale is None else guidance_rescale
        check_sampling_values(n, batch_size, guidance, rescale, sampler_options.get("eta"))
        if sampler == "ddim":
            sampler_options.setdefault("eta", defaults.eta)
        if sampler == "ddpm":
            sampler_options.setdefault("variance", defaults.variance)
        sample_fn = get_sampler(sampler)
        unknown = [k for k in sampler_options if k not in inspect.signature(sample_fn).parameters]
        if unknown:
            raise UserError(f"the {sampler} sampler has no option '{unknown[0]}'; drop it or pick a sampler that takes it")
        sigmas = self.sigmas(steps, spacing).to(self.device)
        cond, uncond = self.conditions(n, labels, prompts, negative)
        if uncond is None:  # unconditional samples: nothing to guide towards
            if guidance not in (None, 1.0):
                raise UserError("classifier-free guidance needs a condition: give a --label or a prompt")
            guidance = 1.0
        guidance = defaults.guidance if guidance is None else guidance
        shape = image_shape(self.config, size)
        if noise is not None and tuple(noise.shape) != (n, *shape):
            raise UserError(f"noise has shape {list(noise.shape)}, but {n} samples need {[n, *shape]}")
        out = []
        bar = tqdm(total=n * steps, desc=f"sampling ({sampler}, {steps} steps)", unit="step", disable=not progress, leave=False)
        for start in range(0, n, batch_size):
            count = min(batch_size, n - start)
            part = slice(start, start + count)
            gens = sample_generators(seed, count, start)
            start_noise = randn((count, *shape), generator=gens, device=self.device) if noise is None else noise[part].to(self.device)
            x = start_noise * (1 + sigmas[0] ** 2).sqrt().float()
            batch_cond = {k: v[part] for k, v in cond.items()} if cond else None
            denoiser = self.denoiser
            if guidance != 1.0:
                denoiser = GuidedDenoiser(self.denoiser, {k: v[part] for k, v in uncond.items()}, guidance, rescale)

            def on_step(i, x, x0, start=start, count=count):
                bar.update(count)
                if callback is not None:
                    callback(start, i, x, x0)

            x = sample_fn(denoiser, x, sigmas, cond=batch_cond, generator=gens, callback=on_step, **sampler_options)
            out.append(self.decode(x) if self.vae is not None else x.clamp(-1, 1).cpu())
        bar.close()
        return torch.cat(out)

    def __call__(self, prompt=None, n: int | None = None, *, num_images_per_prompt: int | None = None,
                 height: int | None = None, width: int | None = None, generator: torch.Generator | None = None, **kwargs):
        """PIL images: pipe("a red apple", n=4, steps=20, guidance=4) for a text-to-image model,
        pipe(n=16) for an unconditional one (labels=... for a class-conditional one).

        n defaults to 4 for one prompt or none, else one image per prompt. diffusers' names work too:
        num_inference_steps, guidance_scale, negative_prompt, latents, num_images_per_prompt
        (each prompt's images next to each other), height and width (equal: the images are square),
        and generator, which draws the initial noise (the per-step noise of stochastic samplers
        still comes from `seed`)."""
        from diffusekit.images import make_grid, to_pil

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
        images = self.sample(n, prompts=prompts, **kwargs)
        return [to_pil(make_grid(img[None], ncols=1, padding=0)) for img in images]


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
