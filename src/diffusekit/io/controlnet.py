"""ControlNets as diffusers folders (config.json + diffusion_pytorch_model.safetensors), both ways.

    net = read_controlnet("control_v11p_sd15_canny/")   # diffusers' ControlNetModel folder (or a folder with controlnet/)
    write_controlnet(net, "out/controlnet")             # a folder ControlNetModel.from_pretrained reads

A ControlNetModel config is a UNet2DConditionModel config without the up path plus four keys of its own; it is read
through the U-Net's key table (io/diffusers.py unet_fields), so the same keys are known and refused as for U-Nets.
"""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

from diffusekit.config import Config, DataConfig, ModelConfig
from diffusekit.errors import UserError
from diffusekit.files import make_temp_folder, save_tensors_atomic, write_json_atomic
from diffusekit.io.diffusers import BLOCKS, WEIGHT_FILES, read_json, read_weights, unet_config, unet_fields
from diffusekit.nn.controlnet import EMBEDDING_CHANNELS, ControlNet, ControlNetShape
from diffusekit.nn.state import load_state_dict_checked

CLASS_NAME = "ControlNetModel"
# the keys ControlNetModel's own (not the U-Net's): name -> diffusers' default
OWN_KEYS = {"conditioning_channels": 3, "conditioning_embedding_out_channels": list(EMBEDDING_CHANNELS),
            "controlnet_conditioning_channel_order": "rgb", "global_pool_conditions": False}
# the U-Net keys ControlNetModel.__init__ takes (a written config holds only these)
UNET_KEYS = ("in_channels", "flip_sin_to_cos", "freq_shift", "down_block_types", "mid_block_type", "only_cross_attention", "block_out_channels",
             "layers_per_block", "downsample_padding", "mid_block_scale_factor", "act_fn", "norm_num_groups", "norm_eps", "cross_attention_dim",
             "transformer_layers_per_block", "encoder_hid_dim", "encoder_hid_dim_type", "attention_head_dim", "num_attention_heads",
             "use_linear_projection", "class_embed_type", "addition_embed_type", "addition_time_embed_dim", "num_class_embeds",
             "upcast_attention", "resnet_time_scale_shift", "projection_class_embeddings_input_dim", "addition_embed_type_num_heads")


def controlnet_folder(path: str | Path) -> Path:
    """The folder holding a ControlNet's config.json: the one given, or its controlnet/ (a pipeline folder, a training run)."""
    path = Path(path)
    for folder in (path / "controlnet", path):  # a run's own config.json is diffusekit's, its ControlNet's in controlnet/
        if (folder / "config.json").is_file():
            return folder
    if not path.exists():
        raise UserError(f"ControlNet '{path}' does not exist; give a diffusers ControlNet folder (config.json and its weights)")
    raise UserError(f"'{path}' has no config.json (nor controlnet/config.json); give a diffusers ControlNet folder (config.json and "
                    "diffusion_pytorch_model.safetensors)")


def controlnet_shape(cfg: dict, where: str) -> ControlNetShape:
    """A ControlNetModel config -> the ControlNet's shape, through the U-Net key table (a UserError names an unknown key or value)."""
    if cfg.get("_class_name") != CLASS_NAME:
        raise UserError(f"{where}: _class_name = {cfg.get('_class_name')!r}, not {CLASS_NAME!r}; give a diffusers ControlNet folder")
    own = {key: cfg.get(key, default) for key, default in OWN_KEYS.items()}
    if own["controlnet_conditioning_channel_order"] != "rgb":
        raise UserError(f"{where}: controlnet_conditioning_channel_order = {own['controlnet_conditioning_channel_order']!r} is not "
                        "supported; diffusekit feeds control images as rgb")
    unet = {k: v for k, v in cfg.items() if k not in OWN_KEYS}
    names = BLOCKS["UNet2DConditionModel"]
    down = unet.get("down_block_types") or []
    unet.update(_class_name="UNet2DConditionModel", out_channels=unet.get("in_channels", 4),
                up_block_types=[names.attention_up if block == names.attention_down else names.up for block in reversed(down)])
    values = {name.split(".")[1]: value for name, value in unet_fields(unet, where).items()}
    model = ModelConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})
    embedding = own["conditioning_embedding_out_channels"]
    if not isinstance(embedding, list) or not embedding or not all(isinstance(c, int) and c > 0 for c in embedding):
        raise UserError(f"{where}: conditioning_embedding_out_channels = {embedding!r} must be a list of channel counts")
    return ControlNetShape(model, unet.get("in_channels", 4), own["conditioning_channels"], tuple(embedding), bool(own["global_pool_conditions"]))


def read_controlnet(path: str | Path) -> ControlNet:
    """A diffusers ControlNet folder as a diffusekit ControlNet (float32, on the CPU)."""
    folder = controlnet_folder(path)
    shape = controlnet_shape(read_json(folder / "config.json", str(folder / "config.json")), str(folder / "config.json"))
    net = ControlNet(shape)
    load_state_dict_checked(net, {k: v.float() for k, v in read_weights(folder).items()}, source=str(folder))
    return net.eval()


def controlnet_config(shape: ControlNetShape) -> dict:
    """The ControlNetModel config.json of a ControlNet: the U-Net's (io/diffusers.py unet_config) less its up path, plus its own keys."""
    if not shape.model.cross_attention_dim or shape.model.num_classes or shape.model.guidance_embedding:
        raise UserError("diffusers' ControlNetModel is the encoder of a text-to-image U-Net (no class labels, no guidance-scale "
                        "embedding); this ControlNet's base model is not one, so it cannot be written in diffusers' layout")
    base = Config(model=shape.model, data=replace(DataConfig(), channels=shape.in_channels, image_size=64))
    unet = unet_config(base)
    return {"_class_name": CLASS_NAME, **{k: unet[k] for k in ("_diffusers_version", *UNET_KEYS) if k in unet},
            "conditioning_channels": shape.conditioning_channels, "conditioning_embedding_out_channels": list(shape.embedding_channels),
            "controlnet_conditioning_channel_order": "rgb", "global_pool_conditions": shape.global_pool}


def write_controlnet(net: ControlNet, out: str | Path, replace_existing: bool = False) -> Path:
    """A ControlNet as a diffusers ControlNetModel folder, written in full beside `out` and then renamed into place;
    replace_existing: a ControlNet folder there already is replaced (a training run's, with each checkpoint)."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not (replace_existing and (out / "config.json").is_file()):
        raise UserError(f"'{out}' already exists and is not an empty folder; save the ControlNet into a new folder")
    config = controlnet_config(net.shape)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp, old = make_temp_folder(out), None
    try:
        write_json_atomic(tmp / "config.json", config)
        save_tensors_atomic({k: v.float() for k, v in net.state_dict().items()}, tmp / WEIGHT_FILES[0])
        if out.exists():
            old = out.rename(make_temp_folder(out) / "old")  # moved aside, removed once the new one is in place
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old.parent, ignore_errors=True)
    return out
