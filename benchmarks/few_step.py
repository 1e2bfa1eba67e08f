"""Few-step students: quality against network calls for a teacher and its distilled students, and their speed.

    python benchmarks/few_step.py --part mnist --teacher runs/bench_mnist --budget 10m   # about 30 minutes on 2 cores
    python benchmarks/few_step.py --part emoji --emoji-budget 20m                        # about 35 minutes on 2 cores
    python benchmarks/few_step.py --part mnist --smoke                                   # a minute or two (tiny runs: proves the script works)

mnist: the teacher is the `mnist` preset model of benchmarks/train_mnist.py (--teacher; trained here for --teacher-budget
if the folder does not exist). Measured with n samples (default 1,000) against the 5,000 MNIST digits (FD-MNIST and
the real-data floor of n digits, evaluate.real_data_floor) and in images/s of sampling: the teacher at 20 NFE with its own
sampler (sample.sampler: dpmpp_2m_sde for the preset) and with DDIM at distill.start_steps (what progressive distillation
copies: its students' ceiling); the progressive students at 4, 2 and 1 steps (one run to 1 step: RUN/students/4-steps,
2-steps and the run itself); the consistency student at 1, 2 and 4 steps (one run). Each distillation gets --budget, and
its wall and CPU time are compared with the teacher's training time (its state.json's train_seconds).

emoji: the shipped text-to-image model (src/diffusekit/assets/emoji-t2i) as teacher, its guidance distilled into the
student (--emoji-methods, default consistency). For the teacher at 20 steps and each student at 1, 2 and 4 steps: FD in
the random conv features against every emoji, and retrieval top-1 / top-5 of --prompts training captions (as
benchmarks/text_alignment.py measures it); and the wall time of `diffusekit generate` for the same 8 prompts (the whole
command, and the sampling alone).

Each part updates its own rows of the JSON (default benchmarks/results/few_step.json), so the parts may run separately;
the plot (docs/few_step.png) draws FD against network calls for every row measured so far.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from plots import pyplot, save
from text_alignment import retrieval

from diffusekit.config import apply_overrides, load_preset
from diffusekit.data import load_dataset, to_float
from diffusekit.devices import use_all_cores
from diffusekit.diffusion_training import train
from diffusekit.distill import distill
from diffusekit.evaluate import evaluate_images, real_data_floor
from diffusekit.files import read_json
from diffusekit.metrics import embed, get_feature_extractor
from diffusekit.models import default_model
from diffusekit.pipeline import Pipeline

SMOKE_STEPS = 6  # optimizer steps of each distillation in --smoke (2 per progressive stage)
SMOKE_SETS = ["train.batch_size=16", "sample.n=8"]
PROMPTS = ["red apple", "grinning face", "rocket", "sun", "snowman", "pizza", "red heart", "dog face"]  # the demo's 8


def machine() -> dict:
    """The CPU model and the vector extensions torch can use on it (these numbers depend on both)."""
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")), platform.processor())
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines() if line.startswith("flags")), [])
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
    return {"cpu": model, "flags": [f for f in wanted if f in flags], "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "capability": torch.backends.cpu.get_cpu_capability(), "python": platform.python_version()}


def timed_sample(pipe: Pipeline, n: int, **kwargs) -> tuple[torch.Tensor, float]:
    warm = min(n, 8)
    pipe.sample(warm, **{**kwargs, **({"prompts": kwargs["prompts"][:warm]} if "prompts" in kwargs else {})})  # warm-up
    start = time.perf_counter()
    images = pipe.sample(n, **kwargs)
    return images, n / (time.perf_counter() - start)


def distilled(teacher: Path, out: Path, method: str, steps: int, args, overrides: list[str], budget: str) -> dict:
    """Distil (or, when `out` already holds this distillation, reuse it) and report its time."""
    if not (out / "config.json").is_file() or read_json(out / "config.json", "config").get("distill", {}).get("steps") != steps:
        cpu, wall = time.process_time(), time.perf_counter()
        result = distill(teacher, out, method=method, steps=steps, budget=None if args.smoke else budget, train_steps=SMOKE_STEPS if args.smoke else None,
                         overrides=overrides, overwrite=True, progress=sys.stderr.isatty())
        timing = {"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu, "train_seconds": result.train_seconds, "step": result.step,
                  "stopped_by": result.stopped_by}
        (out / "few_step_timing.json").write_text(json.dumps(timing) + "\n")
    return json.loads((out / "few_step_timing.json").read_text())


# ----------------------------------------------------------------------------- mnist


def mnist_row(pipe: Pipeline, label: str, n: int, **kwargs) -> dict:
    images, rate = timed_sample(pipe, n, seed=0, batch_size=250, **kwargs)
    report = evaluate_images(images, "mnist")
    nfe = kwargs.get("steps") or pipe.config.sample.steps
    row = {"part": "mnist", "model": label, "nfe": nfe, "sampler": kwargs.get("sampler") or pipe.config.sample.sampler, "images_per_s": rate,
           **{k: report[k] for k in ("fd", "kid_mean", "precision", "recall", "confidence")}}
    print(json.dumps(row), flush=True)
    return row


def mnist_part(args, rows: list[dict]) -> dict:
    teacher = Path(args.teacher)
    if not (teacher / "checkpoints").is_dir():
        sets = [*SMOKE_SETS, "train.max_steps=2", "model.channels=16,32,32", "model.attention_head_dim=16"] if args.smoke else [f'train.budget="{args.teacher_budget}"']
        train(apply_overrides(load_preset("mnist"), sets), teacher, progress=sys.stderr.isatty())
    pipe = Pipeline.from_pretrained(teacher)
    start_steps = 8 if args.smoke else 64
    rows.append(mnist_row(pipe, "teacher", args.n, steps=20))
    rows.append(mnist_row(pipe, "teacher", args.n, steps=start_steps, sampler="ddim"))
    sets = ["train.checkpoint_every=100000", f"distill.start_steps={start_steps}"] + (SMOKE_SETS + ["distill.solver_steps=10"] if args.smoke else [])
    timings = {}
    root = Path(args.out)
    timings["progressive"] = distilled(teacher, root / "mnist-progressive", "progressive", 1, args, sets, args.budget)
    run = root / "mnist-progressive"
    for folder in (run / "students" / "4-steps", run / "students" / "2-steps", run):  # the 4- and 2-step stages' students, the 1-step one
        if folder.is_dir():  # (a run that the budget stopped early has fewer)
            rows.append(mnist_row(Pipeline.from_pretrained(folder), "progressive", args.n))
    timings["consistency"] = distilled(teacher, root / "mnist-consistency", "consistency", 4, args, sets, args.budget)
    student = Pipeline.from_pretrained(root / "mnist-consistency")
    for steps in (1, 2, 4):
        rows.append(mnist_row(student, "consistency", args.n, steps=steps))
    teacher_state = read_json(Path(pipe.checkpoint) / "state.json", "training state")
    floor = real_data_floor(args.n, size=28, channels=1)
    return {"teacher": str(teacher), "teacher_train_seconds": teacher_state.get("train_seconds"), "teacher_step": pipe.step,
            "distillation": timings, "real_data_floor": floor, "n": args.n, "budget": args.budget}


# ----------------------------------------------------------------------------- emoji


def emoji_row(pipe: Pipeline, label: str, data, training_features, targets, extractor, steps: int | None) -> dict:
    prompts = [data.captions[i] for i in targets.tolist()]
    images, rate = timed_sample(pipe, len(prompts), prompts=prompts, steps=steps, seed=0, batch_size=100)
    features, _ = embed(extractor, images)
    report = evaluate_images(images, "emoji", "random")
    row = {"part": "emoji", "model": label, "nfe": steps or pipe.config.sample.steps, "sampler": pipe.config.sample.sampler,
           "calls_per_step": 1 if pipe.config.model.guidance_embedding or pipe.config.sample.guidance == 1 else 2, "images_per_s": rate,
           "fd_random": report["fd"], "retrieval": retrieval(features, training_features, targets)}
    print(json.dumps(row), flush=True)
    return row


def generate_seconds(model: Path, extra: list[str], repeats: int = 5) -> dict:
    """Wall time of `diffusekit generate` for the 8 demo prompts: the whole command, and the sampling alone (medians of `repeats`)."""
    commands = []
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(repeats):
            start = time.perf_counter()
            subprocess.run([sys.executable, "-m", "diffusekit", "generate", *PROMPTS, "--model", str(model), "--n", "8", "--seed", "0",
                            "--out", str(Path(tmp) / "g.png"), "--overwrite", *extra], check=True, capture_output=True)
            commands.append(time.perf_counter() - start)
    pipe = Pipeline.from_pretrained(model)
    steps = int(extra[extra.index("--steps") + 1]) if "--steps" in extra else None
    samplings = [8 / timed_sample(pipe, 8, prompts=PROMPTS, steps=steps, seed=0)[1] for _ in range(repeats)]
    return {"command_s": statistics.median(commands), "sampling_s": statistics.median(samplings), "command_runs_s": commands, "sampling_runs_s": samplings}


def emoji_part(args, rows: list[dict]) -> dict:
    teacher = Path(args.emoji_teacher or default_model())
    pipe = Pipeline.from_pretrained(teacher)
    data = load_dataset(pipe.config.data, progress=False)
    count = 16 if args.smoke else args.prompts
    targets = torch.linspace(0, len(data) - 1, count).round().long()
    extractor = get_feature_extractor("random")
    training_features, _ = embed(extractor, to_float(data.images))
    teacher_steps = 4 if args.smoke else 20
    rows.append(emoji_row(pipe, "teacher", data, training_features, targets, extractor, teacher_steps))
    speed = {"teacher": generate_seconds(teacher, ["--steps", str(teacher_steps)])}
    timings, sets = {}, ["train.checkpoint_every=100000"] + (SMOKE_SETS + ["distill.start_steps=8", "distill.solver_steps=10"] if args.smoke else [])
    for method in args.emoji_methods.split(","):
        out = Path(args.out) / f"emoji-{method}"
        timings[method] = distilled(teacher, out, method, 4, args, sets, args.emoji_budget)
        student = Pipeline.from_pretrained(out)
        for steps in (1, 2, 4) if method == "consistency" else (4,):
            rows.append(emoji_row(student, method, data, training_features, targets, extractor, steps))
        speed[method] = generate_seconds(out, [])
    for method in timings:
        speed[f"{method}_speedup"] = {k: speed["teacher"][k] / speed[method][k] for k in ("command_s", "sampling_s")}  # of the medians
    return {"teacher": str(teacher), "n_prompts": count, "n_training": len(data), "distillation": timings, "generate_8_prompts": speed,
            "budget": args.emoji_budget, "chance_top1": 1 / len(data)}


# ----------------------------------------------------------------------------- report


def plot(rows: list[dict], summary: dict, path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    parts = [p for p in ("mnist", "emoji") if any(r["part"] == p for r in rows)]
    fig, axes = plt.subplots(1, len(parts), figsize=(5.5 * len(parts), 4), squeeze=False)
    for ax, part in zip(axes[0], parts):
        key = "fd" if part == "mnist" else "fd_random"
        for r in (r for r in rows if r["part"] == part and r["model"] == "teacher"):  # one point per teacher sampler
            ax.plot([r["nfe"] * r.get("calls_per_step", 1)], [r[key]], marker="o", linestyle="", label=f"teacher, {r['sampler']} {r['nfe']} steps")
        for label, marker in (("progressive", "s"), ("consistency", "^")):
            points = sorted((r["nfe"], r[key]) for r in rows if r["part"] == part and r["model"] == label)
            if points:
                ax.plot(*zip(*points), marker=marker, label=f"{label} students")
        floor = summary.get("mnist", {}).get("real_data_floor") if part == "mnist" else None
        if floor:
            ax.axhline(sum(floor["fd"]) / len(floor["fd"]), color="grey", linestyle=":", label="real digits (the floor at this n)")
        ax.set(xscale="log", yscale="log", xlabel="network evaluations per image", ylabel=f"FD ({'MNIST' if part == 'mnist' else 'random features'})",
               title=part)
        ax.legend(fontsize=8)
    save(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("mnist", "emoji", "both"), default="both")
    parser.add_argument("--teacher", default="runs/bench_mnist", help="the mnist teacher (benchmarks/train_mnist.py's run)")
    parser.add_argument("--teacher-budget", default="10m", help="training time for the mnist teacher if --teacher does not exist")
    parser.add_argument("--budget", default="10m", help="each mnist distillation's budget")
    parser.add_argument("--n", type=int, default=1000, help="mnist samples per measurement")
    parser.add_argument("--emoji-teacher", help="the emoji teacher (default: the shipped model)")
    parser.add_argument("--emoji-methods", default="consistency", help="comma-separated: consistency, progressive")
    parser.add_argument("--emoji-budget", default="20m", help="each emoji distillation's budget")
    parser.add_argument("--prompts", type=int, default=300, help="emoji training captions for retrieval")
    parser.add_argument("--out", default="runs/few_step", help="where the students are distilled (a student already there is reused)")
    parser.add_argument("--json", default=None, help="default benchmarks/results/few_step.json (--smoke: runs/few_step_smoke.json)")
    parser.add_argument("--plot", default=None, help="default docs/few_step.png (--smoke: runs/few_step_smoke.png)")
    parser.add_argument("--smoke", action="store_true", help="tiny budgets and sample counts: only proves that the script runs")
    args = parser.parse_args()
    if args.smoke:  # tiny runs of a fixed number of steps (not budgets), few samples
        args.out, args.teacher, args.n = f"{args.out}_smoke", "runs/few_step_smoke/mnist-teacher", 50
    json_path = Path(args.json or ("runs/few_step_smoke.json" if args.smoke else "benchmarks/results/few_step.json"))
    plot_path = Path(args.plot or ("runs/few_step_smoke.png" if args.smoke else "docs/few_step.png"))

    use_all_cores()
    previous = json.loads(json_path.read_text()) if json_path.exists() else {}
    parts = ("mnist", "emoji") if args.part == "both" else (args.part,)
    rows = [r for r in previous.get("rows", []) if r["part"] not in parts]
    summary = {k: v for k, v in previous.get("summary", {}).items() if k not in parts}
    for part in parts:
        summary[part] = (mnist_part if part == "mnist" else emoji_part)(args, rows)
        report = {"smoke": args.smoke, "machine": machine(), "summary": summary, "rows": rows}
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(report, indent=2) + "\n")
    plot(rows, summary, plot_path)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
