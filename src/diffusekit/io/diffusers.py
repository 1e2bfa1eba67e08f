"""Stable Diffusion / diffusers folders: read them into diffusekit, write diffusekit models as them.

    read_parts("stable-diffusion-v1-5/")  # a pipeline folder (model_index.json) ...
    read_parts("ddpm-cifar10-32/unet")    # ... or a lone UNet2DModel folder (Pipeline.from_pretrained calls it)
    (writing: io/diffusers_export.py, `diffusekit export RUN --format diffusers OUT/`)

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from diffusekit.config import Config, config_from_dict
from diffusekit.errors import ConfigError, UserError, warn
from diffusekit.files import read_json as read_json_object
from diffusekit.files import read_tensors
from diffusekit.io.diffusers_keys import (
    BLOCKS,
    CONTROL_COMPONENTS,
    FALLBACK_SAMPLER,
    FLOW_SCHEDULER_KEYS,
    FLOW_SCHEDULERS,
    FORMAT_VERSION,
    LEADING_BY_DEFAULT,
    READ_COMPONENTS,
    SCHEDULER_KEYS,
    SCHEDULERS,
    SD_GUIDANCE,
    SKIPPED_COMPONENTS,
    SPACINGS,
    UNET_TABLES,
    VAE_BLOCKS,
    VAE_KEYS,
    WEIGHT_FILES,
    BlockNames,
    check_keys,
    nest,
    read_renamed,
    write_renamed,
)
from diffusekit.models import ModelParts, build_parts, image_shape
from diffusekit.nn.vae import VAEConfig

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
    if kind == "UNet2DConditionModel":  # an LCM-style guidance-scale embedding (time_cond_proj_dim)
        fields["model.guidance_embedding"] = cfg.get("time_cond_proj_dim") or 0
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
        if m.guidance_embedding:
            raise UserError("this student takes the guidance scale as an input, and diffusers' UNet2DModel has no such embedding "
                            "(UNet2DConditionModel's time_cond_proj_dim is for text models); export its teacher instead")
        out.update(add_attention=m.mid_attention, attention_head_dim=unet2d_head_width(m, used),
                   num_class_embeds=m.num_classes + 1 if m.num_classes else None)
        return out
    if not m.mid_attention:
        raise UserError("model.mid_attention = false has no UNet2DConditionModel equivalent (its mid block always attends)")
    heads = m.attention_heads or [max(1, ch // m.attention_head_dim) for ch in m.channels]
    return {**out, "attention_head_dim": heads, "time_cond_proj_dim": m.guidance_embedding or None}


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
    kind = cfg.get("_class_name", "")
    if kind in FLOW_SCHEDULERS.values():  # flow matching: the network predicts the velocity eps - x0
        check_keys(cfg, FLOW_SCHEDULER_KEYS, where, unknown="ignore")
        sampler = next(name for name, cls in FLOW_SCHEDULERS.items() if cls == kind)
        return {**read_renamed(cfg, FLOW_SCHEDULER_KEYS, where), "diffusion.process": "flow", "diffusion.prediction": "v",
                "sample.sampler": sampler, "sample.spacing": "linspace"}
    check_keys(cfg, SCHEDULER_KEYS, where, unknown="ignore")
    fields = read_renamed(cfg, SCHEDULER_KEYS, where)
    fields["sample.sampler"] = next((sampler for sampler, (cls, picks, _) in SCHEDULERS.items()
                                     if cls == kind and all(cfg.get(k, v) == v for k, v in picks.items())), FALLBACK_SAMPLER)
    spacing = cfg.get("timestep_spacing") or ("leading" if kind in LEADING_BY_DEFAULT else "linspace")
    if spacing not in SPACINGS:
        raise UserError(f"{where}: timestep_spacing = {spacing!r} is not supported; diffusekit reads {', '.join(SPACINGS)}")
    fields["sample.spacing"] = "karras" if cfg.get("use_karras_sigmas") else "logsnr" if cfg.get("use_lu_lambdas") else spacing
    if kind == "LCMScheduler":  # a consistency model (LCM): its x0_hat is the consistency function
        fields.update({"distill.method": "consistency", "distill.solver_steps": cfg.get("original_inference_steps", 50)})
    if cfg.get("clip_sample") or cfg.get("thresholding"):
        warn(f"{where}: clip_sample / thresholding is on; diffusekit's samplers never clip x0_hat, so samples can differ a little from diffusers' DDPM/DDIM")
    return fields


def scheduler_config(config: Config) -> dict:
    """A scheduler config for diffusekit's default sampler, spacing and noise schedule (a flow model: a FlowMatch scheduler)."""
    if config.diffusion.process == "flow":
        cls = FLOW_SCHEDULERS.get(config.sample.sampler, FLOW_SCHEDULERS["flow_euler"])
        table = FLOW_SCHEDULER_KEYS if cls == FLOW_SCHEDULERS["flow_euler"] else [key for key in FLOW_SCHEDULER_KEYS if key.how == "rename"]
        return {"_class_name": cls, "_diffusers_version": FORMAT_VERSION, **write_renamed(config, table)}
    cls, picks, extras = SCHEDULERS.get(config.sample.sampler, SCHEDULERS[FALLBACK_SAMPLER])
    spacing = config.sample.spacing
    out = {"_class_name": cls, "_diffusers_version": FORMAT_VERSION, **write_renamed(config, SCHEDULER_KEYS), **picks, **extras,
           "timestep_spacing": spacing if spacing in SPACINGS else "trailing"}
    if spacing == "karras":
        out["use_karras_sigmas"] = True
    if not config.diffusion.zero_terminal_snr:
        del out["rescale_betas_zero_snr"]  # not every scheduler class has the key; false is everyone's default
    if cls != "DDPMScheduler":
        del out["variance_type"]  # DDPM's alone
    if cls == "LCMScheduler":
        out["original_inference_steps"] = config.distill.solver_steps
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
    return read_json_object(path, where, container="the diffusers folder")


def find_parts(path: Path) -> Folder:
    """The component folders of a pipeline folder, or a lone UNet folder with a scheduler config beside it or in ../scheduler."""
    if not (path / "model_index.json").is_file():
        beside = [path / "scheduler_config.json", path.parent / "scheduler" / "scheduler_config.json"]
        return Folder(path, path, scheduler=next((p for p in beside if p.is_file()), None))
    index = read_json(path / "model_index.json", "model_index.json")
    parts = {}
    for name, value in index.items():
        if name.startswith("_") or not isinstance(value, list) or value[:1] == [None] or name in SKIPPED_COMPONENTS + CONTROL_COMPONENTS:
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
        weight_map = read_json(shards, str(shards)).get("weight_map", {})
        names = sorted(set(weight_map.values())) if isinstance(weight_map, dict) else None
        if not names or not all(isinstance(name, str) for name in names):
            raise UserError(f"'{shards}' has no weight_map of shard file names; the diffusers folder is damaged")
        return {key: value for name in names for key, value in read_tensors(shard_path(folder, name, shards)).items()}
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


def shard_path(folder: Path, name: str, index: Path) -> Path:
    """A shard named by an index file: it must be a file of `folder` itself, so that no config can make
    diffusekit read a file outside the folder the user gave."""
    path = folder / name
    if Path(name).name != name or name in (".", "..") or not path.resolve().is_relative_to(folder.resolve()):
        raise UserError(f"'{index}' names the shard '{name}', which is not a file of '{folder}'; diffusekit reads no file outside "
                        "the model folder: fix the weight_map or put the shards beside the index")
    return path


def read_parts(path: str | Path) -> ModelParts:
    """The config and networks of a diffusers pipeline folder or a lone UNet2DModel folder."""
    folder = find_parts(Path(path))
    config = read_config(folder)
    vae_weights = read_weights(folder.vae) if folder.vae is not None else None
    return build_parts(config, read_weights(folder.unet), vae_weights, folder.root)
