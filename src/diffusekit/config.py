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

from diffusekit.config_checks import coerce_value, parse_cli_value, validate
from diffusekit.errors import ConfigError, UserError
from diffusekit.nn.vae import VAEConfig


@dataclass
class ModelConfig:
    """The denoising network: a U-Net (names follow diffusers' UNet2DModel where they can) or a DiT."""

    type: str = "unet"  # unet | dit (a Diffusion Transformer, nn/dit.py: the dit fields below)
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
    # Details that differ in imported models; the defaults are Stable Diffusion's. The original DDPM
    # U-Nets (google/ddpm-*) use false, 1, 0 and 1e-6.
    flip_sin_to_cos: bool = True  # time embedding as [cos, sin] (false: [sin, cos])
    freq_shift: float = 0.0  # time embedding frequencies 10000^(-i / (half - freq_shift))
    downsample_padding: int = 1  # 1: pad all sides before a stride-2 conv; 0: one row/column right and bottom
    norm_eps: float = 1e-5  # epsilon of the GroupNorms in the ResNet and self-attention blocks
    guidance_embedding: int = 0  # a guidance-distilled student's embedding width of the guidance scale (diffusers' time_cond_proj_dim); 0: none
    # The DiT (model.type = "dit"; Peebles & Xie 2023; DiT-S/2 is patch 2, width 384, depth 12, 6 heads). dropout,
    # num_classes and cross_attention_dim above apply to it too; the other U-Net fields do not.
    patch_size: int = 2  # p x p pixels (or latent positions) per token; must divide the image or latent size
    hidden_size: int = 384  # the token width
    depth: int = 12  # transformer blocks
    num_heads: int = 6  # attention heads per block (hidden_size / num_heads wide)
    mlp_ratio: int = 4  # the MLP's hidden width / hidden_size
    pos_embed: str = "sincos"  # sincos (fixed; any size at sampling) | learned (the training size only)


@dataclass
class DiffusionConfig:
    """The forward process and what the network predicts."""

    process: str = "ddpm"  # ddpm (the beta schedules below) | flow (flow matching, flow.py: x_t = (1 - t) x0 + t eps)
    schedule: str = "linear"  # linear | scaled_linear | cosine | sigmoid
    timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    zero_terminal_snr: bool = False  # Lin et al. 2023: rescale so that abar_T = 0
    prediction: str = "eps"  # eps | x0 | v
    loss_weighting: str = "uniform"  # uniform | min_snr
    snr_gamma: float = 5.0  # gamma of min-SNR-gamma weighting
    # Flow matching only (process = "flow"; Esser et al. 2024, SD3). It predicts v = eps - x0 (prediction = "v").
    shift: float = 1.0  # time shift t' = s t / (1 + (s - 1) t) in training and sampling (SD3: 3.0 at 1024 px; 1: none)
    timestep_sampling: str = "uniform"  # uniform | logit_normal (SD3's default) | mode: the density of training t
    logit_mean: float = 0.0  # logit_normal: t = sigmoid(logit_mean + logit_std * n)
    logit_std: float = 1.0
    mode_scale: float = 1.29  # mode: the scale s of SD3 eq. 20, in [-1, 2 / (pi - 2)]


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
    precision: str = "auto"  # auto (bf16 autocast where the CPU or GPU has native bf16, else fp32) | fp32 | bf16
    compile: bool = False  # torch.compile the training step's network (inductor); falls back to eager with a warning
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    threads: int = 0  # CPU threads; 0 uses every core
    log_every: int = 25
    sample_every: int = 0  # steps between sample grids; 0: only at the end
    checkpoint_every: int = 500  # steps between checkpoints
    checkpoint_minutes: float = 1.0  # and one at least every N minutes of wall time (mnist's save: <= 0.07 s, ~0.1%); 0: off
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
    batch_size: int = 64  # images sampled at once (only memory and speed depend on it, never the images)


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
class DistillConfig:
    """A few-step student (`diffusekit distill`): how it is made from its teacher, and the record a checkpoint keeps."""

    method: str = ""  # "" (not distilled) | progressive (Salimans & Ho 2022) | consistency (Song et al. 2023)
    teacher: str = ""  # the run or checkpoint distilled (a record: its weights are kept in every checkpoint)
    teacher_step: int = 0  # the teacher's training steps
    steps: int = 4  # network calls per image the student is distilled for (progressive: the last stage's)
    trained_steps: int = 0  # what a checkpoint's student is trained for so far (progressive: its stage's steps); 0 in a run's config
    start_steps: int = 64  # progressive: the teacher's DDIM steps that the first stage halves (a power of two)
    stage_steps: int = 0  # progressive: optimizer steps per stage; 0: from --train-steps, or measured to fit the budget
    solver_steps: int = 50  # consistency: the teacher ODE's discretisation N (LCM's 50 DDIM steps)
    target_ema: float = 0.95  # consistency: EMA decay of the target network theta^-
    loss: str = "pseudo_huber"  # consistency: pseudo_huber (iCT) | l2
    guidance_min: float = 1.0  # conditional teachers: the guidance scales w ~ U[min, max] the student learns
    guidance_max: float = 5.0


@dataclass
class FinetuneConfig:
    """LoRA fine-tuning of a trained model (`diffusekit finetune`): only low-rank updates of its layers train
    (Hu et al. 2021), optionally with DreamBooth's prior preservation (Ruiz et al. 2023, eq. 2)."""

    base: str = ""  # the base model as given: a run, checkpoint or diffusers folder ("": the shipped demo model)
    base_fingerprint: str = ""  # sha256 of the base U-Net's weights (nn/state.py), checked on resume
    rank: int = 8
    alpha: float = 0.0  # the update is (alpha / rank) B A; 0: alpha = rank
    dropout: float = 0.0  # dropout on the LoRA's input
    targets: tuple[str, ...] = ("attention",)  # presets attention | ff | proj | conv (nn/lora.py) or module-name suffixes
    text_encoder: bool = False  # also a LoRA on the text encoder's attention (captions are then encoded every step)
    prior_prompts: tuple[str, ...] = ()  # prior preservation: class prompts the base model draws prior_images for
    prior_images: int = 0  # how many class images to generate (prompts taking turns); 0: none
    prior_path: str = ""  # or a folder of class images (captions as for data.path, or one prior prompt for all)
    prior_weight: float = 1.0  # lambda: weight of the prior images' loss against the new images'
    prior_seed: int = 0  # seed of the generated class images


@dataclass
class ControlNetConfig:
    """ControlNet training (`diffusekit train-controlnet`, controlnet_training.py): only the ControlNet trains, on a frozen base."""
    base: str = ""  # the base model as given: a run, checkpoint or diffusers folder ("": the shipped demo model)
    base_fingerprint: str = ""  # sha256 of the base U-Net's weights (nn/state.py), checked on resume
    control: str = "canny"  # canny | scribble (annotators.py) | a folder of control images with the training images' file names


@dataclass
class Config:
    description: str = ""
    task: str = "diffusion"  # diffusion | autoencoder (`diffusekit train-vae`) | finetune (`diffusekit finetune`) | controlnet
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
    distill: DistillConfig = field(default_factory=DistillConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    controlnet: ControlNetConfig = field(default_factory=ControlNetConfig)


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
    "train.checkpoint_minutes",
    "train.keep_checkpoints",
    "train.on_nan",
    "train.precision",  # the weights stay float32 whatever the autocast dtype
    "train.compile",
    "train.batch_size",  # the data position is counted in images, so the batch (and the number of processes) may change
    "train.grad_accumulation",
    "distill.trained_steps",  # each checkpoint records its own
    "finetune.base",  # the same base may be given by another path: its fingerprint must match (finetune.py checks it)
    "finetune.base_fingerprint",
    "controlnet.base", "controlnet.base_fingerprint",  # as finetune's (controlnet_training.py checks the fingerprint)
}
RESUMABLE_SECTIONS = {"sample", "eval"}


# ----------------------------------------------------------------------------- typing


def _field_types(cls) -> dict[str, typing.Any]:
    return typing.get_type_hints(cls)


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
            changes[name] = coerce_value(value, str, name)
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
            fixed[key] = coerce_value(item, hints[key], f"{name}.{key}")
        changes[name] = dataclasses.replace(getattr(config, name), **fixed)
    return dataclasses.replace(config, **changes)


def config_to_dict(config: Config) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(config)))


def config_from_dict(values: dict, where: str = "config") -> Config:
    return validate(update_config(Config(), values, where))


def apply_overrides(config: Config, assignments=(), values: dict | None = None, where: str = "the command line") -> Config:
    """Apply `--set section.key=value` strings, then `values` ({"train.max_steps": 500}: Python values a command's own
    flags give, set as they are, with no text round trip; they win over --set), then check the whole config once."""
    changes = []
    for text in assignments:
        if "=" not in text:
            raise ConfigError(f"--set expects key=value, got '{text}'; e.g. --set train.lr=2e-4")
        key, raw = (part.strip() for part in text.split("=", 1))
        changes.append((key, parse_cli_value(raw), "--set"))
    changes += [(key, value, where) for key, value in (values or {}).items() if value is not None]
    for key, value, source in changes:
        if key not in all_keys():
            raise _unknown_key(key, all_keys(), source)
        if key in TOP_LEVEL_KEYS:
            config = update_config(config, {key: str(value)}, source)
            continue
        section, name = key.split(".", 1)
        config = update_config(config, {section: {name: value}}, source)
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
