"""Where each word of a prompt lands in the image: DAAM's cross-attention maps (Tang et al. 2023) of a Pipeline.

    out = pipe("red apple", return_attention=True)
    out.attention.tokens      # ['red', 'apple']: the prompt's tokens as the text encoder splits it
    out.attention.maps        # [n_images, n_tokens, H, W] in [0, 1]: each map scaled to its own min..max, for display
    out.attention.raw         # the same before scaling: the mean cross-attention probability of the token
    draw_attention(images, out.attention).save("maps.png")

For each token, its cross-attention probabilities are summed over the layers, heads and network calls of the
sampling (with classifier-free guidance, of the conditional half only), each layer's map first upsampled
bicubically to the image size (DAAM eq. 4-5; nn/attention_recorder.py records them). `raw` divides that sum by
the number of (layer call, head) maps in it, so a token that took every query's whole attention would be 1.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch

from diffusekit.errors import UserError
from diffusekit.figures import heat_overlay, image_rgb, panel_rows
from diffusekit.nn.attention_recorder import CrossAttentionRecorder, cross_attention_layers, recording


@dataclass
class AttentionMaps:
    tokens: list[str]
    raw: torch.Tensor  # [n_images, n_tokens, H, W]

    @property
    def maps(self) -> torch.Tensor:
        """Each map scaled to [0, 1] between its own minimum and maximum (DAAM's display); a flat map is 0."""
        lo = self.raw.amin(dim=(-2, -1), keepdim=True)
        span = self.raw.amax(dim=(-2, -1), keepdim=True) - lo
        return torch.where(span > 0, (self.raw - lo) / span.clamp(min=1e-30), torch.zeros_like(self.raw))

    def correlation(self, a: int, b: int) -> float:
        """Pearson correlation of token a's and token b's maps over the pixels, averaged over the images."""
        x, y = (self.raw[:, i].flatten(1) for i in (a, b))
        x, y = x - x.mean(1, keepdim=True), y - y.mean(1, keepdim=True)
        return float(((x * y).sum(1) / (x.norm(dim=1) * y.norm(dim=1)).clamp(min=1e-30)).mean())


def pick_tokens(tokens: list[tuple[int, str]], words: list[str] | None, prompt: str) -> list[tuple[int, str]]:
    """The (position, token) pairs named by `words`: tokens as the tokenizer spells them, or their indices (0, 1, ...)."""
    if not words:
        return tokens
    available = ", ".join(f"{i} {token!r}" for i, (_, token) in enumerate(tokens))
    spelled = [token.removesuffix("</w>").lower() for _, token in tokens]  # (CLIP ends a word's token with </w>)
    chosen = []
    for word in words:
        key = word.strip().lower()
        index = spelled.index(key) if key in spelled else int(key) if key.isdigit() else None
        if index is None or index >= len(tokens):
            raise UserError(f"{word!r} is not a token of the prompt {prompt!r}; its tokens are {available} (give words or their indices)")
        chosen.append(tokens[index])
    return chosen


class AttentionCollector:
    """What Pipeline.sample(attention=...) fills: the checks before any work, then each batch's maps.

    words: only these tokens (or token indices); None: every token of the prompt."""

    def __init__(self, pipe, prompts, words: list[str] | None = None):
        if not cross_attention_layers(pipe.net):
            kind = "class-conditional" if pipe.config.model.num_classes else "unconditional"
            raise UserError(f"this model is {kind}: it has no cross-attention, so no attention maps; they need a text-to-image "
                            "model (the shipped emoji model: leave out --model; or a run of --preset emoji-ldm)")
        distinct = list(dict.fromkeys([prompts] if isinstance(prompts, str) else prompts or []))
        if len(distinct) != 1 or not distinct[0].strip():
            got = "no prompt" if not distinct or not distinct[0].strip() else f"{len(distinct)} prompts ({', '.join(map(repr, distinct[:3]))})"
            raise UserError(f"attention maps are drawn for one prompt at a time, got {got}; give one prompt")
        self.prompt = distinct[0]
        tokens = pipe.text_encoder.prompt_tokens(self.prompt)
        if not tokens:
            raise UserError(f"the prompt {self.prompt!r} has no tokens for the text encoder; give a prompt with words")
        self.chosen = pick_tokens(tokens, words, self.prompt)
        self.parts: list[torch.Tensor] = []

    @contextmanager
    def recording(self, pipe, plan, batch):
        """Around one batch's sampler: its cross-attention recorded, the conditional rows only."""
        side = plan.shape[-1] * (pipe.vae.downsample_factor if pipe.vae is not None else 1)
        recorder = CrossAttentionRecorder((side, side), [position for position, _ in self.chosen], rows=batch.count)
        with recording(pipe.net, recorder):
            yield
        if recorder.total is None:  # no network call recorded (cannot happen with a sampler's one call at least)
            raise RuntimeError("no cross-attention was recorded")
        self.parts.append((recorder.total / recorder.count).cpu())

    def result(self) -> AttentionMaps:
        return AttentionMaps([token for _, token in self.chosen], torch.cat(self.parts))


def draw_attention(images: torch.Tensor, attention: AttentionMaps, max_rows: int = 8, side: int = 96):
    """A figure: per image (at most max_rows), the image, then one panel per token: its map over the image."""
    rows = [[(image_rgb(image), "image")] + [(heat_overlay(image, heat), token) for heat, token in zip(maps, attention.tokens)]
            for image, maps in zip(images[:max_rows], attention.maps[:max_rows])]
    return panel_rows(rows, side=side)
