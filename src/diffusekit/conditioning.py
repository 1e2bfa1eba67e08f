"""What the network is conditioned on: class labels or prompts to the U-Net's inputs, and their unconditional twins.

    cond, uncond = conditions(config, text_encoder, device, n, prompts=["a red apple"], negative="green")

uncond is what classifier-free guidance steers away from: the null class, the empty prompt or the
negative prompt. Several prompts take turns over the n images (p1, p2, p1, p2, ...).
"""

from __future__ import annotations

import math

import torch

from diffusekit.config import Config
from diffusekit.errors import UserError
from diffusekit.models import text_condition


def class_labels(labels, n: int, num_classes: int) -> torch.Tensor | None:
    """n class labels (the given ones repeated), checked against the model's classes; None for none."""
    if labels is None:
        return None
    if not num_classes:
        raise UserError("this model is not class-conditional: it takes no --label; train one with e.g. --preset mnist-cond")
    labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
    labels = labels.repeat(math.ceil(n / len(labels)))[:n]
    if ((labels < 0) | (labels >= num_classes)).any():
        raise UserError(f"labels must be between 0 and {num_classes - 1} for this model")
    return labels


def encode_prompts(text_encoder, prompts: list[str], mask_padding: bool, device) -> dict:
    """Text conditions for a list of prompts, each distinct prompt encoded once."""
    if text_encoder is None:
        raise UserError("this model is not text-conditioned: it takes no prompt; use a text-to-image run (e.g. --preset emoji-ldm)")
    unique = list(dict.fromkeys(prompts))
    hidden, mask = text_encoder.encode(unique)
    rows = torch.tensor([unique.index(p) for p in prompts])
    return text_condition(hidden[rows].to(device), mask[rows].to(device), mask_padding)


def conditions(config: Config, text_encoder, device, n: int, labels=None, prompts=None, negative: str | None = None) -> tuple[dict | None, dict | None]:
    """(cond, uncond) for all n samples; n must be a multiple of the number of prompts."""
    mask_padding = config.text.mask_padding
    if prompts is not None:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not all(isinstance(p, str) for p in [*prompts, negative or ""]):
            raise UserError(f"prompts and the negative prompt must be strings, got {[*prompts, negative]!r}")
        if not prompts or n % len(prompts):
            listed = ", ".join(repr(p) for p in prompts[:4]) + (", ..." if len(prompts) > 4 else "")
            raise UserError(f"{len(prompts)} prompts ({listed}) cannot share {n} images evenly; ask for a multiple of "
                            f"{max(len(prompts), 1)} images (--n), or, if they are the words of one prompt, quote a prompt of "
                            f"several words as one argument: \"{' '.join(prompts)}\"")
        prompts = prompts * (n // len(prompts))
        return encode_prompts(text_encoder, prompts, mask_padding, device), encode_prompts(text_encoder, [negative or ""] * n, mask_padding, device)
    if negative:
        raise UserError("a negative prompt needs a prompt")
    all_labels = class_labels(labels, n, config.model.num_classes)
    if all_labels is not None:
        null = torch.full((n,), config.model.num_classes, dtype=torch.long)
        return {"class_labels": all_labels.to(device)}, {"class_labels": null.to(device)}
    if text_encoder is not None:  # a text model without a prompt: the unconditional model
        return encode_prompts(text_encoder, [""] * n, mask_padding, device), None
    return None, None
