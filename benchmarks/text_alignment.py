"""Does a text-to-image model draw what the prompt says?

    python benchmarks/text_alignment.py --mnist runs/mnist-t2i --emoji runs/emoji-ldm --json benchmarks/results/text_alignment.json

mnist: for captions "a handwritten digit <d>", the label accuracy of the generated
digits according to the shipped digit classifier (chance: 10%).
emoji: for K training captions spread over the set, one image each; retrieval accuracy:
is the prompt's own emoji the nearest training image (top-1), or among the 5 nearest
(top-5), in a feature space (the fixed random conv features, and raw pixels)? Chance is
1/N and 5/N for N training emoji. Also writes a grid of prompts it never saw.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from diffusekit.data import load_dataset, to_float
from diffusekit.devices import use_all_cores
from diffusekit.evaluate import evaluate_checkpoint
from diffusekit.images import save_grid
from diffusekit.metrics import embed, get_feature_extractor
from diffusekit.pipeline import Pipeline

UNSEEN = ["a red car", "a happy cat", "a blue heart", "a green tree", "a pizza with cheese", "an angry sun", "a yellow star", "a sad robot"]


def retrieval(generated: torch.Tensor, training: torch.Tensor, targets: torch.Tensor) -> dict:
    """Top-1 / top-5 rate at which each generated image's nearest training items include its target."""
    distances = torch.cdist(generated.flatten(1).double(), training.flatten(1).double())
    nearest = distances.topk(5, largest=False).indices
    return {"top1": (nearest[:, 0] == targets).double().mean().item(), "top5": (nearest == targets[:, None]).any(1).double().mean().item()}


def emoji_prompt_samples(pipe: Pipeline, count: int, guidance: float, steps: int, sampler: str | None = None):
    """One image for each of `count` training captions spread over the emoji set: (generated, training images, data, targets, prompts)."""
    data = load_dataset(pipe.config.data, progress=False)
    targets = torch.linspace(0, len(data) - 1, count).round().long()
    prompts = [data.captions[i] for i in targets.tolist()]
    generated = pipe.sample(count, prompts=prompts, guidance=guidance, steps=steps, sampler=sampler, seed=0, batch_size=100)
    return generated, to_float(data.images), data, targets, prompts


def emoji_alignment(run: str, count: int, guidance: float, steps: int, grid_dir: Path) -> dict:
    pipe = Pipeline.from_pretrained(run)
    generated, training, data, targets, prompts = emoji_prompt_samples(pipe, count, guidance, steps)
    extractor = get_feature_extractor("random")
    gen_features, _ = embed(extractor, generated)
    train_features, _ = embed(extractor, training)
    save_grid(torch.stack([x for pair in zip(training[targets[:32]], generated[:32]) for x in pair]), grid_dir / "emoji_seen_prompts.png", ncols=8)
    unseen = pipe.sample(len(UNSEEN) * 2, prompts=UNSEEN, guidance=guidance, steps=steps, seed=1)
    save_grid(unseen, grid_dir / "emoji_unseen_prompts.png", ncols=len(UNSEEN))
    return {
        "run": run, "n_prompts": count, "n_training": len(data), "guidance": guidance, "steps": steps,
        "random_conv_features": retrieval(gen_features, train_features, targets),
        "pixels": retrieval(generated, training, targets),
        "chance": {"top1": 1 / len(data), "top5": 5 / len(data)},
        "seen_prompts_shown": prompts[:32], "unseen_prompts_shown": UNSEEN,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mnist", help="a text-conditioned mnist run (preset mnist-t2i)")
    parser.add_argument("--emoji", help="a text-to-image emoji run (preset emoji-ldm)")
    parser.add_argument("--n", type=int, default=1000, help="mnist samples")
    parser.add_argument("--prompts", type=int, default=300, help="emoji prompts")
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--json", default="benchmarks/results/text_alignment.json")
    parser.add_argument("--grids", default="docs")
    args = parser.parse_args()

    use_all_cores()
    report = {}
    if args.mnist:
        mnist = evaluate_checkpoint(args.mnist, n=args.n, sampler="dpmpp_2m", steps=args.steps, guidance=args.guidance)
        report["mnist"] = {k: mnist[k] for k in ("label_accuracy", "fd", "precision", "recall", "class_histogram", "step")}
        report["mnist"].update({"run": args.mnist, "guidance": args.guidance, "chance": 0.1})
        print(json.dumps(report["mnist"]), flush=True)
    if args.emoji:
        report["emoji"] = emoji_alignment(args.emoji, args.prompts, args.guidance, args.steps, Path(args.grids))
        print(json.dumps({k: v for k, v in report["emoji"].items() if "shown" not in k}), flush=True)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
