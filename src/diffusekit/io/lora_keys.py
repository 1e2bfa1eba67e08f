"""The keys of LoRA files, mapped to module paths of the networks they adapt.

    diffusers / peft   unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight
                       (module paths as they are, behind "unet." or "text_encoder.")
    kohya / A1111      lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight
                       lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight
    kohya, LDM names   lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.alpha
                       (Stable Diffusion's original U-Net: input_blocks, middle_block, output_blocks)

kohya writes a module path with every '.' made '_', which cannot be undone by guessing (to_q is
not to.q); kohya_table() flattens the network's own module names instead, once in diffusers'
naming and, for U-Nets, once in LDM naming (ldm_blocks: the one table between the two). The LDM
table follows the structure of the net itself, so it holds for SD 1.x and 2.x shapes alike.
classify() sorts one key of a file into (part, module path, down | up | alpha).
"""

from __future__ import annotations

import re
from pathlib import Path

from torch import nn

from diffusekit.errors import UserError
from diffusekit.nn.lora import LAYERS

PARTS = {"unet": "lora_unet", "text_encoder": "lora_te"}  # diffusers prefix -> kohya prefix
WHAT = {"unet": "U-Net", "text_encoder": "text encoder"}
PEFT_KEY = re.compile(r"(?:(unet|text_encoder)\.)?(.+)\.lora_([AB])\.weight")
KOHYA_KEY = re.compile(r"(lora_unet|lora_te)_(\w+)\.(lora_down\.weight|lora_up\.weight|alpha)")

# inside a ResBlock and a downsampler, LDM names the layers differently; attention blocks keep their names
RESNET_LAYERS = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                 "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
TOP_LAYERS = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
              "conv_norm_out": "out.0", "conv_out": "out.2"}


def ldm_blocks(net: nn.Module) -> dict[str, str]:
    """{diffusers block path: LDM block path} of a U-Net, e.g. down_blocks.1.attentions.0 -> input_blocks.4.1.

    LDM numbers the down path's blocks in one sequence (input_blocks.0 is conv_in; each level adds one
    per ResBlock, with its attention as .1, then one for the downsampler), the middle as
    ResBlock / attention / ResBlock, and the up path likewise (the upsampler is the last sub-block of
    its level's last block). Empty for a network without down_blocks (a text encoder).
    """
    if not hasattr(net, "down_blocks"):
        return {}
    table = dict(TOP_LAYERS)
    for side, ldm, i in (("down_blocks", "input_blocks", 1), ("up_blocks", "output_blocks", 0)):
        for b, block in enumerate(getattr(net, side)):
            for j in range(len(block.resnets)):
                table[f"{side}.{b}.resnets.{j}"] = f"{ldm}.{i}.0"
                if hasattr(block, "attentions"):
                    table[f"{side}.{b}.attentions.{j}"] = f"{ldm}.{i}.1"
                i += 1
            if getattr(block, "downsamplers", None) is not None:  # a block of its own in LDM's sequence
                table[f"{side}.{b}.downsamplers.0.conv"] = f"{ldm}.{i}.0.op"
                i += 1
            if getattr(block, "upsamplers", None) is not None:  # the last sub-block of the level's last block
                table[f"{side}.{b}.upsamplers.0.conv"] = f"{ldm}.{i - 1}.{2 if hasattr(block, 'attentions') else 1}.conv"
    mid = ["mid_block.resnets.0"] + (["mid_block.attentions.0"] if hasattr(net.mid_block, "attentions") else []) + ["mid_block.resnets.1"]
    table.update({path: f"middle_block.{k}" for k, path in enumerate(mid)})
    return table


def ldm_path(path: str, blocks: dict[str, str]) -> str | None:
    """The LDM name of a layer (`path` in diffusers' names), or None where LDM has no other name for it."""
    for block, ldm in blocks.items():
        if path == block:
            return ldm
        if path.startswith(block + "."):
            rest = path[len(block) + 1 :]
            return f"{ldm}.{RESNET_LAYERS.get(rest, rest) if '.resnets.' in block else rest}"
    return None


def flat(path: str) -> str:
    return path.replace(".", "_")


def kohya_table(net: nn.Module, prefix: str) -> dict[str, str]:
    """{kohya name: module path} of every Linear and Conv2d layer, e.g. (prefix "lora_unet")
    lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q and
    lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q -> down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q."""
    blocks, table = ldm_blocks(net), {}
    for path, module in net.named_modules():
        if isinstance(module, LAYERS):
            for name in {path, ldm_path(path, blocks)} - {None}:
                if table.setdefault(f"{prefix}_{flat(name)}", path) != path:
                    raise RuntimeError(f"two layers flatten to one kohya name {prefix}_{flat(name)}: {table[prefix + '_' + flat(name)]} and {path}")
    return table


def nearest_block(name: str, net: nn.Module, prefix: str = "") -> str:
    """Where a layer name (a dotted module path, or with `prefix` a kohya name) leaves the network:
    'down_blocks.1 has no attentions_5_...' names the block the key expected and what it lacks."""
    paths = [p for p, _ in net.named_modules() if p]
    if prefix:
        candidates = {f"{prefix}_{flat(p)}": p for p in paths}
        candidates.update({f"{prefix}_{flat(ldm)}": f"{ldm} (LDM name of {p})" for p, ldm in ldm_blocks(net).items()})
        sep = "_"
    else:
        candidates, sep = {p: p for p in paths}, "."
    found = [c for c in candidates if name.startswith(c + sep)]
    if not found:
        return f"no top-level block of it matches (its blocks: {', '.join(n for n, _ in net.named_children())})"
    best = max(found, key=len)
    return f"{candidates[best]} has no '{name[len(best) + 1 :]}'"


def unplaceable(path: Path, key: str, why: str) -> UserError:
    return UserError(f"{path}: cannot place the key '{key}': {why}; the LoRA was made for another kind of model, or in a layout diffusekit does not read")


def classify(key: str, path: Path, nets: dict[str, nn.Module], tables: dict) -> tuple[str, str, str]:
    """(part, module path, "down" | "up" | "alpha") of one key; a kohya name of a part not loaded stays flat."""
    if m := KOHYA_KEY.fullmatch(key):
        part, name = next(p for p, k in PARTS.items() if k == m[1]), f"{m[1]}_{m[2]}"
        kind = {"lora_down.weight": "down", "lora_up.weight": "up"}.get(m[3], "alpha")
        if part not in nets:  # nothing to place it in: load_lora says so once
            return part, name, kind
        if part not in tables:
            tables[part] = kohya_table(nets[part], m[1])
        table = tables[part]
        if name not in table:
            raise unplaceable(path, key, f"this {WHAT[part]} has no layer of that name ({nearest_block(name, nets[part], m[1])})")
        return part, table[name], kind
    if m := PEFT_KEY.fullmatch(key):
        return m[1] or "unet", m[2], "down" if m[3] == "A" else "up"
    raise unplaceable(path, key, "it is neither a diffusers/peft key (….lora_A.weight, ….lora_B.weight) nor a kohya key "
                                 "(lora_unet_….lora_down.weight, ….lora_up.weight, ….alpha)")
