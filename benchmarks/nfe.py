"""Quality against network evaluations (NFE) for every sampler, on a trained mnist model.

    python benchmarks/nfe.py --model runs/bench_mnist --n 500 --json benchmarks/results/nfe.json --plot docs/nfe.png

For each sampler and NFE in 5, 10, 20, 50, 100 (Heun's 2 * steps - 1 calls rounded to the
nearest step count), n samples with the same seeds are compared with the 5,000 MNIST
digits (FD-MNIST, KID, precision/recall with the shipped digit network); the reference
is DDPM ancestral sampling with all 1000 steps. Seconds per image are measured in the
same process. The step schedules karras and logsnr are compared at 10 and 20 NFE for the
multistep solvers. The JSON is rewritten after every measurement; run again with the same
--model, --n and --json and the rows already there are kept, not measured again.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from plots import pyplot, save

from diffusekit.devices import use_all_cores
from diffusekit.evaluate import evaluate_images, real_data_floor
from diffusekit.pipeline import Pipeline

SAMPLERS = ("ddim", "ddpm", "euler", "euler_ancestral", "heun", "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_3m")
SCHEDULE_SAMPLERS = ("heun", "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_3m")  # also measured with the other step schedules
SCHEDULE_NFE = (10, 20)


def steps_for(sampler: str, nfe: int) -> int:
    return max(1, round((nfe + 1) / 2)) if sampler.endswith("heun") else nfe  # heun and flow_heun: 2 * steps - 1 calls


def nfe_of(sampler: str, steps: int) -> int:
    return 2 * steps - 1 if sampler.endswith("heun") else steps


def measure(pipe: Pipeline, sampler: str, steps: int, n: int, spacing: str) -> dict:
    start = time.perf_counter()
    images = pipe.sample(n, steps=steps, sampler=sampler, spacing=spacing, seed=0, batch_size=250)
    seconds = time.perf_counter() - start
    report = evaluate_images(images, "mnist")
    keep = ("fd", "kid_mean", "precision", "recall", "confidence")
    return {"sampler": sampler, "steps": steps, "nfe": nfe_of(sampler, steps), "spacing": spacing,
            "seconds_per_image": seconds / n, **{k: report[k] for k in keep}}


def plot(results: list[dict], reference: dict, floor_fd: float, path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    drawn = {}  # FD curve -> sampler: samplers that coincide (euler_ancestral is ddpm in sigma space) share a line
    for sampler in SAMPLERS:
        rows = [r for r in results if r["sampler"] == sampler]
        curve = tuple(round(r["fd"], 4) for r in rows)
        if curve in drawn:
            ax.lines[drawn[curve]].set_label(f"{ax.lines[drawn[curve]].get_label()} = {sampler}")
            continue
        drawn[curve] = len(ax.lines)
        ax.plot([r["nfe"] for r in rows], [r["fd"] for r in rows], marker="o", label=sampler)
    ax.axhline(reference["fd"], color="black", linestyle="--", label="DDPM, 1000 steps")
    ax.axhline(floor_fd, color="grey", linestyle=":", label="real digits (the floor at this n)")
    ax.set(xscale="log", yscale="log", xlabel="network evaluations", ylabel="FD-MNIST (lower is better)")
    ax.legend(fontsize=8)
    save(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="runs/bench_mnist")
    parser.add_argument("--n", type=int, default=500)
    parser.add_argument("--nfe", default="5,10,20,50,100")
    parser.add_argument("--spacing", default="trailing")
    parser.add_argument("--samplers", default=",".join(SAMPLERS))
    parser.add_argument("--schedules", default="karras,logsnr", help="other step schedules for SCHEDULE_SAMPLERS ('' for none)")
    parser.add_argument("--json", default="benchmarks/results/nfe.json")
    parser.add_argument("--plot", default="docs/nfe.png")
    args = parser.parse_args()

    use_all_cores()
    pipe = Pipeline.from_pretrained(args.model)
    json_path = Path(args.json)
    header = {"model": args.model, "step": pipe.step, "n": args.n}
    previous = json.loads(json_path.read_text()) if json_path.exists() else {}
    kept = previous.get("measured", []) if all(previous.get(k) == v for k, v in header.items()) else []
    measured = {(r["sampler"], r["steps"], r["spacing"]): r for r in kept}

    def row(sampler: str, steps: int, spacing: str) -> dict:
        key = (sampler, steps, spacing)
        if key not in measured:
            measured[key] = measure(pipe, sampler, steps, args.n, spacing)
            print(measured[key], flush=True)
            write(json_path, header, measured, summary={})
        return measured[key]

    reference = row("ddpm", pipe.schedule.num_timesteps, args.spacing)
    nfes = [int(v) for v in args.nfe.split(",")]
    results = [row(s, steps_for(s, nfe), args.spacing) for s in args.samplers.split(",") for nfe in nfes]
    schedules = [row(s, steps_for(s, nfe), spacing) for spacing in args.schedules.split(",") if spacing
                 for s in SCHEDULE_SAMPLERS for nfe in SCHEDULE_NFE]
    few = [r for r in results + schedules if 10 <= r["nfe"] <= 20]
    best = min(few, key=lambda r: r["fd"]) if few else None
    data = pipe.config.data
    floor = real_data_floor(args.n, size=data.image_size, channels=data.channels)
    summary = {
        "real_data_floor": floor, "reference_ddpm_1000": reference, "results": results, "schedules": schedules,
        "best_at_10_to_20_nfe": best,
        "best_fd_over_reference": best["fd"] / reference["fd"] if best else None,
    }
    write(json_path, header, measured, summary)
    plot(results, reference, sum(floor["fd"]) / len(floor["fd"]), Path(args.plot))
    print(json.dumps({k: v for k, v in summary.items() if k not in ("results", "schedules")}, indent=2))


def write(path: Path, header: dict, measured: dict, summary: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**header, **summary, "measured": list(measured.values())}, indent=2) + "\n")


if __name__ == "__main__":
    main()
