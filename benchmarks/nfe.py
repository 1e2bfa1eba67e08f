"""Quality against network evaluations (NFE) for every sampler, on a trained mnist model.

    python benchmarks/nfe.py --model runs/bench_mnist --n 500 --json benchmarks/results/nfe.json --plot docs/nfe.png

For each sampler and NFE in 5, 10, 20, 50, 100 (Heun's 2 * steps - 1 calls rounded to the
nearest step count), n samples with the same seeds are compared with the 5,000 MNIST
digits (FD-MNIST, KID, precision/recall with the shipped digit network); the reference
is DDPM ancestral sampling with all 1000 steps. Seconds per image are measured in the
same process.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from diffusekit.evaluate import evaluate_images
from diffusekit.pipeline import Pipeline
from diffusekit.runtime import use_all_cores

SAMPLERS = ("ddim", "ddpm", "euler_ancestral", "heun", "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_3m")


def steps_for(sampler: str, nfe: int) -> int:
    return max(1, round((nfe + 1) / 2)) if sampler == "heun" else nfe


def nfe_of(sampler: str, steps: int) -> int:
    return 2 * steps - 1 if sampler == "heun" else steps


def measure(pipe: Pipeline, sampler: str, steps: int, n: int, spacing: str) -> dict:
    start = time.perf_counter()
    images = pipe.sample(n, steps=steps, sampler=sampler, spacing=spacing, seed=0, batch_size=250)
    seconds = time.perf_counter() - start
    report = evaluate_images(images, "mnist")
    keep = ("fd", "kid_mean", "precision", "recall", "confidence")
    return {"sampler": sampler, "steps": steps, "nfe": nfe_of(sampler, steps), "spacing": spacing,
            "seconds_per_image": seconds / n, **{k: report[k] for k in keep}}


def plot(results: list[dict], reference: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for sampler in SAMPLERS:
        rows = [r for r in results if r["sampler"] == sampler]
        ax.plot([r["nfe"] for r in rows], [r["fd"] for r in rows], marker="o", label=sampler)
    ax.axhline(reference["fd"], color="black", linestyle="--", label="DDPM, 1000 steps")
    ax.set(xscale="log", yscale="log", xlabel="network evaluations", ylabel="FD-MNIST (lower is better)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="runs/bench_mnist")
    parser.add_argument("--n", type=int, default=500)
    parser.add_argument("--nfe", default="5,10,20,50,100")
    parser.add_argument("--spacing", default="trailing")
    parser.add_argument("--json", default="benchmarks/results/nfe.json")
    parser.add_argument("--plot", default="docs/nfe.png")
    args = parser.parse_args()

    use_all_cores()
    pipe = Pipeline.from_pretrained(args.model)
    reference = measure(pipe, "ddpm", pipe.schedule.num_timesteps, args.n, args.spacing)
    print("reference", reference, flush=True)
    results = []
    for sampler in SAMPLERS:
        for nfe in (int(v) for v in args.nfe.split(",")):
            results.append(measure(pipe, sampler, steps_for(sampler, nfe), args.n, args.spacing))
            print(results[-1], flush=True)
    few = [r for r in results if 10 <= r["nfe"] <= 20]
    best = min(few, key=lambda r: r["fd"]) if few else None
    summary = {
        "model": args.model, "step": pipe.step, "n": args.n, "reference_ddpm_1000": reference, "results": results,
        "best_at_10_to_20_nfe": best,
        "best_fd_over_reference": best["fd"] / reference["fd"] if best else None,
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
    plot(results, reference, Path(args.plot))
    print(json.dumps({k: v for k, v in summary.items() if k != "results"}, indent=2))


if __name__ == "__main__":
    main()
