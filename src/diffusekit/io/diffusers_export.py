"""Write a diffusekit run as a diffusers folder: `diffusekit export RUN --format diffusers OUT/`.

A pixel model becomes a DDPMPipeline folder (unet/ + scheduler/); a latent text-to-image
model with a CLIP text encoder a StableDiffusionPipeline folder (unet/, vae/, text_encoder/,
tokenizer/, scheduler/). The configs come from the same key tables that reading uses
(io/diffusers.py), so a round trip gives back the same model.

A flow model gets a FlowMatchEulerDiscreteScheduler (or FlowMatchHeun, for flow_heun): DDPMPipeline
runs it as diffusekit's flow_euler with linspace steps; StableDiffusionPipeline cannot (it scales the
start by init_noise_sigma, which flow schedulers lack). A DiT is written as transformer/, a
DiTTransformer2DModel (DIT_KEYS); diffusers has no pipeline for it that fits (DiTPipeline is ImageNet's:
its null class is 1000), so DiTs export as components. Not exportable: a text-conditioned DiT (diffusers'
DiT has no cross-attention), learned position embeddings, mlp_ratio other than 4.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from diffusekit.config import Config
from diffusekit.errors import UserError
from diffusekit.files import read_tensors, save_tensors_atomic, write_json_atomic
from diffusekit.io.checkpoint import load_config, load_weights, resolve_checkpoint
from diffusekit.io.diffusers import FORMAT_VERSION, SKIPPED_COMPONENTS, WEIGHT_FILES, read_json, scheduler_config, tokenizer_length, unet_config, vae_config
from diffusekit.io.diffusers_keys import DIT_KEYS, write_renamed
from diffusekit.models import build_vae, image_shape, load_net
from diffusekit.nn.state import load_state_dict_checked

PIPELINE_PARTS = {"DDPMPipeline": ["unet", "scheduler"], "StableDiffusionPipeline": ["unet", "vae", "text_encoder", "scheduler"],
                  "LatentConsistencyModelPipeline": ["unet", "vae", "text_encoder", "scheduler"]}


def text_model_type(encoder: str) -> str:
    from diffusekit.nn.text import encoder_folder

    model_folder, _ = encoder_folder(encoder)
    return str(read_json(model_folder / "config.json", f"{model_folder}/config.json").get("model_type", "unknown"))


def pipeline_class(config: Config) -> tuple[str | None, str]:
    """(the diffusers pipeline that samples this model as diffusekit does, or None; why there is none)."""
    if config.model.type == "dit":
        return None, "diffusers' DiTPipeline is ImageNet's (1000 classes, null class 1000, latents only), so a DiT exports as components"
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
    if config.diffusion.process == "flow":
        return None, "StableDiffusionPipeline cannot run a flow-matching scheduler (it scales the start by init_noise_sigma, which they lack)"
    if config.distill.method == "consistency":
        return "LatentConsistencyModelPipeline", ""
    if config.model.guidance_embedding:
        return None, ("StableDiffusionPipeline does not pass the guidance scale to a guidance-distilled student "
                      "(LatentConsistencyModelPipeline does, for consistency students)")
    return "StableDiffusionPipeline", ""


def export_parts(config: Config, components: list[str] | None, run: str) -> tuple[str | None, list[str]]:
    """(pipeline class or None, the components to write), or a UserError saying what cannot be exported and why."""
    network = "transformer" if config.model.type == "dit" else "unet"
    available = [network, "scheduler"] + (["vae"] if config.latent.vae else []) + (["text_encoder"] if config.text.encoder else [])
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
            net = load_net(config, load_weights(ckpt, weights), str(ckpt))
            unet_json = unet_config(config)
            write_model(tmp / "unet", unet_json, net)
            index["unet"] = ["diffusers", unet_json["_class_name"]]
        if "transformer" in parts:
            net = load_net(config, load_weights(ckpt, weights), str(ckpt))
            write_model(tmp / "transformer", dit_config(config), net, dit_state(config, net))
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
        if pipeline in ("StableDiffusionPipeline", "LatentConsistencyModelPipeline"):
            index.update({name: [None, None] for name in SKIPPED_COMPONENTS}, requires_safety_checker=False)
        if pipeline is not None:
            write_json_atomic(tmp / "model_index.json", index)
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return export_notes(config, pipeline)


def write_model(folder: Path, config_json: dict, module: torch.nn.Module, state: dict | None = None) -> None:
    folder.mkdir(parents=True)
    write_json_atomic(folder / "config.json", config_json)
    save_tensors_atomic(module.state_dict() if state is None else state, folder / WEIGHT_FILES[0])


def dit_config(config: Config) -> dict:
    """The DiTTransformer2DModel config.json of diffusekit's DiT, or a UserError naming what it cannot express."""
    m = config.model
    reasons = [why for bad, why in (
        (m.cross_attention_dim, "it is text-conditioned, and diffusers' DiTTransformer2DModel has no cross-attention"),
        (m.pos_embed != "sincos", "its position embeddings are learned; DiTTransformer2DModel computes sin-cos ones"),
        (m.mlp_ratio != 4, f"model.mlp_ratio = {m.mlp_ratio}; DiTTransformer2DModel's MLP is 4 times as wide"),
    ) if bad]
    if reasons:
        raise UserError(f"this DiT cannot be exported to diffusers: {'; '.join(reasons)}")
    channels, size, _ = image_shape(config)
    return {"_class_name": "DiTTransformer2DModel", "_diffusers_version": FORMAT_VERSION, **write_renamed(config, DIT_KEYS),
            "attention_head_dim": m.hidden_size // m.num_heads, "in_channels": channels, "out_channels": channels, "sample_size": size,
            "num_embeds_ada_norm": m.num_classes or 1}


def dit_state(config: Config, net: torch.nn.Module) -> dict:
    """The DiT's weights; an unconditional DiT gets diffusers' class tables (1 class + null) all zero, which add nothing."""
    state = dict(net.state_dict())
    if not config.model.num_classes:
        for i in range(config.model.depth):
            state[f"transformer_blocks.{i}.norm1.emb.class_embedder.embedding_table.weight"] = torch.zeros(2, config.model.hidden_size)
    return state


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
    if config.model.type == "dit":
        notes.append("call the DiTTransformer2DModel with class_labels: " + (
            f"0..{config.model.num_classes - 1}, or {config.model.num_classes} (the null class)" if config.model.num_classes
            else "any label (0 or 1: its class tables are zero, so the model stays unconditional)"))
    if config.diffusion.process == "flow" and (s.sampler not in ("flow_euler", "flow_heun", "euler") or s.spacing != "linspace"):
        notes.append(f"diffusers' FlowMatch schedulers step linspace in t (diffusekit: --sampler flow_euler --schedule linspace), "
                     f"not {s.sampler} with {s.spacing} spacing")
    if config.model.num_classes and config.model.type == "unet":
        notes.append(f"the UNet2DModel has num_class_embeds = {config.model.num_classes + 1} (label {config.model.num_classes} is the null class); "
                     "call it with class_labels: DDPMPipeline passes none, and UNet2DModel then raises")
    if config.diffusion.process != "flow" and s.sampler.startswith("dpmpp") and s.spacing in ("leading", "linspace"):
        notes.append(f"diffusers' DPMSolverMultistepScheduler spaces {s.spacing} steps differently from diffusekit (n + 1 points); trailing spacing gives the same timesteps")
    if s.spacing == "logsnr" and config.diffusion.process != "flow":
        notes.append("diffusers has no log-SNR spacing; the scheduler config says trailing")
    d = config.distill
    if d.method == "progressive":
        notes.append(f"a progressive student: sample it with num_inference_steps={d.trained_steps or d.steps}, the steps it was distilled for")
    if d.method == "consistency":
        notes.append(f"LCMScheduler takes its timesteps from the student's {d.solver_steps}-point training grid (999, 759, 499, 259 for 4 of 1000); "
                     "diffusekit's consistency sampler uses the trailing ones (999, 749, 499, 249)")
    if pipeline == "StableDiffusionPipeline" and s.spacing == "leading" and s.steps_offset != 1:
        notes.append("StableDiffusionPipeline resets steps_offset to 1, so its leading timesteps are one above diffusekit's")
    return notes
