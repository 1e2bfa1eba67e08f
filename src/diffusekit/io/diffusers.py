"""Stable Diffusion / diffusers folders: read them into diffusekit, write diffusekit models as them.

    Pipeline.from_pretrained("stable-diffusion-v1-5/")  # a pipeline folder (model_index.json) ...
    Pipeline.from_pretrained("ddpm-cifar10-32/unet")    # ... or a lone UNet2DModel folder
    export_diffusers("runs/emoji-ldm", "out/")          # `diffusekit export RUN --format diffusers OUT/`

Parameter names already match (nn/unet.py and nn/vae.py use diffusers' names), so the
work is in the configs. One table per component lists every diffusers config key that
diffusekit knows: the diffusekit field it becomes (and is written from on export), the
keys diffusekit builds at one value only, the keys that change nothing here (and why),
and the keys that functions below work out (block types, head counts). A key or value
outside the table is a UserError naming it. Weights come from safetensors files; a
`.bin` file is read only with torch.load(weights_only=True), which runs no pickled code.
diffusers itself is never imported: the folders are plain JSON and safetensors.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from diffusekit.config import Config, config_from_dict
from diffusekit.nn.vae import VAEConfig
from diffusekit.errors import ConfigError, UserError
from diffusekit.runtime import warn
from diffusekit.io.checkpoint import read_json as checkpoint_read_json
from diffusekit.io.checkpoint import load_state_dict_checked, load_weights, read_tensors, resolve_checkpoint, write_json_atomic

REQUIRED = object()  # a key without a default: the config must have it
FORMAT_VERSION = "0.30.0"  # the _diffusers_version written on export (a release whose format every later one reads)


@dataclass(frozen=True)
class Key:
    """One diffusers config key.

    how: "rename" (becomes `field`), "fixed" (diffusekit builds only `default`, which export writes),
    "ignore" (changes nothing in diffusekit's output: `why`), "derive" (read and written by a function here).
    default: diffusers' value when the key is absent. values: diffusers spelling -> diffusekit spelling.
    per_level: diffusers allows a list (one value per level); diffusekit takes one value for all.
    """

    name: str
    how: str
    field: str = ""
    default: Any = None
    values: dict | None = None
    why: str = ""
    per_level: bool = False


def rename(name: str, field: str, default: Any = REQUIRED, values: dict | None = None, per_level: bool = False) -> Key:
    return Key(name, "rename", field, default, values, per_level=per_level)


def fixed(name: str, value: Any) -> Key:
    return Key(name, "fixed", default=value)


def ignored(name: str, why: str) -> Key:
    return Key(name, "ignore", why=why)


def derived(name: str, default: Any = REQUIRED) -> Key:
    return Key(name, "derive", default=default)


UNET_COMMON = [
    rename("block_out_channels", "model.channels"),
    rename("norm_num_groups", "model.norm_groups", 32),
    rename("dropout", "model.dropout", 0.0),
    rename("layers_per_block", "model.layers_per_block", 2, per_level=True),
    derived("in_channels"), derived("out_channels"), derived("sample_size", None),
    derived("down_block_types"), derived("up_block_types"), derived("mid_block_type"), derived("attention_head_dim", 8),
    fixed("center_input_sample", False), fixed("flip_sin_to_cos", True), fixed("freq_shift", 0),
    fixed("act_fn", "silu"), fixed("norm_eps", 1e-5), fixed("downsample_padding", 1), fixed("mid_block_scale_factor", 1),
    fixed("resnet_time_scale_shift", "default"), fixed("time_embedding_type", "positional"), fixed("time_embedding_dim", None),
    fixed("class_embed_type", None),
]
UNET_TABLES = {
    "UNet2DModel": UNET_COMMON + [
        derived("add_attention", True), derived("attn_norm_num_groups", None), derived("num_class_embeds", None),
        fixed("downsample_type", "conv"), fixed("upsample_type", "conv"),
        ignored("num_train_timesteps", "used only by diffusers' learned time embedding, not the positional one"),
    ],
    "UNet2DConditionModel": UNET_COMMON + [
        rename("use_linear_projection", "model.linear_projection", False),
        rename("cross_attention_dim", "model.cross_attention_dim", per_level=True),
        rename("transformer_layers_per_block", "model.transformer_layers", 1, per_level=True),
        derived("num_attention_heads", None),
        fixed("num_class_embeds", None), fixed("only_cross_attention", False), fixed("dual_cross_attention", False),
        fixed("reverse_transformer_layers_per_block", None), fixed("encoder_hid_dim", None), fixed("encoder_hid_dim_type", None),
        fixed("addition_embed_type", None), fixed("addition_time_embed_dim", None), fixed("resnet_skip_time_act", False),
        fixed("resnet_out_scale_factor", 1.0), fixed("time_embedding_act_fn", None), fixed("timestep_post_act", None),
        fixed("time_cond_proj_dim", None), fixed("conv_in_kernel", 3), fixed("conv_out_kernel", 3),
        fixed("projection_class_embeddings_input_dim", None), fixed("attention_type", "default"),
        fixed("class_embeddings_concat", False), fixed("mid_block_only_cross_attention", None), fixed("cross_attention_norm", None),
        ignored("upcast_attention", "diffusekit's attention already runs in float32 unless bf16 autocast is on"),
        ignored("addition_embed_type_num_heads", "used only with an addition_embed_type"),
    ],
}


@dataclass(frozen=True)
class BlockNames:
    down: str
    attention_down: str
    up: str
    attention_up: str
    mid: str


BLOCKS = {
    "UNet2DModel": BlockNames("DownBlock2D", "AttnDownBlock2D", "UpBlock2D", "AttnUpBlock2D", "UNetMidBlock2D"),
    "UNet2DConditionModel": BlockNames("DownBlock2D", "CrossAttnDownBlock2D", "UpBlock2D", "CrossAttnUpBlock2D", "UNetMidBlock2DCrossAttn"),
}

VAE_KEYS = [
    rename("block_out_channels", "vae.channels"),
    rename("layers_per_block", "vae.layers_per_block", 1),
    rename("latent_channels", "vae.latent_channels", 4),
    rename("norm_num_groups", "vae.norm_groups", 32),
    rename("scaling_factor", "vae.scale_factor", 0.18215),
    derived("shift_factor", None), derived("in_channels", 3), derived("out_channels", 3),
    derived("down_block_types"), derived("up_block_types"),
    fixed("act_fn", "silu"), fixed("latents_mean", None), fixed("latents_std", None), fixed("use_quant_conv", True),
    fixed("use_post_quant_conv", True), fixed("mid_block_add_attention", True),
    ignored("sample_size", "the tile size of diffusers' tiled decoding"),
    ignored("force_upcast", "diffusekit decodes in float32"),
]
VAE_BLOCKS = ("DownEncoderBlock2D", "UpDecoderBlock2D")

# Scheduler keys not listed here only tune diffusers' own sampler, so they are ignored.
SCHEDULER_KEYS = [
    rename("num_train_timesteps", "diffusion.timesteps", 1000),
    rename("beta_start", "diffusion.beta_start", 0.0001),
    rename("beta_end", "diffusion.beta_end", 0.02),
    rename("beta_schedule", "diffusion.schedule", "linear",
           {"linear": "linear", "scaled_linear": "scaled_linear", "squaredcos_cap_v2": "cosine", "sigmoid": "sigmoid"}),
    rename("prediction_type", "diffusion.prediction", "epsilon", {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}),
    rename("rescale_betas_zero_snr", "diffusion.zero_terminal_snr", False),
    rename("steps_offset", "sample.steps_offset", 0),
    rename("variance_type", "sample.variance", "fixed_small", {"fixed_small": "fixed_small", "fixed_large": "fixed_large"}),
    fixed("trained_betas", None),
    derived("timestep_spacing", None), derived("use_karras_sigmas", False), derived("use_lu_lambdas", False),
    ignored("clip_sample", "diffusekit's samplers never clip x0_hat (a warning says so when it is true)"),
    ignored("thresholding", "diffusekit's samplers never threshold x0_hat (a warning says so when it is true)"),
]
SPACINGS = ("leading", "trailing", "linspace")
LEADING_BY_DEFAULT = {"DDIMScheduler", "DDPMScheduler", "PNDMScheduler"}  # the others default to linspace

# diffusekit sampler -> (diffusers scheduler class, keys that pick the same method, keys export also writes)
SCHEDULERS = {
    "ddim": ("DDIMScheduler", {}, {"clip_sample": False, "set_alpha_to_one": True}),
    "ddpm": ("DDPMScheduler", {}, {"clip_sample": False}),
    "euler": ("EulerDiscreteScheduler", {}, {}),
    "euler_ancestral": ("EulerAncestralDiscreteScheduler", {}, {}),
    "heun": ("HeunDiscreteScheduler", {}, {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}, {}),
    "dpmpp_2m_sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}, {}),
    "dpmpp_3m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 3}, {}),
}
FALLBACK_SAMPLER = "dpmpp_2m"  # for schedulers diffusekit has no twin of (PNDM, LMS, UniPC, ...)

READ_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
SKIPPED_COMPONENTS = ("safety_checker", "feature_extractor", "image_encoder")  # not part of sampling
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors", "diffusion_pytorch_model.bin")
SD_GUIDANCE = 7.5  # StableDiffusionPipeline's default guidance scale


# ----------------------------------------------------------------------------- tables, both ways


def same(value: Any, expected: Any) -> bool:
    """A config value equals the supported one (a per-level list of it counts too)."""
    if isinstance(value, list) and not isinstance(expected, list):
        return all(same(v, expected) for v in value)
    return value == expected and isinstance(value, bool) == isinstance(expected, bool)


def check_keys(cfg: dict, table: list[Key], where: str, unknown: str = "error") -> None:
    """Every key of a diffusers config must be in the table, and fixed keys at their one value."""
    known = {key.name: key for key in table}
    for name, value in cfg.items():
        key = known.get(name)
        if name.startswith("_") or (key and key.how != "fixed"):
            continue
        if key is None and unknown == "error" and value not in (None, False, [], {}):
            raise UserError(f"{where}: {name} = {value!r} is not a key diffusekit knows, so it cannot tell what it changes; remove it if it is off")
        if key is not None and not same(value, key.default):
            raise UserError(f"{where}: {name} = {value!r} is not supported; diffusekit builds only {name} = {json.dumps(key.default)}")


def value_of(cfg: dict, key: Key, where: str) -> Any:
    """A renamed key's value, in diffusekit's spelling."""
    value = cfg.get(key.name, key.default)
    if value is REQUIRED:
        raise UserError(f"{where} has no '{key.name}'; it is not a complete diffusers config")
    if key.per_level and isinstance(value, list):
        if not value or any(v != value[0] for v in value) or isinstance(value[0], list):
            raise UserError(f"{where}: {key.name} = {value!r} differs between levels; diffusekit uses one value for every level")
        value = value[0]
    if key.values is not None:
        if not isinstance(value, str) or value not in key.values:
            raise UserError(f"{where}: {key.name} = {value!r} is not supported; diffusekit reads {', '.join(key.values)}")
        value = key.values[value]
    return value


def read_renamed(cfg: dict, table: list[Key], where: str) -> dict[str, Any]:
    """{diffusekit field: value} for the table's renamed keys."""
    return {key.field: value_of(cfg, key, where) for key in table if key.how == "rename"}


def write_renamed(config: Config, table: list[Key]) -> dict[str, Any]:
    """The table's renamed and fixed keys, as diffusers spells them, from a diffusekit config."""
    out = {}
    for key in table:
        if key.how == "fixed":
            out[key.name] = key.default
        elif key.how == "rename":
            section, name = key.field.split(".")
            value = getattr(getattr(config, section), name)
            if key.values is not None:
                value = {ours: theirs for theirs, ours in key.values.items()}[value]
            out[key.name] = list(value) if isinstance(value, tuple) else value
    return out


def nest(fields: dict[str, Any]) -> dict[str, dict]:
    """{"model.channels": v} -> {"model": {"channels": v}}, the shape config_from_dict reads."""
    values: dict[str, dict] = {}
    for dotted, value in fields.items():
        section, name = dotted.split(".")
        values.setdefault(section, {})[name] = value
    return values




# ----------------------------------------------------------------------------- the U-Net


def unet_fields(cfg: dict, where: str) -> dict[str, Any]:
    """diffusekit config fields (model.*) of a UNet2DModel / UNet2DConditionModel config."""
    kind = cfg.get("_class_name")
    if kind not in UNET_TABLES:
        raise UserError(f"{where}: _class_name = {kind!r} is not supported; diffusekit reads {', '.join(UNET_TABLES)}")
    table = UNET_TABLES[kind]
    check_keys(cfg, table, where)
    fields = read_renamed(cfg, table, where)
    channels = fields["model.channels"]
    levels, mid = attention_from_blocks(cfg, BLOCKS[kind], len(channels), where)
    fields.update({"model.attention_levels": levels, "model.mid_attention": mid})
    fields.update(heads_fields(cfg, kind, channels, sorted(set(levels) | ({len(channels) - 1} if mid else set())), where))
    if kind == "UNet2DModel":
        if cfg.get("attn_norm_num_groups") not in (None, fields["model.norm_groups"]):
            raise UserError(f"{where}: attn_norm_num_groups = {cfg['attn_norm_num_groups']!r} is not supported; diffusekit's attention norms use norm_num_groups")
        fields["model.num_classes"] = class_count(cfg.get("num_class_embeds"), where)
    return fields


def attention_from_blocks(cfg: dict, names: BlockNames, count: int, where: str) -> tuple[tuple[int, ...], bool]:
    """(levels with attention, mid-block attention) from the block types; up blocks must mirror the down ones."""
    down, up = cfg.get("down_block_types"), cfg.get("up_block_types")
    for key, blocks in (("down_block_types", down), ("up_block_types", up)):
        if not isinstance(blocks, list) or len(blocks) != count:
            raise UserError(f"{where}: {key} = {blocks!r} needs one block per entry of block_out_channels ({count})")
    for i, block in enumerate(down):
        if block not in (names.down, names.attention_down):
            raise UserError(f"{where}: down_block_types[{i}] = {block!r} is not supported; diffusekit reads {names.down}, {names.attention_down}")
    levels = tuple(i for i, block in enumerate(down) if block == names.attention_down)
    for j, block in enumerate(up):
        level = count - 1 - j
        want = names.attention_up if level in levels else names.up
        if block != want:
            raise UserError(f"{where}: up_block_types[{j}] = {block!r} is not supported; diffusekit's up blocks mirror the down "
                            f"blocks, so with down_block_types[{level}] = {down[level]!r} it must be {want!r}")
    mid = cfg.get("mid_block_type", names.mid)
    if mid != names.mid:
        raise UserError(f"{where}: mid_block_type = {mid!r} is not supported; diffusekit reads {names.mid}")
    return levels, (bool(cfg.get("add_attention", True)) if names.mid == "UNetMidBlock2D" else True)


def heads_fields(cfg: dict, kind: str, channels: list[int], used: list[int], where: str) -> dict[str, int]:
    """model.attention_heads / attention_head_dim from diffusers' head settings, checked at the levels that attend."""
    if kind == "UNet2DModel":  # attention_head_dim is a head width; None means one head per block
        width = cfg.get("attention_head_dim", 8)
        return {"model.attention_heads": 1} if width is None else {"model.attention_heads": 0, "model.attention_head_dim": width}
    # UNet2DConditionModel calls the head COUNT attention_head_dim (a diffusers misnomer kept for Stable Diffusion 1.x)
    name = "num_attention_heads" if cfg.get("num_attention_heads") is not None else "attention_head_dim"
    heads = cfg.get(name, 8)
    per_level = heads if isinstance(heads, list) else [heads] * len(channels)
    if len(per_level) != len(channels):
        raise UserError(f"{where}: {name} = {heads!r} needs one head count per entry of block_out_channels ({len(channels)})")
    counts = {per_level[i] for i in used}
    if len(counts) <= 1:
        return {"model.attention_heads": counts.pop() if counts else 8}
    widths = {channels[i] / per_level[i] for i in used}
    if len(widths) == 1 and float(next(iter(widths))).is_integer():
        return {"model.attention_heads": 0, "model.attention_head_dim": int(widths.pop())}
    raise UserError(f"{where}: {name} = {heads!r} gives neither one head count nor one head width at the levels with attention; diffusekit builds one or the other")


def class_count(num_class_embeds: int | None, where: str) -> int:
    """diffusekit's class embedding has num_classes + 1 rows: the last one is the null class of guidance."""
    if num_class_embeds is None:
        return 0
    if not isinstance(num_class_embeds, int) or num_class_embeds < 2:
        raise UserError(f"{where}: num_class_embeds = {num_class_embeds!r} is not supported; diffusekit needs at least 2 (classes plus a null class)")
    return num_class_embeds - 1


def unet_config(config: Config) -> dict:
    """The diffusers config.json of diffusekit's U-Net: UNet2DConditionModel with text, else UNet2DModel."""
    from diffusekit.pipeline import image_shape

    m = config.model
    kind = "UNet2DConditionModel" if m.cross_attention_dim else "UNet2DModel"
    names = BLOCKS[kind]
    in_channels, size, _ = image_shape(config)
    levels = len(m.channels)
    out = {"_class_name": kind, "_diffusers_version": FORMAT_VERSION, "in_channels": in_channels, "out_channels": in_channels, "sample_size": size,
           **write_renamed(config, UNET_TABLES[kind]), "mid_block_type": names.mid,
           "down_block_types": [names.attention_down if i in m.attention_levels else names.down for i in range(levels)],
           "up_block_types": [names.attention_up if i in m.attention_levels else names.up for i in reversed(range(levels))]}
    used = sorted(set(m.attention_levels) | ({levels - 1} if m.mid_attention else set()))
    if kind == "UNet2DModel":
        out.update(add_attention=m.mid_attention, attention_head_dim=unet2d_head_width(m, used),
                   num_class_embeds=m.num_classes + 1 if m.num_classes else None)
        return out
    if not m.mid_attention:
        raise UserError("model.mid_attention = false has no UNet2DConditionModel equivalent (its mid block always attends)")
    heads = m.attention_heads or [max(1, ch // m.attention_head_dim) for ch in m.channels]
    return {**out, "attention_head_dim": heads}


def unet2d_head_width(m, used: list[int]) -> int | None:
    """UNet2DModel's attention_head_dim: a head width, or None for one head per block."""
    if not m.attention_heads:
        return m.attention_head_dim
    if m.attention_heads == 1:
        return None
    widths = {m.channels[i] // m.attention_heads for i in used}
    if len(widths) > 1:
        raise UserError(f"model.attention_heads = {m.attention_heads} gives heads of widths {sorted(widths)}; UNet2DModel has one head width for all levels")
    return widths.pop() if widths else m.attention_head_dim




# ----------------------------------------------------------------------------- the VAE and the scheduler


def vae_fields(cfg: dict, where: str) -> dict[str, Any]:
    if cfg.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
        raise UserError(f"{where}: _class_name = {cfg['_class_name']!r} is not supported; diffusekit reads AutoencoderKL")
    check_keys(cfg, VAE_KEYS, where)
    fields = read_renamed(cfg, VAE_KEYS, where)
    count = len(fields["vae.channels"])
    for key, block in zip(("down_block_types", "up_block_types"), VAE_BLOCKS):
        blocks = cfg.get(key)
        if blocks != [block] * count:
            raise UserError(f"{where}: {key} = {blocks!r} is not supported; diffusekit reads {count} x {block}")
    if cfg.get("in_channels", 3) != cfg.get("out_channels", 3):
        raise UserError(f"{where}: in_channels = {cfg.get('in_channels')} and out_channels = {cfg.get('out_channels')} differ; diffusekit's autoencoder gives back what it takes")
    fields["vae.shift_factor"] = cfg.get("shift_factor") or 0.0
    fields["data.channels"] = cfg.get("in_channels", 3)
    return fields


def vae_config(config: Config) -> dict:
    v = config.vae
    return {"_class_name": "AutoencoderKL", "_diffusers_version": FORMAT_VERSION, **write_renamed(config, VAE_KEYS),
            "in_channels": config.data.channels, "out_channels": config.data.channels, "sample_size": config.data.image_size,
            "down_block_types": [VAE_BLOCKS[0]] * len(v.channels), "up_block_types": [VAE_BLOCKS[1]] * len(v.channels),
            "shift_factor": v.shift_factor or None}


def scheduler_fields(cfg: dict, where: str) -> dict[str, Any]:
    """diffusion.* (the noise schedule) and sample.* (default sampler and spacing) from a scheduler config."""
    check_keys(cfg, SCHEDULER_KEYS, where, unknown="ignore")
    fields = read_renamed(cfg, SCHEDULER_KEYS, where)
    kind = cfg.get("_class_name", "")
    fields["sample.sampler"] = next((sampler for sampler, (cls, picks, _) in SCHEDULERS.items()
                                     if cls == kind and all(cfg.get(k, v) == v for k, v in picks.items())), FALLBACK_SAMPLER)
    spacing = cfg.get("timestep_spacing") or ("leading" if kind in LEADING_BY_DEFAULT else "linspace")
    if spacing not in SPACINGS:
        raise UserError(f"{where}: timestep_spacing = {spacing!r} is not supported; diffusekit reads {', '.join(SPACINGS)}")
    fields["sample.spacing"] = "karras" if cfg.get("use_karras_sigmas") else "logsnr" if cfg.get("use_lu_lambdas") else spacing
    if cfg.get("clip_sample") or cfg.get("thresholding"):
        warn(f"{where}: clip_sample / thresholding is on; diffusekit's samplers never clip x0_hat, so samples can differ a little from diffusers' DDPM/DDIM")
    return fields


def scheduler_config(config: Config) -> dict:
    """A scheduler config for diffusekit's default sampler, spacing and noise schedule."""
    cls, picks, extras = SCHEDULERS[config.sample.sampler]
    spacing = config.sample.spacing
    out = {"_class_name": cls, "_diffusers_version": FORMAT_VERSION, **write_renamed(config, SCHEDULER_KEYS), **picks, **extras,
           "timestep_spacing": spacing if spacing in SPACINGS else "trailing"}
    if spacing == "karras":
        out["use_karras_sigmas"] = True
    if not config.diffusion.zero_terminal_snr:
        del out["rescale_betas_zero_snr"]  # not every scheduler class has the key; false is everyone's default
    if cls != "DDPMScheduler":
        del out["variance_type"]  # DDPM's alone
    return out


# ----------------------------------------------------------------------------- reading a folder


@dataclass(frozen=True)
class Folder:
    """Where a diffusers model's parts are (None: absent)."""

    root: Path
    unet: Path
    scheduler: Path | None = None  # the scheduler_config.json
    vae: Path | None = None
    text_encoder: Path | None = None
    pipeline: str = ""  # model_index.json's _class_name; "" for a lone UNet

    def read(self, path: Path) -> tuple[dict, str]:
        """(a config file's contents, its name as messages show it: relative to the folder the user gave)."""
        where = str(path.relative_to(self.root)) if path.is_relative_to(self.root) else str(path)
        return read_json(path, where), where


def is_diffusers_folder(path: str | Path) -> bool:
    """A pipeline folder (model_index.json) or a model folder whose config.json names a diffusers class."""
    path = Path(path)
    if (path / "model_index.json").is_file():
        return True
    try:
        return "_class_name" in json.loads((path / "config.json").read_text())
    except (OSError, ValueError, TypeError):
        return False


def read_json(path: Path, where: str) -> dict:
    return checkpoint_read_json(path, where, container="the diffusers folder")


def find_parts(path: Path) -> Folder:
    """The component folders of a pipeline folder, or a lone UNet folder with a scheduler config beside it or in ../scheduler."""
    if not (path / "model_index.json").is_file():
        beside = [path / "scheduler_config.json", path.parent / "scheduler" / "scheduler_config.json"]
        return Folder(path, path, scheduler=next((p for p in beside if p.is_file()), None))
    index = read_json(path / "model_index.json", "model_index.json")
    parts = {}
    for name, value in index.items():
        if name.startswith("_") or not isinstance(value, list) or value[:1] == [None] or name in SKIPPED_COMPONENTS:
            continue  # metadata, flags, absent parts ([null, null]) and parts that do not take part in sampling
        if name not in READ_COMPONENTS:
            raise UserError(f"model_index.json: component {name} = {value!r} is not supported; diffusekit reads {', '.join(READ_COMPONENTS)} "
                            f"(and skips {', '.join(SKIPPED_COMPONENTS)})")
        if not (path / name).is_dir():
            raise UserError(f"model_index.json lists {name}, but '{path / name}' is not a folder; the diffusers folder is incomplete")
        parts[name] = path / name
    if "unet" not in parts:
        raise UserError(f"model_index.json of {index.get('_class_name', 'this pipeline')} has no unet; diffusekit reads U-Net pipelines")
    scheduler = parts["scheduler"] / "scheduler_config.json" if "scheduler" in parts else None
    return Folder(path, parts["unet"], scheduler, parts.get("vae"), parts.get("text_encoder"), index.get("_class_name", ""))


def read_config(folder: Folder) -> Config:
    """The diffusekit Config of a diffusers folder."""
    unet_cfg, where = folder.read(folder.unet / "config.json")
    fields = unet_fields(unet_cfg, where)
    if folder.scheduler is not None:
        fields.update(scheduler_fields(*folder.read(folder.scheduler)))
    in_channels, out_channels = unet_cfg.get("in_channels"), unet_cfg.get("out_channels")
    if in_channels != out_channels:
        raise UserError(f"{where}: out_channels = {out_channels} differs from in_channels = {in_channels} (a model that also predicts "
                        "its variance?); diffusekit's U-Net predicts one target shaped like its input")
    size = unet_cfg.get("sample_size") or 64
    size = size[0] if isinstance(size, list) else size
    if folder.vae is not None:
        fields.update(vae_fields(*folder.read(folder.vae / "config.json")))
        if in_channels != fields["vae.latent_channels"]:
            raise UserError(f"{where}: in_channels = {in_channels}, but the VAE has {fields['vae.latent_channels']} latent channels "
                            "(an inpainting or image-variation U-Net?); diffusekit's U-Net takes the latents alone")
        fields["latent.vae"] = str(folder.vae)
        size *= VAEConfig(channels=tuple(fields["vae.channels"])).downsample_factor
    else:
        fields["data.channels"] = in_channels
    fields["data.image_size"] = size
    fields["data.dataset"] = "none"  # imported: no training data, so evaluation needs an explicit --ref
    if fields.get("model.cross_attention_dim"):
        if folder.text_encoder is None:
            raise UserError(f"{where}: a {unet_cfg['_class_name']} needs its pipeline's text encoder: give the folder with model_index.json and text_encoder/")
        fields.update({"text.encoder": str(folder.text_encoder), "text.max_length": tokenizer_length(folder.text_encoder.parent / "tokenizer"),
                       "text.mask_padding": False, "sample.guidance": SD_GUIDANCE})
    description = f"{folder.pipeline or unet_cfg['_class_name']} from {folder.root} (diffusers)"
    try:
        return config_from_dict({"description": description, **nest(fields)}, where=str(folder.root))
    except ConfigError as err:
        raise UserError(f"{folder.root}: this diffusers model does not fit diffusekit's: {err}") from None


def tokenizer_length(folder: Path, default: int = 77) -> int:
    """The tokenizer's model_max_length: what diffusers pads prompts to (77 for CLIP)."""
    path = folder / "tokenizer_config.json"
    length = read_json(path, str(path)).get("model_max_length") if path.is_file() else None
    return length if isinstance(length, int) and 2 <= length < 10**6 else default  # tokenizers without a limit say ~1e30


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """A diffusers model folder's weights: safetensors (one file or shards), else a .bin read without running pickled code."""
    shards = folder / f"{WEIGHT_FILES[0]}.index.json"
    if shards.is_file():
        names = sorted(set(read_json(shards, str(shards)).get("weight_map", {}).values()))
        return {key: value for name in names for key, value in read_tensors(folder / name).items()}
    for name in WEIGHT_FILES:
        path = folder / name
        if path.is_file() and name.endswith(".safetensors"):
            return read_tensors(path)
        if path.is_file():
            try:
                return torch.load(path, map_location="cpu", weights_only=True)
            except Exception as err:  # the unpickler refuses anything but tensors and plain containers
                raise UserError(f"cannot read '{path}' safely ({type(err).__name__}: {err}); convert it to safetensors") from None
    raise UserError(f"'{folder}' has no weights: expected {WEIGHT_FILES[0]} (or {', '.join(WEIGHT_FILES[1:])})")


def load_pipeline(path: str | Path, device: str = "auto"):
    """A diffusekit Pipeline from a diffusers pipeline folder or a lone UNet2DModel folder."""
    from diffusekit.pipeline import Pipeline, build_text_encoder, build_unet, build_vae
    from diffusekit.runtime import pick_device, prepare_module

    folder = find_parts(Path(path))
    config = read_config(folder)
    dev = pick_device(device)
    net = build_unet(config)
    load_state_dict_checked(net, read_weights(folder.unet), source=str(folder.unet))
    vae = None
    if folder.vae is not None:
        vae = build_vae(config)
        load_state_dict_checked(vae, read_weights(folder.vae), source=str(folder.vae))
        vae = prepare_module(vae, dev)
    return Pipeline(config, prepare_module(net, dev), dev, checkpoint=folder.root, vae=vae, text_encoder=build_text_encoder(config, dev))


# ----------------------------------------------------------------------------- export

PIPELINE_PARTS = {"DDPMPipeline": ["unet", "scheduler"], "StableDiffusionPipeline": ["unet", "vae", "text_encoder", "scheduler"]}


def text_model_type(encoder: str) -> str:
    from diffusekit.nn.text import encoder_folder

    model_folder, _ = encoder_folder(encoder)
    return str(read_json(model_folder / "config.json", f"{model_folder}/config.json").get("model_type", "unknown"))


def pipeline_class(config: Config) -> tuple[str | None, str]:
    """(the diffusers pipeline that samples this model as diffusekit does, or None; why there is none)."""
    if not config.latent.vae:
        if config.text.encoder:
            return None, "diffusers has no pipeline for a pixel-space text-to-image model (StableDiffusionPipeline works in a VAE's latent space)"
        return "DDPMPipeline", ""
    if not config.text.encoder:
        return None, "diffusers has no pipeline for a latent model without text (its LDMPipeline decodes with a VQ autoencoder, not a KL one)"
    model_type = text_model_type(config.text.encoder)
    if model_type != "clip_text_model":
        return None, (f"StableDiffusionPipeline needs a CLIPTextModel text encoder, and this model's text.encoder "
                      f"{config.text.encoder!r} is a {model_type} model")
    if config.text.mask_padding:
        return None, ("the model was trained with text.mask_padding = true (its cross-attention skips padding tokens), "
                      "but StableDiffusionPipeline attends to them, so it would draw other images")
    return "StableDiffusionPipeline", ""


def export_parts(config: Config, components: list[str] | None, run: str) -> tuple[str | None, list[str]]:
    """(pipeline class or None, the components to write), or a UserError saying what cannot be exported and why."""
    available = ["unet", "scheduler"] + (["vae"] if config.latent.vae else []) + (["text_encoder"] if config.text.encoder else [])
    if components is None:
        pipeline, why = pipeline_class(config)
        if pipeline is None:
            raise UserError(f"'{run}' cannot be exported as a diffusers pipeline: {why}. "
                            f"Its parts can be exported alone, e.g. --components {','.join(available)}")
        return pipeline, PIPELINE_PARTS[pipeline]
    for name in components:
        if name not in available:
            raise UserError(f"--components {name}: this model has no such part to export; it has {', '.join(available)}")
    return None, list(components)


def export_diffusers(run: str | Path, out: str | Path, components: list[str] | None = None, weights: str = "ema") -> list[str]:
    """Write a diffusekit run or checkpoint as a diffusers folder; returns notes for the user.

    Without `components`: a pipeline folder (DDPMPipeline for a pixel model, StableDiffusionPipeline for a
    latent text-to-image model with a CLIP text encoder). With them: just those component folders.
    """
    from diffusekit.pipeline import build_unet, build_vae, load_config

    ckpt = resolve_checkpoint(run)
    config = load_config(ckpt)
    if config.task != "diffusion":
        raise UserError(f"'{run}' holds an {config.task}, not a diffusion model; export a diffusion run (it carries its autoencoder)")
    pipeline, parts = export_parts(config, components, str(run))
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"'{out}' already exists and is not an empty folder; export into a new folder")
    tmp = out.parent / f".{out.name}.tmp"  # written in full, then renamed into place
    shutil.rmtree(tmp, ignore_errors=True)
    index = {"_class_name": pipeline, "_diffusers_version": FORMAT_VERSION}
    try:
        if "unet" in parts:
            net = build_unet(config)
            load_state_dict_checked(net, load_weights(ckpt, weights), source=str(ckpt))
            unet_json = unet_config(config)
            write_model(tmp / "unet", unet_json, net)
            index["unet"] = ["diffusers", unet_json["_class_name"]]
        if "vae" in parts:
            vae = build_vae(config)
            load_state_dict_checked(vae, read_tensors(ckpt / "vae.safetensors"), source=str(ckpt))
            write_model(tmp / "vae", vae_config(config), vae)
            index["vae"] = ["diffusers", "AutoencoderKL"]
        if "text_encoder" in parts:
            index.update(copy_text_encoder(config, tmp))
        if "scheduler" in parts:
            scheduler = scheduler_config(config)
            (tmp / "scheduler").mkdir(parents=True)
            write_json_atomic(tmp / "scheduler" / "scheduler_config.json", scheduler)
            index["scheduler"] = ["diffusers", scheduler["_class_name"]]
        if pipeline == "StableDiffusionPipeline":
            index.update({name: [None, None] for name in SKIPPED_COMPONENTS}, requires_safety_checker=False)
        if pipeline is not None:
            write_json_atomic(tmp / "model_index.json", index)
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return export_notes(config, pipeline)


def write_model(folder: Path, config_json: dict, module: torch.nn.Module) -> None:
    folder.mkdir(parents=True)
    write_json_atomic(folder / "config.json", config_json)
    save_file({k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}, str(folder / WEIGHT_FILES[0]))


def copy_text_encoder(config: Config, out: Path) -> dict[str, list]:
    """Copy the text encoder and tokenizer folders; the tokenizer pads to the length diffusekit used. Returns model_index entries."""
    from diffusekit.nn.text import encoder_folder

    model_folder, tokenizer_folder = encoder_folder(config.text.encoder)
    shutil.copytree(model_folder, out / "text_encoder")
    shutil.copytree(tokenizer_folder, out / "tokenizer")
    model_settings = read_json(model_folder / "config.json", str(model_folder / "config.json"))
    settings_file = out / "tokenizer" / "tokenizer_config.json"
    settings = read_json(settings_file, str(settings_file)) if settings_file.is_file() else {}
    positions = model_settings.get("max_position_embeddings", 10**6)
    length = min(config.text.max_length, positions, tokenizer_length(out / "tokenizer", default=10**6))  # as TextEncoder computes it
    if settings.get("model_max_length") != length:  # diffusers pads every prompt to model_max_length tokens
        write_json_atomic(settings_file, {**settings, "model_max_length": length})
    model_class = (model_settings.get("architectures") or ["CLIPTextModel"])[0]
    return {"text_encoder": ["transformers", model_class], "tokenizer": ["transformers", settings.get("tokenizer_class", "CLIPTokenizer")]}


def export_notes(config: Config, pipeline: str | None) -> list[str]:
    """Where diffusers will not sample exactly as diffusekit does."""
    notes, s = [], config.sample
    if config.model.num_classes:
        notes.append(f"the UNet2DModel has num_class_embeds = {config.model.num_classes + 1} (label {config.model.num_classes} is the null class); "
                     "call it with class_labels: DDPMPipeline passes none, and UNet2DModel then raises")
    if s.sampler.startswith("dpmpp") and s.spacing in ("leading", "linspace"):
        notes.append(f"diffusers' DPMSolverMultistepScheduler spaces {s.spacing} steps differently from diffusekit (n + 1 points); trailing spacing gives the same timesteps")
    if s.spacing == "logsnr":
        notes.append("diffusers has no log-SNR spacing; the scheduler config says trailing")
    if pipeline == "StableDiffusionPipeline" and s.spacing == "leading" and s.steps_offset != 1:
        notes.append("StableDiffusionPipeline resets steps_offset to 1, so its leading timesteps are one above diffusekit's")
    return notes
