"""Does bf16 sampling cost quality? The same model and seeds at fp32 and bf16.

    python benchmarks/precision_quality.py --mnist runs/bench_mnist --emoji src/diffusekit/assets/emoji-t2i \
        --json benchmarks/results/precision_quality.json

mnist: FD-MNIST of n samples (same seeds, the model's sampler at 20 steps) with the network in fp32
and in bf16, against the real-data floor (n held-out real digits against the rest, three splits):
the difference counts as no loss when it is inside the floor's spread. emoji: retrieval top-1 / top-5
of training captions (benchmarks/text_alignment.py's measure) at both precisions. bf16 runs on every
CPU (emulated where it is not native, only slower), so this quality check runs anywhere.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from text_alignment import retrieval

from diffusekit.data import load_dataset, to_float
from diffusekit.devices import use_all_cores
from diffusekit.evaluate import evaluate_images, real_data_floor
from diffusekit.metrics import embed, get_feature_extractor
from diffusekit.pipeline import Pipeline
from diffusekit.precision import cpu_info

PRECISIONS = ("fp32", "bf16")


def mnist_quality(run: str, n: int, steps: int) -> dict:
    rows = {}
    for precision in PRECISIONS:
        pipe = Pipeline.from_pretrained(run, device="cpu", dtype=precision)
        start = time.perf_counter()
        images = pipe.sample(n, steps=steps, seed=0, batch_size=250)
        seconds = time.perf_counter() - start
        report = evaluate_images(images, "mnist")
        rows[precision] = {"fd": report["fd"], "precision": report["precision"], "recall": report["recall"], "seconds_per_image": seconds / n,
                           "sampler": pipe.config.sample.sampler, "steps": steps}
        rows[precision]["images"] = images
        print(f"mnist {precision}: FD {report['fd']:.3f}", flush=True)
    floor = real_data_floor(n, 28, 1)
    spread = max(floor["fd"]) - min(floor["fd"])
    difference = rows["bf16"]["fd"] - rows["fp32"]["fd"]
    pixel_difference = float((rows["bf16"].pop("images") - rows["fp32"].pop("images")).abs().mean())
    return {"run": run, "n": n, **rows, "real_data_floor": floor, "floor_spread": spread, "fd_bf16_minus_fp32": difference,
            "inside_floor_spread": abs(difference) <= spread, "mean_abs_pixel_difference": pixel_difference}


def emoji_quality(run: str, count: int, steps: int, guidance: float | None) -> dict:
    rows = {}
    extractor = get_feature_extractor("random")
    for precision in PRECISIONS:
        pipe = Pipeline.from_pretrained(run, device="cpu", dtype=precision)
        data = load_dataset(pipe.config.data, progress=False)
        training = to_float(data.images)
        targets = torch.linspace(0, len(data) - 1, count).round().long()
        prompts = [data.captions[i] for i in targets.tolist()]
        generated = pipe.sample(count, prompts=prompts, guidance=guidance, steps=steps, seed=0, batch_size=100)
        rows[precision] = {"random_conv_features": retrieval(embed(extractor, generated)[0], embed(extractor, training)[0], targets),
                           "pixels": retrieval(generated, training, targets)}
        print(f"emoji {precision}: {rows[precision]}", flush=True)
    return {"run": run, "n_prompts": count, "steps": steps, "guidance": guidance, **rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mnist", help="an mnist run (e.g. benchmarks/train_mnist.py's runs/bench_mnist)")
    parser.add_argument("--emoji", help="a text-to-image emoji model (default: none; the shipped one is src/diffusekit/assets/emoji-t2i)")
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--prompts", type=int, default=300)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=None, help="emoji guidance (default: the model's)")
    parser.add_argument("--json", default="benchmarks/results/precision_quality.json")
    args = parser.parse_args()
    use_all_cores()
    report = {"cpu": cpu_info(), "torch": torch.__version__}
    if args.mnist:
        report["mnist"] = mnist_quality(args.mnist, args.n, args.steps)
    if args.emoji:
        report["emoji"] = emoji_quality(args.emoji, args.prompts, args.steps, args.guidance)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "cpu"}, indent=2))


if __name__ == "__main__":
    main()
