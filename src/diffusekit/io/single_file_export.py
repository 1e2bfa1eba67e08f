"""Write a diffusekit run as a Stable Diffusion single file: `diffusekit export RUN --format single-file OUT.safetensors`.

The inverse of io/single_file.py through the same key table (io/single_file_keys.py): the U-Net, the VAE and the
CLIP text encoder in the original CompVis / Stability layout that AUTOMATIC1111, ComfyUI, Forge and diffusers'
from_single_file load. A CLIP text encoder with GELU (OpenCLIP's, as a Stable Diffusion 2.x folder has it) is
written as SD 2.x's `cond_stage_model.model.*`, with one more block than it uses (SD 2.x reads the penultimate
block: the last one is a copy that is never run) and an identity text_projection; a quick-GELU one (OpenAI CLIP) as
SD 1.x's `cond_stage_model.transformer.*`. Only a latent text-to-image model with a CLIP text encoder fits: what
diffusers' StableDiffusionPipeline samples (io/diffusers_export.py's pipeline_class says why a model does not).
"""

from __future__ import annotations

from pathlib import Path

import torch

from diffusekit.config import Config
from diffusekit.errors import UserError
from diffusekit.files import read_tensors, save_tensors_atomic
from diffusekit.io.checkpoint import load_config, load_weights, resolve_checkpoint
from diffusekit.io.diffusers_export import pipeline_class
from diffusekit.io.single_file_keys import clip_table, open_clip_table, to_original, unet_table, vae_table

SD_SCALE = 0.18215  # the latent scale every SD 1.x / 2.x reader assumes (a single file has no place for another)


def text_weights(model) -> dict[str, torch.Tensor]:
    """A transformers CLIPTextModel's weights under its flat names (embeddings.*, encoder.*, final_layer_norm.*)."""
    return {k.removeprefix("text_model."): v for k, v in model.state_dict().items() if not k.endswith("position_ids")}


def original_weights(config: Config, unet: dict, vae: dict, text: dict, open_clip: bool) -> dict[str, torch.Tensor]:
    """Every tensor of the single file, from the parts' weights under diffusers' names."""
    m = config.model
    out = to_original(unet, unet_table(len(m.channels), m.layers_per_block, tuple(m.attention_levels)))
    out.update(to_original(vae, vae_table(len(config.vae.channels), config.vae.layers_per_block)))
    if not open_clip:
        out.update(to_original(text, clip_table()))
        return out
    layers = len({k.split(".")[2] for k in text if k.startswith("encoder.layers.")})
    last = f"encoder.layers.{layers - 1}."
    unused = {k.replace(last, f"encoder.layers.{layers}."): v.clone() for k, v in text.items() if k.startswith(last)}  # never run (penultimate)
    out.update(to_original({**text, **unused}, open_clip_table(layers + 1)))
    hidden = text["embeddings.token_embedding.weight"].shape[1]
    out["cond_stage_model.model.text_projection"] = torch.eye(hidden)
    return out


def family_notes(config: Config, text_config, open_clip: bool) -> list[str]:
    """What a reader assuming the family's defaults would get wrong: then it needs a diffusers folder's configs."""
    m, notes = config.model, []
    heads = m.attention_heads or None
    if open_clip and (heads or m.attention_head_dim != 64):
        notes.append("its attention heads are not 64 wide as SD 2.x readers assume: load it with a diffusers folder's configs "
                     "(diffusekit export --format diffusers, then --config FOLDER)")
    if not open_clip and heads != 8:
        notes.append("its U-Net does not have 8 attention heads per level as SD 1.x readers assume: load it with a diffusers "
                     "folder's configs (diffusekit export --format diffusers, then --config FOLDER)")
    if text_config.num_attention_heads * 64 != text_config.hidden_size:
        notes.append("its text encoder's heads are not 64 wide as readers assume: load it with a diffusers folder's configs")
    if config.vae.scale_factor != SD_SCALE or config.vae.shift_factor:
        notes.append(f"its latent scale {config.vae.scale_factor} is not Stable Diffusion's {SD_SCALE}, which readers assume")
    if (config.diffusion.prediction == "v") != open_clip:
        notes.append(f"it predicts {config.diffusion.prediction}; readers assume {'v' if open_clip else 'eps'} for this family: "
                     "say so where you load it (diffusekit: --set diffusion.prediction=...)")
    return notes


def export_single_file(run: str | Path, out: str | Path, weights: str = "ema") -> list[str]:
    """Write a diffusekit run or checkpoint as one SD 1.x / 2.x .safetensors file; returns notes for the user."""
    out = Path(out)
    if out.suffix != ".safetensors":
        raise UserError(f"'{out}': a single file is written as .safetensors; name it OUT.safetensors")
    if out.exists():
        raise UserError(f"'{out}' already exists; export into a new file")
    ckpt = resolve_checkpoint(run)
    config = load_config(ckpt)
    pipeline, why = pipeline_class(config) if config.task == "diffusion" else (None, f"it holds an {config.task}")
    if pipeline != "StableDiffusionPipeline":
        raise UserError(f"'{run}' cannot be written as a Stable Diffusion single file: {why or 'it is a consistency student'}; "
                        "a single file holds a latent text-to-image model with a CLIP text encoder")
    from transformers import CLIPTextModel

    from diffusekit.models import load_net
    from diffusekit.nn.text import encoder_folder

    text_model = CLIPTextModel.from_pretrained(str(encoder_folder(config.text.encoder)[0]), local_files_only=True)
    open_clip = text_model.config.hidden_act == "gelu"
    if open_clip and not config.model.linear_projection:
        raise UserError(f"'{run}' has an OpenCLIP-style text encoder (GELU) but 1x1-convolution proj_in layers; SD 2.x files have "
                        "linear ones (model.linear_projection = true), so no reader would recognise its family")
    net = load_net(config, load_weights(ckpt, weights), str(ckpt))
    try:
        tensors = original_weights(config, net.state_dict(), read_tensors(ckpt / "vae.safetensors"), text_weights(text_model), open_clip)
    except KeyError as err:  # a layer the original layout has no name for
        raise UserError(f"'{run}' cannot be written as a Stable Diffusion single file: {err.args[0]}") from None
    save_tensors_atomic(tensors, out, metadata={"format": "pt"})
    family = "SD 2.x (OpenCLIP text encoder)" if open_clip else "SD 1.x (CLIP text encoder)"
    return [f"wrote {len(tensors)} tensors in the {family} layout"] + family_notes(config, text_model.config, open_clip)
