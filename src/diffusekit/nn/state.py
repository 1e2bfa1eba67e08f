"""Loading weights into a network, with one clear message when they belong to another model."""

from __future__ import annotations

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
