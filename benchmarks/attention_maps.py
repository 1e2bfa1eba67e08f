"""Cross-attention maps (issue 27): what the recorder seam costs when the maps are off, and how different two
words' maps are on the shipped emoji model.

    python benchmarks/attention_maps.py --json benchmarks/results/attention_maps.json
    python benchmarks/attention_maps.py --repeats 3 --prompts 2        # briefly

(a) Sampling time of the shipped model (8 images, its 20 steps, guidance 3, --precision auto as `generate`),
in alternating rounds, with: `before` (Attention.attend as it was before the seam, patched in: the reference),
`maps_off` (today's code, nothing recording: the one `recorder is None` check per layer call) and `maps_on`
(return_attention: the probabilities computed again for the cross-attention layers). The JSON holds every
time, the medians, maps_off / before (the target: within 2%), whether the three made bit-identical images,
the CPU model and its flags. (b) For two-word prompts, the Pearson correlation of the two words' maps
(attention_maps.AttentionMaps.correlation, averaged over the 8 images). Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from diffusekit.attention_maps import AttentionCollector
from diffusekit.models import default_model
from diffusekit.nn.blocks import Attention, sliced_attention
from diffusekit.pipeline import Pipeline
from diffusekit.precision import cpu_info

TWO_WORD_PROMPTS = ["red apple", "green apple", "red heart", "blue car", "yellow star", "smiling cat", "red rocket", "pink flower"]


def attend_before_seam(self, x, context=None, mask=None):
    """Attention.attend as it was before issue 27 added the recorder check: the `before` reference (kept here only)."""
    b, n, dim = x.shape
    context = x if context is None else context
    q = self.to_q(x).view(b, n, self.heads, -1).transpose(1, 2)
    k, v = (proj(context).view(b, context.shape[1], self.heads, -1).transpose(1, 2) for proj in (self.to_k, self.to_v))
    attn_mask = mask.bool()[:, None, None, :] if mask is not None else None
    out = sliced_attention(q, k, v, attn_mask, self.query_chunk).transpose(1, 2).reshape(b, n, dim)
    for layer in self.to_out:
        out = layer(out)
    return out


def sample(pipe: Pipeline, variant: str, n: int, prompt: str = "red apple") -> torch.Tensor:
    today = Attention.attend
    if variant == "before":
        Attention.attend = attend_before_seam
    try:
        attention = AttentionCollector(pipe, prompt) if variant == "maps_on" else None
        return pipe.sample(n, prompts=prompt, seed=0, attention=attention)
    finally:
        Attention.attend = today


def timing(pipe: Pipeline, repeats: int, n: int) -> dict:
    variants = ("before", "maps_off", "maps_on")
    times, outputs = {v: [] for v in variants}, {}
    for round_ in range(repeats + 1):  # round 0 warms up and keeps the images
        for variant in variants if round_ % 2 == 0 else reversed(variants):
            start = time.perf_counter()
            images = sample(pipe, variant, n)
            elapsed = time.perf_counter() - start
            if round_ == 0:
                outputs[variant] = images
            else:
                times[variant].append(elapsed)
    medians = {v: statistics.median(t) for v, t in times.items()}
    return {"seconds": times, "median_s": medians, "maps_off_over_before": medians["maps_off"] / medians["before"],
            "maps_on_over_before": medians["maps_on"] / medians["before"],
            "bit_identical": {v: bool(torch.equal(outputs[v], outputs["before"])) for v in variants}}


def correlations(pipe: Pipeline, prompts: list[str], n: int) -> dict:
    found = {}
    for prompt in prompts:
        out = pipe(prompt, n=n, seed=0, return_attention=True)
        found[prompt] = {"tokens": out.attention.tokens, "correlation": round(out.attention.correlation(0, 1), 4)}
        print(f"{prompt!r}: {found[prompt]}")
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10, help="timed rounds (after one warm-up round)")
    parser.add_argument("--n", type=int, default=8, help="images per sampling call")
    parser.add_argument("--prompts", type=int, default=len(TWO_WORD_PROMPTS), help="how many of the two-word prompts to measure")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    torch.manual_seed(0)
    pipe = Pipeline.from_pretrained(default_model(), device="cpu", dtype="auto")
    result = {"benchmark": "attention_maps", "cpu": cpu_info(), "torch": torch.__version__, "threads": torch.get_num_threads(),
              "precision": pipe.precision, "images": args.n, "steps": pipe.config.sample.steps, "repeats": args.repeats,
              "timing": timing(pipe, args.repeats, args.n), "correlations": correlations(pipe, TWO_WORD_PROMPTS[: args.prompts], args.n)}
    t = result["timing"]
    print(f"median s: {t['median_s']}; maps off / before {t['maps_off_over_before']:.4f}, maps on / before {t['maps_on_over_before']:.3f}; "
          f"bit-identical {t['bit_identical']}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
