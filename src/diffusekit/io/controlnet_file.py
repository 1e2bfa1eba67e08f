"""ControlNets as single files in the original layout (lllyasviel's ControlNet 1.0 / 1.1, as people share them:
control_v11p_sd15_canny.safetensors, control_sd15_canny.pth) read into diffusekit.

    net = read_controlnet_file("control_v11p_sd15_canny.safetensors")   # Pipeline.load_controlnet(FILE) calls it

Keys, to diffusers' ControlNetModel names (nn/controlnet.py):

    time_embed.*, input_blocks.*, middle_block.*   the SD U-Net's encoder (io/single_file_keys.py unet_table)
    zero_convs.i.0                                 controlnet_down_blocks.i
    middle_block_out.0                             controlnet_mid_block
    input_hint_block.{0, 2, 4, ...}                the convolutions between its SiLUs: controlnet_cond_embedding.conv_in,
                                                   blocks.0, blocks.1, ..., conv_out (the last)

A ControlNet 1.0 file that also holds the whole Stable Diffusion model keeps its ControlNet under control_model.*;
the rest is left out. The shape (channels, levels, attention) is read from the weights as for SD single files
(io/single_file.py unet_config; SD 2.x ControlNets have linear proj_in layers and heads 64 wide).
"""

from __future__ import annotations

from pathlib import Path

import torch

from diffusekit.errors import UserError
from diffusekit.io.controlnet import CLASS_NAME, UNET_KEYS, controlnet_shape
from diffusekit.io.single_file import FAMILIES, read_weights, unet_config
from diffusekit.io.single_file_keys import UNET_PREFIX, to_diffusers, unet_table
from diffusekit.nn.controlnet import ControlNet
from diffusekit.nn.state import load_state_dict_checked

FILE_SUFFIXES = (".safetensors", ".pth", ".ckpt")
CONTROL_PREFIX = "control_model."  # ControlNet 1.0 files that hold the whole SD model too
ENCODER_PARTS = ("time_embed.", "input_blocks.", "middle_block.")


def is_controlnet_file(path: str | Path) -> bool:
    return Path(path).suffix.lower() in FILE_SUFFIXES and not Path(path).is_dir()


def hint_convs(weights: dict[str, torch.Tensor]) -> list[int]:
    """The indices of input_hint_block's convolutions, in order (the SiLUs between them have no weights)."""
    return sorted({int(key.split(".")[1]) for key in weights if key.startswith("input_hint_block.") and key.endswith(".weight")})


def control_names(weights: dict[str, torch.Tensor]) -> dict[str, str]:
    """original prefix -> diffusers prefix, for the keys a ControlNet has and the U-Net has not."""
    convs = hint_convs(weights)
    names = {f"input_hint_block.{convs[0]}": "controlnet_cond_embedding.conv_in",
             f"input_hint_block.{convs[-1]}": "controlnet_cond_embedding.conv_out",
             **{f"input_hint_block.{i}": f"controlnet_cond_embedding.blocks.{k}" for k, i in enumerate(convs[1:-1])},
             "middle_block_out.0": "controlnet_mid_block"}
    zeros = sorted({int(key.split(".")[1]) for key in weights if key.startswith("zero_convs.")})
    return {**names, **{f"zero_convs.{i}.0": f"controlnet_down_blocks.{i}" for i in zeros}}


def read_controlnet_file(path: str | Path) -> ControlNet:
    """An original-layout ControlNet file as a diffusekit ControlNet (float32, on the CPU)."""
    path = Path(path)
    weights = read_weights(path)
    if any(key.startswith(CONTROL_PREFIX) for key in weights):
        weights = {key[len(CONTROL_PREFIX):]: value for key, value in weights.items() if key.startswith(CONTROL_PREFIX)}
    if "input_hint_block.0.weight" not in weights or "input_blocks.0.0.weight" not in weights:
        found = ", ".join(sorted({key.split(".")[0] for key in weights})[:5])
        raise UserError(f"'{path}' is not a ControlNet file: it has no input_hint_block.* and input_blocks.* (its keys start with {found}); "
                        "give a ControlNet 1.0 / 1.1 file or a diffusers ControlNet folder")
    encoder = {UNET_PREFIX + key: value for key, value in weights.items() if key.startswith(ENCODER_PARTS)}
    proj_in = next((v for k, v in encoder.items() if k.endswith(".proj_in.weight")), None)
    fam = FAMILIES["sd2" if proj_in is not None and proj_in.ndim == 2 else "sd1"]
    in_channels = int(encoder[UNET_PREFIX + "input_blocks.0.0.weight"].shape[1])
    placeholder = {UNET_PREFIX + "out.2.weight": torch.empty(in_channels)}  # unet_config reads out_channels there; a ControlNet has no conv_out
    unet = unet_config({**encoder, **placeholder}, fam, path)
    convs = hint_convs(weights)
    embedding = [int(weights[f"input_hint_block.{i}.weight"].shape[0]) for i in [convs[0], *convs[2:-1:2]]]
    config = {"_class_name": CLASS_NAME, **{k: v for k, v in unet.items() if k in UNET_KEYS},
              "conditioning_channels": int(weights["input_hint_block.0.weight"].shape[1]), "conditioning_embedding_out_channels": embedding}
    attention = tuple(i for i, block in enumerate(unet["down_block_types"]) if block.startswith("CrossAttn"))
    mapped, unknown = to_diffusers(encoder, unet_table(len(unet["block_out_channels"]), unet["layers_per_block"], attention))
    own = control_names(weights)
    for key, value in weights.items():
        if key.startswith(ENCODER_PARTS):
            continue
        prefix, _, leaf = key.rpartition(".")
        if prefix in own:
            mapped[f"{own[prefix]}.{leaf}"] = value
        else:
            unknown.append(key)
    if unknown:
        raise UserError(f"'{path}': {len(unknown)} keys have no place in a ControlNet, e.g. {', '.join(sorted(unknown)[:3])}; "
                        "it is not a plain ControlNet 1.0 / 1.1 file")
    net = ControlNet(controlnet_shape(config, str(path)))
    load_state_dict_checked(net, {k: v.float() for k, v in mapped.items()}, source=str(path))
    return net.eval()
