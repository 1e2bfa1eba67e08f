"""LoRA files (Hu et al. 2021, eq. 3: h = W0 x + (alpha / r) B A x): safetensors only, in two layouts.

    save_lora("style.safetensors", net, "style", text_encoder=clip)  # diffusers: pipe.load_lora_weights(...)
    name = load_lora("style.safetensors", net, scale=0.8, text_encoder=clip)
    path, scale = parse_lora_spec("style.safetensors:0.8")            # the CLI's FILE[:SCALE]

diffusers / peft (written and read), what StableDiffusionPipeline.save_lora_weights writes:
    unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight    A [r, in]
    unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight    B [out, r]
    text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight
  The rank is A's first dimension. alpha is no tensor: diffusers hands the header entry
  __metadata__["lora_adapter_metadata"] (JSON of peft LoraConfig fields prefixed "unet." and
  "text_encoder.": r, lora_alpha, alpha_pattern, use_rslora, ...) to LoraConfig as it is, and
  without it takes alpha = r (scale 1). save_lora writes that entry, so alpha / r survives.
kohya / A1111 (read): lora_unet_<path>.lora_down.weight (A), .lora_up.weight (B), .alpha (a scalar;
  missing: alpha = r), lora_te_<path> for the text encoder, <path> in diffusers' or the original
  LDM U-Net's names with '.' flattened to '_' (io/lora_keys.py holds the one table).

The LoRAs `diffusekit finetune` writes (RUN/lora.safetensors; a run folder stands for that file) also
carry the base model's weights fingerprint and name in their header (recorded_base).

Loading injects LoRA layers (nn/lora.py) and never changes a base weight; merging is nn.lora.merge().
The whole file is checked before anything is injected: a key that fits no layer, or a shape that
fits another base model, is one UserError and leaves the networks as they were.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from diffusekit.errors import UserError, warn
from diffusekit.files import save_tensors_atomic
from diffusekit.io.lora_keys import PARTS, WHAT, classify, nearest_block, unplaceable
from diffusekit.nn.lora import LAYERS, LoRA, adapter_names, attach, check_name, check_number, check_update, lora_modules, lora_shapes
from diffusekit.nn.text import TextEncoder

METADATA_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY
BASE_FINGERPRINT, BASE_NAME = "diffusekit.base_fingerprint", "diffusekit.base"  # header entries of the LoRAs finetune writes
RUN_FILE = "lora.safetensors"  # the LoRA in a `diffusekit finetune` run folder


@dataclass
class Entry:
    """One layer's LoRA as the file has it."""

    key: str  # the file's key of A, named in messages
    down: torch.Tensor | None = None
    up: torch.Tensor | None = None
    alpha: float | None = None


def text_model(text_encoder: nn.Module | None) -> nn.Module | None:
    """The text model whose module names a LoRA file uses (diffusekit's TextEncoder wraps it as .model: transformers'
    or nn/bert.py's, which keeps transformers' BERT names)."""
    return text_encoder.model if isinstance(text_encoder, TextEncoder) else text_encoder


# ----------------------------------------------------------------------------- reading


def lora_file(path: str | Path) -> Path:
    """A LoRA file; a `diffusekit finetune` run folder stands for its lora.safetensors."""
    path = Path(path)
    if path.is_dir():
        if (path / RUN_FILE).is_file():
            return path / RUN_FILE
        raise UserError(f"'{path}' is a folder without {RUN_FILE}; give a LoRA .safetensors file or a `diffusekit finetune` run folder")
    return path


def recorded_base(path: str | Path) -> tuple[str, str]:
    """(fingerprint, name) of the base model a LoRA file was trained on, as finetune records it ("", "" where unknown)."""
    try:
        with safe_open(str(lora_file(path)), framework="pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError):
        return "", ""
    return metadata.get(BASE_FINGERPRINT, ""), metadata.get(BASE_NAME, "")


def read_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if path.suffix in (".bin", ".pt", ".ckpt", ".pth"):
        raise UserError(f"{path}: LoRA files are read as safetensors only (a {path.suffix} file could run pickled code); convert it to .safetensors")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
    except FileNotFoundError:
        raise UserError(f"LoRA file '{path}' does not exist") from None
    except (SafetensorError, OSError) as err:
        raise UserError(f"cannot read the LoRA file '{path}' ({err}): it is damaged or not a safetensors file") from None


def peft_configs(metadata: dict[str, str], path: Path) -> dict[str, dict]:
    """{"unet": {r, lora_alpha, ...}, "text_encoder": ...} from diffusers' header entry; {} without one."""
    if METADATA_KEY not in metadata:
        return {}
    try:
        flat = json.loads(metadata[METADATA_KEY])
    except ValueError:
        flat = None
    if not isinstance(flat, dict):
        raise UserError(f"{path}: the header entry {METADATA_KEY} is not a JSON object; the file is damaged")
    configs = {part: {k[len(part) + 1 :]: v for k, v in flat.items() if k.startswith(part + ".")} for part in PARTS}
    for part, config in configs.items():
        if config.get("use_dora") or config.get("lora_bias"):
            raise UserError(f"{path}: its {WHAT[part]} LoRA uses {'DoRA' if config.get('use_dora') else 'LoRA biases'}, which diffusekit does not read")
    return configs


def peft_alpha(config: dict, module: str, rank: int) -> float:
    """alpha of one layer under peft's rules: alpha_pattern (first key matching the path's end), else
    lora_alpha, else the rank; with use_rslora the scale is alpha / sqrt(r), i.e. alpha sqrt(r) / r."""
    patterns = config.get("alpha_pattern") or {}
    try:
        key = next((k for k in patterns if re.match(rf"(.*\.)?({k})$", module)), None)
    except re.error as err:
        raise UserError(f"an alpha_pattern key in the LoRA's metadata is not a regular expression ({err})") from None
    alpha = patterns[key] if key is not None else config.get("lora_alpha", rank)
    alpha = check_number(alpha, f"lora_alpha of {module}")
    return alpha * math.sqrt(rank) if config.get("use_rslora") else alpha


def parse(tensors: dict[str, torch.Tensor], path: Path, nets: dict[str, nn.Module]) -> dict[str, dict[str, Entry]]:
    """{part: {module path: Entry}} from either layout; a key of no known form is a UserError."""
    tables, entries = {}, {part: {} for part in PARTS}
    for key, value in tensors.items():
        part, module, kind = classify(key, path, nets, tables)
        entry = entries[part].setdefault(module, Entry(key))
        if getattr(entry, kind) is not None:  # e.g. one layer under its diffusers and its LDM name
            raise UserError(f"{path}: '{key}' and '{entry.key}' both hold the {kind} of the layer {module}; keep one of them")
        setattr(entry, kind, check_number(value.item(), f"{key} in {path}") if kind == "alpha" else value)
        entry.key = key if kind == "down" else entry.key
    return entries


def fitted(tensor: torch.Tensor, want: tuple[int, ...], path: Path, key: str, module: str, layer: nn.Module) -> torch.Tensor:
    """`tensor` in the shape `want`; a Linear's [a, b] and a 1x1 convolution's [a, b, 1, 1] are the same matrix."""
    if tuple(tensor.shape) == want:
        return tensor
    if tensor.shape[:2] == want[:2] and tensor.numel() == math.prod(want):
        return tensor.reshape(want)
    raise UserError(
        f"{path}: '{key}' has shape {tuple(tensor.shape)} but the layer {module} (weight {tuple(layer.weight.shape)}) needs {want}: "
        "the LoRA was made for another base model (another Stable Diffusion version or size); load it into the model it was trained on"
    )


def placed(entries: dict[str, Entry], net: nn.Module, part: str, path: Path, config: dict) -> list[tuple[nn.Module, Entry]]:
    """(layer, Entry with its alpha and tensors in the layer's shapes) for every entry; a UserError if one does not fit."""
    modules, out = dict(net.named_modules()), []
    for module, entry in entries.items():
        layer = modules.get(module)
        if not isinstance(layer, LAYERS):
            why = f"{nearest_block(module, net)}" if layer is None else f"{module} is a {type(layer).__name__}, not a Linear or Conv2d layer"
            raise unplaceable(path, entry.key, f"this {WHAT[part]} has no layer {module} ({why})")
        if entry.down is None or entry.up is None:
            raise UserError(f"{path}: the layer of '{entry.key}' has only one of its two LoRA matrices (down/A and up/B); the file is incomplete")
        if entry.down.ndim not in (2, 4) or not entry.down.shape[0]:
            raise UserError(f"{path}: '{entry.key}' has shape {tuple(entry.down.shape)}, which is no LoRA down matrix [rank, in] or kernel [rank, in, h, w]")
        if entry.alpha is None:
            entry.alpha = peft_alpha(config, module, entry.down.shape[0])
        want_down, want_up = lora_shapes(layer, entry.down.shape[0])
        entry.down = fitted(entry.down, want_down, path, entry.key, module, layer)
        entry.up = fitted(entry.up, want_up, path, entry.key.replace("lora_A", "lora_B").replace("lora_down", "lora_up"), module, layer)
        out.append((layer, entry))
    return out


def free_name(stem: str, taken: set[str]) -> str:
    base = re.sub(r"\W", "_", stem) or "lora"
    return next(n for n in [base] + [f"{base}_{i}" for i in range(2, 10_000)] if n not in taken)


@torch.no_grad()
def load_lora(path: str | Path, net: nn.Module, name: str | None = None, scale: float = 1.0, text_encoder: nn.Module | None = None) -> str:
    """Inject the LoRA in `path` (either layout) into `net` (the U-Net) and, if given, `text_encoder`, at `scale`;
    returns its name (by default the file's stem, made unique). Base weights are not touched."""
    path, scale = lora_file(path), check_number(scale, "the LoRA scale")
    nets = {"unet": net} | ({"text_encoder": text_model(text_encoder)} if text_encoder is not None else {})
    taken = {n for part in nets.values() for n in adapter_names(part)}
    name = free_name(path.stem, taken) if name is None else check_name(name, taken)
    tensors, metadata = read_file(path)
    entries, configs = parse(tensors, path, nets), peft_configs(metadata, path)
    if not any(entries.values()):
        raise UserError(f"{path} holds no LoRA tensors")
    if entries["text_encoder"] and "text_encoder" not in nets:
        warn(f"{path} also adapts {len(entries['text_encoder'])} text-encoder layers; they were not loaded (pass the text encoder to load them)")
    made = []
    for part, n in nets.items():
        for layer, entry in placed(entries[part], n, part, path, configs.get(part, {})):
            lora = LoRA(layer, entry.down.shape[0], entry.alpha)
            lora.down.copy_(entry.down)
            lora.up.copy_(entry.up)
            lora.scale = scale
            check_update(lora, f"the LoRA file '{path}' (layer {entry.key})")
            made.append((layer, lora))
    for layer, lora in made:  # every check passed: now the networks change
        attach(layer, name, lora)
    return name


# ----------------------------------------------------------------------------- writing


def peft_config(net: nn.Module, name: str) -> tuple[dict[str, torch.Tensor], dict]:
    """(A and B tensors, the peft LoraConfig fields diffusers reads back) of one network's LoRA `name`."""
    loras = lora_modules(net, name)
    ranks, alphas = Counter(x.rank for x in loras.values()), Counter(x.alpha for x in loras.values())
    r, alpha = ranks.most_common(1)[0][0], alphas.most_common(1)[0][0]
    exact = {module: f"^{re.escape(module)}" for module in loras}  # peft matches pattern keys as regexes
    config = {
        "r": r, "lora_alpha": alpha, "target_modules": sorted(loras), "lora_dropout": next(iter(loras.values())).dropout.p,
        "rank_pattern": {exact[m]: x.rank for m, x in loras.items() if x.rank != r},
        "alpha_pattern": {exact[m]: x.alpha for m, x in loras.items() if x.alpha != alpha},
        "use_rslora": False, "use_dora": False, "lora_bias": False, "bias": "none",
    }
    tensors = {}
    for module, lora in loras.items():
        tensors[f"{module}.lora_A.weight"], tensors[f"{module}.lora_B.weight"] = lora.down, lora.up
    return tensors, config


def save_lora(path: str | Path, net: nn.Module, name: str, text_encoder: nn.Module | None = None, metadata: dict[str, str] | None = None) -> Path:
    """Write the LoRA `name` of `net` (and of `text_encoder`, when it has one of that name) in the diffusers layout,
    alpha and rank in the header as diffusers reads them; `metadata` adds string entries to the header."""
    nets = {"unet": net} | ({"text_encoder": text_model(text_encoder)} if text_encoder is not None else {})
    tensors, config = {}, {}
    for part, n in nets.items():
        if part == "unet" or name in adapter_names(n):
            part_tensors, part_config = peft_config(n, name)
            tensors.update({f"{part}.{k}": v for k, v in part_tensors.items()})
            config.update({f"{part}.{k}": v for k, v in part_config.items()})
    extra = dict(metadata or {})
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in extra.items()) or {"format", METADATA_KEY} & set(extra):
        raise UserError(f"LoRA metadata must map strings to strings, without the keys 'format' and '{METADATA_KEY}', got {metadata!r}")
    header = {**extra, "format": "pt", METADATA_KEY: json.dumps(config, indent=2, sort_keys=True)}
    return save_tensors_atomic(tensors, path, metadata=header)


def parse_lora_spec(spec: str, what: str = "a LoRA", example: str = "style.safetensors:0.8") -> tuple[Path, float]:
    """The CLI's FILE[:SCALE]: "style.safetensors:0.8" -> (style.safetensors, 0.8); no ':SCALE' means 1.0.

    A spec that names an existing file is that file (so a name with ':' in it works whole); otherwise
    the part after the last ':' must be a number, else a UserError (--control IMAGE[:SCALE] reads the same way)."""
    if not spec:
        raise UserError(f"{what} is given as FILE or FILE:SCALE, e.g. {example}; got an empty string")
    if Path(spec).is_file() or ":" not in spec:
        return Path(spec), 1.0
    file, _, scale = spec.rpartition(":")
    try:
        value = float(scale)
    except ValueError:
        value = math.nan
    if not file or not math.isfinite(value):
        raise UserError(f"cannot read {spec!r} as FILE:SCALE: {scale!r} is not a number (write e.g. {example})")
    return Path(file), value
