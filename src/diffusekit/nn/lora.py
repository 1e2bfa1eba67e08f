"""LoRA: low-rank updates of existing Linear and Conv2d layers (Hu et al. 2021, "LoRA: Low-Rank
Adaptation of Large Language Models", eq. 3):

    h = W0 x + (alpha / r) B A x        A = down [r, in], B = up [out, r]

A starts Kaiming-uniform and B at zero, so a new LoRA changes nothing (the paper's and peft's
initialisation). A Conv2d's LoRA is a down convolution with the base's kernel, stride, padding
and dilation, then a 1x1 up convolution (kohya's LoCon): B A is again a kernel of W0's shape.

The base layer stays as it is. A LoRA does not replace the layer it adapts: the layer keeps its
object, class, attributes and parameter names, and gains a child `lora` (a ModuleDict of named
LoRAs) and a forward hook that adds their outputs to its own. A LoRA writes nothing into the
network's state dict and expects nothing from it (LoRA._save_to_state_dict and
_load_from_state_dict), so `net.state_dict()` has the same keys with or without LoRAs and a
base checkpoint still loads strictly; lora_state_dict() reads the LoRA tensors. They are still
parameters of the network: net.parameters(), .to() and .train() reach them.

Several LoRAs can sit on one layer, each with its own name and scale (diffusers' adapters):

    h = W0 x + sum_i scale_i (alpha_i / r_i) B_i A_i x

merge() folds scale (alpha / r) B A into W0 (no extra work per call); unmerge() gives W0 back exactly
(merge keeps a copy of it) or, without that copy, subtracts the same product again. Targets are module-name suffixes matched at a '.' boundary (peft's rule), or the
presets below; the same LoRA works on any nn.Linear, e.g. a CLIP text encoder's q_proj.
"""

from __future__ import annotations

import hashlib
import math
import numbers

import torch
import torch.nn.functional as F
from torch import nn

from diffusekit.errors import UserError

PRESETS = {
    # U-Net attention, CLIP self-attention, BERT self-attention (all-MiniLM-L6-v2)
    "attention": ("to_q", "to_k", "to_v", "to_out.0", "q_proj", "k_proj", "v_proj", "out_proj", "query", "key", "value", "attention.output.dense"),
    "ff": ("ff.net.0.proj", "ff.net.2", "mlp.fc1", "mlp.fc2"),  # transformer feed-forward, CLIP MLP
    "proj": ("proj_in", "proj_out"),  # Transformer2D's projections to and from tokens
    "conv": ("conv1", "conv2"),  # the ResBlocks' 3x3 convolutions (LoCon)
}
DESCRIBED = {"attention": "attention", "ff": "feed-forward", "proj": "transformer projection", "conv": "ResBlock convolution"}
LAYERS = (nn.Linear, nn.Conv2d)


def check_number(value, what: str) -> float:
    """`value` as a float; a bool, a string, NaN or infinity is a UserError naming `what`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise UserError(f"{what} must be a finite number, got {value!r}")
    return float(value)


FLOAT32_MAX = torch.finfo(torch.float32).max


def check_update(lora: "LoRA", what: str, scale: float | None = None) -> None:
    """A UserError naming `what` unless A and B are finite and scale * alpha / r * B A stays within float32
    (bounded by |factor| r max|B| max|A|): a LoRA that would turn the network's output into NaN or infinity."""
    for name, tensor in (("down (A)", lora.down), ("up (B)", lora.up)):
        if not torch.isfinite(tensor).all():
            raise UserError(f"{what}: its {name} matrix holds NaN or infinite values (the file is damaged, or was trained into NaN); "
                            "use another LoRA file")
    scale = lora.scale if scale is None else scale
    factor = scale * lora.alpha / lora.rank
    bound = abs(factor) * lora.rank * float(lora.up.detach().abs().max()) * float(lora.down.detach().abs().max())
    if not (abs(factor) <= FLOAT32_MAX and bound <= FLOAT32_MAX):
        raise UserError(f"{what}: scale {scale:g} x alpha {lora.alpha:g} / rank {lora.rank} = {factor:g} makes its updates overflow "
                        "float32 (the images would be NaN); use a scale near 1 (--lora FILE:SCALE), or fix the alpha in the file")


def lora_shapes(layer: nn.Module, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(down A, up B) shapes of a rank-`rank` LoRA on `layer`."""
    if isinstance(layer, nn.Conv2d):
        return (rank, layer.in_channels, *layer.kernel_size), (layer.out_channels, rank, 1, 1)
    return (rank, layer.in_features), (layer.out_features, rank)


class LoRA(nn.Module):
    """One low-rank update (alpha / r) B A of one layer, times a user `scale` (1 by default)."""

    def __init__(self, base: nn.Linear | nn.Conv2d, rank: int, alpha: float | None = None, dropout: float = 0.0):
        super().__init__()
        if not isinstance(base, LAYERS):
            raise UserError(f"LoRA adapts Linear and Conv2d layers, not {type(base).__name__}")
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise UserError(f"the LoRA rank must be a whole number of at least 1, got {rank!r}")
        if isinstance(base, nn.Conv2d) and (base.groups != 1 or base.padding_mode != "zeros"):
            raise UserError(f"LoRA adapts convolutions with groups = 1 and zero padding, not {base}")
        self.rank, self.alpha = rank, check_number(rank if alpha is None else alpha, "the LoRA alpha")
        self.scale = 1.0
        self.merged = False  # True while scale (alpha / r) B A is folded into the base weight
        self.conv = dict(stride=base.stride, padding=base.padding, dilation=base.dilation) if isinstance(base, nn.Conv2d) else None
        down, up = lora_shapes(base, rank)
        # float32 (or wider) whatever the base's dtype: a LoRA in a bf16 network keeps its file's values exactly
        # (its fingerprint does not depend on the precision); forward casts the two small matrices to the input's dtype.
        like = dict(device=base.weight.device, dtype=torch.promote_types(base.weight.dtype, torch.float32))
        self.down = nn.Parameter(torch.empty(down, **like))
        self.up = nn.Parameter(torch.zeros(up, **like))
        nn.init.kaiming_uniform_(self.down, a=math.sqrt(5))  # as nn.Linear's own init and peft's lora_A
        self.dropout = nn.Dropout(dropout)

    @property
    def factor(self) -> float:
        return self.scale * self.alpha / self.rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dropout(x)
        down, up = self.down.to(x.dtype), self.up.to(x.dtype)
        if self.conv is None:
            return F.linear(F.linear(x, down), up) * self.factor
        return F.conv2d(F.conv2d(x, down, **self.conv), up) * self.factor

    def delta(self) -> torch.Tensor:
        """scale (alpha / r) B A in float32, shaped like the base weight."""
        up, down = self.up.detach().float().flatten(1), self.down.detach().float()
        return (up @ down.flatten(1)).view(up.shape[0], *down.shape[1:]) * self.factor

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        """Nothing: LoRA tensors stay out of the base network's state dict (lora_state_dict() has them)."""

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """Nothing expected either, so a base checkpoint loads strictly into a network with LoRAs."""

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha:g}, scale={self.scale:g}, merged={self.merged}"


def add_unmerged(layer: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
    """The forward hook: the layer's own output W0 x plus every unmerged LoRA's output."""
    for lora in layer.lora.values():
        if not lora.merged and lora.scale != 0:
            out = out + lora(args[0])
    return out


def has_loras(layer: nn.Module) -> bool:
    return isinstance(getattr(layer, "lora", None), nn.ModuleDict)


def check_name(name: str, taken) -> str:
    if not isinstance(name, str) or not name or "." in name:
        raise UserError(f"a LoRA name must be a non-empty string without '.', got {name!r}")
    if name in taken:
        raise UserError(f"a LoRA named {name!r} is already loaded: remove_lora(net, {name!r}) first, or choose another name")
    return name


def attach(layer: nn.Module, name: str, lora: LoRA) -> LoRA:
    """Put a LoRA made for `layer` on it, as `name` (checked before: attaching does not fail half-way)."""
    if not has_loras(layer):
        layer.lora = nn.ModuleDict()
        layer.lora_hook = layer.register_forward_hook(add_unmerged)
    layer.lora[name] = lora
    return lora


def add_lora(layer: nn.Module, name: str, rank: int, alpha: float | None = None, dropout: float = 0.0) -> LoRA:
    """Attach a new LoRA called `name` to one Linear or Conv2d layer (created with B = 0: a no-op)."""
    check_name(name, layer.lora if has_loras(layer) else ())
    return attach(layer, name, LoRA(layer, rank, alpha, dropout))


def matches(path: str, suffixes) -> bool:
    return any(path == s or path.endswith("." + s) for s in suffixes)


def find_layers(net: nn.Module, targets=("attention",)) -> dict[str, nn.Module]:
    """{path: layer} of the Linear and Conv2d layers whose names end in a target (a preset or a suffix)."""
    if isinstance(targets, str):
        targets = (targets,)
    suffixes = [s for t in targets for s in PRESETS.get(t, (t,))]
    found = {path: m for path, m in net.named_modules() if isinstance(m, LAYERS) and matches(path, suffixes)}
    if not found:
        what = " and ".join(DESCRIBED.get(t, repr(t)) for t in targets)
        raise UserError(
            f"this model has no {what} layers to fine-tune: none of its Linear or Conv2d layers is named "
            f"{', '.join(suffixes)} (targets are the presets {', '.join(PRESETS)} or module-name suffixes)"
        )
    return found


def inject_lora(net: nn.Module, name: str, rank: int, alpha: float | None = None, targets=("attention",), dropout: float = 0.0) -> dict[str, LoRA]:
    """Add a LoRA called `name` to every target layer of `net`; {layer path: LoRA}. alpha defaults to the rank (scale 1)."""
    layers, name = find_layers(net, targets), check_name(name, adapter_names(net))
    made = {path: LoRA(layer, rank, alpha, dropout) for path, layer in layers.items()}  # every check before any change
    return {path: attach(layers[path], name, lora) for path, lora in made.items()}


def lora_hosts(net: nn.Module) -> dict[str, nn.Module]:
    """{path: layer} of the layers that carry LoRAs."""
    return {path: m for path, m in net.named_modules() if isinstance(m, LAYERS) and has_loras(m)}


def adapter_names(net: nn.Module) -> list[str]:
    return sorted({name for layer in lora_hosts(net).values() for name in layer.lora})


def lora_modules(net: nn.Module, name: str) -> dict[str, LoRA]:
    """{layer path: LoRA} of the LoRA called `name`; a UserError listing the loaded ones if there is none."""
    found = {path: layer.lora[name] for path, layer in lora_hosts(net).items() if name in layer.lora}
    if not found:
        raise UserError(f"no LoRA named {name!r} is loaded (loaded: {', '.join(adapter_names(net)) or 'none'})")
    return found


def selected(net: nn.Module, name: str | None) -> list[tuple[nn.Module, str, LoRA]]:
    """(layer, name, LoRA) of one LoRA, or of all of them when name is None."""
    names = adapter_names(net) if name is None else [name]
    hosts = lora_hosts(net)
    return [(hosts[path], n, lora) for n in names for path, lora in lora_modules(net, n).items()]


def lora_parameters(net: nn.Module, name: str | None = None) -> list[nn.Parameter]:
    """The trainable tensors (A, B) of one LoRA, or of all, for the optimizer."""
    return [p for _, _, lora in selected(net, name) for p in (lora.down, lora.up)]


def lora_state_dict(net: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """One LoRA's tensors under peft's names: `{path}.lora_A.weight` (down), `{path}.lora_B.weight` (up)."""
    out = {}
    for path, lora in lora_modules(net, name).items():
        out[f"{path}.lora_A.weight"], out[f"{path}.lora_B.weight"] = lora.down.detach(), lora.up.detach()
    return out


def set_scales(net: nn.Module, scales: dict[str, float]) -> None:
    """Each named LoRA's scale, e.g. set_scales(net, {"style": 0.8, "face": 0.5}); 0 switches one off."""
    for name, value in scales.items():
        value = check_number(value, f"the scale of LoRA {name!r}")
        for lora in lora_modules(net, name).values():
            check_update(lora, f"LoRA {name!r}", value)
        for lora in lora_modules(net, name).values():
            if lora.merged and value != lora.scale:
                raise UserError(f"LoRA {name!r} is merged into the weights: unmerge(net, {name!r}) before changing its scale")
            lora.scale = value


@torch.no_grad()
def merge(net: nn.Module, name: str | None = None, keep_original: bool = True) -> None:
    """Fold scale (alpha / r) B A of one LoRA (or all) into the base weights: W = W0 + delta.

    keep_original keeps a copy of W0 beside each layer (not in its state dict) until its last merged
    LoRA is unmerged, so that unmerge() gives W0 back exactly; without it, unmerging subtracts delta."""
    for layer, _, lora in selected(net, name):
        if not lora.merged:
            if keep_original and not any(x.merged for x in layer.lora.values()):
                layer.lora_original = layer.weight.detach().clone()
            layer.weight += lora.delta().to(layer.weight.dtype)
            lora.merged = True


@torch.no_grad()
def unmerge(net: nn.Module, name: str | None = None) -> None:
    """Take merged LoRAs out of the base weights again: W0 exactly once a layer's last merged LoRA is out
    (if merge kept it), else W - delta (float32 rounding apart)."""
    for layer, _, lora in selected(net, name):
        if lora.merged:
            lora.merged = False
            if hasattr(layer, "lora_original") and not any(x.merged for x in layer.lora.values()):
                layer.weight.copy_(layer.lora_original)
                del layer.lora_original
            else:
                layer.weight -= lora.delta().to(layer.weight.dtype)


def fused_digests(net: nn.Module) -> list[str]:
    """A sha256 per merged LoRA of `net`: its layer, factor and float32 tensors (what it added to the weights)."""
    out = []
    for path, layer in lora_hosts(net).items():
        for lora in (x for x in layer.lora.values() if x.merged):
            digest = hashlib.sha256(f"{path};{lora.factor!r};".encode())
            for tensor in (lora.down, lora.up):
                digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
            out.append(digest.hexdigest())
    return out


def remove_lora(net: nn.Module, name: str | None = None) -> None:
    """Remove one LoRA (or all), unmerging it first; a layer left without LoRAs is as before injection."""
    unmerge(net, name)
    for layer, key, _ in selected(net, name):
        del layer.lora[key]
        if not len(layer.lora):
            layer.lora_hook.remove()
            del layer.lora, layer.lora_hook


class LoRAWeights(nn.Module):
    """The LoRA called `name` of several networks as one module of its own, for training: its parameters
    are exactly the LoRA's A and B tensors, its state dict their diffusers / peft names

        {"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": A, ...lora_B.weight: B, ...}

    The networks are not its children, so an optimizer, an EMA (a deepcopy: LoRAs that sit on no layer)
    and a checkpoint of this module hold the LoRA and nothing of the base weights."""

    def __init__(self, nets: dict[str, nn.Module], name: str):
        super().__init__()
        self.name, self.keys, self.loras = name, [], nn.ModuleList()
        for part, net in nets.items():
            for path, lora in lora_modules(net, name).items():
                self.keys.append(f"{part}.{path}")
                self.loras.append(lora)

    def state_dict(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        out = {}
        for key, lora in zip(self.keys, self.loras):
            out[f"{key}.lora_A.weight"], out[f"{key}.lora_B.weight"] = lora.down.detach(), lora.up.detach()
        return out

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor], strict: bool = True, assign: bool = False):
        own = self.state_dict()
        wrong = sorted(set(own) ^ set(state)) or [k for k in own if own[k].shape != state[k].shape]
        if wrong:
            raise RuntimeError(f"LoRA weights do not fit: {wrong[:3]}")
        for key, tensor in own.items():
            tensor.copy_(state[key])
