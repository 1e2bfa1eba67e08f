"""Configs: dataclasses, TOML presets, `--set key=value` overrides, JSON round trip.

A run's full config is saved beside every checkpoint, so a checkpoint alone
rebuilds its model. Every user-facing mistake (unknown key, wrong type, value
out of range) raises ConfigError with the key, the problem and the fix.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import tomllib
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from diffusekit.errors import ConfigError, UserError
from diffusekit.nn.vae import VAEConfig, check_vae_config


@dataclass
class ModelConfig:
    """The U-Net (names follow diffusers' UNet2DModel where they can)."""

    channels: tuple[int, ...] = (32, 64, 64)  # block_out_channels, one per level
    layers_per_block: int = 1
    attention_levels: tuple[int, ...] = (2,)  # levels (0 = full size) with self-attention
    mid_attention: bool = True
    attention_head_dim: int = 32
    norm_groups: int = 8
    dropout: float = 0.0
    num_classes: int = 0  # 0: unconditional; else class labels 0..n-1 plus a null class n
    cross_attention_dim: int = 0  # text conditioning: the text encoder's width (0: none)
    attention_heads: int = 0  # a fixed head count per level (Stable Diffusion 1.x); 0: width / attention_head_dim
    transformer_layers: int = 1  # transformer blocks per cross-attention layer
    linear_projection: bool = False  # Linear instead of 1x1 conv around the transformer (Stable Diffusion 2.x)


@dataclass
class DiffusionConfig:
    """The forward process and what the network predicts."""

    schedule: str = "linear"  # linear | scaled_linear | cosine | sigmoid
    timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    zero_terminal_snr: bool = False  # Lin et al. 2023: rescale so that abar_T = 0
    prediction: str = "eps"  # eps | x0 | v
    loss_weighting: str = "uniform"  # uniform | min_snr
    snr_gamma: float = 5.0  # gamma of min-SNR-gamma weighting


@dataclass
class DataConfig:
    dataset: str = "mnist"  # mnist | emoji | folder | none (an imported model, no training data)
    path: str = ""  # the image folder, for dataset = "folder"
    font: str = ""  # the emoji dataset's font file ("": the Debian package's, or $DIFFUSEKIT_EMOJI_FONT)
    image_size: int = 28
    channels: int = 1  # 1 (grayscale) or 3 (RGB); images are converted
    bad_images: str = "skip"  # skip | abort: what an unreadable image does
    hflip: bool = False  # random horizontal flips
    limit: int = 0  # use only N images, spread evenly over the dataset (a folder: its first N files); 0: all


@dataclass
class TrainConfig:
    seed: int = 0
    batch_size: int = 64  # per process: a step trains on batch_size x grad_accumulation x processes images
    grad_accumulation: int = 1
    lr: float = 1e-3
    lr_schedule: str = "constant"  # constant | cosine (after warm-up)
    warmup_steps: int = 100
    min_lr_ratio: float = 0.0  # cosine ends at lr * min_lr_ratio
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0  # max gradient norm; 0 disables clipping
    label_dropout: float = 0.1  # class-conditional models: share of labels replaced by the null class
    ema_decay: float = 0.999
    ema_warmup: bool = True  # decay min(ema_decay, (1 + step) / (10 + step))
    max_steps: int = 100_000
    budget: str = ""  # wall-clock limit such as "10m", "90s", "1h30m"; "" for none
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    threads: int = 0  # CPU threads; 0 uses every core
    log_every: int = 25
    sample_every: int = 0  # steps between sample grids; 0: only at the end
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    on_nan: str = "stop"  # a NaN/inf loss: stop the run | skip the batch (counted in metrics.jsonl)


@dataclass
class SampleConfig:
    """Defaults for sampling (sample grids in training, `diffusekit sample`)."""

    sampler: str = "ddim"
    steps: int = 50
    spacing: str = "trailing"  # leading | trailing | linspace | karras | logsnr
    steps_offset: int = 0  # added to "leading" timesteps, as diffusers' steps_offset (Stable Diffusion 1.x: 1)
    eta: float = 0.0  # DDIM noise: 0 deterministic, 1 = DDPM
    variance: str = "fixed_small"  # DDPM sampler's noise: fixed_small (posterior variance) | fixed_large (beta_t)
    guidance: float = 1.0  # classifier-free guidance scale (1: plain conditional model)
    guidance_rescale: float = 0.0  # Lin et al. 2023 rescale factor phi in [0, 1]
    n: int = 64  # images in a training sample grid
    seed: int = 0


@dataclass
class TextConfig:
    """Text conditioning: prompts encoded into tokens that the U-Net cross-attends to."""

    encoder: str = ""  # "" (no text), "minilm" (the packaged all-MiniLM-L6-v2) or a local transformers folder
    max_length: int = 32  # tokens per prompt; longer prompts are truncated with a warning
    caption_dropout: float = 0.1  # share of captions replaced by "" in training, so that guidance works
    mask_padding: bool = True  # cross-attention ignores padding tokens (Stable Diffusion attends to them: false)


@dataclass
class LatentConfig:
    """Latent diffusion: the trained autoencoder whose latent space the U-Net works in."""

    vae: str = ""  # a `diffusekit train-vae` run or checkpoint folder; "" trains in pixel space


@dataclass
class VAELossConfig:
    """The autoencoder's training loss (Rombach et al. 2022, appendix G; Esser et al. 2021, sec. 3.2)."""

    l1: float = 1.0  # weight of |x - x_rec|
    l2: float = 0.0  # weight of (x - x_rec)^2
    kl: float = 1e-6  # weight of KL(q(z|x) || N(0, I)) (per image sums, as LDM)
    disc_weight: float = 0.0  # patch-discriminator (hinge) loss weight; 0: no discriminator
    disc_start: int = 2000  # step at which the discriminator starts
    disc_channels: int = 32
    disc_layers: int = 2


@dataclass
class EvalConfig:
    """Periodic quality evaluation during training (EMA model), logged to metrics.jsonl."""

    every: int = 0  # steps between evaluations; 0: off
    n: int = 500  # samples per evaluation
    sampler: str = "dpmpp_2m"
    steps: int = 20
    features: str = ""  # mnist | random | inception; "" picks mnist for digits, random otherwise


@dataclass
class Config:
    description: str = ""
    task: str = "diffusion"  # diffusion | autoencoder (`diffusekit train-vae`)
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    latent: LatentConfig = field(default_factory=LatentConfig)
    text: TextConfig = field(default_factory=TextConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    vae_loss: VAELossConfig = field(default_factory=VAELossConfig)


# Keys that may differ between a run and its resumption; everything else must match.
RESUMABLE_KEYS = {
    "description",
    "vae.scale_factor",  # an autoencoder run measures its latent scale as it trains
    "vae.shift_factor",
    "train.max_steps",
    "train.budget",
    "train.device",
    "train.threads",
    "train.log_every",
    "train.sample_every",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "train.on_nan",
    "train.batch_size",  # the data position is counted in images, so the batch (and the number of processes) may change
    "train.grad_accumulation",
}
RESUMABLE_SECTIONS = {"sample", "eval"}


# ----------------------------------------------------------------------------- typing


def _field_types(cls) -> dict[str, typing.Any]:
    return typing.get_type_hints(cls)


def _type_name(hint) -> str:
    origin = typing.get_origin(hint)
    if origin is tuple:
        args = typing.get_args(hint)
        inner = args[0].__name__
        return f"a list of {inner}s" if args[-1] is Ellipsis else f"{len(args)} {inner}s"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}[hint]


def _coerce(value, hint, key: str):
    """Check and convert one value (from TOML, JSON or --set) to the field's type."""
    origin = typing.get_origin(hint)
    if origin is tuple:
        args = typing.get_args(hint)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} expects {_type_name(hint)}, got {value!r}; e.g. --set {key}=64,128")
        inner = args[0]
        if args[-1] is not Ellipsis and len(value) != len(args):
            raise ConfigError(f"{key} expects {_type_name(hint)}, got {len(value)} values: {value!r}")
        return tuple(_coerce(v, inner, key) for v in value)
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
    raise ConfigError(f"{key} expects {_type_name(hint)}, got {value!r}")


def _parse_cli_value(text: str):
    """`--set` values: TOML literals (2e-4, true, [1, 2], "x"), a bare comma list, or a bare string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        pass
    if "," in text:
        return [_parse_cli_value(part.strip()) for part in text.split(",") if part.strip()]
    return text


# ----------------------------------------------------------------------------- dict <-> config


def _section_classes() -> dict[str, type]:
    return {name: hint for name, hint in _field_types(Config).items() if dataclasses.is_dataclass(hint)}


def _unknown_key(key: str, valid: list[str], where: str) -> ConfigError:
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return ConfigError(f"unknown config key '{key}' in {where}.{hint} Valid keys: {', '.join(sorted(valid))}")


TOP_LEVEL_KEYS = ("description", "task")


def all_keys() -> list[str]:
    keys = list(TOP_LEVEL_KEYS)
    for section, cls in _section_classes().items():
        keys += [f"{section}.{f.name}" for f in dataclasses.fields(cls)]
    return keys


def update_config(config: Config, values: dict, where: str) -> Config:
    """Return a copy of `config` with nested `values` ({section: {key: value}}) applied."""
    sections = _section_classes()
    changes = {}
    for name, value in values.items():
        if name in TOP_LEVEL_KEYS:
            changes[name] = _coerce(value, str, name)
            continue
        if name not in sections:
            raise _unknown_key(name, [*TOP_LEVEL_KEYS, *sections], where)
        if not isinstance(value, dict):
            raise ConfigError(f"'{name}' in {where} must be a section ([{name}]), got {value!r}")
        cls = sections[name]
        hints = _field_types(cls)
        fixed = {}
        for key, item in value.items():
            if key not in hints:
                raise _unknown_key(f"{name}.{key}", all_keys(), where)
            fixed[key] = _coerce(item, hints[key], f"{name}.{key}")
        changes[name] = dataclasses.replace(getattr(config, name), **fixed)
    return dataclasses.replace(config, **changes)


def config_to_dict(config: Config) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(config)))


def config_from_dict(values: dict, where: str = "config") -> Config:
    return validate(update_config(Config(), values, where))


def apply_overrides(config: Config, assignments: list[str]) -> Config:
    """Apply `--set section.key=value` strings."""
    for text in assignments:
        if "=" not in text:
            raise ConfigError(f"--set expects key=value, got '{text}'; e.g. --set train.lr=2e-4")
        key, raw = (part.strip() for part in text.split("=", 1))
        if key not in all_keys():
            raise _unknown_key(key, all_keys(), "--set")
        value = _parse_cli_value(raw)
        if key in TOP_LEVEL_KEYS:
            config = update_config(config, {key: str(value)}, "--set")
            continue
        section, name = key.split(".", 1)
        config = update_config(config, {section: {name: value}}, "--set")
    return validate(config)


def diff_configs(a: Config, b: Config) -> list[tuple[str, object, object]]:
    """Keys whose values differ, as (key, value in a, value in b)."""
    flat_a, flat_b = _flatten(config_to_dict(a)), _flatten(config_to_dict(b))
    return [(k, flat_a[k], flat_b[k]) for k in flat_a if flat_a[k] != flat_b[k]]


def _flatten(values: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


# ----------------------------------------------------------------------------- presets


def preset_names() -> list[str]:
    folder = resources.files("diffusekit") / "presets"
    return sorted(p.name[: -len(".toml")] for p in folder.iterdir() if p.name.endswith(".toml"))


def load_preset(name_or_path: str) -> Config:
    """A built-in preset by name, or a TOML file by path."""
    path = Path(name_or_path)
    if name_or_path.endswith(".toml") or path.is_file():
        if not path.is_file():
            raise UserError(f"preset file '{path}' does not exist; give a TOML file or one of: {', '.join(preset_names())}")
        text, where = path.read_text(), str(path)
    else:
        if name_or_path not in preset_names():
            close = difflib.get_close_matches(name_or_path, preset_names(), n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise UserError(
                f"unknown preset '{name_or_path}'.{hint} Available: {', '.join(preset_names())} "
                "(see `diffusekit presets`), or give a path to a .toml file"
            )
        text = (resources.files("diffusekit") / "presets" / f"{name_or_path}.toml").read_text()
        where = f"preset '{name_or_path}'"
    try:
        values = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{where} is not valid TOML: {err}") from None
    return validate(update_config(Config(), values, where))


# ----------------------------------------------------------------------------- validation


def _choice(key: str, value: str, choices) -> None:
    if value not in choices:
        raise ConfigError(f"{key} = {value!r} is not one of: {', '.join(choices)}")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def validate(config: Config) -> Config:
    """Range and consistency checks; returns the config unchanged."""
    from diffusekit.denoiser import PREDICTIONS
    from diffusekit.losses import WEIGHTINGS
    from diffusekit.samplers import SAMPLERS
    from diffusekit.schedule import BETA_SCHEDULES, SPACINGS

    m, d, data, t, s = config.model, config.diffusion, config.data, config.train, config.sample
    _check(len(m.channels) >= 1 and all(c > 0 for c in m.channels), "model.channels needs at least one positive width, e.g. 32,64,64")
    _check(m.layers_per_block >= 1, "model.layers_per_block must be at least 1")
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
    _check(0.0 <= m.dropout < 1.0, "model.dropout must be in [0, 1)")
    _check(m.num_classes >= 0, "model.num_classes must be 0 (unconditional) or the number of classes")

    _choice("diffusion.schedule", d.schedule, BETA_SCHEDULES)
    _choice("diffusion.prediction", d.prediction, PREDICTIONS)
    _choice("diffusion.loss_weighting", d.loss_weighting, WEIGHTINGS)
    _check(d.timesteps >= 2, "diffusion.timesteps must be at least 2")
    _check(0 < d.beta_start < d.beta_end < 1, "diffusion.beta_start and beta_end need 0 < beta_start < beta_end < 1")
    _check(d.snr_gamma > 0, "diffusion.snr_gamma must be positive")
    _check(
        not d.zero_terminal_snr or d.prediction != "eps",
        "diffusion.zero_terminal_snr needs diffusion.prediction = v (or x0): at abar_T = 0 an eps prediction says "
        "nothing about x0 (Lin et al. 2023, sec. 3.2)",
    )

    _choice("task", config.task, ("diffusion", "autoencoder"))
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
    size = data.image_size // vae_factor if config.latent.vae else data.image_size  # what the U-Net sees
    factor = 2 ** (len(m.channels) - 1)
    _check(
        config.task == "autoencoder" or size % factor == 0,
        f"{'the latent size' if config.latent.vae else 'data.image_size'} = {size} cannot pass through the U-Net: its {len(m.channels)} levels "
        f"halve the size {len(m.channels) - 1} times, so the size must be a multiple of {factor} (e.g. {max(factor, size // factor * factor)} "
        f"or {(size // factor + 1) * factor}), or use fewer levels in model.channels",
    )
    _check(data.dataset != "folder" or bool(data.path), "data.dataset = 'folder' needs data.path, e.g. --set data.path=my_images/")
    _check(data.limit >= 0, "data.limit must be 0 (all) or a positive count")

    _check(t.batch_size >= 1 and t.grad_accumulation >= 1, "train.batch_size and train.grad_accumulation must be at least 1")
    _check(t.lr > 0, "train.lr must be positive")
    _choice("train.lr_schedule", t.lr_schedule, ("constant", "cosine"))
    _choice("train.precision", t.precision, ("auto", "fp32", "bf16"))
    _check(0.0 <= t.ema_decay < 1.0, "train.ema_decay must be in [0, 1)")
    _check(t.max_steps >= 1, "train.max_steps must be at least 1")
    _check(0.0 <= t.label_dropout < 1.0, "train.label_dropout must be in [0, 1)")
    _check(t.warmup_steps >= 0 and t.grad_clip >= 0, "train.warmup_steps and train.grad_clip must not be negative")
    _check(t.log_every >= 1 and t.checkpoint_every >= 1 and t.keep_checkpoints >= 1, "train.log_every, checkpoint_every and keep_checkpoints must be at least 1")
    _choice("train.on_nan", t.on_nan, ("stop", "skip"))
    if t.budget:
        from diffusekit.runtime import parse_duration

        parse_duration(t.budget)

    _choice("sample.sampler", s.sampler, SAMPLERS)
    _choice("sample.spacing", s.spacing, SPACINGS)
    _choice("sample.variance", s.variance, ("fixed_small", "fixed_large"))
    _check(s.steps >= 1 and s.n >= 1, "sample.steps and sample.n must be at least 1")
    _check(s.steps <= d.timesteps and config.eval.steps <= d.timesteps,
           f"sample.steps and eval.steps cannot exceed diffusion.timesteps = {d.timesteps} (a sampler takes at most one step per timestep)")
    _check(0 <= s.steps_offset < d.timesteps, f"sample.steps_offset must be in [0, diffusion.timesteps) = [0, {d.timesteps}), e.g. 1 as Stable Diffusion 1.x")
    _check(s.guidance >= 0 and 0.0 <= s.guidance_rescale <= 1.0, "sample.guidance must be >= 0 and sample.guidance_rescale in [0, 1]")

    tx = config.text
    _check(not tx.encoder or m.cross_attention_dim > 0, f"text.encoder = {tx.encoder!r} needs model.cross_attention_dim = the encoder's width (384 for minilm)")
    _check(not m.cross_attention_dim or bool(tx.encoder), "model.cross_attention_dim > 0 needs a text encoder: set text.encoder (e.g. minilm)")
    _check(not (tx.encoder and m.num_classes), "a model is conditioned on class labels or on text, not both: set model.num_classes=0 or text.encoder=\"\"")
    _check(tx.max_length >= 2 and 0.0 <= tx.caption_dropout < 1.0, "text.max_length must be >= 2 and text.caption_dropout in [0, 1)")

    v = config.vae_loss
    _check(min(v.l1, v.l2, v.kl, v.disc_weight) >= 0 and v.l1 + v.l2 > 0, "vae_loss weights must be >= 0, with l1 + l2 > 0")
    _check(v.disc_start >= 0 and v.disc_channels >= 1 and v.disc_layers >= 1, "vae_loss.disc_start must be >= 0, disc_channels and disc_layers >= 1")

    e = config.eval
    _check(e.every >= 0 and e.n >= 10 and e.steps >= 1, "eval.every must be >= 0, eval.n >= 10 and eval.steps >= 1")
    _choice("eval.sampler", e.sampler, SAMPLERS)
    _choice("eval.features", e.features, ("", "mnist", "random", "inception"))
    return config
