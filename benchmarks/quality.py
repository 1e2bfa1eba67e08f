"""Sample quality of the mnist preset against training time (after 2, 5, 10 and 20 minutes).

    python benchmarks/quality.py --out runs/quality_mnist --json benchmarks/results/quality.json --plot docs/quality_vs_time.png

One run, trained in segments with --resume (bit-exact, so it is the same run as an
uninterrupted one); after each segment the EMA model's samples (dpmpp_2m, 20 steps,
n = 1000) are compared with the 5,000 MNIST digits: FD-MNIST, KID, precision, recall.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from plots import pyplot, save

from diffusekit.config import apply_overrides, load_preset
from diffusekit.devices import use_all_cores
from diffusekit.diffusion_training import train
from diffusekit.durations import format_duration
from diffusekit.evaluate import evaluate_checkpoint, real_data_floor


def plot(points: list[dict], floor_fd: float, path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, ax1 = plt.subplots(figsize=(6, 4))
    minutes = [p["train_minutes"] for p in points]
    ax1.plot(minutes, [p["fd"] for p in points], marker="o", color="tab:blue")
    ax1.axhline(floor_fd, color="tab:blue", linestyle=":", label="FD of real digits (the floor at this n)")
    ax1.legend(loc="upper right", fontsize=8)
    ax1.set(xlabel="training time on this machine (minutes)", ylabel="FD-MNIST (lower is better)", yscale="log")
    ax2 = ax1.twinx()
    ax2.plot(minutes, [p["precision"] for p in points], marker="s", color="tab:orange", label="precision")
    ax2.plot(minutes, [p["recall"] for p in points], marker="^", color="tab:green", label="recall")
    ax2.set(ylabel="precision / recall", ylim=(0, 1))
    ax2.legend(loc="center right", fontsize=8)
    save(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="mnist")
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--minutes", default="2,5,10,20", help="cumulative training minutes at which to measure")
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--out", default="runs/quality_mnist")
    parser.add_argument("--json", default="benchmarks/results/quality.json")
    parser.add_argument("--plot", default="docs/quality_vs_time.png")
    args = parser.parse_args()

    use_all_cores()
    points, done = [], 0.0
    for i, total in enumerate(float(m) for m in args.minutes.split(",")):
        segment = f"{(total - done) * 60:.0f}s"
        config = apply_overrides(load_preset(args.preset), [*args.set, f'train.budget="{segment}"'])
        result = train(config, args.out, resume=i > 0, overwrite=i == 0, progress=False)
        done = total
        report = evaluate_checkpoint(args.out, n=args.n, sampler="dpmpp_2m", steps=20)
        points.append({"train_minutes": total, "step": result.step, "images_per_s": result.images_per_second,
                       **{k: report[k] for k in ("fd", "kid_mean", "kid_std", "precision", "recall", "confidence")}})
        print(f"{format_duration(total * 60)}: {points[-1]}", flush=True)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    floor = real_data_floor(args.n, size=config.data.image_size, channels=config.data.channels)
    Path(args.json).write_text(json.dumps({"preset": args.preset, "overrides": args.set, "n": args.n, "real_data_floor": floor, "points": points}, indent=2) + "\n")
    plot(points, sum(floor["fd"]) / len(floor["fd"]), Path(args.plot))


if __name__ == "__main__":
    main()
