"""The key tables between diffusers configs and diffusekit's Config, used both ways.

Each Key says what one diffusers config key is to diffusekit: a renamed field
(`rename`), a value diffusekit builds at one setting only (`fixed`), a key that changes
nothing here (`ignored`, with the reason), or one worked out by code (`derived`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from diffusekit.config import Config
from diffusekit.errors import UserError

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
    rename("flip_sin_to_cos", "model.flip_sin_to_cos", True), rename("freq_shift", "model.freq_shift", 0),
    rename("norm_eps", "model.norm_eps", 1e-5), rename("downsample_padding", "model.downsample_padding", 1),
    fixed("center_input_sample", False), fixed("act_fn", "silu"), fixed("mid_block_scale_factor", 1),
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
        derived("time_cond_proj_dim", None), fixed("conv_in_kernel", 3), fixed("conv_out_kernel", 3),
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

# DiTTransformer2DModel (norm_type "ada_norm_zero"), written on export; diffusekit does not read DiT folders.
DIT_KEYS = [
    rename("patch_size", "model.patch_size", 2),
    rename("num_layers", "model.depth", 28),
    rename("num_attention_heads", "model.num_heads", 16),
    rename("dropout", "model.dropout", 0.0),
    derived("attention_head_dim", 72), derived("in_channels", 4), derived("out_channels", None), derived("sample_size", 32),
    derived("num_embeds_ada_norm", 1000),
    fixed("activation_fn", "gelu-approximate"), fixed("norm_type", "ada_norm_zero"), fixed("norm_elementwise_affine", False),
    fixed("norm_eps", 1e-5), fixed("attention_bias", True), fixed("upcast_attention", False),
    ignored("norm_num_groups", "used by diffusers' continuous-input transformers only, not the patched DiT"),
]

# The flow-matching schedulers (diffusion.process = "flow"); FlowMatchHeunDiscreteScheduler has the renamed keys only.
FLOW_SCHEDULER_KEYS = [
    rename("num_train_timesteps", "diffusion.timesteps", 1000),
    rename("shift", "diffusion.shift", 1.0),
    fixed("use_dynamic_shifting", False), fixed("invert_sigmas", False), fixed("shift_terminal", None), fixed("use_karras_sigmas", False),
    fixed("use_exponential_sigmas", False), fixed("use_beta_sigmas", False), fixed("stochastic_sampling", False),
    ignored("base_shift", "used only with use_dynamic_shifting"), ignored("max_shift", "used only with use_dynamic_shifting"),
    ignored("base_image_seq_len", "used only with use_dynamic_shifting"), ignored("max_image_seq_len", "used only with use_dynamic_shifting"),
    ignored("time_shift_type", "used only with use_dynamic_shifting"),
]
FLOW_SCHEDULERS = {"flow_euler": "FlowMatchEulerDiscreteScheduler", "flow_heun": "FlowMatchHeunDiscreteScheduler"}  # both space steps linspace

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
    "flow_euler": ("EulerDiscreteScheduler", {}, {}),  # for a DDPM model flow_euler is Euler (samplers.py); reading gives "euler"
    "euler_ancestral": ("EulerAncestralDiscreteScheduler", {}, {}),
    "heun": ("HeunDiscreteScheduler", {}, {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}, {}),
    "dpmpp_2m_sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}, {}),
    "dpmpp_3m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 3}, {}),
    "unipc": ("UniPCMultistepScheduler", {"solver_type": "bh2", "solver_order": 2, "predict_x0": True}, {}),
    "unipc_bh1": ("UniPCMultistepScheduler", {"solver_type": "bh1", "solver_order": 2, "predict_x0": True}, {}),
    "consistency": ("LCMScheduler", {}, {"clip_sample": False, "set_alpha_to_one": True, "timestep_scaling": 10.0}),  # + original_inference_steps
}
FALLBACK_SAMPLER = "dpmpp_2m"  # for schedulers diffusekit has no twin of (PNDM, LMS, ...)

READ_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
SKIPPED_COMPONENTS = ("safety_checker", "feature_extractor", "image_encoder")  # not part of sampling
CONTROL_COMPONENTS = ("controlnet",)  # a ControlNet pipeline's: read by io/controlnet.py (Pipeline.from_pretrained loads it)
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
