"""Objectives and backbones on the same budget: DDPM v-prediction against flow matching on the U-Net,
and the U-Net against the DiT (mnist, and text-to-image on the emoji latents).

    python benchmarks/objectives.py --pairs objective,backbone          # mnist: 3 runs of 10 min + evaluation, ~45 min idle
    python benchmarks/objectives.py --pairs objective                   # DDPM (preset mnist) vs flow (mnist-flow): ~30 min
    python benchmarks/objectives.py --pairs backbone                    # U-Net (mnist-flow) vs DiT (mnist-dit): ~30 min
    python benchmarks/objectives.py --pairs emoji --vae runs/emoji-vae  # U-Net vs DiT on emoji latents: ~35 min
    python benchmarks/objectives.py --smoke                             # every part with tiny budgets (not numbers to quote)

Each run trains from scratch for --budget of wall-clock time (train.budget, the same for every run)
and is then sampled at the same NFE (10 and 20) with each process's samplers; a model's score at an
NFE is its best sampler's. mnist: FD-MNIST, precision and recall of n = 1,000 samples against the
5,000 digits, with evaluate.real_data_floor (the FD of n real digits: what a perfect model scores).
emoji: one image per training caption spread over the set, guidance 3: FD on the fixed random conv
features against every emoji, and retrieval top-1 (is the prompt's own emoji the nearest training
image? benchmarks/text_alignment.py). Also steps/s, images/s and parameters. Both U-Nets on emoji
use flow matching here (emoji-ldm with flow overrides), so that only the backbone differs.

Runs already in --json (same budget, n and overrides) are kept, not trained again (--fresh retrains). Writes the
JSON (with the CPU model and flags), a Markdown table (--table) and a plot (--plot).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from nfe import nfe_of, steps_for
from plots import pyplot, save
from text_alignment import emoji_prompt_samples, retrieval

from diffusekit.autoencoder_training import train_vae
from diffusekit.config import apply_overrides, load_preset
from diffusekit.devices import use_all_cores
from diffusekit.diffusion_training import train
from diffusekit.evaluate import evaluate_images, real_data_floor
from diffusekit.metrics import embed, get_feature_extractor
from diffusekit.models import build_net
from diffusekit.pipeline import Pipeline

FLOW_SETS = ("diffusion.process=flow", "diffusion.loss_weighting=uniform", "diffusion.timestep_sampling=logit_normal")


@dataclass(frozen=True)
class Run:
    preset: str
    sets: tuple[str, ...] = ()
    data: str = "mnist"  # mnist | emoji: how it is scored


RUNS = {
    "mnist-ddpm": Run("mnist"),  # today's preset: DDPM, v-prediction, min-SNR
    "mnist-flow": Run("mnist-flow"),  # the same U-Net, flow matching
    "mnist-dit": Run("mnist-dit"),  # a DiT, flow matching
    "emoji-unet": Run("emoji-ldm", FLOW_SETS, "emoji"),
    "emoji-dit": Run("emoji-dit", (), "emoji"),
}
PAIRS = {  # (baseline, challenger, the target for the challenger's FD)
    "objective": ("mnist-ddpm", "mnist-flow", "no worse at 20 NFE, better at 10"),
    "backbone": ("mnist-flow", "mnist-dit", "within 1.5x of the U-Net's FD"),
    "emoji": ("emoji-unet", "emoji-dit", "within 1.5x of the U-Net's FD"),
}
# each process's candidates, the likeliest best first (--samplers N takes the first N)
SAMPLERS = {"ddpm": ("dpmpp_2m_sde", "dpmpp_2m", "unipc", "ddim", "heun"), "flow": ("flow_euler", "dpmpp_2m_sde", "dpmpp_2m", "unipc", "flow_heun")}


def machine() -> dict:
    """The CPU model and the flags that pick torch's kernels (AVX2, AVX-512, AVX512-BF16, AMX)."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model in ("", platform.machine()):
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")
    return {"cpu": model, "flags": [f for f in wanted if f in flags], "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version()}


def config_of(name: str, args) -> object:
    run = RUNS[name]
    sets = [*run.sets, f'train.budget="{args.budget}"', "eval.every=0", "train.sample_every=0", *args.set]
    if run.data == "emoji":
        sets.append(f'latent.vae="{args.vae}"')
    return apply_overrides(load_preset(run.preset), sets)


def score(pipe: Pipeline, kind: str, sampler: str, nfe: int, args) -> dict:
    steps = steps_for(sampler, nfe)
    start = time.perf_counter()
    if kind == "mnist":
        images = pipe.sample(args.n, steps=steps, sampler=sampler, seed=0, batch_size=250)
        seconds = time.perf_counter() - start
        report = evaluate_images(images, "mnist")
        extra = {k: report[k] for k in ("precision", "recall", "confidence")}
    else:
        generated, training, _, targets, _ = emoji_prompt_samples(pipe, args.prompts, args.guidance, steps, sampler)
        seconds = time.perf_counter() - start
        report = evaluate_images(generated, "emoji", features="random")
        extractor = get_feature_extractor("random")
        top = retrieval(embed(extractor, generated)[0], embed(extractor, training)[0], targets)
        extra = {"retrieval_top1": top["top1"], "retrieval_top5": top["top5"], "precision": report["precision"], "recall": report["recall"]}
    return {"sampler": sampler, "steps": steps, "nfe": nfe_of(sampler, steps), "fd": report["fd"],
            "seconds_per_image": seconds / len(images if kind == "mnist" else generated), **extra}


def measure(name: str, args) -> dict:
    config = config_of(name, args)
    out = Path(args.out) / name
    result = train(config, out, overwrite=True, progress=False)
    pipe = Pipeline.from_pretrained(out)
    process = config.diffusion.process
    samplers = SAMPLERS[process][: args.samplers]
    rows = [score(pipe, RUNS[name].data, sampler, nfe, args) for nfe in args.nfe for sampler in samplers]
    best = {str(nfe): min((r for r in rows if abs(r["nfe"] - nfe) <= 1), key=lambda r: r["fd"]) for nfe in args.nfe}
    m = config.model
    network = (f"DiT patch {m.patch_size}, width {m.hidden_size}, depth {m.depth}" if m.type == "dit"
               else f"U-Net widths {list(m.channels)}")
    return {"preset": RUNS[name].preset, "overrides": list(RUNS[name].sets) + args.set, "network": network, "process": process,
            "parameters": sum(p.numel() for p in build_net(config).parameters()), "budget": args.budget, "n": args.n,
            "steps": result.step, "train_seconds": result.train_seconds, "steps_per_s": result.step / max(result.train_seconds, 1e-9),
            "images_per_s": result.images_per_second, "last_loss": result.last_loss, "rows": rows, "best": best}


def pair_summary(pair: str, runs: dict, nfes) -> dict:
    base, challenger, target = PAIRS[pair]
    a, b = runs[base], runs[challenger]
    ratios = {str(nfe): b["best"][str(nfe)]["fd"] / a["best"][str(nfe)]["fd"] for nfe in nfes}
    return {"baseline": base, "challenger": challenger, "target": target, "fd_ratio_challenger_over_baseline": ratios,
            "step_time_ratio_challenger_over_baseline": a["steps_per_s"] / b["steps_per_s"]}


def table(report: dict) -> str:
    """A Markdown table: one row per run and NFE, the best sampler's scores."""
    lines = ["| run | network | process | params | steps in budget | steps/s | NFE | best sampler | FD | precision / recall | top-1 |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, run in report["runs"].items():
        for nfe, best in run["best"].items():
            top = f"{best['retrieval_top1']:.2f}" if "retrieval_top1" in best else ""
            lines.append(f"| {name} | {run['network']} | {run['process']} | {run['parameters'] / 1e6:.2f}M | {run['steps']} | "
                         f"{run['steps_per_s']:.2f} | {best['nfe']} | {best['sampler']} | {best['fd']:.3f} | "
                         f"{best['precision']:.2f} / {best['recall']:.2f} | {top} |")
    floor = report.get("mnist_real_data_floor")
    if floor:
        lines.append(f"\nFD-MNIST of {floor['n']} real digits (the floor): {min(floor['fd']):.3f} to {max(floor['fd']):.3f}.")
    for pair, summary in report.get("pairs", {}).items():
        ratios = ", ".join(f"{v:.2f} at {k} NFE" for k, v in summary["fd_ratio_challenger_over_baseline"].items())
        lines.append(f"\n{pair}: {summary['challenger']} / {summary['baseline']} FD {ratios} (target: {summary['target']}); "
                     f"one {summary['challenger']} step takes {summary['step_time_ratio_challenger_over_baseline']:.2f}x the time of a "
                     f"{summary['baseline']} step.")
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    plt = pyplot()
    if plt is None or not report["runs"]:
        return
    kinds = [k for k in ("mnist", "emoji") if any(RUNS[name].data == k for name in report["runs"])]
    fig, axes = plt.subplots(1, len(kinds), figsize=(5.5 * len(kinds), 4), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        for name, run in report["runs"].items():
            if RUNS[name].data == kind:
                nfes = sorted(run["best"], key=int)  # the NFE asked for (heun's 2 * steps - 1 lands within 1 of it)
                ax.plot([int(k) for k in nfes], [run["best"][k]["fd"] for k in nfes], marker="o", label=f"{name} ({run['steps']} steps)")
        floor = report.get("mnist_real_data_floor")
        if kind == "mnist" and floor:
            ax.axhline(sum(floor["fd"]) / len(floor["fd"]), color="grey", linestyle=":", label="real digits (the floor)")
        ax.set(xlabel="network evaluations (best sampler)", ylabel=f"FD ({'MNIST digit net' if kind == 'mnist' else 'random features'})",
               yscale="log", title=f"{kind}, {report['settings']['budget']} of training each")
        ax.legend(fontsize=8)
    save(fig, path)


def ensure_vae(args) -> None:
    """--smoke without --vae: a tiny emoji autoencoder trained for a few seconds (its latents are still 8 x 8 x 4)."""
    if args.vae or not any(RUNS[name].data == "emoji" for name in args.runs):
        return
    args.vae = str(Path(args.out) / "emoji-vae")
    config = apply_overrides(load_preset("emoji-vae"), [f'train.budget="{args.budget}"', "vae_loss.disc_weight=0", "eval.n=16"])
    train_vae(config, args.vae, overwrite=True, progress=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", help=f"which comparisons: {', '.join(PAIRS)} (default: objective,backbone; with --smoke all three)")
    parser.add_argument("--budget", default="10m", help="training time of every run")
    parser.add_argument("--n", type=int, default=1000, help="mnist samples per measurement")
    parser.add_argument("--prompts", type=int, default=500, help="emoji prompts (one image each) per measurement")
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument("--nfe", default="10,20")
    parser.add_argument("--samplers", type=int, default=5, help="the first N samplers of each process (SAMPLERS)")
    parser.add_argument("--vae", default="", help="the emoji autoencoder run (preset emoji-vae), for --pairs emoji")
    parser.add_argument("--set", action="append", default=[], help="an override for every run, e.g. train.lr=5e-4")
    parser.add_argument("--fresh", action="store_true", help="retrain runs already in --json")
    parser.add_argument("--smoke", action="store_true", help="tiny budgets and samples: proves every part runs (numbers mean nothing)")
    parser.add_argument("--out", default="runs/objectives")
    parser.add_argument("--json", default="benchmarks/results/objectives.json")
    parser.add_argument("--table", default="docs/objectives.md")
    parser.add_argument("--plot", default="docs/objectives.png")
    args = parser.parse_args()
    if args.smoke:  # never over the real results
        args.budget, args.n, args.prompts, args.nfe, args.samplers = "2s", 32, 32, "4", 2
        args.pairs = args.pairs or ",".join(PAIRS)
        args.out = "runs/objectives_smoke"
        args.json, args.table, args.plot = (f"{args.out}/objectives.{ext}" for ext in ("json", "md", "png"))
        args.set = [*args.set, "train.batch_size=16", "train.warmup_steps=5", "data.limit=64"]
    args.nfe = [int(v) for v in args.nfe.split(",")]
    pairs = [p.strip() for p in (args.pairs or "objective,backbone").split(",") if p.strip()]
    unknown = [p for p in pairs if p not in PAIRS]
    if unknown:
        parser.error(f"unknown pair(s) {unknown}; choose from {', '.join(PAIRS)}")
    args.runs = list(dict.fromkeys(name for p in pairs for name in PAIRS[p][:2]))
    if "emoji" in pairs and not args.vae and not args.smoke:
        parser.error("--pairs emoji needs --vae RUN (an emoji autoencoder: diffusekit train-vae --preset emoji-vae --out runs/emoji-vae)")

    use_all_cores()
    path = Path(args.json)
    report = json.loads(path.read_text()) if path.is_file() and not args.fresh else {"runs": {}}
    report["machine"], report["settings"] = machine(), {k: v for k, v in vars(args).items() if k not in ("runs",)}
    ensure_vae(args)
    for name in args.runs:
        kept = report["runs"].get(name)
        if kept and (kept["budget"], kept["n"], kept["overrides"]) == (args.budget, args.n, list(RUNS[name].sets) + args.set):
            print(f"{name}: kept from {path}", flush=True)
            continue
        report["runs"][name] = measure(name, args)
        print(json.dumps({name: {k: v for k, v in report["runs"][name].items() if k != "rows"}}), flush=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2) + "\n")
    if any(RUNS[name].data == "mnist" for name in args.runs):
        report["mnist_real_data_floor"] = real_data_floor(args.n, size=28, channels=1)
    report["pairs"] = {p: pair_summary(p, report["runs"], args.nfe) for p in pairs}
    path.write_text(json.dumps(report, indent=2) + "\n")
    Path(args.table).parent.mkdir(parents=True, exist_ok=True)
    Path(args.table).write_text(table(report))
    plot(report, Path(args.plot))
    print(table(report))


if __name__ == "__main__":
    main()
