"""The key table between a Stable Diffusion single file (the original CompVis / Stability layout) and diffusers' names.

    table = unet_table(levels=4, layers=2, attention_levels=(0, 1, 2))
    diffusers_weights = to_diffusers(file_weights, table)     # reading (io/single_file.py)
    file_weights = to_original(diffusers_weights, table)       # writing (`diffusekit export --format single-file`)

One table per part, used both ways. An Entry maps one prefix of the original layout to one of diffusers'
(`model.diffusion_model.input_blocks.1.0` -> `down_blocks.0.resnets.0`); `inner` is the renaming inside it
(a ResNet block's `in_layers.0` -> `norm1`). A key takes the entry of its longest matching prefix. Two
entries also change the tensor: the VAE's attention weights are 1x1 convolutions in the original and linear
layers in diffusers (`conv1x1`), and OpenCLIP packs q, k, v in one `in_proj_weight` (`qkv`). diffusers'
names are diffusekit's own (nn/unet.py, nn/vae.py) and transformers' CLIPTextModel's, so io/diffusers.py's
config mapping does the rest. Keys no entry covers are reported, never guessed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

UNET_PREFIX, VAE_PREFIX = "model.diffusion_model.", "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer.text_model."  # SD 1.x: OpenAI CLIP ViT-L/14, already transformers' names
OPEN_CLIP_PREFIX = "cond_stage_model.model."  # SD 2.x: OpenCLIP ViT-H/14
SDXL_PREFIX = "conditioner.embedders."  # SDXL's two text encoders: detected, not read yet
OPEN_CLIP_UNUSED = ("text_projection", "logit_scale", "attn_mask")  # pooled-output projection and buffers: SD attends to tokens


@dataclass(frozen=True)
class Entry:
    original: str
    diffusers: str
    inner: tuple[tuple[str, str], ...] = ()
    change: str = ""  # "conv1x1" | "qkv" | ""


UNET_RESNET = (("in_layers.0", "norm1"), ("in_layers.2", "conv1"), ("emb_layers.1", "time_emb_proj"),
               ("out_layers.0", "norm2"), ("out_layers.3", "conv2"), ("skip_connection", "conv_shortcut"))
VAE_RESNET = (("nin_shortcut", "conv_shortcut"),)
VAE_ATTENTION = (("norm", "group_norm"), ("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("proj_out", "to_out.0"))
OPEN_CLIP_BLOCK = (("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"), ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2"),
                   ("attn.out_proj", "self_attn.out_proj"))


def unet_table(levels: int, layers: int, attention_levels: tuple[int, ...]) -> list[Entry]:
    """The U-Net of SD 1.x / 2.x: input_blocks / middle_block / output_blocks -> down_blocks / mid_block / up_blocks.
    Input block 0 is conv_in; each level has `layers` ResNets (+ attention) then a downsampler (not the last level);
    each up level has layers + 1 ResNets (+ attention), its upsampler after the attention in the last one."""
    p = UNET_PREFIX
    table = [Entry(p + "time_embed.0", "time_embedding.linear_1"), Entry(p + "time_embed.2", "time_embedding.linear_2"),
             Entry(p + "input_blocks.0.0", "conv_in"), Entry(p + "out.0", "conv_norm_out"), Entry(p + "out.2", "conv_out"),
             Entry(p + "middle_block.0", "mid_block.resnets.0", UNET_RESNET), Entry(p + "middle_block.1", "mid_block.attentions.0"),
             Entry(p + "middle_block.2", "mid_block.resnets.1", UNET_RESNET)]
    for level in range(levels):
        for j in range(layers):
            i = 1 + level * (layers + 1) + j
            table.append(Entry(f"{p}input_blocks.{i}.0", f"down_blocks.{level}.resnets.{j}", UNET_RESNET))
            if level in attention_levels:
                table.append(Entry(f"{p}input_blocks.{i}.1", f"down_blocks.{level}.attentions.{j}"))
        if level < levels - 1:
            table.append(Entry(f"{p}input_blocks.{(level + 1) * (layers + 1)}.0.op", f"down_blocks.{level}.downsamplers.0.conv"))
    for up in range(levels):
        attends = levels - 1 - up in attention_levels
        for j in range(layers + 1):
            i = up * (layers + 1) + j
            table.append(Entry(f"{p}output_blocks.{i}.0", f"up_blocks.{up}.resnets.{j}", UNET_RESNET))
            if attends:
                table.append(Entry(f"{p}output_blocks.{i}.1", f"up_blocks.{up}.attentions.{j}"))
        if up < levels - 1:
            last = up * (layers + 1) + layers
            table.append(Entry(f"{p}output_blocks.{last}.{2 if attends else 1}.conv", f"up_blocks.{up}.upsamplers.0.conv"))
    return table


def vae_table(levels: int, layers: int) -> list[Entry]:
    """The KL autoencoder: encoder.down.i.block.j -> encoder.down_blocks.i.resnets.j; the decoder's up levels are
    numbered from the bottom in the original (up.{levels-1} runs first) and from the top in diffusers."""
    p = VAE_PREFIX
    table = [Entry(p + "quant_conv", "quant_conv"), Entry(p + "post_quant_conv", "post_quant_conv")]
    for part in ("encoder", "decoder"):
        table += [Entry(f"{p}{part}.conv_in", f"{part}.conv_in"), Entry(f"{p}{part}.conv_out", f"{part}.conv_out"),
                  Entry(f"{p}{part}.norm_out", f"{part}.conv_norm_out"),
                  Entry(f"{p}{part}.mid.block_1", f"{part}.mid_block.resnets.0", VAE_RESNET),
                  Entry(f"{p}{part}.mid.block_2", f"{part}.mid_block.resnets.1", VAE_RESNET),
                  Entry(f"{p}{part}.mid.attn_1", f"{part}.mid_block.attentions.0", VAE_ATTENTION, "conv1x1")]
    for level in range(levels):
        table += [Entry(f"{p}encoder.down.{level}.block.{j}", f"encoder.down_blocks.{level}.resnets.{j}", VAE_RESNET) for j in range(layers)]
        up = levels - 1 - level
        table += [Entry(f"{p}decoder.up.{up}.block.{j}", f"decoder.up_blocks.{level}.resnets.{j}", VAE_RESNET) for j in range(layers + 1)]
        if level < levels - 1:
            table.append(Entry(f"{p}encoder.down.{level}.downsample.conv", f"encoder.down_blocks.{level}.downsamplers.0.conv"))
            table.append(Entry(f"{p}decoder.up.{up}.upsample.conv", f"decoder.up_blocks.{level}.upsamplers.0.conv"))
    return table


def clip_table() -> list[Entry]:
    """SD 1.x's CLIP text encoder is stored with transformers' own names under a prefix."""
    return [Entry(CLIP_PREFIX[:-1], "")]


def open_clip_table(layers: int) -> list[Entry]:
    """SD 2.x's OpenCLIP text encoder -> transformers' CLIPTextModel (as diffusers' convert_open_clip_checkpoint)."""
    p = OPEN_CLIP_PREFIX
    table = [Entry(p + "token_embedding", "embeddings.token_embedding"), Entry(p + "positional_embedding", "embeddings.position_embedding.weight"),
             Entry(p + "ln_final", "final_layer_norm")]
    for i in range(layers):
        table.append(Entry(f"{p}transformer.resblocks.{i}", f"encoder.layers.{i}", OPEN_CLIP_BLOCK))
        table.append(Entry(f"{p}transformer.resblocks.{i}.attn.in_proj_weight", f"encoder.layers.{i}.self_attn.{{}}_proj.weight", change="qkv"))
        table.append(Entry(f"{p}transformer.resblocks.{i}.attn.in_proj_bias", f"encoder.layers.{i}.self_attn.{{}}_proj.bias", change="qkv"))
    return table


# ----------------------------------------------------------------------------- applying a table, both ways


def join(*parts: str) -> str:
    return ".".join(part for part in parts if part)


def longest_prefix(key: str, entries: dict[str, object]):
    """(the entry of the longest dotted prefix of `key` in `entries`, the rest of the key) or (None, key)."""
    parts = key.split(".")
    for n in range(len(parts), 0, -1):
        entry = entries.get(".".join(parts[:n]))
        if entry is not None:
            return entry, ".".join(parts[n:])
    if "" in entries:  # a table whose prefix is empty on this side (SD 1.x's CLIP seen from diffusers)
        return entries[""], key
    return None, key


def rename_inner(rest: str, inner: tuple[tuple[str, str], ...], reverse: bool) -> str:
    pairs = {b: a for a, b in inner} if reverse else dict(inner)
    found, tail = longest_prefix(rest, pairs)
    return join(found, tail) if found is not None else rest


def to_diffusers(weights: dict[str, torch.Tensor], table: list[Entry]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """(the weights under diffusers' names, the keys no entry covers) for the keys of `weights` the table's parts hold."""
    entries = {entry.original: entry for entry in table}
    out, unknown = {}, []
    for key, value in weights.items():
        entry, rest = longest_prefix(key, entries)
        if entry is None:
            unknown.append(key)
        elif entry.change == "qkv":  # [3 * width, ...] -> q, k, v
            for name, part in zip("qkv", value.chunk(3)):
                out[entry.diffusers.format(name)] = part.contiguous()
        else:
            name = join(entry.diffusers, rename_inner(rest, entry.inner, reverse=False))
            out[name] = value.flatten(1) if entry.change == "conv1x1" and value.ndim == 4 else value
    return out, unknown


def to_original(weights: dict[str, torch.Tensor], table: list[Entry]) -> dict[str, torch.Tensor]:
    """The inverse of to_diffusers: diffusers' names -> the single file's. A key the table does not cover is an error
    (a network of another shape than the table's)."""
    packed = {}
    entries = {}
    for entry in table:
        if entry.change == "qkv":
            for name in "qkv":
                packed[entry.diffusers.format(name)] = entry
        else:
            entries[entry.diffusers] = entry
    out, parts = {}, {}
    for key, value in weights.items():
        if key in packed:
            parts.setdefault(packed[key].original, {})[key] = value
            continue
        entry, rest = longest_prefix(key, entries)
        if entry is None:
            raise KeyError(f"{key} has no place in the single-file layout")
        name = join(entry.original, rename_inner(rest, entry.inner, reverse=True))
        out[name] = value[:, :, None, None] if entry.change == "conv1x1" and value.ndim == 2 else value
    for original, pieces in parts.items():
        entry = next(e for e in table if e.original == original)
        out[original] = torch.cat([pieces[entry.diffusers.format(name)] for name in "qkv"])
    return out
