"""Stable Diffusion single files (`.safetensors` / `.ckpt` in the original CompVis / Stability layout) read into diffusekit.

    parts = read_single_file("v1-5-pruned-emaonly.safetensors")                 # the family's defaults
    parts = read_single_file("sd21.safetensors", config_folder="sd21-diffusers/")  # a diffusers folder's configs
    (writing: io/single_file_export.py, `diffusekit export RUN --format single-file OUT.safetensors`)

The family is told from the keys and shapes (family()): SD 1.x has a CLIP ViT-L text encoder
(`cond_stage_model.transformer.*`) and 1x1-convolution proj_in layers; SD 2.x an OpenCLIP ViT-H one
(`cond_stage_model.model.*`) and linear proj_in layers. SDXL and inpainting files are recognised and refused.
The weights go through io/single_file_keys.py's table to diffusers' names; the model's shape (channels,
levels, layers, attention) is read from the weights into a diffusers config dict, which io/diffusers.py's own
tables turn into diffusekit's Config. What weights cannot tell comes from the family as diffusers assumes it:
8 heads per level (1.x) or heads 64 wide (2.x), 32 norm groups, Stable Diffusion's scheduler (PNDM for 1.x;
DDIM with v-prediction at 768 px for 2.x, since a 512 px eps 2.x base has the same weights: --set
diffusion.prediction=eps or --config FOLDER says otherwise). The text encoder is written once as a
transformers folder under the cache (files.cache_dir()), with CLIP's tokenizer (io/clip_vocab.py) or the
--config folder's. A .ckpt is read only with torch.load(weights_only=True), which runs no pickled code.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from diffusekit.config import Config, apply_overrides, config_from_dict, config_to_dict
from diffusekit.errors import ConfigError, UserError
from diffusekit.files import cache_dir
from diffusekit.io import diffusers
from diffusekit.io.clip_vocab import END, write_clip_tokenizer
from diffusekit.io.diffusers_keys import SD_GUIDANCE, nest
from diffusekit.io.single_file_keys import (
    CLIP_PREFIX,
    OPEN_CLIP_PREFIX,
    OPEN_CLIP_UNUSED,
    SDXL_PREFIX,
    UNET_PREFIX,
    VAE_PREFIX,
    clip_table,
    open_clip_table,
    to_diffusers,
    unet_table,
    vae_table,
)
from diffusekit.models import ModelParts, build_parts

SUFFIXES = (".safetensors", ".ckpt")
CONVERSION = "1"  # bump when the cached text encoder folders must be written again
SD_SCHEDULER = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
                "steps_offset": 1, "clip_sample": False, "set_alpha_to_one": False, "skip_prk_steps": True}


@dataclass(frozen=True)
class Family:
    """What diffusekit assumes of a family where the weights do not say (diffusers' defaults for it)."""

    name: str
    text_prefix: str
    heads: str  # "8 per level" or "64 wide"
    scheduler: dict
    sample_size: int  # latents: 64 = 512 px, 96 = 768 px
    hidden_act: str  # the text encoder's MLP activation
    pad_token: str  # what the tokenizer pads prompts with


FAMILIES = {
    "sd1": Family("SD 1.x", CLIP_PREFIX, "8 per level", {"_class_name": "PNDMScheduler", **SD_SCHEDULER, "prediction_type": "epsilon"},
                  64, "quick_gelu", END),
    "sd2": Family("SD 2.x", OPEN_CLIP_PREFIX, "64 wide", {"_class_name": "DDIMScheduler", **SD_SCHEDULER, "prediction_type": "v_prediction"},
                  96, "gelu", "!"),
}


def is_single_file(path: str | Path) -> bool:
    """A .safetensors / .ckpt path that is not a folder (one that does not exist gets read_weights' message)."""
    return Path(path).suffix.lower() in SUFFIXES and not Path(path).is_dir()


# ----------------------------------------------------------------------------- the file


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a .safetensors file (memory-mapped while read) or of a .ckpt that needs no pickled code."""
    if not path.is_file():
        raise UserError(f"'{path}' does not exist; give a Stable Diffusion .safetensors or .ckpt file")
    if path.suffix.lower() == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                return {key: f.get_tensor(key) for key in f.keys()}
        except Exception as err:  # a header that does not parse, or tensors that end early
            raise UserError(f"'{path}' is not a complete safetensors file ({err}); it may be truncated: download it again") from None
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # the safe unpickler refuses classes and code
        raise UserError(f"'{path}' cannot be read safely: it needs pickled code to load, and diffusekit runs none from a file; "
                        "use the model's .safetensors file, or convert this one with a tool you trust") from None
    except Exception as err:  # not a torch zip archive, or one that ends early
        raise UserError(f"'{path}' is not a complete .ckpt file ({type(err).__name__}: {err}); it may be truncated: download it again") from None
    state = loaded.get("state_dict", loaded) if isinstance(loaded, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"'{path}' holds no state dict of tensors; it is not a Stable Diffusion checkpoint")
    return state


def family(weights: dict[str, torch.Tensor], path: Path) -> str:
    """"sd1" or "sd2", told from the text encoder's keys and the attention's projections; others are refused."""
    found = sorted({key.split(".")[0] for key in weights})[:6]
    if any(key.startswith(SDXL_PREFIX) for key in weights):
        raise UserError(f"'{path}' is an SDXL checkpoint (conditioner.embedders.*): SDXL single files are not supported yet; "
                        "use an SD 1.x or 2.x file")
    conv_in = weights.get(UNET_PREFIX + "input_blocks.0.0.weight")
    if conv_in is None or not any(key.startswith(VAE_PREFIX) for key in weights):
        raise UserError(f"'{path}' is not a Stable Diffusion 1.x / 2.x checkpoint: it has no {UNET_PREFIX}* U-Net and "
                        f"{VAE_PREFIX}* autoencoder (its keys start with {', '.join(found)}); give an SD 1.x or 2.x single file")
    if conv_in.ndim == 4 and conv_in.shape[1] == 9:
        raise UserError(f"'{path}' is an inpainting checkpoint: its U-Net takes 9 input channels (latents, mask, masked image), and "
                        "diffusekit's text-to-image takes 4; use the text-to-image checkpoint of that model (edit --mask inpaints with it)")
    proj_in = next((value for key, value in weights.items() if key.startswith(UNET_PREFIX) and key.endswith(".proj_in.weight")), None)
    if any(key.startswith(CLIP_PREFIX) for key in weights):
        return "sd1"
    if any(key.startswith(OPEN_CLIP_PREFIX) for key in weights) and proj_in is not None and proj_in.ndim == 2:
        return "sd2"
    raise UserError(f"'{path}' has a U-Net and an autoencoder but no text encoder diffusekit knows (cond_stage_model.transformer.* "
                    "for SD 1.x, cond_stage_model.model.* with linear proj_in for SD 2.x); give an SD 1.x or 2.x single file")


def block_indices(weights: dict, prefix: str) -> set[int]:
    return {int(key[len(prefix):].split(".")[0]) for key in weights if key.startswith(prefix)}


# ----------------------------------------------------------------------------- the shape, as diffusers configs


def unet_config(weights: dict[str, torch.Tensor], fam: Family, path: Path) -> dict:
    """The UNet2DConditionModel config of the file's U-Net: shapes from the weights, head counts from the family."""
    p = UNET_PREFIX + "input_blocks."
    levels = 1 + sum(f"{p}{i}.0.op.weight" in weights for i in block_indices(weights, p))
    blocks = max(block_indices(weights, p)) + 1
    layers = blocks // levels - 1
    if layers < 1 or levels * (layers + 1) != blocks:
        raise UserError(f"'{path}': {blocks} input blocks in {levels} levels is not a Stable Diffusion U-Net layout")
    first = [1 + level * (layers + 1) for level in range(levels)]
    channels = [int(weights[f"{p}{i}.0.out_layers.3.weight"].shape[0]) for i in first]
    attention = [level for level, i in enumerate(first) if f"{p}{i}.1.proj_in.weight" in weights]
    if not attention:
        raise UserError(f"'{path}': the U-Net has no cross-attention; it is not a text-to-image Stable Diffusion U-Net")
    attn = f"{p}{first[attention[0]]}.1."
    heads = 8 if fam.heads == "8 per level" else [max(1, c // 64) for c in channels]
    return {"_class_name": "UNet2DConditionModel", "in_channels": int(weights[p + "0.0.weight"].shape[1]),
            "out_channels": int(weights[UNET_PREFIX + "out.2.weight"].shape[0]), "sample_size": fam.sample_size,
            "block_out_channels": channels, "layers_per_block": layers,
            "down_block_types": ["CrossAttnDownBlock2D" if i in attention else "DownBlock2D" for i in range(levels)],
            "up_block_types": ["CrossAttnUpBlock2D" if i in attention else "UpBlock2D" for i in reversed(range(levels))],
            "cross_attention_dim": int(weights[attn + "transformer_blocks.0.attn2.to_k.weight"].shape[1]),
            "transformer_layers_per_block": len(block_indices(weights, attn + "transformer_blocks.")),
            "use_linear_projection": weights[attn + "proj_in.weight"].ndim == 2, "attention_head_dim": heads}


def vae_config(weights: dict[str, torch.Tensor]) -> dict:
    p = VAE_PREFIX + "encoder.down."
    levels = sorted(block_indices(weights, p))
    channels = [int(weights[f"{p}{i}.block.0.conv2.weight"].shape[0]) for i in levels]
    return {"_class_name": "AutoencoderKL", "block_out_channels": channels, "layers_per_block": len(block_indices(weights, f"{p}0.block.")),
            "latent_channels": int(weights[VAE_PREFIX + "post_quant_conv.weight"].shape[0]),
            "in_channels": int(weights[VAE_PREFIX + "encoder.conv_in.weight"].shape[1]),
            "out_channels": int(weights[VAE_PREFIX + "decoder.conv_out.weight"].shape[0]),
            "down_block_types": ["DownEncoderBlock2D"] * len(levels), "up_block_types": ["UpDecoderBlock2D"] * len(levels)}


def text_config(weights: dict[str, torch.Tensor], fam: Family, key: str):
    """A CLIPTextConfig from the text weights (diffusers' names); SD 2.x drops OpenCLIP's last layer (it reads the penultimate)."""
    from transformers import CLIPTextConfig

    tokens = weights["embeddings.token_embedding.weight"]
    layers = len(block_indices(weights, "encoder.layers.")) - (key == "sd2")
    hidden = int(tokens.shape[1])
    return CLIPTextConfig(vocab_size=int(tokens.shape[0]), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
                          intermediate_size=int(weights["encoder.layers.0.mlp.fc1.weight"].shape[0]), hidden_act=fam.hidden_act,
                          max_position_embeddings=int(weights["embeddings.position_embedding.weight"].shape[0]),
                          bos_token_id=min(49406, int(tokens.shape[0]) - 1), eos_token_id=min(49407, int(tokens.shape[0]) - 1))


# ----------------------------------------------------------------------------- the parts


def split_parts(weights: dict[str, torch.Tensor], key: str, path: Path) -> tuple[dict, dict, dict, dict, dict]:
    """(U-Net, VAE, text encoder weights under diffusers' names, the U-Net config, the VAE config)."""
    unet_cfg, vae_cfg = unet_config(weights, FAMILIES[key], path), vae_config(weights)
    attention = tuple(i for i, block in enumerate(unet_cfg["down_block_types"]) if block.startswith("CrossAttn"))
    text_table = clip_table() if key == "sd1" else open_clip_table(len(block_indices(weights, OPEN_CLIP_PREFIX + "transformer.resblocks.")))
    parts = []
    for prefix, table in ((UNET_PREFIX, unet_table(len(unet_cfg["block_out_channels"]), unet_cfg["layers_per_block"], attention)),
                          (VAE_PREFIX, vae_table(len(vae_cfg["block_out_channels"]), vae_cfg["layers_per_block"])),
                          (FAMILIES[key].text_prefix.split(".")[0] + ".", text_table)):
        own = {k: v for k, v in weights.items() if k.startswith(prefix) and not k.endswith((".position_ids", *OPEN_CLIP_UNUSED))
               and not k.startswith(VAE_PREFIX + "loss.")}  # some files keep the autoencoder's training loss (its discriminator)
        mapped, unknown = to_diffusers(own, table)
        if unknown:
            raise UserError(f"'{path}': {len(unknown)} {prefix}* keys have no place in a {FAMILIES[key].name} model, e.g. "
                            f"{', '.join(sorted(unknown)[:3])}; it is not a plain {FAMILIES[key].name} checkpoint")
        parts.append(mapped)
    return parts[0], parts[1], parts[2], unet_cfg, vae_cfg


def cached_text_encoder(path: Path, text_weights: dict, key: str, config_folder: diffusers.Folder | None) -> Path:
    """The file's text encoder as a transformers folder (text_encoder/ + tokenizer/) in the cache, written once per file."""
    identity = [CONVERSION, str(path.resolve()), path.stat().st_size, path.stat().st_mtime_ns,
                str(config_folder.root.resolve()) if config_folder else None]
    folder = cache_dir() / "single_file" / hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:16]
    if (folder / "text_encoder" / "config.json").is_file():
        return folder / "text_encoder"
    from transformers import CLIPTextConfig, CLIPTextModel

    tmp = folder.parent / f".{folder.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    if config_folder is not None and config_folder.text_encoder is not None:
        if not (config_folder.text_encoder.parent / "tokenizer").is_dir():
            raise UserError(f"--config {config_folder.root} has a text_encoder/ but no tokenizer/ beside it; give a complete diffusers folder")
        text_cfg = CLIPTextConfig.from_pretrained(str(config_folder.text_encoder), local_files_only=True)
        shutil.copytree(config_folder.text_encoder.parent / "tokenizer", tmp / "tokenizer")
    else:
        text_cfg = text_config(text_weights, FAMILIES[key], key)
        write_clip_tokenizer(tmp / "tokenizer", FAMILIES[key].pad_token)
    model = CLIPTextModel(text_cfg)
    own = {k.removeprefix("text_model."): v for k, v in text_weights.items()} if not hasattr(model, "text_model") else text_weights
    expected = model.state_dict()
    used = {k: v for k, v in own.items() if k in expected}  # SD 2.x: OpenCLIP's last layer is not used
    missing = sorted(set(expected) - set(used))
    if missing or any(used[k].shape != expected[k].shape for k in used):
        shutil.rmtree(tmp, ignore_errors=True)
        wrong = missing[:3] or [k for k in used if used[k].shape != expected[k].shape][:3]
        raise UserError(f"'{path}': the text encoder does not fit a CLIP text model of its family ({', '.join(wrong)}); "
                        "give --config FOLDER, a diffusers folder whose text_encoder/ has this file's shape")
    model.load_state_dict(used, strict=False)
    model.save_pretrained(str(tmp / "text_encoder"))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder / "text_encoder"


def read_single_file(path: str | Path, config_folder: str | Path | None = None, overrides=()) -> ModelParts:
    """The config and networks of a Stable Diffusion 1.x / 2.x single file. config_folder: a diffusers folder whose
    configs (U-Net heads, scheduler, text encoder, tokenizer) replace the family's defaults. overrides: --set strings."""
    config, unet_w, vae_w = read_config_and_weights(path, config_folder, overrides)
    return build_parts(config, unet_w, vae_w, Path(path))


def read_config_and_weights(path: str | Path, config_folder: str | Path | None = None, overrides=()) -> tuple[Config, dict, dict]:
    """(the Config, the U-Net's and the VAE's weights under diffusers' names); the text encoder is in the cache folder
    that config.text.encoder names."""
    path = Path(path)
    weights = read_weights(path)
    key = family(weights, path)
    unet_w, vae_w, text_w, unet_cfg, vae_cfg = split_parts(weights, key, path)
    del weights
    folder = diffusers.find_parts(Path(config_folder)) if config_folder is not None else None
    text_folder = cached_text_encoder(path, text_w, key, folder)
    if folder is not None:
        values = config_to_dict(diffusers.read_config(folder))
        values["description"] = f"{FAMILIES[key].name} single file {path.name}, configs from {folder.root}"
    else:
        fields = diffusers.unet_fields(unet_cfg, f"{path.name} (U-Net)")
        fields.update(diffusers.vae_fields(vae_cfg, f"{path.name} (VAE)"))
        fields.update(diffusers.scheduler_fields(FAMILIES[key].scheduler, f"the {FAMILIES[key].name} scheduler"))
        fields.update({"data.image_size": unet_cfg["sample_size"] * 2 ** (len(vae_cfg["block_out_channels"]) - 1), "data.dataset": "none",
                       "text.max_length": 77, "text.mask_padding": False, "sample.guidance": SD_GUIDANCE})
        values = {"description": f"{FAMILIES[key].name} single file {path.name}", **nest(fields)}
    values.setdefault("text", {})["encoder"] = str(text_folder)
    values.setdefault("latent", {})["vae"] = str(path)
    try:
        config = apply_overrides(config_from_dict(values, where=str(path)), overrides)
    except ConfigError as err:
        raise UserError(f"{path}: {err}") from None
    return config, unet_w, vae_w
