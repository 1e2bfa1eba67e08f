"""Checks of a Config: the types of values read from TOML, JSON and --set, ranges and consistency; one ConfigError naming the key, the problem and the fix.

config.py imports this module (it checks every config it builds), so the checks take its dataclasses (a config.Config,
a config.SampleConfig) without importing them: no import cycle, not even for annotations."""

from __future__ import annotations

import math
import os
import tomllib
import typing

from diffusekit.denoiser import PREDICTIONS
from diffusekit.distill_losses import CONSISTENCY_LOSSES
from diffusekit.durations import parse_duration
from diffusekit.errors import ConfigError
from diffusekit.flow import FLOW_SPACINGS, TIMESTEP_SAMPLINGS
from diffusekit.losses import WEIGHTINGS
from diffusekit.nn.vae import check_vae_config
from diffusekit.samplers import SAMPLERS
from diffusekit.schedule import BETA_SCHEDULES, SPACINGS


def _choice(key: str, value: str, choices) -> None:
    if value not in choices:
        raise ConfigError(f"{key} = {value!r} is not one of: {', '.join(choices)}")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


# ----------------------------------------------------------------------------- types (TOML, JSON and --set values)


def type_name(hint) -> str:
    origin = typing.get_origin(hint)
    if origin is tuple:
        args = typing.get_args(hint)
        inner = args[0].__name__
        return f"a list of {inner}s" if args[-1] is Ellipsis else f"{len(args)} {inner}s"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}[hint]


def coerce_value(value, hint, key: str):
    """Check and convert one value (from TOML, JSON or --set) to the field's type."""
    origin = typing.get_origin(hint)
    if origin is tuple:
        args = typing.get_args(hint)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} expects {type_name(hint)}, got {value!r}; e.g. --set {key}=64,128")
        inner = args[0]
        if args[-1] is not Ellipsis and len(value) != len(args):
            raise ConfigError(f"{key} expects {type_name(hint)}, got {len(value)} values: {value!r}")
        return tuple(coerce_value(v, inner, key) for v in value)
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif hint is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"{key} expects {type_name(hint)}, got {value!r}")


def parse_cli_value(text: str):
    """`--set` values: TOML literals (2e-4, true, [1, 2], "x"), a bare comma list, or a bare string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        pass
    if "," in text:
        return [parse_cli_value(part.strip()) for part in text.split(",") if part.strip()]
    return text


# ----------------------------------------------------------------------------- ranges and consistency


PROCESSES = ("ddpm", "flow")
MAX_SEED = 2**63 - 1  # what torch.Generator.manual_seed takes (as a signed 64-bit integer)


def check_seed(key: str, seed: int) -> None:
    _check(0 <= seed <= MAX_SEED, f"{key} = {seed} is out of range: a seed is a whole number from 0 to {MAX_SEED} (2^63 - 1)")


def check_sample(s, timesteps: int):
    """The sampling settings (sample.*, or what a call to Pipeline.sample replaced in them) for a model of `timesteps` steps."""
    _choice("sample.sampler", s.sampler, SAMPLERS)
    _choice("sample.spacing", s.spacing, SPACINGS)
    _choice("sample.variance", s.variance, ("fixed_small", "fixed_large"))
    _check(1 <= s.steps <= timesteps, f"sample.steps = {s.steps} (--steps) is out of range: this model has {timesteps} timesteps, so use 1 to {timesteps}")
    _check(s.n >= 1 and s.batch_size >= 1, f"the number of images ({s.n}) and sample.batch_size ({s.batch_size}) must be at least 1")
    _check(0 <= s.steps_offset < timesteps, f"sample.steps_offset must be in [0, diffusion.timesteps) = [0, {timesteps}), e.g. 1 as Stable Diffusion 1.x")
    _check(math.isfinite(s.guidance) and s.guidance >= 0,
           f"the guidance scale (sample.guidance, --guidance) must be a finite number >= 0 (1: none), got {s.guidance}")
    _check(0.0 <= s.guidance_rescale <= 1.0, f"the guidance rescale (sample.guidance_rescale) must be in [0, 1], got {s.guidance_rescale}")
    _check(math.isfinite(s.eta) and s.eta >= 0, f"eta (sample.eta, --eta) must be a finite number >= 0 (0: deterministic), got {s.eta}")
    check_seed("sample.seed", s.seed)
    return s


MAX_IMAGE_SIDE = 4096  # pixels: beyond this a sampled image needs tens of GB whatever the model
ACTIVATIONS = 8  # tensors of the first level's shape a network holds at once (skip connections, residuals)
MAX_MASK_BLUR = 1000  # pixels


def physical_memory() -> int | None:
    """This machine's memory in bytes (None where the OS does not say)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def sampling_bytes(config, size: int, n: int, batch: int) -> int:
    """A low estimate of the memory sampling n images of `size` takes: the network's first-level activations for a
    batch (twice, for guidance) and the n finished images in float32."""
    m, latent = config.model, size // (config.vae.downsample_factor if config.latent.vae else 1)
    per_image = (latent // m.patch_size) ** 2 * m.hidden_size if m.type == "dit" else latent**2 * m.channels[0]
    return 4 * (2 * min(batch, n) * ACTIVATIONS * per_image + n * config.data.channels * size**2)


def check_image_size(config, size, multiple: int, what: str = "--size", n: int = 1, batch: int = 1) -> int:
    """The one check of an image size asked for (--size, a PNG's Size): a whole number, a multiple of the model's
    `multiple` (models.size_multiple), at most MAX_IMAGE_SIDE, and n images of it within this machine's memory."""
    sizes = f"use a multiple of {multiple} from {multiple} to {MAX_IMAGE_SIDE} (this model was trained at {config.data.image_size})"
    _check(isinstance(size, int) and not isinstance(size, bool), f"{what}: an image size is a whole number of pixels; {sizes}")
    _check(multiple <= size <= MAX_IMAGE_SIDE, f"{what} is out of range: diffusekit makes images of at most {MAX_IMAGE_SIDE} pixels a side; {sizes}")
    _check(size % multiple == 0, f"{what} is not a multiple of {multiple}, which this model's images must be "
           f"(its autoencoder and network shrink them that many times); {sizes}")
    needed, memory = sampling_bytes(config, size, n, batch), physical_memory()
    _check(memory is None or needed <= memory, f"{what}: sampling {n} image(s) of {size}x{size}, {min(batch, n)} at once, needs about "
           f"{needed / 2**30:.0f} GiB, more than this machine's {(memory or 0) / 2**30:.0f} GiB of memory; "
           "use a smaller size, --batch-size or --n")
    return size


def check_mask_blur(blur) -> float:
    _check(isinstance(blur, (int, float)) and not isinstance(blur, bool) and 0 <= blur <= MAX_MASK_BLUR,
           f"the mask blur (--mask-blur) must be a number of pixels from 0 to {MAX_MASK_BLUR}, got {blur!r}")
    return float(blur)


NETWORKS = ("unet", "dit")


def check_distill(config) -> None:
    """The distill section: a method, and a student step count the method can reach from the teacher's schedule."""
    d, timesteps = config.distill, config.diffusion.timesteps
    _choice("distill.method", d.method, ("", "progressive", "consistency"))
    _choice("distill.loss", d.loss, CONSISTENCY_LOSSES)
    _check(min(d.stage_steps, d.trained_steps, d.teacher_step) >= 0, "distill.stage_steps, trained_steps and teacher_step must not be negative")
    _check(0.0 <= d.target_ema < 1.0, f"distill.target_ema must be in [0, 1) (0.95 as Song et al.), got {d.target_ema}")
    _check(0 <= d.guidance_min <= d.guidance_max, f"distill.guidance_min and guidance_max need 0 <= min <= max, got {d.guidance_min} and {d.guidance_max}")
    _check(d.steps >= 1, f"the student's steps (--steps, distill.steps) must be at least 1, got {d.steps}")
    if d.method == "progressive":
        start = d.start_steps
        _check(start >= 2 and start & (start - 1) == 0 and start <= timesteps,
               f"distill.start_steps = {start} must be a power of two from 2 to the teacher's {timesteps} timesteps, e.g. 64")
        _check(d.steps & (d.steps - 1) == 0 and d.steps < start,
               f"--steps {d.steps}: progressive distillation halves the teacher's {start} DDIM steps (distill.start_steps) stage by stage, "
               f"so the student takes a power of two below {start}: use one of {', '.join(str(2**k) for k in range(start.bit_length() - 1))} "
               "(or --method consistency, which samples with any number of steps)")
    if d.method == "consistency":
        _check(2 <= d.solver_steps <= timesteps,
               f"distill.solver_steps = {d.solver_steps} must be between 2 and the teacher's {timesteps} timesteps (its ODE's discretisation, e.g. 50)")
        _check(d.steps <= d.solver_steps,
               f"--steps {d.steps} is more than the {d.solver_steps} points of the teacher's ODE the student learns (distill.solver_steps); "
               f"use 1 to {d.solver_steps}, or raise distill.solver_steps (at most the teacher's {timesteps} timesteps)")


def check_unet(m) -> None:
    """The U-Net's fields (model.*), when model.type = "unet"."""
    _check(len(m.channels) >= 1 and all(c > 0 for c in m.channels), "model.channels needs at least one positive width, e.g. 32,64,64")
    _check(m.layers_per_block >= 1, "model.layers_per_block must be at least 1")
    _check(m.norm_groups >= 1 and (m.attention_heads > 0 or m.attention_head_dim >= 1),
           "model.norm_groups and model.attention_head_dim (or model.attention_heads) must be at least 1, e.g. 8 and 32")
    for level in m.attention_levels:
        _check(0 <= level < len(m.channels), f"model.attention_levels has level {level}, but there are only levels 0..{len(m.channels) - 1}")
    for c in m.channels:
        _check(c % m.norm_groups == 0, f"model.channels {c} is not divisible by model.norm_groups = {m.norm_groups}; pick widths that are multiples of it")
    for level in set(m.attention_levels) | ({len(m.channels) - 1} if m.mid_attention else set()):
        c = m.channels[level]
        if m.attention_heads:
            _check(c % m.attention_heads == 0, f"model.attention_heads = {m.attention_heads} does not divide the width {c} of attention level {level}")
        else:
            _check(c % m.attention_head_dim == 0, f"model.attention_head_dim = {m.attention_head_dim} does not divide the width {c} of attention level {level}")
    _check(m.cross_attention_dim >= 0 and m.attention_heads >= 0 and m.transformer_layers >= 1, "model.cross_attention_dim and attention_heads must be >= 0, transformer_layers >= 1")
    _check(m.downsample_padding in (0, 1), "model.downsample_padding must be 1 (pad all sides) or 0 (pad right and bottom)")
    _check(m.norm_eps > 0, "model.norm_eps must be positive, e.g. 1e-5")


def check_dit(m) -> None:
    """The DiT's fields (model.*), when model.type = "dit"."""
    for key in ("patch_size", "hidden_size", "depth", "num_heads", "mlp_ratio"):
        _check(getattr(m, key) >= 1, f"model.{key} must be at least 1, got {getattr(m, key)}")
    _choice("model.pos_embed", m.pos_embed, ("sincos", "learned"))
    _check(m.hidden_size % m.num_heads == 0, f"model.hidden_size = {m.hidden_size} is not divisible by model.num_heads = {m.num_heads}; "
           f"pick a width that is a multiple of the head count (e.g. {m.num_heads * 64})")
    _check(m.pos_embed != "sincos" or m.hidden_size % 4 == 0, f"model.hidden_size = {m.hidden_size} must be a multiple of 4 for "
           "2-D sin-cos position embeddings (or set model.pos_embed = \"learned\")")


def network_size_check(config, size: int) -> None:
    """The image (or latent) size must pass through the network: the U-Net's levels halve it, the DiT cuts it into patches."""
    m, where = config.model, ("the latent size" if config.latent.vae else "data.image_size")
    if m.type == "dit":
        divisors = [p for p in range(1, size + 1) if size % p == 0]
        _check(size % m.patch_size == 0, f"model.patch_size = {m.patch_size} does not divide {where} = {size}: the DiT cuts it into "
               f"{m.patch_size}x{m.patch_size} patches; use a patch size that divides {size} ({', '.join(map(str, divisors))}) or another size")
        return
    factor = 2 ** (len(m.channels) - 1)
    _check(
        size % factor == 0,
        f"{where} = {size} cannot pass through the U-Net: its {len(m.channels)} levels "
        f"halve the size {len(m.channels) - 1} times, so the size must be a multiple of {factor} (e.g. {max(factor, size // factor * factor)} "
        f"or {(size // factor + 1) * factor}), or use fewer levels in model.channels",
    )


def check_process(config) -> None:
    """diffusion.process: the DDPM-only options under flow matching, and the flow-only ones under DDPM."""
    d, defaults = config.diffusion, type(config.diffusion)()
    _choice("diffusion.process", d.process, PROCESSES)
    _choice("diffusion.timestep_sampling", d.timestep_sampling, TIMESTEP_SAMPLINGS)
    _check(d.shift > 0, f"diffusion.shift must be positive (1: no shift; SD3 uses 3.0), got {d.shift}")
    _check(d.logit_std > 0, f"diffusion.logit_std must be positive (SD3: 1.0), got {d.logit_std}")
    _check(-1 <= d.mode_scale <= 2 / (math.pi - 2), f"diffusion.mode_scale must be in [-1, {2 / (math.pi - 2):.3f}] "
           f"(SD3 eq. 20 is a density only there), got {d.mode_scale}")
    if d.process == "ddpm":
        for key, fix in (("shift", "1"), ("timestep_sampling", '"uniform"')):
            _check(getattr(d, key) == getattr(defaults, key), f"diffusion.{key} = {getattr(d, key)!r} applies to flow models only: "
                   f"set diffusion.process = \"flow\" (with diffusion.prediction = \"v\"), or diffusion.{key} = {fix}")
        return
    flow = "a flow model (diffusion.process = \"flow\")"
    for key in ("schedule", "beta_start", "beta_end"):
        _check(getattr(d, key) == getattr(defaults, key), f"diffusion.{key} = {getattr(d, key)!r} is a DDPM beta-schedule option and "
               f"{flow} has no betas: remove it or set it to the default {getattr(defaults, key)!r}, or set diffusion.process = \"ddpm\"")
    _check(not d.zero_terminal_snr, f"diffusion.zero_terminal_snr is a DDPM option: {flow} already ends at pure noise (t = 1); "
           "set diffusion.zero_terminal_snr = false")
    _check(d.prediction != "eps", f"diffusion.prediction = 'eps' does not work for {flow}: at t = 1 an eps prediction says nothing "
           "about x0; set diffusion.prediction = \"v\" (the velocity eps - x0, as SD3) or \"x0\"")
    _check(d.loss_weighting == "uniform", f"diffusion.loss_weighting = {d.loss_weighting!r} is a DDPM option; {flow} weights t through "
           "diffusion.timestep_sampling (e.g. \"logit_normal\", SD3's): set diffusion.loss_weighting = \"uniform\"")
    _check(not config.distill.method, f"distill.method = {config.distill.method!r}: distillation takes DDPM teachers only (its targets are "
           f"DDIM steps and LCM scalings on the beta schedule), and {flow} is not one; distil a DDPM model")
    spacing = config.sample.spacing
    _check(spacing in FLOW_SPACINGS, f"sample.spacing = {spacing!r} does not apply to {flow} (leading never starts at pure noise); "
           f"use one of: {', '.join(FLOW_SPACINGS)} (linspace is diffusers' FlowMatchEulerDiscreteScheduler)")


def validate(config):
    """Range and consistency checks of a config.Config, section by section; returns it unchanged."""
    for check in (check_model, check_diffusion, check_data, check_train, check_sampling, check_text, check_vae_loss, check_distill,
                  check_guidance_embedding, check_finetune, check_controlnet, check_eval):
        check(config)
    return config


def check_model(config) -> None:
    m = config.model
    _choice("model.type", m.type, NETWORKS)
    (check_unet if m.type == "unet" else check_dit)(m)
    _check(0.0 <= m.dropout < 1.0, "model.dropout must be in [0, 1)")
    _check(m.num_classes >= 0, "model.num_classes must be 0 (unconditional) or the number of classes")
    _check(m.cross_attention_dim >= 0, "model.cross_attention_dim must be >= 0 (0: no text)")


def check_diffusion(config) -> None:
    d = config.diffusion
    _choice("diffusion.schedule", d.schedule, BETA_SCHEDULES)
    _choice("diffusion.prediction", d.prediction, PREDICTIONS)
    _choice("diffusion.loss_weighting", d.loss_weighting, WEIGHTINGS)
    _check(d.timesteps >= 2, "diffusion.timesteps must be at least 2")
    check_process(config)
    _check(0 < d.beta_start < d.beta_end < 1, "diffusion.beta_start and beta_end need 0 < beta_start < beta_end < 1")
    _check(d.snr_gamma > 0, "diffusion.snr_gamma must be positive")
    _check(
        not d.zero_terminal_snr or d.prediction != "eps",
        "diffusion.zero_terminal_snr needs diffusion.prediction = v (or x0): at abar_T = 0 an eps prediction says "
        "nothing about x0 (Lin et al. 2023, sec. 3.2)",
    )


def check_data(config) -> None:
    """The task, the dataset and the image size, which must pass through the autoencoder and the network."""
    data = config.data
    _choice("task", config.task, ("diffusion", "autoencoder", "finetune", "controlnet"))
    _choice("data.dataset", data.dataset, ("mnist", "folder", "emoji", "none"))
    _choice("data.bad_images", data.bad_images, ("skip", "abort"))
    _check(data.channels in (1, 3), "data.channels must be 1 (grayscale) or 3 (RGB)")
    _check(data.image_size >= 4, "data.image_size must be at least 4")
    check_vae_config(config.vae)
    vae_factor = config.vae.downsample_factor
    latent_model = config.task == "autoencoder" or bool(config.latent.vae)
    _check(
        not latent_model or data.image_size % vae_factor == 0,
        f"data.image_size = {data.image_size} cannot pass through the autoencoder, which shrinks images {vae_factor} times; "
        f"use a multiple of {vae_factor}",
    )
    _check(data.dataset != "emoji" or data.image_size <= 136, "data.image_size for emoji must be at most 136 (the font's glyph size)")
    _check(not (data.hflip and config.latent.vae), "data.hflip does not work with latent.vae: the latent cache holds unflipped images; set data.hflip=false")
    size = data.image_size // vae_factor if config.latent.vae else data.image_size  # what the network sees
    if config.task != "autoencoder":
        network_size_check(config, size)
    _check(data.dataset != "folder" or bool(data.path), "data.dataset = 'folder' needs data.path, e.g. --set data.path=my_images/")
    _check(data.limit >= 0, "data.limit must be 0 (all) or a positive count")


def check_train(config) -> None:
    t = config.train
    check_seed("train.seed", t.seed)
    _check(t.batch_size >= 1 and t.grad_accumulation >= 1, "train.batch_size and train.grad_accumulation must be at least 1")
    _check(t.lr > 0, "train.lr must be positive")
    _choice("train.lr_schedule", t.lr_schedule, ("constant", "cosine"))
    _choice("train.precision", t.precision, ("auto", "fp32", "bf16"))  # fp16 training would need loss scaling
    _check(0.0 <= t.ema_decay < 1.0, "train.ema_decay must be in [0, 1)")
    _check(t.max_steps >= 1, "train.max_steps must be at least 1")
    _check(0.0 <= t.label_dropout < 1.0, "train.label_dropout must be in [0, 1)")
    _check(t.warmup_steps >= 0 and t.grad_clip >= 0, "train.warmup_steps and train.grad_clip must not be negative")
    _check(t.log_every >= 1 and t.checkpoint_every >= 1 and t.keep_checkpoints >= 1, "train.log_every, checkpoint_every and keep_checkpoints must be at least 1")
    _choice("train.on_nan", t.on_nan, ("stop", "skip"))
    _check(math.isfinite(t.checkpoint_minutes) and t.checkpoint_minutes >= 0,
           f"train.checkpoint_minutes = {t.checkpoint_minutes} is not a time between checkpoints: give minutes >= 0, e.g. 1 "
           "(0: no timed checkpoints, train.checkpoint_every alone)")
    if t.budget:
        parse_duration(t.budget)


def check_sampling(config) -> None:
    timesteps = config.diffusion.timesteps
    check_sample(config.sample, timesteps)
    _check(config.eval.steps <= timesteps, f"eval.steps = {config.eval.steps} cannot exceed diffusion.timesteps = {timesteps} (a sampler takes at most one step per timestep)")


def check_text(config) -> None:
    m, tx = config.model, config.text
    _check(not tx.encoder or m.cross_attention_dim > 0, f"text.encoder = {tx.encoder!r} needs model.cross_attention_dim = the encoder's width (384 for minilm)")
    _check(not m.cross_attention_dim or bool(tx.encoder), "model.cross_attention_dim > 0 needs a text encoder: set text.encoder (e.g. minilm)")
    _check(not (tx.encoder and m.num_classes), "a model is conditioned on class labels or on text, not both: set model.num_classes=0 or text.encoder=\"\"")
    _check(tx.max_length >= 2 and 0.0 <= tx.caption_dropout < 1.0, "text.max_length must be >= 2 and text.caption_dropout in [0, 1)")


def check_vae_loss(config) -> None:
    v = config.vae_loss
    _check(min(v.l1, v.l2, v.kl, v.disc_weight) >= 0 and v.l1 + v.l2 > 0, "vae_loss weights must be >= 0, with l1 + l2 > 0")
    _check(v.disc_start >= 0 and v.disc_channels >= 1 and v.disc_layers >= 1, "vae_loss.disc_start must be >= 0, disc_channels and disc_layers >= 1")


def check_guidance_embedding(config) -> None:
    m = config.model
    _check(m.guidance_embedding >= 0 and m.guidance_embedding % 2 == 0, "model.guidance_embedding must be 0 (none) or an even width, e.g. 256")
    _check(not m.guidance_embedding or m.type == "unet", "model.guidance_embedding (a guidance-distilled student's) is the U-Net's; a DiT has none: set it to 0")


def check_finetune(config) -> None:
    f, tx, t = config.finetune, config.text, config.train
    _check(f.rank >= 1 and f.alpha >= 0 and 0.0 <= f.dropout < 1.0, "finetune.rank must be >= 1 (--lora-rank), finetune.alpha >= 0 (0: = rank) and finetune.dropout in [0, 1)")
    _check(bool(f.targets) and all(f.targets), "finetune.targets needs at least one layer name or preset (attention, ff, proj, conv), e.g. --lora-targets attention")
    _check(f.prior_images >= 0 and f.prior_weight >= 0, "finetune.prior_images and finetune.prior_weight must not be negative")
    _check(not (f.prior_images and f.prior_path), "prior preservation takes generated class images (--prior-images N) or a folder of them (--prior-data DIR), not both")
    _check(not f.prior_images or bool(f.prior_prompts) or not tx.encoder, "--prior-images needs the class prompt(s) the base model draws them for: --prior-prompt TEXT")
    _check(not f.text_encoder or t.grad_accumulation == 1, "finetune.text_encoder (--text-encoder) trains with train.grad_accumulation = 1")
    check_seed("finetune.prior_seed", f.prior_seed)


def check_eval(config) -> None:
    e = config.eval
    _check(e.every >= 0 and e.n >= 10 and e.steps >= 1, "eval.every must be >= 0, eval.n >= 10 and eval.steps >= 1")
    _choice("eval.sampler", e.sampler, SAMPLERS)
    _choice("eval.features", e.features, ("", "mnist", "random", "inception"))


def check_controlnet(config) -> None:
    _check(bool(config.controlnet.control), "controlnet.control must be canny, scribble or a folder of control images (--control)")
