"""Loading weights into a network, with one clear message when they belong to another model."""

from __future__ import annotations

import hashlib

import torch

from diffusekit.errors import UserError


def load_state_dict_checked(module: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """load_state_dict with one clear message when the weights belong to another model."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        details = []
        if wrong:
            details.append(f"{len(wrong)} shape mismatch(es), e.g. {wrong[0]}")
        if missing:
            details.append(f"{len(missing)} missing, e.g. {missing[0]}")
        if unexpected:
            details.append(f"{len(unexpected)} unexpected, e.g. {unexpected[0]}")
        raise UserError(
            f"the weights in {source} do not fit this model's config ({'; '.join(details)}); "
            "they come from a model of another shape: use the config.json saved with those weights"
        )
    module.load_state_dict(state)


def canonical_tensors(module: torch.nn.Module | None):
    """(name, tensor) of a network's state dict in the form every fingerprint hashes: float32, contiguous, on
    the CPU. Equal weights give equal bytes whatever their memory layout (channels-last or not) or the dtype
    they are stored in (a float16 file's values are exact in float32). A copy cast to bf16 has other values:
    fingerprints are taken before such a cast (Pipeline.stored_fingerprints)."""
    for name, tensor in (module.state_dict().items() if module is not None else ()):
        yield name, tensor.detach().to("cpu", torch.float32).contiguous()


@torch.no_grad()
def weights_fingerprint(module: torch.nn.Module) -> str:
    """sha256 over a network's state dict (names, shapes and values as float32, in name order): the same
    weights give the same fingerprint in a diffusekit checkpoint and in a diffusers folder. LoRAs are not
    part of it (they write nothing into the state dict); merged ones are."""
    digest = hashlib.sha256()
    for name, tensor in sorted(canonical_tensors(module), key=lambda item: item[0]):
        digest.update(f"{name}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()
